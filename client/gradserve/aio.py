"""The asyncio client, on grpc.aio. Same calls and the same RemoteModel as the sync Client.

    async with AsyncClient("127.0.0.1:50051") as client:
        m = await client.create_model(layers=[...], loss="mse")
        await m.backward(X, y)
        async for event in m.train(X, y, epochs=3):
            ...

Requests and replies are built and decoded by the same code as the sync client's (ClientCalls,
RemoteModel, _ops); only sending differs: every call returns an awaitable.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from . import _channel, _ops
from ._ops import Op, TrainEvent
from .client import DEFAULT_TIMEOUT, _RunState
from .errors import GradServeError, from_rpc_error
from .history import History
from .model import ClientCalls

T = TypeVar("T")


class AsyncTrainRun(_RunState):
    """Async iterator of TrainEvent for one server-side run.

    Breaking out of `async for`, leaving `async with run:`, or cancel() stops the run; the
    server keeps the last completed step (model.wait_idle() waits until it has let go).
    """

    def __aiter__(self) -> AsyncIterator[TrainEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TrainEvent]:
        self._open()
        try:
            async for msg in self._call:
                yield self._record(msg)
        except grpc.RpcError as exc:
            self._failed(exc)
        except asyncio.CancelledError:
            # grpc.aio ends a read with CancelledError when the call is cancelled locally: after
            # our own cancel() that is the normal end. A cancelled task still propagates.
            if not self._cancelled or _task_cancelling():
                raise
        finally:
            self._close()

    def cancel(self) -> None:
        """Stop the server loop (it keeps the last completed step)."""
        if not self._call.done():
            self._cancelled = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncTrainRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


class AsyncClient(ClientCalls):
    """asyncio connection to a gradserve server; the same calls as Client, awaited.

        async with AsyncClient("127.0.0.1:50051") as client:
            m = await client.create_model(layers=[...], loss="mse")
            out = await m.forward(X)

    Options as for Client. Create it inside a running event loop (grpc.aio binds to it).
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | None = None,
                 client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = 3,
                 max_message_mb: int = 512) -> None:
        creds = _channel.credentials(tls, root_certificates, client_cert, client_key)
        opts = _channel.options(max_message_mb)
        self.address = address
        self._channel = (grpc.aio.secure_channel(address, creds, opts) if creds
                         else grpc.aio.insecure_channel(address, opts))
        self._stub = _channel.stub(self._channel)  # Forward/Backward framed by gradserve.wire
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _channel.metadata(token)
        self.timeout = timeout
        self.retries = retries

    # ------------------------------------------------------------------ plumbing

    async def _run(self, op: Op[T], timeout: float | None = None) -> T:
        method = getattr(self._stub if op.service == "gradient" else self._health, op.rpc)
        delays = _channel.backoff(self.retries if op.retryable else 0)
        while True:
            try:
                reply = await method(op.request,
                                     timeout=_channel.deadline(op, timeout, self.timeout),
                                     metadata=self._metadata)
                return op.decode(reply)
            except grpc.RpcError as exc:
                delay = _channel.retry_delay(exc, delays)
                if delay is None:
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(delay)

    async def _drive(self, program: _ops.Program[T]) -> T:
        """Run a Program (see _ops) with awaited calls and sleeps."""
        reply: Any = None
        error: GradServeError | None = None
        while True:
            try:
                item = program.throw(error) if error is not None else program.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            reply = error = None
            if isinstance(item, tuple):
                try:
                    reply = await self._run(*item)
                except GradServeError as exc:
                    error = exc
            else:
                await asyncio.sleep(item)

    def _train(self, op: Op[TrainEvent], total: int | None, progress: bool | None,
               timeout: float | None) -> AsyncTrainRun:
        if progress is None:
            progress = sys.stdout.isatty()
        call = self._stub.Train(op.request, timeout=timeout, metadata=self._metadata)
        return AsyncTrainRun(call, total, progress)

    @staticmethod
    async def _fit(run: AsyncTrainRun) -> History:
        history = History()
        async for event in run:
            history.add(event)
        return history

    async def _bidi(self, rpc: str, requests: Any, decode: Any) -> AsyncIterator[Any]:
        call = getattr(self._stub, rpc)(requests, metadata=self._metadata)
        try:
            async for reply in call:
                yield decode(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncTrainRun"]
