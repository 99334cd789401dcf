//! `kiln-lab-bench cycles [--restores N] [--boots M]`: N restores of one snapshot (restore, exec,
//! kill) and M boots (boot, exec, shutdown) in one L1, one after another, as `kiln run` makes
//! them; p50/p99 of each and how many times faster a restore cycle is than a boot cycle. A cycle
//! that hangs or fails ends the run with what the stuck processes were doing.

use kiln_tests::ScratchDir;
use kiln_tests::cycles::{Census, Cycle, make_snapshot, p50_p99, run_cycle};

/// Parses `--restores N --boots M` (defaults 500 and 200).
fn counts(args: &[String]) -> Result<(usize, usize), String> {
    let (mut restores, mut boots) = (500, 200);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| format!("{flag} needs a whole number"))?;
        match flag.as_str() {
            "--restores" => restores = value,
            "--boots" => boots = value,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok((restores, boots))
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let (restores, boots) = counts(args)?;
    let scratch = ScratchDir::new("bench-cycles");
    let snap = make_snapshot(scratch.path())?;
    let before = Census::take();
    let mut medians = Vec::new();
    for (kind, n) in [(Cycle::Restore, restores), (Cycle::Boot, boots)] {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            times.push(run_cycle(kind, i, &snap)?);
            if (i + 1) % 50 == 0 {
                println!("  {kind:?}: {} cycles done", i + 1);
            }
        }
        let (p50, p99) = p50_p99(&times);
        println!(
            "{n} {kind:?} cycles (kiln run ... -- sh -c 'echo ...'): p50 {p50} ms, p99 {p99} ms"
        );
        medians.push(p50);
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
    println!("nothing left behind: {after:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_default_and_parse() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(counts(&[]).unwrap(), (500, 200));
        assert_eq!(
            counts(&s(&["--boots", "3", "--restores", "9"])).unwrap(),
            (9, 3)
        );
        assert!(counts(&s(&["--boots"])).is_err());
        assert!(counts(&s(&["--x", "1"])).is_err());
    }
}
