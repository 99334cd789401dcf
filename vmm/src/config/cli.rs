//! `kiln-vmm`'s command line. Hand-parsed so that every mistake is one line naming the flag.

use std::path::PathBuf;

use kiln_api::requests::logger::{LogLevel, Logger as LoggerConfig};

use super::device_args::{parse_balloon, parse_drive, parse_net, parse_vsock};
use super::{
    BalloonConfig, BootSourceConfig, DriveConfig, MachineConfig, NetworkInterfaceConfig,
    SerialConfig, VmConfig, VsockConfig, parse_config_file,
};

/// The usage text for `--help`.
pub const USAGE: &str =
    "usage: kiln-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--mem-mib N] [--vcpus N]
                [--drive id=ID,path=PATH[,ro][,root][,engine=E]]... [--vsock cid=N,uds=PATH]
                [--net id=ID,tap=NAME[,mac=MAC]]... [--serial-out PATH]
                [--balloon [amount_mib=N][,deflate_on_oom][,stats_polling_interval_s=N][,free_page_reporting]]
       kiln-vmm --config-file FILE [--serial-out PATH] [--api-sock PATH]
       kiln-vmm --api-sock PATH [--serial-out PATH]
       kiln-vmm --describe-snapshot STATE_FILE
       (each running form also takes the process options below)

  --kernel PATH       uncompressed ELF vmlinux (PVH entry used when present) or bzImage
  --initrd PATH       initramfs to load
  --cmdline STR       kernel command line (default: \"console=ttyS0 reboot=k panic=1\")
  --mem-mib N         guest memory in MiB (default 128)
  --vcpus N           number of vCPUs, 1 to 32 (default 1)
  --drive SPEC        a virtio-blk drive backed by a file; `root` makes it /dev/vda and the root
                      device, `ro` refuses writes, `engine=Async` does its I/O on an io_uring
                      (repeatable)
  --vsock SPEC        a virtio-vsock device; the host reaches guest port P by connecting to uds and
                      writing \"CONNECT P\\n\"; the guest reaches host port P at uds_P
  --net SPEC          a virtio-net device on the existing TAP `tap` (in kiln-vmm's network
                      namespace); `mac` is the guest's MAC address (repeatable; the first is eth0)
  --balloon SPEC      a virtio-balloon device (Firecracker's `balloon` fields; `-` for the defaults):
                      a target of amount_mib, deflate_on_oom, statistics every N seconds, and
                      free_page_reporting, with which the memory the guest frees goes back to the
                      host
  --serial-out PATH   write the serial console to PATH instead of stdout
  --api-sock PATH     serve Firecracker's HTTP API on a Unix socket at PATH; without a kernel or
                      config file, the VM is configured and started through it
  --config-file FILE  Firecracker-style JSON with \"boot-source\" and \"machine-config\"
  --no-seccomp        install no seccomp filters (for debugging only: a guest that takes over
                      a thread could then make any system call)

Firecracker's process options, taken as Firecracker takes them:
  --id ID                     the instance id (1 to 64 letters, digits or '-'; default
                              anonymous-instance): in GET / and in log lines
  --log-path PATH             write the log to PATH (a file or named pipe; created if missing) in
                              Firecracker's line format
  --level LEVEL               Error, Warning, Info, Debug, Trace or Off (default Info with a log
                              file, else warn or $KILN_LOG)
  --show-level                put each line's level in it
  --show-log-origin           put each line's source file and line in it
  --metrics-path PATH         write metrics (one JSON object a line) to PATH every 60 s, on
                              FlushMetrics and at exit
  --boot-timer                log `Guest-boot-time = ...` when the guest writes 123 to 0xd0000000
                              (virtio devices then start at 0xd0001000)
  --start-time-us N           when the process was started (CLOCK_MONOTONIC, us), as the jailer
                              passes it; start-up metrics count from it
  --start-time-cpu-us N       the CPU time already spent by then (us)
  --parent-cpu-time-us N      CPU time the parent (the jailer) spent, added to the start-up CPU time
  --no-api                    serve no API socket (the default without --api-sock); refused with it
  --http-api-max-payload-size N
                              largest API request body in bytes (default 51200)
  --mmds-size-limit N         largest MMDS data store in bytes (default: the payload size)
  --seccomp-filter FILE       install these filters instead of the built-in ones: a map of thread
                              kind (vmm, api, vcpu) to BPF program, in the bincode layout
                              Firecracker's seccompiler-bin writes
  --describe-snapshot FILE    print a snapshot state file's format version and contents, and exit
  -V, --version               print the version and exit

exit status: 0 when the guest reboots or powers off, 1 on a VMM or KVM error or a guest triple
fault, 2 on a bad command line or configuration, 148 when a thread made a forbidden system call.";

/// Options about the process rather than the VM (Firecracker's command line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessOptions {
    /// `--id`.
    pub id: Option<String>,
    /// `--log-path`, `--level`, `--show-level`, `--show-log-origin` (all `None` when absent).
    pub logger: LoggerConfig,
    /// `--metrics-path`.
    pub metrics_path: Option<PathBuf>,
    /// `--boot-timer`.
    pub boot_timer: bool,
    /// `--start-time-us`.
    pub start_time_us: Option<u64>,
    /// `--start-time-cpu-us`.
    pub start_time_cpu_us: Option<u64>,
    /// `--parent-cpu-time-us`.
    pub parent_cpu_time_us: Option<u64>,
    /// `--http-api-max-payload-size`.
    pub max_payload: Option<usize>,
    /// `--mmds-size-limit`.
    pub mmds_size_limit: Option<usize>,
    /// `--seccomp-filter`.
    pub seccomp_filter: Option<PathBuf>,
}

impl ProcessOptions {
    /// True when any logger flag was given.
    pub fn has_logger(&self) -> bool {
        self.logger != LoggerConfig::default()
    }
}

/// Firecracker's rule for `--id`.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!(
            "--id {id:?} must be 1 to 64 letters, digits or '-'"
        ));
    }
    Ok(())
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Boot a VM with this configuration, or one configured over the API socket.
    Run {
        /// The configuration from flags or a file; `None` when it comes over the API.
        config: Option<Box<VmConfig>>,
        /// Where to serve the API.
        api_sock: Option<PathBuf>,
        /// The serial console for a VM configured over the API.
        serial: SerialConfig,
        /// `--no-seccomp`: install no seccomp filters.
        no_seccomp: bool,
        /// Firecracker's process options.
        process: Box<ProcessOptions>,
    },
    /// Print usage.
    Help,
    /// Print the version.
    Version,
    /// `--describe-snapshot FILE`: describe a snapshot state file.
    DescribeSnapshot(PathBuf),
}

