"""Data parallelism on a torchrun group (gloo, CPU): the same results as one process.

Each parity test runs against groups of 2 and 3 ranks (`torchrun --standalone --nproc-per-node
N -m gradserve_server --dist-verify 1`) and compares with local PyTorch doing the same thing on
the whole batch. --dist-verify 1 makes the server hash every model's parameters, buffers,
gradients and optimizer state on every rank after every call that changes them: a call whose
replicas differ fails, so each test also checks that the ranks stay bit-identical.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TorchrunServer
from gradserve import Client
from gradserve.errors import GradServeError
from torch import nn

pytestmark = pytest.mark.timeout(300)

REL = 1e-6  # parity: max |difference| <= REL x the largest magnitude of the reference


def assert_close(got: Any, want: Any, what: str = "") -> None:
    got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got_t.shape == want_t.shape, f"{what}: shape {got_t.shape} != {want_t.shape}"
    scale = float(want_t.abs().max()) if want_t.numel() else 0.0
    err = float((got_t - want_t).abs().max()) if want_t.numel() else 0.0
    assert err <= REL * max(scale, 1e-30), f"{what}: max |diff| {err:.3g} > {REL:g} x {scale:.3g}"


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def group(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[TorchrunServer]:
    from conftest import free_port

    state = tmp_path_factory.mktemp(f"state{request.param}")
    server = TorchrunServer(request.param, "--dist-verify", "1", "--state-dir", str(state),
                            env={"GRADSERVE_METRICS_PORT": str(free_port())})
    try:
        server.serving()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def client(group: TorchrunServer) -> Iterator[Client]:
    with Client(group.address, timeout=120) as c:
        yield c


def local_copy(model: Any, module: nn.Module) -> nn.Module:
    """module with the remote model's current parameters (same initial state, any seed)."""
    with torch.no_grad():
        for name, value in model.parameters().items():
            module.get_parameter(name).copy_(torch.as_tensor(value))
    return module


def batches(n: int, bs: int, shuffle: bool, seed: int, epoch: int) -> list[Any]:
    """The trainer's batch order (core/trainer.py)."""
    starts = range(0, n, bs)
    if not shuffle:
        return [slice(s, s + bs) for s in starts]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return [order[s:s + bs] for s in starts]


def local_train(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, x: torch.Tensor,
                y: torch.Tensor, epochs: int, bs: int, shuffle: bool = False, seed: int = 0,
                accumulation: int = 1, clip: float = 0.0,
                sched: Any = None) -> list[float]:
    """README "The loop, exactly"; returns each epoch's mean loss."""
    means = []
    for epoch in range(epochs):
        order = batches(len(x), bs, shuffle, seed, epoch)
        losses, micro = [], 0
        for i, idx in enumerate(order):
            loss = loss_fn(net(x[idx]), y[idx])
            (loss / accumulation if accumulation > 1 else loss).backward()
            losses.append(loss.item())
            micro += 1
            if micro == accumulation or i == len(order) - 1:
                if clip:
                    nn.utils.clip_grad_norm_(list(net.parameters()), clip)
                opt.step()
                if sched is not None:
                    sched.step()
                opt.zero_grad()
                micro = 0
        means.append(math.fsum(losses) / len(losses))
    return means


def verified_ops(group: TorchrunServer, model_id: str, wanted: set[str]) -> set[str]:
    """The ops --dist-verify compared for model_id, waiting a little for the log to arrive."""
    deadline = time.monotonic() + 20
    while True:
        ops = {r["op"] for r in group.records("replicas identical") if r["model"] == model_id}
        if wanted <= ops or time.monotonic() > deadline:
            return ops
        time.sleep(0.1)


def assert_params(model: Any, net: nn.Module) -> None:
    remote = model.parameters()
    for name, p in net.named_parameters():
        assert_close(remote[name], p.detach().cpu(), name)


# ------------------------------------------------------------------------------ the group itself


