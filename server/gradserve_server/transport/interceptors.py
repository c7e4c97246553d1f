"""Cross-cutting concerns at the edge (grpc.aio interceptors): error->status map, metrics, auth.

Each interceptor rebuilds a method's handler once with its behavior wrapped (cached per
method). Response-streaming behaviors are wrapped as coroutines that write with context.write,
whether the inner one is an async generator or a coroutine (as the aio health servicer's Watch).
"""


from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from gradserve.codec import CodecError

from ..core import errors
from ..metrics import Metrics
from .streams import DeadlinePassed, StreamIdle

log = logging.getLogger("gradserve.rpc")

# The one map from the project's errors to gRPC status codes.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.UNAVAILABLE,
    StreamIdle: grpc.StatusCode.DEADLINE_EXCEEDED,
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

Behavior = Callable[..., Any]
# Messages quote what the caller sent (ids, names, shapes); the status travels in a header that
# clients refuse beyond 8-16 KiB, so a long quote would hide the error behind another one.
MAX_DETAILS_BYTES = 2000


def _clip(text: str) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_DETAILS_BYTES:
        return text
    return raw[:MAX_DETAILS_BYTES].decode("utf-8", "ignore") + "... (truncated)"


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            text = str(exc) if not isinstance(exc, MemoryError) else "the server ran out of memory"
            return code, _clip(text)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the device ran out of memory"
    return None


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _cached(cache: dict[str, tuple[Any, Any]], handler: grpc.RpcMethodHandler | None,
            around: Callable[[Behavior, bool, str], Behavior], method: str
            ) -> grpc.RpcMethodHandler | None:
    """_wrap, once per method: interceptors run on every call and the handler a method gets is
    the same object each time (a different one, e.g. an auth denial, is wrapped afresh)."""
    hit = cache.get(method)
    if hit is not None and hit[0] is handler:
        return hit[1]  # type: ignore[no-any-return]
    wrapped = _wrap(handler, around, method)
    if handler is not None:
        cache[method] = (handler, wrapped)
    return wrapped


