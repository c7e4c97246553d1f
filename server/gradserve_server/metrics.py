"""Every Prometheus object gradserve exports, declared once, in one registry per server.

Names follow Prometheus conventions: a gradserve_ prefix, base units (seconds, bytes) and
counters declared without _total (the client library appends it in the exposition).
docs/metrics.md describes each metric; the Grafana dashboard in deploy/grafana queries them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .core.checkpoints import QUARANTINE_REASONS
from .core.hooks import Hooks
from .core.service import SAVE_TRIGGERS
from .core.trainer import CANCELLED, COMPLETED, MAX_STEPS, NON_FINITE, SHUTDOWN, STOP_LOSS

PHASES = ("forward", "backward", "optimizer_step", "train_step", "communication")
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0, 300.0)
# How a Train run can end: the trainer's reasons, and "error" when the run failed or was refused.
STOP_REASONS = (COMPLETED, MAX_STEPS, STOP_LOSS, CANCELLED, NON_FINITE, SHUTDOWN, "error")


class _DeviceMemory(Collector):
    """CUDA memory at scrape time: allocated, reserved, peak and total bytes per device.

    Nothing is reported until this process has initialised CUDA, so a scrape never creates a
    CUDA context on its own (a CPU server exports the family with no samples).
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device  # a torch.device to report alone; None: every CUDA device

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "gradserve_device_memory_bytes",
            "CUDA memory by device and kind: allocated (live tensors), reserved (held by the "
            "caching allocator), peak (highest allocated since start), total (the device's).",
            labels=["device", "kind"])

    def _indices(self) -> list[int]:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return []
        if self.device is not None:
            if getattr(self.device, "type", None) != "cuda":
                return []
            return [self.device.index or 0]
        return list(range(torch.cuda.device_count()))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        family = self._family()
        for i in self._indices():
            dev = f"cuda:{i}"
            family.add_metric([dev, "allocated"], float(torch.cuda.memory_allocated(i)))
            family.add_metric([dev, "reserved"], float(torch.cuda.memory_reserved(i)))
            family.add_metric([dev, "peak"], float(torch.cuda.max_memory_allocated(i)))
            family.add_metric([dev, "total"],
                              float(torch.cuda.get_device_properties(i).total_memory))
        yield family


