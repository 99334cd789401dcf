//! The command lines of `kiln template ...` and `kiln sandbox ...`, each mistake one line naming
//! the flag or value.

use std::path::PathBuf;

use kiln_net::{DomainPattern, PublishSpec};
use kiln_pool::types::{NetworkRequest, PortRequest};

/// The network a create asks for: `None` when it names no policy and no port (the template's
/// default policy); with `policy` (an explicit one) the domains and `allow_net` given.
pub fn network_request(
    policy: bool,
    domains: &[DomainPattern],
    allow_net: bool,
    publish: &[PublishSpec],
) -> Option<NetworkRequest> {
    if !policy && publish.is_empty() {
        return None;
    }
    Some(NetworkRequest {
        allow_domains: policy.then(|| domains.iter().map(ToString::to_string).collect()),
        allow_net: policy.then_some(allow_net),
        publish: publish
            .iter()
            .map(|p| PortRequest {
                guest_port: p.guest_port,
                host_port: p.host_port,
            })
            .collect(),
    })
}

/// The usage text.
pub const USAGE: &str = "usage: kiln template build FILE [--json]
       kiln template ls [--json]
       kiln template rm NAME
       kiln template pool NAME --min-ready N [--max-sandboxes N]
       kiln sandbox create TEMPLATE [--timeout SECS] [--env K=V]... [--meta K=V]... [--json]
                           [--allow-domain D]... [--allow-net | --no-egress]
                           [--publish [HOST:]GUEST]...
       kiln sandbox ls [--json]
       kiln sandbox exec ID [--env K=V]... [--cwd DIR] [--user U] [--timeout SECS] [--stdin] -- CMD...
       kiln sandbox cp SRC DST        (one of them ID:/path in the sandbox)
       kiln sandbox fork ID [--count N] [--json]
       kiln sandbox snapshot ID [--name NAME] [--json]
       kiln sandbox pause|resume|kill ID
       kiln sandbox timeout ID SECS
       kiln run --template NAME [--env K=V]... [--timeout SECS] [--json] [--lang python|sh|node]
                [--net | --allow-domain D... | --allow-net] [--publish [HOST:]GUEST]...
                [-c CODE | FILE.py | -- CMD...]

Talks to kilnd, Kiln's pool manager, on its socket: --kilnd PATH, else $KILND_URL (kilnd --listen's
http://HOST:PORT, with its bearer token in $KILND_TOKEN), else $KILND_SOCKET, else
/var/lib/kiln/kilnd.sock (root) or ~/.local/share/kiln/kilnd.sock. Start it with `kilnd`.

template build  builds a template from a spec file (TOML; see the README) and shows its progress;
                an unchanged spec is found in the store at once.
sandbox create  prints the new sandbox's id (the JSON with --json, with its network: policy,
                published ports, refusals). Its network is its template's default policy
                ([network] in the spec; no egress unless it says) unless --allow-domain D
                (repeatable; *.D for the names under D), --allow-net or --no-egress says
                otherwise; --publish listens on 127.0.0.1:HOST (a free port if omitted) and
                carries connections to GUEST in the sandbox (printed on stderr).
sandbox exec    streams the command's output and exits with its status.
sandbox snapshot  pauses the sandbox a moment and keeps its memory and disk as a template (kind
                snapshot; NAME, or a made-up name, printed) that `sandbox create` starts copies
                of; the sandbox runs on, and the snapshot outlives it. `template rm` removes it.
kiln run --template  creates a sandbox (from the template's warm pool when one is ready), runs
                the command, prints its output and removes the sandbox. -c CODE runs code in
                --lang (python by default); a FILE.py/.sh/.js is copied in and run.";

/// A `K=V` value.
pub fn pair(flag: &str, v: &str) -> Result<(String, String), String> {
    match v.split_once('=') {
        Some((k, val)) if !k.is_empty() => Ok((k.to_string(), val.to_string())),
        _ => Err(format!("{flag} {v:?} is not NAME=VALUE")),
    }
}

/// Seconds as a whole number.
pub fn secs(flag: &str, v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{flag} {v:?} is not a positive whole number of seconds"))
}

/// `kiln template ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateCmd {
    /// `build FILE`.
    Build {
        /// The spec file.
        file: PathBuf,
        /// `--json`: print the result as JSON.
        json: bool,
    },
    /// `ls`.
    List {
        /// `--json`.
        json: bool,
    },
    /// `rm NAME`.
    Remove(String),
    /// `pool NAME`.
    Pool {
        /// The template.
        name: String,
        /// `--min-ready`.
        min_ready: u32,
        /// `--max-sandboxes`.
        max_sandboxes: u32,
    },
}

