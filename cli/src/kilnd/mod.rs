//! `kiln template ...`, `kiln sandbox ...` and `kiln run --template`: the CLI of kilnd, Kiln's
//! pool manager, through its client library (`kiln_pool::client`).

pub mod args;
mod progress;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kiln_pool::client::Kilnd;
use kiln_pool::template::spec::Spec;
use kiln_pool::types::{BuildEvent, CreateSandbox, ExecEvent, ExecRequest, PoolSettings};

use args::{SandboxCmd, TemplateCmd};

/// kiln's own failures.
const EXIT_KILN: i32 = 125;

/// kilnd's socket: `--kilnd`, else `$KILND_SOCKET`, else the default state folder's.
pub fn socket(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(p) = std::env::var_os("KILND_SOCKET").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    // SAFETY: geteuid has no preconditions.
    let dir = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/kiln")
    } else if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        PathBuf::from(x).join("kiln")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share/kiln")
    };
    dir.join("kilnd.sock")
}

/// The client kiln uses: `--kilnd PATH`; else `$KILND_URL` (kilnd's TCP listener) with the bearer
/// token in `$KILND_TOKEN`, as the Python SDK does; else [`socket`]'s.
pub fn client(flag: Option<PathBuf>) -> Result<Kilnd, String> {
    let url = std::env::var("KILND_URL").ok().filter(|v| !v.is_empty());
    match (flag, url) {
        (None, Some(url)) => {
            let token = std::env::var("KILND_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    format!("$KILND_URL is {url}: kilnd's TCP listener needs its bearer token in $KILND_TOKEN")
                })?;
            Kilnd::tcp(&url, token).map_err(|e| format!("$KILND_URL: {e}"))
        }
        (flag, _) => Ok(Kilnd::new(socket(flag))),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("kiln: {msg}");
    EXIT_KILN
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

/// `kiln template ...`.
pub fn template(words: &[String]) -> i32 {
    let (cmd, sock) = match args::parse_template(words) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let k = match client(sock) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let result = match cmd {
        TemplateCmd::Build { file, json } => {
            let spec = match Spec::load(&file) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let mut shown = progress::Progress::new(!json && std::io::stderr().is_terminal());
            match k.build(&spec, |ev| shown.event(ev)) {
                Ok(BuildEvent::Done { template, cached }) => {
                    shown.finish();
                    if json {
                        print_json(&serde_json::json!({"template": template, "cached": cached}));
                    } else {
                        println!(
                            "template {} {} ({})",
                            template.name,
                            template.id,
                            if cached { "already built" } else { "built" }
                        );
                    }
                    return 0;
                }
                Ok(BuildEvent::Failed { message }) => {
                    shown.finish();
                    return fail(format!("building template {}: {message}", spec.name));
                }
                Ok(_) => Err("the build ended without a result".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        TemplateCmd::List { json } => k
            .templates()
            .map(|list| {
                if json {
                    print_json(&list);
                } else {
                    println!(
                        "{:<20} {:<17} {:>5} {:>7} {:>6} {:>5}",
                        "NAME", "ID", "VCPUS", "MEM_MIB", "READY", "MIN"
                    );
                    for t in list {
                        println!(
                            "{:<20} {:<17} {:>5} {:>7} {:>6} {:>5}",
                            t.name, t.id, t.vcpus, t.mem_mib, t.ready, t.min_ready
                        );
                    }
                }
            })
            .map_err(|e| e.to_string()),
        TemplateCmd::Remove(name) => k.remove_template(&name).map_err(|e| e.to_string()),
        TemplateCmd::Pool {
            name,
            min_ready,
            max_sandboxes,
        } => k
            .set_pool(
                &name,
                &PoolSettings {
                    min_ready,
                    max_sandboxes,
                },
            )
            .map(|t| {
                println!(
                    "template {}: {} warm sandboxes wanted, {} ready",
                    t.name, t.min_ready, t.ready
                )
            })
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// Runs `req` in sandbox `id`, streaming its output; returns the exit status to exit with.
fn exec_streaming(k: &Kilnd, id: &str, req: &ExecRequest, json: bool) -> i32 {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let last = k.exec(id, req, |ev| match ev {
        ExecEvent::Stdout { data_b64 } => {
            let b = B64.decode(data_b64).unwrap_or_default();
            if json {
                out.extend_from_slice(&b);
            } else {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&b);
                let _ = o.flush();
            }
        }
        ExecEvent::Stderr { data_b64 } => {
            let b = B64.decode(data_b64).unwrap_or_default();
            if json {
                err.extend_from_slice(&b);
            } else {
                let _ = std::io::stderr().write_all(&b);
            }
        }
        _ => {}
    });
    let (code, exit_code, signal, timed_out, error) = match last {
        Ok(ExecEvent::Exit {
            exit_code: Some(c), ..
        }) => (c, Some(c), None, false, None),
        Ok(ExecEvent::Exit {
            signal: Some(s), ..
        }) => (128 + s, None, Some(s), false, None),
        Ok(ExecEvent::Exit {
            timed_out: true, ..
        }) => (124, None, None, true, None),
        Ok(ExecEvent::Error {
            message,
            could_not_start,
        }) => (
            if could_not_start { 127 } else { EXIT_KILN },
            None,
            None,
            false,
            Some(message),
        ),
        Ok(other) => (
            EXIT_KILN,
            None,
            None,
            false,
            Some(format!("unexpected {other:?}")),
        ),
        Err(e) => (EXIT_KILN, None, None, false, Some(e.to_string())),
    };
    if json {
        print_json(&serde_json::json!({
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
            "exit_code": exit_code, "signal": signal, "timed_out": timed_out, "error": error,
        }));
    } else if let Some(e) = error {
        eprintln!("kiln: {e}");
    } else if timed_out {
        eprintln!("kiln: the command timed out and was killed");
    }
    code
}

fn exec_request(argv: Vec<String>, opts: &args::ExecOpts) -> Result<ExecRequest, String> {
    let stdin_b64 = if opts.stdin {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading stdin: {e}"))?;
        Some(B64.encode(buf))
    } else {
        None
    };
    Ok(ExecRequest {
        argv,
        env: opts.env.iter().cloned().collect(),
        cwd: opts.cwd.clone(),
        user: opts.user.clone(),
        timeout_ms: opts.timeout_s.map(|s| s * 1000),
        stdin_b64,
    })
}

/// `kiln sandbox ...`.
pub fn sandbox(words: &[String]) -> i32 {
    let (cmd, sock) = match args::parse_sandbox(words) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let k = match client(sock) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let result: Result<(), String> = match cmd {
        SandboxCmd::Create {
            template,
            timeout_s,
            env,
            meta,
            network,
            json,
        } => k
            .create(&CreateSandbox {
                template,
                timeout_s,
                env: env.into_iter().collect(),
                metadata: meta.into_iter().collect(),
                network,
            })
            .map(|s| {
                say_published(&s);
                if json {
                    print_json(&s)
                } else {
                    println!("{}", s.id)
                }
            })
            .map_err(|e| e.to_string()),
        SandboxCmd::List { json } => k
            .sandboxes()
            .map(|list| {
                if json {
                    print_json(&list);
                } else {
                    println!(
                        "{:<21} {:<16} {:<8} {:>6} {:>12}",
                        "ID", "TEMPLATE", "STATE", "EXECS", "EXPIRES_IN_S"
                    );
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    for s in list {
                        println!(
                            "{:<21} {:<16} {:<8} {:>6} {:>12}",
                            s.id,
                            s.template,
                            s.state.as_str(),
                            s.exec_count,
                            s.expires_at.saturating_sub(now)
                        );
                    }
                }
            })
            .map_err(|e| e.to_string()),
        SandboxCmd::Exec { id, opts, argv } => {
            return match exec_request(argv, &opts) {
                Ok(req) => exec_streaming(&k, &id, &req, false),
                Err(e) => fail(e),
            };
        }
        SandboxCmd::Copy { src, dst } => copy(&k, &src, &dst),
        SandboxCmd::Fork { id, count, json } => k
            .fork(&id, count)
            .map(|forks| {
                if json {
                    print_json(&forks);
                } else {
                    for f in forks {
                        println!("{}", f.id);
                    }
                }
            })
            .map_err(|e| e.to_string()),
        SandboxCmd::Snapshot { id, name, json } => k
            .snapshot(&id, name.as_deref())
            .map(|t| match json {
                true => print_json(&t),
                false => println!("{}", t.name),
            })
            .map_err(|e| e.to_string()),
        SandboxCmd::Life { verb, id } => match verb.as_str() {
            "pause" => k.pause(&id).map(drop),
            "resume" => k.resume(&id).map(drop),
            _ => k.kill(&id),
        }
        .map_err(|e| e.to_string()),
        SandboxCmd::Timeout { id, secs } => k
            .set_timeout(&id, secs)
            .map(drop)
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// `ID:/path` split, or `None` for a local path.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

fn copy(k: &Kilnd, src: &str, dst: &str) -> Result<(), String> {
    match (remote(src), remote(dst)) {
        (Some((id, path)), None) => {
            let data = k.read_file(id, path).map_err(|e| e.to_string())?;
            if dst == "-" {
                std::io::stdout().write_all(&data).map_err(|e| e.to_string())
            } else {
                std::fs::write(dst, data).map_err(|e| format!("{dst}: {e}"))
            }
        }
        (None, Some((id, path))) => {
            let data = if src == "-" {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b).map_err(|e| e.to_string())?;
                b
            } else {
                std::fs::read(src).map_err(|e| format!("{src}: {e}"))?
            };
            k.write_file(id, path, &data).map_err(|e| e.to_string())
        }
        _ => Err("give exactly one side as ID:/path in the sandbox (the other local, or - for stdin/stdout)".into()),
    }
}

/// What `kiln run --template` runs: `-c CODE` in `lang`, a local script copied in, or a command.
pub enum RunWhat {
    /// `-c CODE`.
    Code(String),
    /// A command (a local script file as its only word is copied in and run).
    Command(Vec<String>),
}

fn interpreter(lang: &str, file: bool) -> Result<Vec<String>, String> {
    let v: &[&str] = match (lang, file) {
        ("python", false) => &["python3", "-c"],
        ("python", true) => &["python3"],
        ("sh", false) => &["sh", "-c"],
        ("sh", true) => &["sh"],
        ("node", false) => &["node", "-e"],
        ("node", true) => &["node"],
        (other, _) => return Err(format!("--lang {other:?}: use python, sh or node")),
    };
    Ok(v.iter().map(|s| s.to_string()).collect())
}

/// Prints on stderr where a new sandbox's published ports are, as `kiln run --publish` does.
fn say_published(s: &kiln_pool::types::SandboxInfo) {
    for p in &s.network.published {
        eprintln!(
            "kiln: published 127.0.0.1:{} -> guest port {}",
            p.host_port, p.guest_port
        );
    }
}

/// `kiln run --template NAME ...`: a sandbox for one command (on the network `network` asks
/// for, the template's default policy without), removed afterwards.
pub fn run_template(
    sock: Option<PathBuf>,
    template: &str,
    lang: Option<&str>,
    what: RunWhat,
    opts: &args::ExecOpts,
    network: Option<kiln_pool::types::NetworkRequest>,
    json: bool,
) -> i32 {
    let k = match client(sock) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let (argv, upload) = match what {
        RunWhat::Code(code) => match interpreter(lang.unwrap_or("python"), false) {
            Ok(mut v) => {
                v.push(code);
                (v, None)
            }
            Err(e) => return fail(e),
        },
        RunWhat::Command(words) => {
            let script = (words.len() == 1)
                .then(|| PathBuf::from(&words[0]))
                .filter(|p| p.is_file());
            let by_ext =
                script
                    .as_ref()
                    .and_then(|p| match p.extension().and_then(|e| e.to_str()) {
                        Some("py") => Some("python"),
                        Some("sh") => Some("sh"),
                        Some("js") => Some("node"),
                        _ => None,
                    });
            match (script, lang.or(by_ext)) {
                (Some(p), Some(l)) => {
                    let data = match std::fs::read(&p) {
                        Ok(d) => d,
                        Err(e) => return fail(format!("{}: {e}", p.display())),
                    };
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let inside = format!("/tmp/{name}");
                    let mut v = match interpreter(l, true) {
                        Ok(v) => v,
                        Err(e) => return fail(e),
                    };
                    v.push(inside.clone());
                    (v, Some((inside, data)))
                }
                _ => (words, None),
            }
        }
    };
    // The sandbox lives as long as the command may, and a minute more.
    let life = opts.timeout_s.map_or(600, |t| t + 60);
    let sb = match k.create(&CreateSandbox {
        template: template.into(),
        timeout_s: Some(life),
        env: opts.env.iter().cloned().collect(),
        metadata: [("created_by".to_string(), "kiln run".to_string())].into(),
        network,
    }) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    say_published(&sb);
    let code = match upload
        .map(|(path, data)| k.write_file(&sb.id, &path, &data))
        .transpose()
    {
        Err(e) => fail(e),
        Ok(_) => match exec_request(argv, opts) {
            Ok(req) => exec_streaming(&k, &sb.id, &req, json),
            Err(e) => fail(e),
        },
    };
    if let Err(e) = k.kill(&sb.id) {
        eprintln!("kiln: warning: removing sandbox {}: {e}", sb.id);
    }
    code
}
