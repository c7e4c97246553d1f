"""One typed Settings object from command-line flags and GRADSERVE_* environment variables.

Precedence: flag > environment > default. Every field is a flag (--max-models) and a variable
(GRADSERVE_MAX_MODELS). Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NoReturn

from .core.budget import default_budget_bytes
from .core.limits import Limits

# Seconds a timer may wait at most: a year (threading and asyncio refuse far larger timeouts).
MAX_SECONDS = 365 * 24 * 3600
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# The largest integer any count or size setting takes: beyond it a float (a Prometheus value, a
# budget share) no longer holds it exactly. Settings with a tighter limit name their own max=.
MAX_INT = 2**53


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A setting. Numeric ones may name their accepted range, which validate() checks for every
    field alike: min=, max= (inclusive) and above= (exclusive lower bound). An integer setting
    without max= is bounded by MAX_INT, a float one by MAX_SECONDS: every flag has a range."""
    if "max" not in extra and not isinstance(default, (str, bool)):
        extra["max"] = MAX_INT if isinstance(default, int) else MAX_SECONDS
    return field(default=default, metadata={"help": help, **extra})


def accepted_range(meta: Mapping[str, Any], kind: str) -> str:
    """'an integer in [0, 65535]', 'a number > 0', ...: how messages state a field's range."""
    noun = "an integer" if kind == "int" else "a number"
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
    if lo is not None and hi is not None:
        return f"{noun} in [{lo}, {hi}]"
    if above is not None and hi is not None:
        return f"{noun} in ({above}, {hi}]"
    parts = [f">= {lo}" if lo is not None else "", f"> {above}" if above is not None else "",
             f"<= {hi}" if hi is not None else ""]
    return " ".join([noun, *(p for p in parts if p)])


