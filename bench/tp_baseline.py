"""torch.distributed.rpc (TensorPipe) baseline, run side by side with gradserve.

Two processes on 127.0.0.1, world_size 2. Rank 1 owns a Linear(2,1); rank 0 drives a remote
forward + backward + SGD step through an RRef, dist_autograd and a DistributedOptimizer, and a
16 MiB tensor round trip (an RPC that returns its argument; TensorPipe uses shared memory on one
host). Rank 0 also holds gradserve clients and alternates with them in rounds, so both stacks
see the same machine at the same time.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed.autograd as dist_autograd
from torch.distributed import rpc
from torch.distributed.optim import DistributedOptimizer


class RemoteLinear:
    """Lives on rank 1."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def parameter_rrefs(self) -> list[Any]:
        return [rpc.RRef(p) for p in self.module.parameters()]


def echo(t: torch.Tensor) -> torch.Tensor:
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options(port: int) -> Any:
    return rpc.TensorPipeRpcBackendOptions(num_worker_threads=16,
                                           init_method=f"tcp://127.0.0.1:{port}",
                                           rpc_timeout=120)


def owner(port: int) -> None:
    """Rank 1: serves until rank 0 shuts the group down."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rpc.init_rpc("owner", rank=1, world_size=2, rpc_backend_options=_options(port))
    rpc.shutdown()


def driver(port: int, address: str, calls: int, big_reps: int, conn: Any,
           tuned: bool = False) -> None:
    """Rank 0: TensorPipe and gradserve measures in alternating rounds; results to conn."""
    import common  # the bench directory is on the path of spawned children too
    import numpy as np
    from gradserve import Client

    if tuned:
        common.tune_malloc()
    rpc.init_rpc("driver", rank=0, world_size=2, rpc_backend_options=_options(port))
    try:
        rref = rpc.remote("owner", RemoteLinear)
        opt = DistributedOptimizer(torch.optim.SGD, rref.rpc_sync().parameter_rrefs(), lr=0.03)
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
        y = torch.zeros(10, 1)

        def tp_step() -> None:
            with dist_autograd.context() as ctx:
                out = rref.rpc_sync().forward(x)
                loss = torch.nn.functional.mse_loss(out, y)
                dist_autograd.backward(ctx, [loss])
                opt.step(ctx)

        big = torch.randn(4 * 1024 * 1024)  # 16 MiB of float32

        def tp_big() -> None:
            rpc.rpc_sync("owner", echo, args=(big,))

        with Client(address, shared_memory=True) as shm_client, \
                Client(address, shared_memory=False) as wire_client:
            m = shm_client.create_model(
                layers=[{"type": "Linear", "in_features": 2, "out_features": 1}], loss="mse",
                optimizer={"type": "sgd", "lr": 0.03}, seed=0)
            ident = shm_client.create_model(layers=[{"type": "Identity"}])
            ident_wire = wire_client.model(ident.id)
            small = common.rounds({"tensorpipe_step": tp_step,
                                   "gradserve_step": lambda: m.backward(x, y, step=True)},
                                  calls, warmup=100)
            large = common.rounds({"tensorpipe_16mib": tp_big,
                                   "gradserve_shm_16mib": lambda: ident.forward(big),
                                   "gradserve_wire_16mib": lambda: ident_wire.forward(big)},
                                  big_reps * 5, n_rounds=5, warmup=3)
            used_shm = shm_client._shm is not None and shm_client._shm.enabled
            m.delete()
            ident.delete()
        conn.send({"samples": {**small, **large}, "shm_used": used_shm})
    finally:
        rpc.shutdown()
