//! `kiln-lab-bench cycles [--restores N] [--boots M] [--net K]`: N restores of one snapshot
//! (restore, exec, kill), M boots (boot, exec, shutdown) and K restores of a snapshot with a NIC,
//! each on a sandbox network made and removed with it (`--allow-domain`), in one L1, one after
//! another, as `kiln run` makes them; p50/p99 of each and how many times faster a restore cycle
//! is than a boot cycle. A cycle that hangs or fails ends the run with what the stuck processes
//! were doing; anything left behind (processes, namespaces, links, rules, listeners, more than
//! [`MEMORY_SLACK_MIB`] of L1's memory) fails it.

use kiln_tests::ScratchDir;
use kiln_tests::cycles::{
    Census, Cycle, make_snapshot, make_snapshot_with_nic, memory_in_use_mib, p50_p99, run_cycle,
};
use kiln_tests::fakenet::census;

/// How much more of L1's memory may be in use after the cycles than before: kernel caches that
/// dropping the page cache does not empty (slab, page tables) move by a few MiB; one VM left
/// behind would hold far more (its guest's memory and the VMM's).
const MEMORY_SLACK_MIB: u64 = 32;

/// Parses `--restores N --boots M --net K` (defaults 500, 200 and 200).
fn counts(args: &[String]) -> Result<(usize, usize, usize), String> {
    let (mut restores, mut boots, mut net) = (500, 200, 200);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| format!("{flag} needs a whole number"))?;
        match flag.as_str() {
            "--restores" => restores = value,
            "--boots" => boots = value,
            "--net" => net = value,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok((restores, boots, net))
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let (restores, boots, net) = counts(args)?;
    let scratch = ScratchDir::new("bench-cycles");
    let snap = make_snapshot(scratch.path())?;
    let net_dir = scratch.path().join("net");
    std::fs::create_dir_all(&net_dir).map_err(|e| format!("{}: {e}", net_dir.display()))?;
    // The sandbox networks resolve through the host's name server: L1 has none but the small
    // internet's (which also answers for the allowed name), and a loopback that is down.
    let _internet = (net > 0).then(|| {
        let _ = kiln_net::link::up("lo");
        kiln_tests::fakenet::FakeInternet::start()
    });
    let net_snap = match net {
        0 => None,
        _ => Some(make_snapshot_with_nic(&net_dir, "allowed.test")?),
    };
    let before = Census::take();
    let net_before = census();
    let mem_before = memory_in_use_mib()?;
    let mut medians = Vec::new();
    for (kind, n) in [
        (Cycle::Restore, restores),
        (Cycle::Boot, boots),
        (Cycle::NetRestore("allowed.test"), net),
    ] {
        let mut times = Vec::with_capacity(n);
        let snap = match kind {
            Cycle::NetRestore(_) => net_snap.as_deref().unwrap_or(&snap),
            _ => &snap,
        };
        for i in 0..n {
            times.push(run_cycle(kind, i, snap)?);
            if (i + 1) % 50 == 0 {
                println!("  {kind:?}: {} cycles done", i + 1);
            }
        }
        let (p50, p99) = p50_p99(&times);
        println!(
            "{n} {kind:?} cycles (kiln run ... -- sh -c 'echo ...'): p50 {p50} ms, p99 {p99} ms"
        );
        if kind != Cycle::NetRestore("allowed.test") {
            medians.push(p50);
        }
    }
    if let [restore, boot] = medians[..]
        && restore > 0
    {
        println!(
            "a restore cycle takes {:.2}x the time of a boot cycle ({:.1}x faster)",
            restore as f64 / boot.max(1) as f64,
            boot as f64 / restore as f64
        );
    }
    let after = Census::take();
    if before != after {
        return Err(format!(
            "the cycles left something behind: before {before:?}, after {after:?}"
        ));
    }
    let net_after = census();
    if net_before != net_after {
        return Err(format!(
            "the network cycles left something behind: before {net_before:?}, after {net_after:?}"
        ));
    }
    let mem_after = memory_in_use_mib()?;
    println!("L1 memory in use (caches dropped): {mem_before} MiB before, {mem_after} MiB after");
    if mem_after > mem_before + MEMORY_SLACK_MIB {
        return Err(format!(
            "the cycles left memory behind: {mem_before} MiB in use before, {mem_after} MiB after"
        ));
    }
    println!("nothing left behind: {after:?}; namespaces, links, rules and listeners as before");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_default_and_parse() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(counts(&[]).unwrap(), (500, 200, 200));
        assert_eq!(
            counts(&s(&["--boots", "3", "--restores", "9", "--net", "4"])).unwrap(),
            (9, 3, 4)
        );
        assert!(counts(&s(&["--boots"])).is_err());
        assert!(counts(&s(&["--x", "1"])).is_err());
    }
}
