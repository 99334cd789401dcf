"""What the tests of Firecracker's clients share: the paths `cargo xtask clients` hands over, a
console reader for the tiny counting guest, and a raw HTTP prober for an API socket.

The guest (vmm/tests/common/tiny_kernel.rs, `Program::Counter`) counts forever in the 32-bit word
at KILN_COUNTER_ADDR and prints a `.` to COM1 every 16384 counts: its dots show it runs, and a
full snapshot's memory file holds its count at that offset.
"""

import os
import shutil
import socket
import struct
import tempfile
import time

import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests with `cargo xtask clients`")
    return value


@pytest.fixture(scope="session")
def kiln():
    """Paths given by `cargo xtask clients`."""
    return {
        "vmm": _env("KILN_VMM"),
        "jailer": _env("KILN_JAILER"),
        "counter": _env("KILN_TINY_COUNTER"),
        "counter_addr": int(_env("KILN_COUNTER_ADDR")),
        "swagger": _env("KILN_FIRECRACKER_SWAGGER"),
        "openapi": _env("KILN_OPENAPI"),
    }


@pytest.fixture
def short_dir():
    """A fresh folder with a short path, for Unix sockets (a sockaddr_un holds 108 bytes)."""
    path = tempfile.mkdtemp(prefix="kfc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(what, check, limit=30.0):
    """Polls `check` until it returns something true, failing with `what` after `limit` s."""
    start = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() - start > limit:
            pytest.fail(f"{what} did not happen within {limit} s")
        time.sleep(0.02)


def dots(path):
    """How many dots the guest has printed to the console file at `path`."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b".")
    except FileNotFoundError:
        return 0


def wait_dots(path, n):
    """Waits until the guest printed `n` more dots to `path` than it had."""
    want = dots(path) + n
    wait_for(f"{n} more dots in {path}", lambda: dots(path) >= want)


def count_in(mem_file, addr):
    """The guest's count as saved in a memory file."""
    with open(mem_file, "rb") as f:
        f.seek(addr)
        return struct.unpack("<I", f.read(4))[0]


def get_root(sock_path, timeout=5.0):
    """One fresh connection, `GET /`: returns (status, seconds taken), or raises."""
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - start
