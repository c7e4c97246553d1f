"""Soak: 4 clients train while another opens and abandons streams and uploads (not in CI).

    python bench/soak.py                  # 5 minutes
    python bench/soak.py --seconds 60     # a short run

The server runs as `python -m gradserve_server` in a child process, as deployed (no malloc
tuning). Every --interval seconds one line: the server's RSS, open file descriptors and
threads, the trainers' steps and step-latency p50/p99 over the interval, and what the abuser
did. At the end a summary: RSS, fds and threads should stay flat and p99 stable.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CTX = mp.get_context("spawn")
MIB = 1024 * 1024
SERVICE = "/gradserve.v1.GradientService/"


def start_server(idle_seconds: float) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "GRADSERVE_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradserve_server", "--port", "0", "--metrics-port", "-1",
         "--stream-idle-seconds", str(idle_seconds)],
        env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r'"grpc": "[^"]*:(\d+)"', line)
        if found:
            # keep reading its log, or the server blocks once the pipe is full
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc, int(found.group(1))
    raise RuntimeError("the server did not start")


SERVER_LOG: list[str] = []


def _drain(stream: Any) -> None:
    for line in stream:
        if '"level": "error"' in line or '"level": "warning"' in line:
            SERVER_LOG.append(line.strip())


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) // 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ------------------------------------------------------------------------------------ workers


def trainer(address: str, index: int, stop: Any, out: Any) -> None:
    """Trains its own model in turns: train_stream, Train, fused Backward steps."""
    import torch
    from gradserve import Client

    torch.manual_seed(index)
    x, y = torch.randn(1000, 16), torch.randn(1000, 1)
    with Client(address, timeout=60) as client:
        m = client.create_model(
            layers=[{"type": "Linear", "in_features": 16, "out_features": 32},
                    {"type": "ReLU"}, {"type": "Linear", "in_features": 32, "out_features": 1}],
            loss="mse", optimizer={"type": "sgd", "lr": 0.01}, seed=index)
        turn = 0
        while not stop.is_set():
            kind = ("stream", "train", "backward")[turn % 3]
            t0 = time.perf_counter()
            try:
                if kind == "stream":
                    for _ in m.train_stream((x[i:i + 20], y[i:i + 20])
                                            for i in range(0, 400, 20)):
                        pass
                    steps = 20
                elif kind == "train":
                    list(m.train(x, y, epochs=1, batch_size=50, progress=False))
                    steps = 20
                else:
                    for i in range(0, 400, 20):
                        m.backward(x[i:i + 20], y[i:i + 20], step=True)
                    steps = 20
            except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
                out.put(("error", index, f"{kind}: {type(exc).__name__}: {exc}"[:200]))
                continue
            finally:
                turn += 1
            out.put(("steps", index, steps, (time.perf_counter() - t0) / steps))


def abuser(address: str, stop: Any, out: Any) -> None:
    """Opens streams and uploads and abandons them, over and over."""
    import threading

    import grpc
    from gradserve import Client
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with Client(address) as client:  # a model of its own, for streams that never train
        model_id = client.create_model(
            layers=[{"type": "Linear", "in_features": 2, "out_features": 1}], loss="mse",
            optimizer={"type": "sgd", "lr": 0.01}).id

    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
        inputs=[pb.TensorHeader(dtype=pb.DTYPE_UINT8, shape=[64 * MIB])])).SerializeToString()
    chunk = pb.UploadDatasetRequest(chunk=bytes(4 * MIB)).SerializeToString()
    config = pb.TrainStreamRequest(config=pb.TrainStreamConfig(
        model_id=model_id)).SerializeToString()
    release = threading.Event()

    def silent(first: list[bytes]) -> Any:
        yield from first
        release.wait(3600)

    rounds = 0
    while not stop.is_set():
        with grpc.insecure_channel(address, options=[("soak.round", rounds)]) as channel:
            calls = [
                channel.stream_unary(SERVICE + "UploadDataset").future(
                    silent([header, chunk, chunk])),
                channel.stream_stream(SERVICE + "TrainStream")(silent([config])),
                channel.stream_stream(SERVICE + "Train")(silent([])),
                health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()),
                channel.stream_unary(SERVICE + "UploadDataset").future(
                    silent([header] + [chunk] * 8)),
            ]
            time.sleep(1.0)
            for call in calls:
                call.cancel()  # abandon: some cancelled, the rest dropped with the channel
        rounds += 1
        out.put(("abuse", rounds, len(calls)))
    release.set()


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="the server's --stream-idle-seconds (abandoned streams end)")
    args = parser.parse_args(argv)

    server, port = start_server(args.idle_seconds)
    address = f"127.0.0.1:{port}"
    stop = CTX.Event()
    out: Any = CTX.Queue()
    workers = [CTX.Process(target=trainer, args=(address, i, stop, out), daemon=True)
               for i in range(args.clients)]
    workers.append(CTX.Process(target=abuser, args=(address, stop, out), daemon=True))
    for w in workers:
        w.start()
    print(f"soak: server pid {server.pid} on {address}; {args.clients} trainers + 1 abuser; "
          f"{args.seconds:g} s", flush=True)
    print(f"{'t_s':>6} {'rss_mb':>7} {'fds':>5} {'threads':>7} {'steps':>7} "
          f"{'p50_ms':>7} {'p99_ms':>7} {'abuse':>6} {'errors':>6}", flush=True)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.monotonic()
    abuse = 0
    try:
        while time.monotonic() - started < args.seconds:
            deadline = min(time.monotonic() + args.interval, started + args.seconds)
            step_times: list[float] = []
            steps = new_errors = 0
            while time.monotonic() < deadline:
                try:
                    item = out.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    continue
                if item[0] == "steps":
                    steps += item[2]
                    step_times.extend([item[3]] * item[2])
                elif item[0] == "abuse":
                    abuse = item[1]
                else:
                    errors.append(item[2])
                    new_errors += 1
            if server.poll() is not None:
                print(f"the server exited with {server.returncode}", flush=True)
                return 1
            stats = proc_stats(server.pid)
            ordered = sorted(step_times)
            row = {"t_s": round(time.monotonic() - started), **stats, "steps": steps,
                   "p50_ms": statistics.median(ordered) * 1e3 if ordered else float("nan"),
                   "p99_ms": (ordered[int(len(ordered) * 0.99)] * 1e3 if ordered
                              else float("nan")),
                   "abuse": abuse, "errors": new_errors}
            rows.append(row)
            print(f"{row['t_s']:>6} {row['rss_mb']:>7} {row['fds']:>5} {row['threads']:>7} "
                  f"{row['steps']:>7} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                  f"{row['abuse']:>6} {row['errors']:>6}", flush=True)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
        server.terminate()
        server.wait(60)
    if errors:
        print(f"\n{len(errors)} client errors; first: {errors[:3]}")
    noisy = [line for line in SERVER_LOG if "--state-dir" not in line]
    print(f"server warnings and errors logged: {len(noisy)}" + (f"; first: {noisy[:2]}"
                                                                  if noisy else ""))
    settled = rows[1:] or rows  # the first interval includes start-up
    for key in ("rss_mb", "fds", "threads", "p99_ms"):
        values = [r[key] for r in settled]
        print(f"{key:>8}: first {values[0]:.1f}  last {values[-1]:.1f}  "
              f"min {min(values):.1f}  max {max(values):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
