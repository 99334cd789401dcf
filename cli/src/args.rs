//! `kiln`'s command line, hand-parsed so every mistake is one line naming the flag or value.
//! Parsing only turns text into [`RunArgs`]; finding the kernel and rootfs is [`Images::resolve`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_agent::guest::memory::ZramSize;
use kiln_net::{DomainPattern, PublishSpec};

/// The usage text.
pub const USAGE: &str = "usage: kiln run [OPTIONS] [--] CMD [ARG...]
       kiln snapshot create|load|merge ...   (kiln snapshot --help)
       kiln template build|ls|rm|pool ...    (kiln template --help)
       kiln sandbox create|ls|exec|cp|fork|snapshot|pause|resume|kill|timeout ...

Boots a Kiln microVM, runs CMD in it through the guest agent, streams its output, and exits
with its status.

  --kernel PATH        guest kernel (default: $KILN_KERNEL, else /kiln/vmlinux)
  --rootfs PATH        root filesystem image holding /usr/sbin/kiln-agent
                       (default: $KILN_ROOTFS, else /kiln/rootfs.ext4)
  --snapshot DIR       instead of booting, restore the snapshot in DIR (DIR/vmstate and
                       DIR/memory, from `kiln snapshot create`; never modified) and give the
                       guest fresh entropy, the host's time and the --env values first; the
                       snapshot fixes kernel, rootfs, memory and vCPUs
  --timeout SECS       kill CMD's process group after SECS seconds (exit 124)
  --env K=V            set an environment variable (repeatable)
  --cwd DIR            working directory in the guest (default /)
  --user USER          run as name, uid, name:group or uid:gid (default root)
  --mem-mib N          guest memory in MiB (default 256)
  --vcpus N            vCPUs (default 1)
  --zram off|SIZE      zram swap in the guest, set up before CMD runs: SIZE in bytes with an
                       optional K, M or G suffix, or N% of guest memory (default 50%); lz4,
                       swappiness 100, page-cluster 0
  --free-page-reporting on|off
                       the guest reports the memory it frees and the host takes it back at once
                       (default on; a virtio-balloon with free page reporting)
  --balloon-mib N      start with N MiB of guest memory held in the balloon (default 0); the
                       guest takes it back when it runs out of memory (deflate_on_oom)
  --tty                run CMD on a terminal when stdin is one
  --json               print one JSON object {stdout, stderr, exit_code, signal, timed_out,
                       timings: {boot_ms, exec_ms}} instead of streaming
  --boot-timeout SECS  give up when the agent has not answered after SECS (default 30)
  --template NAME      run in a sandbox of kilnd's template NAME instead of booting (from its
                       warm pool when ready); then -c CODE runs code in --lang (python, sh,
                       node; default python) and a lone FILE.py/.sh/.js is copied in and run;
                       --kilnd PATH names kilnd's socket (see `kiln template --help`); the
                       network flags below then set the sandbox's policy (the template's
                       default without them) and --publish its ports

Network (none by default: no network interface at all):
  --net                a network interface in a namespace of its own, egress denied
  --allow-domain D     --net, and let the guest resolve D and reach it on ports 80 and 443
                       (checked by TLS SNI or HTTP Host against what D resolved to); *.D allows
                       the names under D (repeatable)
  --allow-net          --net, and any egress but to private, loopback, link-local and metadata
                       addresses and the host's own
  --publish [HOST:]GUEST
                       listen on 127.0.0.1:HOST (a free port if omitted) and carry connections
                       to GUEST in the guest, over its network interface or, without one, over
                       vsock (repeatable); the ports chosen are printed on stderr and in --json
Refused lookups and connections are printed on stderr as `kiln: net: ...` (and listed in --json).

kiln-vmm is taken from $KILN_VMM, else next to kiln, else from PATH.

