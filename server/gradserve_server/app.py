"""build_server(settings) -> (server, port): the one factory the CLI and the tests use."""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import resource
import socket
import ssl
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from .core.errors import StartupError
from .core.parallel import LOCAL, Parallel
from .core.service import CheckpointResult, Core
from .core.statedir import place_scratch
from .metrics import Metrics
from .settings import Settings, flag_name
from .tokens import load_tokens
from .transport.interceptors import (
    AdmissionInterceptor,
    AuthInterceptor,
    ErrorInterceptor,
    ObservabilityInterceptor,
)
from .transport.lanes import Lanes
from .transport.memory import Trimmer
from .transport.rpc import GradientService
from .transport.server import AioServer
from .transport.shm import SharedMemoryRegistry
from .transport.streams import StreamWatch

if TYPE_CHECKING:
    from .dist.driver import Driver
    from .dist.group import Group

log = logging.getLogger("gradserve")
SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
# On SIGTERM, calls in progress get this share of --grace-seconds (at most RPC_GRACE_CAP_S);
# checkpoints get the rest. docs/durability.md documents the drain.
RPC_GRACE_SHARE = 0.5
RPC_GRACE_CAP_S = 10.0
KEEPALIVE_S = 60  # the server pings quiet connections this often; a peer that does not answer
KEEPALIVE_TIMEOUT_S = 20  # within this is gone, and its calls are cancelled
# A connection that has not finished its HTTP/2 (and TLS) handshake by then is closed (gRPC's
# default, 120 s, let silent TCP connections hold descriptors for two minutes each).
HANDSHAKE_TIMEOUT_S = 20
# Descriptors kept for the server's own files (checkpoints, /metrics, shared-memory lookups,
# torch) when --max-connections is 0: an eighth of the limit, at least this many.
FD_RESERVE = 64
# Room above --max-concurrent-rpcs in gRPC's own limit: health Checks, which AdmissionInterceptor
# never refuses, and calls it refuses (they end at once).
CHECK_HEADROOM = 1000


def connection_cap(configured: int) -> int | None:
    """--max-connections, or the descriptor limit less what the server keeps for its files."""
    if configured:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - max(FD_RESERVE, soft // 8))


def rpc_grace(grace: float) -> float:
    """The part of the shutdown grace that calls in progress get: min(grace/2, 10 s)."""
    return max(0.0, min(grace * RPC_GRACE_SHARE, RPC_GRACE_CAP_S))


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen_error(exc: OSError, host: str, port: int, fields: tuple[str, str]) -> StartupError:
    """One line naming the flag, the value and the cause of a failed bind."""
    host_field, port_field = fields
    if exc.errno == errno.EADDRINUSE:
        off = ", or -1 to turn /metrics off" if port_field == "metrics_port" else ""
        return StartupError(
            f"{flag_name(port_field)} {port}: {host}:{port} is already in use by another process "
            f"(another gradserve-server?); choose another port, 0 for a free one{off}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"{flag_name(host_field)} {host!r}: not an address of this machine ({exc.strerror}); "
            "use 127.0.0.1, 0.0.0.0 (every interface) or one of this machine's addresses")
    if exc.errno == errno.EACCES:
        return StartupError(f"{flag_name(port_field)} {port}: permission denied: ports below 1024 "
                            "need root (or CAP_NET_BIND_SERVICE); choose a port >= 1024")
    return StartupError(f"{flag_name(host_field)} {host!r} / {flag_name(port_field)} {port}: cannot "
                        f"listen there ({exc.strerror or exc})")


def check_listen(host: str, port: int, fields: tuple[str, str]) -> None:
    """StartupError (one line: flag, value, cause) unless some address of host can listen on
    port, the rule gRPC's add_port follows; checked with plain sockets first because gRPC only
    says "Failed to bind" and logs the cause on stderr."""
    name = host.strip("[]")
    try:
        found = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        cause = getattr(exc, "strerror", None) or exc
        raise StartupError(f"{flag_name(fields[0])} {host!r}: not an IP address of this machine, "
                           f"and no name resolves to it ({cause})") from None
    first: OSError | None = None
    for family, kind, proto, _name, address in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
                return
        except OSError as exc:
            first = first or exc
    if first is not None:
        raise _listen_error(first, host, port, fields)


PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _read_pem(field: str, path: str, marker: re.Pattern[bytes], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag_name(field)} {path}: cannot read it "
                           f"({exc.strerror or exc})") from None
    if not marker.search(data):
        raise StartupError(f"{flag_name(field)} {path}: no {what} in it (expected a PEM block "
                           f"'{marker.pattern.decode().replace('[A-Z ]*', '')}')")
    return data


def tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server credentials from --tls-cert/--tls-key/--tls-client-ca, each file checked first
    (readable, PEM, key matching the certificate) so that a bad one is a one-line StartupError
    rather than gRPC's "Failed to bind" with the cause in its log."""
    if not settings.tls_cert:
        return None
    cert = _read_pem("tls_cert", settings.tls_cert, re.compile(rb"-----BEGIN CERTIFICATE-----"),
                     "certificate")
    key = _read_pem("tls_key", settings.tls_key, PRIVATE_KEY, "private key")
    if b"ENCRYPTED" in key:
        raise StartupError(f"{flag_name('tls_key')} {settings.tls_key}: the private key is "
                           "encrypted; gRPC needs it unencrypted (openssl pkey -in KEY -out NEW)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        cause = ("the key does not belong to the certificate"
                 if exc.reason == "KEY_VALUES_MISMATCH" else f"OpenSSL: {exc.reason or exc}")
        raise StartupError(f"{flag_name('tls_cert')} {settings.tls_cert} with {flag_name('tls_key')} "
                           f"{settings.tls_key}: {cause}") from None
    client_ca = None
    if settings.tls_client_ca:
        client_ca = _read_pem("tls_client_ca", settings.tls_client_ca,
                              re.compile(rb"-----BEGIN CERTIFICATE-----"), "CA certificate")
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except ssl.SSLError as exc:
            raise StartupError(f"{flag_name('tls_client_ca')} {settings.tls_client_ca}: OpenSSL: "
                               f"{exc.reason or exc}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda:N checked against the devices present."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StartupError(f"{flag_name('device')} {name!r}: expected auto, cpu, cuda or cuda:N"
                           ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"{flag_name('device')} {name}: CUDA is not available on this "
                               "machine (or this torch build has no CUDA); use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StartupError(f"{flag_name('device')} {name}: this machine has only "
                               f"{torch.cuda.device_count()} CUDA device(s), cuda:0 ...")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise StartupError(f"{flag_name('device')} {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _version() -> str:
    try:
        return metadata.version("gradserve")
    except metadata.PackageNotFoundError:
        return "unknown"


class GradServer:
    """A built server: gRPC, health, metrics endpoint and the core, started and stopped together.

    group: rank 0 of a torchrun group (dist/): every model lives on every rank and its work is
    split over them (docs/scaling.md). None: one process.
    """

    def __init__(self, settings: Settings, group: Group | None = None) -> None:
        self.settings = settings
        self.device = group.device if group is not None else resolve_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.metrics = Metrics(settings.buckets, settings.max_models, device=self.device)
        self.driver: Driver | None = None
        # Set when the group lost a rank: the CLI drains and exits 1, torchrun restarts it.
        self.group_lost = threading.Event()
        parallel: Parallel = LOCAL
        if group is not None:
            from .dist.driver import Driver  # torch.distributed: only for a group

            self.driver = Driver(group, self.metrics, bool(settings.dist_verify))
            self.driver.on_broken = self._on_group_lost
            parallel = self.driver
            self.metrics.world_size.set(group.world)
        try:
            # Addresses and TLS files first: a mistake there is reported before anything is
            # built (inside the try: the other ranks of a group then exit too).
            check_listen(settings.host, settings.port, ("host", "port"))
            if settings.metrics_port >= 0:
                check_listen(self.metrics_host, settings.metrics_port,
                             ("metrics_host", "metrics_port"))
            self._credentials = tls_credentials(settings)
            self._build(settings, group, parallel)
        except BaseException:
            if self.driver is not None:
                self.driver.stop(1)  # the other ranks exit too: the launch fails as one
            raise

    def _build(self, settings: Settings, group: Group | None, parallel: Parallel) -> None:
        place_scratch(settings.state_dir)  # StartupError: temp files would land in the state dir
        # StartupError when --state-dir cannot be created or written: exit now, not at SIGTERM.
        self.core = Core(self.device, settings.limits, self.metrics, settings.state_dir,
                         settings.autosave_steps, settings.autosave_seconds,
                         bool(settings.persist_datasets), parallel)
        self.core.info.version = _version()
        if group is not None:
            self.core.info.backend = group.backend
            self.core.info.devices = [r.device for r in group.ranks]
            self.core.info.hosts = [r.host for r in group.ranks]
        else:
            self.core.info.hosts = [socket.gethostname()]
        self.shm = (SharedMemoryRegistry(settings.max_shm_mb * 1024 * 1024, settings.shm_ttl_s,
                                         settings.max_shm_regions,
                                         settings.max_shm_regions_per_connection)
                    if settings.max_shm_mb > 0 else None)
        # A group's calls wait for their turn and for the other ranks: never on the event loop.
        self.lanes = Lanes(str(self.device), settings.threads, settings.max_train_runs,
                           settings.inline_us if group is None else 0)
        self.watch = StreamWatch(settings.stream_idle_seconds)
        observability = ObservabilityInterceptor(self.metrics)
        self._observability = observability
        self.trimmer = Trimmer(self.lanes.control.submit)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            observability, AdmissionInterceptor(settings.max_concurrent_rpcs)]
        if settings.auth_token_file:
            interceptors.append(AuthInterceptor(load_tokens(settings.auth_token_file)))
        interceptors.append(ErrorInterceptor())
        size = settings.max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            # calls that arrived and wait for the event loop to pick them up: gRPC's default
            # (1000, 3000 hard) cancels some of a burst of new streams that the loop would
            # accept a moment later; max_concurrent_rpcs bounds them instead
            ("grpc.server_max_pending_requests", settings.max_concurrent_rpcs),
            ("grpc.server_max_pending_requests_hard_limit", 2 * settings.max_concurrent_rpcs),
            # accept the SDK's 30 s keepalive pings; the default (5 min) would make the server
            # drop quiet long calls (a Train between events) as "too many pings"
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            # ping quiet connections: a vanished client's streams are cancelled, not kept
            ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_S * 1000),
        ]
        self.max_connections = connection_cap(settings.max_connections)
        if self.max_connections is not None:
            # Connections past it wait in the kernel's accept queue: the descriptors they would
            # take stay free for checkpoints, /metrics and the drain.
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        service = GradientService(self.core, self.shm, self.lanes, self.watch)
        idle = settings.stream_idle_seconds
        self.transport = AioServer(
            options=options, interceptors=interceptors, observability=observability,
            lanes=self.lanes, watch=self.watch,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs + CHECK_HEADROOM,
            add_services=service.add_to,
            service_names=(SERVICE,), housekeeping=self._housekeeping,
            housekeeping_s=min(1.0, idle / 4) if idle > 0 else 1.0)
        address = f"{settings.host}:{settings.port}"
        try:
            self.port = self.transport.add_port(address, self._credentials)
        except (OSError, RuntimeError) as exc:  # taken since check_listen, or gRPC disagrees
            self.transport.close()
            raise StartupError(f"{flag_name('host')} / {flag_name('port')}: cannot serve gRPC on "
                               f"{address}: {exc}") from None
        self.metrics_port = -1
        self._metrics_server: object | None = None

    @property
    def health(self) -> HealthControl:
        return HealthControl(self.transport)

    def _on_group_lost(self, reason: str) -> None:
        """The group lost a rank: NOT_SERVING now; the CLI drains (models checkpoint) and exits
        1, and torchrun restarts the group."""
        self.group_lost.set()
        try:
            self.transport.not_serving()
        except Exception:  # already stopping
            log.debug("health not updated", exc_info=True)

    def _housekeeping(self) -> None:
        """Every second on the event loop: expire idle regions, give memory back when quiet."""
        if self.shm is not None and len(self.shm):
            self.shm.expire()
        self.trimmer.tick(self._observability.started)

    @property
    def metrics_host(self) -> str:
        """--metrics-host, or localhost: /metrics has no auth and names models and losses."""
        return self.settings.metrics_host or "127.0.0.1"

    def start(self) -> None:
        restored = self.core.start()
        if restored.models or restored.datasets or restored.quarantined:
            log.info("restored %d model(s) and %d dataset(s) from %s; %d file(s) quarantined",
                     len(restored.models), len(restored.datasets), self.settings.state_dir,
                     len(restored.quarantined))
        if self.settings.metrics_port >= 0:
            try:
                self._metrics_server, self.metrics_port = self.metrics.serve(
                    self.metrics_host, self.settings.metrics_port)
            except OSError as exc:  # e.g. --metrics-port equal to the gRPC port just bound
                raise _listen_error(exc, self.metrics_host, self.settings.metrics_port,
                                    ("metrics_host", "metrics_port")) from None
        self.transport.start(("", SERVICE))
        log.info("gradserve serving", extra={"fields": {
            "grpc": f"{self.settings.host}:{self.port}", "metrics_port": self.metrics_port,
            "metrics_host": self.metrics_host if self.metrics_port >= 0 else "",
            "device": str(self.device), "tls": bool(self.settings.tls_cert),
            "auth": bool(self.settings.auth_token_file),
            "memory_budget": self.core.describe_budget(),
            "max_connections": self.max_connections or "none"}})
        self._warn()

    def _warn(self) -> None:
        s = self.settings
        if not is_loopback(s.host) and not (s.auth_token_file and s.tls_cert):
            missing = " and ".join(w for w, on in (("auth (--auth-token-file)", s.auth_token_file),
                                                    ("TLS (--tls-cert)", s.tls_cert)) if not on)
            log.warning(f"serving {s.host}:{self.port}, which other hosts can reach, without "
                        f"{missing}: anyone who reaches it can read, train and delete models")
        if self.metrics_port >= 0 and not is_loopback(self.metrics_host):
            log.warning(f"/metrics on {self.metrics_host}:{self.metrics_port} has no auth and "
                        "shows model ids and losses to whoever reaches it")
        if not s.state_dir:
            log.warning("no --state-dir: models live in memory only and are lost when the "
                        "server stops")

    def drain(self, grace: float | None = None) -> CheckpointResult:
        """Graceful stop within grace seconds: NOT_SERVING; Train loops stop at a step boundary
        (their last event says "shutdown"); calls in progress get rpc_grace(grace), then what is
        left is cancelled; checkpoints get the rest of the time."""
        grace = self.settings.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.core.trainer.shutdown.set()
        try:
            self.transport.drain(rpc_grace(grace))
        finally:
            self.transport.close()
        if self.shm is not None:
            self.shm.close()
        if self.driver is not None:
            self.driver.stop(0)  # after the last call's work; the checkpoints need no other rank
        result = self.core.checkpoint_all(deadline=deadline)
        if result.saved or result.failed:
            log.info("checkpointed %d model(s) to %s (%d already current, %d failed)",
                     len(result.saved), self.settings.state_dir, len(result.unchanged),
                     len(result.failed))
        self.close_metrics()
        return result

    def stop(self) -> None:
        """Immediate stop (tests)."""
        self.core.stop_autosave()
        self.core.trainer.shutdown.set()
        self.transport.stop()
        if self.shm is not None:
            self.shm.close()
        if self.driver is not None:
            self.driver.stop(0)
        self.close_metrics()

    def close_metrics(self) -> None:
        server = self._metrics_server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._metrics_server = None


class HealthControl:
    """The health service's status, set from any thread (the service lives on the loop)."""

    def __init__(self, transport: AioServer) -> None:
        self._transport = transport

    def set(self, service: str, status: int) -> None:
        self._transport.set_health(status, (service,))

    def enter_graceful_shutdown(self) -> None:
        self._transport.not_serving()


def build_server(settings: Settings, group: Group | None = None) -> tuple[GradServer, int]:
    """Wire the server from settings; returns it unstarted with its bound gRPC port."""
    server = GradServer(settings, group)
    return server, server.port
