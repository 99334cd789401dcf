"""Templates, the client's reach (socket, TCP with a token), and errors by type."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
from conftest import Daemon, wait_for

from kiln import (
    BadRequest,
    BuildEvent,
    BuildFailed,
    Done,
    Kiln,
    KilnConnectionError,
    LimitReached,
    NotFound,
    Sandbox,
    Step,
    Template,
    Unauthorized,
)


def test_template_build_streams_steps_and_is_cached(daemon: Daemon, kiln: Kiln, template: Template) -> None:
    assert template.name == "t" and (daemon.dir / "steps").read_text() == "built\n"
    # The same spec again is found, not rebuilt: the stream's last event says so.
    spec = daemon.dir / "t2.toml"
    (daemon.dir / "tree2").mkdir()
    spec.write_text(
        'name = "t2"\nrun = [\'echo two >> "$OUT/steps2"\']\n'
        f'env = {{ OUT = "{daemon.dir}" }}\n[from]\ndir = "tree2"\n'
    )
    events: List[BuildEvent] = []
    built = Template.build(spec, on_event=events.append, client=kiln)
    steps = [e.name for e in events if isinstance(e, Step)]
    assert any("build step 1/1" in s for s in steps) and "snapshot" in steps, steps
    assert isinstance(events[-1], Done) and not events[-1].cached
    assert (daemon.dir / "steps2").read_text() == "two\n"
    with kiln.build_template_stream(spec) as again:
        last = list(again)[-1]
    assert isinstance(last, Done) and last.cached and last.template.id == built.id
    assert sorted(t.name for t in Template.list(client=kiln)) == ["t", "t2"]
    assert kiln.template("t2").id == built.id
    built.remove()
    assert [t.name for t in kiln.templates()] == ["t"]
    with pytest.raises(NotFound):
        kiln.template("t2")


def test_a_failed_build_and_a_bad_spec_are_named(daemon: Daemon, kiln: Kiln) -> None:
    with pytest.raises(BuildFailed) as e:
        kiln.build_template({"name": "bad", "from": {"dir": str(daemon.dir / "nope")}})
    assert "nope" in e.value.message
    with pytest.raises(BadRequest) as b:
        kiln.build_template({"name": "bad", "from": {"dir": "/"}, "vcpu": 2})
    assert "vcpu" in b.value.message


def test_warm_pool(kiln: Kiln, template: Template) -> None:
    template.set_pool(min_ready=2)
    assert template.info.min_ready == 2
    wait_for("two warm VMs", lambda: template.refresh().ready == 2)
    with template.create_sandbox(env={"WHO": "warm"}) as sb:
        assert sb.exec("echo $WHO").stdout == "warm\n"
    template.set_pool(min_ready=0)
    wait_for("the pool emptied", lambda: template.refresh().ready == 0)


def test_unknown_things_are_not_found(kiln: Kiln, template: Template) -> None:
    with pytest.raises(NotFound) as e:
        Sandbox.create("no-such-template", client=kiln)
    assert "no-such-template" in e.value.message and e.value.status == 404
    with pytest.raises(NotFound):
        kiln.sandbox("no-such-sandbox")


def test_the_host_limit_is_limit_reached(kiln: Kiln, template: Template) -> None:
    made: List[Sandbox] = []
    try:
        with pytest.raises(LimitReached) as e:
            for _ in range(7):  # kilnd runs with --max-vms 6
                made.append(kiln.create_sandbox("t"))
        assert len(made) == 6 and e.value.status == 429 and "limit" in e.value.message
    finally:
        for s in made:
            s.kill()


def test_tcp_with_a_bearer_token(daemon: Daemon, kiln: Kiln, template: Template) -> None:
    tcp = Kiln(url=daemon.url, token=daemon.token)
    with tcp.create_sandbox("t") as sb:
        assert sb.exec(["echo", "over tcp"]).stdout == "over tcp\n"
        assert [s.id for s in kiln.sandboxes()] == [sb.id]
    with pytest.raises(Unauthorized) as e:
        Kiln(url=daemon.url, token="wrong" * 4).sandboxes()
    assert e.value.status == 401
    with pytest.raises(Unauthorized):
        Kiln(url=daemon.url).templates()


def test_environment_picks_the_daemon(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILND_URL", raising=False)
    monkeypatch.setenv("KILND_SOCKET", daemon.socket)
    assert Kiln().health()
    monkeypatch.setenv("KILND_URL", daemon.url)
    monkeypatch.setenv("KILND_TOKEN", daemon.token)
    assert Kiln().health() and "kiln_sandboxes" in Kiln().metrics()


def test_no_daemon_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(KilnConnectionError) as e:
        Kiln(socket=str(tmp_path / "none.sock")).health()
    assert "none.sock" in str(e.value)
    with pytest.raises(ValueError):
        Kiln(socket="/x", url="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        Kiln(url="ftp://127.0.0.1:1")
