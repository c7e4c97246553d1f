"""Ray baseline, run side by side with gradserve: a Ray actor holding the same torch model.

The answer to "why not a Ray actor?", measured. One child process is the Ray driver (a local
Ray instance: GCS, raylet, one actor process) and a gradserve client at once; it alternates the
two in rounds, so both see the same machine at the same time:

- fused step: the actor's `step(x, y)` (forward, MSE loss, backward, SGD step of Linear(2,1) on a
  batch of 10, the loss returned) against gradserve's Backward(step=True);
- 16 MiB round trip: the actor's `echo(t)` of 16 MiB of float32 (Ray moves it through its
  shared-memory object store) against gradserve's Forward of Identity (shared memory and wire),
  once as a numpy array (Ray's zero-copy path: its fastest) and once as a torch tensor (which
  Ray pickles, with copies);
- the d2l workload (1000x2, batch 10, 3 epochs): one actor call per batch against gradserve's
  per-batch Backward(step=True), and the whole loop as one actor call against gradserve's Train.

Ray is an optional bench dependency (`pip install ray`, or the `bench` extra); without it the
section is skipped with a note.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

SKIP_NOTE = ("skipped: ray is not installed (pip install ray, or from a clone pip install "
             "'.[bench]')")


class Holder:
    """The actor's body: the model, its loss and optimizer, as a local PyTorch program has them.
    Decorated with ray.remote in the driver (ray is imported only there)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 1))
        self.loss = torch.nn.MSELoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.03)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One fused step; the loss comes back, as Backward's reply carries it."""
        return float(self._step(x, y).item())

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def echo(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def train(self, x: torch.Tensor, y: torch.Tensor, batches: list[list[torch.Tensor]]) -> int:
        """The d2l loop inside the actor: one call for the whole run (Train's equivalent)."""
        steps = 0
        for epoch in batches:
            for idx in epoch:
                self._step(x[idx], y[idx])  # as the local loop: no .item() per step
                steps += 1
        return steps


def driver(address: str, calls: int, big_reps: int, reps: int, conn: Any) -> None:
    """The Ray driver and gradserve client; samples (seconds) to conn, or {"skipped": why}."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    try:
        import ray
    except ImportError:
        conn.send({"skipped": SKIP_NOTE})
        return
    import common  # the bench directory is on the path of spawned children too
    import numpy as np
    from gradserve import Client
    from run import d2l_batches, d2l_data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        actor: Any = ray.remote(num_cpus=1)(Holder).remote()
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
        y = torch.zeros(10, 1)
        big = torch.randn(4 * 1024 * 1024)  # 16 MiB of float32
        big_np = big.numpy()
        dx, dy = d2l_data()
        epochs = [d2l_batches(epoch) for epoch in range(3)]
        ray.get(actor.step.remote(x, y))  # the actor process is up
        with Client(address, shared_memory=True) as shm_client, \
                Client(address, shared_memory=False) as wire_client:
            layers = [{"type": "Linear", "in_features": 2, "out_features": 1}]
            m = shm_client.create_model(layers=layers, loss="mse",
                                        optimizer={"type": "sgd", "lr": 0.03}, seed=0)
            ident = shm_client.create_model(layers=[{"type": "Identity"}])
            ident_wire = wire_client.model(ident.id)
            small = common.rounds({"ray_step": lambda: ray.get(actor.step.remote(x, y)),
                                   "gradserve_step": lambda: m.backward(x, y, step=True)},
                                  calls, warmup=100)
            large = common.rounds({"ray_numpy_16mib": lambda: ray.get(actor.echo.remote(big_np)),
                                   "ray_torch_16mib": lambda: ray.get(actor.echo.remote(big)),
                                   "gradserve_shm_16mib": lambda: ident.forward(big),
                                   "gradserve_wire_16mib": lambda: ident_wire.forward(big)},
                                  big_reps * 5, n_rounds=5, warmup=3)

            def ray_per_batch() -> None:
                for epoch in epochs:
                    for idx in epoch:
                        ray.get(actor.step.remote(dx[idx], dy[idx]))

            def gradserve_per_batch() -> None:
                d = shm_client.create_model(layers=layers, loss="mse",
                                            optimizer={"type": "sgd", "lr": 0.03}, seed=0)
                t0 = time.perf_counter()
                for epoch in epochs:
                    for idx in epoch:
                        d.backward(dx[idx], dy[idx], step=True)
                loops["gradserve_per_batch"].append(time.perf_counter() - t0)
                d.delete()

            def ray_loop() -> None:
                assert ray.get(actor.train.remote(dx, dy, epochs)) == 300

            def gradserve_train() -> None:
                d = shm_client.create_model(layers=layers, loss="mse",
                                            optimizer={"type": "sgd", "lr": 0.03}, seed=0)
                t0 = time.perf_counter()
                list(d.train(dx, dy, epochs=3, batch_size=10, shuffle=True, seed=0,
                             progress=False))
                loops["gradserve_train"].append(time.perf_counter() - t0)
                d.delete()

            loops: dict[str, list[float]] = {"ray_per_batch": [], "gradserve_per_batch": [],
                                             "ray_loop": [], "gradserve_train": []}
            for _ in range(reps + 1):  # the first round warms up
                for name, fn in (("ray_per_batch", ray_per_batch), ("ray_loop", ray_loop)):
                    t0 = time.perf_counter()
                    fn()
                    loops[name].append(time.perf_counter() - t0)
                gradserve_per_batch()
                gradserve_train()
            loops = {k: v[1:] for k, v in loops.items()}
            used_shm = shm_client._shm is not None and shm_client._shm.enabled
            m.delete()
            ident.delete()
        conn.send({"samples": {**small, **large, **loops}, "shm_used": used_shm,
                   "ray": ray.__version__})
    finally:
        ray.shutdown()
