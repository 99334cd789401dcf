//! `kiln snapshot`: create and load snapshots through a `kiln-vmm` API socket, and merge diff
//! memory files into a full one. A snapshot is a directory holding `vmstate` (the VM state) and
//! `memory` (guest memory); [`SnapshotFiles`] names them, and is also what `kiln run --snapshot`
//! checks before it starts anything.

pub mod args;
pub mod reclaim;

use std::path::{Path, PathBuf};

use kiln_api::requests::instance::InstanceState;
use kiln_api::requests::snapshot::{
    MemBackend, MemBackendType, SnapshotCreate, SnapshotLoad, SnapshotType, VsockOverride,
};
use kiln_api::requests::vm::VmState;
use kiln_snapshot::MemFileError;

use crate::api::{self, Api, ApiError};
use args::SnapshotCommand;

/// The VM state file's name in a snapshot directory.
pub const VMSTATE: &str = "vmstate";
/// The guest memory file's name in a snapshot directory.
pub const MEMORY: &str = "memory";

/// Exit status for bad input.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit status when the VMM or a file operation failed.
pub const EXIT_FAILED: i32 = 1;

/// Why a `kiln snapshot` command failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// A snapshot file (or the directory) is missing or not a file.
    #[error("{0}")]
    Missing(String),
    /// The snapshot directory could not be created.
    #[error("creating snapshot directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest could not drop its caches before the snapshot.
    #[error("{0}")]
    Reclaim(String),
    /// The VMM refused or did not answer.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Merging memory files failed.
    #[error("merging into {}: {source}", base.display())]
    Merge {
        /// The full memory file.
        base: PathBuf,
        /// Why.
        source: MemFileError,
    },
}

impl SnapshotError {
    /// The exit status: 2 for bad input, 1 for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            SnapshotError::Usage(_) | SnapshotError::Missing(_) => EXIT_BAD_INPUT,
            SnapshotError::Merge {
                source:
                    MemFileError::Missing(_)
                    | MemFileError::NotAFile(_)
                    | MemFileError::DiffLargerThanBase { .. },
                ..
            } => EXIT_BAD_INPUT,
            _ => EXIT_FAILED,
        }
    }
}

/// The files of a snapshot directory, as absolute paths (the VMM does not share our directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// `DIR`.
    pub dir: PathBuf,
    /// `DIR/vmstate`.
    pub vmstate: PathBuf,
    /// `DIR/memory`.
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// The files `dir` will hold; nothing is checked.
    pub fn in_dir(dir: &Path) -> Result<SnapshotFiles, String> {
        let dir = api::absolute(dir)?;
        Ok(SnapshotFiles {
            vmstate: dir.join(VMSTATE),
            memory: dir.join(MEMORY),
            dir,
        })
    }

    /// The files of the existing snapshot in `dir`; an error names the one that is missing.
    pub fn existing(dir: &Path) -> Result<SnapshotFiles, String> {
        if !dir.is_dir() {
            return Err(format!(
                "snapshot directory {} does not exist or is not a directory",
                dir.display()
            ));
        }
        let files = SnapshotFiles::in_dir(dir)?;
        for (name, path) in [(VMSTATE, &files.vmstate), (MEMORY, &files.memory)] {
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(format!("snapshot {name} {} is not a file", path.display())),
                Err(e) => {
                    return Err(format!(
                        "snapshot {} has no {name}: {}: {e}",
                        dir.display(),
                        path.display()
                    ));
                }
            }
        }
        Ok(files)
    }

    /// The `PUT /snapshot/load` body for these files.
    pub fn load_body(
        &self,
        resume_vm: bool,
        vsock_uds: Option<PathBuf>,
        track_dirty_pages: bool,
    ) -> SnapshotLoad {
        SnapshotLoad {
            snapshot_path: self.vmstate.clone(),
            mem_backend: MemBackend {
                backend_type: MemBackendType::File,
                backend_path: self.memory.clone(),
            },
            track_dirty_pages,
            resume_vm,
            vsock_override: vsock_uds.map(|uds_path| VsockOverride { uds_path }),
            network_overrides: Vec::new(),
            drive_overrides: Vec::new(),
            clock_realtime: false,
            working_set_path: None,
        }
    }
}

/// Runs `kiln snapshot` with the words after `snapshot`; returns the exit status.
pub fn main(words: &[String]) -> i32 {
    let result = args::parse(words)
        .map_err(SnapshotError::Usage)
        .and_then(run);
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn run(command: SnapshotCommand) -> Result<(), SnapshotError> {
    match command {
        SnapshotCommand::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        SnapshotCommand::Create {
            api_sock,
            dir,
            diff,
            resume,
            reclaim,
        } => {
            if let Some(uds) = reclaim {
                let state = Api::connect(&api_sock)?.state()?;
                if state != InstanceState::Running {
                    return Err(SnapshotError::Reclaim(format!(
                        "--reclaim needs a running VM to drop its caches; it is {state:?}"
                    )));
                }
                let took = reclaim::reclaim(&uds).map_err(SnapshotError::Reclaim)?;
                eprintln!(
                    "kiln: the guest dropped its caches and compacted in {} ms",
                    took.as_millis()
                );
            }
            create(&api_sock, &dir, diff, resume)
        }
        SnapshotCommand::Load {
            api_sock,
            dir,
            resume,
            vsock_uds,
            track_dirty_pages,
        } => {
            let files = SnapshotFiles::existing(&dir).map_err(SnapshotError::Missing)?;
            let uds = vsock_uds
                .map(|p| api::absolute(&p))
                .transpose()
                .map_err(SnapshotError::Usage)?;
            let body = files.load_body(resume, uds, track_dirty_pages);
            Api::connect(&api_sock)?.load_snapshot(&body)?;
            Ok(())
        }
        SnapshotCommand::Merge { base, diffs } => kiln_snapshot::memfile::merge(&base, &diffs)
            .map(drop)
            .map_err(|source| SnapshotError::Merge { base, source }),
    }
}

/// Pauses the VM if it runs, writes its snapshot to `dir`, and with `resume` runs it again
/// afterwards, even when the snapshot failed (whose error is the one reported).
fn create(api_sock: &Path, dir: &Path, diff: bool, resume: bool) -> Result<(), SnapshotError> {
    let files = SnapshotFiles::in_dir(dir).map_err(SnapshotError::Usage)?;
    let mut api = Api::connect(api_sock)?;
    let state = api.state()?;
    if state == InstanceState::Running {
        api.set_state(VmState::Paused)?;
    }
    let created = std::fs::create_dir_all(dir)
        .map_err(|source| SnapshotError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })
        .and_then(|()| {
            let body = SnapshotCreate {
                snapshot_type: if diff {
                    SnapshotType::Diff
                } else {
                    SnapshotType::Full
                },
                snapshot_path: files.vmstate.clone(),
                mem_file_path: files.memory.clone(),
            };
            Ok(api.create_snapshot(&body)?)
        });
    if resume && state != InstanceState::NotStarted {
        let resumed = api.set_state(VmState::Resumed);
        // The snapshot's own failure is the one to report.
        created?;
        resumed?;
        return Ok(());
    }
    created
}
