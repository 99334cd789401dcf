//! The balloon and free page reporting end to end, inside the nested lab: memory a guest frees
//! goes back to the host, from a booted VM (holes punched in its memfd) and from a restored one
//! (its private copies dropped); the API's target inflates and deflates the balloon and the guest
//! sees it; deflate_on_oom lets an allocation past what is left succeed; a snapshot taken after a
//! workload leaves the freed memory out and restores with the guest's state intact, from a booted
//! VM and from a restored one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent::client::{Client, wait_ready};
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use kiln_tests::memory::{HostMemory, host_memory, settled_memory, wait_for_memory};
use kiln_tests::{
    ApiVmm, ScratchDir, guest_kernel, kiln_vmm, kiln_vmm_rootfs, rootfs, sh, snapshot_create_body,
    snapshot_load_body,
};

/// `kiln run`'s command line: the agent as init over a tmpfs overlay.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet init=/usr/sbin/kiln-agent KILN_OVERLAY=tmpfs";
const AGENT_WAIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// Guest memory and the workload the issue names.
const MEM_MIB: u32 = 512;
const WORKLOAD_MIB: u64 = 300;
/// How long freed memory may take to come back (Linux reports 2 s after freeing; the lab's
/// emulated CPUs are slow).
const GIVE_BACK: Duration = Duration::from_secs(60);

/// Boots the rootfs with the agent, `MEM_MIB` of memory and `--balloon spec`.
fn boot(dir: &Path, name: &str, balloon: &str, extra_cmdline: &str) -> (ApiVmm, PathBuf) {
    let uds = dir.join(format!("{name}.vsock"));
    let cmdline = format!("{CMDLINE} {extra_cmdline}");
    let mut cmd = kiln_vmm_rootfs(&rootfs(), true, &uds, MEM_MIB, cmdline.trim_end());
    cmd.args(["--balloon", balloon])
        .arg("--serial-out")
        .arg(dir.join(format!("{name}.console")));
    (ApiVmm::start(cmd, &dir.join(format!("{name}.api"))), uds)
}

/// The agent, once it answers, with Python loaded once: the page cache it fills stays, and
/// belongs in the idle level the workload is compared with.
fn agent(uds: &Path) -> Client {
    let client = wait_ready(uds, Instant::now() + AGENT_WAIT).expect("the agent answers");
    sh(&client, "python3 -c 'import time'");
    client
}

/// Runs a Python process that writes every page of `mib` MiB and exits.
fn workload(client: &Client, mib: u64) {
    sh(
        client,
        &format!("python3 -c 'b = bytes([1]) * ({mib} << 20)'"),
    );
}

/// Starts a Python process holding `mib` MiB it wrote, and returns once it holds them;
/// [`release`] ends it.
fn hold(client: &Client, mib: u64) {
    sh(
        client,
        &format!(
            "setsid python3 -c 'import time; b = bytes([1]) * ({mib} << 20); open(\"/tmp/held\", \"w\").close(); time.sleep(3600)' </dev/null >/dev/null 2>&1 &
             echo $! > /tmp/hold.pid
             while [ ! -e /tmp/held ]; do sleep 0.1; done; rm /tmp/held"
        ),
    );
}

/// Ends the process [`hold`] started and waits until it is gone.
fn release(client: &Client) {
    sh(
        client,
        "p=$(cat /tmp/hold.pid); kill $p; while [ -e /proc/$p ]; do sleep 0.1; done",
    );
}

/// A line of the guest's /proc/meminfo, bytes.
fn meminfo(client: &Client, key: &str) -> u64 {
    let text = sh(client, "cat /proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {key} in the guest's meminfo:\n{text}"))
}

fn mib(b: u64) -> f64 {
    HostMemory::mib(b)
}

/// The guest memory a booted VM holds on the host: its memfd's blocks.
fn memfd(m: &HostMemory) -> u64 {
    m.memfd.expect("a booted kiln-vmm has a guest memory memfd")
}

/// Checks that `peak` held the workload and `after` gave it back, relative to `idle`.
fn assert_given_back(what: &str, idle: u64, peak: u64, after: u64, took: Option<Duration>) {
    eprintln!(
        "{what}: idle {:.1} MiB, holding {WORKLOAD_MIB} MiB {:.1} MiB, after {:.1} MiB ({:.2}x idle) in {took:?}",
        mib(idle),
        mib(peak),
        mib(after),
        after as f64 / idle as f64
    );
    assert!(
        peak >= idle + (WORKLOAD_MIB - 20) * MIB,
        "{what}: the workload did not show on the host ({:.1} -> {:.1} MiB)",
        mib(idle),
        mib(peak)
    );
    assert!(
        took.is_some(),
        "{what}: host memory stayed at {:.1} MiB {GIVE_BACK:?} after the workload (idle {:.1})",
        mib(after),
        mib(idle)
    );
}

