"""Forward and fused Backward of Linear(2,1) next to a bare gRPC echo of the same bytes.

    python bench/latency.py [--calls 2000] [--json out.json]

The gradserve server and a bare echo server run side by side in one child process; the client
alternates between them in rounds, so both see the same machine noise. Prints p50/p99 and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

ECHO_METHOD = "/bench.Echo/Echo"


def _serve(conn: Any, torch_threads: int) -> None:
    from gradserve_server.app import build_server
    from gradserve_server.settings import Settings

    server, port = build_server(Settings(port=0, metrics_port=-1, threads=4,
                                         torch_threads=torch_threads))
    server.start()
    echo = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": handler}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    echo.start()
    conn.send((port, echo_port))
    conn.recv()  # wait until the parent is done
    server.stop()
    echo.stop(0)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3}


def timed(fn: Callable[[], Any], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(calls: int, torch_threads: int = 0) -> dict[str, Any]:
    from gradserve import Client, _ops

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_serve, args=(child, torch_threads),
                                          daemon=True)
    proc.start()
    port, echo_port = parent.recv()
    try:
        client = Client(f"127.0.0.1:{port}")
        m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                                loss="mse", optimizer={"type": "sgd", "lr": 0.01}, seed=0)
        X = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
        y = np.zeros((10, 1), dtype=np.float32)
        fwd_bytes = _ops.forward(m.id, [X], False, False).request.SerializeToString()
        bwd_bytes = _ops.backward(m.id, [], X, y).request.SerializeToString()
        channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = channel.unary_unary(ECHO_METHOD)
        rounds = 10
        per = max(1, calls // rounds)
        samples: dict[str, list[float]] = {k: [] for k in
                                           ("echo_forward", "forward", "echo_backward",
                                            "backward", "backward_step")}
        for fn in (lambda: m.forward(X), lambda: echo(fwd_bytes)):  # warm-up
            timed(fn, 200)
        for _ in range(rounds):
            samples["echo_forward"] += timed(lambda: echo(fwd_bytes), per)
            samples["forward"] += timed(lambda: m.forward(X), per)
            samples["echo_backward"] += timed(lambda: echo(bwd_bytes), per)
            samples["backward"] += timed(lambda: m.backward(X, y), per)
            samples["backward_step"] += timed(lambda: m.backward(X, y, step=True), per)
        m.delete()
        client.close()
        channel.close()
    finally:
        parent.send("stop")
        proc.join(10)
    result = {k: percentiles(v) for k, v in samples.items()}
    result["ratios"] = {
        "forward_vs_echo_p50": result["forward"]["p50_ms"] / result["echo_forward"]["p50_ms"],
        "forward_vs_echo_p99": result["forward"]["p99_ms"] / result["echo_forward"]["p99_ms"],
        "backward_vs_echo_p50": result["backward"]["p50_ms"] / result["echo_backward"]["p50_ms"],
    }
    result["request_bytes"] = {"forward": len(fwd_bytes), "backward": len(bwd_bytes)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measure")
    parser.add_argument("--torch-threads", type=int, default=0, help="server torch threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = run(args.calls, args.torch_threads)
    print(f"{'measure':<28}{'p50 ms':>10}{'p99 ms':>10}")
    for key in ("echo_forward", "forward", "echo_backward", "backward", "backward_step"):
        print(f"{key:<28}{result[key]['p50_ms']:>10.3f}{result[key]['p99_ms']:>10.3f}")
    for key, value in result["ratios"].items():
        print(f"{key:<28}{value:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
