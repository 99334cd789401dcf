//! The E2B SDK suite against kilnd on the host with the stand-in VMM (`cargo xtask test
//! --e2b-host`, and the host stage of `cargo xtask test`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, random_key, venv};
use crate::util::{self, Result};

/// The stand-in VMM's "guest" is the host: tests that need a VM of their own (memory apart for
/// forks, a filesystem apart from the machine kilnd runs on) are marked `vm` and left to the lab.
const HOST_MARKS: &str = "not vm";

/// Builds kilnd, `kiln` and the stand-in VMM (debug, as `cargo test` does): their paths.
fn host_programs() -> Result<Vec<PathBuf>> {
    crate::sdk::build_executables(
        &[
            "--package",
            "kiln-pool",
            "--bin",
            "kilnd",
            "--example",
            "fake_vmm",
            "--package",
            "kiln-cli",
            "--bin",
            "kiln",
        ],
        &["kilnd", "kiln", "fake_vmm"],
    )
}

/// kilnd on the host, stopped (SIGTERM, so it ends its stand-in VMs) when dropped.
struct HostKilnd(std::process::Child);

impl Drop for HostKilnd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo xtask test` (host stage): the suite against kilnd on the host with the stand-in VMM
/// (the real agent code in-process), so protocol breakage shows in seconds, before the lab; the
/// tests marked `vm` run only in the lab. FILTER is pytest's `-k`.
pub fn run_host_suite(filter: Option<&str>) -> Result<()> {
    let venv = venv()?;
    let programs = host_programs()?;
    let [kilnd, kiln, vmm] = &programs[..] else {
        return Err("cargo reported fewer programs than asked for".into());
    };
    let dir = util::cache_dir().join("e2b-host");
    let _ = std::fs::remove_dir_all(&dir);
    util::mkdir(&dir.join("tree/etc"))?;
    let write = |name: &str, bytes: &[u8]| util::write_atomic(&dir.join(name), bytes);
    // The stand-in boots nothing: any kernel and agent file will do.
    write("vmlinux", b"kernel")?;
    write("agent", &[0x7f; 4096])?;
    write(
        "base.toml",
        format!(
            "name = \"base\"\n[from]\ndir = \"{}\"\n",
            dir.join("tree").display()
        )
        .as_bytes(),
    )?;
    let key = random_key()?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("kilnd.log"))
        .map_err(|e| format!("cannot create {}: {e}", dir.join("kilnd.log").display()))?;
    let sock = dir.join("state/kilnd.sock");
    let _daemon = HostKilnd(
        Command::new(kilnd)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--vmm")
            .arg(vmm)
            .arg("--kernel")
            .arg(dir.join("vmlinux"))
            .arg("--agent")
            .arg(dir.join("agent"))
            .arg("--no-jail")
            .args(["--e2b-listen", &format!("127.0.0.1:{port}")])
            .env("KILND_E2B_API_KEY", &key)
            .env("KILN_FAKE_VMM", "agent")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kilnd.display()))?,
    );
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > end {
            return Err(format!(
                "kilnd made no {} within 30 s (its log: {})",
                sock.display(),
                dir.join("kilnd.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    util::run(
        Command::new(kiln)
            .args(["template", "build"])
            .arg(dir.join("base.toml"))
            .env("KILND_SOCKET", &sock),
    )?;
    let url = format!("http://127.0.0.1:{port}");
    let mut pytest = Command::new(venv.join("bin/python"));
    pytest
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            HOST_MARKS,
        ])
        .arg(util::workspace_root().join("tests/e2b"))
        .env("E2B_API_KEY", &key)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    if let Some(f) = filter {
        pytest.args(["-k", f]);
    }
    util::run(&mut pytest).map_err(|e| {
        format!(
            "the E2B SDK suite failed against kilnd on the host: {e} (kilnd's log: {})",
            dir.join("kilnd.log").display()
        )
    })
}
