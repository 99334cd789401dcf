//! `kilnd`: parse the command line, open the state folder, recover what a previous run left,
//! start the pool filler and the expiry sweeper, and serve the API until SIGTERM or SIGINT, which
//! end every VM kilnd holds (warm ones and sandboxes) with their networks and jails. Only a kilnd
//! that dies without stopping (SIGKILL, a crash) leaves sandboxes running, for the next start to
//! adopt.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use axum::serve::ListenerExt;
use clap::Parser;
use kiln_pool::daemon::{Config, Daemon};
use kiln_pool::jail::{JailConfig, Launcher};
use kiln_pool::template::Inputs;

/// Kiln's pool manager: templates, warm pools and sandboxes over an HTTP API.
#[derive(Debug, Parser)]
#[command(name = "kilnd", version)]
struct Args {
    /// Where kilnd keeps its database, templates and sandboxes [default: /var/lib/kiln as root,
    /// else $XDG_DATA_HOME/kiln or ~/.local/share/kiln].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API's Unix socket [default: STATE_DIR/kilnd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve the API on this local TCP address (e.g. 127.0.0.1:7777), behind a bearer
    /// token (--token-file or $KILND_TOKEN; there is no default token).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A file holding the bearer token for --listen.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Also serve E2B's REST API and envd (the in-sandbox API, on the host) on this local TCP
    /// address (e.g. 127.0.0.1:3000), for E2B's SDKs: set E2B_API_URL and E2B_SANDBOX_URL to
    /// http://ADDR. Needs an API key (--e2b-api-key-file or $KILND_E2B_API_KEY; no default).
    #[arg(long)]
    e2b_listen: Option<std::net::SocketAddr>,
    /// A file holding the API key E2B clients send (their E2B_API_KEY), for --e2b-listen.
    #[arg(long)]
    e2b_api_key_file: Option<PathBuf>,
    /// What an E2B create that says nothing of the network (no allow_internet_access, no
    /// network) gets: `deny`, its template's default policy (no egress unless the template
    /// allows some: Kiln's promise), or `allow`, the internet as on E2B.
    #[arg(long, value_enum, default_value_t = InternetDefault::Deny)]
    e2b_internet_default: InternetDefault,
    /// Give template VMs and sandboxes no network interface at all (no namespace, TAP, rules or
    /// resolver): for a kilnd without root (networks need CAP_NET_ADMIN and CAP_SYS_ADMIN) or
    /// without nftables. Sandboxes can then have no egress; published ports still work.
    #[arg(long)]
    no_net: bool,
    /// kiln-vmm [default: next to kilnd, else on PATH].
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// kiln-jailer, which every VMM runs under [default: next to kilnd, else on PATH].
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// Run VMMs as kilnd's own user, without kiln-jailer (no chroot, uid or cgroup per VM):
    /// for development and unprivileged runs only.
    #[arg(long)]
    no_jail: bool,
    /// The guest kernel [default: $KILN_KERNEL, else /kiln/vmlinux].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The static guest agent written into templates [default: $KILN_AGENT, else
    /// /kiln/kiln-agent.static].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// A folder of Debian images made ahead (debian-<key>.ext4); repeatable [always searched:
    /// STATE_DIR/images and /kiln/images].
    #[arg(long)]
    image_dir: Vec<PathBuf>,
    /// A sandbox's lifetime when its create request names none, seconds.
    #[arg(long, default_value_t = 300)]
    default_timeout: u64,
    /// Most VMs at once, sandboxes and warm ones (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_vms: u32,
    /// Most guest memory at once, MiB (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_memory_mib: u64,
    /// Warm VMs restored at once.
    #[arg(long, default_value_t = 2)]
    refill_concurrency: usize,
}

/// `--e2b-internet-default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InternetDefault {
    /// The template's default policy.
    Deny,
    /// The internet.
    Allow,
}

/// Whether this host can make sandbox networks: a network namespace (root or CAP_SYS_ADMIN and
/// CAP_NET_ADMIN) and `nft`. Checked at start, so a kilnd that could not network its VMs says so
/// at once, not at its first build.
fn check_net() -> Result<(), String> {
    let hint = "; or give --no-net for VMs without a network";
    kiln_net::netns::NetNs::new().map_err(|e| format!("sandbox networks: {e}{hint}"))?;
    match std::process::Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "sandbox networks: nft --version failed ({}){hint}",
            o.status
        )),
        Err(_) => Err(format!(
            "sandbox networks need nft (apt-get install nftables){hint}"
        )),
    }
}

fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/share/kiln")
}

