"""kiln.aio against a real kilnd: awaitable calls, async streams, calls that really overlap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import Daemon

from kiln import Conflict, Exit, NotFound, Stdout, Template
from kiln.aio import AsyncKiln, AsyncSandbox


def test_async_calls(daemon: Daemon, template: Template, work: Path) -> None:
    async def main() -> None:
        k = AsyncKiln(socket=daemon.socket)
        assert await k.health()
        async with await AsyncSandbox.create("t", env={"WHO": "async"}, client=k) as sb:
            r = await sb.exec("echo $WHO; exit 4")
            assert (r.stdout, r.exit_code) == ("async\n", 4)
            # Two commands that each wait for the other's file finish only if they run at once.
            a, b = work / "a", work / "b"
            both = await asyncio.gather(
                sb.exec(f"touch {a}; while [ ! -f {b} ]; do sleep 0.02; done; echo A", timeout=20),
                sb.exec(f"touch {b}; while [ ! -f {a} ]; do sleep 0.02; done; echo B", timeout=20),
            )
            assert [x.stdout for x in both] == ["A\n", "B\n"]
            stream = await sb.exec_stream("echo 1; echo 2")
            events = [ev async for ev in stream]
            assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"1\n2\n"
            assert events[-1] == Exit(exit_code=0, signal=None, timed_out=False)
            assert await sb.files.write(f"{work}/f", b"async bytes") == 11
            assert await sb.files.read(f"{work}/f") == b"async bytes"
            forks = await sb.fork(2)
            assert len({f.id for f in forks} | {sb.id}) == 3
            for f in forks:
                await f.kill()
            await sb.pause()
            assert sb.state == "paused"
            with pytest.raises(Conflict):
                await sb.exec("true")
            await sb.resume()
            assert (await sb.refresh()).state == "running"
            sid = sb.id
        with pytest.raises(NotFound):
            await k.sandbox(sid)
        assert [t.name for t in await k.templates()] == ["t"]

    asyncio.run(main())
