//! TCP through the guest's network interface, Kiln's virtio-net against QEMU's
//! `virtio-net-device` (userspace, no vhost-net), each on a TAP in a namespace of its own with the
//! host's end of every connection at the gateway address: 256 MiB guest -> host and host -> guest
//! (the guest side is `head`/`wc` on bash's `/dev/tcp`, so no interpreter sits in the data path),
//! and 1-byte request/response round trips (TCP_RR, the guest side in Python).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_agent::protocol::{ExecSpec, ExitStatus};
use kiln_net::addr::GATEWAY_IP;

use super::median;
use kiln_tests::nic::Nic;

use super::peer::{Peer, Vm};

const BYTES: u64 = 256 << 20;
const ROUND_TRIPS: u32 = 2000;
const LIMIT: Duration = Duration::from_secs(300);

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Listens on the gateway address, port `port`, inside the TAP's namespace and serves one
/// connection with `serve` on a thread of its own; gives up if none comes within [`LIMIT`].
fn serve_one<T: Send + 'static>(
    nic: &Nic,
    port: u16,
    serve: impl FnOnce(TcpStream) -> Result<T, String> + Send + 'static,
) -> Result<JoinHandle<Result<T, String>>, String> {
    let listener = nic
        .ns
        .run(|| TcpListener::bind((GATEWAY_IP, port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listening on {GATEWAY_IP}:{port}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(std::thread::spawn(move || {
        let end = Instant::now() + LIMIT;
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accepting on port {port}: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(LIMIT))
            .map_err(|e| e.to_string())?;
        serve(conn)
    }))
}

/// Runs `script` with bash in the guest; its stdout, or an error if it failed.
fn guest(vm: &Vm, script: &str) -> Result<String, String> {
    let out = vm
        .client
        .run(ExecSpec::new(["bash", "-c", script]))
        .map_err(|e| format!("exec: {e}"))?;
    if out.status != ExitStatus::Exited(0) {
        return Err(format!(
            "{script}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn joined<T>(h: JoinHandle<Result<T, String>>) -> Result<T, String> {
    h.join().map_err(|_| "the host side panicked".to_string())?
}

fn guest_to_host(vm: &Vm, nic: &Nic) -> Result<f64, String> {
    let host = serve_one(nic, 5201, |mut c| {
        let start = Instant::now();
        let n = std::io::copy(&mut c, &mut std::io::sink()).map_err(|e| e.to_string())?;
        Ok((n, start.elapsed()))
    })?;
    guest(
        vm,
        &format!("head -c {BYTES} /dev/zero > /dev/tcp/{GATEWAY_IP}/5201"),
    )?;
    let (n, took) = joined(host)?;
    if n != BYTES {
        return Err(format!("the host received {n} bytes of {BYTES}"));
    }
    Ok(mb_per_s(n, took))
}

fn host_to_guest(vm: &Vm, nic: &Nic) -> Result<f64, String> {
    let host = serve_one(nic, 5202, |mut c| {
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        for _ in 0..BYTES / chunk.len() as u64 {
            c.write_all(&chunk).map_err(|e| format!("sending: {e}"))?;
        }
        c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        // The guest closes once `wc` has read everything.
        let _ = c.read_to_end(&mut Vec::new());
        Ok(start.elapsed())
    })?;
    let counted = guest(
        vm,
        &format!("exec 3<>/dev/tcp/{GATEWAY_IP}/5202; wc -c <&3"),
    )?;
    let took = joined(host)?;
    if counted != BYTES.to_string() {
        return Err(format!("the guest counted {counted:?} bytes of {BYTES}"));
    }
    Ok(mb_per_s(BYTES, took))
}

/// Microseconds per 1-byte round trip, as the guest measures it.
fn round_trip_us(vm: &Vm, nic: &Nic) -> Result<f64, String> {
    let host = serve_one(nic, 5203, |mut c| {
        c.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        while c.read_exact(&mut b).is_ok() {
            c.write_all(&b).map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    let script = format!(
        "python3 -c \"import socket, time\ns = socket.create_connection(('{GATEWAY_IP}', 5203))\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\nt = time.monotonic()\n\
         for _ in range({ROUND_TRIPS}):\n    s.sendall(b'x'); s.recv(1)\n\
         print((time.monotonic() - t) / {ROUND_TRIPS} * 1e6)\""
    );
    let us = guest(vm, &script)?;
    joined(host)?;
    us.parse()
        .map_err(|e| format!("the guest printed {us:?}: {e}"))
}

/// Measures everything `runs` times per VMM and prints medians and ratios.
pub fn run(runs: usize) -> Result<(), String> {
    let mut rows = Vec::new();
    for peer in Peer::BOTH {
        let nic = Nic::new()?;
        let vm = Vm::start_with(peer, Some(&nic))?;
        let (mut up, mut down, mut rr) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            down.push(guest_to_host(&vm, &nic)?);
            up.push(host_to_guest(&vm, &nic)?);
            rr.push(round_trip_us(&vm, &nic)?);
            eprintln!(
                "{} run {}/{runs}: guest->host {:.1} MB/s, host->guest {:.1} MB/s, round trip {:.0} us",
                peer.name(),
                i + 1,
                down[i],
                up[i],
                rr[i]
            );
        }
        vm.stop()?;
        rows.push((peer, median(&mut down), median(&mut up), median(&mut rr)));
    }
    println!(
        "TCP through the guest's NIC (a TAP; {} MiB each way, {ROUND_TRIPS} 1-byte round trips), median of {runs}:",
        BYTES >> 20
    );
    println!("  | | guest -> host | host -> guest | round trip |");
    println!("  |---|---|---|---|");
    for (peer, down, up, rr) in &rows {
        println!(
            "  | {} | {down:.1} MB/s | {up:.1} MB/s | {rr:.0} us |",
            peer.name()
        );
    }
    if let [(_, kd, ku, kr), (_, qd, qu, qr)] = rows[..] {
        println!(
            "kiln-vmm / QEMU: guest -> host {:.2}x, host -> guest {:.2}x (goal >= 1.0x on throughput); round trip {:.2}x QEMU's time",
            kd / qd,
            ku / qu,
            kr / qr
        );
    }
    Ok(())
}
