"""schemathesis, with 8 workers, fuzzes kiln-vmm over Firecracker's published swagger
(api/firecracker-swagger.yaml) for a bounded number of examples per operation: first a VMM that
is not started, then one running the tiny counting guest; then over Kiln's own api/openapi.json. kiln-vmm runs under kiln-jailer (a
chroot as an unprivileged user), so the paths schemathesis makes up for logs, metrics, drives and
snapshots land inside the jail and nowhere else on the host.

Throughout, a prober opens a fresh connection every 50 ms and asks `GET /`. The test asserts
what a user would: kiln-vmm is alive at the end, every probe was answered 200, and schemathesis
found no 5xx answer (kiln-vmm documents none) and no answer that breaks Firecracker's own
response schemas or content types (its `not_a_server_error` check, `status_code_conformance`,
though Firecracker documents a `default` answer for every operation, and kiln_checks.py's
versions of `content_type_conformance` and `response_schema_conformance`, which allow only what
Firecracker's own server does differently from its swagger).

schemathesis speaks HTTP over TCP only, so a small bridge in this process carries each of its
TCP connections to a connection of its own on kiln-vmm's Unix socket: kiln-vmm sees as many
clients as schemathesis opens.
"""

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from conftest import get_root, wait_for

WORKERS = 8
# Examples per operation and phase: about a minute for each of the two runs on two cores.
MAX_EXAMPLES = 25
# Two of them are kiln_checks.py's versions of schemathesis's checks (it says why).
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "kiln_content_type",
        "kiln_response_schema",
    ]
)
# Kiln's own description is held to schemathesis's own checks.
KILN_CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


class Bridge:
    """TCP on 127.0.0.1 to a Unix socket, one Unix connection per TCP connection."""

    def __init__(self, unix_path):
        self.unix_path = unix_path
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.unix_path)
            except OSError:
                self.refused += 1
                client.close()
                upstream.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


class Prober:
    """Asks `GET /` on a fresh connection every 50 ms until stopped."""

    def __init__(self, sock_path):
        self.sock_path = sock_path
        self.answers = 0
        self.failures = []
        self.worst = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                status, took = get_root(self.sock_path)
                self.worst = max(self.worst, took)
                if status == 200:
                    self.answers += 1
                else:
                    self.failures.append(f"GET / answered {status}")
            except OSError as e:
                self.failures.append(f"GET / failed: {e}")
            self.stopping.wait(0.05)

    def stop(self):
        self.stopping.set()
        self.thread.join()


class JailedVmm:
    """kiln-vmm under kiln-jailer as uid:gid 123:123, its API socket at /api.sock in the jail."""

    def __init__(self, kiln, base):
        self.kiln = kiln
        self.base = base
        self.id = f"schemathesis-{uuid.uuid4().hex[:8]}"
        self.root = os.path.join(base, "kiln-vmm", self.id, "root")
        self.sock = os.path.join(self.root, "api.sock")
        self.stderr = open(os.path.join(base, f"{self.id}.stderr"), "w+")
        self.proc = subprocess.Popen(
            [kiln["jailer"], "--id", self.id, "--exec-file", kiln["vmm"],
             "--uid", "123", "--gid", "123", "--chroot-base-dir", base,
             "--", "--api-sock", "/api.sock"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
        )
        wait_for(f"the jailed API socket {self.sock}",
                 lambda: os.path.exists(self.sock) or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.output()

    def output(self):
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def put_in_jail(self, src, name):
        """Copies `src` into the jail's root, owned by the jailed user; returns its jail path."""
        dst = os.path.join(self.root, name)
        shutil.copyfile(src, dst)
        os.chown(dst, 123, 123)
        return "/" + name

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        subprocess.run(
            [self.kiln["jailer"], "--cleanup", "--id", self.id, "--exec-file", self.kiln["vmm"],
             "--chroot-base-dir", self.base],
            check=False, stdout=subprocess.DEVNULL,
        )


def api(sock_path, method, path, body):
    """One request on a fresh connection; returns (status, body text)."""
    payload = body.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, text = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), text.decode(errors="replace")


def schemathesis(kiln, port, report_dir, label, schema=None, checks=CHECKS):
    """Runs schemathesis's CLI against the bridge; returns (exit status, its output)."""
    cmd = [
        "schemathesis", "run", schema or kiln["swagger"],
        "--url", f"http://127.0.0.1:{port}",
        "--workers", str(WORKERS),
        "--max-examples", str(MAX_EXAMPLES),
        "--phases", "examples,coverage,fuzzing",
        "--checks", checks,
        "--request-timeout", "10",
        "--suppress-health-check", "all",
        "--no-color",
        "--report", "junit",
        "--report-dir", os.path.join(report_dir, label),
    ]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="kiln_checks")
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return run.returncode, run.stdout + run.stderr