def in_range(value: Any, meta: Mapping[str, Any]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
    return ((lo is None or value >= lo) and (hi is None or value <= hi)
            and (above is None or value > above))


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 or [::] for all interfaces)")
    port: int = _opt(50051, "gRPC port (0 picks a free one)", min=0, max=65535)
    metrics_host: str = _opt("", "metrics address (default: same as --host)")
    metrics_port: int = _opt(9464, "Prometheus /metrics port (0 picks a free one, -1 disables)",
                             min=-1, max=65535)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    # gRPC keeps message sizes in a signed 32-bit int: 2048 MiB would overflow.
    max_message_mb: int = _opt(512, "largest gRPC message in MiB, both directions",
                               min=1, max=2047)
    threads: int = _opt(16, "threads that run model work (Forward, Backward, Step, ...) on the "
                        "device; calls waiting on their client hold none", min=1, max=4096)
    torch_threads: int = _opt(0, "torch intra-op threads (0: torch's default)", min=0, max=4096)
    log_level: str = _opt("info", "debug, info, warning or error",
                          choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("text", "text or json", choices=("text", "json"))
    # limits
    max_models: int = _opt(256, "models held at once", min=1)
    max_parameters: int = _opt(500_000_000, "parameter and buffer elements per model", min=1)
    max_request_mb: int = _opt(512, "tensor MiB in one request", min=1)
    max_graphs: int = _opt(64, "retained forward graphs per model", min=1)
    max_graph_mb: int = _opt(1024, "MiB of retained graphs per model (inputs, output and what "
                             "autograd saves)", min=1)
    graph_ttl_s: float = _opt(300.0, "seconds an unused retained graph is kept", above=0,
                              max=MAX_SECONDS)
    max_train_runs: int = _opt(8, "concurrent Train/TrainStream runs (0 refuses them)", min=0)
    max_dataset_mb: int = _opt(8192, "MiB of uploaded datasets, all together", min=0)
    request_id_window: int = _opt(1024, "remembered request ids per model (exactly-once retries)",
                                  min=0)
    request_id_window_mb: int = _opt(16, "MiB of replies kept per model for retries; older "
                                     "replies are dropped first (their ids stay remembered)",
                                     min=0)
    max_shm_mb: int = _opt(4096, "MiB of same-host shared memory clients may register at once "
                           "(0 disables the shared-memory fast path)", min=0)
    shm_ttl_s: float = _opt(300.0, "seconds an unused shared-memory region stays registered",
                            above=0, max=MAX_SECONDS)
    max_shm_regions: int = _opt(256, "shared-memory regions registered at once, all callers",
                                min=1)
    max_shm_regions_per_connection: int = _opt(
        32, "shared-memory regions one caller (connection and credential) may hold at once",
        min=1)
    max_memory_mb: int = _opt(0, "server-wide memory budget in MiB: parameters, gradients, "
                              "optimizer state, graphs, datasets, request-id cache, requests and "
                              "computations in flight (0: 75% of the physical or cgroup memory "
                              "limit, read at start)", min=0)
    max_compute_mb: int = _opt(0, "MiB one call may allocate for outputs and intermediates, "
                               "estimated before it runs (0: whatever the budget has free)",
                               min=0)
    max_exported_mb: int = _opt(64, "MiB of one uploaded torch.export archive (exported models)",
                                min=1)
    max_exported_nodes: int = _opt(10_000, "graph nodes of one exported program", min=1)
    exported_ops: str = _opt("", "ATen operators to add to the exported-model allow-list, "
                             "comma-separated (e.g. aten.erfinv.default; docs/exported.md)")
    step_buckets: str = _opt(",".join(str(b) for b in DEFAULT_BUCKETS),
                             "step latency histogram buckets in seconds, comma-separated")
    # transport
    stream_idle_seconds: float = _opt(
        120.0, "a stream that waits this long for its client (no message in, or no reply read) "
        "ends with DEADLINE_EXCEEDED; 0: never", min=0, max=MAX_SECONDS)
    max_concurrent_rpcs: int = _opt(
        10000, "open RPCs of every kind together (health Watch streams at most a tenth of "
        "them); beyond it new calls get RESOURCE_EXHAUSTED; health Check always answers",
        min=1, max=2**30)  # gRPC takes twice this as a C int (the pending-requests hard limit)
    max_connections: int = _opt(
        0, "client connections held at once; beyond it new ones wait in the kernel's queue "
        "(0: the descriptor limit less an eighth, at least 64, kept for the server's own files)",
        min=0, max=2**31 - 1)
    max_streams_per_connection: int = _opt(
        1000, "concurrent RPCs on one client connection (HTTP/2 max concurrent streams); "
        "the client queues the rest", min=1, max=2**31 - 1)
    tune_malloc: int = _opt(
        1, "1: this process keeps large message buffers in one glibc heap (mmap threshold "
        "512 MiB, trim threshold 1 GiB, one arena) and returns its free memory once no call has "
        "started for 2 s; 16-64 MiB messages take 20-45 percent less time. 0: glibc's defaults",
        min=0, max=1)
    inline_us: int = _opt(
        500, "a call whose identical predecessor (method, model, shapes) took less than this "
        "many microseconds runs on the event loop instead of a thread; 0: never", min=0)
    # durability
    state_dir: str = _opt("", "directory for checkpoints; models are restored from it at start")
    autosave_steps: int = _opt(0, "during Train, checkpoint every N steps (0: off)", min=0)
    autosave_seconds: float = _opt(0.0, "every N seconds, checkpoint in the background every "
                                   "model changed since its last checkpoint (0: off)", min=0,
                                   max=MAX_SECONDS)
    grace_seconds: float = _opt(20.0, "on SIGTERM: time to stop loops and checkpoint", min=0,
                                max=MAX_SECONDS)
    persist_datasets: int = _opt(0, "1: write uploaded datasets to --state-dir so that they "
                                 "survive restarts (0: memory only)", min=0, max=1)
    # distributed (under torchrun with WORLD_SIZE > 1; docs/scaling.md)
    dist_backend: str = _opt("auto", "torch.distributed backend of a torchrun group: auto (nccl "
                             "on CUDA, else gloo), gloo or nccl; named, even torchrun with one process "
                             "forms a group (to check the backend on one device)",
                             choices=("auto", "gloo", "nccl"))
    dist_timeout_seconds: float = _opt(
        20.0, "longest wait of any collective for the other ranks (also the group's start); a "
        "lost rank fails the calls in progress within about this long. Must exceed the "
        "slowest forward+backward of one shard", above=0)
    dist_verify: int = _opt(0, "1: after every call that changes a model, compare a hash of "
                            "its parameters, buffers, gradients and optimizer state on every "
                            "rank (slow; for tests and debugging)", min=0, max=1)
    # security
    auth_token_file: str = _opt("", "file of bearer tokens, one per line: 'token [scope,scope]'")
    tls_cert: str = _opt("", "PEM server certificate (enables TLS)")
    tls_key: str = _opt("", "PEM server private key")
    tls_client_ca: str = _opt("", "PEM CA for client certificates (enables mutual TLS)")

    @property
    def limits(self) -> Limits:
        """The core's limits; without --max-memory-mb the budget's default is read now."""
        mib = 1024 * 1024
        memory, source = ((self.max_memory_mb * mib, "--max-memory-mb") if self.max_memory_mb
                          else default_budget_bytes())
        return Limits(
            max_models=self.max_models, max_parameters=self.max_parameters,
            max_request_bytes=self.max_request_mb * mib, max_graphs=self.max_graphs,
            max_graph_bytes=self.max_graph_mb * mib, graph_ttl_s=self.graph_ttl_s,
            max_train_runs=self.max_train_runs, max_dataset_bytes=self.max_dataset_mb * mib,
            request_id_window=self.request_id_window,
            request_id_window_bytes=self.request_id_window_mb * mib, max_memory_bytes=memory,
            max_compute_bytes=self.max_compute_mb * mib, memory_source=source,
            max_exported_bytes=self.max_exported_mb * mib,
            max_exported_nodes=self.max_exported_nodes, exported_ops=self.extra_ops,
        )

    @property
    def extra_ops(self) -> tuple[str, ...]:
        return tuple(op.strip() for op in self.exported_ops.split(",") if op.strip())

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
                    kind = {"int": "an integer", "float": "a number"}.get(str(f.type), f.type)
                    parser.error(f"{env_name(f.name)} (or --{f.name.replace('_', '-')}) "
                                 f"{raw!r}: expected {kind}")
        parsed = parser.parse_args(argv)
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
        settings = cls(**values)
        settings.validate(parser)
        return settings

    def validate(self, parser: argparse.ArgumentParser) -> None:
        """Every numeric field against its range (field metadata), then the cross-field rules.

        parser.error prints one line naming the flag, its variable, the value and the range.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if str(f.type) in ("int", "float") and not in_range(value, f.metadata):
                parser.error(f"{flag_name(f.name)} {value!r}: "
                             f"expected {accepted_range(f.metadata, str(f.type))}")
        if not DEVICE.fullmatch(self.device):
            parser.error(f"--device (or GRADSERVE_DEVICE) {self.device!r}: expected auto, cpu, "
                         "cuda or cuda:N")
        if self.port and self.port == self.metrics_port:
            parser.error(f"--metrics-port (or GRADSERVE_METRICS_PORT) {self.metrics_port}: it "
                         "is the gRPC port (--port) too; choose another, or -1 to turn /metrics "
                         "off")
        if bool(self.tls_cert) != bool(self.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        if self.persist_datasets and not self.state_dir:
            parser.error("--persist-datasets 1 needs --state-dir (where the datasets are kept)")
        try:
            buckets = self.buckets
        except ValueError:
            buckets = ()
        from .catalog.exported import check_extra_ops  # imports torch: only when validating

        try:
            check_extra_ops(self.extra_ops)
        except ValueError as exc:
            parser.error(f"--exported-ops: {exc}")
        if len(buckets) < 2 or buckets[0] <= 0 or len(set(buckets)) != len(buckets):
            parser.error(f"--step-buckets: expected at least two distinct positive numbers of "
                         f"seconds, comma-separated; got {self.step_buckets!r}")


def env_name(name: str) -> str:
    return f"GRADSERVE_{name.upper()}"


def flag_name(name: str) -> str:
    """'--metrics-port (or GRADSERVE_METRICS_PORT)': how errors name a setting."""
    return f"--{name.replace('_', '-')} (or {env_name(name)})"


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def _boolean(raw: str) -> bool:
    """'true'/'false' (also 1/0, yes/no, on/off): bool('false') would be True."""
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"{raw!r} is not a boolean") from None


def _convert(kind: Any, raw: str) -> Any:
    name = getattr(kind, "__name__", str(kind))  # a type, or its name (string annotations)
    converters: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str,
                                                    "bool": _boolean}
    return converters.get(name, kind)(raw)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block of every flag first): the flag, the
    value and what is expected; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
            # argparse %-formats help strings: a literal % must be doubled.
            help=f"{f.metadata['help']} (default: {default!r}; env {env_name(f.name)})"
            .replace("%", "%%"),
        )
    return parser
