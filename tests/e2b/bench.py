"""`cargo xtask bench e2b [--runs N]`: create -> first result of `echo hi` from the `base`
template's warm pool, three ways against the same kilnd in the same run:

- E2B's own SDK, unmodified (``Sandbox.create`` + ``commands.run``), through kilnd's E2B API and
  envd translation;
- Kiln's Python SDK (``create_sandbox`` + ``commands.run``), on kilnd's own API;
- the ``kiln`` CLI (``kiln run --template base -- ...``), timed to its output line.

E2B's SDK runs every command as ``/bin/bash -l -c CMD`` (a login shell reads /etc/profile and
~/.profile: tens of milliseconds in itself), so the other two run that same argv: the guest does
the same work on every path and the figures differ by the path alone.

Each round runs the three in a rotating order, each from a warm pool (the pool is refilled, not
timed, before every create); the sandbox is killed afterwards, not timed. Then the exec round
trip of a sandbox already running, through each SDK, and the bare request round trip to kilnd
(``GET /health``), which every figure above includes at least twice. Configured by environment:
``E2B_*`` and ``KILND_URL``/``KILND_TOKEN`` (set by xtask), ``KILN_CLI`` (the ``kiln`` binary).
Lab timings are TCG-bound: read the ratios, not the milliseconds.
"""

import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

from e2b import Sandbox as E2BSandbox
from kiln import Kiln

TEMPLATE = "base"
# What E2B's ``commands.run("echo hi")`` runs in the sandbox.
ARGV = ["/bin/bash", "-l", "-c", "echo hi"]


def percentile(xs: List[float], p: float) -> float:
    """The nearest-rank percentile of ``xs`` (seconds)."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def fail(msg: str) -> None:
    print(f"bench e2b: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    kiln = Kiln()
    cli = os.environ["KILN_CLI"]
    template = kiln.template(TEMPLATE)
    template.set_pool(1)

    def warm() -> None:
        end = time.monotonic() + 300
        while template.refresh().ready < 1:
            if time.monotonic() > end:
                fail(f"the {TEMPLATE} template's pool had no sandbox ready within 300 s")
            time.sleep(0.05)

    def e2b_create() -> float:
        t = time.perf_counter()
        sb = E2BSandbox.create(template=TEMPLATE, timeout=300)
        r = sb.commands.run("echo hi")
        took = time.perf_counter() - t
        sb.kill()
        if (r.stdout, r.exit_code) != ("hi\n", 0):
            fail(f"e2b SDK: echo hi gave {r.stdout!r}, exit {r.exit_code}")
        return took

    def kiln_create() -> float:
        t = time.perf_counter()
        sb = kiln.create_sandbox(TEMPLATE, timeout=300)
        r = sb.commands.run(ARGV)
        took = time.perf_counter() - t
        sb.kill()
        if (r.stdout, r.exit_code) != ("hi\n", 0):
            fail(f"Kiln SDK: echo hi gave {r.stdout!r}, exit {r.exit_code}")
        return took

    def cli_create() -> float:
        t = time.perf_counter()
        p = subprocess.Popen(
            [cli, "run", "--template", TEMPLATE, "--", *ARGV],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        took = time.perf_counter() - t
        _, err = p.communicate(timeout=300)
        if line != b"hi\n" or p.returncode != 0:
            fail(f"kiln run: {line!r}, exit {p.returncode}: {err.decode(errors='replace')}")
        return took

    paths: Dict[str, Callable[[], float]] = {
        "e2b SDK     Sandbox.create + commands.run": e2b_create,
        "Kiln SDK    create_sandbox + commands.run": kiln_create,
        "kiln run --template base -- bash -l -c ...": cli_create,
    }
    names = list(paths)
    got: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(runs):
        for n in names[i % 3 :] + names[: i % 3]:
            warm()
            got[n].append(paths[n]())

    # A sandbox already running, through each SDK; and kilnd's bare round trip.
    warm()
    running_e2b = E2BSandbox.create(template=TEMPLATE, timeout=300)
    warm()
    running_kiln = kiln.create_sandbox(TEMPLATE, timeout=300)
    exec_e2b: List[float] = []
    exec_kiln: List[float] = []
    health: List[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        running_e2b.commands.run("echo hi")
        exec_e2b.append(time.perf_counter() - t)
        t = time.perf_counter()
        running_kiln.commands.run(ARGV)
        exec_kiln.append(time.perf_counter() - t)
        t = time.perf_counter()
        kiln.health()
        health.append(time.perf_counter() - t)
    running_e2b.kill()
    running_kiln.kill()
    template.set_pool(0)

    def row(name: str, xs: List[float], peer: List[float]) -> str:
        ratio = percentile(xs, 50) / percentile(peer, 50)
        return (
            f"  {name}  p50 {percentile(xs, 50) * 1000:8.1f} ms  "
            f"p99 {percentile(xs, 99) * 1000:8.1f} ms  {ratio:5.2f}x Kiln SDK"
        )

    kiln_sdk = got[names[1]]
    print(
        f"\nbench e2b: create -> first result of `bash -l -c 'echo hi'` from a warm pool "
        f"({runs} runs each, template {TEMPLATE})"
    )
    for n in names:
        print(row(n, got[n], kiln_sdk))
    print(f"\nbench e2b: exec round trip of a running sandbox ({runs} runs each)")
    print(row("e2b SDK     commands.run (envd over Connect) ", exec_e2b, exec_kiln))
    print(row("Kiln SDK    commands.run (kilnd's exec)      ", exec_kiln, exec_kiln))
    print(row("kilnd       GET /health (the request itself) ", health, exec_kiln))


if __name__ == "__main__":
    main()
