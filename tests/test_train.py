"""Train: parity with a local loop, options, datasets, cancellation, streaming."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gradserve import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from torch import nn

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def synthetic(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """d2l's synthetic linear regression data: y = Xw + b + noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    y = X @ torch.tensor([[2.0], [-3.4]]) + 4.2 + 0.01 * torch.randn(n, 1, generator=g)
    return X, y


def local_loop(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor],
               X: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, seed: int,
               max_steps: int | None = None) -> list[float]:
    """The documented local equivalent of Train(shuffle=True, seed=seed)."""
    losses: list[float] = []
    n = len(X)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n, batch_size):
            if max_steps is not None and len(losses) == max_steps:
                return losses
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss = loss_fn(net(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_d2l_linear_regression_parity(client: Client) -> None:
    X, y = synthetic()
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.03},
                            seed=0)
    events = list(m.train(X, y, epochs=3, batch_size=10, shuffle=True, seed=42,
                          log_every_steps=1))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.03)
    losses = local_loop(net, opt, nn.functional.mse_loss, X, y, epochs=3, batch_size=10, seed=42)
    progress = [e for e in events if e.kind == "progress"]
    assert [e.batch_loss for e in progress] == losses
    assert [e.step for e in progress] == list(range(1, 301))
    done = events[-1]
    assert done.kind == "done" and done.summary.stop_reason == "completed"
    assert done.summary.steps == 300 and done.summary.epochs == 3
    assert done.summary.final_loss == pytest.approx(sum(losses[200:]) / 100, rel=1e-12)
    params = m.parameters()
    for name, p in net.named_parameters():
        assert torch.equal(params[name], p.detach()), name
    ends = [e for e in events if e.kind == "epoch_end"]
    assert [e.epoch for e in ends] == [0, 1, 2]
    assert all(e.samples_per_second > 0 and e.learning_rate == 0.03 for e in ends)
    assert ends[-1].grad_norm >= 0


def test_mlp_classifier_cross_entropy_parity(client: Client) -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 4, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    layers = [{"type": "Linear", "in_features": 4, "out_features": 16}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 16, "out_features": 3}]
    m = client.create_model(layers=layers, loss="cross_entropy",
                            optimizer={"type": "adam", "lr": 0.01}, seed=3)
    events = list(m.train(X, y, epochs=2, batch_size=32, shuffle=True, seed=7,
                          log_every_steps=1))
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = local_loop(net, opt, nn.functional.cross_entropy, X, y, epochs=2, batch_size=32,
                        seed=7)
    assert [e.batch_loss for e in events if e.kind == "progress"] == losses
    params = m.parameters()
    assert all(torch.equal(params[k], p.detach()) for k, p in net.named_parameters())


def test_options_accumulation_clip_schedule_validation(client: Client) -> None:
    X, y = synthetic(96)
    Xv, yv = synthetic(40, seed=9)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    events = list(m.train(X, y, epochs=2, batch_size=16, accumulation_steps=2,
                          clip_grad_norm=1.0, drop_last=True, validation=(Xv, yv),
                          schedule={"type": "step", "step_size": 2, "gamma": 0.5,
                                    "warmup_steps": 2}, log_every_steps=1))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, step], milestones=[2])
    lrs, vals = [], []
    for _epoch in range(2):
        for i, s in enumerate(range(0, 96, 16)):
            loss = nn.functional.mse_loss(net(X[s:s + 16]), y[s:s + 16])
            (loss / 2).backward()
            if (i + 1) % 2 == 0:
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                opt.zero_grad()
        with torch.no_grad():
            vals.append(nn.functional.mse_loss(net(Xv), yv).item())
    progress = [e for e in events if e.kind == "progress"]
    assert [e.learning_rate for e in progress] == pytest.approx(lrs, rel=1e-12)
    assert [e.val_loss for e in events if e.kind == "epoch_end"] == pytest.approx(vals, rel=1e-6)
    params = m.parameters()
    assert all(torch.equal(params[k], p.detach()) for k, p in net.named_parameters())


def test_stop_loss_and_max_steps(client: Client) -> None:
    X, y = synthetic(200)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    done = list(m.train(X, y, epochs=50, batch_size=10, stop_loss=0.01))[-1]
    assert done.summary.stop_reason == "stop_loss" and done.summary.epochs < 50
    assert done.summary.final_loss < 0.01
    done = list(m.train(X, y, max_steps=7, batch_size=10))[-1]
    assert done.summary.stop_reason == "max_steps" and done.summary.steps == 7