/// Flags seen on the command line, before they are combined into a config.
#[derive(Default)]
struct Flags {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    mem_mib: Option<usize>,
    vcpus: Option<u8>,
    serial_out: Option<PathBuf>,
    config_file: Option<PathBuf>,
    drives: Vec<DriveConfig>,
    vsock: Option<VsockConfig>,
    nets: Vec<NetworkInterfaceConfig>,
    balloon: Option<BalloonConfig>,
    api_sock: Option<PathBuf>,
    no_seccomp: bool,
    no_api: bool,
    process: ProcessOptions,
}

/// Parses `args` (without the program name).
pub fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut flags = Flags::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        let p = &mut flags.process;
        let switch = |on: &mut bool| -> Result<(), String> {
            match inline {
                Some(_) => Err(format!("{name} takes no value")),
                None => {
                    *on = true;
                    Ok(())
                }
            }
        };
        match name {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--describe-snapshot" => return Ok(Command::DescribeSnapshot(value()?.into())),
            "--id" => {
                let id = value()?;
                check_id(&id)?;
                set(&mut p.id, name, id)?
            }
            "--log-path" => set(&mut p.logger.log_path, name, value()?.into())?,
            "--level" => {
                let level: LogLevel = value()?.parse().map_err(|e| format!("--{e}"))?;
                set(&mut p.logger.level, name, level)?
            }
            "--show-level" => {
                let mut on = false;
                switch(&mut on)?;
                p.logger.show_level = Some(on);
            }
            "--show-log-origin" => {
                let mut on = false;
                switch(&mut on)?;
                p.logger.show_log_origin = Some(on);
            }
            "--metrics-path" => set(&mut p.metrics_path, name, value()?.into())?,
            "--boot-timer" => switch(&mut p.boot_timer)?,
            "--start-time-us" => set(&mut p.start_time_us, name, number(name, &value()?)?)?,
            "--start-time-cpu-us" => set(&mut p.start_time_cpu_us, name, number(name, &value()?)?)?,
            "--parent-cpu-time-us" => {
                set(&mut p.parent_cpu_time_us, name, number(name, &value()?)?)?
            }
            "--http-api-max-payload-size" => {
                let n: usize = number(name, &value()?)?;
                if n == 0 {
                    return Err(format!("{name} must be at least 1 byte"));
                }
                set(&mut p.max_payload, name, n)?
            }
            "--mmds-size-limit" => set(&mut p.mmds_size_limit, name, number(name, &value()?)?)?,
            "--seccomp-filter" => set(&mut p.seccomp_filter, name, value()?.into())?,
            "--no-api" => switch(&mut flags.no_api)?,
            "--kernel" => set(&mut flags.kernel, name, value()?.into())?,
            "--initrd" => set(&mut flags.initrd, name, value()?.into())?,
            "--cmdline" => set(&mut flags.cmdline, name, value()?)?,
            "--mem-mib" => set(&mut flags.mem_mib, name, number(name, &value()?)?)?,
            "--vcpus" => set(&mut flags.vcpus, name, number(name, &value()?)?)?,
            "--serial-out" => set(&mut flags.serial_out, name, value()?.into())?,
            "--config-file" => set(&mut flags.config_file, name, value()?.into())?,
            "--drive" => flags.drives.push(parse_drive(&value()?)?),
            "--vsock" => set(&mut flags.vsock, name, parse_vsock(&value()?)?)?,
            "--net" => flags.nets.push(parse_net(&value()?)?),
            "--balloon" => set(&mut flags.balloon, name, parse_balloon(&value()?)?)?,
            "--api-sock" => set(&mut flags.api_sock, name, value()?.into())?,
            "--no-seccomp" if inline.is_some() => return Err(format!("{name} takes no value")),
            "--no-seccomp" => flags.no_seccomp = true,
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let api_sock = flags.api_sock.take();
    let no_seccomp = flags.no_seccomp;
    if flags.no_api && api_sock.is_some() {
        return Err("--no-api cannot be combined with --api-sock".into());
    }
    if no_seccomp && flags.process.seccomp_filter.is_some() {
        return Err("--no-seccomp cannot be combined with --seccomp-filter".into());
    }
    let process = Box::new(std::mem::take(&mut flags.process));
    if api_sock.is_some() && flags.kernel.is_none() && flags.config_file.is_none() {
        let serial = flags.into_api_only()?;
        return Ok(Command::Run {
            config: None,
            api_sock,
            serial,
            no_seccomp,
            process,
        });
    }
    let config = flags.into_config()?;
    Ok(Command::Run {
        serial: config.serial.clone(),
        config: Some(Box::new(config)),
        api_sock,
        no_seccomp,
        process,
    })
}

