"""Each model has its own random stream: dropout is reproducible and equals the local code that
docs/models.md "Semantics" documents; checkpoints carry the stream; the global RNG is never touched."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gradserve import Client
from gradserve_server.app import GradServer
from torch import nn

DROPOUT = [{"type": "Linear", "in_features": 4, "out_features": 16}, {"type": "Dropout", "p": 0.5},
           {"type": "Linear", "in_features": 16, "out_features": 1}]
OPTIMIZER = {"type": "sgd", "lr": 0.05}


def _local_net(seed: int) -> nn.Module:
    """docs/models.md "Semantics": torch.manual_seed(seed), then build the model as the spec says."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 4, generator=g)
    return X, X.sum(1, keepdim=True)


def test_two_models_with_one_seed_draw_the_same_masks_as_local_code(client: Client) -> None:
    x = torch.ones(8, 4)
    a = client.create_model(layers=DROPOUT, seed=0)
    b = client.create_model(layers=DROPOUT, seed=0)
    client.create_model(layers=DROPOUT, seed=0).forward(x)  # a third model draws in between
    outs_a = [torch.as_tensor(a.forward(x)) for _ in range(3)]
    outs_b = [torch.as_tensor(b.forward(x)) for _ in range(3)]
    with torch.random.fork_rng(devices=[]):
        net = _local_net(0)
        with torch.no_grad():
            local = [net(x) for _ in range(3)]  # Forward's default: training mode, no_grad
    for ra, rb, lo in zip(outs_a, outs_b, local):
        assert torch.equal(ra, rb)
        assert torch.equal(ra, lo)
    assert not torch.equal(outs_a[0], outs_a[1])  # the stream advances: new masks each call
    # eval mode draws nothing: the stream is where it was
    assert torch.equal(torch.as_tensor(a.forward(x, eval_mode=True)),
                       torch.as_tensor(b.forward(x, eval_mode=True)))


def test_identical_train_runs_end_with_identical_parameters(client: Client) -> None:
    X, y = _data()
    runs = []
    for _ in range(2):
        m = client.create_model(layers=DROPOUT, loss="mse", optimizer=OPTIMIZER, seed=7)
        list(m.train(X, y, epochs=2, batch_size=16, shuffle=True, seed=3))
        runs.append(m.parameters())
    with torch.random.fork_rng(devices=[]):  # docs/models.md's local loop, dropout included
        net = _local_net(7)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for epoch in range(2):
            order = torch.randperm(64, generator=torch.Generator().manual_seed(3 + epoch))
            for s in range(0, 64, 16):
                idx = order[s:s + 16]
                nn.functional.mse_loss(net(X[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
    for name, p in net.named_parameters():
        assert torch.equal(runs[0][name], runs[1][name]), name
        assert torch.equal(runs[0][name], p.detach()), name


def test_checkpoint_round_trip_continues_the_stream(make_server: Callable[..., GradServer],
                                                    tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    x = torch.ones(8, 4)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        a = client.create_model(layers=DROPOUT, seed=0, model_id="a")
        a.forward(x)
        a.save_checkpoint("a-1")
        expected = [torch.as_tensor(a.forward(x)) for _ in range(2)]
        b = client.load_checkpoint("a-1", model_id="b")
        assert all(torch.equal(torch.as_tensor(b.forward(x)), e) for e in expected)
    assert server.drain(grace=1).ok
    second = make_server(state_dir=str(tmp_path))
    with Client(f"127.0.0.1:{second.port}", timeout=30) as client:
        after_restart = torch.as_tensor(client.model("a").forward(x))
    with torch.random.fork_rng(devices=[]):
        net = _local_net(0)
        with torch.no_grad():
            local = [net(x) for _ in range(4)]
    assert torch.equal(after_restart, local[3])


def test_loading_and_running_models_never_touch_the_global_rng(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    x = torch.ones(8, 4)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        m = client.create_model(layers=DROPOUT, seed=0, model_id="m")
        m.forward(x)
        m.save_checkpoint()
        torch.manual_seed(1234)
        state = torch.random.get_rng_state()
        client.load_checkpoint("m", model_id="copy")
        client.model("copy").forward(x)
        client.create_model(layers=DROPOUT, seed=5).forward(x)
        client.create_model(layers=DROPOUT).forward(x)  # no seed
        assert torch.equal(torch.random.get_rng_state(), state)
    assert server.drain(grace=1).ok
    make_server(state_dir=str(tmp_path))  # start-up restores "m" and "copy"
    assert torch.equal(torch.random.get_rng_state(), state)


def test_models_on_threads_each_follow_their_own_stream(client: Client) -> None:
    x = torch.ones(8, 4)
    models = [client.create_model(layers=DROPOUT, seed=s) for s in (0, 1, 2, 3)]
    results: dict[int, list[torch.Tensor]] = {}

    def drive(i: int) -> None:
        results[i] = [torch.as_tensor(models[i].forward(x)) for _ in range(20)]

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, seed in enumerate((0, 1, 2, 3)):
        with torch.random.fork_rng(devices=[]):
            net = _local_net(seed)
            with torch.no_grad():
                local = [net(x) for _ in range(20)]
        assert all(torch.equal(r, lo) for r, lo in zip(results[i], local)), f"seed {seed}"


def test_models_without_a_seed_are_not_all_the_same(client: Client) -> None:
    a = client.create_model(layers=DROPOUT).parameters()
    b = client.create_model(layers=DROPOUT).parameters()
    assert not torch.equal(a["0.weight"], b["0.weight"])


@pytest.mark.gpu
def test_cuda_models_draw_what_local_cuda_code_draws(make_server: Callable[..., GradServer],
                                                      tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    server = make_server(device=str(dev), state_dir=str(tmp_path))
    x = torch.ones(16, 4)
    torch.manual_seed(99)
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state(dev)
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        a = client.create_model(layers=DROPOUT, seed=0, model_id="a")
        b = client.create_model(layers=DROPOUT, seed=0)
        outs = [torch.as_tensor(a.forward(x)) for _ in range(3)]
        assert all(torch.equal(o, torch.as_tensor(b.forward(x))) for o in outs)
        a.save_checkpoint("a-3")
        c = client.load_checkpoint("a-3", model_id="c")
        nxt = torch.as_tensor(c.forward(x))
        assert torch.equal(nxt, torch.as_tensor(a.forward(x)))
    with torch.random.fork_rng(devices=[dev]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).to(dev)
        with torch.no_grad():
            local = [net(x.to(dev)).cpu() for _ in range(4)]
    assert all(torch.equal(o, lo) for o, lo in zip([*outs, nxt], local))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(dev), cuda_state)
