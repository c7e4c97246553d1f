"""build_server(settings) -> (server, port): the one factory the CLI and the tests use."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from .core.service import CheckpointResult, Core
from .core.statedir import place_scratch
from .metrics import Metrics
from .settings import Settings
from .tokens import load_tokens
from .transport.fastpath import add_servicer
from .transport.interceptors import AuthInterceptor, ErrorInterceptor, ObservabilityInterceptor
from .transport.servicer import GradientServicer
from .transport.shm import SharedMemoryRegistry

log = logging.getLogger("gradserve")
SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda:N checked against the devices present."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise SystemExit(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


class GradServer:
    """A built server: gRPC, health, metrics endpoint and the core, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.metrics = Metrics(settings.buckets, settings.max_models, device=self.device)
        place_scratch(settings.state_dir)  # StartupError: temp files would land in the state dir
        # StartupError when --state-dir cannot be created or written: exit now, not at SIGTERM.
        self.core = Core(self.device, settings.limits, self.metrics, settings.state_dir,
                         settings.autosave_steps, settings.autosave_seconds,
                         bool(settings.persist_datasets))
        interceptors: list[grpc.ServerInterceptor] = [ObservabilityInterceptor(self.metrics)]
        if settings.auth_token_file:
            interceptors.append(AuthInterceptor(load_tokens(settings.auth_token_file)))
        interceptors.append(ErrorInterceptor())
        size = settings.max_message_mb * 1024 * 1024
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.threads,
                                       thread_name_prefix="gradserve-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_send_message_length", size),
                     ("grpc.max_receive_message_length", size),
                     ("grpc.so_reuseport", 0),
                     # accept the SDK's 30 s keepalive pings; the default (5 min) would make the
                     # server drop quiet long calls (a Train between events) as "too many pings"
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                     ("grpc.http2.max_ping_strikes", 0)],
        )
        self.shm = (SharedMemoryRegistry(settings.max_shm_mb * 1024 * 1024, settings.shm_ttl_s)
                    if settings.max_shm_mb > 0 else None)
        add_servicer(GradientServicer(self.core, self.shm), self.grpc, self.shm)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.grpc)
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
                root_certificates=(Path(settings.tls_client_ca).read_bytes()
                                   if settings.tls_client_ca else None),
                require_client_auth=bool(settings.tls_client_ca))
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.metrics_port = -1
        self._metrics_server: object | None = None

    def start(self) -> None:
        restored = self.core.start()
        if restored.models or restored.datasets or restored.quarantined:
            log.info("restored %d model(s) and %d dataset(s) from %s; %d file(s) quarantined",
                     len(restored.models), len(restored.datasets), self.settings.state_dir,
                     len(restored.quarantined))
        if self.settings.metrics_port >= 0:
            host = self.settings.metrics_host or self.settings.host
            self._metrics_server, self.metrics_port = self.metrics.serve(
                host, self.settings.metrics_port)
        self.grpc.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gradserve serving", extra={"fields": {
            "grpc": f"{self.settings.host}:{self.port}", "metrics_port": self.metrics_port,
            "device": str(self.device), "tls": bool(self.settings.tls_cert),
            "auth": bool(self.settings.auth_token_file),
            "memory_budget": self.core.describe_budget()}})

    def drain(self, grace: float | None = None) -> CheckpointResult:
        """Graceful stop: NOT_SERVING, stop Train loops at a step boundary, checkpoint, close."""
        grace = self.settings.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.core.trainer.shutdown.set()
        self.grpc.stop(grace).wait(grace + 1)
        if self.shm is not None:
            self.shm.close()
        # The budget split (RPCs get a bounded part of the grace, checkpoints a monotonic
        # deadline for the rest) is wired with the aio transport; until then no deadline.
        result = self.core.checkpoint_all(deadline=None)
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
        self.grpc.stop(0).wait(5)
        if self.shm is not None:
            self.shm.close()
        self.close_metrics()

    def close_metrics(self) -> None:
        server = self._metrics_server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._metrics_server = None


def build_server(settings: Settings) -> tuple[GradServer, int]:
    """Wire the server from settings; returns it unstarted with its bound gRPC port."""
    server = GradServer(settings)
    return server, server.port
