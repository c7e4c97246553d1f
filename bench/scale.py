"""The `scale` section: one MLP trained by a torchrun group of 1 and of 2 ranks (docs/scaling.md).

Each world is `torchrun --standalone --nproc-per-node N -m gradserve_server` (torchrun gives
every rank one torch thread; on a CUDA machine each rank takes cuda:LOCAL_RANK and nccl, so the
script runs unchanged there). The same dataset is uploaded once per group and trained with the
same Train call; samples per second come from the wall time of the call, the communication share
of a step from the server's own histograms (phase communication over phase train_step).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

LAYERS: list[dict[str, Any]] = [{"type": "Linear", "in_features": 784, "out_features": 256}, {"type": "ReLU"},
          {"type": "Linear", "in_features": 256, "out_features": 10}]
SAMPLES = 8192


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """pid's descendants (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Group:
    """A torchrun group serving on free ports; stop() drains it (SIGTERM) or kills it."""

    def __init__(self, world: int) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        env = {**os.environ, "GRADSERVE_LOG_FORMAT": "json", "GRADSERVE_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={world}", "-m", "gradserve_server", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--torch-threads", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.address = f"127.0.0.1:{self.port}"

    def metric(self, model_id: str, phase: str) -> tuple[float, float]:
        """(sum of seconds, count) of gradserve_step_duration_seconds for model and phase."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = []
        for kind in ("sum", "count"):
            found = re.search(rf'^gradserve_step_duration_seconds_{kind}\{{model="{model_id}",'
                              rf'phase="{phase}"\}} (\S+)$', text, re.MULTILINE)
            out.append(float(found.group(1)) if found else 0.0)
        return out[0], out[1]

    def stop(self) -> None:
        tree = _tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for pid in [*tree, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def probe(world: int, grad_bytes: int, batch_bytes: int) -> dict[str, Any]:
    """The group's link on this machine (bench/scale_probe.py under torchrun)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={world}", str(Path(__file__).with_name("scale_probe.py")),
         str(grad_bytes), str(batch_bytes)],
        capture_output=True, text=True, timeout=300, check=True, start_new_session=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    return dict(json.loads(line))


def predict(one_step_s: float, link: dict[str, Any]) -> float:
    """docs/scaling.md: T(N) = C/N + all-reduce + the batch from rank 0 + two latencies (the
    command and the all-reduce's); C is world 1's step."""
    n = link["world"]
    return (one_step_s / n + link["all_reduce_s"] + (n - 1) / n * link["batch_broadcast_s"]
            + 2 * link["latency_s"])


def measure(world: int, batch: int, epochs: int, reps: int) -> dict[str, Any]:
    """Samples per second of Train on one world size, and its per-step phase times."""
    from gradserve import Client

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 784, generator=g)
    y = torch.randint(0, 10, (SAMPLES,), generator=g)
    group = Group(world)
    try:
        with Client(group.address, timeout=600) as client:
            client.wait_ready(300)
            info = client.server_info()
            dataset = client.upload_dataset(x, y)
            m = client.create_model(layers=LAYERS, loss="cross_entropy",
                                    optimizer={"type": "sgd", "lr": 0.01}, seed=0)
            m.fit(dataset=dataset.dataset_id, epochs=1, batch_size=batch)  # warm-up
            step0 = group.metric(m.id, "train_step")
            comm0 = group.metric(m.id, "communication")
            seconds = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m.fit(dataset=dataset.dataset_id, epochs=epochs, batch_size=batch)
                seconds.append(time.perf_counter() - t0)
            step1 = group.metric(m.id, "train_step")
            comm1 = group.metric(m.id, "communication")
    finally:
        group.stop()
    steps = step1[1] - step0[1]
    step_s = (step1[0] - step0[0]) / steps if steps else float("nan")
    # Each step has one communication observation per command (the micro-step's and, for
    # world > 1, nothing else: optimizer steps travel with the next command).
    comm_s = (comm1[0] - comm0[0]) / steps if steps else 0.0
    best = statistics.median(seconds)
    return {"world": world, "devices": list(info.devices), "backend": info.backend,
            "samples_per_second": SAMPLES * epochs / best, "seconds": seconds,
            "step_seconds": step_s, "communication_seconds": comm_s,
            "communication_share": comm_s / step_s if step_s else 0.0,
            "grad_bytes": sum(p["out_features"] * (p["in_features"] + 1) * 4
                              for p in LAYERS if p["type"] == "Linear")}
