#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! The CLI tests' stand-in for `kiln-vmm` ([`vmm`], which kilnd's tests use too) and the helpers
//! that run `kiln` against it.

mod vmm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use vmm::*;

// ---- helpers for the tests ----

/// A scratch directory with a fake kernel and rootfs, and where the fake VMM's logs go.
pub struct Setup {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub log: PathBuf,
    pub api_log: PathBuf,
}

pub fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, rootfs) = (dir.join("vmlinux"), dir.join("rootfs.ext4"));
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&rootfs, b"rootfs").unwrap();
    Setup {
        log: dir.join("vmm-args.log"),
        api_log: dir.join("vmm-api.log"),
        dir,
        kernel,
        rootfs,
    }
}

impl Setup {
    /// `kiln ARGS` with this test binary as the VMM in `mode`.
    pub fn kiln(&self, mode: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args)
            .env("KILN_VMM", std::env::current_exe().unwrap())
            .env("KILN_FAKE_VMM", mode)
            .env("KILN_FAKE_VMM_LOG", &self.log)
            .env("KILN_FAKE_VMM_API_LOG", &self.api_log)
            .env_remove("KILN_KERNEL")
            .env_remove("KILN_ROOTFS")
            .stdin(Stdio::null());
        cmd
    }

    /// `kiln run --kernel K --rootfs R ARGS`.
    pub fn command(&self, mode: &str, args: &[&str]) -> Command {
        let mut cmd = self.kiln(mode, &["run"]);
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(args);
        cmd
    }

    pub fn run(&self, mode: &str, args: &[&str]) -> Output {
        self.command(mode, args).output().unwrap()
    }

    /// The fake VMM's pid, signal mask line and arguments.
    pub fn vmm(&self) -> (u32, String, Vec<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap();
        let mut lines = text.lines();
        let pid = lines
            .next()
            .unwrap()
            .strip_prefix("pid ")
            .unwrap()
            .parse()
            .unwrap();
        let blocked = lines.next().unwrap().to_string();
        (pid, blocked, lines.map(String::from).collect())
    }

    /// The API and agent requests the fake VMM logged, as (what, JSON body); emptied.
    pub fn api_requests(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.api_log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.api_log);
        text.lines()
            .map(|l| {
                let mut words = l.splitn(3, ' ');
                let what = format!("{} {}", words.next().unwrap(), words.next().unwrap());
                (what, words.next().unwrap().to_string())
            })
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits up to 5 s for `pid` to be gone (or a zombie).
pub fn gone(pid: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The VM's temp dir, from the socket path in the VMM's arguments after `flag`.
pub fn temp_dir_of(args: &[String], flag: &str) -> PathBuf {
    let value = &args[args.iter().position(|a| a == flag).unwrap() + 1];
    let path = value.split_once("uds=").map_or(value.as_str(), |(_, p)| p);
    Path::new(path).parent().unwrap().to_path_buf()
}