def test_objective_train_max_steps(client: Client) -> None:
    e = client.create_model(expression="(1 - x)**2 + 100*(y - x**2)**2",
                            parameters={"x": 0.0, "y": 0.0}, optimizer={"type": "sgd", "lr": 0.001})
    done = list(e.train(max_steps=200))[-1]
    x = torch.tensor(0.0, requires_grad=True)
    yy = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([x, yy], lr=0.001)
    for _ in range(200):
        opt.zero_grad()
        ((1 - x) ** 2 + 100 * (yy - x**2) ** 2).backward()
        opt.step()
    assert done.summary.steps == 200
    p = e.parameters()
    assert torch.equal(p["x"], x.detach()) and torch.equal(p["y"], yy.detach())
    with pytest.raises(InvalidArgumentError, match="max_steps"):
        list(e.train())


def test_objective_stops_at_its_first_value_below_stop_loss(client: Client) -> None:
    """The local equivalent is `while f() >= stop_loss: step`; final_loss is the last f."""
    e = client.create_model(expression="(x - 3)**2", parameters={"x": 0.0},
                            optimizer={"type": "sgd", "lr": 0.1})
    done = list(e.train(max_steps=1000, stop_loss=0.01))[-1]
    x = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    values = []
    while True:
        f = (x - 3) ** 2
        values.append(f.item())
        if f.item() < 0.01:
            break
        f.backward()
        opt.step()
        opt.zero_grad()
    assert done.summary.stop_reason == "stop_loss"
    assert done.summary.steps == len(values) - 1 < 1000
    assert done.summary.final_loss == values[-1]
    assert torch.equal(e.parameters()["x"], x.detach())


def test_objective_final_loss_is_its_last_value_and_max_steps_counts_steps(
        client: Client) -> None:
    e = client.create_model(expression="(x - 3)**2", parameters={"x": 0.0},
                            optimizer={"type": "sgd", "lr": 0.1})
    done = list(e.train(max_steps=4, accumulation_steps=3))[-1]
    x = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    for _ in range(4):
        for _ in range(3):
            f = (x - 3) ** 2
            (f / 3).backward()
        opt.step()
        opt.zero_grad()
    assert done.summary.steps == 4 and done.summary.stop_reason == "max_steps"
    assert done.summary.final_loss == f.item()
    assert torch.equal(e.parameters()["x"], x.detach())


@pytest.mark.parametrize("weighted", [False, True])
def test_validation_loss_with_ignore_index_is_the_whole_sets_loss(client: Client,
                                                                  weighted: bool) -> None:
    g = torch.Generator().manual_seed(4)
    X, Xv = torch.randn(20, 3, generator=g), torch.randn(23, 3, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    yv = torch.randint(0, 4, (23,), generator=g)
    yv[torch.tensor([0, 1, 2, 5, 6, 11])] = -1  # ignored targets, unevenly spread over batches
    weight = [0.5, 1.0, 2.0, 3.0]
    loss: dict[str, Any] = {"type": "cross_entropy", "ignore_index": -1}
    if weighted:
        loss["weight"] = weight
    layers = [{"type": "Linear", "in_features": 3, "out_features": 4}]
    m = client.create_model(layers=layers, loss=loss, optimizer={"type": "sgd", "lr": 0.0},
                            seed=2)
    torch.manual_seed(2)
    net = nn.Linear(3, 4)
    with torch.no_grad():
        whole = nn.functional.cross_entropy(
            net(Xv), yv, ignore_index=-1,
            weight=torch.tensor(weight) if weighted else None).item()
    for batch_size in (3, 7, 0):
        event = next(e for e in m.train(X, y, epochs=1, batch_size=batch_size,
                                    validation=(Xv, yv)) if e.kind == "epoch_end")
        assert event.val_loss == pytest.approx(whole, rel=1e-6, abs=0), batch_size


def test_cosine_t_max_defaults_to_the_steps_after_warmup(client: Client) -> None:
    X, y = synthetic(60)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    events = list(m.train(X, y, epochs=2, batch_size=6, log_every_steps=1,
                          schedule={"type": "cosine", "eta_min": 0.01, "warmup_steps": 3}))
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20 - 3, eta_min=0.01)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[3])
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [e.learning_rate for e in events if e.kind == "progress"] == lrs
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # eta_min after the last step
    assert m.optimizer_state().param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_train_stream_cosine_needs_t_max(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    X, y = synthetic(10)
    with pytest.raises(InvalidArgumentError, match="t_max"):
        list(m.train_stream([(X, y)], schedule="cosine"))
    results = list(m.train_stream([(X, y)], schedule={"type": "cosine", "t_max": 4}))
    assert len(results) == 1


def test_skipped_last_batch_still_applies_the_pending_accumulation(client: Client) -> None:
    X, y = synthetic(50)
    y[45] = float("nan")  # in the epoch's last batch (5 batches of 10)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    done = list(m.train(X, y, epochs=2, batch_size=10, accumulation_steps=3,
                        skip_nonfinite=True))[-1]
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _epoch in range(2):
        pending = 0
        for i, s in enumerate(range(0, 50, 10)):
            loss = nn.functional.mse_loss(net(X[s:s + 10]), y[s:s + 10])
            if loss.isfinite():
                (loss / 3).backward()
                pending += 1
            if pending and (pending == 3 or i == 4):
                opt.step()
                opt.zero_grad()
                pending = 0
    assert done.summary.skipped_batches == 2 and done.summary.steps == 4
    assert m.grads() == {}  # nothing left for the next Step() to apply
    params = m.parameters()
    assert torch.equal(params["0.weight"], net.weight.detach())
    assert torch.equal(params["0.bias"], net.bias.detach())


