"""The unmodified `e2b` SDK (the release `cargo xtask test` pins) against kilnd in the lab:
sandboxes from a template, commands (output callbacks, exit codes, background processes found
again, stdin, kills, timeouts), files, listing, pause and connect, fork, snapshots, kill, and the
errors the SDK raises for bad input."""

import hashlib
import os
import time

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotRunningException,
    TimeoutException,
)
from e2b.sandbox.sandbox_api import SandboxQuery

from conftest import open_streams


def wait_until(what, ok, within=30.0):
    end = time.monotonic() + within
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_create_from_the_default_template_and_run():
    sb = Sandbox.create(envs={"GREETING": "hello"}, metadata={"suite": "e2b"})
    try:
        assert sb.is_running()
        chunks = []
        r = sb.commands.run("echo $GREETING from $(cat /etc/debian_version | cut -c1-2)",
                            on_stdout=chunks.append)
        assert r.exit_code == 0
        assert r.stdout == "hello from 12\n"
        assert "".join(chunks) == r.stdout
        info = sb.get_info()
        assert info.template_id == "base"
        assert info.metadata == {"suite": "e2b"}
    finally:
        sb.kill()


def test_output_stderr_and_exit_codes(sandbox):
    out, err = [], []
    r = sandbox.commands.run("for i in 1 2 3; do echo out$i; echo err$i >&2; done",
                             on_stdout=out.append, on_stderr=err.append)
    assert (r.stdout, r.stderr) == ("out1\nout2\nout3\n", "err1\nerr2\nerr3\n")
    assert "".join(out) == r.stdout and "".join(err) == r.stderr
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("echo partial; exit 42")
    assert e.value.exit_code == 42
    assert e.value.stdout == "partial\n"
    # A command that does not exist is bash's 127, as on E2B.
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("no-such-program-here")
    assert e.value.exit_code == 127


def test_environment_cwd_and_user(sandbox):
    r = sandbox.commands.run("echo $A:$(pwd):$(id -u)", envs={"A": "b"}, cwd="/tmp")
    assert r.stdout == "b:/tmp:0\n"
    # Relative paths and the default working directory are the user's home (root's here).
    assert sandbox.commands.run("pwd").stdout == "/root\n"


def test_background_commands_connect_and_kill(sandbox, api):
    h = sandbox.commands.run("for i in $(seq 1 1000); do echo tick $i; sleep 0.1; done",
                             background=True)
    assert h.pid > 0
    assert any(p.pid == h.pid for p in sandbox.commands.list())
    # Leave the stream mid-way: kilnd lets it go, the process runs on.
    for stdout, _, _ in h:
        if stdout and "tick 2" in stdout:
            break
    h.disconnect()
    wait_until("the abandoned stream to be let go", lambda: open_streams(api) == 0)
    assert any(p.pid == h.pid for p in sandbox.commands.list())
    # Found again by pid: its output goes on from where nobody read.
    again = sandbox.commands.connect(h.pid)
    seen = []
    for stdout, _, _ in again:
        if stdout:
            seen.append(stdout)
        if len("".join(seen).splitlines()) >= 3:
            break
    assert "tick" in "".join(seen)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()
    wait_until("the killed process to leave the list",
               lambda: all(p.pid != h.pid for p in sandbox.commands.list()))
    assert sandbox.commands.kill(h.pid) is False


def test_stdin(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    h.send_stdin("through ")
    sandbox.commands.send_stdin(h.pid, b"stdin\n")
    h.close_stdin()
    assert h.wait().stdout == "through stdin\n"
    h = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, [b"a" * 1000, "b" * 24])
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == "1024"


def test_command_timeout(sandbox):
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - start < 25


