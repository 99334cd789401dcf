//! The `kiln-jailer` binary: parse and validate, then build the jail step by step in Firecracker's
//! order, each failure naming its step and taking back what was built; or `--cleanup`.
//!
//! Exit status: 2 for bad input, 1 when a step fails on the host, otherwise the jailed process's.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln_jailer::args::{self, CleanupArgs, Command, JailArgs};
use kiln_jailer::cgroup::{self, KERNEL};
use kiln_jailer::chroot;
use kiln_jailer::env;
use kiln_jailer::jail::Jail;
use kiln_jailer::launch::{self, Spec, StartTime};
use kiln_jailer::libs::{self, Deps};
use kiln_jailer::undo::Undo;
use kiln_jailer::{cleanup, netns, procs, rlimit};

const EXIT_HOST_FAILURE: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

/// A step that failed, and the status to exit with.
struct Failure {
    step: &'static str,
    message: String,
    code: u8,
}

/// Maps a step's error into a host [`Failure`] naming the step.
fn at<E: Display>(step: &'static str) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        step,
        message: e.to_string(),
        code: EXIT_HOST_FAILURE,
    }
}

fn main() -> ExitCode {
    // The VMM's start-up metrics count from here, as under Firecracker's jailer.
    let started = StartTime::now();
    let command = args::from_os(std::env::args_os().skip(1)).and_then(|a| args::parse(&a));
    match command {
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("kiln-jailer {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Jail(args)) => jail(args, started),
        Ok(Command::Cleanup(args)) => clean(&args),
        Err(e) => report(&Failure {
            step: "command line",
            message: e.to_string(),
            code: EXIT_BAD_INPUT,
        }),
    }
}

fn report(f: &Failure) -> ExitCode {
    eprintln!("kiln-jailer: {}: {}", f.step, f.message);
    ExitCode::from(f.code)
}

/// Reports `f`, takes back what `undo` recorded, and exits with `f`'s status.
fn undo_and_fail(undo: Undo, f: &Failure) -> ExitCode {
    let code = report(f);
    for problem in undo.run() {
        eprintln!("kiln-jailer: cleanup: {problem}");
    }
    code
}

fn jail(args: JailArgs, started: StartTime) -> ExitCode {
    let bad = |e: &dyn Display| Failure {
        step: "validate",
        message: e.to_string(),
        code: EXIT_BAD_INPUT,
    };
    if let Err(e) = args.validate() {
        return report(&bad(&e));
    }
    // The caller's LD_LIBRARY_PATH finds the exec file's libraries; read before it is cleared.
    let deps = match libs::resolve(&args.exec_file, std::env::var_os("LD_LIBRARY_PATH")) {
        Ok(deps) => deps,
        Err(e) => return report(&bad(&e)),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return report(&at("validate")(
            "kiln-jailer must run as root: it mounts, makes device nodes and changes ids",
        ));
    }
    if let Err(e) = env::close_inherited_fds() {
        return report(&at("close inherited fds")(e));
    }
    env::clear_env();
    let mut undo = Undo::new();
    let spec = match build(&args, &deps, started, &mut undo) {
        Ok(spec) => spec,
        Err(f) => return undo_and_fail(undo, &f),
    };
    if args.new_pid_ns {
        match launch::fork_into_pid_ns(&spec) {
            Ok(_) if args.daemonize => ExitCode::SUCCESS,
            Ok(started) => launch::wait_and_mirror(started),
            Err(e) => undo_and_fail(undo, &at(e.step())(e)),
        }
    } else {
        let (err, still_root) = launch::exec_here(&spec);
        let failure = at(err.step())(err);
        if still_root {
            return undo_and_fail(undo, &failure);
        }
        let code = report(&failure);
        let left: Vec<String> = undo
            .created()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!(
            "kiln-jailer: no longer root, so {} stay; remove them with kiln-jailer --cleanup --id {}",
            left.join(", "),
            args.id
        );
        code
    }
}

/// Steps 4 to 10: the jail directory and its contents, the network namespace, limits, cgroups,
/// the mount namespace and devices. Everything built is recorded in `undo`.
fn build(
    args: &JailArgs,
    deps: &Deps,
    started: StartTime,
    undo: &mut Undo,
) -> Result<Spec, Failure> {
    let exec_name = args.exec_name();
    let owner = (args.uid, args.gid);
    let jail = Jail::create(&args.chroot_base, &exec_name, &args.id, owner, undo)
        .map_err(at("jail directory"))?;
    jail.install(&args.exec_file, &exec_name, deps, args.share_exec_file)
        .map_err(at("copy into the jail"))?;
    if let Some(netns) = &args.netns {
        netns::join(netns).map_err(at("network namespace"))?;
    }
    rlimit::apply(&args.limits).map_err(at("resource limits"))?;
    if !args.cgroups.is_empty() {
        let hierarchies = cgroup::detect().map_err(at("cgroups"))?;
        let version = cgroup::pick_version(&hierarchies, args.cgroup_version);
        let placed = cgroup::create(
            &hierarchies,
            version,
            &args.parent_cgroup(),
            &args.id,
            &args.cgroups,
            &KERNEL,
            undo,
        )
        .map_err(at("cgroups"))?;
        cgroup::join(&placed, undo).map_err(at("cgroups"))?;
    }
    let dev_null = if args.daemonize {
        Some(env::open_dev_null().map_err(at("daemonize"))?)
    } else {
        None
    };
    let devices = chroot::host_devices().map_err(at("devices"))?;
    chroot::enter(&jail.root).map_err(at("mount namespace"))?;
    chroot::make_devices(&devices, args.uid, args.gid).map_err(at("devices"))?;
    chroot::mount_proc().map_err(at("proc"))?;
    undo.mounted(Path::new("/proc"));
    let exec = PathBuf::from("/").join(&exec_name);
    let mut needed = vec![exec.clone()];
    needed.extend(deps.interpreter.clone());
    chroot::check_present(&needed).map_err(at("exec file"))?;
    Ok(Spec {
        exec,
        id: args.id.clone(),
        started,
        args: args.vmm_args.clone(),
        uid: args.uid,
        gid: args.gid,
        dev_null,
        pid_file: PathBuf::from(format!("/{exec_name}.pid")),
    })
}

fn clean(args: &CleanupArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        return report(&Failure {
            step: "validate",
            message: e.to_string(),
            code: EXIT_BAD_INPUT,
        });
    }
    let hierarchies = match cgroup::detect() {
        Ok(h) => h,
        Err(e) => return report(&at("cleanup")(e)),
    };
    match cleanup::cleanup(
        args,
        &hierarchies,
        &KERNEL,
        &procs::PROC_FS,
        cleanup::KERNEL_THREAD_GRACE,
    ) {
        Ok(removed) if removed.is_empty() => {
            let jail = Jail::path(&args.chroot_base, &args.exec_name, &args.id);
            eprintln!(
                "kiln-jailer: nothing to clean up for {}: no jail at {} and no cgroup {}/{}",
                args.id,
                jail.dir.display(),
                args.parent_cgroup(),
                args.id
            );
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for path in removed {
                println!("removed {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => report(&at("cleanup")(e)),
    }
}
