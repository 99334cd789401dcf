//! `kiln snapshot`'s command line: `create`, `load` and `merge`, each mistake one line naming the
//! flag or value.

use std::path::PathBuf;

use crate::args::Words;

/// The usage text of `kiln snapshot`.
pub const USAGE: &str = "usage: kiln snapshot create --api-sock SOCK --dir DIR [--diff] [--resume]
                            [--reclaim VSOCK_UDS]
       kiln snapshot load --api-sock SOCK --dir DIR [--resume] [--vsock-uds PATH]
                          [--track-dirty-pages]
       kiln snapshot merge BASE_MEM DIFF_MEM...

create  pauses the VM behind the kiln-vmm API socket SOCK (if it runs) and writes its snapshot
        to DIR/vmstate and DIR/memory, creating DIR. --diff writes only the memory pages
        dirtied since the last snapshot (the VM must track dirty pages). The VM stays paused
        unless --resume. Memory the guest freed (free page reporting) or holds in its balloon
        is left out. --reclaim first asks the agent behind the VM's vsock socket to drop the
        guest's caches and compact its memory, and waits 3 s for the freed memory to be
        reported, so more is left out (the guest reads its files from disk again afterwards).
load    loads DIR's snapshot into a kiln-vmm started with only --api-sock SOCK. --resume runs
        it at once; --vsock-uds gives its vsock a new host socket (so clones of one snapshot
        can run side by side); --track-dirty-pages allows diff snapshots of it later.
merge   folds diff memory files, oldest first, into the full memory file BASE_MEM, which is
        replaced atomically (unchanged on any error).

To run a command in a clone of a snapshot: kiln run --snapshot DIR -- CMD.

exit status: 0 on success, 2 for bad input (flags, missing files), 1 if the VMM or a file
operation failed (the VMM's message names the request).";

/// What `kiln snapshot` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// `create`.
    Create {
        /// `--api-sock`.
        api_sock: PathBuf,
        /// `--dir`.
        dir: PathBuf,
        /// `--diff`.
        diff: bool,
        /// `--resume`.
        resume: bool,
        /// `--reclaim`: the vsock socket of the guest's agent.
        reclaim: Option<PathBuf>,
    },
    /// `load`.
    Load {
        /// `--api-sock`.
        api_sock: PathBuf,
        /// `--dir`.
        dir: PathBuf,
        /// `--resume`.
        resume: bool,
        /// `--vsock-uds`.
        vsock_uds: Option<PathBuf>,
        /// `--track-dirty-pages`.
        track_dirty_pages: bool,
    },
    /// `merge`.
    Merge {
        /// The full memory file.
        base: PathBuf,
        /// The diff memory files, oldest first.
        diffs: Vec<PathBuf>,
    },
    /// `--help`.
    Help,
}

/// The options `create` and `load` take, before the checks that depend on which it is.
#[derive(Default)]
struct Opts {
    api_sock: Option<PathBuf>,
    dir: Option<PathBuf>,
    diff: bool,
    resume: bool,
    vsock_uds: Option<PathBuf>,
    track_dirty_pages: bool,
    reclaim: Option<PathBuf>,
}

/// Parses the words after `kiln snapshot`.
pub fn parse(args: &[String]) -> Result<SnapshotCommand, String> {
    let verb = match args.first().map(String::as_str) {
        None => return Err("no snapshot command given: create, load or merge".into()),
        Some("-h" | "--help" | "help") => return Ok(SnapshotCommand::Help),
        Some(v @ ("create" | "load" | "merge")) => v,
        Some(other) => {
            return Err(format!(
                "unknown snapshot command {other:?} (create, load or merge)"
            ));
        }
    };
    let mut words = Words::new(&args[1..]);
    if verb == "merge" {
        return merge(&mut words);
    }
    let mut o = Opts::default();
    while let Some(opt) = words.next_opt() {
        let name = opt.name;
        match (verb, name) {
            (_, "-h" | "--help") => return Ok(SnapshotCommand::Help),
            (_, "--api-sock") => o.api_sock = Some(words.value(&opt)?.into()),
            (_, "--dir") => o.dir = Some(words.value(&opt)?.into()),
            (_, "--resume") => o.resume = Words::flag(&opt)?,
            ("create", "--diff") => o.diff = Words::flag(&opt)?,
            ("create", "--reclaim") => o.reclaim = Some(words.value(&opt)?.into()),
            ("load", "--vsock-uds") => o.vsock_uds = Some(words.value(&opt)?.into()),
            ("load", "--track-dirty-pages") => o.track_dirty_pages = Words::flag(&opt)?,
            _ => return Err(format!("unknown option {name} for kiln snapshot {verb}")),
        }
    }
    if let Some(extra) = words.rest().first() {
        return Err(format!(
            "unexpected argument {extra:?} for kiln snapshot {verb}"
        ));
    }
    let needed = |v: Option<PathBuf>, flag: &str| {
        v.filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| format!("kiln snapshot {verb} needs {flag}"))
    };
    let api_sock = needed(o.api_sock, "--api-sock SOCK")?;
    let dir = needed(o.dir, "--dir DIR")?;
    Ok(if verb == "create" {
        SnapshotCommand::Create {
            api_sock,
            dir,
            diff: o.diff,
            resume: o.resume,
            reclaim: o.reclaim,
        }
    } else {
        SnapshotCommand::Load {
            api_sock,
            dir,
            resume: o.resume,
            vsock_uds: o.vsock_uds,
            track_dirty_pages: o.track_dirty_pages,
        }
    })
}