def test_files(sandbox):
    d = "/tmp/e2b-files"
    info = sandbox.files.write(f"{d}/a.txt", "some text")
    assert info.path == f"{d}/a.txt"
    assert sandbox.files.read(f"{d}/a.txt") == "some text"
    assert sandbox.files.read(f"{d}/a.txt", format="bytes") == bytearray(b"some text")
    sandbox.files.write(f"{d}/bin", bytes(range(256)))
    assert bytes(sandbox.files.read(f"{d}/bin", format="bytes")) == bytes(range(256))
    assert sandbox.files.exists(f"{d}/a.txt")
    assert not sandbox.files.exists(f"{d}/nope")
    assert sandbox.files.make_dir(f"{d}/sub/deeper") is True
    assert sandbox.files.make_dir(f"{d}/sub/deeper") is False
    moved = sandbox.files.rename(f"{d}/a.txt", f"{d}/sub/b.txt")
    assert moved.path == f"{d}/sub/b.txt"
    names = sorted(e.name for e in sandbox.files.list(d))
    assert names == ["bin", "sub"]
    deep = sorted(e.path for e in sandbox.files.list(d, depth=3))
    assert f"{d}/sub/deeper" in deep and f"{d}/sub/b.txt" in deep
    entry = sandbox.files.get_info(f"{d}/sub/b.txt")
    assert entry.size == len("some text")
    # Files written through the SDK are what commands in the VM see.
    assert sandbox.commands.run(f"cat {d}/sub/b.txt").stdout == "some text"
    sandbox.files.remove(f"{d}/sub")
    assert not sandbox.files.exists(f"{d}/sub")
    # Relative paths are from the user's home.
    sandbox.files.write("rel.txt", "home")
    assert sandbox.commands.run("cat /root/rel.txt").stdout == "home"
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{d}/missing")


def test_a_streamed_upload_arrives_whole(sandbox):
    chunk = bytes(range(256)) * 4096  # 1 MiB
    chunks = 48
    sandbox.files.write("/tmp/big", iter([chunk] * chunks))
    digest = hashlib.sha256(chunk * chunks).hexdigest()
    assert sandbox.commands.run("sha256sum /tmp/big").stdout.split()[0] == digest


@pytest.mark.vm
def test_no_path_reaches_outside_the_sandbox(sandbox):
    # /tmp/kiln-l1-only exists on the machine kilnd runs on, never in a guest.
    for path in ("/tmp/kiln-l1-only", "../../../../../tmp/kiln-l1-only", "/proc/../tmp/kiln-l1-only"):
        with pytest.raises(FileNotFoundException):
            sandbox.files.read(path)
        assert not sandbox.files.exists(path)


def test_list_pause_connect_and_timeout():
    sb = Sandbox.create(template="base", timeout=600, metadata={"case": "pause"})
    try:
        sb.files.write("/root/state.txt", "kept across pause")
        sb.commands.run("echo in-memory > /dev/shm/m")
        listed = Sandbox.list(query=SandboxQuery(metadata={"case": "pause"})).next_items()
        assert [s.sandbox_id for s in listed] == [sb.sandbox_id]
        assert sb.pause() is True
        assert not sb.is_running()
        paused = Sandbox.list(query=SandboxQuery(metadata={"case": "pause"})).next_items()
        assert [s.state.value for s in paused] == ["paused"]
        back = Sandbox.connect(sb.sandbox_id, timeout=600)
        assert back.is_running()
        assert back.files.read("/root/state.txt") == "kept across pause"
        assert back.commands.run("cat /dev/shm/m").stdout == "in-memory\n"
        back.set_timeout(5)
        wait_until("the sandbox to expire", lambda: not back.is_running(), within=60)
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sb.sandbox_id)
    finally:
        try:
            Sandbox.kill(sb.sandbox_id)
        except Exception:
            pass


@pytest.mark.vm
def test_fork(sandbox):
    sandbox.commands.run("echo original > /root/who")
    forks = sandbox.fork(count=2)
    try:
        assert len(forks) == 2
        ids = {f.sandbox_id for f in forks}
        assert sandbox.sandbox_id not in ids and len(ids) == 2
        for f in forks:
            assert f.commands.run("cat /root/who").stdout == "original\n"
        forks[0].commands.run("echo changed > /root/who")
        assert forks[1].commands.run("cat /root/who").stdout == "original\n"
        assert sandbox.commands.run("cat /root/who").stdout == "original\n"
        uuids = {f.commands.run("cat /proc/sys/kernel/random/uuid").stdout for f in forks}
        assert len(uuids) == 2
    finally:
        for f in forks:
            f.kill()


