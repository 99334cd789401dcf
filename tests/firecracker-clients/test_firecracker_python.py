"""The `firecracker-python` package from PyPI (pinned in requirements.txt), unchanged, drives
kiln-vmm on the host's /dev/kvm with a tiny counting guest, through the package's own classes:
`ProcessManager` starts and stops the VMM (a `firecracker` on its path that is kiln-vmm, as an
orchestrator would install it), `VMMManager` reads state and config and pauses and resumes, and
`Api` configures, boots, snapshots, restores into a second VMM, and sets up metrics and the
logger. The guest's own work is the evidence: it counts while running and not while paused, the
snapshot's memory file holds its count, and the restored VM counts on from there.

The package's `MicroVM` class is not used: it needs a Docker daemon (`docker.from_env()` in its
constructor) and a TAP device with NAT rules, which belong to the network device's issue.
"""

import json
import os
import re
import time

from conftest import count_in, dots, wait_dots, wait_for
from firecracker.api import Resource
from firecracker.process import ProcessManager
from firecracker.utils import generate_id
from firecracker.vmm import VMMManager


def managers(data_path, binary):
    """The package's managers, pointed at a data folder and a `firecracker` binary of the test's
    own (its defaults, /var/lib/firecracker and /usr/local/bin/firecracker, are the host's)."""
    pm, vmm = ProcessManager(), VMMManager()
    for config in (pm._config, vmm._config, vmm._process._config):
        config.data_path = str(data_path)
        config.binary_path = str(binary)
    return pm, vmm


def start(pm, vmm, data, extra=()):
    """Starts a VMM as the package's MicroVM does (`_run_firecracker`): a socket path from
    `socket_file`, a log folder, `ProcessManager.start` with `--api-sock` and `--id`."""
    vm_id = generate_id()
    sock = vmm.socket_file(vm_id)
    vmm.create_vmm_dir(f"{data}/{vm_id}/logs")
    pid = pm.start(vm_id, ["--api-sock", sock, "--id", vm_id, *extra])
    assert pm.is_running(vm_id)
    wait_for(f"the API socket {sock}", lambda: os.path.exists(sock))
    return vm_id, pid


def console(data, vm_id):
    # ProcessManager.start sends the VMM's stdout, the guest's serial console, here.
    return f"{data}/{vm_id}/firecracker.log"


