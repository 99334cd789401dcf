//! Building a template: root filesystem image with the agent -> boot with the root writable and
//! run the build steps -> boot again over a fresh copy-on-write overlay of the image (`disk =
//! "cow"`, the overlay is kept with the snapshot) or read-only under the agent's tmpfs overlay
//! (`disk = "tmpfs"`) -> start -> ready -> Full snapshot -> one restore, whose working set is
//! kept for every later restore to map in ahead. The result is stored under its content key
//! ([`super::key`]), so an unchanged spec is a cache hit; it is built in its final folder (the
//! snapshot names the root image's path) behind a `building` marker, and removed again if
//! anything fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, ExecOutput, restore_connect, wait_ready};
use kiln_agent::protocol::{ExecSpec, ExitStatus};

use super::rootfs::{self, RootfsError};
use super::spec::{DiskMode, Spec};
use super::{Inputs, TemplateFiles};
use crate::net::VmNet;
use crate::types::BuildEvent;
use crate::vm::{Root, VmError, VmProcess};

/// How long a booting template VM may take to answer.
const BOOT_WAIT: Duration = Duration::from_secs(180);

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The root filesystem could not be made.
    #[error("root filesystem: {0}")]
    Rootfs(#[from] RootfsError),
    /// The OCI image could not be unpacked.
    #[error("OCI image: {0}")]
    Oci(#[from] super::oci::OciError),
    /// The Debian tree could not be made.
    #[error("Debian packages: {0}")]
    Debian(String),
    /// A template VM failed.
    #[error("{step}: {err}")]
    Vm {
        /// The build step.
        step: String,
        /// What the VMM said.
        err: VmError,
    },
    /// The agent in a template VM failed.
    #[error("{step}: {err}")]
    Agent {
        /// The build step.
        step: String,
        /// What went wrong.
        err: kiln_agent::client::Error,
    },
    /// A build command failed.
    #[error("build step {index} ({command:?}) exited with {status}{refused}")]
    Step {
        /// 1-based.
        index: usize,
        /// The command.
        command: String,
        /// How it ended.
        status: String,
        /// What the build's network refused meanwhile, if anything (`; the build's network
        /// refused ...`): often why a step that downloads failed.
        refused: String,
    },
    /// The ready check never passed.
    #[error("the ready check {command:?} did not pass within {timeout_s} s (last: {last})")]
    NotReady {
        /// The check.
        command: String,
        /// Its limit.
        timeout_s: u64,
        /// How its last try ended.
        last: String,
    },
    /// The root drive's overlay could not be made.
    #[error("{0}")]
    Disk(#[from] crate::disk::DiskError),
    /// The spec's `build` policy is not one (specs are validated before a build: this is a
    /// stored spec that no longer passes).
    #[error("template spec: {0}")]
    Policy(String),
    /// A build VM's network could not be made (its policy is `build` in the spec).
    #[error("the build's network: {0}")]
    Net(#[from] crate::net::NetError),
    /// A file in the store could not be written.
    #[error("{path}: {err}")]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

fn vm_err(step: &str) -> impl FnOnce(VmError) -> BuildError + '_ {
    move |err| BuildError::Vm {
        step: step.into(),
        err,
    }
}

fn agent_err(step: &str) -> impl FnOnce(kiln_agent::client::Error) -> BuildError + '_ {
    move |err| BuildError::Agent {
        step: step.into(),
        err,
    }
}

/// The template's command spec for `command`, with the template's env, workdir and user.
pub fn shell(spec: &Spec, command: &str) -> ExecSpec {
    let mut e = ExecSpec::new(["/bin/sh", "-c", command]);
    e.env = spec.env.clone();
    e.cwd = spec.workdir.clone();
    e.user = spec.user.clone();
    e
}

/// Runs `e` to its end, passing each output line to `say`; returns how it ended.
fn run_streaming(
    client: &Client,
    e: ExecSpec,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<ExitStatus, kiln_agent::client::Error> {
    let mut exec = client.exec(e)?;
    let mut pending = Vec::new();
    loop {
        match exec.next_output()? {
            Some(ExecOutput::Stdout(b) | ExecOutput::Stderr(b)) => {
                pending.extend_from_slice(&b);
                while let Some(nl) = pending.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    say(BuildEvent::Output {
                        line: String::from_utf8_lossy(&line).trim_end().to_string(),
                    });
                }
            }
            Some(ExecOutput::Exit(status)) => {
                if !pending.is_empty() {
                    say(BuildEvent::Output {
                        line: String::from_utf8_lossy(&pending).trim_end().to_string(),
                    });
                }
                return Ok(status);
            }
            None => {
                return Err(kiln_agent::client::Error::Protocol(
                    "exec ended without a status".into(),
                ));
            }
        }
    }
}

/// Makes `files.rootfs` from the spec's source.
fn make_rootfs(
    spec: &Spec,
    inputs: &Inputs,
    files: &TemplateFiles,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<(), BuildError> {
    say(BuildEvent::Step {
        name: "root filesystem".into(),
    });
    let made_ahead = spec
        .from
        .debian
        .as_ref()
        .and_then(|d| super::debian::cached_image(d, &inputs.image_dirs));
    if let Some(image) = spec.from.image.as_ref().or(made_ahead.as_ref()) {
        rootfs::image_from_image(image, &files.rootfs, spec.disk_mib, &inputs.agent)?;
        return Ok(());
    }
    let tree = files.dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).map_err(|err| BuildError::Store {
        path: tree.clone(),
        err,
    })?;
    let result = (|| {
        if let Some(dir) = &spec.from.dir {
            rootfs::run(
                std::process::Command::new("cp")
                    .arg("-a")
                    .arg(format!("{}/.", dir.display()))
                    .arg(&tree),
                "cp",
                "coreutils",
            )?;
        } else if let Some(oci) = &spec.from.oci {
            super::oci::unpack(oci, &tree)?;
        } else if let Some(debian) = &spec.from.debian {
            super::debian::tree(debian, &tree, inputs).map_err(BuildError::Debian)?;
        }
        rootfs::prepare_tree(&tree, &inputs.agent)?;
        rootfs::image_from_tree(&tree, &files.rootfs, spec.disk_mib)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tree);
    result
}

/// Boots the root writable and runs the build steps, then shuts the VM down (the changes stay
/// in the image).
fn run_steps(
    spec: &Spec,
    inputs: &Inputs,
    files: &TemplateFiles,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<(), BuildError> {
    say(BuildEvent::Step {
        name: format!(
            "boot with the root writable for {} build step(s)",
            spec.run.len()
        ),
    });
    let mut vm = VmProcess::spawn(
        &inputs.vmm,
        &files.dir.join("vm-steps"),
        limits(spec),
        build_net(spec, inputs)?,
    )
    .map_err(vm_err("boot"))?;
    vm.boot(
        &inputs.kernel,
        &files.rootfs,
        Root::Writable,
        spec.vcpus,
        spec.mem_mib,
    )
    .map_err(vm_err("boot"))?;
    let client = wait_ready(&vm.vsock, Instant::now() + BOOT_WAIT).map_err(agent_err("boot"))?;
    for (i, command) in spec.run.iter().enumerate() {
        say(BuildEvent::Step {
            name: format!("build step {}/{}: {command}", i + 1, spec.run.len()),
        });
        let status =
            run_streaming(&client, shell(spec, command), say).map_err(agent_err("build step"))?;
        if status != ExitStatus::Exited(0) {
            return Err(BuildError::Step {
                index: i + 1,
                command: command.clone(),
                status: format!("{status:?}"),
                refused: refused(&vm),
            });
        }
    }
    // A clean shutdown syncs the file system; the VMM then exits on its own.
    let _ = client.shutdown();
    drop(client);
    if vm.wait_exit(Duration::from_secs(60)).is_none() {
        vm.kill();
        return Err(BuildError::Vm {
            step: "shutting down after the build steps".into(),
            err: VmError::Exited {
                status: "still running after 60 s; killed".into(),
                said: String::new(),
            },
        });
    }
    let _ = std::fs::remove_dir_all(files.dir.join("vm-steps"));
    Ok(())
}

/// Boots over a fresh overlay (or read-only under tmpfs), starts the start command, waits for
/// ready, and snapshots; the image itself is never written from here on.
fn snapshot(
    spec: &Spec,
    inputs: &Inputs,
    files: &TemplateFiles,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<(), BuildError> {
    say(BuildEvent::Step {
        name: "boot for the snapshot".into(),
    });
    let mut vm = VmProcess::spawn(
        &inputs.vmm,
        &files.dir.join("vm-snap"),
        limits(spec),
        build_net(spec, inputs)?,
    )
    .map_err(vm_err("boot"))?;
    let root = match spec.disk {
        DiskMode::Cow => {
            crate::disk::create_empty(&files.overlay)?;
            Root::Cow(&files.overlay)
        }
        DiskMode::Tmpfs => Root::Tmpfs,
    };
    vm.boot(
        &inputs.kernel,
        &files.rootfs,
        root,
        spec.vcpus,
        spec.mem_mib,
    )
    .map_err(vm_err("boot"))?;
    let client = wait_ready(&vm.vsock, Instant::now() + BOOT_WAIT).map_err(agent_err("boot"))?;
    if let Some(start) = &spec.start {
        say(BuildEvent::Step {
            name: format!("start: {start}"),
        });
        // Detached from the agent's connection (which the snapshot resets), with its output kept.
        let detached = format!(
            "setsid /bin/sh -c {} </dev/null >/var/log/kiln-start.log 2>&1 &",
            sh_quote(start)
        );
        let status =
            run_streaming(&client, shell(spec, &detached), say).map_err(agent_err("start"))?;
        if status != ExitStatus::Exited(0) {
            return Err(BuildError::Step {
                index: 0,
                command: start.clone(),
                status: format!("{status:?}"),
                refused: refused(&vm),
            });
        }
    }
    if let Some(ready) = &spec.ready {
        say(BuildEvent::Step {
            name: format!("ready: {ready}"),
        });
        let end = Instant::now() + Duration::from_secs(spec.ready_timeout_s);
        loop {
            let out = client.run(shell(spec, ready)).map_err(agent_err("ready"))?;
            if out.status == ExitStatus::Exited(0) {
                break;
            }
            if Instant::now() > end {
                return Err(BuildError::NotReady {
                    command: ready.clone(),
                    timeout_s: spec.ready_timeout_s,
                    last: format!(
                        "{:?}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Read what sandboxes' first commands read into the snapshot's page cache; then write back
    // what the boot and the start command left dirty, so that no sandbox writes it again (its
    // kernel would, some 30 s after each restore, into each sandbox's own overlay).
    prime_page_cache(&client, spec);
    let _ = client.run(shell(spec, "sync"));
    drop(client);
    say(BuildEvent::Step {
        name: "snapshot".into(),
    });
    vm.pause().map_err(vm_err("pause"))?;
    vm.snapshot(files).map_err(vm_err("snapshot"))?;
    vm.kill();
    drop(vm);
    let _ = std::fs::remove_dir_all(files.dir.join("vm-snap"));
    Ok(())
}

/// Programs a sandbox's first command most often is or starts through: the shells (E2B's SDK
/// runs every command as `bash -l -c`) and the everyday ones of coreutils, grep and sed.
const FIRST_PROGRAMS: &str =
    "sh bash true env ls cat echo pwd id mkdir rm cp mv head tail wc sort grep sed";

/// Before the snapshot: puts what sandboxes' first commands read in the page cache, so that it
/// is in the snapshot, shared by every sandbox of the template (else each sandbox's first run of
/// one of them reads it from the disk into memory of its own, and so does every warm VM's
/// warm-up): the pool's warm-up, the files of [`FIRST_PROGRAMS`] the image has (each as `PATH`
/// finds it; `command -v` would name the shell's builtins instead) and a login `bash` (its
/// profile files). What fails here only leaves it out.
///
/// Warm VMs do not read these files again, though that would map their pages in each guest ahead
/// of a first command: in `bench pool` it took a handed-out sandbox's first `true` from 39 to 34
/// ms but an idle sandbox's PSS from 3.4 to 5.0 MiB (its private guest pages 2.7 -> 3.7 MiB),
/// over the 4 MiB goal; a read marks each page accessed on the guest kernel's LRU lists, likely
/// writing page structures all over the guest's memory map.
fn prime_page_cache(client: &Client, spec: &Spec) {
    crate::daemon::pool::warm_up(client, spec);
    let read = format!(
        "for p in {FIRST_PROGRAMS}; do IFS=:; set -- $PATH; unset IFS; \
         for d; do if [ -f \"$d/$p\" ]; then cat \"$d/$p\" >/dev/null; break; fi; done; done; \
         if command -v bash >/dev/null; then bash -l -c true; fi; true"
    );
    let _ = client.run(shell(spec, &read));
}

/// Restores the new snapshot once, as the pool will (clone step, then the pool's warm-up
/// commands), and stores the guest pages it touched as the template's working set, which every
/// later restore maps in before the guest runs. A snapshot that does not restore fails the build
/// here rather than in the pool.
fn record_working_set(
    spec: &Spec,
    inputs: &Inputs,
    files: &TemplateFiles,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<(), BuildError> {
    const STEP: &str = "working set";
    say(BuildEvent::Step { name: STEP.into() });
    let _ = std::fs::remove_file(&files.working_set);
    let dir = files.dir.join("vm-ws");
    let net = build_net(spec, inputs)?;
    let mut vm = VmProcess::spawn(&inputs.vmm, &dir, limits(spec), net).map_err(vm_err(STEP))?;
    vm.restore(files).map_err(vm_err(STEP))?;
    let env = sandbox_env(spec, &BTreeMap::new());
    let (client, _) =
        restore_connect(&vm.vsock, Instant::now() + BOOT_WAIT, env).map_err(agent_err(STEP))?;
    crate::daemon::pool::warm_up(&client, spec);
    vm.save_working_set(&files.working_set)
        .map_err(vm_err(STEP))?;
    drop(client);
    vm.kill();
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The network of a build VM of `spec`: a sandbox network with the spec's `build` policy (its
/// refusals in kilnd's log under `template-NAME`), unless kilnd runs without networks. The
/// snapshot VM gets one too, so the template's snapshot has `eth0` and any sandbox of it can be
/// given a network of its own.
fn build_net(spec: &Spec, inputs: &Inputs) -> Result<VmNet, BuildError> {
    if !inputs.net {
        return Ok(VmNet::none());
    }
    let policy = spec.build.check("build").map_err(BuildError::Policy)?;
    Ok(VmNet::create(&format!("template-{}", spec.name), policy)?)
}

/// What `vm`'s network refused so far, for a failed step's message (empty when nothing was).
fn refused(vm: &VmProcess) -> String {
    match vm.net().refusal_summary(5) {
        Some(list) => format!(
            "; the build's network refused {list} (the spec's [build] allow_domains or allow_net \
             say what the build may reach)"
        ),
        None => String::new(),
    }
}

/// The cgroup limits of a VM of `spec`.
pub fn limits(spec: &Spec) -> crate::jail::Limits {
    crate::jail::Limits {
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        background: false,
    }
}

/// Quotes `s` for `sh` in single quotes.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Builds `spec` into `files` (whose folder exists and is empty but for the marker).
pub fn build(
    spec: &Spec,
    inputs: &Inputs,
    files: &TemplateFiles,
    say: &mut dyn FnMut(BuildEvent),
) -> Result<(), BuildError> {
    make_rootfs(spec, inputs, files, say)?;
    if !spec.run.is_empty() {
        run_steps(spec, inputs, files, say)?;
    }
    snapshot(spec, inputs, files, say)?;
    record_working_set(spec, inputs, files, say)?;
    if inputs.net {
        std::fs::write(files.dir.join(super::NIC_MARKER), "eth0\n").map_err(|err| {
            BuildError::Store {
                path: files.dir.join(super::NIC_MARKER),
                err,
            }
        })?;
    }
    let spec_json = serde_json::to_vec_pretty(spec).unwrap_or_default();
    std::fs::write(files.dir.join("spec.json"), spec_json).map_err(|err| BuildError::Store {
        path: files.dir.join("spec.json"),
        err,
    })?;
    Ok(())
}

/// The environment a sandbox of `spec` starts its commands with: the template's, then the
/// sandbox's own over it.
pub fn sandbox_env(spec: &Spec, own: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    env.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn sandbox_env_sits_over_the_template_env() {
        let spec =
            Spec::parse("name = \"t\"\nenv = { A = \"1\", B = \"2\" }\n[from]\nimage = \"/x\"\n")
                .unwrap();
        let own = BTreeMap::from([("B".to_string(), "mine".to_string())]);
        let env = sandbox_env(&spec, &own);
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "mine");
    }
}
