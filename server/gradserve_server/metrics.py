"""Every Prometheus object gradserve exports, declared once, in one registry per server."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .core.hooks import Hooks

PHASES = ("forward", "backward", "optimizer_step", "train_step")
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0, 300.0)


class _DeviceMemory(Collector):
    """CUDA memory at scrape time: allocated, reserved and peak bytes per device."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        family = GaugeMetricFamily("gradserve_device_memory_bytes",
                                   "CUDA memory by device and kind (allocated, reserved, peak).",
                                   labels=["device", "kind"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                family.add_metric([dev, "allocated"], torch.cuda.memory_allocated(i))
                family.add_metric([dev, "reserved"], torch.cuda.memory_reserved(i))
                family.add_metric([dev, "peak"], torch.cuda.max_memory_allocated(i))
        yield family


class Metrics(Hooks):
    """Prometheus implementation of the core's hooks, plus the RPC histogram."""

    def __init__(self, step_buckets: Iterable[float], max_models: int) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_DeviceMemory())
        self.rpc_seconds = Histogram(
            "gradserve_rpc_duration_seconds", "RPC latency by method and status code.",
            ["method", "code"], buckets=RPC_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "gradserve_step_duration_seconds",
            "Latency of model work by model and phase (forward, backward, optimizer_step, "
            "train_step).", ["model", "phase"], buckets=tuple(step_buckets), registry=r)
        self.loss_gauge = Gauge("gradserve_loss", "Last loss seen per model.", ["model"],
                                registry=r)
        self.grad_norm_gauge = Gauge("gradserve_grad_norm",
                                     "Total gradient norm at the last measured step per model.",
                                     ["model"], registry=r)
        self.lr_gauge = Gauge("gradserve_learning_rate", "Learning rate of the last step per model.",
                              ["model"], registry=r)
        self.steps_total = Counter("gradserve_steps", "Optimizer steps per model.", ["model"],
                                   registry=r)
        self.samples_total = Counter("gradserve_samples", "Training samples processed per model.",
                                     ["model"], registry=r)
        self.models = Gauge("gradserve_models", "Models loaded.", registry=r)
        self.models_limit = Gauge("gradserve_models_limit", "Configured cap on models (max_models).",
                                  registry=r)
        self.models_limit.set(max_models)
        self.graphs_gauge = Gauge("gradserve_retained_graphs",
                                  "Autograd graphs retained by Forward and not yet consumed.",
                                  ["model"], registry=r)
        self.evictions = Counter("gradserve_graph_evictions",
                                 "Retained graphs evicted by TTL or budget.", ["model"], registry=r)
        self.train_active = Gauge("gradserve_train_runs_active", "Train/TrainStream runs active.",
                                  registry=r)
        self.dataset_bytes_gauge = Gauge("gradserve_dataset_bytes",
                                         "Bytes held by uploaded datasets.", registry=r)
        self._live: set[str] = set()
        self._lock = threading.Lock()
        self._per_model: list[Any] = [self.loss_gauge, self.grad_norm_gauge, self.lr_gauge,
                                      self.steps_total, self.samples_total, self.graphs_gauge,
                                      self.evictions]

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP server; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)

    # --- hooks: model labels exist only for live models -------------------------------------

    def _alive(self, model_id: str) -> bool:
        return model_id in self._live

    def model_added(self, model_id: str) -> None:
        with self._lock:
            self._live.add(model_id)
            self.models.set(len(self._live))
        self.steps_total.labels(model_id)
        self.samples_total.labels(model_id)
        self.evictions.labels(model_id)
        self.graphs_gauge.labels(model_id).set(0)

    def model_removed(self, model_id: str) -> None:
        with self._lock:
            self._live.discard(model_id)
            self.models.set(len(self._live))
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
        if self._alive(model_id):
            self.step_seconds.labels(model_id, phase).observe(seconds)

    def loss(self, model_id: str, value: float) -> None:
        if self._alive(model_id):
            self.loss_gauge.labels(model_id).set(value)

    def grad_norm(self, model_id: str, value: float) -> None:
        if self._alive(model_id):
            self.grad_norm_gauge.labels(model_id).set(value)

    def learning_rate(self, model_id: str, value: float) -> None:
        if self._alive(model_id):
            self.lr_gauge.labels(model_id).set(value)

    def steps(self, model_id: str, steps: int, samples: int) -> None:
        if self._alive(model_id):
            self.steps_total.labels(model_id).inc(steps)
            if samples:
                self.samples_total.labels(model_id).inc(samples)

    def graphs(self, model_id: str, retained: int, evicted: int) -> None:
        if self._alive(model_id):
            self.graphs_gauge.labels(model_id).set(retained)
            if evicted:
                self.evictions.labels(model_id).inc(evicted)

    def train_runs(self, delta: int) -> None:
        self.train_active.inc(delta)

    def dataset_bytes(self, total: int) -> None:
        self.dataset_bytes_gauge.set(total)
