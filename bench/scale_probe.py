"""The link a torchrun group of this machine has, for the capacity model of docs/scaling.md.

    torchrun --standalone --nproc-per-node 2 bench/scale_probe.py GRAD_BYTES BATCH_BYTES

Rank 0 prints one JSON line: the median seconds of an all-reduce of GRAD_BYTES (the gradients),
of a broadcast of BATCH_BYTES (rank 0 sending a batch), and of a one-number broadcast (the
latency of one collective), with the backend gradserve would use (nccl on CUDA, else gloo).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def timed(fn, reps: int) -> float:
    fn()
    dist.barrier()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    grad_bytes, batch_bytes = int(sys.argv[1]), int(sys.argv[2])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=60))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    grads = torch.zeros(grad_bytes // 4, device=device)
    batch = torch.zeros(batch_bytes, dtype=torch.uint8)
    one = torch.zeros(1, device=device)
    cpu = dist.new_group(backend="gloo") if cuda else None
    result = {
        "world": dist.get_world_size(), "backend": dist.get_backend(),
        "all_reduce_s": timed(lambda: dist.all_reduce(grads), 20),
        "batch_broadcast_s": timed(lambda: dist.broadcast(batch, 0, group=cpu), 20),
        "latency_s": timed(lambda: dist.broadcast(one, 0), 50),
        "grad_bytes": grad_bytes, "batch_bytes": batch_bytes,
    }
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
