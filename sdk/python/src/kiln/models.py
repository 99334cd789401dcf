"""The shapes kilnd answers with (pool/src/types.rs), as frozen dataclasses, and the events of
its two streams: a command's output and a template build's progress."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import ProtocolError


def _get(d: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"kilnd's {what} has no {key!r}: {d!r}") from e


#: A port to publish: the guest port (on a free host port), ``"HOST:GUEST"`` or ``"GUEST"``.
PortSpec = Union[int, str]


def port_request(spec: PortSpec) -> Dict[str, int]:
    """kilnd's JSON for one published port, or :class:`ValueError` naming the spec."""
    def port(p: Union[int, str]) -> int:
        try:
            n = int(p)
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= 65535 or isinstance(p, bool):
            raise ValueError(f"publish: {spec!r} is not [HOST:]GUEST with ports from 1 to 65535")
        return n

    if isinstance(spec, str) and ":" in spec:
        host, guest = spec.split(":", 1)
        return {"guest_port": port(guest), "host_port": port(host)}
    return {"guest_port": port(spec)}


def network_request(
    allow_domains: Optional[Sequence[str]],
    allow_net: Optional[bool],
    publish: Optional[Sequence[PortSpec]],
) -> Optional[Dict[str, Any]]:
    """The ``network`` of a create: ``None`` when it names no policy and no port (the
    template's default policy)."""
    if isinstance(allow_domains, str):
        raise ValueError("allow_domains: give a list of domains, not one string")
    net: Dict[str, Any] = {}
    if allow_domains is not None:
        net["allow_domains"] = [str(d) for d in allow_domains]
    if allow_net is not None:
        net["allow_net"] = bool(allow_net)
    if publish:
        net["publish"] = [port_request(p) for p in publish]
    return net or None


@dataclass(frozen=True)
class PublishedPort:
    """A guest port published on the host's 127.0.0.1."""

    #: The port on 127.0.0.1.
    host_port: int
    #: The port in the guest.
    guest_port: int


@dataclass(frozen=True)
class NetworkInfo:
    """A sandbox's network: what it may reach, its published ports, what it was refused."""

    #: Names it may resolve and reach on ports 80 and 443 (``*.example.com``: names under it).
    allow_domains: List[str] = field(default_factory=list)
    #: Any egress (but private, loopback, link-local, metadata and the host's own addresses).
    allow_net: bool = False
    #: The guest's address when it has a network interface.
    address: Optional[str] = None
    #: Its published ports while it runs.
    published: List[PublishedPort] = field(default_factory=list)
    #: Lookups and connections refused since kilnd started serving it (in kilnd's log).
    refused: int = 0

    @classmethod
    def from_json(cls, d: Optional[Mapping[str, Any]]) -> "NetworkInfo":
        """Parses kilnd's JSON (a kilnd without networks sends none)."""
        if not d:
            return cls()
        w = "sandbox network"
        return cls(
            allow_domains=list(d.get("allow_domains") or []),
            allow_net=bool(d.get("allow_net", False)),
            address=d.get("address"),
            published=[
                PublishedPort(host_port=_get(p, "host_port", w), guest_port=_get(p, "guest_port", w))
                for p in d.get("published") or []
            ],
            refused=int(d.get("refused", 0)),
        )

    def host_port(self, guest_port: int) -> int:
        """The host port publishing ``guest_port`` (:class:`KeyError` if it is not published)."""
        for p in self.published:
            if p.guest_port == guest_port:
                return p.host_port
        raise KeyError(f"guest port {guest_port} is not published")


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as kilnd shows it."""

    #: Its id.
    id: str
    #: The template's name.
    template: str
    #: The template's id (its content hash).
    template_id: str
    #: ``"running"`` or ``"paused"``.
    state: str
    #: When it was created, seconds since the epoch.
    created_at: int
    #: When it will be killed, seconds since the epoch (a paused sandbox's clock stands still).
    expires_at: int
    #: Its vCPUs.
    vcpus: int
    #: Its memory, MiB.
    mem_mib: int
    #: Its labels.
    metadata: Dict[str, str] = field(default_factory=dict)
    #: Commands run in it so far.
    exec_count: int = 0
    #: Its network.
    network: NetworkInfo = field(default_factory=NetworkInfo)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxInfo":
        """Parses kilnd's JSON."""
        w = "sandbox"
        return cls(
            id=_get(d, "id", w),
            template=_get(d, "template", w),
            template_id=_get(d, "template_id", w),
            state=_get(d, "state", w),
            created_at=_get(d, "created_at", w),
            expires_at=_get(d, "expires_at", w),
            vcpus=_get(d, "vcpus", w),
            mem_mib=_get(d, "mem_mib", w),
            metadata=dict(_get(d, "metadata", w)),
            exec_count=_get(d, "exec_count", w),
            network=NetworkInfo.from_json(d.get("network")),
        )


