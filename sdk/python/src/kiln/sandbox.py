"""Sandboxes: create, run commands (whole or streamed), files, fork, pause and resume, kill.

A :class:`Sandbox` is a handle on one of kilnd's sandboxes plus the last state kilnd reported
for it; the calls that change it (``pause``, ``resume``, ``set_timeout``) refresh that state.
"""

from __future__ import annotations

import base64
import codecs
import json
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)
from urllib.parse import quote

from ._transport import LineStream, path_query
from .errors import ExecError, NotFound, ProtocolError
from .models import (
    DirEntry,
    ExecErrorLine,
    ExecEvent,
    ExecResult,
    Exit,
    NetworkInfo,
    PortSpec,
    SandboxInfo,
    SandboxStats,
    Started,
    Stderr,
    Stdout,
    exec_event,
)
from .metrics import sandbox_stats

if TYPE_CHECKING:
    from .client import Kiln

#: A command: an argv list, or a string run with ``sh -c``.
Command = Union[str, Sequence[str]]
#: A callback given the text a command writes, as it arrives.
OutputCallback = Callable[[str], Any]


def _argv(cmd: Command) -> List[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ValueError("the command is empty")
        return ["sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("the command's argv is empty")
    return argv


def _exec_request(
    cmd: Command,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Optional[str],
    stdin: Union[bytes, str, None],
    timeout: Optional[float],
) -> Dict[str, Any]:
    req: Dict[str, Any] = {"argv": _argv(cmd)}
    if env:
        req["env"] = {str(k): str(v) for k, v in env.items()}
    if cwd is not None:
        req["cwd"] = cwd
    if user is not None:
        req["user"] = user
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"timeout {timeout!r} is not a positive number of seconds")
        req["timeout_ms"] = max(1, int(timeout * 1000))
    if stdin is not None:
        data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        req["stdin_b64"] = base64.b64encode(data).decode()
    return req


class ExecStream:
    """A running command's events (:class:`~kiln.models.Started`, :class:`~kiln.models.Stdout`,
    :class:`~kiln.models.Stderr`, and last :class:`~kiln.models.Exit`), yielded as kilnd sends
    them. A command that cannot start, or a sandbox that fails under it, raises
    :class:`~kiln.errors.ExecError`. Output is also kept, so :meth:`wait` returns all of it
    whatever was iterated before. Closing the stream early cancels the command: kilnd kills it
    when it next has output for the stream (a silent one runs on to its end or timeout)."""

    def __init__(self, lines: LineStream, argv: List[str]) -> None:
        self._lines = lines
        self._argv = argv
        self._out: List[bytes] = []
        self._err: List[bytes] = []
        self._pid: Optional[int] = None
        #: The last event, once the command ended.
        self.exit: Optional[Exit] = None

    def __iter__(self) -> Iterator[ExecEvent]:
        return self

    def __next__(self) -> ExecEvent:
        if self.exit is not None:
            raise StopIteration
        try:
            line = next(self._lines)
        except StopIteration:
            raise ProtocolError(
                f"the stream of {self._argv!r} ended without its exit"
            ) from None
        ev = exec_event(line)
        if isinstance(ev, ExecErrorLine):
            self.close()
            raise ExecError(ev.message, ev.could_not_start)
        if isinstance(ev, Started):
            self._pid = ev.pid
        elif isinstance(ev, Stdout):
            self._out.append(ev.data)
        elif isinstance(ev, Stderr):
            self._err.append(ev.data)
        elif isinstance(ev, Exit):
            self.exit = ev
            self.close()
        return ev

    def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> ExecResult:
        """Follows the command to its end, passing the text of what it writes from now on to
        the callbacks, and returns all it did."""
        dec_out = codecs.getincrementaldecoder("utf-8")("replace")
        dec_err = codecs.getincrementaldecoder("utf-8")("replace")
        for ev in self:
            if isinstance(ev, Stdout) and on_stdout is not None:
                text = dec_out.decode(ev.data)
                if text:
                    on_stdout(text)
            elif isinstance(ev, Stderr) and on_stderr is not None:
                text = dec_err.decode(ev.data)
                if text:
                    on_stderr(text)
        for dec, cb in ((dec_out, on_stdout), (dec_err, on_stderr)):
            rest = dec.decode(b"", final=True)
            if rest and cb is not None:
                cb(rest)
        assert self.exit is not None
        return ExecResult(
            stdout_bytes=b"".join(self._out),
            stderr_bytes=b"".join(self._err),
            exit_code=self.exit.exit_code,
            signal=self.exit.signal,
            timed_out=self.exit.timed_out,
            pid=self._pid,
        )

    def close(self) -> None:
        """Stops following the command, which kilnd then cancels."""
        self._lines.close()

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Files:
    """A sandbox's files (paths are absolute paths in the sandbox)."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def _path(self, route: str, path: str, **extra: str) -> str:
        return path_query(f"/sandboxes/{quote(self._sb.id, safe='')}/{route}", {"path": path, **extra})

    def read(self, path: str) -> bytes:
        """The bytes of file ``path`` (:class:`~kiln.errors.NotFound` if it is missing)."""
        return self._sb._kiln._t.read("GET", self._path("files", path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """File ``path`` as text."""
        return self.read(path).decode(encoding)

    def write(self, path: str, data: Union[bytes, str], mode: Optional[int] = None) -> int:
        """Writes ``data`` to ``path`` (parent folders made; ``mode``, e.g. ``0o755``, for a new
        file); returns the bytes written."""
        body = data.encode() if isinstance(data, str) else bytes(data)
        extra = {} if mode is None else {"mode": format(mode, "o")}
        ans = self._sb._kiln._t.read(
            "PUT", self._path("files", path, **extra), body, "application/octet-stream"
        )
        try:
            return int(json.loads(ans)["bytes"])
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"kilnd's answer to a write of {path}: {ans[:200]!r}") from e

    def list(self, path: str) -> List[DirEntry]:
        """The entries of folder ``path``."""
        return [DirEntry.from_json(e) for e in self._sb._kiln._t.json("GET", self._path("dir", path))]

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes ``path`` (a folder and what is in it with ``recursive``)."""
        extra = {"recursive": "true"} if recursive else {}
        self._sb._kiln._t.read("DELETE", self._path("files", path, **extra))


class Commands:
    """E2B's shape for running commands: ``sandbox.commands.run(cmd, on_stdout=...)``."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def run(
        self,
        cmd: Command,
        *,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
    ) -> ExecResult:
        """Runs ``cmd`` to its end: :meth:`Sandbox.exec`."""
        return self._sb.exec(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            stdin=stdin,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )


class Sandbox:
    """One of kilnd's sandboxes. ``with Sandbox.create(...) as sb:`` kills it on leaving."""

    def __init__(self, kiln: "Kiln", info: SandboxInfo) -> None:
        self._kiln = kiln
        self._info = info
        #: Its files.
        self.files = Files(self)
        #: E2B's shape for commands.
        self.commands = Commands(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, template={self.template!r}, state={self.state!r})"

    # ---- finding and making ----

    @classmethod
    def create(
        cls,
        template: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_domains: Optional[Sequence[str]] = None,
        allow_net: Optional[bool] = None,
        publish: Optional[Sequence[PortSpec]] = None,
        client: Optional["Kiln"] = None,
    ) -> "Sandbox":
        """A new sandbox of ``template`` (its name or id): ``timeout`` is its lifetime in
        seconds (kilnd's default without), ``env`` the environment of its commands (over the
        template's), ``metadata`` labels to filter by. Its network is its template's default
        policy (no egress unless the template's spec allows some) unless ``allow_domains`` (names
        it may reach on ports 80 and 443; ``*.example.com`` for the names under it) or
        ``allow_net`` (any egress but private, metadata and the host's addresses) say otherwise;
        ``allow_domains=[]`` is no egress at all. ``publish`` lists guest ports to publish on
        the host's 127.0.0.1 (``8080`` on a free port, ``"18080:8080"`` on 18080): see
        :attr:`network`. ``client`` defaults to ``Kiln()``."""
        from .client import Kiln

        return (client or Kiln()).create_sandbox(
            template,
            timeout=timeout,
            env=env,
            metadata=metadata,
            allow_domains=allow_domains,
            allow_net=allow_net,
            publish=publish,
        )

    @classmethod
    def connect(cls, sandbox_id: str, client: Optional["Kiln"] = None) -> "Sandbox":
        """The existing sandbox ``sandbox_id``."""
        from .client import Kiln

        return (client or Kiln()).sandbox(sandbox_id)

    # ---- what it is ----

    @property
    def id(self) -> str:
        """Its id."""
        return self._info.id

    @property
    def template(self) -> str:
        """Its template's name."""
        return self._info.template

    @property
    def state(self) -> str:
        """``"running"`` or ``"paused"``, as last reported (see :meth:`refresh`)."""
        return self._info.state

    @property
    def metadata(self) -> Dict[str, str]:
        """Its labels."""
        return dict(self._info.metadata)

    @property
    def info(self) -> SandboxInfo:
        """Everything kilnd last reported about it."""
        return self._info

    @property
    def network(self) -> NetworkInfo:
        """Its network as last reported: policy, published ports (``.host_port(8080)``), the
        count of refusals."""
        return self._info.network

    def refresh(self) -> SandboxInfo:
        """Asks kilnd for its state now (:class:`~kiln.errors.NotFound` once it is gone)."""
        self._info = SandboxInfo.from_json(self._kiln._t.json("GET", self._url()))
        return self._info

    def is_running(self) -> bool:
        """Whether it exists and runs now."""
        try:
            return self.refresh().state == "running"
        except NotFound:
            return False

    def stats(self) -> SandboxStats:
        """Its CPU time, memory (RSS and PSS), uptime and command count, from kilnd's metrics."""
        return sandbox_stats(self._kiln.metrics(), self.id)

    def _url(self, tail: str = "") -> str:
        return f"/sandboxes/{quote(self.id, safe='')}{tail}"

    # ---- commands ----

    def exec_stream(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        timeout: Optional[float] = None,
    ) -> ExecStream:
        """Starts ``cmd`` (an argv list, or a string for ``sh -c``) and returns its events as
        they come. ``env`` goes over the sandbox's, ``cwd`` defaults to the template's (else
        ``/``), ``user`` is ``name``, ``uid``, ``name:group`` or ``uid:gid``, ``stdin`` is fed
        and closed (``/dev/null`` without), ``timeout`` (seconds) kills it."""
        req = _exec_request(cmd, env, cwd, user, stdin, timeout)
        resp = self._kiln._t.open("POST", self._url("/exec"), json.dumps(req).encode(), stream=True)
        return ExecStream(LineStream(resp, f"exec {req['argv']!r} in {self.id}"), req["argv"])

    def exec(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> ExecResult:
        """Runs ``cmd`` to its end (options as :meth:`exec_stream`), passing its output to the
        callbacks as it comes; returns its stdout, stderr and exit code. A non-zero exit is a
        result, not an error; a command that cannot start raises
        :class:`~kiln.errors.ExecError`."""
        with self.exec_stream(cmd, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout) as s:
            return s.wait(on_stdout, on_stderr)

    def run(self, cmd: Command, **kwargs: Any) -> ExecResult:
        """The same as :meth:`exec`."""
        return self.exec(cmd, **kwargs)

    # ---- lifecycle ----

    def fork(self, count: int = 1) -> List["Sandbox"]:
        """``count`` (1 to 16) new sandboxes, each a copy of this one as it is now (memory,
        files, processes), with its environment and labels."""
        ans = self._kiln._t.json("POST", self._url("/fork"), {"count": count})
        return [Sandbox(self._kiln, SandboxInfo.from_json(i)) for i in ans]

    def pause(self) -> None:
        """Pauses it to disk: its VM ends and its lifetime stands still until :meth:`resume`."""
        self._info = SandboxInfo.from_json(self._kiln._t.json("POST", self._url("/pause")))

    def resume(self) -> None:
        """Brings a paused sandbox back, as it was."""
        self._info = SandboxInfo.from_json(self._kiln._t.json("POST", self._url("/resume")))

    def set_timeout(self, seconds: int) -> None:
        """Kills it ``seconds`` from now (instead of at its old expiry)."""
        self._info = SandboxInfo.from_json(
            self._kiln._t.json("POST", self._url("/timeout"), {"timeout_s": int(seconds)})
        )

    def kill(self) -> None:
        """Kills it and removes its files (:class:`~kiln.errors.NotFound` if already gone)."""
        self._kiln._t.read("DELETE", self._url())

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill()
        except NotFound:
            pass  # it expired or was killed already: what leaving wanted