_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _wrap(handler: grpc.RpcMethodHandler | None,
          around: Callable[[Behavior, bool, str], Behavior], method: str
          ) -> grpc.RpcMethodHandler | None:
    """Rebuild a method handler with `around` applied to its behavior."""
    if handler is None:
        return None
    for kind, factory in _FACTORIES:
        behavior = getattr(handler, kind)
        if behavior is not None:
            if handler.response_streaming:
                behavior = _as_writer(behavior)
            return factory(
                around(behavior, handler.response_streaming, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _as_writer(behavior: Behavior) -> Behavior:
    """A response-streaming behavior as a coroutine that writes each reply itself."""
    if not inspect.isasyncgenfunction(behavior):
        return behavior

    async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
        async for reply in behavior(request, context):
            await context.write(reply)

    return writer


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions report the raw integer
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return grpc.StatusCode.OK if code is None else grpc.StatusCode.UNKNOWN


def _ended_by_peer(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call's task was cancelled: its deadline passed, or the caller (or shutdown) ended it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Project errors become their status; anything else INTERNAL with a generic message.

    A cancelled call (the caller cancelled, its deadline passed) is not an error: the
    cancellation goes through untouched and nothing is logged as an incident.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> Any:
        return _cached(self._wrapped, await continuation(details), self._around, details.method)

    @staticmethod
    def _fail(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        """Set the call's status from exc; grpc sends it when the behavior returns (after the
        outer interceptors recorded it, so metrics and logs never lag the caller)."""
        mapped = _status_for(exc)
        if mapped is None:
            incident = uuid.uuid4().hex[:12]
            log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
            mapped = (grpc.StatusCode.INTERNAL,
                      f"internal error (incident {incident}); the server log has the details")
        # The traceback holds the call's frames and, through them, its buffers (a cancelled
        # 256 MiB upload): drop it now rather than when a garbage collection finds the cycle.
        exc.__traceback__ = None
        context.set_code(mapped[0])
        context.set_details(mapped[1])

    def _around(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        fail = self._fail

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise  # the handler sent its status already
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                fail(context, exc, method)
                return None

        return call


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
WATCH_SHARE = 10  # health watchers may hold at most 1/WATCH_SHARE of --max-concurrent-rpcs


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """--max-concurrent-rpcs for every call but health Check, and a share of it for Watch.

    gRPC's own maximum_concurrent_rpcs counts every call alike, so calls that never end by
    themselves could fill it, health watchers above all (they need no token): then every call
    failed, health Check included, and a failing liveness probe restarts a server that was
    only busy. Here Check is never counted and watchers get a tenth of the limit; gRPC's limit
    stays as the backstop, with room for Checks (app.py). Refused calls get RESOURCE_EXHAUSTED.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.watch_limit = max(1, limit // WATCH_SHARE)
        self.active = 0  # calls past admission, Check excepted (all on the event loop)
        self.watches = 0
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if details.method == HEALTH_CHECK:
            return handler
        return _cached(self._wrapped, handler, self._around, details.method)

    def _refusal(self, watch: bool) -> str | None:
        if self.active >= self.limit:
            return (f"the server has {self.active} calls open, its limit "
                    f"(max_concurrent_rpcs) is {self.limit}; retry later")
        if watch and self.watches >= self.watch_limit:
            return (f"health Watch: {self.watches} watchers are open, the limit (a tenth of "
                    f"max_concurrent_rpcs) is {self.watch_limit}; use health Check")
        return None

    def _around(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        watch = method == HEALTH_WATCH

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = self._refusal(watch)
            if refused is not None:
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(refused)
                return None
            self.active += 1
            self.watches += watch
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1
                self.watches -= watch

        return call


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """RPC latency histogram by method and status code, one debug log line per RPC, and the
    table of calls in flight (the drain waits for them and cancels what is left)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self.in_flight: dict[asyncio.Task[Any], str] = {}
        self.started = 0  # calls started since the server started (quiet-time detection)

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> Any:
        return _cached(self._wrapped, await continuation(details), self._around, details.method)

    def _done(self, method: str, code: grpc.StatusCode, start: float, peer: str) -> None:
        seconds = time.perf_counter() - start
        name = method.rsplit("/", 1)[-1]
        if self.metrics is not None:
            self.metrics.rpc(name, code.name, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc", extra={"fields": {"method": name, "code": code.name,
                                               "ms": round(seconds * 1000, 3), "peer": peer}})

    def _around(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        done = self._done
        in_flight = self.in_flight

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            self.started += 1
            task = asyncio.current_task()
            if task is not None:
                in_flight[task] = method
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = _ended_by_peer(context)
                raise
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                if task is not None:
                    in_flight.pop(task, None)
                if code is grpc.StatusCode.OK:
                    code = _code_of(context)
                done(method, code, start, context.peer() if log.isEnabledFor(logging.DEBUG)
                     else "")

        return call


# Scopes each method needs; health and reflection are not listed and stay open.
SCOPES: dict[str, str] = {
    **dict.fromkeys(("Forward", "GetModel", "ListModels", "GetParameters", "ListDatasets",
                     "ListCheckpoints", "GetServerInfo"), "read"),
    **dict.fromkeys(("RegisterSharedMemory", "UnregisterSharedMemory"), "shm"),
    **dict.fromkeys(("Backward", "Step", "ZeroGrad", "SetParameters", "Train", "TrainStream",
                     "UploadDataset", "DeleteDataset"), "train"),
    **dict.fromkeys(("CreateModel", "DeleteModel", "SaveCheckpoint", "LoadCheckpoint",
                     "DeleteCheckpoint"), "admin"),
}
SERVICE_PREFIX = "/gradserve.v1.GradientService/"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens with scopes, compared in constant time; health/reflection stay open.

    A refused call gets a handler that reads nothing: the request body is never received into
    the server, let alone parsed (an unauthenticated 400 MiB request costs the server nothing).
    """

    def __init__(self, tokens: dict[str, frozenset[str]]) -> None:
        self._tokens = [(t.encode(), scopes) for t, scopes in tokens.items()]

    def _scopes(self, metadata: Any) -> frozenset[str] | None:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else bytes(value).decode("latin-1")
        if not header.lower().startswith("bearer "):
            return None
        offered = header[7:].strip().encode()
        found = None
        for token, scopes in self._tokens:  # check every token: timing reveals nothing
            if hmac.compare_digest(token, offered):
                found = scopes
        return found

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> Any:
        if not details.method.startswith(SERVICE_PREFIX):
            return await continuation(details)
        name = details.method[len(SERVICE_PREFIX):]
        scopes = self._scopes(details.invocation_metadata)
        if scopes is None:
            return await _deny(continuation, details, grpc.StatusCode.UNAUTHENTICATED,
                               "missing or invalid bearer token (metadata 'authorization: "
                               "Bearer <token>')")
        need = SCOPES.get(name, "admin")
        if need not in scopes:
            return await _deny(continuation, details, grpc.StatusCode.PERMISSION_DENIED,
                               f"{name} needs scope {need!r}; this token has {sorted(scopes)}")
        return await continuation(details)


async def _deny(continuation: Continuation, details: grpc.HandlerCallDetails,
                code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler | None:
    handler = await continuation(details)
    if handler is None:
        return None

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(code)
        context.set_details(message)

    # Request-streaming kinds whatever the method: the server then reads no message before
    # calling refuse(), which never asks for one.
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)
