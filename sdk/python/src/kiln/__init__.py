"""Kiln's Python SDK: sandboxes in microVMs, served by ``kilnd`` on this host.

::

    from kiln import Kiln, Sandbox

    kiln = Kiln()                       # kilnd's socket ($KILND_SOCKET or its default)
    with Sandbox.create("python", timeout=600, client=kiln) as sb:
        r = sb.exec("python3 -c 'print(6*7)'")
        assert r.stdout == "42\\n" and r.exit_code == 0
        sb.files.write("/root/a.txt", b"hi")
        forks = sb.fork(2)              # two copies of it as it is now

Errors from kilnd are typed by status (:class:`NotFound`, :class:`Conflict`,
:class:`LimitReached`, :class:`BadRequest`) and carry its message. :mod:`kiln.aio` has the same
calls for asyncio.
"""

from .client import Kiln
from .errors import (
    ApiError,
    BadRequest,
    BuildFailed,
    Conflict,
    ExecError,
    KilnConnectionError,
    KilnError,
    LimitReached,
    NotFound,
    ProtocolError,
    ServerError,
    Unauthorized,
)
from .models import (
    BuildEvent,
    DirEntry,
    Done,
    ExecEvent,
    ExecResult,
    Exit,
    NetworkInfo,
    Output,
    Progress,
    PublishedPort,
    SandboxInfo,
    SandboxStats,
    Started,
    Stderr,
    Stdout,
    Step,
    TemplateInfo,
)
from .sandbox import Commands, ExecStream, Files, Sandbox
from .template import BuildStream, Template

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "BadRequest",
    "BuildEvent",
    "BuildFailed",
    "BuildStream",
    "Commands",
    "Conflict",
    "DirEntry",
    "Done",
    "ExecError",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "Exit",
    "Files",
    "Kiln",
    "KilnConnectionError",
    "KilnError",
    "LimitReached",
    "NetworkInfo",
    "NotFound",
    "Output",
    "Progress",
    "ProtocolError",
    "PublishedPort",
    "Sandbox",
    "SandboxInfo",
    "SandboxStats",
    "ServerError",
    "Started",
    "Stderr",
    "Stdout",
    "Step",
    "Template",
    "TemplateInfo",
    "Unauthorized",
]