def test_server_info_names_the_group(group: TorchrunServer, client: Client) -> None:
    info = client.server_info()
    assert info.world_size == group.nproc
    assert info.backend == "gloo"
    assert info.devices == ("cpu",) * group.nproc
    assert info.torch_version == torch.__version__
    assert len(info.hosts) == group.nproc


def test_metrics_show_the_world_size_and_communication(group: TorchrunServer,
                                                       client: Client) -> None:
    import urllib.request

    m = client.create_model(layers=[{"type": "Linear", "in_features": 3, "out_features": 1}],
                            loss="mse", optimizer="sgd", seed=1)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    m.backward(x, y, step=True)
    port = int(next(r for r in group.records("gradserve serving"))["metrics_port"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"gradserve_world_size {float(group.nproc)}" in text
    line = next(x for x in text.splitlines() if x.startswith(
        f'gradserve_step_duration_seconds_count{{model="{m.id}",phase="communication"}}'))
    assert float(line.split()[-1]) >= 2  # the Backward's and the Step's collectives
    m.delete()


@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="nccl needs a CUDA device")])])
def test_one_process_with_a_named_backend_is_a_group_of_one(torchrun_server: Any,
                                                            backend: str) -> None:
    """A machine with one GPU checks nccl: --dist-backend named, torchrun's one process forms a
    group and every call goes through the driver and its collectives."""
    device = "cuda" if backend == "nccl" else "cpu"
    server = torchrun_server(1, "--dist-backend", backend, "--device", device,
                             "--dist-verify", "1")
    server.serving()
    assert server.records("distributed group formed")[-1]["world_size"] == 1
    with Client(server.address, timeout=120) as c:
        info = c.server_info()
        assert (info.world_size, info.backend) == (1, backend)
        assert info.devices[0].startswith(device)
        m = c.create_model(layers=[{"type": "Linear", "in_features": 3, "out_features": 2}],
                           loss="mse", optimizer={"type": "sgd", "lr": 0.1}, seed=4)
        net = local_copy(m, nn.Sequential(nn.Linear(3, 2))).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(8, 3), torch.randn(8, 2)
        for _ in range(3):
            r = m.backward(x, y, step=True)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            assert r.loss == loss.item()
        assert_params(m, net)


# ------------------------------------------------------------------------------ parity: Train


def test_d2l_linear_regression_matches_one_process(client: Client) -> None:
    torch.manual_seed(7)
    true_w, true_b = torch.tensor([[2.0], [-3.4]]), 4.2
    x = torch.randn(1000, 2)
    y = x @ true_w + true_b + 0.01 * torch.randn(1000, 1)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.03}, seed=0)
    net = local_copy(m, nn.Sequential(nn.Linear(2, 1)))
    want = local_train(net, torch.optim.SGD(net.parameters(), lr=0.03), nn.MSELoss(), x, y,
                       epochs=3, bs=10, shuffle=True, seed=5)
    history = m.fit(x, y, epochs=3, batch_size=10, shuffle=True, seed=5)
    got = [e.epoch_loss for e in history.events if e.kind == "epoch_end"]
    assert_close(got, want, "epoch losses")
    assert_params(m, net)
    m.delete()


