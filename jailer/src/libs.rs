//! What a dynamically linked exec file needs besides itself: its program interpreter (ELF
//! `PT_INTERP`) and the shared libraries that interpreter would load. Firecracker's jailer expects
//! a static binary; Kiln's kiln-vmm is linked against glibc, so the jailer copies these into the
//! jail too (copies, like the binary, so the jail shares no inode with the host).
//!
//! The libraries are found by asking the interpreter itself (`ld.so --list`, what `ldd` does), with
//! the caller's `LD_LIBRARY_PATH` (read before the environment is cleared), and go to the
//! interpreter's first system search directory inside the jail, where it looks with an empty
//! environment and no `ld.so.cache`. A static exec file needs nothing.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where libraries go when the interpreter does not say (glibc searches it everywhere).
const FALLBACK_LIB_DIR: &str = "/lib";
/// ELF program header type of the interpreter's path.
const PT_INTERP: u32 = 3;

/// What must be copied into the jail next to the exec file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Deps {
    /// The interpreter's path, the same inside the jail as on the host; `None` for a static file.
    pub interpreter: Option<PathBuf>,
    /// The libraries: the name the interpreter looks for, and the host file holding it.
    pub libraries: Vec<(String, PathBuf)>,
    /// The jail directory the libraries go to.
    pub lib_dir: PathBuf,
}

/// Why the exec file's needs could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    /// The exec file cannot be read.
    #[error("cannot read {}: {err}", path.display())]
    Read {
        /// The exec file.
        path: PathBuf,
        /// What the OS said.
        err: io::Error,
    },
    /// Not a 64-bit little-endian ELF file.
    #[error("{} is not a 64-bit ELF executable", .0.display())]
    NotElf(PathBuf),
    /// The interpreter could not run or could not load the file.
    #[error("{} cannot list the libraries of {}: {why}", interpreter.display(), exec.display())]
    List {
        /// The interpreter.
        interpreter: PathBuf,
        /// The exec file.
        exec: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A library the exec file needs is nowhere to be found.
    #[error("{} needs {library}, which its loader cannot find (is LD_LIBRARY_PATH set?)", exec.display())]
    Missing {
        /// The exec file.
        exec: PathBuf,
        /// The library's name.
        library: String,
    },
}

/// The interpreter and libraries `exec` needs; `ld_library_path` is the caller's.
pub fn resolve(exec: &Path, ld_library_path: Option<OsString>) -> Result<Deps, LibsError> {
    let Some(interpreter) = interpreter_of(exec)? else {
        return Ok(Deps::default());
    };
    let run = |args: &[&std::ffi::OsStr]| {
        let mut cmd = Command::new(&interpreter);
        cmd.args(args).env_clear();
        if let Some(path) = &ld_library_path {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        cmd.output().map_err(|e| LibsError::List {
            interpreter: interpreter.clone(),
            exec: exec.to_path_buf(),
            why: e.to_string(),
        })
    };
    let listed = run(&["--list".as_ref(), exec.as_os_str()])?;
    let text = String::from_utf8_lossy(&listed.stdout);
    let libraries = parse_list(&text).map_err(|library| LibsError::Missing {
        exec: exec.to_path_buf(),
        library,
    })?;
    if !listed.status.success() {
        return Err(LibsError::List {
            interpreter: interpreter.clone(),
            exec: exec.to_path_buf(),
            why: format!(
                "{}: {}",
                listed.status,
                String::from_utf8_lossy(&listed.stderr).trim()
            ),
        });
    }
    let help = run(&["--help".as_ref()])?;
    let lib_dir = system_dir(&String::from_utf8_lossy(&help.stdout))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_LIB_DIR));
    Ok(Deps {
        interpreter: Some(interpreter),
        libraries,
        lib_dir,
    })
}