exit status: CMD's own; 128+N if signal N ended it; 124 if it timed out; 127 if it could not
be started; 125 if kiln, the VM or the boot failed.";

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u32 = 256;
/// Default boot timeout.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `kiln run` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct RunArgs {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
    /// `--snapshot`: restore this snapshot directory instead of booting.
    pub snapshot: Option<PathBuf>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--env`, in order.
    pub env: Vec<(String, String)>,
    /// `--cwd`.
    pub cwd: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--mem-mib`.
    pub mem_mib: u32,
    /// `--vcpus`.
    pub vcpus: u32,
    /// `--zram`, as the guest's `kiln.zram=` takes it; `None` for the guest's default.
    pub zram: Option<String>,
    /// `--free-page-reporting`.
    pub free_page_reporting: bool,
    /// `--balloon-mib`.
    pub balloon_mib: u32,
    /// `--tty`.
    pub tty: bool,
    /// `--json`.
    pub json: bool,
    /// `--boot-timeout`.
    pub boot_timeout: Duration,
    /// `--net`, `--allow-domain`, `--allow-net`, `--publish`.
    pub net: NetArgs,
    /// `--template`: run in a sandbox of this kilnd template instead of booting.
    pub template: Option<String>,
    /// `--kilnd`: kilnd's socket.
    pub kilnd: Option<PathBuf>,
    /// `--lang`: the language of `-c` code (python, sh, node).
    pub lang: Option<String>,
    /// `-c CODE` (with `--template`).
    pub code: Option<String>,
    /// The command.
    pub command: Vec<String>,
}

/// The network the command line asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetArgs {
    /// A network interface (`--net`, or implied by `--allow-domain`/`--allow-net`).
    pub nic: bool,
    /// `--allow-domain`, in order.
    pub domains: Vec<DomainPattern>,
    /// `--allow-net`.
    pub allow_net: bool,
    /// `--publish`, in order.
    pub publish: Vec<PublishSpec>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// `kiln run ...`.
    Run(Box<RunArgs>),
    /// `kiln snapshot ...`, with the words after `snapshot` (parsed by `snapshot::args`).
    Snapshot(Vec<String>),
    /// `kiln template ...`, with the words after `template` (parsed by `kilnd::args`).
    Template(Vec<String>),
    /// `kiln sandbox ...`, with the words after `sandbox`.
    Sandbox(Vec<String>),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag} {value:?} is not a positive number of seconds"))
}

fn count(flag: &str, value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{flag} {value:?} is not a positive whole number"))
}

fn on_off(flag: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{flag} {value:?} is not on or off")),
    }
}

fn env_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("--env {value:?} is not NAME=VALUE")),
    }
}

/// One option word: its name and the value given with `=`, if any.
pub struct Opt<'a> {
    /// `--name` (or `-n`).
    pub name: &'a str,
    inline: Option<&'a str>,
}

/// The words of a command line, read option by option, then the rest.
pub struct Words<'a> {
    args: &'a [String],
    pos: usize,
}

impl<'a> Words<'a> {
    /// Reads `args`.
    pub fn new(args: &'a [String]) -> Words<'a> {
        Words { args, pos: 0 }
    }

    /// The next option; `None` at the end, after a `--` (which is consumed), or at the first
    /// word that is not an option (which is not).
    pub fn next_opt(&mut self) -> Option<Opt<'a>> {
        let arg = self.args.get(self.pos)?;
        if arg == "--" {
            self.pos += 1;
            return None;
        }
        if !arg.starts_with('-') {
            return None;
        }
        self.pos += 1;
        Some(match arg.split_once('=') {
            Some((name, v)) if name.starts_with("--") => Opt {
                name,
                inline: Some(v),
            },
            _ => Opt {
                name: arg,
                inline: None,
            },
        })
    }

    /// The value of `opt`: given with `=`, else the next word.
    pub fn value(&mut self, opt: &Opt<'_>) -> Result<String, String> {
        if let Some(v) = opt.inline {
            return Ok(v.to_string());
        }
        let v = self
            .args
            .get(self.pos)
            .ok_or_else(|| format!("{} needs a value", opt.name))?;
        self.pos += 1;
        Ok(v.clone())
    }

