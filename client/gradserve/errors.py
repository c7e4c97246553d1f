"""One exception family for SDK users: every gRPC failure becomes a GradServeError subclass."""

from __future__ import annotations

from typing import Any

import grpc


class GradServeError(Exception):
    """A call failed. `code` is the gRPC status code, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(GradServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TensorArgumentError(InvalidArgumentError, TypeError):
    """A value the SDK cannot send as a tensor (complex, str, object, uint64, ...), refused
    before anything is sent; the message names the argument. Also a TypeError, as before."""


class NotFoundError(GradServeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(GradServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(GradServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(GradServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(GradServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(GradServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(GradServeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(GradServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(GradServeError):
    code = grpc.StatusCode.CANCELLED


class InternalError(GradServeError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[GradServeError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
                ResourceExhaustedError, UnauthenticatedError, PermissionDeniedError,
                UnavailableError, DeadlineExceededError, CancelledError, InternalError)
}


# gRPC's words when nothing listens at the address: the first error a new user meets.
NO_SERVER = ("failed to connect to all addresses", "Connection refused")
NO_SERVER_HINT = ("; is gradserve-server running at that address? (start it with "
                  "`gradserve-server`, or pass the address it serves on)")


def from_rpc_error(exc: Any) -> GradServeError:
    """grpc.RpcError (sync or aio) -> the matching GradServeError subclass."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and details and any(s in details for s in NO_SERVER):
        details += NO_SERVER_HINT
    cls = _BY_CODE.get(code, GradServeError)
    return cls(details or code.name, code)
