"""E2B's Python SDK against kilnd, configured the E2B way: by environment only.

E2B_API_KEY    the key kilnd's E2B listener was started with (--e2b-api-key-file or
               $KILND_E2B_API_KEY)
E2B_API_URL    http://HOST:PORT of kilnd's --e2b-listen
E2B_SANDBOX_URL
               the same URL: envd is served by kilnd on the host, not inside the VM

`cargo xtask test --e2b` sets all three against kilnd in the nested lab (`--e2b-host`: against kilnd
on the host with the stand-in VMM, tests marked `vm` left out); the suite expects a `base` template.
"""

import os

import httpx
import pytest
from e2b import Sandbox

for var in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL"):
    if not os.environ.get(var):
        raise pytest.UsageError(f"{var} is not set: the suite talks to kilnd through E2B_* only")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "vm: needs a VM of its own (memory apart for forks, a filesystem apart from kilnd's "
        "machine); `cargo xtask test` runs these in the lab only, not against the stand-in VMM",
    )


@pytest.fixture(scope="module")
def sandbox():
    """A sandbox from the base template shared by the tests that take it (each uses its own paths
    and processes; lab time is TCG-bound), killed afterwards whatever happened."""
    sb = Sandbox.create(template="base", timeout=600)
    yield sb
    try:
        sb.kill()
    except Exception:
        pass


@pytest.fixture
def api():
    """A plain HTTP client on kilnd's E2B listener (for what the SDK would not send)."""
    with httpx.Client(base_url=os.environ["E2B_API_URL"], timeout=60) as c:
        yield c


def open_streams(api) -> int:
    """envd streams kilnd holds open (Kiln's own GET /kiln/streams)."""
    r = api.get("/kiln/streams", headers={"X-API-Key": os.environ["E2B_API_KEY"]})
    r.raise_for_status()
    return r.json()["open"]
