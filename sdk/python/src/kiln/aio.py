"""The SDK for asyncio: the same calls as :mod:`kiln`, awaitable, streams as async iterators.

kilnd's API is one short HTTP/1.1 exchange per call over a local socket, so each call runs the
blocking client on a worker thread (``asyncio.to_thread``) rather than carrying a second HTTP
implementation; the event loop is never blocked, and a stream's events are awaited one by one
as they arrive.

::

    from kiln.aio import AsyncKiln

    kiln = AsyncKiln()
    async with await kiln.create_sandbox("python") as sb:
        r = await sb.exec("python3 -c 'print(6*7)'")
        async for ev in await sb.exec_stream("for i in 1 2 3; do echo $i; sleep 1; done"):
            print(ev)
"""

from __future__ import annotations

import asyncio
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Generic,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from .client import Kiln
from .errors import NotFound
from .models import (
    BuildEvent,
    DirEntry,
    ExecEvent,
    ExecResult,
    NetworkInfo,
    PortSpec,
    SandboxInfo,
    SandboxStats,
    TemplateInfo,
)
from .sandbox import Command, ExecStream, OutputCallback, Sandbox
from .template import BuildStream, SpecLike, Template

T = TypeVar("T")

_END = object()


def _next_or_end(it: Iterator[T]) -> Union[T, object]:
    # StopIteration cannot cross a future; a sentinel does.
    return next(it, _END)


class AsyncEvents(Generic[T]):
    """A blocking stream's events as an async iterator; ``aclose()`` (or leaving ``async with``)
    stops following."""

    def __init__(self, stream: Union[ExecStream, BuildStream]) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        item = await asyncio.to_thread(_next_or_end, self._stream)
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stops following."""
        await asyncio.to_thread(self._stream.close)

    async def __aenter__(self) -> "AsyncEvents[T]":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncExecStream(AsyncEvents[ExecEvent]):
    """A running command's events (see :class:`kiln.ExecStream`)."""

    def __init__(self, stream: ExecStream) -> None:
        super().__init__(stream)
        self._exec = stream

    async def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> ExecResult:
        """Follows the command to its end; all it did (callbacks run on the worker thread)."""
        return await asyncio.to_thread(self._exec.wait, on_stdout, on_stderr)


class AsyncFiles:
    """A sandbox's files (see :class:`kiln.Files`)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._f = sandbox.files

    async def read(self, path: str) -> bytes:
        """The bytes of file ``path``."""
        return await asyncio.to_thread(self._f.read, path)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """File ``path`` as text."""
        return await asyncio.to_thread(self._f.read_text, path, encoding)

    async def write(self, path: str, data: Union[bytes, str], mode: Optional[int] = None) -> int:
        """Writes ``data`` to ``path``; the bytes written."""
        return await asyncio.to_thread(self._f.write, path, data, mode)

    async def list(self, path: str) -> List[DirEntry]:
        """The entries of folder ``path``."""
        return await asyncio.to_thread(self._f.list, path)

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Removes ``path``."""
        await asyncio.to_thread(self._f.remove, path, recursive)


