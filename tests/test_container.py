"""The image for real: build it with podman, train through it from the host, scrape it, SIGTERM it.

Runs the commands of scripts/container-test.sh (the ones docs/docker.md quotes). The first run
makes a Debian base image with debootstrap (about a minute) and builds the image (a few minutes);
later runs reuse both from podman's cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from gradserve import Client

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "container-test.sh"
WHEELS = Path(os.environ.get("WHEELS", "/opt/wheels"))
BASE_IMAGE = "localhost/gradserve-base:bookworm"
# Another tag when several checkouts share one podman storage (they would overwrite each other's).
IMAGE = os.environ.get("GRADSERVE_TEST_IMAGE", "localhost/gradserve:test")
GRACE_S = 30  # podman stop's grace; the server's own drain budget is 20 s

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


def _script(action: str, timeout: float, **env: str) -> str:
    """Run one action of scripts/container-test.sh; fail with its output when it fails."""
    settings = {"IMAGE": IMAGE, "BASE_IMAGE": BASE_IMAGE, "WHEELS": str(WHEELS), **env}
    proc = subprocess.run(["bash", str(SCRIPT), action], cwd=ROOT, env={**os.environ, **settings},
                          capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        pytest.fail(f"container-test.sh {action} exited {proc.returncode}:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_base_image() -> bool:
    return _podman("image", "exists", BASE_IMAGE).returncode == 0


@pytest.fixture(scope="module")
def image() -> str:
    require_tool(shutil.which("podman") is not None and shutil.which("runc") is not None,
                 "podman and runc (apt-get install -y podman runc)")
    require_tool(_has_base_image() or shutil.which("debootstrap") is not None,
                 "debootstrap, to make the base image (apt-get install -y debootstrap)")
    require_tool(any(WHEELS.glob("torch-2.13.0+cpu-cp311-*.whl")),
                 f"a torch-2.13.0+cpu cp311 wheel in {WHEELS} (set WHEELS to its folder)")
    _script("base", timeout=600)
    _script("build", timeout=1200)
    return IMAGE


@dataclass
class Container:
    name: str
    volume: str
    grpc_port: int
    metrics_port: int

    @property
    def env(self) -> dict[str, str]:
        return {"NAME": self.name, "VOLUME": self.volume, "GRPC_PORT": str(self.grpc_port),
                "METRICS_PORT": str(self.metrics_port), "GRACE": str(GRACE_S)}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logs(self) -> str:
        proc = _podman("logs", self.name)
        return proc.stdout + proc.stderr

    def stop(self) -> int:
        """SIGTERM; podman SIGKILLs after GRACE_S, which would show as exit code 137."""
        return int(_script("stop", timeout=GRACE_S + 60, **self.env).strip())


@pytest.fixture
def start(image: str) -> Iterator[Callable[..., Container]]:
    """start(volume) runs the image with its state volume (action "run-group": under torchrun);
    everything is removed at teardown."""
    started: list[Container] = []

    def run(volume: str, action: str = "run") -> Container:
        c = Container(f"gradserve-test-{uuid.uuid4().hex[:8]}", volume, _free_port(),
                      _free_port())
        started.append(c)
        _script(action, timeout=120, **c.env)
        return c

    yield run
    for c in started:
        _podman("rm", "-f", c.name)
    for volume in {c.volume for c in started}:
        _podman("volume", "rm", "-f", volume)


def _ready(c: Container) -> Client:
    client = Client(c.address, timeout=30)
    try:
        client.wait_ready(timeout=180)
    except TimeoutError:
        client.close()
        pytest.fail(f"{c.name} never became SERVING; its log:\n{c.logs()}")
    return client


def test_image_serves_trains_and_drains_on_sigterm(start: Callable[[str], Container]) -> None:
    volume = f"gradserve-test-{uuid.uuid4().hex[:8]}"
    first = start(volume)
    X = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    y = (X @ np.array([[2.0], [-3.4]], dtype=np.float32) + 4.2).astype(np.float32)
    with _ready(first) as client:
        model = client.create_model(
            layers=[{"type": "Linear", "in_features": 2, "out_features": 1}], loss="mse",
            optimizer={"type": "sgd", "lr": 0.05}, seed=0, model_id="container-linreg")
        events = list(model.train(X, y, epochs=3, batch_size=20, shuffle=True, seed=0))
        losses = [e.epoch_loss for e in events if e.kind == "epoch_end"]
        assert events[-1].kind == "done" and len(losses) == 3
        assert losses[-1] < losses[0] / 10, losses  # it learned, inside the container
        steps = model.refresh().step
        assert steps == 30

    # the image's HEALTHCHECK (python -m gradserve.probe) passes inside the container
    _script("health", timeout=60, **first.env)  # fails the test unless it exits 0

    with urllib.request.urlopen(f"http://127.0.0.1:{first.metrics_port}/metrics",
                                timeout=10) as reply:
        metrics = reply.read().decode()
    assert any(line.startswith("gradserve_") and 'model="container-linreg"' in line
               for line in metrics.splitlines()), metrics[:2000]

    assert first.stop() == 0, first.logs()  # drained and exited by itself: no SIGKILL
    assert "draining" in first.logs()

    # the drain checkpointed into the volume: a new container restores the model and its step
    second = start(volume)
    with _ready(second) as client:
        assert client.model("container-linreg").info.step == steps
    assert second.stop() == 0, second.logs()


def test_image_under_torchrun_trains_as_one_server_and_drains(
        start: Callable[..., Container]) -> None:
    """torchrun --nproc-per-node 2 in the container: one server of two CPU ranks."""
    volume = f"gradserve-test-{uuid.uuid4().hex[:8]}"
    group = start(volume, "run-group")
    X = np.random.default_rng(1).normal(size=(256, 2)).astype(np.float32)
    y = (X @ np.array([[2.0], [-3.4]], dtype=np.float32) + 4.2).astype(np.float32)
    with _ready(group) as client:
        info = client.server_info()
        assert (info.world_size, info.backend, info.devices) == (2, "gloo", ("cpu", "cpu"))
        model = client.create_model(
            layers=[{"type": "Linear", "in_features": 2, "out_features": 1}], loss="mse",
            optimizer={"type": "sgd", "lr": 0.05}, seed=0, model_id="group-linreg")
        events = list(model.train(X, y, epochs=3, batch_size=32, shuffle=True, seed=0))
        losses = [e.epoch_loss for e in events if e.kind == "epoch_end"]
        assert losses[-1] < losses[0] / 10, losses  # it learned, split over two ranks
        steps = model.refresh().step
        assert steps == 24
    _script("health", timeout=60, **group.env)
    with urllib.request.urlopen(f"http://127.0.0.1:{group.metrics_port}/metrics",
                                timeout=10) as reply:
        assert "gradserve_world_size 2.0" in reply.read().decode()

    code = group.stop()
    logs = group.logs()
    assert code in (0, 1), logs  # no SIGKILL (137); torchrun exits 1 after a signal
    assert logs.count("checkpointed 1 model(s)") == 1, logs
    assert "rank stopped" in logs and "exit_code=0" in logs, logs  # rank 1
    assert "gradserve: stopped" in logs, logs  # rank 0

    # one process restores the group's checkpoint: they load at any world size
    single = start(volume)
    with _ready(single) as client:
        assert client.model("group-linreg").info.step == steps
        assert client.server_info().world_size == 1
    assert single.stop() == 0, single.logs()


def test_read_only_image_without_a_writable_tmp_refuses_to_start(image: str) -> None:
    """Docker's --read-only has no /tmp: the only writable place left would be the state volume."""
    volume = f"gradserve-test-{uuid.uuid4().hex[:8]}"
    try:
        proc = _podman("run", "--rm", "--runtime", "runc", "--read-only", "--read-only-tmpfs=false",
                       "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                       "-v", f"{volume}:/var/lib/gradserve", image, timeout=180)
    finally:
        _podman("volume", "rm", "-f", volume)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gradserve-server: TMPDIR:" in proc.stderr and "--tmpfs /tmp" in proc.stderr
