"""RemoteModule inside local autograd: parity with a fully local network, gradcheck, no-grad,
eval mode, repeated backward, and graphs that are never backpropagated."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gradserve import Client, RemoteModel
from gradserve.aio import AsyncClient
from gradserve.nn import RemoteModule
from gradserve_server.app import GradServer
from torch import nn

MIDDLE = [{"type": "Linear", "in_features": 4, "out_features": 5}, {"type": "Tanh"}]


def local_copy(model: RemoteModel) -> nn.Module:
    """nn.Sequential(Linear(4, 5), Tanh()) holding the server model's current parameters."""
    local = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    local.load_state_dict({k: v.clone() for k, v in model.parameters().items()})
    return local


def test_hybrid_training_equals_local_training(client: Client) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    encoder, head = nn.Linear(3, 4), nn.Linear(5, 1)
    model = client.create_model(layers=MIDDLE, optimizer={"type": "sgd", "lr": 0.1}, seed=3)
    local = nn.Sequential(copy.deepcopy(encoder), local_copy(model), copy.deepcopy(head))
    remote = RemoteModule(model)
    hybrid = nn.Sequential(encoder, remote, head)
    assert list(remote.parameters()) == []  # nothing for a local optimizer to step twice
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    hybrid_opt = torch.optim.SGD(hybrid.parameters(), lr=0.1)  # encoder and head only

    for _ in range(4):
        local_opt.zero_grad()
        local_loss = nn.functional.mse_loss(local(x), y)
        local_loss.backward()
        local_opt.step()

        hybrid_opt.zero_grad()
        hybrid_loss = nn.functional.mse_loss(hybrid(x), y)
        hybrid_loss.backward()
        hybrid_opt.step()
        remote.step()
        torch.testing.assert_close(hybrid_loss, local_loss, rtol=0, atol=0)

    for (name, want), got in zip(local.state_dict().items(), [
            *encoder.state_dict().values(), *remote.remote_parameters().values(),
            *head.state_dict().values()]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    info = model.refresh()
    assert info.step == 4
    assert info.retained_graphs == 0  # every forward's graph was consumed by its backward


def test_server_parameters_get_gradients_when_no_input_needs_one(client: Client) -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 4)  # a plain input: the remote model is the first layer
    model = client.create_model(layers=MIDDLE, seed=5)
    local = local_copy(model)
    loss = RemoteModule(model)(x).square().sum()
    assert loss.requires_grad
    loss.backward()
    local(x).square().sum().backward()
    grads = model.grads()
    for name, p in local.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6)


def test_gradcheck_through_a_remote_layer(client: Client) -> None:
    model = client.create_model(layers=[{"type": "Linear", "in_features": 3, "out_features": 2},
                                        {"type": "Tanh"}], dtype="float64", seed=0)
    remote = RemoteModule(model)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(remote, (x,), eps=1e-6, atol=1e-7)
    # A wrong backward must be caught: scaled input gradients fail the same check.
    broken = RemoteModule(model)
    broken.forward = lambda inp: _Scale.apply(remote(inp))  # type: ignore[method-assign]
    assert not torch.autograd.gradcheck(broken, (x,), eps=1e-6, atol=1e-7, raise_exception=False)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * 1.5


def test_gradcheck_with_two_inputs(client: Client) -> None:
    w = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)
    model = client.create_model(expression="tanh(x @ w) * y", inputs=["x", "y"],
                                parameters={"w": w}, dtype="float64")
    remote = RemoteModule(model)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(remote, (x, y), eps=1e-6, atol=1e-7)
    # Only one input needing a gradient: the other gets none.
    y2 = y.detach()
    remote(x, y2).sum().backward()
    assert y2.grad is None
    expected = ((1 - torch.tanh(x.detach() @ w) ** 2) * y2) @ w.T
    torch.testing.assert_close(x.grad, expected)


def test_no_grad_forward_keeps_no_graph(client: Client) -> None:
    model = client.create_model(layers=MIDDLE, seed=2)
    remote = RemoteModule(model)
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        out = remote(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, local_copy(model)(x).detach(), rtol=0, atol=1e-6)
    assert model.refresh().retained_graphs == 0
    frozen = client.create_model(layers=MIDDLE, frozen=["0.weight", "0.bias"])
    assert not RemoteModule(frozen)(torch.randn(3, 4)).requires_grad  # nothing to differentiate
    assert frozen.refresh().retained_graphs == 0


def test_eval_mode_is_forwarded(client: Client) -> None:
    remote = RemoteModule(client.create_model(layers=[{"type": "Dropout", "p": 0.5}]))
    x = torch.ones(200)
    with torch.no_grad():
        assert not torch.equal(remote(x), x)  # train mode: some elements dropped
        remote.eval()
        assert torch.equal(remote(x), x)


def test_second_backward_through_the_same_output_accumulates(client: Client) -> None:
    model = client.create_model(layers=MIDDLE, seed=4)
    local = local_copy(model)
    x = torch.randn(5, 4, requires_grad=True)
    loss = RemoteModule(model)(x).sum()
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()  # the server graph was consumed: the forward is re-run for this one
    torch.testing.assert_close(x.grad, 2 * once)
    local(x.detach()).sum().backward()
    for name, p in local.named_parameters():
        torch.testing.assert_close(model.grads()[name], 2 * p.grad, rtol=0, atol=1e-6)
    assert model.refresh().retained_graphs == 0


def test_unused_outputs_do_not_break_later_steps(make_server: Callable[..., GradServer]
                                                 ) -> None:
    server = make_server(max_graphs=4)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        model = client.create_model(layers=MIDDLE, seed=6, optimizer={"type": "sgd", "lr": 0.1})
        remote = RemoteModule(model)
        x = torch.randn(5, 4)
        for _ in range(10):
            remote(x)  # graph kept on the server, never backpropagated
        assert model.refresh().retained_graphs == 4  # evicted by count, oldest first
        local = local_copy(model)
        remote(x).sum().backward()
        local(x).sum().backward()
        for name, p in local.named_parameters():
            torch.testing.assert_close(model.grads()[name], p.grad, rtol=0, atol=1e-6)
        assert remote.step() == 1
        remote.zero_grad()
        assert model.grads() == {}


def test_async_models_are_refused(server: GradServer) -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            model = await c.create_model(layers=MIDDLE)
            with pytest.raises(TypeError, match="sync Client"):
                RemoteModule(model)

    asyncio.run(main())