class AsyncSandbox:
    """One of kilnd's sandboxes (see :class:`kiln.Sandbox`); ``async with`` kills it on leaving."""

    def __init__(self, sandbox: Sandbox) -> None:
        #: The blocking handle underneath.
        self.sync = sandbox
        #: Its files.
        self.files = AsyncFiles(sandbox)

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    @classmethod
    async def create(
        cls,
        template: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_domains: Optional[Sequence[str]] = None,
        allow_net: Optional[bool] = None,
        publish: Optional[Sequence[PortSpec]] = None,
        client: Optional["AsyncKiln"] = None,
    ) -> "AsyncSandbox":
        """A new sandbox of ``template`` (see :meth:`kiln.Sandbox.create`)."""
        return await (client or AsyncKiln()).create_sandbox(
            template,
            timeout=timeout,
            env=env,
            metadata=metadata,
            allow_domains=allow_domains,
            allow_net=allow_net,
            publish=publish,
        )

    @property
    def id(self) -> str:
        """Its id."""
        return self.sync.id

    @property
    def state(self) -> str:
        """``"running"`` or ``"paused"``, as last reported."""
        return self.sync.state

    @property
    def info(self) -> SandboxInfo:
        """Everything kilnd last reported about it."""
        return self.sync.info

    @property
    def network(self) -> NetworkInfo:
        """Its network as last reported (see :attr:`kiln.Sandbox.network`)."""
        return self.sync.network

    async def refresh(self) -> SandboxInfo:
        """Its state now."""
        return await asyncio.to_thread(self.sync.refresh)

    async def stats(self) -> SandboxStats:
        """Its CPU time, memory, uptime and command count."""
        return await asyncio.to_thread(self.sync.stats)

    async def exec_stream(self, cmd: Command, **kwargs: Any) -> AsyncExecStream:
        """Starts ``cmd`` (options as :meth:`kiln.Sandbox.exec_stream`); its events."""
        stream = await asyncio.to_thread(lambda: self.sync.exec_stream(cmd, **kwargs))
        return AsyncExecStream(stream)

    async def exec(self, cmd: Command, **kwargs: Any) -> ExecResult:
        """Runs ``cmd`` to its end (options as :meth:`kiln.Sandbox.exec`)."""
        return await asyncio.to_thread(lambda: self.sync.exec(cmd, **kwargs))

    async def fork(self, count: int = 1) -> List["AsyncSandbox"]:
        """``count`` copies of it as it is now."""
        return [AsyncSandbox(s) for s in await asyncio.to_thread(self.sync.fork, count)]

    async def pause(self) -> None:
        """Pauses it to disk."""
        await asyncio.to_thread(self.sync.pause)

    async def resume(self) -> None:
        """Brings it back."""
        await asyncio.to_thread(self.sync.resume)

    async def set_timeout(self, seconds: int) -> None:
        """Kills it ``seconds`` from now."""
        await asyncio.to_thread(self.sync.set_timeout, seconds)

    async def kill(self) -> None:
        """Kills it."""
        await asyncio.to_thread(self.sync.kill)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill()
        except NotFound:
            pass  # already gone: what leaving wanted


class AsyncKiln:
    """A client for one kilnd (arguments as :class:`kiln.Kiln`)."""

    def __init__(
        self,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = 300.0,
    ) -> None:
        #: The blocking client underneath.
        self.sync = Kiln(socket=socket, url=url, token=token, timeout=timeout)

    async def health(self) -> bool:
        """Whether kilnd answers."""
        return await asyncio.to_thread(self.sync.health)

    async def metrics(self) -> str:
        """kilnd's Prometheus text."""
        return await asyncio.to_thread(self.sync.metrics)

    async def create_sandbox(
        self,
        template: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_domains: Optional[Sequence[str]] = None,
        allow_net: Optional[bool] = None,
        publish: Optional[Sequence[PortSpec]] = None,
    ) -> AsyncSandbox:
        """A new sandbox (see :meth:`kiln.Sandbox.create`)."""
        sb = await asyncio.to_thread(
            lambda: self.sync.create_sandbox(
                template,
                timeout=timeout,
                env=env,
                metadata=metadata,
                allow_domains=allow_domains,
                allow_net=allow_net,
                publish=publish,
            )
        )
        return AsyncSandbox(sb)

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """Sandbox ``sandbox_id``."""
        return AsyncSandbox(await asyncio.to_thread(self.sync.sandbox, sandbox_id))

    async def sandboxes(
        self,
        *,
        template: Optional[str] = None,
        state: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> List[AsyncSandbox]:
        """Sandboxes, filtered as :meth:`kiln.Kiln.sandboxes`."""
        found = await asyncio.to_thread(
            lambda: self.sync.sandboxes(template=template, state=state, metadata=metadata)
        )
        return [AsyncSandbox(s) for s in found]

    async def templates(self) -> List[TemplateInfo]:
        """Every template."""
        return [t.info for t in await asyncio.to_thread(self.sync.templates)]

    async def build_template(
        self, spec: SpecLike, *, on_event: Optional[Callable[[BuildEvent], Any]] = None
    ) -> TemplateInfo:
        """Builds a template (see :meth:`kiln.Template.build`)."""
        t: Template = await asyncio.to_thread(
            lambda: self.sync.build_template(spec, on_event=on_event)
        )
        return t.info

    async def build_template_stream(self, spec: SpecLike) -> AsyncEvents[BuildEvent]:
        """Starts a build; its progress as it comes."""
        return AsyncEvents(await asyncio.to_thread(self.sync.build_template_stream, spec))

    async def remove_template(self, name: str) -> None:
        """Removes template ``name``."""
        await asyncio.to_thread(self.sync.remove_template, name)
