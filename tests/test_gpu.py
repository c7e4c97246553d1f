"""A CUDA server gives exactly what the same local code gives on the same CUDA device.

Every test here needs a GPU and skips cleanly without one (CI never has one). The parity is
remote-on-cuda against local-on-cuda: the same kernels, so bit-identical where the kernels are
deterministic. GRADSERVE_TEST_DEVICE=cpu runs the same tests on the CPU, to check the tests
themselves on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gradserve import Client
from torch import nn

DEVICE = os.environ.get("GRADSERVE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device"),
]

MLP = [{"type": "Linear", "in_features": 32, "out_features": 64}, {"type": "ReLU"},
       {"type": "Linear", "in_features": 64, "out_features": 10}]


def local_mlp() -> nn.Module:
    """What the server builds for MLP with seed 0: seeded on the CPU, then moved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    return net.to(DEVICE)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def client(make_server: Callable[..., Any]) -> Any:
    server = make_server(device=DEVICE)
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


def test_fused_steps_with_adam_equal_local_cuda(client: Client) -> None:
    m = client.create_model(layers=MLP, loss="cross_entropy",
                            optimizer={"type": "adam", "lr": 0.01}, seed=0)
    assert m.info.device.startswith(DEVICE)
    net = local_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for step in range(5):
        x, y = data(64, step)
        r = m.backward(x, y, return_grads=True, step=True)
        loss = nn.functional.cross_entropy(net(x.to(DEVICE)), y.to(DEVICE))
        loss.backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        assert r.loss == loss.item()
        for name, g in grads.items():
            assert torch.equal(torch.as_tensor(r.grads[name]), g), name
    for name, p in net.state_dict().items():
        assert torch.equal(torch.as_tensor(m.parameters()[name]), p.cpu()), name


def test_retained_forward_and_grad_output_equal_local_cuda(client: Client) -> None:
    m = client.create_model(layers=MLP, seed=0)
    net = local_mlp()
    x, _ = data(16, 7)
    f = m.forward(x, retain_graph=True)
    xl = x.to(DEVICE).requires_grad_()
    out = net(xl)
    assert torch.equal(torch.as_tensor(f.output), out.detach().cpu())
    g = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    r = m.backward(forward_id=f.forward_id, grad_output=g, return_grads=True,
                   return_input_grads=True)
    out.backward(g.to(DEVICE))
    assert torch.equal(torch.as_tensor(r.input_grads[0]), xl.grad.cpu())
    for name, p in net.named_parameters():
        assert torch.equal(torch.as_tensor(r.grads[name]), p.grad.cpu()), name


def test_train_with_shuffle_equals_the_local_cuda_loop(client: Client) -> None:
    m = client.create_model(layers=MLP, loss="cross_entropy",
                            optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9}, seed=0)
    X, Y = data(256, 3)
    events = list(m.train(X, Y, epochs=2, batch_size=32, shuffle=True, seed=5))
    net = local_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    Xd, Yd = X.to(DEVICE), Y.to(DEVICE)
    for epoch in range(2):
        order = torch.randperm(256, generator=torch.Generator().manual_seed(5 + epoch))
        for s in range(0, 256, 32):
            idx = order[s:s + 32].to(DEVICE)
            nn.functional.cross_entropy(net(Xd[idx]), Yd[idx]).backward()
            opt.step()
            opt.zero_grad()
    assert events[-1].summary is not None and events[-1].summary.steps == 16
    for name, p in net.state_dict().items():
        assert torch.equal(torch.as_tensor(m.parameters()[name]), p.cpu()), name


def test_large_tensors_round_trip_through_a_cuda_model(client: Client) -> None:
    """16 MiB in and out (the wire, or same-host shared memory when it is available)."""
    m = client.create_model(layers=[{"type": "Identity"}])
    x = torch.randn(4096, 1024)
    assert torch.equal(torch.as_tensor(m.forward(x)), x)


def test_memory_budget_refuses_an_oversized_cuda_call(make_server: Callable[..., Any]) -> None:
    server = make_server(device=DEVICE, max_memory_mb=256)
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        m = c.create_model(expression="x * y", inputs=["x", "y"])
        from gradserve import ResourceExhaustedError

        with pytest.raises(ResourceExhaustedError):
            m.forward(torch.ones(50_000, 1), torch.ones(1, 50_000))
        assert torch.equal(torch.as_tensor(m.forward(torch.ones(3, 1), torch.ones(1, 3))),
                           torch.ones(3, 3))
