//! Exec round trip: the host asks the agent to run a command and waits for its exit status (and
//! output), measured over many runs on one connection, under kiln-vmm and QEMU.

use std::time::{Duration, Instant};

use kiln_agent::protocol::{ExecSpec, ExitStatus};

use super::peer::{Peer, Vm};

/// p50 and p99 of `samples`, in milliseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

fn round_trips(vm: &Vm, argv: &[&str], want: &[u8], runs: usize) -> Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = vm
            .client
            .run(ExecSpec::new(argv.iter().copied()))
            .map_err(|e| format!("{argv:?}: {e}"))?;
        samples.push(start.elapsed());
        if out.status != ExitStatus::Exited(0) || out.stdout != want {
            return Err(format!(
                "{argv:?} gave {:?} with stdout {:?}",
                out.status, out.stdout
            ));
        }
    }
    Ok(samples)
}

/// Runs `true` and `echo` `runs` times each per VMM and prints p50/p99 and the ratios.
pub fn run(runs: usize) -> Result<(), String> {
    let mut rows = Vec::new();
    for peer in Peer::BOTH {
        let vm = Vm::start(peer)?;
        round_trips(&vm, &["true"], b"", 5)?; // warm the page cache and the agent
        let mut t = round_trips(&vm, &["true"], b"", runs)?;
        let mut e = round_trips(&vm, &["echo", "hello"], b"hello\n", runs)?;
        vm.stop()?;
        rows.push((peer, percentiles(&mut t), percentiles(&mut e)));
    }
    println!("exec round trip through the agent over vsock, {runs} runs each, one connection");
    println!(
        "{:<14}{:>12}{:>12}{:>12}{:>12}",
        "", "true p50", "true p99", "echo p50", "echo p99"
    );
    for (peer, (t50, t99), (e50, e99)) in &rows {
        println!(
            "{:<14}{t50:>10.2}ms{t99:>10.2}ms{e50:>10.2}ms{e99:>10.2}ms",
            peer.name()
        );
    }
    if let [(_, (kt, _), (ke, _)), (_, (qt, _), (qe, _))] = rows.as_slice() {
        println!(
            "ratio (qemu p50 / kiln p50): true {:.2}x, echo {:.2}x",
            qt / kt,
            qe / ke
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentiles(&mut v), (50.0, 99.0));
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(percentiles(&mut one), (7.0, 7.0));
    }
}
