//! Where a process's memory goes, from `/proc/PID/smaps`: PSS and private bytes per kind of
//! mapping (guest memory, the VMM's own code and data, heap, other anonymous memory such as
//! malloc arenas and thread stacks, shared libraries), so a benchmark can say what an idle VM
//! costs and why.

use std::collections::BTreeMap;

/// What a mapping holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The guest's memory: the memory file a restore maps, or a booted VM's memfd.
    Guest,
    /// The kiln-vmm executable (code, read-only data, its data and bss).
    Binary,
    /// `[heap]`: the main arena of malloc.
    Heap,
    /// Anonymous mappings: other malloc arenas, thread stacks, large allocations.
    Anonymous,
    /// Shared libraries.
    Libraries,
    /// Anything else (`[stack]`, `[vdso]`, other files).
    Other,
}

/// PSS and private (clean + dirty) bytes of one kind, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Proportional set size.
    pub pss: u64,
    /// Private_Clean + Private_Dirty.
    pub private: u64,
}

/// The kind of the mapping named `name` (the smaps header's path or pseudo-name, maybe empty);
/// `guest` tells the guest memory's name apart.
fn kind_of(name: &str, guest: &dyn Fn(&str) -> bool) -> Kind {
    match name {
        "" => Kind::Anonymous,
        "[heap]" => Kind::Heap,
        n if guest(n) => Kind::Guest,
        n if n
            .rsplit('/')
            .next()
            .is_some_and(|f| f.starts_with("kiln-vmm")) =>
        {
            Kind::Binary
        }
        n if n.contains(".so") => Kind::Libraries,
        _ => Kind::Other,
    }
}

/// One mapping of an smaps text: its header line, name (empty for anonymous memory), size and
/// the KiB it holds.
struct Mapping {
    header: String,
    name: String,
    size_kib: u64,
    usage: Usage,
}

/// The mappings of an smaps text, in order.
fn mappings(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if !first.ends_with(':') && first.contains('-') {
            // `start-end perms offset dev inode [name...]`
            let size = first
                .split_once('-')
                .and_then(|(a, b)| {
                    u64::from_str_radix(b, 16)
                        .ok()?
                        .checked_sub(u64::from_str_radix(a, 16).ok()?)
                })
                .unwrap_or(0);
            out.push(Mapping {
                header: line.to_string(),
                name: words.skip(4).collect::<Vec<_>>().join(" "),
                size_kib: size / 1024,
                usage: Usage::default(),
            });
            continue;
        }
        let Some(mapping) = out.last_mut() else {
            continue;
        };
        let kib = words
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "Pss:" => mapping.usage.pss += kib,
            "Private_Clean:" | "Private_Dirty:" => mapping.usage.private += kib,
            _ => {}
        }
    }
    out
}

/// Parses an smaps text into usage by kind; `guest` says whether a mapping's name is guest memory.
pub fn parse(text: &str, guest: &dyn Fn(&str) -> bool) -> BTreeMap<Kind, Usage> {
    let mut out: BTreeMap<Kind, Usage> = BTreeMap::new();
    for m in mappings(text) {
        let usage = out.entry(kind_of(&m.name, guest)).or_default();
        usage.pss += m.usage.pss;
        usage.private += m.usage.private;
    }
    out
}

/// `/proc/PID/smaps`.
fn read(pid: u32) -> Result<String, String> {
    let path = format!("/proc/{pid}/smaps");
    std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))
}

/// Usage by kind of process `pid`; guest memory is the mapping whose name contains any of
/// `guest_names` (a memory file's path, `kiln-guest-mem` for the memfd).
pub fn usage(pid: u32, guest_names: &[&str]) -> Result<BTreeMap<Kind, Usage>, String> {
    Ok(parse(&read(pid)?, &|n| {
        guest_names.iter().any(|g| n.contains(g))
    }))
}