    /// Checks that the flag `opt` came without a value.
    pub fn flag(opt: &Opt<'_>) -> Result<bool, String> {
        match opt.inline {
            None => Ok(true),
            Some(_) => Err(format!("{} takes no value", opt.name)),
        }
    }

    /// The words not read yet.
    pub fn rest(&mut self) -> Vec<String> {
        let rest = self.args.get(self.pos..).unwrap_or_default().to_vec();
        self.pos = self.args.len();
        rest
    }
}

/// Parses `args` (without the program name).
pub fn parse(args: &[String]) -> Result<Command, String> {
    match args.first().map(String::as_str) {
        None => return Err("no command given; try `kiln run -- CMD` or `kiln --help`".into()),
        Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("-V" | "--version") => return Ok(Command::Version),
        Some("run") => {}
        Some("snapshot") => return Ok(Command::Snapshot(args[1..].to_vec())),
        Some("template") => return Ok(Command::Template(args[1..].to_vec())),
        Some("sandbox") => return Ok(Command::Sandbox(args[1..].to_vec())),
        Some(other) => {
            return Err(format!(
                "unknown command {other:?} (run, snapshot, template, sandbox)"
            ));
        }
    }
    let mut a = RunArgs {
        kernel: None,
        rootfs: None,
        snapshot: None,
        timeout: None,
        env: Vec::new(),
        cwd: None,
        user: None,
        mem_mib: DEFAULT_MEM_MIB,
        vcpus: 1,
        zram: None,
        free_page_reporting: true,
        balloon_mib: 0,
        tty: false,
        json: false,
        boot_timeout: DEFAULT_BOOT_TIMEOUT,
        net: NetArgs::default(),
        template: None,
        kilnd: None,
        lang: None,
        code: None,
        command: Vec::new(),
    };
    let mut words = Words::new(&args[1..]);
    // Machine flags the snapshot fixes, for the conflict check below.
    let mut machine_flags = Vec::new();
    while let Some(opt) = words.next_opt() {
        let name = opt.name;
        match name {
            "-h" | "--help" => return Ok(Command::Help),
            "--kernel" => a.kernel = Some(words.value(&opt)?.into()),
            "--rootfs" => a.rootfs = Some(words.value(&opt)?.into()),
            "--snapshot" => a.snapshot = Some(words.value(&opt)?.into()),
            "--timeout" => a.timeout = Some(seconds(name, &words.value(&opt)?)?),
            "--boot-timeout" => a.boot_timeout = seconds(name, &words.value(&opt)?)?,
            "--env" | "-e" => a.env.push(env_pair(&words.value(&opt)?)?),
            "--cwd" | "-w" => a.cwd = Some(words.value(&opt)?),
            "--user" | "-u" => a.user = Some(words.value(&opt)?),
            "--mem-mib" => a.mem_mib = count(name, &words.value(&opt)?)?,
            "--vcpus" => a.vcpus = count(name, &words.value(&opt)?)?,
            "--zram" => {
                let v = words.value(&opt)?;
                ZramSize::parse(&v).map_err(|e| format!("--zram: {e}"))?;
                a.zram = Some(v);
            }
            "--free-page-reporting" => a.free_page_reporting = on_off(name, &words.value(&opt)?)?,
            "--balloon-mib" => {
                let v = words.value(&opt)?;
                a.balloon_mib = v
                    .parse()
                    .map_err(|_| format!("--balloon-mib {v:?} is not a whole number of MiB"))?;
            }
            "--tty" | "-t" => a.tty = Words::flag(&opt)?,
            "--json" => a.json = Words::flag(&opt)?,
            "--net" => a.net.nic = Words::flag(&opt)?,
            "--allow-net" => a.net.allow_net = Words::flag(&opt)?,
            "--allow-domain" => a
                .net
                .domains
                .push(words.value(&opt)?.parse().map_err(|e| format!("{e}"))?),
            "--publish" | "-p" => a
                .net
                .publish
                .push(words.value(&opt)?.parse().map_err(|e| format!("{e}"))?),
            "--template" => a.template = Some(words.value(&opt)?),
            "--kilnd" => a.kilnd = Some(words.value(&opt)?.into()),
            "--lang" => a.lang = Some(words.value(&opt)?),
            "-c" => a.code = Some(words.value(&opt)?),
            other => return Err(format!("unknown option {other}")),
        }
        if matches!(
            name,
            "--kernel"
                | "--rootfs"
                | "--mem-mib"
                | "--vcpus"
                | "--snapshot"
                | "--tty"
                | "-t"
                | "--zram"
                | "--free-page-reporting"
                | "--balloon-mib"
        ) {
            machine_flags.push(name);
        }
    }
    a.command = words.rest();
    if a.net.allow_net && !a.net.domains.is_empty() {
        return Err(
            "--allow-net allows every domain already; give --allow-domain or --allow-net, not both"
                .into(),
        );
    }
    a.net.nic |= a.net.allow_net || !a.net.domains.is_empty();
    if let (Some(_), Some(flag)) = (
        &a.snapshot,
        machine_flags.iter().find(|f| **f != "--snapshot"),
    ) {
        return Err(format!(
            "{flag} cannot be used with --snapshot: the snapshot fixes the machine"
        ));
    }
    if let (Some(_), Some(flag)) = (&a.template, machine_flags.first()) {
        return Err(format!(
            "{flag} cannot be used with --template: the template fixes the machine"
        ));
    }
    if a.template.is_none()
        && let Some(flag) = [
            ("-c", a.code.is_some()),
            ("--lang", a.lang.is_some()),
            ("--kilnd", a.kilnd.is_some()),
        ]
        .iter()
        .find(|(_, given)| *given)
    {
        return Err(format!("{} only works with --template", flag.0));
    }
    if a.code.is_some() && !a.command.is_empty() {
        return Err("give either -c CODE or a command, not both".into());
    }
    if a.command.is_empty() && a.code.is_none() {
        return Err("no command to run: kiln run [OPTIONS] -- CMD [ARG...]".into());
    }
    if a.balloon_mib >= a.mem_mib {
        return Err(format!(
            "--balloon-mib {} leaves nothing of --mem-mib {}",
            a.balloon_mib, a.mem_mib
        ));
    }
    Ok(Command::Run(Box::new(a)))
}

