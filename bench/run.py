"""gradserve side-by-side benchmark suite: one command, a table of ratios, a JSON file.

    python bench/run.py                    # all sections, about 3-6 minutes on 2 cores
    python bench/run.py --only tiny,payload --json out.json
    python bench/run.py --quick            # fewer calls (a smoke run, noisier)

Every goal is a ratio of two things measured in the same run, in alternating rounds where they
can be: gradserve next to a bare gRPC echo of the same bytes, next to the same loop run locally,
next to torch.distributed.rpc (TensorPipe). The server runs in a child process; the bench process
is the client. The server child sets glibc's malloc settings as gradserve-server does at start
(--tune-malloc 1) and the client sets none, as a plain SDK process; --tune-malloc changes that
(the trade-off is in docs/performance.md "Memory").
docs/performance.md explains each row and what dominates it; bench/RESULTS.md holds dated
results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# As gradserve-server does (cli.quiet_openmp), and before torch loads: spinning OpenMP threads in
# one process starve the other on a small machine (children inherit the environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import common
import numpy as np
import scale as scaling
import torch
import tp_baseline

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
SECTIONS = ("tiny", "payload", "train", "mlp", "distributed", "concurrency", "upload", "scale")


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.raw: dict[str, Any] = {}

    def row(self, measure: str, value: float, baseline: float | None, unit: str,
            goal: str = "report", against: str = "", higher_is_better: bool = False) -> None:
        ratio = None
        if baseline:
            ratio = (baseline / value) if higher_is_better else (value / baseline)
        met = None
        if goal.startswith("<="):
            met = ratio is not None and ratio <= float(goal[2:])
        elif goal.startswith(">="):
            met = ratio is not None and ratio >= float(goal[2:])
        elif goal == "faster":
            met = ratio is not None and ratio < 1.0
        self.rows.append({"measure": measure, "value": value, "baseline": baseline,
                          "against": against, "unit": unit, "ratio": ratio, "goal": goal,
                          "met": met})
        print(f"  {measure:<46} {value:>10.3f} {unit:<6} vs {against:<30} "
              f"{(baseline if baseline is not None else math.nan):>10.3f}  ratio "
              f"{(ratio if ratio is not None else math.nan):6.3f}  goal {goal}"
              f"{'' if met is None else ('  met' if met else '  NOT met')}", flush=True)


# ------------------------------------------------------------------ workloads


def d2l_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    true_w, true_b = torch.tensor([[2.0], [-3.4]]), 4.2
    x = torch.randn(1000, 2, generator=g)
    y = x @ true_w + true_b + 0.01 * torch.randn(1000, 1, generator=g)
    return x, y


def d2l_batches(epoch: int) -> list[torch.Tensor]:
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(epoch))
    return [order[s:s + 10] for s in range(0, 1000, 10)]


def d2l_local(x: torch.Tensor, y: torch.Tensor) -> None:
    """README's Train loop, run locally: Linear(2,1), SGD lr 0.03, batch 10, 3 epochs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    loss_fn = torch.nn.MSELoss()
    for epoch in range(3):
        for idx in d2l_batches(epoch):
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()


def local_step(model: torch.nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor
               ) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


# ------------------------------------------------------------------ sections