@dataclass(frozen=True)
class TemplateInfo:
    """A template as kilnd shows it."""

    #: Its name.
    name: str
    #: Its content hash: the same spec and inputs always give the same id.
    id: str
    #: When it was built, seconds since the epoch.
    built_at: int
    #: vCPUs of its sandboxes.
    vcpus: int
    #: Memory of its sandboxes, MiB.
    mem_mib: int
    #: Size of its root filesystem image, MiB.
    disk_mib: int
    #: Warm sandboxes kept ready.
    min_ready: int
    #: Most sandboxes of this template at once (0: no limit beyond the host's).
    max_sandboxes: int
    #: Warm sandboxes ready now.
    ready: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TemplateInfo":
        """Parses kilnd's JSON."""
        w = "template"
        return cls(
            name=_get(d, "name", w),
            id=_get(d, "id", w),
            built_at=_get(d, "built_at", w),
            vcpus=_get(d, "vcpus", w),
            mem_mib=_get(d, "mem_mib", w),
            disk_mib=_get(d, "disk_mib", w),
            min_ready=_get(d, "min_ready", w),
            max_sandboxes=_get(d, "max_sandboxes", w),
            ready=_get(d, "ready", w),
        )


@dataclass(frozen=True)
class DirEntry:
    """An entry of a folder listing."""

    #: Its name.
    name: str
    #: ``"file"``, ``"dir"``, ``"symlink"`` or ``"other"``.
    kind: str
    #: Its size in bytes.
    size: int
    #: Its permission bits (setuid, setgid and sticky included).
    mode: int
    #: Its owner.
    uid: int
    #: Its group.
    gid: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DirEntry":
        """Parses kilnd's JSON."""
        w = "directory entry"
        return cls(
            name=_get(d, "name", w),
            kind=_get(d, "kind", w),
            size=_get(d, "size", w),
            mode=_get(d, "mode", w),
            uid=_get(d, "uid", w),
            gid=_get(d, "gid", w),
        )


@dataclass(frozen=True)
class SandboxStats:
    """A sandbox's figures from kilnd's metrics; the process figures are absent while it is
    paused (no VMM runs)."""

    #: Seconds since it was created.
    uptime_seconds: float
    #: Commands run in it.
    execs: int
    #: CPU time of its VMM, seconds.
    cpu_seconds: Optional[float]
    #: Resident memory of its VMM, bytes (guest memory included).
    rss_bytes: Optional[int]
    #: Proportional memory of its VMM, bytes (snapshot pages shared with clones split between them).
    pss_bytes: Optional[int]


# ---- a command's events ----


@dataclass(frozen=True)
class Started:
    """The process started."""

    #: Its pid in the guest.
    pid: int


@dataclass(frozen=True)
class Stdout:
    """Bytes the process wrote to stdout."""

    #: The bytes.
    data: bytes


@dataclass(frozen=True)
class Stderr:
    """Bytes the process wrote to stderr."""

    #: The bytes.
    data: bytes