fn merge(words: &mut Words<'_>) -> Result<SnapshotCommand, String> {
    if let Some(opt) = words.next_opt() {
        return match opt.name {
            "-h" | "--help" => Ok(SnapshotCommand::Help),
            other => Err(format!("unknown option {other} for kiln snapshot merge")),
        };
    }
    let mut files = words.rest().into_iter().map(PathBuf::from);
    let base = files
        .next()
        .ok_or("kiln snapshot merge needs BASE_MEM and at least one DIFF_MEM")?;
    let diffs: Vec<PathBuf> = files.collect();
    if diffs.is_empty() {
        return Err("kiln snapshot merge needs at least one DIFF_MEM after BASE_MEM".into());
    }
    Ok(SnapshotCommand::Merge { base, diffs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(s: &[&str]) -> Result<SnapshotCommand, String> {
        parse(&s.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn every_flag() {
        assert_eq!(
            parse_words(&[
                "create",
                "--api-sock",
                "/s",
                "--dir=/d",
                "--diff",
                "--resume",
                "--reclaim",
                "/v.sock"
            ]),
            Ok(SnapshotCommand::Create {
                api_sock: "/s".into(),
                dir: "/d".into(),
                diff: true,
                resume: true,
                reclaim: Some("/v.sock".into())
            })
        );
        assert_eq!(
            parse_words(&[
                "load",
                "--dir",
                "d",
                "--api-sock",
                "s",
                "--resume",
                "--vsock-uds",
                "/v.sock",
                "--track-dirty-pages"
            ]),
            Ok(SnapshotCommand::Load {
                api_sock: "s".into(),
                dir: "d".into(),
                resume: true,
                vsock_uds: Some("/v.sock".into()),
                track_dirty_pages: true
            })
        );
        assert_eq!(
            parse_words(&["merge", "base", "d1", "d2"]),
            Ok(SnapshotCommand::Merge {
                base: "base".into(),
                diffs: vec!["d1".into(), "d2".into()]
            })
        );
        assert_eq!(
            parse_words(&["create", "--help"]),
            Ok(SnapshotCommand::Help)
        );
        assert_eq!(parse_words(&["--help"]), Ok(SnapshotCommand::Help));
    }

    #[test]
    fn bad_input_is_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "no snapshot command given: create, load or merge"),
            (
                &["take"],
                "unknown snapshot command \"take\" (create, load or merge)",
            ),
            (
                &["create", "--api-sock", "/s"],
                "kiln snapshot create needs --dir DIR",
            ),
            (
                &["load", "--dir", "/d"],
                "kiln snapshot load needs --api-sock SOCK",
            ),
            (
                &["create", "--api-sock", "/s", "--dir", ""],
                "kiln snapshot create needs --dir DIR",
            ),
            (&["create", "--dir"], "--dir needs a value"),
            (
                &[
                    "create",
                    "--api-sock",
                    "/s",
                    "--dir",
                    "/d",
                    "--vsock-uds",
                    "/v",
                ],
                "unknown option --vsock-uds for kiln snapshot create",
            ),
            (
                &["load", "--api-sock", "/s", "--dir", "/d", "--diff"],
                "unknown option --diff for kiln snapshot load",
            ),
            (
                &["load", "--api-sock", "/s", "--dir", "/d", "--bogus"],
                "unknown option --bogus for kiln snapshot load",
            ),
            (
                &["create", "--api-sock", "/s", "--dir", "/d", "--resume=yes"],
                "--resume takes no value",
            ),
            (
                &["create", "--api-sock", "/s", "--dir", "/d", "extra"],
                "unexpected argument \"extra\" for kiln snapshot create",
            ),
            (
                &["merge", "base"],
                "kiln snapshot merge needs at least one DIFF_MEM after BASE_MEM",
            ),
            (
                &["merge"],
                "kiln snapshot merge needs BASE_MEM and at least one DIFF_MEM",
            ),
            (
                &["merge", "--force", "a", "b"],
                "unknown option --force for kiln snapshot merge",
            ),
        ];
        for (words, message) in cases {
            assert_eq!(parse_words(words).unwrap_err(), *message, "{words:?}");
        }
    }
}
