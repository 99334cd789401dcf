"""Reads a sandbox's figures out of kilnd's Prometheus text (``GET /metrics``)."""

from __future__ import annotations

import re
from typing import Dict, Optional

from .errors import NotFound, ProtocolError
from .models import SandboxStats

# name{labels} value: label values are quoted with \\, \" and \n escaped.
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\}\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(v: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], v)


def sandbox_stats(text: str, sandbox_id: str) -> SandboxStats:
    """The ``kiln_sandbox_*`` figures labelled ``sandbox=sandbox_id`` in ``text``;
    :class:`~kiln.errors.NotFound` when it has none (no such sandbox)."""
    figures: Dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("kiln_sandbox_"):
            continue
        m = _LINE.match(line.strip())
        if m is None:
            raise ProtocolError(f"a metrics line that does not parse: {line!r}")
        labels = {lm.group("key"): _unescape(lm.group("value")) for lm in _LABEL.finditer(m.group("labels"))}
        if labels.get("sandbox") != sandbox_id:
            continue
        try:
            figures[m.group("name")] = float(m.group("value"))
        except ValueError as e:
            raise ProtocolError(f"a metrics value that is not a number: {line!r}") from e
    if "kiln_sandbox_uptime_seconds" not in figures:
        raise NotFound(404, f"no sandbox {sandbox_id} in kilnd's metrics")

    def opt_int(name: str) -> Optional[int]:
        v = figures.get(name)
        return None if v is None else int(v)

    return SandboxStats(
        uptime_seconds=figures["kiln_sandbox_uptime_seconds"],
        execs=int(figures.get("kiln_sandbox_execs_total", 0)),
        cpu_seconds=figures.get("kiln_sandbox_cpu_seconds_total"),
        rss_bytes=opt_int("kiln_sandbox_rss_bytes"),
        pss_bytes=opt_int("kiln_sandbox_pss_bytes"),
    )