impl Flags {
    /// The first machine flag given (`--kernel` aside), if any: flags that describe the VM and so
    /// conflict with a config file, or need a kernel next to `--api-sock`.
    fn first_machine_flag(&self) -> Option<&'static str> {
        [
            (self.initrd.is_some(), "--initrd"),
            (self.cmdline.is_some(), "--cmdline"),
            (self.mem_mib.is_some(), "--mem-mib"),
            (self.vcpus.is_some(), "--vcpus"),
            (!self.drives.is_empty(), "--drive"),
            (self.vsock.is_some(), "--vsock"),
            (!self.nets.is_empty(), "--net"),
            (self.balloon.is_some(), "--balloon"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// With only `--api-sock`, machine flags have nothing to apply to: they come over the API.
    fn into_api_only(self) -> Result<SerialConfig, String> {
        if let Some(flag) = self.first_machine_flag() {
            return Err(format!(
                "{flag} needs --kernel; with only --api-sock, configure it over the API"
            ));
        }
        Ok(SerialConfig {
            serial_out_path: self.serial_out,
            rate_limiter: None,
        })
    }

    fn into_config(self) -> Result<VmConfig, String> {
        let conflicting = self
            .kernel
            .is_some()
            .then_some("--kernel")
            .or_else(|| self.first_machine_flag());
        let mut config = match self.config_file {
            Some(file) => {
                if let Some(flag) = conflicting {
                    return Err(format!("{flag} cannot be combined with --config-file"));
                }
                parse_config_file(&file)?
            }
            None => {
                let kernel = self
                    .kernel
                    .ok_or("--kernel PATH or --config-file FILE is required")?;
                let defaults = super::default_machine();
                VmConfig {
                    boot_source: BootSourceConfig {
                        kernel_image_path: kernel,
                        initrd_path: self.initrd,
                        boot_args: self.cmdline,
                    },
                    machine: MachineConfig {
                        vcpu_count: self.vcpus.unwrap_or(defaults.vcpu_count),
                        mem_size_mib: self.mem_mib.unwrap_or(defaults.mem_size_mib),
                        ..defaults
                    },
                    serial: SerialConfig::default(),
                    drives: self.drives,
                    vsock: self.vsock,
                    network_interfaces: self.nets,
                    balloon: self.balloon,
                    ..VmConfig::default()
                }
            }
        };
        if let Some(path) = self.serial_out {
            config.serial.serial_out_path = Some(path);
        }
        Ok(config)
    }
}

fn set<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.replace(value).is_some() {
        return Err(format!("{name} given more than once"));
    }
    Ok(())
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{name} {value:?} is not a valid number"))
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