/// Host memory is back near idle: within a tenth of the workload of it.
fn near_idle(idle: u64) -> impl Fn(u64) -> bool {
    move |now| now <= idle + WORKLOAD_MIB * MIB / 10
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn balloon_booted_vm_gives_freed_memory_back() {
    let scratch = ScratchDir::new("balloon-booted");
    let (vm, uds) = boot(scratch.path(), "booted", "free_page_reporting", "");
    let client = agent(&uds);
    let pid = vm.pid();
    let idle = settled_memory(pid, memfd, Duration::from_secs(5), 2 * MIB, GIVE_BACK).unwrap();
    hold(&client, WORKLOAD_MIB);
    let peak = host_memory(pid).unwrap();
    release(&client);
    let close = near_idle(memfd(&idle));
    let (after, took) = wait_for_memory(pid, GIVE_BACK, |m| close(memfd(m))).unwrap();
    assert_given_back("memfd", memfd(&idle), memfd(&peak), memfd(&after), took);
    assert!(
        after.rss <= idle.rss + WORKLOAD_MIB * MIB / 10,
        "the resident set fell back too: {idle} -> {after}"
    );
    // And again: reporting keeps working.
    workload(&client, WORKLOAD_MIB);
    let (again, took) = wait_for_memory(pid, GIVE_BACK, |m| close(memfd(m))).unwrap();
    assert!(
        took.is_some(),
        "a second workload was not given back: {again}"
    );
}

/// A restored VM gives back what it frees, as a booted one does; and its next snapshot leaves
/// out what it freed even where the memory file underneath still holds old data (the template
/// was taken holding the workload), which KVM's dirty log is not on to tell: the page map is.
#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn balloon_restored_vm_gives_freed_memory_back() {
    let scratch = ScratchDir::new("balloon-restored");
    let dir = scratch.path();
    let (state, mem) = (dir.join("held.state"), dir.join("held.mem"));
    {
        let (vm, uds) = boot(dir, "template", "free_page_reporting", "");
        let client = agent(&uds);
        hold(&client, WORKLOAD_MIB);
        vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        vm.ok(
            "PUT",
            "/snapshot/create",
            &snapshot_create_body(&state, &mem, "Full"),
        );
    }
    let (state2, mem2) = (dir.join("again.state"), dir.join("again.mem"));
    let sum;
    {
        let uds = dir.join("clone.vsock");
        let vm = ApiVmm::start(kiln_vmm(), &dir.join("clone.api"));
        vm.ok(
            "PUT",
            "/snapshot/load",
            &snapshot_load_body(&state, &mem, false, &uds),
        );
        let client = agent(&uds);
        // The template's workload ends: its pages are free in the guest, old data in the file.
        release(&client);
        let pid = vm.pid();
        // A restored VM's guest memory is a private mapping of the memory file: what the guest
        // writes is anonymous memory of the process.
        let anon = |m: &HostMemory| m.anon;
        let idle = settled_memory(pid, anon, Duration::from_secs(5), 2 * MIB, GIVE_BACK).unwrap();
        assert_eq!(idle.memfd, None, "restored memory is the file, not a memfd");
        hold(&client, WORKLOAD_MIB);
        let peak = host_memory(pid).unwrap();
        release(&client);
        let close = near_idle(idle.anon);
        let (after, took) = wait_for_memory(pid, GIVE_BACK, |m| close(m.anon)).unwrap();
        assert_given_back("anonymous", idle.anon, peak.anon, after.anon, took);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let mem_name = mem.to_string_lossy().into_owned();
        let mappings = maps.lines().filter(|l| l.ends_with(&mem_name)).count();
        assert_eq!(mappings, 1, "the memory file is still one mapping:\n{maps}");

        // Pages written after they were given back must stay in the next snapshot.
        sum = sh(
            &client,
            "head -c 16777216 /dev/urandom > /tmp/data && sha256sum /tmp/data",
        );
        vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        vm.ok(
            "PUT",
            "/snapshot/create",
            &snapshot_create_body(&state2, &mem2, "Full"),
        );
    }
    let (held, again) = (allocated(&mem), allocated(&mem2));
    eprintln!(
        "restored VM: the template holding {WORKLOAD_MIB} MiB {:.1} MiB, its snapshot after the workload ended {:.1} MiB",
        mib(held),
        mib(again)
    );
    assert!(
        again + 200 * MIB <= held,
        "the freed workload was left out: {:.1} MiB, the template {:.1} MiB",
        mib(again),
        mib(held)
    );
    let uds = dir.join("again.vsock");
    let vm = ApiVmm::start(kiln_vmm(), &dir.join("again.api"));
    vm.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(&state2, &mem2, false, &uds),
    );
    let client = agent(&uds);
    assert_eq!(
        sh(&client, "sha256sum /tmp/data"),
        sum,
        "the file written after the pages came back survived"
    );
    workload(&client, WORKLOAD_MIB);
}

