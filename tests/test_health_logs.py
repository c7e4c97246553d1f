"""Health (SERVING, NOT_SERVING while draining) and logs (one line per RPC and per Train run)."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from gradserve import Client, GradServeError, NotFoundError
from gradserve_server.app import SERVICE, GradServer
from gradserve_server.core.service import CheckpointResult
from gradserve_server.logs import JsonFormatter, TextFormatter
from grpc_health.v1 import health_pb2, health_pb2_grpc

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g)
    return X, X @ torch.tensor([[2.0], [-3.4]]) + 4.2


# ---------------------------------------------------------------------- health


def test_serving_once_started(server: GradServer, client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health(SERVICE) == "SERVING"


def test_not_serving_while_draining_a_running_train(
        make_server: Callable[..., GradServer]) -> None:
    server = make_server(grace_seconds=30)
    address = f"127.0.0.1:{server.port}"
    X, y = data()
    with Client(address, timeout=30) as client, grpc.insecure_channel(address) as channel:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
        run = iter(m.train(X, y, max_steps=10**9, batch_size=4, log_every_steps=1))
        assert next(run).kind == "progress"  # the run is under way and holds the server up

        # A Watch opened before the drain sees the status change while in-flight calls finish.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        drained: list[CheckpointResult] = []
        drain = threading.Thread(target=lambda: drained.append(server.drain()))
        drain.start()
        try:
            assert next(watch).status == NOT_SERVING
        finally:
            watch.cancel()
        # The drain stops the loop at a step boundary; the run reports why it ended.
        events = list(run)
        assert events[-1].kind == "done"
        assert events[-1].summary is not None
        assert events[-1].summary.stop_reason == "shutdown"
        drain.join(60)
        assert not drain.is_alive() and len(drained) == 1
        assert drained[0].ok and drained[0].saved == []  # no state dir: nothing to save
        assert server.metrics.registry.get_sample_value(
            "gradserve_train_runs_total", {"stop_reason": "shutdown"}) == 1
        with pytest.raises(GradServeError):  # the server is gone: nothing answers any more
            client.health(timeout=2)


# ---------------------------------------------------------------------- formatters


def _record(msg: str, fields: dict[str, Any] | None = None, level: int = logging.INFO
            ) -> logging.LogRecord:
    record = logging.LogRecord("gradserve.test", level, __file__, 1, msg, (), None)
    if fields is not None:
        record.fields = fields
    return record


def test_json_formatter_lines_parse_and_carry_fields() -> None:
    line = JsonFormatter().format(_record("train run finished", {
        "model": "m", "steps": 3, "final_loss": 0.25, "nan": float("nan"),
        "inf": float("-inf"), "text": 'a "quoted"\nline', "nested": {"losses": [1.5, math.nan]}}))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "train run finished" and out["level"] == "info"
    assert out["logger"] == "gradserve.test"
    assert out["model"] == "m" and out["steps"] == 3 and out["final_loss"] == 0.25
    assert out["nan"] is None and out["inf"] is None  # JSON has no NaN: null keeps it valid
    assert out["text"] == 'a "quoted"\nline'
    assert out["nested"] == {"losses": [1.5, None]}
    assert out["ts"].endswith("Z") and time.strptime(out["ts"][:19], "%Y-%m-%dT%H:%M:%S")


def test_json_formatter_keeps_tracebacks() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("gradserve", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in out["exc"]


def test_text_formatter_appends_fields_logfmt_style() -> None:
    line = TextFormatter().format(_record("rpc", {"method": "Train", "peer": "ipv4:1",
                                                  "msg": "two words"}))
    assert line.endswith(' rpc method=Train peer=ipv4:1 msg="two words"')


def test_one_debug_line_per_rpc(server: GradServer, client: Client,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gradserve.rpc")
    m = client.create_model(layers=LINEAR, loss="mse")
    m.forward(torch.zeros(1, 2))
    with pytest.raises(NotFoundError):
        client.model("missing")
    rpc = [r for r in caplog.records if r.name == "gradserve.rpc" and r.getMessage() == "rpc"]
    assert all(r.levelno == logging.DEBUG for r in rpc)
    assert [(r.fields["method"], r.fields["code"]) for r in rpc] == [  # type: ignore[attr-defined]
        ("CreateModel", "OK"), ("Forward", "OK"), ("GetModel", "NOT_FOUND")]
    assert all(r.fields["ms"] >= 0 and r.fields["peer"] for r in rpc)  # type: ignore[attr-defined]


def test_one_info_line_per_train_run(server: GradServer, client: Client,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gradserve.train")
    X, y = data()
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
    summary = list(m.train(X, y, epochs=2, batch_size=8))[-1].summary
    assert summary is not None
    for _event in m.train(X, y, max_steps=10**9, batch_size=4, log_every_steps=1):
        break  # the caller goes away: the run still gets its line

    def train_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gradserve.train"]

    deadline = time.monotonic() + 30
    while len(train_lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    finished, ended = train_lines()
    assert finished.levelno == ended.levelno == logging.INFO
    assert finished.fields == {  # type: ignore[attr-defined]
        "model": m.id, "steps": 8, "epochs": 2, "final_loss": summary.final_loss,
        "stop_reason": "completed", "seconds": finished.fields["seconds"]}  # type: ignore
    assert ended.fields["model"] == m.id  # type: ignore[attr-defined]
    assert ended.fields["stop_reason"] == "cancelled"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the CLI, end to end


class _Lines:
    """Reads a process's stream on a thread; lines() and wait_for() never block for long."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
                if time.monotonic() < deadline:
                    continue
            if line is None:
                pytest.fail("no matching line; output so far:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if match(line):
                return line


@pytest.fixture
def cli_json() -> Iterator[tuple[subprocess.Popen[str], _Lines]]:
    env = {**os.environ, "GRADSERVE_GRACE_SECONDS": "5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve_server", "--port", "0", "--metrics-port", "-1",
         "--log-format", "json", "--log-level", "debug", "--threads", "4"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        yield proc, _Lines(proc.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_cli_json_logs_one_object_per_line(
        cli_json: tuple[subprocess.Popen[str], _Lines]) -> None:
    proc, lines = cli_json
    first = json.loads(lines.wait_for(lambda s: "gradserve serving" in s, 120))
    assert first["level"] == "info" and first["metrics_port"] == -1
    X, y = data()
    with Client(first["grpc"], timeout=60) as client:
        client.wait_ready(30)
        m = client.create_model(layers=LINEAR, loss="mse",
                                optimizer={"type": "sgd", "lr": 0.01})
        summary = list(m.train(X, y, epochs=1, batch_size=8))[-1].summary
        assert summary is not None
    proc.send_signal(signal.SIGTERM)
    lines.wait_for(lambda s: '"stopped"' in s, 60)
    assert proc.wait(60) == 0

    records = [json.loads(line) for line in lines.seen]  # every line is one JSON object
    rpcs = [r for r in records if r["logger"] == "gradserve.rpc" and r["msg"] == "rpc"]
    assert {(r["method"], r["code"]) for r in rpcs} >= {("CreateModel", "OK"), ("Train", "OK")}
    for r in rpcs:
        assert r["level"] == "debug" and r["ms"] >= 0 and r["peer"]
    (train,) = [r for r in records if r["logger"] == "gradserve.train"]
    assert train["level"] == "info" and train["msg"] == "train run finished"
    assert train["model"] == m.id and train["steps"] == summary.steps == 4
    assert train["final_loss"] == summary.final_loss
    assert train["stop_reason"] == "completed"
    assert records[-1]["msg"] == "stopped"