def tiny(servers: common.Servers, report: Report, calls: int) -> None:
    """Forward / fused Backward / Backward+Step of Linear(2,1) b10 next to a bare echo."""
    from gradserve import Client, _ops

    with Client(servers.address) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                                loss="mse", optimizer={"type": "sgd", "lr": 0.01}, seed=0)
        x = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
        y = np.zeros((10, 1), dtype=np.float32)
        fwd = _ops.forward(m.id, [x], False, False).request.SerializeToString()
        bwd = _ops.backward(m.id, [], x, y, step=True).request.SerializeToString()
        echo = servers.echo
        torch.manual_seed(0)
        lin = torch.nn.Sequential(torch.nn.Linear(2, 1))
        local = local_step(lin, torch.nn.MSELoss(), torch.from_numpy(x), torch.from_numpy(y))
        s = common.rounds({
            "echo_forward": lambda: echo(fwd), "forward": lambda: m.forward(x),
            "echo_backward": lambda: echo(bwd), "backward": lambda: m.backward(x, y),
            "backward_step": lambda: m.backward(x, y, step=True), "local_step": local,
        }, calls, warmup=200)
        m.delete()
    st = {k: common.stats(v) for k, v in s.items()}
    report.raw["tiny"] = {**st, "request_bytes": {"forward": len(fwd), "backward": len(bwd)}}
    report.row("tiny Forward p50", st["forward"]["p50_ms"], st["echo_forward"]["p50_ms"], "ms",
               "<=1.15", "bare echo p50")
    report.row("tiny Forward p99", st["forward"]["p99_ms"], st["echo_forward"]["p99_ms"], "ms",
               "<=1.15", "bare echo p99")
    report.row("fused Backward p50, Linear(2,1) b10", st["backward"]["p50_ms"],
               st["echo_backward"]["p50_ms"], "ms", against="bare echo p50")
    report.row("Backward+Step p50, Linear(2,1) b10", st["backward_step"]["p50_ms"],
               st["echo_backward"]["p50_ms"], "ms", against="bare echo p50")
    report.row("Backward+Step p50, Linear(2,1) b10", st["backward_step"]["p50_ms"],
               st["local_step"]["p50_ms"], "ms", against="local step p50")