def test_non_finite_loss_stops_or_skips(client: Client) -> None:
    X, y = synthetic(100)
    X[30] = float("nan")
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01},
                            seed=0)
    run = m.train(X, y, epochs=1, batch_size=10)
    with pytest.raises(FailedPreconditionError, match="nan"):
        list(run)
    assert run.summary is not None and run.summary.stop_reason == "non_finite"
    assert run.summary.model_step == 3  # batches 0-2 stepped; batch 3 held the NaN
    done = list(m.train(X, y, epochs=1, batch_size=10, skip_nonfinite=True))[-1]
    assert done.summary.skipped_batches == 1 and done.summary.steps == 9


def _wait_idle(m: Any) -> Any:
    for _ in range(500):
        info = m.refresh()
        if not info.training:
            return info
        time.sleep(0.01)
    raise AssertionError("the server never released the model")


def test_cancel_keeps_last_completed_step(client: Client) -> None:
    X, y = synthetic()
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.03},
                            seed=0)
    seen = 0
    for event in m.train(X, y, epochs=1000, batch_size=10, shuffle=True, seed=1,
                         log_every_steps=5):
        seen = event.step
        if seen >= 50:
            break  # leaving the loop cancels the run
    info = _wait_idle(m)
    assert info.step >= seen
    assert info.step < 100_000  # stopped long before the 1000 epochs
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.03)
    local_loop(net, opt, nn.functional.mse_loss, X, y, epochs=1000, batch_size=10, seed=1,
               max_steps=info.step)
    params = m.parameters()
    assert all(torch.equal(params[k], p.detach()) for k, p in net.named_parameters())
    # the model answers at once and can train again
    assert list(m.train(X, y, max_steps=1, batch_size=10))[-1].summary.steps == 1


def test_deadline_cancels_run(client: Client) -> None:
    X, y = synthetic()
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    with pytest.raises(DeadlineExceededError):
        list(m.train(X, y, epochs=10_000, batch_size=10, timeout=0.5))
    info = _wait_idle(m)
    assert 0 < info.step < 10_000 * 100


def test_second_train_refused_while_busy(client: Client) -> None:
    X, y = synthetic()
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    run = m.train(X, y, epochs=10_000, batch_size=10, log_every_steps=1)
    it = iter(run)
    next(it)  # the run holds the model now
    with pytest.raises(FailedPreconditionError, match="already training"):
        list(m.train(X, y, epochs=1))
    with pytest.raises(FailedPreconditionError, match="is training"):
        m.backward(X[:10], y[:10])
    assert m.forward(X[:2]).shape == (2, 1)  # reads still work between steps
    run.cancel()
    with pytest.raises(StopIteration):
        while True:
            next(it)
    _wait_idle(m)