class _MemoryBudget(Collector):
    """The memory budget (--max-memory-mb) at scrape time: bytes held by kind, and the limit."""

    def __init__(self) -> None:
        self.limit = 0
        self.held: Callable[[], Mapping[str, int]] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gradserve_memory_budget_bytes",
                "Bytes charged to the server's memory budget by kind: parameters, gradients, "
                "optimizer, graphs, datasets, id_cache, requests, compute.", labels=["kind"]),
            GaugeMetricFamily("gradserve_memory_budget_limit_bytes",
                              "The server's memory budget (--max-memory-mb or its default)."))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        held_family, limit_family = self._families()
        if self.held is not None:
            for kind, nbytes in self.held().items():
                held_family.add_metric([kind], float(nbytes))
            limit_family.add_metric([], float(self.limit))
        yield held_family
        yield limit_family


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics(Hooks):
    """Prometheus implementation of the core's hooks, plus the RPC histogram.

    Series labelled by model exist only while the model is live: they are created on
    model_added and removed on model_removed. Every hook checks liveness and writes under one
    lock, so a hook racing a delete can never bring a removed series back.
    """

    def __init__(self, step_buckets: Iterable[float], max_models: int,
                 device: Any = None) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_DeviceMemory(device))
        self._budget = _MemoryBudget()
        r.register(self._budget)
        Info("gradserve_build", "Versions of gradserve and torch this server runs.",
             registry=r).info({"version": _version("gradserve"), "torch": _version("torch")})
        self.rpc_seconds = Histogram(
            "gradserve_rpc_duration_seconds",
            "RPC latency by method and gRPC status code (streams: until the stream ends).",
            ["method", "code"], buckets=RPC_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "gradserve_step_duration_seconds",
            "Latency of model work by model and phase (forward, backward, optimizer_step, "
            "train_step; communication: a torchrun group's collectives for one call or step).",
            ["model", "phase"], buckets=tuple(step_buckets), registry=r)
        self.world_size = Gauge(
            "gradserve_world_size",
            "Processes this server computes with: 1, or the size of its torchrun group.",
            registry=r)
        self.world_size.set(1)
        self.loss_gauge = Gauge(
            "gradserve_loss",
            "Last loss per model: a Backward's loss, a training step's batch loss, an epoch's "
            "mean loss; after a Train run its final_loss.", ["model"], registry=r)
        self.grad_norm_gauge = Gauge(
            "gradserve_grad_norm",
            "Total L2 norm of the gradients at the last measured optimizer step per model "
            "(before clipping).", ["model"], registry=r)
        self.lr_gauge = Gauge("gradserve_learning_rate",
                              "Learning rate of the last optimizer step per model.", ["model"],
                              registry=r)
        self.steps_total = Counter("gradserve_steps", "Optimizer steps per model.", ["model"],
                                   registry=r)
        self.samples_total = Counter(
            "gradserve_samples", "Samples trained on by Train and TrainStream per model.",
            ["model"], registry=r)
        self.models = Gauge("gradserve_models", "Models loaded.", registry=r)
        self.models_limit = Gauge("gradserve_models_limit",
                                  "Configured cap on loaded models (--max-models).", registry=r)
        self.models_limit.set(max_models)
        self.graphs_gauge = Gauge(
            "gradserve_retained_graphs",
            "Autograd graphs retained by Forward(retain_graph) and not yet consumed, per model.",
            ["model"], registry=r)
        self.evictions = Counter(
            "gradserve_graph_evictions",
            "Retained graphs evicted by the TTL or the per-model budget, per model.", ["model"],
            registry=r)
        self.train_active = Gauge("gradserve_train_runs_active",
                                  "Train and TrainStream runs in progress.", registry=r)
        self.train_ended_total = Counter(
            "gradserve_train_runs", "Train runs ended, by stop reason.", ["stop_reason"],
            registry=r)
        for reason in STOP_REASONS:  # every reason from the start: alerts see 0, not nothing
            self.train_ended_total.labels(reason)
        self.dataset_bytes_gauge = Gauge("gradserve_dataset_bytes",
                                         "Bytes held by uploaded datasets, all together.",
                                         registry=r)
        self.checkpoint_saves = Counter(
            "gradserve_checkpoint_saves",
            "Checkpoint writes by trigger (request, autosave, shutdown) and result (ok, error).",
            ["trigger", "result"], registry=r)
        for trigger in SAVE_TRIGGERS:
            for result in ("ok", "error"):
                self.checkpoint_saves.labels(trigger, result)
        self.quarantined = Counter(
            "gradserve_checkpoints_quarantined",
            "State-dir files moved to quarantine/ at start, by reason (unreadable, invalid, "
            "mismatch, over_limit).", ["reason"], registry=r)
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason)
        self._live: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()
        self._per_model: list[Any] = [self.loss_gauge, self.grad_norm_gauge, self.lr_gauge,
                                      self.steps_total, self.samples_total, self.graphs_gauge,
                                      self.evictions]

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP server; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return server, int(server.server_port)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method, code).observe(seconds)

    # --- hooks: model labels exist only for live models -------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(...), cached: the lookup is a hot per-call cost (caller holds the lock)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _if_live(self, model_id: str, write: Callable[[], None]) -> None:
        with self._lock:
            if model_id in self._live:
                write()

    def model_added(self, model_id: str) -> None:
        with self._lock:
            self._live.add(model_id)
            self.models.set(len(self._live))
            # Counters start at 0 so that rate() covers a model's first steps.
            self.steps_total.labels(model_id)
            self.samples_total.labels(model_id)
            self.evictions.labels(model_id)
            self.graphs_gauge.labels(model_id).set(0)

    def model_removed(self, model_id: str) -> None:
        with self._lock:
            self._live.discard(model_id)
            self.models.set(len(self._live))
            for key in [k for k in self._children if k[1][0] == model_id]:
                del self._children[key]
            for metric in self._per_model:
                try:
                    metric.remove(model_id)
                except KeyError:
                    pass  # never observed: nothing to remove
            for phase in PHASES:
                try:
                    self.step_seconds.remove(model_id, phase)
                except KeyError:
                    pass  # never observed: nothing to remove

    def phase_seconds(self, model_id: str, phase: str, seconds: float) -> None:
        self._if_live(model_id,
                      lambda: self._child(self.step_seconds, model_id, phase).observe(seconds))

    def loss(self, model_id: str, value: float) -> None:
        self._if_live(model_id, lambda: self._child(self.loss_gauge, model_id).set(value))

    def grad_norm(self, model_id: str, value: float) -> None:
        self._if_live(model_id, lambda: self._child(self.grad_norm_gauge, model_id).set(value))

    def learning_rate(self, model_id: str, value: float) -> None:
        self._if_live(model_id, lambda: self._child(self.lr_gauge, model_id).set(value))

    def steps(self, model_id: str, steps: int, samples: int) -> None:
        def write() -> None:
            if steps:
                self._child(self.steps_total, model_id).inc(steps)
            if samples:
                self._child(self.samples_total, model_id).inc(samples)

        self._if_live(model_id, write)

    def graphs(self, model_id: str, retained: int, evicted: int) -> None:
        def write() -> None:
            self._child(self.graphs_gauge, model_id).set(retained)
            if evicted:
                self._child(self.evictions, model_id).inc(evicted)

        self._if_live(model_id, write)

    def train_runs(self, delta: int) -> None:
        self.train_active.inc(delta)

    def train_ended(self, stop_reason: str) -> None:
        self.train_ended_total.labels(stop_reason).inc()

    def dataset_bytes(self, total: int) -> None:
        self.dataset_bytes_gauge.set(total)

    def checkpoint_saved(self, trigger: str, result: str) -> None:
        self.checkpoint_saves.labels(trigger, result).inc()

    def checkpoint_quarantined(self, reason: str) -> None:
        self.quarantined.labels(reason).inc()
    def memory_budget(self, limit: int, held: Callable[[], Mapping[str, int]]) -> None:
        # Read at scrape time: charging the budget on every call costs no metric update.
        self._budget.limit, self._budget.held = limit, held