def metrics_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_firecracker_python_configures_boots_pauses_snapshots_and_restores(
    kiln, tmp_path, short_dir
):
    data = os.path.join(short_dir, "firecracker")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binary = bin_dir / "firecracker"
    binary.symlink_to(kiln["vmm"])
    pm, vmm = managers(data, binary)
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))

    # --- boot, with Firecracker's process options for the logger ---
    vm_id = generate_id()
    sock = vmm.socket_file(vm_id)
    vmm.create_vmm_dir(f"{data}/{vm_id}/logs")
    vmm.create_log_file(vm_id, f"{vm_id}.log")
    log_path = f"{data}/{vm_id}/logs/{vm_id}.log"
    pid = pm.start(
        vm_id, ["--api-sock", sock, "--id", vm_id, "--log-path", log_path, "--level", "Info"]
    )
    assert pm.is_running(vm_id)
    wait_for(f"the API socket {sock}", lambda: os.path.exists(sock))
    # The package finds its VMMs by process name and command line.
    assert pid in pm.get_pids()
    assert pm.get_pid(vm_id)[0] == pid
    api = vmm.get_api(vm_id)
    info = api.describe.get().json()
    assert info["id"] == vm_id and info["state"] == "Not started", info
    assert api.version.get().json()["firecracker_version"]

    metrics_path = tmp_path / "metrics.json"
    metrics_path.touch()
    Resource(api, "/metrics").put(metrics_path=str(metrics_path))
    api.boot.put(kernel_image_path=kiln["counter"], boot_args="console=ttyS0 reboot=k panic=1")
    api.machine_config.put(vcpu_count=1, mem_size_mib=32)
    api.drive.put(
        drive_id="rootfs", path_on_host=str(disk), is_root_device=True, is_read_only=True
    )
    api.vsock.put(guest_cid=3, uds_path=f"{data}/{vm_id}/v.sock")
    api.actions.put(action_type="InstanceStart")
    assert vmm.get_vmm_state(vm_id) == "Running"
    config = vmm.get_vmm_config(vm_id)
    assert config["boot-source"]["kernel_image_path"] == kiln["counter"], config
    assert config["machine-config"]["vcpu_count"] == 1, config
    assert config["machine-config"]["mem_size_mib"] == 32, config
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs"], config
    assert config["vsock"]["guest_cid"] == 3, config
    out = console(data, vm_id)
    wait_dots(out, 3)

    # --- pause: the guest stops counting; a full snapshot holds its count ---
    assert vmm.update_vmm_state(vm_id, "Paused") == f"Paused VMM {vm_id} successfully"
    assert vmm.get_vmm_state(vm_id) == "Paused"
    before = dots(out)
    time.sleep(0.3)
    assert dots(out) == before, "the guest printed while paused"
    state_file, mem_file = str(snaps / "vmstate"), str(snaps / "memory")
    api.create_snapshot.put(
        snapshot_type="Full", snapshot_path=state_file, mem_file_path=mem_file
    )
    saved = count_in(mem_file, kiln["counter_addr"])
    assert saved >= 3 * 16384, f"the snapshot holds count {saved}, below the dots seen"

    # --- resume: it counts on ---
    vmm.update_vmm_state(vm_id, "Resumed")
    assert vmm.get_vmm_state(vm_id) == "Running"
    wait_dots(out, 2)

    # --- metrics: FlushMetrics writes Firecracker's groups ---
    api.actions.put(action_type="FlushMetrics")
    lines = wait_for("a metrics line", lambda: metrics_lines(metrics_path))
    m = lines[-1]
    for group in ("api_server", "put_api_requests", "patch_api_requests", "latencies_us", "vcpu"):
        assert group in m, f"metrics lack {group}: {sorted(m)}"
    lat = m["latencies_us"]
    assert lat["pause_vm"] > 0 and lat["resume_vm"] > 0 and lat["full_create_snapshot"] > 0, lat
    puts = m["put_api_requests"]
    # Requests are counted once answered: InstanceStart is in this line, the FlushMetrics that
    # wrote it will be in the next.
    assert puts["boot_source_count"] == 1 and puts["machine_cfg_count"] == 1, puts
    assert puts["drive_count"] == 1 and puts["vsock_count"] == 1, puts
    assert puts["snapshot_count"] == 1 and puts["actions_count"] == 1, puts
    assert puts["actions_fails"] == 0 and puts["snapshot_fails"] == 0, puts
    assert m["patch_api_requests"]["vmm_count"] == 2, m["patch_api_requests"]
    assert m["vcpu"]["exit_io_out"] > 0, m["vcpu"]

    # --- the logger set by --log-path: Firecracker's line format with the id ---
    with open(log_path) as f:
        log = f.read()
    # `TIMESTAMP [id:thread] message`: no level or origin unless asked for.
    lines = [line for line in log.splitlines() if f" [{vm_id}:" in line]
    assert lines, log[:2000]

    # --- restore into a second VMM, its logger set over the API ---
    id2, pid2 = start(pm, vmm, data)
    api2 = vmm.get_api(id2)
    log2 = tmp_path / "restore.log"
    log2.touch()
    api2.logger.put(log_path=str(log2), level="Debug", show_level=True, show_log_origin=True)
    # As MicroVM.snapshot(action="load") sends it, less its network_overrides (this VM has no
    # network interface; naming one it does not have is refused, by Firecracker too) and with a
    # vsock_override: the original still holds its vsock socket.
    api2.load_snapshot.put(
        enable_diff_snapshots=True,
        mem_backend={"backend_type": "File", "backend_path": mem_file},
        snapshot_path=state_file,
        resume_vm=True,
        vsock_override={"uds_path": f"{data}/{id2}/v.sock"},
    )
    assert vmm.get_vmm_state(id2) == "Running"
    out2 = console(data, id2)
    wait_dots(out2, 2)
    vmm.update_vmm_state(id2, "Paused")
    snaps2 = tmp_path / "snapshots2"
    snaps2.mkdir()
    api2.create_snapshot.put(
        snapshot_path=str(snaps2 / "vmstate"), mem_file_path=str(snaps2 / "memory")
    )
    later = count_in(str(snaps2 / "memory"), kiln["counter_addr"])
    assert later > saved, f"the restored guest's count {later} did not go on from {saved}"
    # With show_level and show_log_origin: `TIMESTAMP [id:thread:LEVEL:file:line] message`.
    text = log2.read_text()
    assert re.search(rf" \[{id2}:[^:\]]+:(DEBUG|INFO):[^:\]]+\.rs:\d+\] ", text), text[:2000]

    # --- the package stops both: SIGTERM, the processes are gone and their files cleaned ---
    assert pm.stop(vm_id) is True
    assert pm.stop(id2) is True
    for p in (pid, pid2):
        wait_for(f"process {p} to end", lambda p=p: not os.path.exists(f"/proc/{p}/status")
                 or "State:\tZ" in open(f"/proc/{p}/status").read())
    assert not pm.is_running(vm_id) and not pm.is_running(id2)
    assert not os.path.exists(sock)