def test_mlp_cross_entropy_adam_with_an_uneven_last_batch(client: Client) -> None:
    torch.manual_seed(3)
    x, y = torch.randn(100, 20), torch.randint(0, 5, (100,))
    vx, vy = torch.randn(30, 20), torch.randint(0, 5, (30,))
    layers = [{"type": "Linear", "in_features": 20, "out_features": 32}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 32, "out_features": 5}]
    m = client.create_model(layers=layers, loss="cross_entropy",
                            optimizer={"type": "adam", "lr": 0.01}, seed=4)
    net = local_copy(m, nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)))
    # 100 = 3 x 32 + 4: the last batch splits 2/2 on two ranks, 2/1/1 on three
    want = local_train(net, torch.optim.Adam(net.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                       x, y, epochs=2, bs=32)
    history = m.fit(x, y, epochs=2, batch_size=32, validation=(vx, vy))
    ends = [e for e in history.events if e.kind == "epoch_end"]
    assert_close([e.epoch_loss for e in ends], want, "epoch losses")
    assert_params(m, net)
    with torch.no_grad():
        val = nn.CrossEntropyLoss()(net(vx), vy).item()
    assert_close(ends[-1].val_loss, val, "validation loss")
    m.delete()


def test_accumulation_clipping_and_a_schedule(client: Client) -> None:
    torch.manual_seed(5)
    x, y = torch.randn(50, 4), torch.randn(50, 2)
    layers = [{"type": "Linear", "in_features": 4, "out_features": 8}, {"type": "Tanh"},
              {"type": "Linear", "in_features": 8, "out_features": 2}]
    m = client.create_model(layers=layers, loss="mse",
                            optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9}, seed=2)
    net = local_copy(m, nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    # bs 8: the last batch of each epoch has 2 rows, fewer than three ranks
    want = local_train(net, opt, nn.MSELoss(), x, y, epochs=2, bs=8, accumulation=3, clip=0.5,
                       sched=sched)
    history = m.fit(x, y, epochs=2, batch_size=8, accumulation_steps=3, clip_grad_norm=0.5,
                    schedule={"type": "step", "step_size": 2, "gamma": 0.5})
    assert_close([e.epoch_loss for e in history.events if e.kind == "epoch_end"], want,
                 "epoch losses")
    assert_params(m, net)
    m.delete()


def test_a_dataset_trains_like_one_process(client: Client) -> None:
    """Rank 0 holds the uploaded dataset and sends each rank its shard of every batch."""
    torch.manual_seed(31)
    x, y = torch.randn(90, 6), torch.randn(90, 2)
    info = client.upload_dataset(x, y)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 6, "out_features": 2}],
                            loss="huber", optimizer={"type": "rmsprop", "lr": 0.01}, seed=3)
    net = local_copy(m, nn.Sequential(nn.Linear(6, 2)))
    want = local_train(net, torch.optim.RMSprop(net.parameters(), lr=0.01), nn.HuberLoss(), x,
                       y, epochs=2, bs=16, shuffle=True, seed=2)
    history = m.fit(dataset=info.dataset_id, epochs=2, batch_size=16, shuffle=True, seed=2)
    assert_close([e.epoch_loss for e in history.events if e.kind == "epoch_end"], want,
                 "epoch losses")
    assert_params(m, net)
    m.delete()
    client.delete_dataset(info.dataset_id)


def test_an_objective_model_is_bit_identical(client: Client) -> None:
    """No batch to split: rank 0 computes, the others receive its gradients bit for bit."""
    m = client.create_model(expression="(1 - x)**2 + 100*(y - x**2)**2",
                            parameters={"x": -1.5, "y": 2.0},
                            optimizer={"type": "sgd", "lr": 1e-4})
    m.fit(max_steps=40)
    x = torch.tensor(-1.5, requires_grad=True)
    y = torch.tensor(2.0, requires_grad=True)
    opt = torch.optim.SGD([x, y], lr=1e-4)
    for _ in range(40):
        loss = (1 - x) ** 2 + 100 * (y - x ** 2) ** 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    got = m.parameters()
    assert torch.equal(torch.as_tensor(got["x"]), x.detach())
    assert torch.equal(torch.as_tensor(got["y"]), y.detach())
    m.delete()


def test_cross_entropy_with_ignore_index_weights_shards_by_their_targets(client: Client) -> None:
    """A shard's mean counts only its targets that are not ignored: weighting shards by rows
    would give the first shard (mostly ignored here) too much weight."""
    torch.manual_seed(11)
    x = torch.randn(12, 6)
    y = torch.randint(0, 3, (12,))
    y[:5] = -1
    m = client.create_model(layers=[{"type": "Linear", "in_features": 6, "out_features": 3}],
                            loss={"type": "cross_entropy", "ignore_index": -1},
                            optimizer="sgd", seed=9)
    net = local_copy(m, nn.Sequential(nn.Linear(6, 3)))
    r = m.backward(x, y, return_grads=True)
    loss = nn.CrossEntropyLoss(ignore_index=-1)(net(x), y)
    loss.backward()
    assert_close(r.loss, loss.item(), "loss")
    for name, p in net.named_parameters():
        assert_close(r.grads[name], p.grad, name)
    m.delete()


