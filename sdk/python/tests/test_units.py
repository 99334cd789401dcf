"""The SDK's pieces that need no kilnd: metrics parsing, spec files, errors by status."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import BadRequest, Conflict, KilnError, LimitReached, NotFound, ProtocolError, ServerError
from kiln.errors import ApiError, api_error
from kiln.metrics import sandbox_stats
from kiln.template import load_spec

METRICS = """# HELP kiln_sandbox_rss_bytes Resident memory
kiln_sandboxes{state="running"} 2
kiln_sandbox_uptime_seconds{sandbox="a",template="t"} 12
kiln_sandbox_execs_total{sandbox="a",template="t"} 3
kiln_sandbox_cpu_seconds_total{sandbox="a",template="t"} 0.250
kiln_sandbox_rss_bytes{sandbox="a",template="t"} 4096
kiln_sandbox_pss_bytes{sandbox="a",template="t"} 2048
kiln_sandbox_uptime_seconds{sandbox="b\\"x",template="t"} 5
kiln_sandbox_execs_total{sandbox="b\\"x",template="t"} 0
"""


def test_metrics_are_read_for_one_sandbox() -> None:
    a = sandbox_stats(METRICS, "a")
    assert (a.uptime_seconds, a.execs, a.cpu_seconds, a.rss_bytes, a.pss_bytes) == (12, 3, 0.25, 4096, 2048)
    b = sandbox_stats(METRICS, 'b"x')
    assert (b.execs, b.rss_bytes, b.cpu_seconds) == (0, None, None)
    with pytest.raises(NotFound):
        sandbox_stats(METRICS, "c")
    with pytest.raises(ProtocolError):
        sandbox_stats('kiln_sandbox_execs_total{sandbox="a"} many\n', "a")


def test_spec_files_resolve_relative_sources(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text('name = "x"\n[from]\ndir = "tree"\n')
    assert load_spec(tmp_path / "spec.toml") == {"name": "x", "from": {"dir": str(tmp_path / "tree")}}
    (tmp_path / "abs.toml").write_text('name = "x"\n[from]\nimage = "/i.ext4"\n')
    assert load_spec(str(tmp_path / "abs.toml"))["from"] == {"image": "/i.ext4"}
    with pytest.raises(KilnError) as e:
        load_spec(tmp_path / "missing.toml")
    assert "missing.toml" in str(e.value)
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(KilnError) as e:
        load_spec(tmp_path / "bad.toml")
    assert "bad.toml" in str(e.value)


def test_errors_are_typed_by_status() -> None:
    for status, cls in [(400, BadRequest), (404, NotFound), (409, Conflict), (429, LimitReached), (500, ServerError)]:
        e = api_error(status, "sandbox x is paused")
        assert type(e) is cls and e.status == status and e.message == "sandbox x is paused"
        assert isinstance(e, ApiError) and isinstance(e, KilnError)
    assert type(api_error(418, "teapot")) is ApiError


def test_network_options_become_kilnds_request() -> None:
    from kiln.models import NetworkInfo, network_request

    assert network_request(None, None, None) is None, "the template's default policy"
    assert network_request(["pypi.org"], None, [8080, "18080:8081"]) == {
        "allow_domains": ["pypi.org"],
        "publish": [{"guest_port": 8080}, {"guest_port": 8081, "host_port": 18080}],
    }
    assert network_request([], False, None) == {"allow_domains": [], "allow_net": False}
    for bad in [0, "x", "1:2:3", 70000, "8080:"]:
        with pytest.raises(ValueError, match="publish"):
            network_request(None, None, [bad])
    with pytest.raises(ValueError, match="allow_domains"):
        network_request("pypi.org", None, None)
    info = NetworkInfo.from_json(
        {"allow_domains": ["a.io"], "allow_net": False, "address": "172.16.0.2",
         "published": [{"host_port": 40001, "guest_port": 8080}], "refused": 2}
    )
    assert (info.host_port(8080), info.refused, info.address) == (40001, 2, "172.16.0.2")
    with pytest.raises(KeyError):
        info.host_port(9)
    assert NetworkInfo.from_json(None) == NetworkInfo()