/// The kernel and root filesystem to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
}

/// The lab's kernel.
pub const LAB_KERNEL: &str = "/kiln/vmlinux";
/// The lab's root filesystem.
pub const LAB_ROOTFS: &str = "/kiln/rootfs.ext4";

impl Images {
    /// Picks each image from its flag, else its variable, else the lab's path, and checks that
    /// it is a readable file. `env` looks a variable up (the process environment in `main`).
    pub fn resolve(args: &RunArgs, env: impl Fn(&str) -> Option<String>) -> Result<Images, String> {
        let pick = |flag: &Option<PathBuf>, var: &str, lab: &str, what: &str| {
            let (path, source) = match (flag, env(var).filter(|v| !v.is_empty())) {
                (Some(p), _) => (p.clone(), format!("--{what}")),
                (None, Some(v)) => (PathBuf::from(v), format!("${var}")),
                (None, None) => (
                    PathBuf::from(lab),
                    format!("the default (set --{what} or ${var})"),
                ),
            };
            check_file(&path, what, &source).map(|()| path)
        };
        let kernel = pick(&args.kernel, "KILN_KERNEL", LAB_KERNEL, "kernel")?;
        let rootfs = pick(&args.rootfs, "KILN_ROOTFS", LAB_ROOTFS, "rootfs")?;
        if rootfs.to_string_lossy().contains(',') {
            return Err(format!(
                "rootfs path {} contains a comma, which kiln-vmm's --drive cannot take",
                rootfs.display()
            ));
        }
        Ok(Images { kernel, rootfs })
    }
}

fn check_file(path: &Path, what: &str, source: &str) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!(
            "{what} {} (from {source}) is not a file",
            path.display()
        )),
        Err(e) => Err(format!("{what} {} (from {source}): {e}", path.display())),
    }
}

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