def test_train_stream_matches_one_process(client: Client) -> None:
    torch.manual_seed(13)
    layers = [{"type": "Linear", "in_features": 3, "out_features": 4}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 4, "out_features": 1}]
    m = client.create_model(layers=layers, loss="l1",
                            optimizer={"type": "adamw", "lr": 0.05}, seed=1)
    net = local_copy(m, nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    data = [(torch.randn(k, 3), torch.randn(k, 1)) for k in (9, 5, 1, 2, 7)]
    steps = list(m.train_stream(data, clip_grad_norm=1.0))
    for step, (x, y) in zip(steps, data):
        loss = nn.L1Loss()(net(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        assert_close(step.loss, loss.item(), "stream loss")
    assert_params(m, net)
    m.delete()


# ------------------------------------------------------------------------------ parity: calls


def test_retained_forward_and_backward_with_grad_output(client: Client) -> None:
    torch.manual_seed(17)
    layers = [{"type": "Linear", "in_features": 5, "out_features": 3}, {"type": "Sigmoid"}]
    m = client.create_model(layers=layers, loss="mse", optimizer="sgd", seed=6)
    net = local_copy(m, nn.Sequential(nn.Linear(5, 3), nn.Sigmoid()))
    x, g = torch.randn(7, 5), torch.randn(7, 3)
    fwd = m.forward(x, retain_graph=True)
    r = m.backward(forward_id=fwd.forward_id, grad_output=g, return_grads=True,
                   return_input_grads=True)
    xl = x.clone().requires_grad_(True)
    out = net(xl)
    out.backward(g)
    assert_close(fwd.output, out.detach(), "output")
    assert_close(r.input_grads[0], xl.grad, "input grad")  # gathered in batch order
    for name, p in net.named_parameters():
        assert_close(r.grads[name], p.grad, name)
    m.delete()


def test_fused_backward_with_a_batch_smaller_than_the_world(client: Client) -> None:
    """Two rows: one rank per row, the others empty; grads accumulate over two calls."""
    torch.manual_seed(19)
    layers = [{"type": "Linear", "in_features": 4, "out_features": 2}]
    m = client.create_model(layers=layers, loss={"type": "mse", "reduction": "sum"},
                            optimizer={"type": "sgd", "lr": 0.05}, seed=8)
    net = local_copy(m, nn.Sequential(nn.Linear(4, 2)))
    x1, y1, x2, y2 = torch.randn(2, 4), torch.randn(2, 2), torch.randn(5, 4), torch.randn(5, 2)
    m.backward(x1, y1)
    r = m.backward(x2, y2, return_grads=True, return_input_grads=True, return_output=True)
    loss_fn = nn.MSELoss(reduction="sum")
    loss_fn(net(x1), y1).backward()
    x2l = x2.clone().requires_grad_(True)
    out = net(x2l)
    loss = loss_fn(out, y2)
    loss.backward()
    assert_close(r.loss, loss.item(), "loss")
    assert_close(r.output, out.detach(), "output")
    assert_close(r.input_grads[0], x2l.grad, "input grad")
    for name, p in net.named_parameters():
        assert_close(r.grads[name], p.grad, name)
    assert m.step() == 1
    net_opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net_opt.step()
    assert_params(m, net)
    m.delete()


def test_forward_set_parameters_and_checkpoints_keep_the_replicas_identical(
        client: Client, group: TorchrunServer) -> None:
    torch.manual_seed(23)
    layers = [{"type": "Linear", "in_features": 3, "out_features": 3},
              {"type": "BatchNorm1d", "num_features": 3}, {"type": "Dropout", "p": 0.5}]
    m = client.create_model(layers=layers, loss="mse", optimizer={"type": "adam", "lr": 0.01},
                            seed=3)
    x = torch.randn(12, 3)  # no rank ever gets a one-row shard (BatchNorm would refuse it)
    m.set_parameters({"0.weight": torch.eye(3)})
    m.forward(x)                    # training mode: BatchNorm statistics, dropout draws
    m.forward(x, eval_mode=True)
    m.backward(x, torch.randn(12, 3), step=True)
    m.zero_grad()
    fwd = m.forward(x, retain_graph=True)
    m.backward(forward_id=fwd.forward_id, target=torch.randn(12, 3))
    m.step()
    list(m.train_stream([(x, torch.randn(12, 3))]))
    m.fit(x, torch.randn(12, 3), epochs=1, batch_size=6)
    wanted = {"publish", "assign", "forward", "fused", "zero_grad", "backward", "step"}
    assert wanted <= verified_ops(group, m.id, wanted)
    # a checkpoint written by rank 0 loads into a new model that every rank builds
    m.save_checkpoint(name=f"{m.id}-snap")
    copy = client.load_checkpoint(f"{m.id}-snap", model_id=f"{m.id}-copy")
    assert "publish" in verified_ops(group, copy.id, {"publish"})
    for name, value in m.parameters(buffers=True).items():
        assert torch.equal(torch.as_tensor(copy.parameters(buffers=True)[name]),
                           torch.as_tensor(value)), name
    copy.backward(x, torch.randn(12, 3), step=True)  # the copy trains on every rank
    assert not group.records("distributed group broken")
    copy.delete()
    client.delete_checkpoint(f"{m.id}-snap")
    m.delete()


def test_batchnorm_normalises_each_shard_by_its_own_statistics(group: TorchrunServer,
                                                              client: Client) -> None:
    """Per-shard statistics (DistributedDataParallel without SyncBatchNorm): each rank's batch
    statistics are its shard's; the running statistics are rank 0's shard's."""
    torch.manual_seed(29)
    layers = [{"type": "Linear", "in_features": 4, "out_features": 3},
              {"type": "BatchNorm1d", "num_features": 3}]
    m = client.create_model(layers=layers, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=5)
    net = local_copy(m, nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    x, y = torch.randn(12, 4), torch.randn(12, 3)
    m.backward(x, y, step=True)
    world = group.nproc
    shards = np.array_split(np.arange(12), world)
    running = None
    for rank, rows in enumerate(shards):
        before = {k: v.clone() for k, v in net[1].state_dict().items()}
        out = net(x[rows])
        (nn.MSELoss()(out, y[rows]) * (len(rows) / 12)).backward()
        if rank == 0:
            running = {k: v.clone() for k, v in net[1].state_dict().items()}
        net[1].load_state_dict(before)
    assert running is not None
    net[1].load_state_dict(running)
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert_params(m, net)
    buffers = m.parameters(buffers=True)
    assert_close(buffers["1.running_mean"], running["running_mean"], "running_mean")
    assert_close(buffers["1.running_var"], running["running_var"], "running_var")
    m.delete()


def test_an_error_on_one_rank_fails_the_call_everywhere_and_the_group_goes_on(
        group: TorchrunServer, client: Client) -> None:
    """BatchNorm refuses a one-row shard in training mode: the rank that holds it says so, the
    call fails on every rank (no rank is left waiting) and the next call works."""
    layers = [{"type": "Linear", "in_features": 2, "out_features": 2},
              {"type": "BatchNorm1d", "num_features": 2}]
    m = client.create_model(layers=layers, loss="mse", optimizer="sgd", seed=1)
    n = 2 * group.nproc - 1  # the last rank gets one row
    with pytest.raises(GradServeError) as err:
        m.backward(torch.randn(n, 2), torch.randn(n, 2))
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert f"rank {group.nproc - 1} of {group.nproc}" in str(err.value)
    assert "Expected more than 1 value per channel" in str(err.value)
    r = m.backward(torch.randn(2 * group.nproc, 2), torch.randn(2 * group.nproc, 2))
    assert math.isfinite(r.loss)
    m.delete()


# ------------------------------------------------------------------------------ failures


def test_a_rank_that_cannot_start_fails_the_launch_with_one_line(torchrun_server: Any) -> None:
    server = torchrun_server(2, "--device", "cuda")
    assert server.wait(120) != 0
    text = "".join(server.lines)
    assert "gradserve-server: rank 0 (LOCAL_RANK 0): --device cuda, but CUDA is not available" \
        in text
    assert "gradserve serving" not in text


@pytest.mark.timeout(420)
def test_a_killed_worker_aborts_the_run_naming_it_and_the_group_comes_back(
        torchrun_server: Any, tmp_path: Any) -> None:
    import os
    import signal

    server = torchrun_server(2, "--state-dir", str(tmp_path), "--grace-seconds", "10",
                             max_restarts=1)
    server.serving()
    client = Client(server.address, timeout=60)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 8, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.01}, seed=1,
                            model_id="survivor")
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    m.fit(x, y, epochs=1, batch_size=16)  # 4 steps, then a run that lasts
    errors: list[BaseException] = []
    progressed = threading.Event()

    def run() -> None:
        try:
            for event in m.train(x, y, epochs=100000, batch_size=16, log_every_steps=5):
                if event.kind == "progress":
                    progressed.set()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)
        progressed.set()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert progressed.wait(60)
    killed = time.monotonic()
    os.kill(server.rank_pids()[1], signal.SIGKILL)
    runner.join(60)
    ended = time.monotonic() - killed
    assert not runner.is_alive() and errors, "the run did not end"
    err = errors[0]
    assert isinstance(err, GradServeError) and err.code.name in ("ABORTED", "UNAVAILABLE"), err
    assert "rank 1" in str(err), err
    assert ended <= 30, f"the run ended {ended:.1f} s after the kill"
    # Health turned NOT_SERVING before the call failed; the next SERVING is the new group's.
    statuses = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = client.health(timeout=2)
        except GradServeError as exc:
            status = exc.code.name
        if status == "SERVING":
            break
        statuses.append(status)
        time.sleep(0.2)
    assert statuses and set(statuses) <= {"NOT_SERVING", "UNAVAILABLE",
                                          "DEADLINE_EXCEEDED"}, statuses
    server.serving(2, timeout=60)  # torchrun restarted the group
    back = client.model("survivor")  # restored from --state-dir
    assert back.info.step >= 4
    r = back.backward(x, y, step=True)  # the same client: it reconnected
    assert math.isfinite(r.loss)
    formed = server.records("distributed group formed")
    assert len(formed) == 2 and formed[-1]["restart"] == 1
    client.close()


def test_sigterm_to_the_agent_drains_checkpoints_once_and_every_rank_exits_0(
        torchrun_server: Any, tmp_path: Any) -> None:
    """torchrun forwards SIGTERM to every rank; a Train in progress ends at a step boundary."""
    import signal

    server = torchrun_server(2, "--state-dir", str(tmp_path))
    server.serving()
    client = Client(server.address, timeout=60)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer="sgd", seed=1, model_id="kept")
    events: list[Any] = []
    progressed = threading.Event()

    def run() -> None:
        for event in m.train(torch.randn(40, 2), torch.randn(40, 1), epochs=100000,
                             batch_size=8, log_every_steps=5):
            events.append(event)
            progressed.set()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert progressed.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    server.wait(90)
    runner.join(30)
    assert events[-1].kind == "done" and events[-1].summary.stop_reason == "shutdown"
    client.close()
    text = "".join(server.lines)
    assert "checkpointed 1 model(s)" in text and text.count("checkpointed ") == 1
    stopped = server.records("rank stopped")
    assert [r["exit_code"] for r in stopped] == [0]
    assert server.records("stopped")  # rank 0's last line
    assert "exitcode" not in text, text[-3000:]  # torchrun reports every rank that failed
    assert (tmp_path / "kept.safetensors").exists()


def test_sigterm_to_rank_0_stops_the_group_and_torchrun_exits_0(torchrun_server: Any) -> None:
    import os
    import signal

    server = torchrun_server(3)
    server.serving()
    os.kill(server.rank_pids()[0], signal.SIGTERM)
    assert server.wait(90) == 0
    assert sorted(r["rank"] for r in server.records("rank stopped")) == [1, 2]