/// The anonymous mappings of `pid` holding at least `min_kib` of PSS, largest first, as
/// `(size KiB, PSS KiB, header line)`: thread stacks show as 2 MiB + 4 KiB mappings (Rust's
/// default stack and its guard), large allocations at their own sizes.
pub fn largest_anonymous(pid: u32, min_kib: u64) -> Result<Vec<(u64, u64, String)>, String> {
    let mut out: Vec<(u64, u64, String)> = mappings(&read(pid)?)
        .into_iter()
        .filter(|m| m.name.is_empty() && m.usage.pss >= min_kib)
        .map(|m| (m.size_kib, m.usage.pss, m.header))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.1));
    Ok(out)
}

/// A markdown table of `usages` averaged over them (one map per process), in MiB.
pub fn table(usages: &[BTreeMap<Kind, Usage>]) -> String {
    let mut sum: BTreeMap<Kind, Usage> = BTreeMap::new();
    for u in usages {
        for (k, v) in u {
            let s = sum.entry(*k).or_default();
            s.pss += v.pss;
            s.private += v.private;
        }
    }
    let n = usages.len().max(1) as f64;
    let mib = |kib: u64| kib as f64 / 1024.0 / n;
    let mut out = String::from("  | mapping | PSS MiB | private MiB |\n  |---|---|---|\n");
    let (mut pss, mut private) = (0, 0);
    for (k, v) in &sum {
        out += &format!("  | {k:?} | {:.2} | {:.2} |\n", mib(v.pss), mib(v.private));
        pss += v.pss;
        private += v.private;
    }
    out += &format!("  | all | {:.2} | {:.2} |\n", mib(pss), mib(private));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_touched_allocation_is_among_the_largest_anonymous_mappings() {
        // 3 MiB, past malloc's mmap threshold: a mapping of its own, every page written.
        let block = vec![7u8; 3 << 20];
        let found = largest_anonymous(std::process::id(), 1024).unwrap();
        assert!(
            found
                .iter()
                .any(|&(size, pss, _)| size >= 3072 && pss >= 3000),
            "{found:?}"
        );
        assert!(found.windows(2).all(|w| w[0].1 >= w[1].1), "largest first");
        drop(block);
    }

    #[test]
    fn mappings_are_sorted_into_kinds() {
        let text = "\
55d0-55e0 r-xp 00000000 08:01 42 /kiln/bin/kiln-vmm
Pss:                 100 kB
Private_Clean:        10 kB
Private_Dirty:         0 kB
55f0-5600 rw-p 00000000 00:00 0 [heap]
Pss:                 300 kB
Private_Dirty:       300 kB
7f00-7f10 rw-p 00000000 00:00 0 
Pss:                  50 kB
Private_Dirty:        50 kB
7f10-7f20 rw-p 00000000 00:05 7 /tmp/snap/mem.snap
Pss:                2000 kB
Private_Clean:         4 kB
Private_Dirty:      1500 kB
7f20-7f30 r-xp 00000000 08:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6
Pss:                  20 kB
7ffd-7ffe rw-p 00000000 00:00 0 [stack]
Pss:                  12 kB
";
        let u = parse(text, &|n| n.ends_with("mem.snap"));
        assert_eq!(
            u[&Kind::Binary],
            Usage {
                pss: 100,
                private: 10
            }
        );
        assert_eq!(
            u[&Kind::Heap],
            Usage {
                pss: 300,
                private: 300
            }
        );
        assert_eq!(
            u[&Kind::Anonymous],
            Usage {
                pss: 50,
                private: 50
            }
        );
        assert_eq!(
            u[&Kind::Guest],
            Usage {
                pss: 2000,
                private: 1504
            }
        );
        assert_eq!(u[&Kind::Libraries].pss, 20);
        assert_eq!(u[&Kind::Other].pss, 12);
        let t = table(&[u.clone(), u]);
        assert!(t.contains("| Guest | 1.95 | 1.47 |"), "{t}");
        assert!(t.contains("| all |"), "{t}");
    }
}
