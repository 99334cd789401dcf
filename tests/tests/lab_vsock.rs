//! virtio-vsock end to end with Firecracker's host protocol, inside the nested lab. The guest side is
//! python3 from the Debian rootfs running as init: it serves an echo on vsock port 1234 for the host
//! (reached with `CONNECT 1234`), then connects to host port 5678, which kiln-vmm routes to the Unix
//! socket `<uds>_5678`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{kiln_vmm_rootfs, rootfs};

/// The guest program, one line of `;`-separated statements with single quotes only: it travels in
/// a double-quoted kernel parameter.
const GUEST: &str = "import socket, ctypes, os; s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); s.bind((socket.VMADDR_CID_ANY, 1234)); s.listen(1); print('guest listening', flush=True); c, peer = s.accept(); data = c.recv(64); c.sendall(b'echo:' + data); c.close(); t = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); t.connect((2, 5678)); t.sendall(b'hello from the guest'); t.close(); print('guest done', flush=True); ctypes.CDLL(None).reboot(0x1234567)";

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects through the vsock UDS to guest port `port`, retrying while the guest is not listening;
/// if kiln-vmm has exited meanwhile, fails with its console output.
fn connect_guest(uds: &Path, port: u32, vmm: &mut Child, limit: Duration) -> (UnixStream, String) {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = vmm.try_wait() {
            let mut console = String::new();
            vmm.stdout
                .take()
                .map(|mut o| o.read_to_string(&mut console));
            panic!("kiln-vmm exited ({status}) before the guest listened; console:\n{console}");
        }
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                return (s, line);
            }
        }
        assert!(
            start.elapsed() < limit,
            "the guest never accepted on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn host_and_guest_reach_each_other_over_vsock() {
    let dir = std::env::temp_dir().join(format!("kiln-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_5678")).expect("bind the host listener");
    let disk = dir.join("rootfs.ext4");
    std::fs::copy(rootfs(), &disk).expect("copy the rootfs");

    let cmdline =
        format!("console=ttyS0 reboot=k panic=-1 quiet init=/usr/bin/python3 -- -c \"{GUEST}\"");
    let mut vmm = kiln_vmm_rootfs(&disk, true, &uds, 256, &cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kiln-vmm");

    wait_for(&uds, Duration::from_secs(30));
    let (mut s, ok) = connect_guest(&uds, 1234, &mut vmm, Duration::from_secs(120));
    assert!(
        ok.trim_end()
            .strip_prefix("OK ")
            .is_some_and(|p| p.parse::<u32>().is_ok()),
        "{ok:?}"
    );
    s.write_all(b"ping").unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"echo:ping");

    listener.set_nonblocking(false).unwrap();
    let (mut from_guest, _) = listener
        .accept()
        .expect("the guest connects to host port 5678");
    let mut got = Vec::new();
    from_guest.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello from the guest");

    let status = vmm.wait().expect("kiln-vmm exits");
    let mut console = String::new();
    vmm.stdout
        .take()
        .map(|mut o| o.read_to_string(&mut console));
    assert!(console.contains("guest done"), "console:\n{console}");
    assert_eq!(status.code(), Some(0), "console:\n{console}");
}
