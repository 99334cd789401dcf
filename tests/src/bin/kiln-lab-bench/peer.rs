//! The two VMMs a benchmark compares, each booting the Debian rootfs with the agent as init and
//! handing back an agent client: kiln-vmm (vsock through its Unix socket) and QEMU microvm with
//! vhost-vsock (an AF_VSOCK socket from L1). Same kernel, rootfs, memory and agent for both.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::AGENT_PORT;
use kiln_agent::client::{Client, from_socket, wait_ready};
use kiln_agent::link::Socket;
use kiln_tests::nic::Nic;
use kiln_tests::{guest_kernel, kiln_vmm_rootfs, qemu_microvm, rootfs, wait_with_deadline};

const BOOT_LIMIT: Duration = Duration::from_secs(120);
const MEM_MIB: u32 = 512;
const AGENT_INIT: &str = "console=ttyS0 panic=-1 quiet init=/usr/sbin/kiln-agent";
/// QEMU's guest CID (Kiln's guests use 3; distinct so a stale socket can never be confused).
pub(crate) const QEMU_CID: u32 = 4;

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// kiln-vmm.
    Kiln,
    /// QEMU -M microvm with vhost-vsock-device.
    Qemu,
}

impl Peer {
    /// Both, Kiln first.
    pub const BOTH: [Peer; 2] = [Peer::Kiln, Peer::Qemu];

    /// The name printed in tables.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Kiln => "kiln-vmm",
            Peer::Qemu => "qemu microvm",
        }
    }
}

/// A running VM with a connected agent client.
pub struct Vm {
    /// The agent.
    pub client: Client,
    child: Child,
    dir: PathBuf,
    /// kiln-vmm's metrics file (given when the VM has a NIC).
    metrics: Option<PathBuf>,
}

impl Vm {
    /// Boots `peer` from a private copy of the rootfs and connects to its agent.
    pub fn start(peer: Peer) -> Result<Vm, String> {
        Self::start_with(peer, None)
    }

    /// As [`Vm::start`], with `nic` as the guest's eth0 when given (Kiln's virtio-net or QEMU's
    /// `virtio-net-device` on the TAP, the VMM in the TAP's namespace).
    pub fn start_with(peer: Peer, nic: Option<&Nic>) -> Result<Vm, String> {
        let dir = std::env::temp_dir().join(format!("kiln-bench-{}-{peer:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let disk = dir.join("rootfs.ext4");
        std::fs::copy(rootfs(), &disk).map_err(|e| format!("copying the rootfs: {e}"))?;
        let uds = dir.join("v.sock");
        let metrics = (peer == Peer::Kiln && nic.is_some()).then(|| dir.join("metrics.json"));
        let net_word = match nic {
            Some(_) => format!(" {}", kiln_net::addr::guest_net_spec().to_cmdline()),
            None => String::new(),
        };
        let mut cmd = match peer {
            Peer::Kiln => {
                let mut c = kiln_vmm_rootfs(
                    &disk,
                    false,
                    &uds,
                    MEM_MIB,
                    &format!("{AGENT_INIT} reboot=k{net_word}"),
                );
                if nic.is_some() {
                    c.args(["--net", &kiln_net::addr::vmm_net_arg()]);
                }
                if let Some(path) = &metrics {
                    c.arg("--metrics-path").arg(path);
                }
                c
            }
            Peer::Qemu => {
                let mut c = qemu_microvm(1, MEM_MIB);
                c.arg("-kernel").arg(guest_kernel());
                // microvm appends the virtio_mmio.device= entries itself; reboot=t because it has
                // no i8042 (a triple fault ends QEMU under -no-reboot).
                c.args([
                    "-append",
                    &format!("{AGENT_INIT} reboot=t root=/dev/vda rw{net_word}"),
                ]);
                if nic.is_some() {
                    // QEMU's own virtio-net in userspace (no vhost-net): the device model runs
                    // in the VMM process, as Kiln's does.
                    c.args([
                        "-netdev",
                        &format!(
                            "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                            kiln_net::addr::TAP_NAME
                        ),
                        "-device",
                        &format!(
                            "virtio-net-device,netdev=n0,mac={}",
                            kiln_net::addr::mac_string(&kiln_net::addr::GUEST_MAC)
                        ),
                    ]);
                }
                c.arg("-drive")
                    .arg(format!("id=d0,file={},format=raw,if=none", disk.display()));
                c.args(["-device", "virtio-blk-device,drive=d0"]);
                c.args([
                    "-device",
                    &format!("vhost-vsock-device,guest-cid={QEMU_CID}"),
                ]);
                c
            }
        };
        if let Some(nic) = nic {
            nic.enter_on_spawn(&mut cmd);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", peer.name()))?;
        let deadline = Instant::now() + BOOT_LIMIT;
        let client = match peer {
            Peer::Kiln => {
                wait_ready(&uds, deadline).map_err(|e| format!("kiln-vmm's agent: {e}"))?
            }
            Peer::Qemu => qemu_agent(deadline)?,
        };
        Ok(Vm {
            client,
            child,
            dir,
            metrics,
        })
    }

    /// kiln-vmm's next metrics line (its devices' counters since the line before), waiting for
    /// the periodic flush; `None` for QEMU, or when no line comes.
    pub fn next_metrics(&self) -> Option<serde_json::Value> {
        let path = self.metrics.as_ref()?;
        let lines = |p: &PathBuf| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        let before = lines(path);
        let end = Instant::now() + Duration::from_secs(70);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(500));
            let text = std::fs::read_to_string(path).ok()?;
            if text.lines().count() > before {
                return serde_json::from_str(text.lines().last()?).ok();
            }
        }
        None
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Shuts the guest down and waits for the VMM to exit.
    pub fn stop(mut self) -> Result<(), String> {
        self.client
            .shutdown()
            .map_err(|e| format!("shutdown: {e}"))?;
        let (_, killed) = wait_with_deadline(&mut self.child, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        if killed {
            return Err("the VMM did not exit after the guest shut down".into());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

/// Connects an AF_VSOCK stream to the agent in QEMU's guest, retrying while it boots.
pub(crate) fn qemu_agent(deadline: Instant) -> Result<Client, String> {
    loop {
        if let Ok(fd) = vsock_connect(QEMU_CID, AGENT_PORT)
            && let Ok(client) = from_socket(Socket::from_fd(fd), Duration::from_secs(10))
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            return Err("QEMU's agent never answered on vsock".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}
