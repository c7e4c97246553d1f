"""A 1 GiB dataset uploads in chunks without the server holding needless copies."""

from __future__ import annotations

import gc

import torch
from gradserve import Client


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_one_gib_upload_holds_one_copy(client: Client) -> None:
    n = 1 << 26  # 64 Mi samples x 4 floats x 4 bytes = 1 GiB of inputs
    X = torch.ones(n, 4)
    X[-1] = 3.0
    y = torch.zeros(n, 1, dtype=torch.float16)
    gc.collect()
    before = _rss_bytes()
    info = client.upload_dataset(X, y, dataset_id="big", chunk_bytes=8 << 20)
    growth = _rss_bytes() - before
    payload = X.numel() * 4 + y.numel() * 2
    assert info.num_samples == n and info.num_bytes >= payload
    # the server keeps exactly one buffer; allow transient chunk buffers, not a second copy
    assert growth < payload * 1.25, f"RSS grew {growth / 2**20:.0f} MiB for {payload / 2**20:.0f}"
    # the data is usable: train one step on it
    m = client.create_model(layers=[{"type": "Linear", "in_features": 4, "out_features": 1}],
                            loss="mse", seed=0)
    done = list(m.train(dataset="big", max_steps=1, batch_size=1 << 20, drop_last=True))[-1]
    assert done.summary.steps == 1
    client.delete_dataset("big")