/// The balloon's statistics, as JSON.
fn stats(vm: &ApiVmm) -> serde_json::Value {
    let (code, body) = vm.call("GET", "/balloon/statistics", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the guest holds `target` MiB in its balloon.
fn wait_actual(vm: &ApiVmm, cond: impl Fn(u64) -> bool, what: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = stats(vm);
        if s["actual_mib"].as_u64().is_some_and(&cond) {
            return s;
        }
        assert!(start.elapsed() < GIVE_BACK, "the balloon never {what}: {s}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn balloon_api_inflates_deflates_and_deflate_on_oom_lets_an_allocation_through() {
    let scratch = ScratchDir::new("balloon-api");
    let dir = scratch.path();
    let (sock, uds) = (dir.join("vm.api"), dir.join("vm.vsock"));
    let mut cmd = kiln_vmm();
    cmd.arg("--serial-out").arg(dir.join("vm.console"));
    let vm = ApiVmm::start(cmd, &sock);
    // Configured over the API, as a Firecracker client would; no reporting, so only the balloon
    // gives memory back, and no zram, so only the balloon can make room.
    vm.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{CMDLINE} kiln.zram=off"}}"#,
            guest_kernel().display()
        ),
    );
    vm.ok(
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}}}"#),
    );
    vm.ok(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            rootfs().display()
        ),
    );
    vm.ok(
        "PUT",
        "/vsock",
        &format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display()),
    );
    vm.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    );
    vm.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let client = agent(&uds);
    let pid = vm.pid();
    let (code, body) = vm.call("GET", "/balloon", None);
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["deflate_on_oom"], true);
    assert_eq!(config["amount_mib"], 0);
    let (code, body) = vm.call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": true}"#),
    );
    assert_eq!(code, 400, "PUT after boot: {body}");

    // Dirty the guest's memory first, so the balloon has host memory to give back.
    workload(&client, WORKLOAD_MIB);
    let before_host =
        settled_memory(pid, memfd, Duration::from_secs(3), 2 * MIB, GIVE_BACK).unwrap();
    let before_avail = meminfo(&client, "MemAvailable");
    let total = meminfo(&client, "MemTotal");

    vm.ok("PATCH", "/balloon", r#"{"amount_mib": 200}"#);
    let s = wait_actual(&vm, |a| a == 200, "reached 200 MiB");
    assert_eq!(
        (s["target_mib"].as_u64(), s["target_pages"].as_u64()),
        (Some(200), Some(200 * 256))
    );
    let inflated_avail = meminfo(&client, "MemAvailable");
    let inflated_host = host_memory(pid).unwrap();
    eprintln!(
        "inflated to 200 MiB: guest MemAvailable {:.0} -> {:.0} MiB, host memfd {:.1} -> {:.1} MiB",
        mib(before_avail),
        mib(inflated_avail),
        mib(memfd(&before_host)),
        mib(memfd(&inflated_host))
    );
    assert!(
        before_avail - inflated_avail >= 180 * MIB,
        "the guest lost less than 180 MiB to the balloon"
    );
    assert!(
        memfd(&before_host) - memfd(&inflated_host) >= 150 * MIB,
        "the host got less than 150 MiB back: {before_host} -> {inflated_host}"
    );
    // The guest's statistics arrive with Firecracker's names.
    let s = wait_actual(&vm, |_| true, "answered");
    assert_eq!(s["total_memory"].as_u64(), Some(total), "{s}");
    for key in [
        "free_memory",
        "available_memory",
        "major_faults",
        "minor_faults",
        "swap_in",
    ] {
        assert!(s[key].is_u64(), "{key} missing from {s}");
    }

    // Past what is left: only a deflating balloon makes room.
    let want = inflated_avail / MIB + 100;
    let out = client
        .run(ExecSpec::new([
            "python3",
            "-c",
            &format!("b = bytes([1]) * ({want} << 20); print(len(b) >> 20)"),
        ]))
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "allocating {want} MiB with {:.0} MiB available: {}",
        mib(inflated_avail),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        want.to_string()
    );
    let s = stats(&vm);
    eprintln!(
        "after the {want} MiB allocation: balloon at {} MiB",
        s["actual_mib"]
    );
    assert!(
        s["actual_mib"].as_u64().unwrap() < 200,
        "the balloon did not deflate: {s}"
    );

    vm.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    wait_actual(&vm, |a| a == 0, "deflated to 0");
    let deflated_avail = meminfo(&client, "MemAvailable");
    assert!(
        deflated_avail >= before_avail - 50 * MIB,
        "the guest got its memory back: {:.0} MiB available, {:.0} before",
        mib(deflated_avail),
        mib(before_avail)
    );
    let (code, body) = vm.call("PATCH", "/balloon", Some(r#"{"amount_mib": 513}"#));
    assert!(
        code == 400 && body.contains("larger than guest memory"),
        "{body}"
    );
    let (code, body) = vm.call(
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert!(
        code == 400 && body.contains("cannot turn them off"),
        "{body}"
    );
    vm.ok(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 2}"#,
    );
    let (_, body) = vm.call("GET", "/vm/config", None);
    let full: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(full["balloon"]["stats_polling_interval_s"], 2, "{full}");
}

/// A Python process counting in memory, as the snapshot tests keep one alive.
const COUNTER: &str = "setsid python3 -c 'import time\nn=0\nwhile True:\n    n+=1\n    open(\"/tmp/counter.new\",\"w\").write(str(n))\n    __import__(\"os\").rename(\"/tmp/counter.new\",\"/tmp/counter\")\n    time.sleep(0.02)' </dev/null >/dev/null 2>&1 &
while [ ! -s /tmp/counter ]; do sleep 0.05; done";

fn counter(client: &Client) -> u64 {
    sh(client, "cat /tmp/counter")
        .trim()
        .parse()
        .expect("a count")
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
#[ignore = "runs inside the nested lab: cargo xtask test"]
fn balloon_snapshot_after_the_workload_leaves_freed_memory_out_and_restores_intact() {
    let scratch = ScratchDir::new("balloon-snapshot");
    let dir = scratch.path();
    let (state, mem) = (dir.join("after.state"), dir.join("after.mem"));
    let reclaimed = dir.join("reclaimed");
    let (count, sum) = {
        let (vm, uds) = boot(dir, "worker", "free_page_reporting,deflate_on_oom", "");
        let client = agent(&uds);
        let pid = vm.pid();
        sh(&client, COUNTER);
        sh(&client, "head -c 8388608 /dev/urandom > /tmp/data");
        let sum = sh(&client, "sha256sum /tmp/data");
        let idle = settled_memory(pid, memfd, Duration::from_secs(5), 2 * MIB, GIVE_BACK).unwrap();
        workload(&client, WORKLOAD_MIB);
        let close = near_idle(memfd(&idle));
        let (after, took) = wait_for_memory(pid, GIVE_BACK, |m| close(memfd(m))).unwrap();
        assert!(
            took.is_some(),
            "the workload's memory did not come back: {after}"
        );
        let count = counter(&client);
        vm.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        vm.ok(
            "PUT",
            "/snapshot/create",
            &snapshot_create_body(&state, &mem, "Full"),
        );
        // The CLI's way, with the guest's caches dropped first (it pauses the VM itself).
        vm.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        let out = std::process::Command::new("kiln")
            .args(["snapshot", "create", "--api-sock"])
            .arg(vm.sock())
            .arg("--dir")
            .arg(&reclaimed)
            .arg("--reclaim")
            .arg(&uds)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln snapshot create --reclaim: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (count, sum)
    };
    let ram = u64::from(MEM_MIB) * MIB;
    let plain = allocated(&mem);
    let dropped = allocated(&reclaimed.join("memory"));
    eprintln!(
        "snapshot after a {WORKLOAD_MIB} MiB workload: memory file {:.1} MiB allocated of {MEM_MIB} MiB ({:.1} %); \
         {:.1} MiB ({:.1} %) with the guest's caches dropped first",
        mib(plain),
        plain as f64 * 100.0 / ram as f64,
        mib(dropped),
        dropped as f64 * 100.0 / ram as f64
    );
    assert!(
        plain <= ram / 4,
        "the memory file holds {:.1} MiB, more than a quarter of RAM",
        mib(plain)
    );
    assert!(
        dropped <= plain + 4 * MIB,
        "dropping caches did not make it bigger"
    );

    let uds = dir.join("restored.vsock");
    let vm = ApiVmm::start(kiln_vmm(), &dir.join("restored.api"));
    vm.ok(
        "PUT",
        "/snapshot/load",
        &snapshot_load_body(&state, &mem, false, &uds),
    );
    let client = agent(&uds);
    assert_eq!(
        sh(&client, "sha256sum /tmp/data"),
        sum,
        "the tmpfs file survived"
    );
    let start = Instant::now();
    let resumed = loop {
        let now = counter(&client);
        if now > count {
            break now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the counter stopped at {count}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        resumed - count < 10_000,
        "the counter went on from {count}: {resumed}"
    );
    // The restored guest runs the workload again: its freed pages read as zeros or old data, both
    // fine to a guest that holds them free.
    workload(&client, WORKLOAD_MIB);
    assert_eq!(sh(&client, "sha256sum /tmp/data"), sum);
}