def test_the_source_of_a_fork_runs_on(sandbox):
    # A fork's snapshot resets the source's vsock connections; kilnd connects again.
    forks = sandbox.fork(count=1)
    try:
        assert sandbox.commands.run("echo still here").stdout == "still here\n"
        assert forks[0].commands.run("echo fork").stdout == "fork\n"
    finally:
        for f in forks:
            f.kill()


def test_a_snapshot_starts_sandboxes_and_outlives_its_source():
    src = Sandbox.create(template="base", timeout=600)
    made = []
    try:
        snap = src.create_snapshot(name="sdk-snap")
        assert snap.snapshot_id == "sdk-snap" and snap.names == ["sdk-snap"]
        assert src.commands.run("echo still here").stdout == "still here\n"
        listed = [s.snapshot_id for s in src.list_snapshots().next_items()]
        assert listed == ["sdk-snap"]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name="sdk-snap").next_items()] == [
            "sdk-snap"
        ]
        made.append(Sandbox.create(snap.snapshot_id, timeout=600))
        assert made[0].commands.run("echo from snapshot").stdout == "from snapshot\n"
        src.kill()
        made.append(Sandbox.create(snap.snapshot_id, timeout=600))
        assert made[1].is_running()
        assert "sdk-snap" in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    finally:
        for sb in made + [src]:
            try:
                sb.kill()
            except Exception:
                pass
        Sandbox.delete_snapshot("sdk-snap")
    assert Sandbox.delete_snapshot("sdk-snap") is False


@pytest.mark.vm
def test_a_snapshot_keeps_the_files_written_before_it(sandbox):
    sandbox.files.write("/root/before", "before")
    snap = sandbox.create_snapshot()
    try:
        sandbox.files.write("/root/after", "after")
        sb = Sandbox.create(snap.snapshot_id, timeout=600)
        try:
            assert sb.files.read("/root/before") == "before"
            assert not sb.files.exists("/root/after")
        finally:
            sb.kill()
        assert sandbox.files.read("/root/after") == "after"
    finally:
        Sandbox.delete_snapshot(snap.snapshot_id)


def test_snapshot_refusals(sandbox):
    with pytest.raises(SandboxException) as e:
        sandbox.create_snapshot(mode="filesystem")
    assert e.value.status_code == 400 and "filesystem-only" in str(e.value)
    with pytest.raises(SandboxException) as e:
        sandbox.create_snapshot(name="Not A Name")
    assert "Not A Name" in str(e.value)
    with pytest.raises(NotFoundException):
        Sandbox.create_snapshot("no-such-sandbox")


def test_kill_and_a_dead_sandbox():
    sb = Sandbox.create(template="base")
    assert sb.kill() is True
    assert not sb.is_running()
    with pytest.raises(SandboxNotRunningException):
        sb.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        sb.files.read("/etc/hostname")
    assert Sandbox.kill(sb.sandbox_id) is False


def test_unknown_template():
    with pytest.raises(SandboxException) as e:
        Sandbox.create(template="no-such-template")
    assert "no-such-template" in str(e.value)


def test_wrong_api_key(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "e2b_0000000000000000000000000000000000000000")
    with pytest.raises(AuthenticationException):
        Sandbox.create(template="base")


def test_bad_tokens_and_invalid_protobuf(sandbox, api):
    headers = {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "Content-Type": "application/json",
    }
    # No token, another sandbox's token, a dead sandbox's token: unauthenticated.
    other = Sandbox.create(template="base")
    other_token = other._envd_access_token
    other.kill()
    for token in (None, other_token):
        h = dict(headers)
        if token:
            h["X-Access-Token"] = token
        r = api.post("/process.Process/List", headers=h, content=b"{}")
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    h = dict(headers, **{"X-Access-Token": sandbox._envd_access_token,
                         "Content-Type": "application/proto"})
    r = api.post("/filesystem.Filesystem/Stat", headers=h, content=b"\x0a\xff\xff\xff")
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = api.post("/filesystem.Filesystem/Stat", headers=dict(h, **{"Content-Type": "text/plain"}),
                 content=b"x")
    assert r.status_code == 415
