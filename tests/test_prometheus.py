"""A real Prometheus scrapes a real server: the loss it stores is the SDK's, quantiles are finite.

Needs the `prometheus` binary (Debian package `prometheus`); skipped locally without it, a
failure in CI. Everything listens on 127.0.0.1; every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import require_tool
from gradserve import Client
from gradserve_server.app import GradServer
from test_metrics import dashboard_exprs, docs_promql

pytestmark = pytest.mark.prometheus

DEADLINE_S = 60.0
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus process and its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        self.deadline = time.monotonic() + DEADLINE_S

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # the API answers errors (bad query) with JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> Any:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", f"{expr}: {reply}"
        return reply["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        """The one value of an instant vector query; None while it has no sample."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def poll(self, check: Callable[[], Any], what: str) -> Any:
        """Call check until truthy; fail once the test's deadline has passed."""
        while True:
            result = check()
            if result:
                return result
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > self.deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.2)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    binary = shutil.which("prometheus")
    require_tool(binary is not None, "the prometheus binary (apt-get install prometheus)")
    assert binary is not None
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: gradserve\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return False

        prom.poll(ready, "prometheus to be ready")
        return prom

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def test_prometheus_scrapes_loss_and_step_latency(
        make_server: Callable[..., GradServer],
        prometheus_for: Callable[[int], Prometheus]) -> None:
    server = make_server(metrics_port=0)
    prom = prometheus_for(server.metrics_port)

    def target_up() -> bool:
        targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
        return any(t["health"] == "up" for t in targets)

    prom.poll(target_up, "the gradserve target to be up")

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 2, generator=g)
    y = X @ torch.tensor([[2.0], [-3.4]]) + 4.2
    model = 'model="scraped"'
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        m = client.create_model(model_id="scraped", layers=LINEAR, loss="mse",
                                optimizer={"type": "sgd", "lr": 0.05}, seed=0)
        first = list(m.train(X, y, epochs=2, batch_size=8))[-1].summary
        assert first is not None
        # The sample with the final value reaches Prometheus at a later scrape.
        prom.poll(lambda: prom.scalar(f"gradserve_loss{{{model}}}") == first.final_loss,
                  f"gradserve_loss == {first.final_loss}")
        prom.poll(lambda: prom.scalar(f"gradserve_steps_total{{{model}}}") == first.model_step,
                  "the first run's steps")
        # A second run after that scrape: rate() sees the histogram grow between two samples.
        second = list(m.train(X, y, epochs=2, batch_size=8))[-1].summary
        assert second is not None
        prom.poll(lambda: prom.scalar(f"gradserve_steps_total{{{model}}}") == second.model_step,
                  "the second run's steps")
        assert prom.scalar(f"gradserve_loss{{{model}}}") == second.final_loss

    buckets = f'gradserve_step_duration_seconds_bucket{{{model}, phase="train_step"}}'
    raw = prom.scalar(f"histogram_quantile(0.5, sum by (le) ({buckets}))")
    assert raw is not None and math.isfinite(raw) and raw > 0
    rated = prom.scalar(f"histogram_quantile(0.5, sum by (le) (rate({buckets}[1m])))")
    assert rated is not None and math.isfinite(rated) and rated > 0
    assert prom.scalar(f"sum(gradserve_samples_total{{{model}}})") == 4 * len(X)

    # Every dashboard query is valid PromQL here, and the loss panel shows the model.
    for title, expr in dashboard_exprs():
        concrete = (expr.replace("$__rate_interval", "1m").replace("$model", ".*")
                    .replace("$phase", ".*").replace("$job", "gradserve"))
        reply = prom.get("/api/v1/query", query=concrete)
        assert reply["status"] == "success", f"panel {title!r}: {reply.get('error')}"
        if title == "Loss per model":
            assert [float(r["value"][1]) for r in reply["data"]["result"]] == [second.final_loss]
    # So is every example and alert in docs/metrics.md.
    for expr in docs_promql():
        reply = prom.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", f"docs/metrics.md {expr!r}: {reply.get('error')}"
