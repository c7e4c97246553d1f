"""Reads and writes that wait on the peer, watched: a stream idle too long is ended.

Every read of a request message and every write of a streamed reply goes through a StreamWatch.
While it waits on the peer (a message that has not come, or a client that does not read), the
call is in the watch's table; a sweep on the event loop ends calls that waited longer than
`--stream-idle-seconds` with DEADLINE_EXCEEDED. On shutdown, calls waiting to read end at once
with UNAVAILABLE. Nothing here holds a thread: a waiting call is a suspended coroutine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from ..core.errors import Aborted, GradServeFault


class StreamIdle(GradServeFault):
    """The peer sent nothing (or read nothing) for longer than the idle limit."""


class DeadlinePassed(GradServeFault):
    """The caller's deadline passed before its request arrived."""


EOF = grpc.aio.EOF
# A caller that cancels ends the pending read with EOF a moment before the cancellation itself
# reaches the call's task; this long is waited for it before EOF counts as a malformed call.
CANCEL_GRACE_S = 0.05


async def explain_eof(context: Any) -> None:
    """An EOF where a message was due: raise DeadlinePassed, or let a cancellation in flight
    arrive (CancelledError), before the caller treats it as a malformed call."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlinePassed("the deadline passed before the request message arrived")
    await asyncio.sleep(CANCEL_GRACE_S)


class StreamWatch:
    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._waiting: dict[asyncio.Task[Any], tuple[float, str, str]] = {}
        self._expired: dict[asyncio.Task[Any], str] = {}
        self.closing = False

    async def read(self, context: Any, method: str) -> Any:
        """The next request message (bytes), or EOF."""
        if self.closing:
            raise Aborted("the server is shutting down; retry on another instance")
        return await self._wait(context.read(), method, "read")

    async def write(self, context: Any, method: str, message: Any) -> None:
        await self._wait(context.write(message), method, "write")

    async def _wait(self, awaitable: Any, method: str, kind: str) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = (time.monotonic(), method, kind)
        try:
            return await awaitable
        except asyncio.CancelledError:
            reason = self._expired.pop(task, None)
            if reason is None:
                raise  # the caller cancelled, its deadline passed, or the server stopped it
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            if reason == "shutdown":
                raise Aborted("the server is shutting down; retry on another instance") from None
            raise StreamIdle(reason) from None
        finally:
            self._waiting.pop(task, None)

    def sweep(self) -> int:
        """End calls that waited on their peer longer than the limit; returns how many."""
        if self.idle_s <= 0:
            return 0
        deadline = time.monotonic() - self.idle_s
        ended = 0
        for task, (since, method, kind) in list(self._waiting.items()):
            if since < deadline and task not in self._expired:
                what = ("sent no message" if kind == "read"
                        else "read none of the replies")
                self._expired[task] = (
                    f"{method}: the client {what} for {self.idle_s:g} s; the stream idle limit "
                    "(--stream-idle-seconds) ended the call")
                task.cancel()
                ended += 1
        return ended

    def close(self) -> None:
        """Shutdown: calls waiting for a request message end now; later reads fail at once."""
        self.closing = True
        for task, (_since, _method, kind) in list(self._waiting.items()):
            if kind == "read" and task not in self._expired:
                self._expired[task] = "shutdown"
                task.cancel()

    def __len__(self) -> int:
        return len(self._waiting)