def payload(servers: common.Servers, report: Report, reps: int) -> None:
    """Forward of Identity at 1, 16, 64 MiB over the wire next to a bare bytes echo."""
    from gradserve import Client, _ops

    with Client(servers.address, shared_memory=False) as client:
        m = client.create_model(layers=[{"type": "Identity"}])
        raw: dict[str, Any] = {}
        for mib, n in ((1, reps * 10), (16, reps * 2), (64, max(2, reps // 2))):
            x = torch.randn(mib * MIB // 4)
            req = _ops.forward(m.id, [x], False, False).request.SerializeToString()
            s = common.rounds({"echo": functools.partial(servers.echo, req),
                               "forward": functools.partial(m.forward, x)},
                              n * 2, n_rounds=n, warmup=2)
            fw, ec = p50(s["forward"]), p50(s["echo"])
            raw[f"{mib}MiB"] = {k: common.stats(v) for k, v in s.items()}
            report.row(f"Forward round trip {mib} MiB", fw, ec, "ms", "<=1.25",
                       "bare bytes echo p50")
            report.row(f"  throughput {mib} MiB (each way)", mib / fw * 1e3 * MIB / 1e6,
                       mib / ec * 1e3 * MIB / 1e6, "MB/s", against="bare echo MB/s",
                       higher_is_better=True)
        m.delete()
    report.raw["payload"] = raw


def train(servers: common.Servers, report: Report, reps: int) -> None:
    """The d2l workload: Train RPC and per-batch Backward(step=True) next to the local loop."""
    from gradserve import Client, _ops

    x, y = d2l_data()
    layers = [{"type": "Linear", "in_features": 2, "out_features": 1}]
    # The floor of any one-RPC-per-step loop: 300 bare echoes of a step's request bytes.
    step_bytes = _ops.backward("m", [], x[:10], y[:10], step=True).request.SerializeToString()
    with Client(servers.address) as client:

        def train_stream() -> None:
            """Caller-driven: the same loop, one batch per TrainStream message, one stream."""
            m = client.create_model(layers=layers, loss="mse",
                                    optimizer={"type": "sgd", "lr": 0.03}, seed=0)
            t0 = time.perf_counter()
            batches = ((x[idx], y[idx]) for epoch in range(3) for idx in d2l_batches(epoch))
            steps = list(m.train_stream(batches))
            times["train_stream"].append(time.perf_counter() - t0)
            assert len(steps) == 300
            m.delete()

        def train_rpc() -> None:
            m = client.create_model(layers=layers, loss="mse",
                                    optimizer={"type": "sgd", "lr": 0.03}, seed=0)
            t0 = time.perf_counter()
            events = list(m.train(x, y, epochs=3, batch_size=10, shuffle=True, seed=0,
                                  progress=False))
            times["train_rpc"].append(time.perf_counter() - t0)
            times["train_server"].append(events[-1].elapsed_seconds)
            m.delete()

        def per_batch() -> None:
            m = client.create_model(layers=layers, loss="mse",
                                    optimizer={"type": "sgd", "lr": 0.03}, seed=0)
            t0 = time.perf_counter()
            for epoch in range(3):
                for idx in d2l_batches(epoch):
                    m.backward(x[idx], y[idx], step=True)
            times["per_batch"].append(time.perf_counter() - t0)
            m.delete()

        def local() -> None:
            t0 = time.perf_counter()
            d2l_local(x, y)
            times["local"].append(time.perf_counter() - t0)

        def echo_floor() -> None:
            t0 = time.perf_counter()
            for _ in range(300):
                servers.echo(step_bytes)
            times["echo_300"].append(time.perf_counter() - t0)

        times: dict[str, list[float]] = {k: [] for k in ("train_rpc", "train_server",
                                                         "train_stream", "per_batch", "local",
                                                         "echo_300")}
        loops = (local, train_rpc, train_stream, per_batch, echo_floor)
        for fn in loops:
            fn()  # warm-up
        for samples in times.values():
            samples.clear()
        for _ in range(reps):
            for fn in loops:
                fn()
    st = {k: p50(v) for k, v in times.items()}
    report.raw["train"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
    report.row("Train RPC, d2l (1000x2, b10, 3 epochs)", st["train_rpc"], st["local"], "ms",
               "<=1.05", "local loop")
    report.row("  Train loop time on the server (done event)", st["train_server"], st["local"],
               "ms", "<=1.05", "local loop")
    report.row("train_stream, d2l (one batch per message)", st["train_stream"], st["local"],
               "ms", "report", "local loop")
    report.row("per-batch Backward(step=True), d2l", st["per_batch"], st["local"], "ms", "<=3",
               "local loop")
    report.row("  floor: 300 bare echoes of a step request", st["echo_300"], st["local"], "ms",
               against="local loop")


def mlp(servers: common.Servers, report: Report, calls: int) -> None:
    """MLP 784-256-10 b64: one remote step (fused Backward + Step) next to a local step."""
    from gradserve import Client

    layers = [{"type": "Linear", "in_features": 784, "out_features": 256}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 256, "out_features": 10}]
    x = torch.randn(64, 784)
    y = torch.randint(0, 10, (64,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    local = local_step(net, torch.nn.CrossEntropyLoss(), x, y)
    with Client(servers.address) as client:
        m = client.create_model(layers=layers, loss="cross_entropy",
                                optimizer={"type": "sgd", "lr": 0.01}, seed=0)
        s = common.rounds({"remote_step": lambda: m.backward(x, y, step=True),
                           "local_step": local}, calls, warmup=20)
        m.delete()
    report.raw["mlp"] = {k: common.stats(v) for k, v in s.items()}
    report.row("MLP 784-256-10 b64 remote step p50", p50(s["remote_step"]), p50(s["local_step"]),
               "ms", against="local step p50")


def distributed(servers: common.Servers, report: Report, calls: int, big_reps: int,
                client_tuned: bool = False) -> None:
    """TensorPipe (torch.distributed.rpc) and gradserve side by side, in the same process."""
    port = tp_baseline.free_port()
    conn, child = common.CTX.Pipe()
    owner = common.CTX.Process(target=tp_baseline.owner, args=(port,), daemon=True)
    driver = common.CTX.Process(target=tp_baseline.driver,
                                args=(port, servers.address, calls, big_reps, child,
                                      client_tuned), daemon=True)
    owner.start()
    driver.start()
    if not conn.poll(400):
        driver.kill()
        owner.kill()
        raise RuntimeError("the TensorPipe baseline did not answer within 400 s")
    result = conn.recv()
    driver.join(60)
    owner.join(60)
    s = result["samples"]
    report.raw["distributed"] = {"shm_used": result["shm_used"],
                                 **{k: common.stats(v) for k, v in s.items()}}
    report.row("remote fwd+bwd+step Linear(2,1) b10", p50(s["gradserve_step"]),
               p50(s["tensorpipe_step"]), "ms", "faster", "TensorPipe RRef+dist_autograd")
    report.row("16 MiB round trip, shared memory", p50(s["gradserve_shm_16mib"]),
               p50(s["tensorpipe_16mib"]), "ms", "faster", "TensorPipe (shm) 16 MiB")
    report.row("16 MiB round trip, wire (same run)", p50(s["gradserve_wire_16mib"]),
               p50(s["tensorpipe_16mib"]), "ms", against="TensorPipe (shm) 16 MiB")
    if not result["shm_used"]:
        print("  (the shared-memory fast path was not available: it fell back to the wire)")


def concurrency(servers: common.Servers, report: Report, seconds: float) -> None:
    """1, 4 and 8 client processes, each training its own model with Backward(step=True)."""
    rates = {n: common.concurrent_clients(servers.address, n, seconds) for n in (1, 4, 8)}
    report.raw["concurrency"] = {str(n): r for n, r in rates.items()}
    report.row("4 clients, aggregate calls/s", rates[4], rates[1], "1/s", "report", "1 client",
               higher_is_better=False)
    report.rows[-1]["ratio"] = rates[4] / rates[1]
    report.row("8 clients, aggregate calls/s", rates[8], rates[1], "1/s", "report", "1 client")
    report.rows[-1].update(ratio=rates[8] / rates[1], goal=">=1.6",
                           met=rates[8] / rates[1] >= 1.6)
    print(f"  -> 8 clients / 1 client = {rates[8] / rates[1]:.2f} (goal >= 1.6); "
          f"4 clients: {rates[4] / rates[1]:.2f}")


def upload(servers: common.Servers, report: Report, reps: int) -> None:
    """UploadDataset of 256 MiB (float32 inputs), MB/s."""
    from gradserve import Client

    x = torch.randn(256 * MIB // 4 // 256, 256)
    times = []
    with Client(servers.address) as client:
        for i in range(reps):
            t0 = time.perf_counter()
            info = client.upload_dataset(x, dataset_id=f"bench-{i}")
            times.append(time.perf_counter() - t0)
            client.delete_dataset(info.dataset_id)
    best = statistics.median(times)
    report.raw["upload"] = {"seconds": times, "bytes": x.numel() * 4}
    report.row("UploadDataset 256 MiB", 256 * MIB / best / 1e6, None, "MB/s")


def scale(report: Report, worlds: list[int], quick: bool) -> None:
    """The same MLP Train by torchrun groups of each world size (bench/scale.py)."""
    epochs, reps = (1, 2) if quick else (2, 3)
    raw: dict[str, Any] = {}
    for batch in (64, 1024):
        results = {w: scaling.measure(w, batch, epochs, reps) for w in worlds}
        raw[f"b{batch}"] = results
        one = results[worlds[0]]["samples_per_second"]
        for w in worlds:
            r = results[w]
            print(f"  world {w}: {r['backend'] or 'one process'} on {r['devices']}; step "
                  f"{r['step_seconds'] * 1e3:.2f} ms, communication "
                  f"{r['communication_seconds'] * 1e3:.2f} ms", flush=True)
            report.row(f"scale: MLP b{batch} Train samples/s, world {w}",
                       r["samples_per_second"], None if w == worlds[0] else one, "1/s",
                       against="" if w == worlds[0] else f"world {worlds[0]}",
                       higher_is_better=True)
            if w != worlds[0]:
                report.row(f"scale: MLP b{batch} speed-up, world {w}",
                           r["samples_per_second"] / one, None, "x")
                report.row(f"scale: MLP b{batch} communication share, world {w}",
                           100 * r["communication_share"], None, "%")
                link = scaling.probe(w, r["grad_bytes"], batch * 784 * 4)
                r["link"] = link
                predicted = scaling.predict(results[worlds[0]]["step_seconds"], link)
                print(f"  link, world {w} ({link['backend']}): all-reduce of the gradients "
                      f"{link['all_reduce_s'] * 1e3:.2f} ms, a batch from rank 0 "
                      f"{link['batch_broadcast_s'] * 1e3:.2f} ms, one collective "
                      f"{link['latency_s'] * 1e3:.2f} ms", flush=True)
                report.row(f"scale: MLP b{batch} step, world {w}", 1e3 * r["step_seconds"],
                           1e3 * predicted, "ms", against="capacity model (docs/scaling.md)")
    report.raw["scale"] = raw


# ------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    import google.protobuf
    import grpc

    return {"python": platform.python_version(), "torch": torch.__version__,
            "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"| {'measure':<46} | {'gradserve':>10} | {'baseline':>10} | {'ratio':>6} | "
          f"{'goal':<7} | met |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 9}|-----|")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        print(f"| {r['measure']:<46} | {r['value']:>10.3f} | {base:>10} | {ratio:>6} | "
              f"{r['goal']:<7} | {met:<3} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    parser.add_argument("--json", help="output file (default bench/results/<date>.json)")
    parser.add_argument("--tune-malloc", choices=("none", "server", "client", "both"),
                        default="server",
                        help="where the process-wide glibc malloc settings are made: the server "
                             "child (as gradserve-server --tune-malloc 1), the bench client (as "
                             "gradserve.tune_malloc()), both or none (default: server, as "
                             "gradserve-server and a plain SDK process run by default)")
    parser.add_argument("--worlds", default="1,2",
                        help="scale: torchrun group sizes to compare, the first is the baseline "
                             "(on a machine with 8 GPUs: 1,2,4,8)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.tune_malloc in ("client", "both"):
        common.tune_malloc()
    calls = 600 if args.quick else 3000
    reps = 2 if args.quick else 5
    report = Report()
    started = time.perf_counter()
    load_before = common.load_average()
    print(f"gradserve bench: sections {chosen}, 1-min load average {load_before:.2f}", flush=True)
    servers = common.Servers(tuned=args.tune_malloc in ("server", "both"))
    try:
        for name in chosen:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            if name == "tiny":
                tiny(servers, report, calls)
            elif name == "payload":
                payload(servers, report, reps)
            elif name == "train":
                train(servers, report, reps)
            elif name == "mlp":
                mlp(servers, report, calls // 3)
            elif name == "distributed":
                distributed(servers, report, calls // 2, reps,
                            args.tune_malloc in ("client", "both"))
            elif name == "concurrency":
                concurrency(servers, report, 1.5 if args.quick else 4.0)
            elif name == "upload":
                upload(servers, report, max(1, reps // 2))
            elif name == "scale":
                scale(report, [int(w) for w in args.worlds.split(",")], args.quick)
            report.raw.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    finally:
        servers.close()
    print_table(report.rows)
    out = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "load_average": {"before": load_before, "after": common.load_average()},
           "quick": args.quick, "tune_malloc": args.tune_malloc, "seconds": time.perf_counter() - started,
           "rows": report.rows, "raw": report.raw}
    path = Path(args.json) if args.json else (
        HERE / "results" / f"{dt.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{len(report.rows)} rows in {out['seconds']:.0f} s; load average "
          f"{load_before:.2f} -> {out['load_average']['after']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
