"""A real kilnd for the suite, on the host, with the stand-in VMM of kilnd's own Rust tests
(pool/examples/fake_vmm.rs, serving the real agent code in-process): templates, sandboxes,
exec, files, fork, pause and resume are kilnd's own; only the VM is missing, so a sandbox's
"guest" is this host and the suite only touches its own folder.

``cargo xtask test`` builds both programs and passes them in ``$KILN_SDK_KILND`` and
``$KILN_SDK_FAKE_VMM``; by hand, ``cargo build -p kiln-pool --bin kilnd --example fake_vmm``
and run pytest from sdk/python (the default paths are the workspace's target/debug).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kiln import Kiln, Template

REPO = Path(__file__).resolve().parents[3]


def _program(env: str, default: Path) -> Path:
    p = Path(os.environ.get(env) or default)
    if not p.is_file():
        pytest.fail(
            f"{p} is missing: run the suite with `cargo xtask test --sdk`, or build it with "
            "`cargo build -p kiln-pool --bin kilnd --example fake_vmm` (or set ${env})",
            pytrace=False,
        )
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """The running kilnd."""

    dir: Path
    socket: str
    url: str
    token: str
    process: subprocess.Popen

    def log(self) -> str:
        return (self.dir / "kilnd.log").read_text(errors="replace")[-4000:]


def wait_for(what: str, ok: Callable[[], bool], within: float = 30.0) -> None:
    """Polls ``ok`` until it holds; fails naming ``what`` after ``within`` seconds."""
    end = time.monotonic() + within
    while not ok():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    kilnd = _program("KILN_SDK_KILND", REPO / "target/debug/kilnd")
    vmm = _program("KILN_SDK_FAKE_VMM", REPO / "target/debug/examples/fake_vmm")
    # Short: sockets live below it and a Unix socket's path has 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="kiln-sdk-"))
    (d / "vmlinux").write_text("kernel")
    (d / "agent").write_bytes(b"\x7f" * 4096)
    token = secrets.token_hex(16)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_FAKE_VMM")}
    env.update(KILN_FAKE_VMM="agent", KILND_TOKEN=token)
    log = open(d / "kilnd.log", "ab")
    proc = subprocess.Popen(
        [
            str(kilnd),
            "--state-dir", str(d / "state"),
            "--vmm", str(vmm),
            "--kernel", str(d / "vmlinux"),
            "--agent", str(d / "agent"),
            "--max-vms", "6",
            "--default-timeout", "120",
            "--listen", f"127.0.0.1:{port}",
            # The stand-in VMM is a plain program on this host, not jailable.
            "--no-jail",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    sock = str(d / "state/kilnd.sock")
    daemon = Daemon(d, sock, f"http://127.0.0.1:{port}", token, proc)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"kilnd exited with {proc.returncode}:\n{daemon.log()}")
            try:
                return Kiln(socket=sock).health()
            except Exception:
                return False

        wait_for("kilnd to listen", listening)
        yield daemon
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        log.close()
        clean = code == 0
        if clean:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kilnd did not stop cleanly ({code}); its folder is kept: {d}")
    assert clean, f"kilnd exited with {code} after SIGTERM"


@pytest.fixture(scope="session")
def kiln(daemon: Daemon) -> Kiln:
    """A client on kilnd's Unix socket."""
    return Kiln(socket=daemon.socket, timeout=60)


@pytest.fixture(scope="session")
def template(daemon: Daemon, kiln: Kiln) -> Template:
    """Template ``t``: a small tree, one build step, an environment."""
    tree = daemon.dir / "tree/etc"
    tree.mkdir(parents=True)
    (tree / "hello").write_text("hi\n")
    return kiln.build_template(
        {
            "name": "t",
            "from": {"dir": str(daemon.dir / "tree")},
            "run": ['echo built >> "$OUT/steps"'],
            "env": {"OUT": str(daemon.dir), "WHO": "template"},
        }
    )


@pytest.fixture
def work(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder of this test's own for what its sandbox's commands and files touch (the
    stand-in guest is this host)."""
    p = daemon.dir / "work" / request.node.name
    p.mkdir(parents=True)
    yield p
    shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_sandboxes_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that used kilnd leaves no sandbox behind (so host limits hold for the next)."""
    yield
    if "kiln" in request.fixturenames:
        k: Kiln = request.getfixturevalue("kiln")
        left = k.sandboxes()
        for s in left:
            s.kill()
        assert not left, f"the test left sandboxes: {left}"
