"""One typed Settings object from command-line flags and GRADSERVE_* environment variables.

Precedence: flag > environment > default. Every field is a flag (--max-models) and a variable
(GRADSERVE_MAX_MODELS). Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .core.limits import Limits

DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 or [::] for all interfaces)")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    metrics_host: str = _opt("", "metrics address (default: same as --host)")
    metrics_port: int = _opt(9464, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    max_message_mb: int = _opt(512, "largest gRPC message in MiB, both directions")
    threads: int = _opt(16, "threads that run model work (Forward, Backward, Step, ...) on the "
                        "device; calls waiting on their client hold none")
    torch_threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    log_level: str = _opt("info", "debug, info, warning or error",
                          choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("text", "text or json", choices=("text", "json"))
    # limits
    max_models: int = _opt(256, "models held at once")
    max_parameters: int = _opt(500_000_000, "parameter and buffer elements per model")
    max_request_mb: int = _opt(512, "tensor MiB in one request")
    max_graphs: int = _opt(64, "retained forward graphs per model")
    max_graph_mb: int = _opt(1024, "MiB of retained graphs per model")
    graph_ttl_s: float = _opt(300.0, "seconds an unused retained graph is kept")
    max_train_runs: int = _opt(8, "concurrent Train/TrainStream runs")
    max_dataset_mb: int = _opt(8192, "MiB of uploaded datasets, all together")
    request_id_window: int = _opt(1024, "remembered request ids per model (exactly-once retries)")
    max_shm_mb: int = _opt(4096, "MiB of same-host shared memory clients may register at once "
                           "(0 disables the shared-memory fast path)")
    shm_ttl_s: float = _opt(300.0, "seconds an unused shared-memory region stays registered")
    max_shm_regions: int = _opt(256, "shared-memory regions registered at once, all callers")
    max_shm_regions_per_connection: int = _opt(
        32, "shared-memory regions one caller (connection and credential) may hold at once")
    step_buckets: str = _opt(",".join(str(b) for b in DEFAULT_BUCKETS),
                             "step latency histogram buckets in seconds, comma-separated")
    # transport
    stream_idle_seconds: float = _opt(
        120.0, "a stream that waits this long for its client (no message in, or no reply read) "
        "ends with DEADLINE_EXCEEDED; 0: never")
    max_concurrent_rpcs: int = _opt(
        10000, "open RPCs of every kind together; beyond it new calls get RESOURCE_EXHAUSTED")
    max_streams_per_connection: int = _opt(
        1000, "concurrent RPCs on one client connection (HTTP/2 max concurrent streams); "
        "the client queues the rest")
    tune_malloc: int = _opt(
        1, "1: this process keeps large message buffers in one glibc heap (mmap threshold "
        "512 MiB, trim threshold 1 GiB, one arena) and returns its free memory once no call has "
        "started for 2 s; 16-64 MiB messages take 20-45 percent less time. 0: glibc's defaults",
        choices=(0, 1))
    inline_us: int = _opt(
        500, "a call whose identical predecessor (method, model, shapes) took less than this "
        "many microseconds runs on the event loop instead of a thread; 0: never")
    # durability
    state_dir: str = _opt("", "directory for checkpoints; models are restored from it at start")
    autosave_steps: int = _opt(0, "during Train, checkpoint every N steps (0: off)")
    autosave_seconds: float = _opt(0.0, "during Train, checkpoint every N seconds (0: off)")
    grace_seconds: float = _opt(20.0, "on SIGTERM: time to stop loops and checkpoint")
    # security
    auth_token_file: str = _opt("", "file of bearer tokens, one per line: 'token [scope,scope]'")
    tls_cert: str = _opt("", "PEM server certificate (enables TLS)")
    tls_key: str = _opt("", "PEM server private key")
    tls_client_ca: str = _opt("", "PEM CA for client certificates (enables mutual TLS)")

    @property
    def limits(self) -> Limits:
        mib = 1024 * 1024
        return Limits(
            max_models=self.max_models, max_parameters=self.max_parameters,
            max_request_bytes=self.max_request_mb * mib, max_graphs=self.max_graphs,
            max_graph_bytes=self.max_graph_mb * mib, graph_ttl_s=self.graph_ttl_s,
            max_train_runs=self.max_train_runs, max_dataset_bytes=self.max_dataset_mb * mib,
            request_id_window=self.request_id_window,
        )

    @property
    def buckets(self) -> tuple[float, ...]:
        return tuple(sorted(float(b) for b in self.step_buckets.split(",") if b.strip()))

    @classmethod
    def load(cls, argv: Sequence[str] | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
        """Parse flags over environment over defaults; argparse exits with usage on bad input."""
        environ = os.environ if environ is None else environ
        parser = build_parser()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = _convert(f.type, raw)
                except ValueError:
                    parser.error(f"{env_name(f.name)}={raw!r}: expected {f.type}")
        parsed = parser.parse_args(argv)
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
        settings = cls(**values)
        settings.validate(parser)
        return settings

    def validate(self, parser: argparse.ArgumentParser) -> None:
        if not (0 <= self.port <= 65535) or not (-1 <= self.metrics_port <= 65535):
            parser.error("ports must be within 0-65535")
        if self.max_message_mb < 1 or self.threads < 1:
            parser.error("--max-message-mb and --threads must be >= 1")
        if self.tune_malloc not in (0, 1):
            parser.error(f"--tune-malloc: expected 0 or 1; got {self.tune_malloc}")
        if self.stream_idle_seconds < 0 or self.inline_us < 0:
            parser.error("--stream-idle-seconds and --inline-us must be >= 0")
        if (self.max_concurrent_rpcs < 1 or self.max_streams_per_connection < 1
                or self.max_shm_regions < 1 or self.max_shm_regions_per_connection < 1):
            parser.error("--max-concurrent-rpcs, --max-streams-per-connection, "
                         "--max-shm-regions and --max-shm-regions-per-connection must be >= 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        try:
            buckets = self.buckets
        except ValueError:
            buckets = ()
        if len(buckets) < 2 or buckets[0] <= 0 or len(set(buckets)) != len(buckets):
            parser.error(f"--step-buckets: expected at least two distinct positive numbers of "
                         f"seconds, comma-separated; got {self.step_buckets!r}")


def env_name(name: str) -> str:
    return f"GRADSERVE_{name.upper()}"


def _convert(kind: Any, raw: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(kind), kind)
    return kind(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve-server",
        description="Serve PyTorch gradients, steps and training loops over gRPC.",
        epilog="Every flag is also an environment variable: --max-models -> GRADSERVE_MAX_MODELS.",
    )
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=None,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} (default: {default!r}; env {env_name(f.name)})",
        )
    return parser
