"""Sandboxes through the SDK against a real kilnd: commands, streams, files, lifecycle."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import List

import pytest
from conftest import wait_for

from kiln import (
    BadRequest,
    Conflict,
    ExecError,
    Exit,
    Kiln,
    NotFound,
    Sandbox,
    Started,
    Stderr,
    Stdout,
    Template,
)


def test_exec_returns_output_and_exit_codes(kiln: Kiln, template: Template, work: Path) -> None:
    with Sandbox.create("t", env={"WHO": "sb"}, metadata={"team": "x"}, client=kiln) as sb:
        assert (sb.state, sb.template, sb.metadata) == ("running", "t", {"team": "x"})
        # A string runs under sh -c; the sandbox's env goes over the template's.
        r = sb.exec("echo $WHO-$OUT; echo oops >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code, r.ok) == (f"sb-{work.parent.parent}\n", "oops\n", 3, False)
        # An argv list is passed as it is, with no shell.
        r = sb.exec(["printf", "%s|", "a b", "$WHO"])
        assert (r.stdout, r.exit_code) == ("a b|$WHO|", 0)
        # A command's own env, cwd, stdin; output bytes that are not UTF-8 are kept.
        r = sb.exec("echo $X; pwd; cat", env={"X": "1"}, cwd=str(work), stdin=b"in\xff")
        assert r.stdout_bytes == f"1\n{work}\nin".encode() + b"\xff"
        assert r.pid is not None and r.pid > 0
        # Killed at its timeout.
        r = sb.exec("sleep 30", timeout=0.5)
        assert r.timed_out and r.exit_code is None
        assert sb.refresh().exec_count == 4


def test_a_command_that_cannot_start_raises(kiln: Kiln, template: Template) -> None:
    with kiln.create_sandbox("t") as sb:
        with pytest.raises(ExecError) as e:
            sb.exec(["/nonexistent/program"])
        assert e.value.could_not_start and "/nonexistent/program" in e.value.message
        with pytest.raises(ExecError) as e:
            sb.exec("true", cwd="/nonexistent-dir")
        assert e.value.could_not_start
        with pytest.raises(ValueError):
            sb.exec([])


def test_streamed_output_arrives_in_order_while_the_command_runs(
    kiln: Kiln, template: Template, work: Path
) -> None:
    go1, go2 = work / "go1", work / "go2"

    def wait(f: Path) -> str:
        return f"while [ ! -f {f} ]; do sleep 0.02; done"

    with kiln.create_sandbox("t") as sb:
        # Each line waits for a file the test writes only after seeing the line before: a stream
        # that were not live would leave the command to its timeout.
        stream = sb.exec_stream(
            f"echo one; {wait(go1)}; echo two >&2; {wait(go2)}; echo three; exit 7",
            timeout=20,
        )
        events = []
        for ev in stream:
            events.append(ev)
            if ev == Stdout(b"one\n"):
                sb.files.write(str(go1), b"")
            elif ev == Stderr(b"two\n"):
                sb.files.write(str(go2), b"")
        assert isinstance(events[0], Started)
        seen = [(type(e).__name__, e.data) for e in events if isinstance(e, (Stdout, Stderr))]
        assert seen == [("Stdout", b"one\n"), ("Stderr", b"two\n"), ("Stdout", b"three\n")]
        assert events[-1] == Exit(exit_code=7, signal=None, timed_out=False)
        assert stream.wait().stdout == "one\nthree\n"


def test_callbacks_and_the_e2b_shape(kiln: Kiln, template: Template) -> None:
    out: List[str] = []
    err: List[str] = []
    with kiln.create_sandbox("t") as sb:
        r = sb.commands.run(
            "printf 'h\\303'; printf '\\251!\\n'; echo e >&2",
            on_stdout=out.append,
            on_stderr=err.append,
        )
        # A character split across two writes (if they arrive apart) reaches the callback whole.
        assert ("".join(out), "".join(err)) == ("hé!\n", "e\n")
        assert r.stdout == "hé!\n" and r.exit_code == 0


def test_files(kiln: Kiln, template: Template, work: Path) -> None:
    data = bytes(range(256)) * 64
    with kiln.create_sandbox("t") as sb:
        f = f"{work}/sub/dir/data.bin"
        assert sb.files.write(f, data) == len(data)
        assert sb.files.read(f) == data
        sb.files.write(f"{work}/run.sh", "#!/bin/sh\necho ran\n", mode=0o750)
        assert sb.exec([f"{work}/run.sh"]).stdout == "ran\n"
        entries = {e.name: e for e in sb.files.list(str(work))}
        assert sorted(entries) == ["run.sh", "sub"]
        assert (entries["run.sh"].kind, entries["run.sh"].mode & 0o777) == ("file", 0o750)
        assert entries["run.sh"].size == len("#!/bin/sh\necho ran\n")
        assert entries["sub"].kind == "dir"
        assert sb.files.read_text(f"{work}/run.sh").endswith("echo ran\n")
        # A name with spaces and query characters reaches the right file.
        odd = f"{work}/a b&c=d?.txt"
        sb.files.write(odd, "odd")
        assert Path(odd).read_text() == "odd"
        sb.files.remove(f)
        with pytest.raises(NotFound):
            sb.files.read(f)
        sb.files.remove(f"{work}/sub", recursive=True)
        assert sorted(e.name for e in sb.files.list(str(work))) == ["a b&c=d?.txt", "run.sh"]
        with pytest.raises(BadRequest) as e:
            sb.files.read("relative/path")
        assert "not absolute" in e.value.message and e.value.status == 400


def test_fork_gives_distinct_sandboxes_with_the_parents_env_and_labels(
    kiln: Kiln, template: Template
) -> None:
    with kiln.create_sandbox("t", env={"WHO": "parent"}, metadata={"k": "v"}) as sb:
        forks = sb.fork(3)
        try:
            ids = {f.id for f in forks}
            assert len(ids) == 3 and sb.id not in ids
            for f in forks:
                assert f.exec("echo $WHO").stdout == "parent\n"
                assert f.metadata == {"k": "v"} and f.state == "running"
            assert {s.id for s in kiln.sandboxes(metadata={"k": "v"})} == ids | {sb.id}
            # The parent runs on.
            assert sb.exec("echo still").stdout == "still\n"
        finally:
            for f in forks:
                f.kill()
        with pytest.raises(BadRequest):
            sb.fork(0)


def test_pause_and_resume(kiln: Kiln, template: Template) -> None:
    with kiln.create_sandbox("t", env={"WHO": "kept"}) as sb:
        sb.pause()
        assert sb.state == "paused"
        assert kiln.sandbox(sb.id).state == "paused"
        assert [s.id for s in kiln.sandboxes(state="paused")] == [sb.id]
        with pytest.raises(Conflict) as e:
            sb.exec("true")
        assert "paused" in e.value.message and e.value.status == 409
        stats = sb.stats()
        assert stats.rss_bytes is None, "a paused sandbox has no VMM"
        sb.resume()
        assert sb.state == "running" and sb.is_running()
        assert sb.exec("echo $WHO").stdout == "kept\n"


def test_a_network_policy_and_published_ports(kiln: Kiln, template: Template, work: Path) -> None:
    # The template's default policy: no egress; kilnd reports the guest's address.
    with kiln.create_sandbox("t") as sb:
        assert (sb.network.allow_domains, sb.network.allow_net) == ([], False)
        assert sb.network.address == "172.16.0.2" and sb.network.published == []
    # A policy of its own, and a guest port published on the host's loopback. The stand-in
    # VMM's "guest" is this host inside the sandbox's network namespace: a server there on its
    # loopback is reached through the agent, as in a real guest.
    with Sandbox.create(
        "t", allow_domains=["pypi.org", "*.pythonhosted.org"], publish=[8080], client=kiln
    ) as sb:
        assert sb.network.allow_domains == ["pypi.org", "*.pythonhosted.org"]
        host_port = sb.network.host_port(8080)
        served = work / "served"
        served.mkdir(exist_ok=True)
        (served / "hello.txt").write_text("from the sandbox\n")
        started = sb.exec(
            f"cd {served} && setsid python3 -m http.server 8080 --bind 127.0.0.1 "
            ">/dev/null 2>&1 </dev/null & echo $!"
        )
        server = int(started.stdout)

        def fetched() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/hello.txt", timeout=5) as r:
                    return bool(r.read() == b"from the sandbox\n")
            except OSError:
                return False

        try:
            wait_for("the published port", fetched)
        finally:
            # Its socket would keep the sandbox's namespace alive after the sandbox.
            sb.exec(f"kill {server}")
    # What kilnd cannot do is refused by name.
    with pytest.raises(BadRequest) as e:
        kiln.create_sandbox("t", allow_domains=["exa mple.com"])
    assert e.value.message.startswith('network.allow_domains: "exa mple.com" is not a domain name')
    with pytest.raises(BadRequest) as e:
        kiln.create_sandbox("t", allow_domains=["a.io"], allow_net=True)
    assert e.value.message.startswith("network.allow_net: ")


def test_timeout_expires_and_the_context_manager_kills(kiln: Kiln, template: Template) -> None:
    sb = kiln.create_sandbox("t", timeout=600)
    before = sb.info.expires_at
    sb.set_timeout(1)
    assert sb.info.expires_at < before
    wait_for("the sandbox to expire", lambda: not sb.is_running())
    with pytest.raises(NotFound) as e:
        sb.refresh()
    assert sb.id in e.value.message
    with Sandbox.create("t", client=kiln) as other:
        pass
    with pytest.raises(NotFound):
        Sandbox.connect(other.id, client=kiln)
    # Leaving kills even when the sandbox is already gone.
    with kiln.create_sandbox("t") as gone:
        gone.kill()


def test_stats_count_commands_and_memory(kiln: Kiln, template: Template) -> None:
    with kiln.create_sandbox("t") as sb:
        sb.exec("true")
        sb.exec("true")
        s = sb.stats()
        assert s.execs == 2
        assert s.rss_bytes is not None and s.rss_bytes > 0
        assert s.pss_bytes is not None and 0 < s.pss_bytes <= s.rss_bytes
        assert s.uptime_seconds >= 0


def test_an_abandoned_stream_cancels_its_command(kiln: Kiln, template: Template, work: Path) -> None:
    pid_file = work / "pid"
    with kiln.create_sandbox("t") as sb:
        with sb.exec_stream(f"echo $$ > {pid_file}; while :; do echo tick; sleep 0.05; done") as s:
            first = [next(s), next(s)]
        assert isinstance(first[0], Started) and first[1] == Stdout(b"tick\n")
        pid = int(pid_file.read_text())

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # A zombie the agent has not reaped yet counts as gone.
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
            except FileNotFoundError:
                return True

        # The stand-in guest is this host: the command's shell is a process here.
        wait_for("kilnd to cancel the abandoned command", gone)
        # kilnd goes on serving the sandbox.
        assert sb.exec("echo next").stdout == "next\n"
        # Large files go through whole.
        big = os.urandom(8 << 20)
        sb.files.write(f"{work}/big", big)
        assert hashlib.sha256(sb.files.read(f"{work}/big")).digest() == hashlib.sha256(big).digest()
