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
        conn.set_write_timeout(Some(LIMIT))
            .map_err(|e| e.to_string())?;
        serve(conn)
    }))
}

/// Runs `script` with bash in the guest, for at most [`LIMIT`]; its stdout, or an error if it
/// failed.
fn guest(vm: &Vm, script: &str) -> Result<String, String> {
    let limit = LIMIT.as_secs().to_string();
    let out = vm
        .client
        .run(ExecSpec::new(["timeout", &limit, "bash", "-c", script]))
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

/// Pins every thread of process `pid` (the threads it starts later inherit it) to L1's CPU
/// `cpu`, so both VMMs get the same one CPU for their vCPU and device work and the bench's own
/// end of each connection keeps the other.
fn pin(pid: u32, cpu: usize) -> Result<(), String> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` (< CPU_SETSIZE) of the set it is given.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("the threads of process {pid}: {e}"))?;
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: the set is a valid cpu_set_t of the size given; the call reads it only.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            return Err(format!(
                "pinning thread {tid} of process {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// One measure of each kind; a failed one (a stalled connection times out) comes with what
/// both ends and the device saw.
fn measure(vm: &Vm, nic: &Nic) -> Result<[f64; 3], String> {
    let m = (|| {
        Ok::<_, String>([
            guest_to_host(vm, nic)?,
            host_to_guest(vm, nic)?,
            round_trip_us(vm, nic)?,
        ])
    })();
    m.map_err(|e| format!("{e}\n{}", stall_report(vm, nic)))
}

/// The guest's eth0 receive length errors (`frame` in /proc/net/dev: a frame whose
/// `num_buffers` or length did not match the buffers it came in) and drops.
fn guest_rx_errors(vm: &Vm) -> Result<(u64, u64), String> {
    let line = guest(vm, "grep eth0: /proc/net/dev")?;
    let fields: Vec<u64> = line
        .split_once(':')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // bytes packets errs drop fifo frame ...
    match fields.as_slice() {
        [_, _, _, drop, _, frame, ..] => Ok((*frame, *drop)),
        _ => Err(format!("cannot read eth0's counters from {line:?}")),
    }
}

/// The guest's interface and TCP counters and sockets, L1's sockets in the TAP's namespace, and
/// kiln-vmm's device counters over the next metrics period (the connections are still open).
fn stall_report(vm: &Vm, nic: &Nic) -> String {
    let guest_side = guest(
        vm,
        "cat /proc/net/dev /proc/net/tcp; grep -E '^(Ip|Tcp):' /proc/net/snmp; \
         grep -i virtio /proc/interrupts",
    )
    .unwrap_or_else(|e| format!("(the guest did not answer: {e})"));
    let host_side = nic
        .ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| format!("(cannot read: {e})"));
    let device = vm
        .next_metrics()
        .map(|m| format!("net {}\nvcpu {}", m["net"], m["vcpu"]))
        .unwrap_or_else(|| "(no metrics line)".into());
    format!(
        "--- guest:\n{guest_side}\n--- L1, the TAP's namespace, /proc/net/tcp:\n{host_side}\n\
         --- the device over the next metrics period:\n{device}"
    )
}

/// Boots both VMMs side by side (each on its own TAP, both pinned to L1's second CPU, the
/// bench on the first), then measures them in turns, Kiln then QEMU, `runs` times: whatever
/// else L1 is doing weighs on both alike. Prints medians and the median of the per-turn ratios.
pub fn run(runs: usize) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (bench_cpu, vmm_cpu) = if cpus >= 2 { (0, 1) } else { (0, 0) };
    pin(std::process::id(), bench_cpu)?;
    let mut vms = Vec::new();
    for peer in Peer::BOTH {
        let nic = Nic::new()?;
        let vm = Vm::start_with(peer, Some(&nic))?;
        pin(vm.pid(), vmm_cpu)?;
        vms.push((peer, nic, vm));
    }
    // figures[peer][kind][run]
    let mut figures = vec![vec![Vec::new(); 3]; vms.len()];
    for i in 0..runs {
        for (p, (peer, nic, vm)) in vms.iter().enumerate() {
            let m = measure(vm, nic)?;
            eprintln!(
                "{} run {}/{runs}: guest->host {:.1} MB/s, host->guest {:.1} MB/s, round trip {:.0} us",
                peer.name(),
                i + 1,
                m[0],
                m[1],
                m[2]
            );
            for (k, v) in m.into_iter().enumerate() {
                figures[p][k].push(v);
            }
        }
    }
    // Kiln over QEMU per turn, before the figures are sorted for their medians.
    let mut ratios: Vec<Vec<f64>> = (0..3)
        .map(|k| {
            figures[0][k]
                .iter()
                .zip(&figures[1][k])
                .map(|(a, b)| a / b)
                .collect()
        })
        .collect();
    // Kiln's guest must have had no malformed frame (QEMU's are printed, not judged). Drops are
    // printed only: the guest's stack also drops what it has no handler for (L1's IPv6
    // multicast, say).
    let mut rx_errors = Vec::new();
    for (peer, _, vm) in &vms {
        let (frame, drop) = guest_rx_errors(vm)?;
        if *peer == Peer::Kiln && frame != 0 {
            return Err(format!(
                "kiln-vmm's guest saw {frame} malformed frames on eth0 (and dropped {drop})"
            ));
        }
        rx_errors.push((frame, drop));
    }
    for (_, _, vm) in vms.drain(..) {
        vm.stop()?;
    }
    println!(
        "TCP through the guest's NIC (a TAP; {} MiB each way, {ROUND_TRIPS} 1-byte round trips), \
         both VMMs on one L1 CPU, measured in turns; median of {runs}:",
        BYTES >> 20
    );
    println!(
        "  | | guest -> host | host -> guest | round trip | guest's eth0: malformed frames, drops |"
    );
    println!("  |---|---|---|---|---|");
    for ((peer, f), (frame, drop)) in Peer::BOTH.iter().zip(figures.iter_mut()).zip(rx_errors) {
        println!(
            "  | {} | {:.1} MB/s | {:.1} MB/s | {:.0} us | {frame}, {drop} |",
            peer.name(),
            median(&mut f[0]),
            median(&mut f[1]),
            median(&mut f[2])
        );
    }
    println!(
        "kiln-vmm / QEMU, median of the per-turn ratios: guest -> host {:.2}x, host -> guest {:.2}x \
         (goal >= 1.0x on throughput); round trip {:.2}x QEMU's time",
        median(&mut ratios[0]),
        median(&mut ratios[1]),
        median(&mut ratios[2])
    );
    Ok(())
}