def test_uploaded_dataset_equals_inline(client: Client) -> None:
    X, y = synthetic(500)
    info = client.upload_dataset(X, y, dataset_id="lin", chunk_bytes=1000)
    assert info.dataset_id == "lin" and info.num_samples == 500
    assert info.num_bytes >= X.numel() * 4 + y.numel() * 4
    assert [d.dataset_id for d in client.list_datasets()] == ["lin"]
    spec = {"layers": LINEAR, "loss": "mse", "optimizer": {"type": "sgd", "lr": 0.03}, "seed": 0}
    a, b = client.create_model(**spec), client.create_model(**spec)
    ea = list(a.train(dataset="lin", epochs=2, batch_size=10, shuffle=True))
    eb = list(b.train(X, y, epochs=2, batch_size=10, shuffle=True))
    assert ea[-1].summary.final_loss == eb[-1].summary.final_loss
    pa, pb = a.parameters(), b.parameters()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    client.delete_dataset("lin")
    with pytest.raises(NotFoundError):
        list(a.train(dataset="lin", epochs=1))


def test_upload_rejects_wrong_byte_count(client: Client) -> None:
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    def requests() -> Any:
        yield pb.UploadDatasetRequest(header=pb.DatasetHeader(inputs=[pb.TensorHeader(
            dtype=pb.DTYPE_FLOAT32, shape=[4, 2])]))
        yield pb.UploadDatasetRequest(chunk=b"\0" * 20)

    import grpc

    with pytest.raises(grpc.RpcError) as err:
        client._stub.UploadDataset(requests())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "received 20 bytes" in err.value.details()
    assert client.list_datasets() == []


def test_train_stream_equals_local_steps(client: Client) -> None:
    X, y = synthetic(60)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.05},
                            seed=0)
    batches = ((X[s:s + 10], y[s:s + 10]) for s in range(0, 60, 10))
    results = list(m.train_stream(batches))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for s in range(0, 60, 10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(X[s:s + 10]), y[s:s + 10])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert [r.loss for r in results] == losses
    assert [r.step for r in results] == [1, 2, 3, 4, 5, 6]
    params = m.parameters()
    assert all(torch.equal(params[k], p.detach()) for k, p in net.named_parameters())
    assert not m.refresh().training


def test_fit_history_plot(client: Client, tmp_path: Path) -> None:
    X, y = synthetic(100)
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.05},
                            seed=0)
    history = m.fit(X, y, epochs=3, batch_size=10, log_every_steps=2, validation=(X, y))
    assert len(history.epoch_losses) == 3 and len(history.val_losses) == 3
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    png = tmp_path / "loss.png"
    history.plot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_shows_loss(client: Client, capsys: Any) -> None:
    X, y = synthetic(100)
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    list(m.train(X, y, epochs=2, batch_size=10, progress=True, log_every_steps=5))
    err = capsys.readouterr().err
    assert "20/20" in err and "loss=" in err


@pytest.mark.parametrize(("options", "total"), [
    ({"epochs": 2, "batch_size": 10}, 22),                           # 103 samples: 11 batches
    ({"epochs": 3, "batch_size": 10, "drop_last": True}, 30),
    ({"max_steps": 25, "batch_size": 10}, 25),                       # epochs from max_steps
    ({"epochs": 3, "max_steps": 5, "batch_size": 10}, 5),
    ({"epochs": 2, "batch_size": 10, "accumulation_steps": 3}, 8),   # ceil(11 / 3) per epoch
])
def test_every_event_reports_the_runs_total_steps(client: Client, options: dict[str, Any],
                                                  total: int) -> None:
    X, y = synthetic(103)
    dataset = client.upload_dataset(X, y).dataset_id  # the client does not see the data
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    events = list(m.train(dataset=dataset, log_every_steps=1, **options))
    assert {e.total_steps for e in events} == {total}
    assert events[-1].summary.steps == total


def test_progress_bar_total_comes_from_the_server(client: Client, capsys: Any) -> None:
    X, y = synthetic(100)
    dataset = client.upload_dataset(X, y).dataset_id
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    list(m.train(dataset=dataset, epochs=3, batch_size=10, progress=True))
    assert "30/30" in capsys.readouterr().err


def test_concurrent_trains_on_two_models(client: Client) -> None:
    X, y = synthetic(200)
    models = [client.create_model(layers=LINEAR, loss="mse", seed=0) for _ in range(2)]
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        results[i] = list(models[i].train(X, y, epochs=5, batch_size=10))[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0].summary.final_loss == results[1].summary.final_loss
