"""Channel set-up shared by the sync and async clients: options, credentials, metadata, retry."""

from __future__ import annotations

import json

import random
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import grpc

from . import wire
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from ._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
SERVICE_CONFIG = resources.files("gradserve").joinpath("service_config.json").read_text()
# Methods safe to repeat (reads, and mutating calls deduplicated by request id): the service
# config's retry policy names them, and the SDK's own retry loop uses the same list.
RETRYABLE = frozenset(
    name["method"]
    for method_config in json.loads(SERVICE_CONFIG)["methodConfig"]
    if "retryPolicy" in method_config
    for name in method_config["name"]
)


def options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _read(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def credentials(tls: bool, root_certificates: bytes | str | None, client_cert: bytes | str | None,
                client_key: bytes | str | None) -> grpc.ChannelCredentials | None:
    """None for plaintext; TLS when tls=True or any certificate is given (paths or PEM bytes)."""
    if not (tls or root_certificates or client_cert or client_key):
        return None
    if bool(client_cert) != bool(client_key):
        raise ValueError("client_cert and client_key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(_read(root_certificates), _read(client_key),
                                        _read(client_cert))


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def deadline(op: Any, timeout: float | None, default: float) -> float | None:
    """An explicit timeout wins; otherwise the client default, unless the op has no deadline."""
    return timeout or (default if op.deadline else None)


def retry_delay(exc: grpc.RpcError, delays: Iterator[float]) -> float | None:
    """Seconds to wait before retrying after exc, or None to give up and raise."""
    return next(delays, None) if exc.code() in RETRY_CODES else None


def backoff(retries: int) -> Iterator[float]:
    """Sleep before each retry: exponential from 0.1 s, capped at 2 s, with jitter."""
    delay = 0.1
    for _ in range(retries):
        yield delay * (0.5 + random.random())
        delay = min(delay * 2, 2.0)


# RPCs whose tensors may be large: framed by gradserve.wire on both sides (same bytes on the wire).
FRAMED = {"Forward": pb.ForwardResponse, "Backward": pb.BackwardResponse}


def _serialize(request: Any) -> bytes:
    return request.SerializeToString()  # a Framed request joins its payloads here


def stub(channel: Any) -> pb_grpc.GradientServiceStub:
    """The generated stub (sync or asyncio channel), with Forward and Backward (de)serialized
    by gradserve.wire: their large tensors skip protobuf's copies."""
    s = pb_grpc.GradientServiceStub(channel)
    for rpc, reply in FRAMED.items():
        setattr(s, rpc, channel.unary_unary(
            f"/gradserve.v1.GradientService/{rpc}", request_serializer=_serialize,
            response_deserializer=lambda data, cls=reply: wire.split(data, cls),
            _registered_method=True))
    return s