/// The first of `candidates` that is a file, or an error naming them and the flag.
fn pick(what: &str, flag: &str, candidates: Vec<PathBuf>) -> Result<PathBuf, String> {
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!("no {what} found (tried {}); give {flag}", tried.join(", "))
        })
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn config(args: &Args) -> Result<Config, String> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let on_path = |name: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(name))
            .collect::<Vec<_>>()
    };
    let vmm = match &args.vmm {
        Some(p) => pick("kiln-vmm", "--vmm", vec![p.clone()])?,
        None => {
            let mut c: Vec<PathBuf> = beside.iter().map(|d| d.join("kiln-vmm")).collect();
            c.extend(on_path("kiln-vmm"));
            pick("kiln-vmm", "--vmm", c)?
        }
    };
    let jail = if args.no_jail {
        None
    } else {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "kilnd runs every VM under kiln-jailer, which needs root; run it as root, \
                        or give --no-jail to run VMs unjailed as this user"
                    .into(),
            );
        }
        let jailer = match &args.jailer {
            Some(p) => pick("kiln-jailer", "--jailer", vec![p.clone()])?,
            None => {
                let mut c: Vec<PathBuf> = beside.iter().map(|d| d.join("kiln-jailer")).collect();
                c.extend(on_path("kiln-jailer"));
                pick("kiln-jailer", "--jailer", c)?
            }
        };
        Some(JailConfig {
            jailer,
            base: state_dir.join("jail"),
        })
    };
    let kernel = match &args.kernel {
        Some(p) => pick("guest kernel", "--kernel", vec![p.clone()])?,
        None => pick(
            "guest kernel",
            "--kernel",
            env_path("KILN_KERNEL")
                .into_iter()
                .chain([PathBuf::from("/kiln/vmlinux")])
                .collect(),
        )?,
    };
    let agent = match &args.agent {
        Some(p) => pick("static guest agent", "--agent", vec![p.clone()])?,
        None => pick(
            "static guest agent",
            "--agent",
            env_path("KILN_AGENT")
                .into_iter()
                .chain([PathBuf::from("/kiln/kiln-agent.static")])
                .collect(),
        )?,
    };
    let mut image_dirs = args.image_dir.clone();
    image_dirs.push(state_dir.join("images"));
    image_dirs.push(PathBuf::from("/kiln/images"));
    if args.refill_concurrency == 0 || args.refill_concurrency > 16 {
        return Err(format!(
            "--refill-concurrency {} is outside 1..=16",
            args.refill_concurrency
        ));
    }
    Ok(Config {
        state_dir,
        inputs: Inputs {
            vmm: Launcher { vmm, jail },
            kernel,
            agent,
            image_dirs,
            net: !args.no_net,
        },
        default_timeout_s: args.default_timeout,
        max_vms: args.max_vms,
        max_memory_mib: args.max_memory_mib,
        refill_concurrency: args.refill_concurrency,
    })
}

/// Sets TCP_NODELAY on an accepted connection: streamed answers (exec output, envd's Connect
/// streams over HTTP/2) are many small writes, which Nagle's algorithm would hold back until the
/// peer's delayed ACK (~40 ms each on Linux).
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
    }
}

/// The token for --listen: from --token-file, else $KILND_TOKEN; never a default.
fn token(args: &Args) -> Result<String, String> {
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("--token-file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => std::env::var("KILND_TOKEN").unwrap_or_default(),
    };
    if token.len() < 16 {
        return Err(
            "--listen needs a bearer token of at least 16 characters in --token-file or $KILND_TOKEN"
                .into(),
        );
    }
    Ok(token)
}

/// The API key for --e2b-listen: from --e2b-api-key-file, else $KILND_E2B_API_KEY; never a
/// default.
fn e2b_key(args: &Args) -> Result<String, String> {
    let key = match &args.e2b_api_key_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("--e2b-api-key-file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => std::env::var("KILND_E2B_API_KEY").unwrap_or_default(),
    };
    if key.len() < 16 {
        return Err(
            "--e2b-listen needs an API key of at least 16 characters in --e2b-api-key-file or \
             $KILND_E2B_API_KEY"
                .into(),
        );
    }
    Ok(key)
}

/// Binds the Unix socket, replacing a stale one (nothing answers on it) but never a live one.
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, String> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use: another kilnd serves this state folder",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing stale {}: {e}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<(), String> {
    let cfg = config(&args)?;
    if cfg.inputs.net {
        check_net()?;
    }
    let tcp_token = args.listen.map(|_| token(&args)).transpose()?;
    let e2b_key = args.e2b_listen.map(|_| e2b_key(&args)).transpose()?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("kilnd.sock"));
    let daemon = Daemon::open(cfg).map_err(|e| e.to_string())?;
    let d2 = daemon.clone();
    let recovered = tokio::task::spawn_blocking(move || d2.recover())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tracing::info!(?recovered, "recovered");
    let listener = bind_socket(&socket)?;
    tokio::spawn(daemon.clone().fill_pools());
    let sweeper = daemon.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for id in sweeper.sweep_expired().await {
                tracing::info!(sandbox = %id, "expired");
            }
        }
    });
    if let (Some(addr), Some(token)) = (args.listen, tcp_token) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--listen {addr}: {e}"))?
            .tap_io(no_delay);
        let app = kiln_pool::api::tcp_router(daemon.clone(), token);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::error!("the TCP listener stopped: {e}");
            }
        });
        tracing::info!(%addr, "serving on TCP (bearer token)");
    }
    if let (Some(addr), Some(key)) = (args.e2b_listen, e2b_key) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--e2b-listen {addr}: {e}"))?
            .tap_io(no_delay);
        let e2b = kiln_pool::e2b::E2b::new(
            daemon.clone(),
            key,
            args.e2b_internet_default == InternetDefault::Allow,
        );
        let app = kiln_pool::e2b::router(e2b.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::error!("the E2B listener stopped: {e}");
            }
        });
        // What is kept per sandbox goes with the sandboxes (expiry kills without asking us).
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                e2b.forget_gone();
            }
        });
        tracing::info!(%addr, envd = kiln_pool::e2b::state::ENVD_VERSION, "serving the E2B API");
    }
    tracing::info!(socket = %socket.display(), "serving");
    let app = kiln_pool::api::router(daemon.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .map_err(|e| e.to_string())?;
    daemon.stop_warm().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: ending the VMs kilnd holds (sandboxes and warm VMs)");
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file is read with grep.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kilnd: {e}");
            ExitCode::from(2)
        }
    }
}
