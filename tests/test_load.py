"""Load: many callers on one model, parallel training runs, and unconsumed retained graphs.

Sized to run in well under a minute on two cores; nothing here asserts on time.
"""

from __future__ import annotations

import gc
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gradserve import Client, FailedPreconditionError
from gradserve_server.app import GradServer
from torch import nn

THREADS, BATCHES = 16, 6
MAX_GRAPHS = 32


def _rss_bytes() -> int:
    """Resident set size of this process (the server runs in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _batches(thread: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each thread's own known batches."""
    g = torch.Generator().manual_seed(1000 + thread)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g))
            for _ in range(BATCHES)]


def _run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


def test_concurrent_steps_equal_a_sequential_replay(server: GradServer) -> None:
    """16 threads Backward(step=True) on one model: every acknowledged step is counted once,
    and the parameters equal local PyTorch applying the same batches in the server's order."""
    address = f"127.0.0.1:{server.port}"
    with Client(address) as c:
        m = c.create_model(layers=[{"type": "Linear", "in_features": 3, "out_features": 1}],
                           loss="mse", optimizer={"type": "sgd", "lr": 0.05, "momentum": 0.9},
                           seed=0)
    acks: list[tuple[int, int, int]] = []  # (step the reply reports, thread, batch)
    lock = threading.Lock()

    def worker(i: int) -> None:
        with Client(address, timeout=60) as c:
            model = c.model(m.id)
            for j, (x, y) in enumerate(_batches(i)):
                step = model.backward(x, y, step=True).step
                with lock:
                    acks.append((step, i, j))

    _run_threads(THREADS, worker)
    with Client(address) as c:
        model = c.model(m.id)
        assert model.info.step == len(acks) == THREADS * BATCHES
        served = model.parameters()
    order = sorted(acks)
    assert [s for s, _, _ in order] == list(range(1, len(acks) + 1))  # each step exactly once

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = {i: _batches(i) for i in range(THREADS)}
    for _, i, j in order:
        x, y = data[i][j]
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    for name, p in net.named_parameters():
        assert torch.equal(served[name], p.detach()), name


def test_parallel_train_runs_do_not_block_each_other(make_server: Any) -> None:
    """8 Train runs on 8 models: all of them deliver progress while none has finished, which a
    lock shared between models would make impossible. Then every run is cancelled."""
    runs = 8
    server = make_server(max_train_runs=runs)
    address = f"127.0.0.1:{server.port}"
    x, y = torch.randn(64, 2), torch.randn(64, 1)
    all_started = threading.Barrier(runs + 1, timeout=120)
    release = threading.Event()
    finished = threading.Event()  # set if any run ends on its own (it must not)
    progressed = [0] * runs
    ids: list[str] = []
    with Client(address) as c:
        for i in range(runs):
            ids.append(c.create_model(layers=[{"type": "Linear", "in_features": 2,
                                               "out_features": 1}], loss="mse", seed=i).id)

    def worker(i: int) -> None:
        with Client(address) as c:
            run = c.model(ids[i]).train(x, y, epochs=1_000_000, batch_size=8, log_every_steps=1)
            for event in run:
                if event.kind == "done":
                    finished.set()
                    break
                progressed[i] += 1
                if progressed[i] == 1:
                    all_started.wait()
                    release.wait(120)
                    run.cancel()

    failures: list[BaseException] = []

    def run_all() -> None:
        try:
            _run_threads(runs, worker)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            all_started.abort()

    runner = threading.Thread(target=run_all)
    runner.start()
    try:
        all_started.wait()  # every run has sent a progress event...
        none_finished = not finished.is_set()  # ...and none has ended
        with Client(address) as c:
            training = [c.model(i).info.training for i in ids]
    finally:
        release.set()
        runner.join(180)
    assert not runner.is_alive() and not failures, failures
    assert none_finished and all(training)
    assert all(n >= 1 for n in progressed)
    with Client(address) as c:
        for model_id in ids:
            info = c.model(model_id).wait_idle()
            assert not info.training and info.step >= 1


def test_unconsumed_retained_graphs_keep_memory_bounded(make_server: Any,
                                                         record_property: Any) -> None:
    """10,000 Forward(retain_graph=True) never consumed: at most max_graphs are held, older
    ones are evicted, and the process memory stays bounded."""
    calls, warmup = 10_000, 500
    server = make_server(max_graphs=MAX_GRAPHS)
    with Client(f"127.0.0.1:{server.port}") as c:
        m = c.create_model(layers=[{"type": "Linear", "in_features": 64, "out_features": 8}],
                           seed=0)
        x = torch.randn(64, 64)  # 16 KiB per input: 160 MiB if every graph were kept
        recent: deque[str] = deque(maxlen=2 * MAX_GRAPHS)
        most = 0
        for i in range(calls):
            if i == warmup:
                gc.collect()
                before = _rss_bytes()
            recent.append(m.forward(x, retain_graph=True).forward_id)
            if i % 1000 == 0:
                most = max(most, m.refresh().retained_graphs)
        gc.collect()
        growth = _rss_bytes() - before
        held = m.refresh().retained_graphs
        # The older half of the last 2 * max_graphs forwards was evicted, the newer half is held.
        with pytest.raises(FailedPreconditionError, match="evicted"):
            m.backward(forward_id=recent[MAX_GRAPHS - 1], grad_output=torch.ones(64, 8))
        m.backward(forward_id=recent[MAX_GRAPHS], grad_output=torch.ones(64, 8))
    record_property("retained_graph_rss_growth_mib", round(growth / 2**20, 1))
    print(f"RSS growth over {calls - warmup} unconsumed retained forwards: "
          f"{growth / 2**20:.1f} MiB")
    assert held == MAX_GRAPHS and most <= MAX_GRAPHS
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
