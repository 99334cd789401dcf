//! vsock throughput through the agent: 64 MiB into a command's stdin (host -> guest) and 64 MiB
//! out of its stdout (guest -> host), under kiln-vmm and QEMU with vhost-vsock.

use std::io::Write;
use std::time::Instant;

use kiln_agent::protocol::{ExecSpec, ExitStatus};

use super::median;
use super::peer::{Peer, Vm};

const BYTES: usize = 256 << 20;

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn host_to_guest(vm: &Vm) -> Result<f64, String> {
    let mut spec = ExecSpec::new(["sh", "-c", "wc -c"]);
    spec.stdin = true;
    let mut exec = vm.client.exec(spec).map_err(|e| format!("exec: {e}"))?;
    let mut stdin = exec.take_stdin().ok_or("no stdin")?;
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..BYTES / chunk.len() {
        stdin
            .write_all(&chunk)
            .map_err(|e| format!("writing stdin: {e}"))?;
    }
    stdin.close();
    let out = exec.output().map_err(|e| format!("waiting: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let counted = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status != ExitStatus::Exited(0) || counted != BYTES.to_string() {
        return Err(format!(
            "the guest counted {counted:?} bytes ({:?})",
            out.status
        ));
    }
    Ok(mb_per_s(BYTES, secs))
}

fn guest_to_host(vm: &Vm) -> Result<f64, String> {
    let spec = ExecSpec::new(["head", "-c", &BYTES.to_string(), "/dev/zero"]);
    let start = Instant::now();
    let exec = vm.client.exec(spec).map_err(|e| format!("exec: {e}"))?;
    let mut got = 0usize;
    let status = exec
        .wait_with(|b: &[u8]| got += b.len(), |_: &[u8]| {})
        .map_err(|e| format!("reading stdout: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    if status != ExitStatus::Exited(0) || got != BYTES {
        return Err(format!("received {got} bytes ({status:?})"));
    }
    Ok(mb_per_s(BYTES, secs))
}

/// Measures both directions `runs` times per VMM and prints medians and ratios.
pub fn run(runs: usize) -> Result<(), String> {
    let mut rows = Vec::new();
    for peer in Peer::BOTH {
        let vm = Vm::start(peer)?;
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for i in 0..runs {
            up.push(host_to_guest(&vm)?);
            down.push(guest_to_host(&vm)?);
            eprintln!(
                "{} run {}/{runs}: host->guest {:.1} MB/s, guest->host {:.1} MB/s",
                peer.name(),
                i + 1,
                up[i],
                down[i]
            );
        }
        vm.stop()?;
        rows.push((peer, median(&mut up), median(&mut down)));
    }
    println!(
        "vsock throughput through the agent (exec stdin/stdout), {} MiB, median of {runs}",
        BYTES >> 20
    );
    println!(
        "{:<14}{:>16}{:>16}",
        "", "host->guest MB/s", "guest->host MB/s"
    );
    for (peer, up, down) in &rows {
        println!("{:<14}{up:>16.1}{down:>16.1}", peer.name());
    }
    if let [(_, ku, kd), (_, qu, qd)] = rows.as_slice() {
        println!(
            "ratio (kiln / qemu): host->guest {:.2}x, guest->host {:.2}x",
            ku / qu,
            kd / qd
        );
    }
    Ok(())
}
