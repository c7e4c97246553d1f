"""Cross-cutting concerns at the edge: error->status mapping, metrics and logs, auth."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gradserve.codec import CodecError

from ..core import errors
from ..metrics import Metrics

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


def _wrap(handler: grpc.RpcMethodHandler | None,
          around: Callable[[Behavior, bool, str], Behavior], method: str
          ) -> grpc.RpcMethodHandler | None:
    """Rebuild a method handler with `around` applied to its behavior."""
    if handler is None:
        return None
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(
                around(behavior, handler.response_streaming, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Project errors become their status; anything else INTERNAL with a generic message."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        return _cached(self._wrapped, continuation(details), self._around, details.method)

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
        mapped = _status_for(exc)
        if mapped is not None:
            context.abort(*mapped)
        incident = uuid.uuid4().hex[:12]
        log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); "
                      "the server log has the details")

    def _around(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        abort = self._abort

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                if context.code() is not None and _status_for(exc) is None:
                    raise  # already aborted by the handler
                abort(context, exc, method)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                if context.code() is not None and _status_for(exc) is None:
                    raise
                abort(context, exc, method)

        return stream if streaming else unary


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """RPC latency histogram by method and status code, and one debug log line per RPC."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        return _cached(self._wrapped, continuation(details), self._around, details.method)

    def _done(self, method: str, context: grpc.ServicerContext, start: float) -> None:
        seconds = time.perf_counter() - start
        code = context.code()
        if code is None:
            # No status set: success, unless the caller cancelled or its deadline passed.
            code = grpc.StatusCode.OK if context.is_active() else (
                grpc.StatusCode.DEADLINE_EXCEEDED if (context.time_remaining() or 0) <= 0
                else grpc.StatusCode.CANCELLED)
        name = method.rsplit("/", 1)[-1]
        if self.metrics is not None:
            self.metrics.rpc(name, code.name, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc", extra={"fields": {"method": name, "code": code.name,
                                               "ms": round(seconds * 1000, 3),
                                               "peer": context.peer()}})

    def _around(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        done = self._done

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                done(method, context, start)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from behavior(request, context)
            finally:
                done(method, context, start)

        return stream if streaming else unary


# Scopes each method needs; health and reflection are not listed and stay open.
SCOPES: dict[str, str] = {
    **dict.fromkeys(("Forward", "GetModel", "ListModels", "GetParameters", "ListDatasets",
                     "ListCheckpoints", "RegisterSharedMemory", "UnregisterSharedMemory"), "read"),
    **dict.fromkeys(("Backward", "Step", "ZeroGrad", "SetParameters", "Train", "TrainStream",
                     "UploadDataset", "DeleteDataset"), "train"),
    **dict.fromkeys(("CreateModel", "DeleteModel", "SaveCheckpoint", "LoadCheckpoint",
                     "DeleteCheckpoint"), "admin"),
}
SERVICE_PREFIX = "/gradserve.v1.GradientService/"


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer tokens with scopes, compared in constant time; health/reflection stay open."""

    def __init__(self, tokens: dict[str, frozenset[str]]) -> None:
        self._tokens = [(t.encode(), scopes) for t, scopes in tokens.items()]

    def _scopes(self, metadata: Any) -> frozenset[str] | None:
        header = dict(metadata or ()).get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        offered = header[7:].strip().encode()
        found = None
        for token, scopes in self._tokens:  # check every token: timing reveals nothing
            if hmac.compare_digest(token, offered):
                found = scopes
        return found

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if not details.method.startswith(SERVICE_PREFIX):
            return continuation(details)
        name = details.method[len(SERVICE_PREFIX):]
        scopes = self._scopes(details.invocation_metadata)
        if scopes is None:
            return _deny(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                         "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
        need = SCOPES.get(name, "admin")
        if need not in scopes:
            return _deny(continuation(details), grpc.StatusCode.PERMISSION_DENIED,
                         f"{name} needs scope {need!r}; this token has {sorted(scopes)}")
        return continuation(details)


def _deny(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
          ) -> grpc.RpcMethodHandler | None:
    def around(_behavior: Behavior, streaming: bool, _method: str) -> Behavior:
        def unary(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        def stream(_request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            context.abort(code, message)
            yield  # pragma: no cover - makes this a generator

        return stream if streaming else unary

    return _wrap(handler, around, "")
