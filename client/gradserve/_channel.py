"""Channel set-up shared by the sync and async clients: options, credentials, metadata, retries.

Retries: one mechanism, the SDK's own (see Attempts), driven by the retry policy in
service_config.json, the file other languages' clients may load as their service config. The
channel itself does no configured retries (gRPC still resends, transparently, a call that never
reached the server).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc

from . import wire
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from ._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc

SERVICE_CONFIG = resources.files("gradserve").joinpath("service_config.json").read_text()


@dataclass(frozen=True)
class RetryPolicy:
    """A gRPC retryPolicy: which methods, on which codes, how many attempts, which backoff."""

    methods: frozenset[tuple[str, str]]  # (service, method)
    codes: frozenset[grpc.StatusCode]
    max_attempts: int
    initial_backoff: float
    max_backoff: float
    multiplier: float


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))  # protobuf Duration JSON: "0.1s"


def retry_policy(config: str) -> RetryPolicy:
    """The one retryPolicy of a service config (every method safe to repeat is named there)."""
    (entry,) = [m for m in json.loads(config)["methodConfig"] if "retryPolicy" in m]
    policy = entry["retryPolicy"]
    codes = frozenset(grpc.StatusCode[c] for c in policy["retryableStatusCodes"])
    if grpc.StatusCode.DEADLINE_EXCEEDED in codes:
        raise ValueError("DEADLINE_EXCEEDED is never retried: the deadline covers every attempt")
    return RetryPolicy(
        methods=frozenset((name["service"], name["method"]) for name in entry["name"]),
        codes=codes,
        max_attempts=int(policy["maxAttempts"]),
        initial_backoff=_seconds(policy["initialBackoff"]),
        max_backoff=_seconds(policy["maxBackoff"]), multiplier=float(policy["backoffMultiplier"]))


POLICY = retry_policy(SERVICE_CONFIG)
# Retries after the first attempt unless a client says otherwise: as many as the config allows.
DEFAULT_RETRIES = POLICY.max_attempts - 1


class Attempts:
    """The attempts of one call: a retry budget, gRPC's jittered exponential backoff, and one
    deadline over every attempt and every wait in between."""

    def __init__(self, retries: int, timeout: float | None, retryable: bool) -> None:
        self.left = retries if retryable else 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._backoff = POLICY.initial_backoff

    def timeout(self) -> float | None:
        """The timeout of the next attempt: what is left of the deadline."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def delay(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after exc; None to give up (raise exc)."""
        if self.left <= 0 or exc.code() not in POLICY.codes:
            return None
        delay = random.uniform(0, self._backoff)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None  # no time left for another attempt
        self.left -= 1
        self._backoff = min(self._backoff * POLICY.multiplier, POLICY.max_backoff)
        return delay


def options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        # No retryPolicy on the channel (Attempts retries) and none from the name resolver.
        ("grpc.service_config_disable_resolution", 1),
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


class ServerError(grpc.RpcError):
    """The failure of a call to one of a client's several servers; its details name the server
    (its identity, gradserve.routing), e.g. "UNAVAILABLE: 10.0.0.7:50051: failed to connect"."""

    def __init__(self, exc: Any, server: str) -> None:
        super().__init__()
        self.error = exc
        self.server = server

    def code(self) -> grpc.StatusCode:
        return self.error.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return f"{self.server}: {self.error.details() or self.error.code().name}"


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def deadline(op: Any, default: float) -> float | None:
    """An Op's own timeout, else the client's default unless the op has no deadline."""
    return op.timeout or (default if op.deadline else None)


def check_retries(retries: int) -> int:
    if retries < 0:
        raise ValueError(f"retries: {retries} is negative; 0 means a single attempt")
    return retries


# RPCs whose tensors may be large: framed by gradserve.wire on both sides (same bytes on the wire).
FRAMED = {"Forward": pb.ForwardResponse, "Backward": pb.BackwardResponse}


def _serialize(request: Any) -> bytes:
    return request.SerializeToString()  # a Framed request joins its payloads here


@dataclass
class Connection:
    """One server's channel, its stubs and (sync Client) its same-host fast path."""

    channel: Any
    stub: Any
    health: Any
    shm: Any = None


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
