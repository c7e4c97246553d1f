"""What a method body needs to know about its call, taken from the gRPC context on the loop."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from google.protobuf.message import DecodeError
from gradserve import wire

from ..core.errors import InvalidArgument
from .shm import Owner


class Call:
    """One RPC as the sync method bodies see it (they run on executor threads).

    cancelled is set by the event loop when the caller cancels, its deadline passes, the stream
    ends for another reason, or the server shuts down; long loops poll it. The caller's identity
    (peer, credential) is read from the context only when a method needs it (shared memory):
    the gRPC core calls behind it are thread-safe, and most calls never ask.
    """

    __slots__ = ("_owner", "cancelled", "context", "method")

    def __init__(self, method: str, context: Any = None) -> None:
        self.method = method
        self.context = context
        self.cancelled = threading.Event()
        self._owner: Owner | None = None

    @classmethod
    def of(cls, method: str, context: Any) -> Call:
        return cls(method, context)

    @property
    def owner(self) -> Owner:
        if self._owner is None:
            context = self.context
            self._owner = (Owner(context.peer() or "", _credential(context))
                           if context is not None else Owner(""))
        return self._owner

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()


def _credential(context: Any) -> str:
    """A digest of what authenticated the caller: bearer token and TLS identity ("" if none)."""
    parts: list[bytes] = []
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            parts.append(value.encode() if isinstance(value, str) else bytes(value))
    auth = context.auth_context() or {}
    for key in ("x509_pem_cert", "x509_common_name"):
        parts.extend(auth.get(key, ()))
    if not parts:
        return ""
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


# ------------------------------------------------------------------------------------ parsing


def parse(cls: Any, raw: bytes) -> Any:
    """Request bytes -> message; bytes that are not that message are the caller's error."""
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, TypeError):
        raise InvalidArgument(f"request: the bytes are not a valid {cls.DESCRIPTOR.full_name} "
                              "message") from None


def split(cls: Any, raw: bytes) -> Any:
    """As parse, with large tensors left as zero-copy views (gradserve.wire)."""
    try:
        return wire.split(raw, cls)
    except (DecodeError, ValueError, TypeError):
        raise InvalidArgument(f"request: the bytes are not a valid {cls.DESCRIPTOR.full_name} "
                              "message") from None
