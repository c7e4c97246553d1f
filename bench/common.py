"""What the benchmark sections share: the server child process, the bare echo, timing helpers.

The gradserve server and a bare gRPC echo server run side by side in one child process, so that
a ratio compares the same machine, process and moment; clients alternate between them in rounds.
By default the server child sets what gradserve-server sets at start (--tune-malloc 1) and the
bench client sets nothing, as a plain SDK process; run.py's --tune-malloc changes that.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

ECHO_METHOD = "/bench.Echo/Echo"
MAX_MESSAGE = 512 * 1024 * 1024
CTX = mp.get_context("spawn")


def tune_malloc(arenas: int = 0) -> None:
    """The process-wide glibc settings of gradserve.tune_malloc() (arenas=0) and gradserve-server
    --tune-malloc 1 (arenas=1), written out so the bench runs against older servers too."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 512 * 1024 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    if arenas:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def _serve(conn: Any, threads: int, torch_threads: int, tuned: bool) -> None:
    from gradserve_server.app import build_server
    from gradserve_server.settings import Settings

    if tuned:
        tune_malloc(arenas=1 if hasattr(Settings, "tune_malloc") else 0)  # as the CLI does
    server, port = build_server(Settings(port=0, metrics_port=-1, threads=threads,
                                         torch_threads=torch_threads))
    server.start()
    echo = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                       options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                ("grpc.max_receive_message_length", MAX_MESSAGE)])
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": handler}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    echo.start()
    conn.send((port, echo_port))
    conn.recv()  # until the parent is done
    server.stop()
    echo.stop(0)


class Servers:
    """gradserve + bare echo in one child process."""

    def __init__(self, threads: int = 16, torch_threads: int = 0, tuned: bool = False) -> None:
        self.tuned = tuned
        self._conn, child = CTX.Pipe()
        self._proc = CTX.Process(target=_serve, args=(child, threads, torch_threads, tuned),
                                 daemon=True)
        self._proc.start()
        self.port, self.echo_port = self._conn.recv()
        self.address = f"127.0.0.1:{self.port}"
        self._echo_channel = grpc.insecure_channel(
            f"127.0.0.1:{self.echo_port}",
            [("grpc.max_send_message_length", MAX_MESSAGE),
             ("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.echo = self._echo_channel.unary_unary(ECHO_METHOD)

    def close(self) -> None:
        self._echo_channel.close()
        self._conn.send("stop")
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()


def timed(fn: Callable[[], Any], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rounds(cases: dict[str, Callable[[], Any]], calls: int, n_rounds: int = 10,
           warmup: int = 0) -> dict[str, list[float]]:
    """Time each case `calls` times per round, alternating cases within every round."""
    for fn in cases.values():
        timed(fn, warmup)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    per = max(1, calls // n_rounds)
    for _ in range(n_rounds):
        for key, fn in cases.items():
            samples[key] += timed(fn, per)
    return samples


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
            "n": len(ordered)}


def load_average() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


# ------------------------------------------------------------------ concurrent clients


def client_worker(address: str, calls_per_check: int, barrier: Any, stop_at: Any,
                  conn: Any) -> None:
    """One client process with its own model: fused Backward+Step until told to stop."""
    import numpy as np
    from gradserve import Client

    with Client(address) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                                loss="mse", optimizer={"type": "sgd", "lr": 0.01}, seed=0)
        x = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
        y = np.zeros((10, 1), dtype=np.float32)
        for _ in range(50):
            m.backward(x, y, step=True)
        barrier.wait()
        count = 0
        t0 = time.perf_counter()
        while time.perf_counter() < t0 + stop_at.value:
            for _ in range(calls_per_check):
                m.backward(x, y, step=True)
            count += calls_per_check
        conn.send((count, time.perf_counter() - t0))
        m.delete()


def concurrent_clients(address: str, n: int, seconds: float) -> float:
    """Aggregate calls per second of n client processes, each on its own model."""
    barrier = CTX.Barrier(n + 1)
    stop_at = CTX.Value("d", seconds)
    pipes, procs = [], []
    for _ in range(n):
        parent, child = CTX.Pipe()
        p = CTX.Process(target=client_worker, args=(address, 10, barrier, stop_at, child),
                        daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    barrier.wait()
    results = [conn.recv() for conn in pipes]
    for p in procs:
        p.join(30)
    return sum(count / elapsed for count, elapsed in results)