/// `kiln sandbox exec` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOpts {
    /// `--env`.
    pub env: Vec<(String, String)>,
    /// `--cwd`.
    pub cwd: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--timeout`.
    pub timeout_s: Option<u64>,
    /// `--stdin`: send our stdin to the command.
    pub stdin: bool,
}

/// `kiln sandbox ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxCmd {
    /// `create TEMPLATE`.
    Create {
        /// The template.
        template: String,
        /// `--timeout`.
        timeout_s: Option<u64>,
        /// `--env`.
        env: Vec<(String, String)>,
        /// `--meta`.
        meta: Vec<(String, String)>,
        /// `--allow-domain`, `--allow-net`, `--no-egress`, `--publish`.
        network: Option<NetworkRequest>,
        /// `--json`.
        json: bool,
    },
    /// `ls`.
    List {
        /// `--json`.
        json: bool,
    },
    /// `exec ID -- CMD`.
    Exec {
        /// The sandbox.
        id: String,
        /// Its options.
        opts: ExecOpts,
        /// The command.
        argv: Vec<String>,
    },
    /// `cp SRC DST`.
    Copy {
        /// Source (`ID:/path` or a local path).
        src: String,
        /// Destination.
        dst: String,
    },
    /// `fork ID`.
    Fork {
        /// The sandbox.
        id: String,
        /// `--count`.
        count: u32,
        /// `--json`.
        json: bool,
    },
    /// `snapshot ID`.
    Snapshot {
        /// The sandbox.
        id: String,
        /// `--name`.
        name: Option<String>,
        /// `--json`.
        json: bool,
    },
    /// `pause`, `resume`, `kill` (the verb) of ID.
    Life {
        /// `pause`, `resume` or `kill`.
        verb: String,
        /// The sandbox.
        id: String,
    },
    /// `timeout ID SECS`.
    Timeout {
        /// The sandbox.
        id: String,
        /// Seconds from now.
        secs: u64,
    },
}

/// A command line split into options (with their values), positional words and, after `--`, a
/// command.
#[derive(Default)]
struct Split {
    opts: Vec<(String, Option<String>)>,
    words: Vec<String>,
    argv: Vec<String>,
}

/// Options that take a value.
const VALUED: &[&str] = &[
    "--kilnd",
    "--min-ready",
    "--max-sandboxes",
    "--timeout",
    "--env",
    "-e",
    "--meta",
    "--count",
    "--name",
    "-n",
    "--cwd",
    "--user",
    "--allow-domain",
    "--publish",
    "-p",
];

fn split(args: &[String]) -> Result<Split, String> {
    let mut s = Split::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            s.argv = it.cloned().collect();
            break;
        }
        if a.starts_with('-') && a.len() > 1 {
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (a.clone(), None),
            };
            let value = if VALUED.contains(&name.as_str()) {
                Some(match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("{name} needs a value"))?,
                })
            } else if inline.is_some() {
                return Err(format!("{name} takes no value"));
            } else {
                None
            };
            s.opts.push((name, value));
        } else {
            s.words.push(a.clone());
        }
    }
    Ok(s)
}

fn positional(rest: &mut Vec<String>, what: &str) -> Result<String, String> {
    if rest.is_empty() {
        return Err(format!("give the {what}"));
    }
    Ok(rest.remove(0))
}

fn num(flag: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?} is not a whole number"))
}

fn no_more(rest: &[String], argv: &[String]) -> Result<(), String> {
    match rest.first().or(argv.first()) {
        Some(w) => Err(format!("unexpected {w:?}")),
        None => Ok(()),
    }
}

/// Parses the words after `kiln template`: the command and `--kilnd`, if given.
pub fn parse_template(args: &[String]) -> Result<(TemplateCmd, Option<PathBuf>), String> {
    let verb = args.first().map(String::as_str).unwrap_or("");
    let Split {
        opts,
        mut words,
        argv,
    } = split(args.get(1..).unwrap_or_default())?;
    let (mut json, mut socket, mut min_ready, mut max_sandboxes) = (false, None, None, 0);
    for (name, value) in opts {
        let v = value.unwrap_or_default();
        match name.as_str() {
            "--json" => json = true,
            "--kilnd" => socket = Some(PathBuf::from(v)),
            "--min-ready" => min_ready = Some(num(&name, &v)?),
            "--max-sandboxes" => max_sandboxes = num(&name, &v)?,
            other => return Err(format!("unknown option {other} for `kiln template {verb}`")),
        }
    }
    let cmd = match verb {
        "build" => TemplateCmd::Build {
            file: PathBuf::from(positional(&mut words, "spec file")?),
            json,
        },
        "ls" | "list" => TemplateCmd::List { json },
        "rm" | "remove" => TemplateCmd::Remove(positional(&mut words, "template's name")?),
        "pool" => TemplateCmd::Pool {
            name: positional(&mut words, "template's name")?,
            min_ready: min_ready.ok_or("give --min-ready N")?,
            max_sandboxes,
        },
        "" => return Err(format!("give a template command\n{USAGE}")),
        other => {
            return Err(format!(
                "unknown template command {other:?} (build, ls, rm, pool)"
            ));
        }
    };
    no_more(&words, &argv)?;
    Ok((cmd, socket))
}