/// The `PT_INTERP` path of the ELF file at `path`, if it has one.
fn interpreter_of(path: &Path) -> Result<Option<PathBuf>, LibsError> {
    let read_err = |err| LibsError::Read {
        path: path.to_path_buf(),
        err,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0)
        .map_err(|_| LibsError::NotElf(path.to_path_buf()))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(LibsError::NotElf(path.to_path_buf()));
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(v)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        usize::from(u16_at(&header, 0x36)),
        u64::from(u16_at(&header, 0x38)),
    );
    if phentsize < 56 {
        return Err(LibsError::NotElf(path.to_path_buf()));
    }
    let mut ph = vec![0u8; phentsize];
    for i in 0..phnum {
        let at = phoff.saturating_add(i.saturating_mul(phentsize as u64));
        file.read_exact_at(&mut ph, at)
            .map_err(|_| LibsError::NotElf(path.to_path_buf()))?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
        let size = usize::try_from(size.min(4096)).unwrap_or(0);
        let mut interp = vec![0u8; size];
        file.read_exact_at(&mut interp, offset)
            .map_err(|_| LibsError::NotElf(path.to_path_buf()))?;
        let end = interp.iter().position(|b| *b == 0).unwrap_or(interp.len());
        let text = String::from_utf8_lossy(&interp[..end]).into_owned();
        return Ok(Some(PathBuf::from(text)));
    }
    Ok(None)
}

/// The libraries in `ld.so --list` output as (name, host path); `Err(name)` for one not found.
/// The vDSO and the interpreter's own line name no file to copy.
fn parse_list(text: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some((name, rest)) = line.split_once(" => ") else {
            continue;
        };
        let path = rest.split(" (0x").next().unwrap_or(rest).trim();
        if path == "not found" {
            return Err(name.trim().to_string());
        }
        if path.starts_with('/') {
            libs.push((name.trim().to_string(), PathBuf::from(path)));
        }
    }
    Ok(libs)
}

/// The first "(system search path)" directory in `ld.so --help` output.
fn system_dir(help: &str) -> Option<PathBuf> {
    help.lines()
        .find_map(|l| l.trim().strip_suffix("(system search path)"))
        .map(|dir| PathBuf::from(dir.trim()))
        .filter(|dir| dir.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output_gives_libraries_and_refuses_missing_ones() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd2b1f0000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0a1c5e0000)
\tlibc.so.6 => /kiln/lib/libc.so.6 (0x00007f0a1c3ff000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0a1c64b000)
";
        let libs = parse_list(text).unwrap();
        assert_eq!(
            libs,
            [
                (
                    "libgcc_s.so.1".to_string(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1")
                ),
                (
                    "libc.so.6".to_string(),
                    PathBuf::from("/kiln/lib/libc.so.6")
                ),
            ]
        );
        assert_eq!(
            parse_list("\tlibx.so.1 => not found\n").unwrap_err(),
            "libx.so.1"
        );
    }

    #[test]
    fn the_first_system_directory_is_where_libraries_go() {
        let help = "Shared library search path:
  (libraries located via /etc/ld.so.cache)
  /lib/x86_64-linux-gnu (system search path)
  /usr/lib/x86_64-linux-gnu (system search path)
  /lib (system search path)
";
        assert_eq!(
            system_dir(help),
            Some(PathBuf::from("/lib/x86_64-linux-gnu"))
        );
        assert_eq!(system_dir("nothing useful"), None);
    }

    #[test]
    fn this_test_binary_is_dynamic_and_its_libraries_are_found() {
        let exe = std::env::current_exe().unwrap();
        let deps = resolve(&exe, std::env::var_os("LD_LIBRARY_PATH")).unwrap();
        let interp = deps
            .interpreter
            .clone()
            .expect("a Rust test binary on glibc is dynamic");
        assert!(
            interp.is_absolute() && interp.exists(),
            "{}",
            interp.display()
        );
        assert!(
            deps.libraries
                .iter()
                .any(|(name, path)| name == "libc.so.6" && path.exists()),
            "{deps:?}"
        );
        assert!(deps.lib_dir.is_absolute());
        let text = std::env::temp_dir().join(format!("kiln-jailer-libs-{}", std::process::id()));
        std::fs::write(
            &text,
            "#!/bin/sh\necho not an ELF file, and long enough to hold a header\n",
        )
        .unwrap();
        let err = resolve(&text, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a 64-bit ELF executable", text.display())
        );
        std::fs::remove_file(&text).unwrap();
    }
}
