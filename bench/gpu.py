"""GPU benchmark: a CUDA gradserve server against the same local PyTorch code on the same GPU.

    python bench/gpu.py [--quick] [--json out.json]

Each row is a ratio measured in one run: remote (SDK -> server on cuda, one process each, over
127.0.0.1) over local (the same model, data and optimizer in this process on the same device).
Needs a CUDA device; prints medians of several rounds. Results: bench/RESULTS.md "GPU".
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    per_round = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_round.append((time.perf_counter() - t0) / calls * 1000)
    return statistics.median(per_round)


def round_trip(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE).cpu()


def deep_mlp(width: int, depth: int) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for _ in range(depth):
        layers += [{"type": "Linear", "in_features": width, "out_features": width},
                   {"type": "ReLU"}]
    return layers[:-1]


def local_model(layers: list[dict[str, Any]]) -> nn.Module:
    mods = [getattr(nn, spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
            for spec in layers]
    return nn.Sequential(*mods).to(DEVICE)


def fused_step(client: Any, name: str, layers: list[dict[str, Any]], batch: int, calls: int,
               rounds: int) -> dict[str, Any]:
    """One Backward(step=True) call against the local step it stands for (copy in, forward,
    loss, backward, Adam step, read the loss), and against a local step on resident data."""
    x = torch.randn(batch, layers[0]["in_features"])
    y = torch.randn(batch, layers[-1]["out_features"])
    m = client.create_model(layers=layers, loss="mse", optimizer={"type": "adam", "lr": 1e-4},
                            seed=0)
    assert m.info.device.startswith(DEVICE), m.info.device
    net = local_model(layers)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xd, yd = x.to(DEVICE), y.to(DEVICE)

    def local_step(a: torch.Tensor, b: torch.Tensor) -> float:
        loss = nn.functional.mse_loss(net(a.to(DEVICE)), b.to(DEVICE))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    remote = median_ms(lambda: m.backward(x, y, step=True), calls, rounds)
    local = median_ms(lambda: local_step(x, y), calls, rounds)
    resident = median_ms(lambda: local_step(xd, yd), calls, rounds)
    m.delete()
    return {"measure": f"fused step {name}", "remote_ms": remote, "local_ms": local,
            "local_resident_ms": resident, "ratio": remote / local}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU (checks the script on a machine without a GPU)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device")
        return 2
    from gradserve import Client

    calls, rounds = (20, 3) if args.quick else (100, 5)
    n_train = 20_000 if DEVICE == "cuda" else 2_000
    servers = common.Servers()  # the child's device is "auto": cuda:0 here
    rows: list[dict[str, Any]] = []
    try:
        with Client(f"127.0.0.1:{servers.port}", timeout=600) as client:
            mlp: list[dict[str, Any]] = [
                {"type": "Linear", "in_features": 784, "out_features": 256},
                {"type": "ReLU"}, {"type": "Linear", "in_features": 256, "out_features": 10}]
            rows.append(fused_step(client, "MLP 784-256-10 b64", mlp, 64, calls, rounds))
            width = 4096 if DEVICE == "cuda" else 256  # --cpu: only checks the script
            rows.append(fused_step(client, f"8xLinear({width}) b1024", deep_mlp(width, 8), 1024,
                                   calls, rounds))
            ident = client.create_model(layers=[{"type": "Identity"}])
            for mib in (16, 64):
                t = torch.randn(mib * 1024 * 1024 // 4)
                remote = median_ms(functools.partial(ident.forward, t), max(3, calls // 10), rounds)
                local = median_ms(functools.partial(round_trip, t), max(3, calls // 10), rounds)
                rows.append({"measure": f"Forward {mib} MiB round trip", "remote_ms": remote,
                             "local_ms": local, "ratio": remote / local})
            X, Y = torch.randn(n_train, 784), torch.randint(0, 10, (n_train,))
            spec: list[dict[str, Any]] = [{"type": "Linear", "in_features": 784, "out_features": 256},
                    {"type": "ReLU"}, {"type": "Linear", "in_features": 256, "out_features": 10}]
            m = client.create_model(layers=spec, loss="cross_entropy",
                                    optimizer={"type": "sgd", "lr": 0.1}, seed=0)
            t0 = time.perf_counter()
            list(m.train(X, Y, epochs=1, batch_size=256, shuffle=True))
            remote = (time.perf_counter() - t0) * 1000
            net = local_model(spec)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            sync()
            t0 = time.perf_counter()
            Xd, Yd = X.to(DEVICE), Y.to(DEVICE)
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).to(DEVICE)
            for s in range(0, n_train, 256):
                idx = order[s:s + 256]
                nn.functional.cross_entropy(net(Xd[idx]), Yd[idx]).backward()
                opt.step()
                opt.zero_grad()
            sync()
            local = (time.perf_counter() - t0) * 1000
            rows.append({"measure": f"Train MLP {n_train} x 784, b256, 1 epoch (ms)",
                         "remote_ms": remote, "local_ms": local, "ratio": remote / local})
    finally:
        servers.close()
    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print("| measure | remote ms | local ms | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['remote_ms']:.3f} | {r['local_ms']:.3f} | "
              f"{r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