/// Parses the words after `kiln sandbox`: the command and `--kilnd`, if given.
pub fn parse_sandbox(args: &[String]) -> Result<(SandboxCmd, Option<PathBuf>), String> {
    let verb = args.first().map(String::as_str).unwrap_or("");
    let Split {
        opts: given,
        mut words,
        mut argv,
    } = split(args.get(1..).unwrap_or_default())?;
    let mut socket = None;
    let (mut json, mut timeout_s, mut count, mut snap_name) = (false, None, 1, None);
    let (mut env, mut meta) = (Vec::new(), Vec::new());
    let mut opts = ExecOpts::default();
    let (mut domains, mut publish, mut allow_net, mut no_egress) =
        (Vec::new(), Vec::new(), false, false);
    for (name, value) in given {
        let v = value.unwrap_or_default();
        match name.as_str() {
            "--json" => json = true,
            "--kilnd" => socket = Some(PathBuf::from(v)),
            "--timeout" => timeout_s = Some(secs(&name, &v)?),
            "--env" | "-e" => env.push(pair(&name, &v)?),
            "--meta" => meta.push(pair(&name, &v)?),
            "--count" | "-n" => count = num(&name, &v)?,
            "--name" => snap_name = Some(v),
            "--cwd" => opts.cwd = Some(v),
            "--user" => opts.user = Some(v),
            "--stdin" => opts.stdin = true,
            "--allow-domain" => {
                domains.push(v.parse::<DomainPattern>().map_err(|e| e.to_string())?)
            }
            "--allow-net" => allow_net = true,
            "--no-egress" => no_egress = true,
            "--publish" | "-p" => {
                publish.push(v.parse::<PublishSpec>().map_err(|e| e.to_string())?)
            }
            other => return Err(format!("unknown option {other} for `kiln sandbox {verb}`")),
        }
    }
    let given = [
        ("--allow-domain", !domains.is_empty()),
        ("--allow-net", allow_net),
        ("--no-egress", no_egress),
    ];
    let policies: Vec<&str> = given.iter().filter(|g| g.1).map(|g| g.0).collect();
    if policies.len() > 1 {
        return Err(format!(
            "{} cannot be given together: each is a whole policy",
            policies.join(" and ")
        ));
    }
    if verb != "create"
        && let Some(flag) = policies
            .first()
            .copied()
            .or((!publish.is_empty()).then_some("--publish"))
    {
        return Err(format!("{flag} only works with `kiln sandbox create`"));
    }
    let cmd = match verb {
        "create" => SandboxCmd::Create {
            template: positional(&mut words, "template's name")?,
            timeout_s,
            env,
            meta,
            network: network_request(!policies.is_empty(), &domains, allow_net, &publish),
            json,
        },
        "ls" | "list" => SandboxCmd::List { json },
        "exec" => {
            let id = positional(&mut words, "sandbox's id")?;
            if argv.is_empty() {
                argv = std::mem::take(&mut words);
            }
            if argv.is_empty() {
                return Err("give the command to run after --".into());
            }
            opts.env = env;
            opts.timeout_s = timeout_s;
            SandboxCmd::Exec {
                id,
                opts,
                argv: std::mem::take(&mut argv),
            }
        }
        "cp" => SandboxCmd::Copy {
            src: positional(&mut words, "source")?,
            dst: positional(&mut words, "destination")?,
        },
        "fork" => SandboxCmd::Fork {
            id: positional(&mut words, "sandbox's id")?,
            count,
            json,
        },
        "snapshot" => SandboxCmd::Snapshot {
            id: positional(&mut words, "sandbox's id")?,
            name: snap_name,
            json,
        },
        "pause" | "resume" | "kill" => SandboxCmd::Life {
            verb: verb.into(),
            id: positional(&mut words, "sandbox's id")?,
        },
        "timeout" => SandboxCmd::Timeout {
            id: positional(&mut words, "sandbox's id")?,
            secs: secs("timeout", &positional(&mut words, "seconds")?)?,
        },
        "" => return Err(format!("give a sandbox command\n{USAGE}")),
        other => {
            return Err(format!(
                "unknown sandbox command {other:?} (create, ls, exec, cp, fork, snapshot, pause, resume, kill, timeout)"
            ));
        }
    };
    no_more(&words, &argv)?;
    Ok((cmd, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn template_commands() {
        assert_eq!(
            parse_template(&s(&["build", "py.toml", "--json"])).unwrap(),
            (
                TemplateCmd::Build {
                    file: "py.toml".into(),
                    json: true
                },
                None
            )
        );
        assert_eq!(
            parse_template(&s(&["pool", "py", "--min-ready=3", "--kilnd", "/k.sock"])).unwrap(),
            (
                TemplateCmd::Pool {
                    name: "py".into(),
                    min_ready: 3,
                    max_sandboxes: 0
                },
                Some(PathBuf::from("/k.sock"))
            )
        );
        for (bad, named) in [
            (&["pool", "py"][..], "--min-ready"),
            (&["build"][..], "spec file"),
            (&["ls", "extra"][..], "extra"),
            (&["nuke"][..], "nuke"),
            (&["ls", "--jsn"][..], "--jsn"),
        ] {
            let e = parse_template(&s(bad)).unwrap_err();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sandbox_commands() {
        let (c, _) = parse_sandbox(&s(&[
            "exec", "abc", "--env", "A=1", "--", "sh", "-c", "echo $A",
        ]))
        .unwrap();
        assert_eq!(
            c,
            SandboxCmd::Exec {
                id: "abc".into(),
                opts: ExecOpts {
                    env: vec![("A".into(), "1".into())],
                    ..Default::default()
                },
                argv: s(&["sh", "-c", "echo $A"]),
            }
        );
        let (c, _) =
            parse_sandbox(&s(&["create", "py", "--timeout", "60", "--meta", "k=v"])).unwrap();
        assert!(matches!(
            c,
            SandboxCmd::Create {
                timeout_s: Some(60),
                ..
            }
        ));
        let (c, _) = parse_sandbox(&s(&[
            "create",
            "py",
            "--allow-domain",
            "pypi.org",
            "-p",
            "18080:8080",
        ]))
        .unwrap();
        let SandboxCmd::Create {
            network: Some(n), ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(
            (n.allow_domains, n.allow_net),
            (Some(vec!["pypi.org".to_string()]), Some(false))
        );
        assert_eq!(
            n.publish,
            [PortRequest {
                guest_port: 8080,
                host_port: Some(18080)
            }]
        );
        // Ports alone keep the template's policy; no flag at all asks for nothing.
        let (c, _) = parse_sandbox(&s(&["create", "py", "--publish", "8080"])).unwrap();
        assert!(matches!(
            c,
            SandboxCmd::Create {
                network: Some(NetworkRequest {
                    allow_domains: None,
                    allow_net: None,
                    ..
                }),
                ..
            }
        ));
        let (c, _) = parse_sandbox(&s(&["create", "py", "--no-egress"])).unwrap();
        assert!(matches!(
            c,
            SandboxCmd::Create {
                network: Some(NetworkRequest {
                    allow_net: Some(false),
                    ..
                }),
                ..
            }
        ));
        let (c, _) = parse_sandbox(&s(&["create", "py"])).unwrap();
        assert!(matches!(c, SandboxCmd::Create { network: None, .. }));
        let (c, _) = parse_sandbox(&s(&["fork", "abc", "-n", "4"])).unwrap();
        assert!(matches!(c, SandboxCmd::Fork { count: 4, .. }));
        let (c, _) = parse_sandbox(&s(&["snapshot", "abc", "--name", "s1"])).unwrap();
        assert_eq!(
            c,
            SandboxCmd::Snapshot {
                id: "abc".into(),
                name: Some("s1".into()),
                json: false
            }
        );
        for (bad, named) in [
            (&["exec", "abc"][..], "command"),
            (&["create"][..], "template"),
            (&["timeout", "abc", "x"][..], "\"x\""),
            (&["create", "py", "--env", "noequals"][..], "noequals"),
            (&["kill"][..], "id"),
            (
                &["create", "py", "--allow-domain", "a b"][..],
                "--allow-domain \"a b\"",
            ),
            (&["create", "py", "--publish", "0"][..], "--publish \"0\""),
            (
                &["create", "py", "--allow-net", "--allow-domain", "x.io"][..],
                "--allow-domain and --allow-net cannot be given together",
            ),
            (&["ls", "--publish", "80"][..], "--publish only works with"),
        ] {
            let e = parse_sandbox(&s(bad)).unwrap_err();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
    }
}
