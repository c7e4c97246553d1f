"""The gRPC server: grpc.aio on an event loop of its own thread, driven by a synchronous API.

GradServer (app.py) builds it, starts it and stops it from ordinary threads (the CLI's main
thread, the tests); every grpc.aio object lives on the loop thread and is only touched there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .interceptors import ObservabilityInterceptor
from .lanes import Lanes
from .streams import StreamWatch

log = logging.getLogger("gradserve")
T = TypeVar("T")
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str = "gradserve-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on the loop and wait for its result from this (another) thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class AioServer:
    """A grpc.aio server with health, reflection and the housekeeping the transport needs."""

    def __init__(self, *, options: Sequence[tuple[str, Any]], interceptors: list[Any],
                 observability: ObservabilityInterceptor, lanes: Lanes, watch: StreamWatch,
                 maximum_concurrent_rpcs: int, add_services: Callable[[Any], None],
                 service_names: Sequence[str], housekeeping: Callable[[], None],
                 housekeeping_s: float) -> None:
        self.lanes = lanes
        self.watch = watch
        self.observability = observability
        self._housekeeping = housekeeping
        self._housekeeping_s = housekeeping_s
        self._ticker: asyncio.Task[None] | None = None
        self.loop = LoopThread()
        self.health: Any = None

        async def build() -> grpc.aio.Server:
            server = grpc.aio.server(interceptors=interceptors, options=list(options),
                                     maximum_concurrent_rpcs=maximum_concurrent_rpcs or None)
            add_services(server)
            self.health = health_async.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
            return server

        self.server = self.loop.run(build())

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        async def add() -> int:
            if credentials is None:
                return self.server.add_insecure_port(address)
            return self.server.add_secure_port(address, credentials)

        return self.loop.run(add())

    def start(self, serving: Sequence[str]) -> None:
        async def start() -> None:
            await self.server.start()
            for name in serving:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

        self.loop.run(start())

    async def _tick(self) -> None:
        """Idle streams end, expired shared-memory regions go: every housekeeping_s seconds."""
        while True:
            await asyncio.sleep(self._housekeeping_s)
            try:
                self.watch.sweep()
                self._housekeeping()
            except Exception:
                log.exception("housekeeping failed")

    def drain(self, budget_s: float) -> None:
        """NOT_SERVING; waiting streams end now; calls at work get up to budget_s, then the
        rest (health watchers, anything still running) is cancelled."""
        self.loop.run(self._drain(budget_s), timeout=budget_s + 30)

    async def _drain(self, budget_s: float) -> None:
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()
        self.watch.close()
        stopping = loop.create_task(self.server.stop(budget_s))
        deadline = loop.time() + budget_s
        while not stopping.done():
            working = [t for t, m in self.observability.in_flight.items()
                       if m != HEALTH_WATCH and not t.done()]
            left = deadline - loop.time()
            if not working or left <= 0:
                break
            await asyncio.wait({stopping, *working}, timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            # A second stop with no grace cancels every call left in gRPC itself (health
            # watchers, whatever outlived the budget); cancelling their tasks would not end
            # the calls, and the first stop would wait out its grace for them.
            await self.server.stop(0)
        await stopping
        self._stop_ticker()

    def stop(self) -> None:
        """Immediate stop (tests): every call is cancelled. Idempotent."""
        if self.loop.loop.is_closed():
            return

        async def stop() -> None:
            self.watch.close()
            await self.server.stop(0)
            self._stop_ticker()

        try:
            self.loop.run(stop(), timeout=30)
        finally:
            self.close()

    def set_health(self, status: int, names: Sequence[str]) -> None:
        async def set_all() -> None:
            for name in names:
                await self.health.set(name, status)

        self.loop.run(set_all())

    def not_serving(self) -> None:
        """Health answers NOT_SERVING from now on (as at the start of a drain)."""
        self.loop.run(self.health.enter_graceful_shutdown())

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def close(self) -> None:
        self.lanes.shutdown()
        self.loop.close()