def fuzz(kiln, vmm, tmp_path, label, **schema):
    bridge = Bridge(vmm.sock)
    prober = Prober(vmm.sock)
    try:
        status, output = schemathesis(kiln, bridge.port, str(tmp_path), label, **schema)
    finally:
        prober.stop()
        bridge.close()
    print(output)
    print(
        f"{label}: {bridge.connections} connections through the bridge, "
        f"{prober.answers} probes of GET / answered, the slowest in {prober.worst * 1000:.1f} ms"
    )
    assert vmm.proc.poll() is None, f"kiln-vmm died during {label}: {vmm.output()}"
    assert not prober.failures, prober.failures[:10]
    assert prober.answers > 0
    assert bridge.refused == 0, f"{bridge.refused} connections to kiln-vmm were refused"
    assert bridge.connections >= WORKERS, bridge.connections
    assert status == 0, f"schemathesis found problems ({label}): its report is printed above"
    # Still answering, and still what it was: the jail's id, which kiln-jailer passed as --id.
    status, body = api(vmm.sock, "GET", "/", "")
    assert status == 200, body
    assert f'"id":"{vmm.id}"' in body, body
    return body


@pytest.fixture
def jail_base(short_dir):
    if os.geteuid() != 0:
        pytest.fail("the schemathesis test jails kiln-vmm with kiln-jailer, which needs root")
    return short_dir


def test_schemathesis_before_boot(kiln, tmp_path, jail_base):
    vmm = JailedVmm(kiln, jail_base)
    try:
        fuzz(kiln, vmm, tmp_path, "before-boot")
    finally:
        vmm.stop()


def test_schemathesis_while_a_guest_runs(kiln, tmp_path, jail_base):
    vmm = JailedVmm(kiln, jail_base)
    try:
        kernel = vmm.put_in_jail(kiln["counter"], "counter.elf")
        serial = "/console.log"
        for method, path, body in [
            ("PUT", "/boot-source", f'{{"kernel_image_path": "{kernel}"}}'),
            ("PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 32}'),
            ("PUT", "/serial", f'{{"serial_out_path": "{serial}"}}'),
            ("PUT", "/actions", '{"action_type": "InstanceStart"}'),
        ]:
            status, text = api(vmm.sock, method, path, body)
            assert status == 204, f"{method} {path}: {status} {text}"
        console = os.path.join(vmm.root, serial.lstrip("/"))
        wait_for("the guest's first dots", lambda: os.path.exists(console)
                 and b"." in open(console, "rb").read())
        info = fuzz(kiln, vmm, tmp_path, "running")
        # Whatever schemathesis did (it may well have paused it), the VM is still there.
        assert '"state":"Running"' in info or '"state":"Paused"' in info, info
    finally:
        vmm.stop()


def test_schemathesis_over_kilns_own_openapi(kiln, tmp_path, jail_base):
    """api/openapi.json, Kiln's own description, held to schemathesis's checks as they are: it
    lists every status kiln-vmm answers, and 204s with no content."""
    vmm = JailedVmm(kiln, jail_base)
    try:
        fuzz(kiln, vmm, tmp_path, "kiln-openapi", schema=kiln["openapi"], checks=KILN_CHECKS)
    finally:
        vmm.stop()
