//! `kiln run --snapshot` and `kiln snapshot` on the host, with this test binary standing in for
//! `kiln-vmm` (see `fake_vmm`): the API requests kiln sends are parsed back with kiln-api's own
//! parser and compared field by field, and the agent requests are seen by a spy in front of the
//! real (in-process) agent. (`harness = false`: `main` is either the fake VMM or the tests.)

mod fake_vmm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_vmm::{CREATE_FAULT, LOAD_FAULT, Setup, gone, setup, temp_dir_of, text};
use kiln_agent::protocol::RestoreSpec;
use kiln_api::requests::snapshot::{
    MemBackend, MemBackendType, SnapshotCreate, SnapshotLoad, SnapshotType, VsockOverride,
};
use kiln_api::{ApiRequest, parse_request};

fn main() {
    fake_vmm::main(&[
        (
            "run_snapshot_loads_restores_then_runs",
            run_snapshot_loads_restores_then_runs,
        ),
        (
            "run_snapshot_reports_the_vmm_fault",
            run_snapshot_reports_the_vmm_fault,
        ),
        (
            "create_pauses_then_creates_and_load_sends_its_body",
            create_pauses_then_creates_and_load_sends_its_body,
        ),
        (
            "merge_folds_a_diff_into_the_base",
            merge_folds_a_diff_into_the_base,
        ),
        (
            "bad_input_is_named_before_anything_starts",
            bad_input_is_named_before_anything_starts,
        ),
        (
            "a_clone_with_a_network_gets_its_tap_and_eth0_settings",
            a_clone_with_a_network_gets_its_tap_and_eth0_settings,
        ),
    ]);
}

/// A snapshot directory `name` in `s`'s scratch dir holding the given files.
fn snapshot_dir(s: &Setup, name: &str, files: &[&str]) -> PathBuf {
    let dir = s.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in files {
        std::fs::write(dir.join(f), format!("{f} bytes")).unwrap();
    }
    dir
}

/// Parses a logged API request back with kiln-api's parser.
fn parsed((what, body): &(String, String)) -> ApiRequest {
    let (method, path) = what.split_once(' ').unwrap();
    parse_request(method, path, body.as_bytes()).unwrap()
}

/// The load request for the snapshot in `snap`, resumed, with its vsock at `uds`.
fn load_request(snap: &Path, uds: PathBuf, track_dirty_pages: bool) -> ApiRequest {
    ApiRequest::LoadSnapshot(SnapshotLoad {
        snapshot_path: snap.join("vmstate"),
        mem_backend: MemBackend {
            backend_type: MemBackendType::File,
            backend_path: snap.join("memory"),
        },
        track_dirty_pages,
        resume_vm: true,
        vsock_override: Some(VsockOverride { uds_path: uds }),
        network_overrides: Vec::new(),
        drive_overrides: Vec::new(),
        clock_realtime: false,
        working_set_path: None,
    })
}