@dataclass(frozen=True)
class Exit:
    """The process ended (the last event)."""

    #: Its exit code, when it exited.
    exit_code: Optional[int]
    #: The signal that ended it, when one did.
    signal: Optional[int]
    #: It was killed at its timeout.
    timed_out: bool


#: One event of a command's stream.
ExecEvent = Union[Started, Stdout, Stderr, Exit]


@dataclass(frozen=True)
class ExecResult:
    """What a finished command did."""

    #: Everything it wrote to stdout.
    stdout_bytes: bytes
    #: Everything it wrote to stderr.
    stderr_bytes: bytes
    #: Its exit code (``None`` when a signal ended it).
    exit_code: Optional[int]
    #: The signal that ended it, if one did.
    signal: Optional[int] = None
    #: It was killed at its timeout.
    timed_out: bool = False
    #: Its pid in the guest.
    pid: Optional[int] = None

    @property
    def stdout(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """stderr as text (UTF-8, undecodable bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """It exited 0."""
        return self.exit_code == 0


def _b64(d: Mapping[str, Any], what: str) -> bytes:
    try:
        return base64.b64decode(_get(d, "data_b64", what), validate=True)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"kilnd's {what} is not base64: {d!r}") from e


def exec_event(d: Mapping[str, Any]) -> Union[ExecEvent, "ExecErrorLine"]:
    """One line of a command's stream, parsed."""
    t = d.get("type")
    if t == "started":
        return Started(pid=_get(d, "pid", "started event"))
    if t == "stdout":
        return Stdout(_b64(d, "stdout event"))
    if t == "stderr":
        return Stderr(_b64(d, "stderr event"))
    if t == "exit":
        return Exit(
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            timed_out=bool(d.get("timed_out", False)),
        )
    if t == "error":
        return ExecErrorLine(
            message=str(_get(d, "message", "error event")),
            could_not_start=bool(d.get("could_not_start", False)),
        )
    raise ProtocolError(f"an exec event of unknown type {t!r}: {d!r}")


@dataclass(frozen=True)
class ExecErrorLine:
    """The ``error`` line (raised as :class:`~kiln.errors.ExecError`, never yielded)."""

    message: str
    could_not_start: bool


# ---- a template build's events ----


@dataclass(frozen=True)
class Step:
    """A build step began."""

    #: What it is.
    name: str


@dataclass(frozen=True)
class Progress:
    """Progress within a step."""

    #: Bytes done.
    done: int
    #: Bytes in all, when known.
    total: Optional[int]


@dataclass(frozen=True)
class Output:
    """A line a build command printed."""

    #: The text.
    line: str


@dataclass(frozen=True)
class Done:
    """The build finished (the last event)."""

    #: The template.
    template: TemplateInfo
    #: It was already built: nothing was done.
    cached: bool


#: One event of a template build (a ``failed`` line is raised as
#: :class:`~kiln.errors.BuildFailed`).
BuildEvent = Union[Step, Progress, Output, Done]


@dataclass(frozen=True)
class BuildFailedLine:
    """The ``failed`` line (raised, never yielded)."""

    message: str


def build_event(d: Mapping[str, Any]) -> Union[BuildEvent, BuildFailedLine]:
    """One line of a build's stream, parsed."""
    t = d.get("type")
    if t == "step":
        return Step(str(_get(d, "name", "step event")))
    if t == "progress":
        return Progress(done=_get(d, "done", "progress event"), total=d.get("total"))
    if t == "output":
        return Output(str(_get(d, "line", "output event")))
    if t == "done":
        return Done(
            template=TemplateInfo.from_json(_get(d, "template", "done event")),
            cached=bool(_get(d, "cached", "done event")),
        )
    if t == "failed":
        return BuildFailedLine(str(_get(d, "message", "failed event")))
    raise ProtocolError(f"a build event of unknown type {t!r}: {d!r}")