/// `kiln run --snapshot SNAP ARGS...` with the fake VMM in `mode`.
fn run_snapshot(s: &Setup, mode: &str, snap: &Path, args: &[&str]) -> Output {
    let mut all = vec!["run", "--snapshot", snap.to_str().unwrap()];
    all.extend_from_slice(args);
    s.kiln(mode, &all).output().unwrap()
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn run_snapshot_loads_restores_then_runs() {
    let s = setup("snaprun");
    let snap = snapshot_dir(&s, "snap", &["vmstate", "memory"]);
    let before = SystemTime::now();
    let out = run_snapshot(
        &s,
        "agent",
        &snap,
        &[
            "--env",
            "K=from env",
            "--env",
            "X=1",
            "--",
            "sh",
            "-c",
            "echo \"$K\"; exit 4",
        ],
    );
    let after = SystemTime::now();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from env\n");

    // The VMM got only an API socket and the console, both in a private temp dir.
    let (pid, _, args) = s.vmm();
    let tmp = temp_dir_of(&args, "--api-sock");
    let expected: Vec<String> = [
        "--api-sock",
        tmp.join("api.sock").to_str().unwrap(),
        "--serial-out",
        tmp.join("console.log").to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    assert_eq!(args, expected);

    // Load, then the restored step with the --env values, then the command.
    let requests = s.api_requests();
    let whats: Vec<&str> = requests.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(
        whats,
        ["PUT /snapshot/load", "agent restored", "agent exec"]
    );
    assert_eq!(
        parsed(&requests[0]),
        load_request(&snap, tmp.join("vsock.sock"), false)
    );
    let restored: RestoreSpec = serde_json::from_str(&requests[1].1).unwrap();
    let want_env: BTreeMap<String, String> = [("K", "from env"), ("X", "1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(restored.env, want_env);
    let checked = restored.validate().unwrap();
    assert_eq!(checked.entropy.len(), 64);
    assert!(
        ns(before) <= restored.time_ns && restored.time_ns <= ns(after),
        "time_ns {} is not the host's time",
        restored.time_ns
    );
    assert_eq!(requests[2].1, r#"["sh","-c","echo \"$K\"; exit 4"]"#);

    // The VM was stopped and its temp dir removed; the snapshot is as it was.
    assert!(gone(pid), "the VMM outlived kiln");
    assert!(!tmp.exists(), "temp dir {} left behind", tmp.display());
    assert_eq!(
        std::fs::read_to_string(snap.join("memory")).unwrap(),
        "memory bytes"
    );

    // --json works the same way after a restore.
    let out = run_snapshot(&s, "agent", &snap, &["--json", "--", "echo", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("hi\n"), Some(0))
    );
}

fn run_snapshot_reports_the_vmm_fault() {
    let s = setup("snapfault");
    let snap = snapshot_dir(&s, "snap", &["vmstate", "memory"]);
    let out = run_snapshot(&s, "load-fault", &snap, &["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    let want = format!(
        "kiln: restoring the snapshot in {}: PUT /snapshot/load failed: {LOAD_FAULT}; ",
        snap.display()
    );
    assert!(err.starts_with(&want), "{err}");
    let console = err.trim_end().rsplit("console log: ").next().unwrap();
    let _ = std::fs::remove_file(console);
    let (pid, _, args) = s.vmm();
    assert!(gone(pid), "the VMM outlived kiln");
    assert!(!temp_dir_of(&args, "--api-sock").exists());

    // A VMM that dies at once.
    let out = run_snapshot(&s, "fail", &snap, &["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "kiln: restoring the snapshot in {}: kiln-vmm stopped before its API socket \
             answered; kiln-vmm exited with exit status: 1 (it said: kiln-vmm: guest memory: \
             out of memory)",
            snap.display()
        )),
        "{err}"
    );
    let console = err.trim_end().rsplit("console log: ").next().unwrap();
    let _ = std::fs::remove_file(console);
}

/// The fake VMM serving an API socket in `s`'s scratch dir, killed on drop.
struct ApiVmm(Child, PathBuf);

impl ApiVmm {
    fn start(s: &Setup, mode: &str) -> ApiVmm {
        let sock = s.dir.join(format!("{mode}.sock"));
        let child = Command::new(std::env::current_exe().unwrap())
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-out")
            .arg(s.dir.join("console.log"))
            .env("KILN_FAKE_VMM", mode)
            .env("KILN_FAKE_VMM_API_LOG", &s.api_log)
            .env_remove("KILN_FAKE_VMM_LOG")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < end,
                "the fake VMM's API socket never appeared"
            );
            thread::sleep(Duration::from_millis(10));
        }
        ApiVmm(child, sock)
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn snapshot(s: &Setup, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    let out = s.kiln("agent", &all).output().unwrap();
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    (out.status.code(), text(&out.stderr))
}

fn create_pauses_then_creates_and_load_sends_its_body() {
    let s = setup("snapcreate");
    let vmm = ApiVmm::start(&s, "agent");
    let sock = vmm.1.to_str().unwrap();
    let dir = s.dir.join("new/snap");
    let d = dir.to_str().unwrap();
    let create = |kind| {
        ApiRequest::CreateSnapshot(SnapshotCreate {
            snapshot_type: kind,
            snapshot_path: dir.join("vmstate"),
            mem_file_path: dir.join("memory"),
        })
    };
    let paused = ("PATCH /vm".to_string(), r#"{"state":"Paused"}"#.to_string());
    let resumed = (
        "PATCH /vm".to_string(),
        r#"{"state":"Resumed"}"#.to_string(),
    );

    // Running: paused, snapshotted (DIR created), resumed.
    let got = snapshot(&s, &["create", "--api-sock", sock, "--dir", d, "--resume"]);
    assert_eq!(got, (Some(0), String::new()));
    let requests = s.api_requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(requests[0], paused);
    assert_eq!(parsed(&requests[1]), create(SnapshotType::Full));
    assert_eq!(requests[2], resumed);
    assert!(dir.is_dir());

    // A diff, left paused; then, already paused, no second pause.
    assert_eq!(
        snapshot(&s, &["create", "--api-sock", sock, "--dir", d, "--diff"]).0,
        Some(0)
    );
    let requests = s.api_requests();
    assert_eq!(requests[0], paused);
    assert_eq!(parsed(&requests[1]), create(SnapshotType::Diff));
    assert_eq!(requests.len(), 2);
    assert_eq!(
        snapshot(&s, &["create", "--api-sock", sock, "--dir", d]).0,
        Some(0)
    );
    let requests = s.api_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(parsed(&requests[0]), create(SnapshotType::Full));

    // Load: the files, the new vsock socket (made absolute), the flags.
    let snap = snapshot_dir(&s, "loadme", &["vmstate", "memory"]);
    let got = snapshot(
        &s,
        &[
            "load",
            "--api-sock",
            sock,
            "--dir",
            snap.to_str().unwrap(),
            "--vsock-uds",
            s.dir.join("clone.sock").to_str().unwrap(),
            "--resume",
            "--track-dirty-pages",
        ],
    );
    assert_eq!(got, (Some(0), String::new()));
    let requests = s.api_requests();
    assert_eq!(
        parsed(&requests[0]),
        load_request(&snap, s.dir.join("clone.sock"), true)
    );
    drop(vmm);

    // The VMM's refusal is printed with the request that failed; exit 1.
    let vmm = ApiVmm::start(&s, "create-fault");
    let sock = vmm.1.to_str().unwrap();
    let got = snapshot(&s, &["create", "--api-sock", sock, "--dir", d, "--resume"]);
    assert_eq!(
        got,
        (
            Some(1),
            format!("kiln: PUT /snapshot/create failed: {CREATE_FAULT}\n")
        )
    );
    // It was still resumed, as asked.
    assert_eq!(s.api_requests().last(), Some(&resumed));
}

fn merge_folds_a_diff_into_the_base() {
    let s = setup("snapmerge");
    let (base, diff) = (s.dir.join("base.mem"), s.dir.join("diff.mem"));
    std::fs::write(&base, vec![b'a'; 8192]).unwrap();
    // The diff's first page is a hole ("not dirty"), its second page is data.
    let f = std::fs::File::create(&diff).unwrap();
    f.set_len(8192).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b'b'; 4096], 4096).unwrap();
    drop(f);
    let got = snapshot(
        &s,
        &["merge", base.to_str().unwrap(), diff.to_str().unwrap()],
    );
    assert_eq!(got, (Some(0), String::new()));
    let merged = std::fs::read(&base).unwrap();
    assert!(merged[..4096].iter().all(|b| *b == b'a'));
    assert!(merged[4096..].iter().all(|b| *b == b'b'));

    let missing = s.dir.join("nope.mem");
    let got = snapshot(
        &s,
        &["merge", base.to_str().unwrap(), missing.to_str().unwrap()],
    );
    assert_eq!(
        got,
        (
            Some(2),
            format!(
                "kiln: merging into {}: memory file {} does not exist\n",
                base.display(),
                missing.display()
            )
        )
    );
}

fn bad_input_is_named_before_anything_starts() {
    let s = setup("snapbad");
    let only_vmstate = snapshot_dir(&s, "half", &["vmstate"]);
    let only_memory = snapshot_dir(&s, "other-half", &["memory"]);
    let nowhere = s.dir.join("nowhere");
    let run = |dir: &Path, args: &[&str]| {
        let out = run_snapshot(&s, "agent", dir, args);
        (out.status.code(), text(&out.stderr))
    };
    assert_eq!(
        run(&only_vmstate, &["--", "true"]),
        (
            Some(125),
            format!(
                "kiln: snapshot {} has no memory: {}: No such file or directory (os error 2)\n",
                only_vmstate.display(),
                only_vmstate.join("memory").display()
            )
        )
    );
    assert!(run(&only_memory, &["--", "true"]).1.starts_with(&format!(
        "kiln: snapshot {} has no vmstate: ",
        only_memory.display()
    )));
    assert_eq!(
        run(&nowhere, &["--", "true"]),
        (
            Some(125),
            format!(
                "kiln: snapshot directory {} does not exist or is not a directory\n",
                nowhere.display()
            )
        )
    );
    assert_eq!(
        run(&only_vmstate, &["--bogus", "--", "true"]),
        (Some(125), "kiln: unknown option --bogus\n".to_string())
    );
    assert_eq!(
        run(&only_vmstate, &["--vcpus", "2", "--", "true"]).1,
        "kiln: --vcpus cannot be used with --snapshot: the snapshot fixes the machine\n"
    );
    assert!(!s.log.exists(), "a VMM was started");

    // `kiln snapshot`: bad input exits 2, an unreachable VMM 1.
    let half = only_vmstate.to_str().unwrap();
    let sock = s.dir.join("none.sock");
    let sock = sock.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["create", "--api-sock", sock],
            2,
            "kiln snapshot create needs --dir DIR",
        ),
        (
            &["load", "--dir", half],
            2,
            "kiln snapshot load needs --api-sock SOCK",
        ),
        (
            &["create", "--api-sock", sock, "--dir", half, "--bogus"],
            2,
            "unknown option --bogus for kiln snapshot create",
        ),
        (
            &["frob"],
            2,
            "unknown snapshot command \"frob\" (create, load or merge)",
        ),
        (
            &["merge", "base"],
            2,
            "kiln snapshot merge needs at least one DIFF_MEM after BASE_MEM",
        ),
        (
            &["load", "--api-sock", sock, "--dir", half],
            2,
            &format!(
                "snapshot {half} has no memory: {}: No such file or directory (os error 2)",
                only_vmstate.join("memory").display()
            ),
        ),
        (
            &["create", "--api-sock", sock, "--dir", half],
            1,
            "cannot reach the VMM's API socket: cannot connect to API socket",
        ),
    ];
    for (args, code, message) in cases {
        let (got_code, err) = snapshot(&s, args);
        assert_eq!(got_code, Some(*code), "{args:?}: {err}");
        assert!(
            err.starts_with(&format!("kiln: {message}")),
            "{args:?}: {err}"
        );
    }
    let (code, usage) = {
        let out = s.kiln("agent", &["snapshot", "--help"]).output().unwrap();
        (out.status.code(), text(&out.stdout))
    };
    assert_eq!(code, Some(0));
    assert!(usage.starts_with("usage: kiln snapshot create"), "{usage}");
}

fn a_clone_with_a_network_gets_its_tap_and_eth0_settings() {
    let s = setup("snapnet");
    let snap = snapshot_dir(&s, "snap", &["vmstate", "memory"]);
    let out = run_snapshot(
        &s,
        "agent",
        &snap,
        &["--allow-domain", "pypi.org", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let requests = s.api_requests();
    let ApiRequest::LoadSnapshot(load) = parsed(&requests[0]) else {
        panic!("{requests:?}")
    };
    assert_eq!(load.network_overrides.len(), 1);
    assert_eq!(
        (
            load.network_overrides[0].iface_id.as_str(),
            load.network_overrides[0].host_dev_name.as_str()
        ),
        ("eth0", "kiln0"),
        "the clone's interface moves to its own sandbox's TAP"
    );
    let restored: RestoreSpec = serde_json::from_str(&requests[1].1).unwrap();
    let net = restored
        .validate()
        .unwrap()
        .net
        .expect("eth0 settings in the clone step");
    assert_eq!(
        (net.address.to_string(), net.prefix, net.gateway.to_string()),
        ("172.16.0.2".to_string(), 30, "172.16.0.1".to_string())
    );
    // Without a network the clone step carries none, and no override is sent.
    let out = run_snapshot(&s, "agent", &snap, &["--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let requests = s.api_requests();
    let restored: RestoreSpec = serde_json::from_str(&requests[1].1).unwrap();
    assert_eq!(restored.net, None);
    let load: serde_json::Value = serde_json::from_str(&requests[0].1).unwrap();
    assert_eq!(
        load["network_overrides"],
        serde_json::json!([]),
        "{}",
        requests[0].1
    );
}
