"""Remote equals local: same spec, init, data and optimizer give bit-identical numbers on CPU."""

from __future__ import annotations

import torch
from torch import nn

from gradserve import Client


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    y = X @ torch.tensor([[2.0], [-3.4]]) + 4.2 + 0.01 * torch.randn(n, 1, generator=g)
    return X, y


def _assert_params_equal(remote: dict[str, torch.Tensor], local: nn.Module) -> None:
    state = dict(local.named_parameters())
    assert list(remote) == list(state)
    for name, value in remote.items():
        assert torch.equal(value, state[name].detach()), name


def test_linear_sgd_matches_local(client: Client) -> None:
    X, y = _data()
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.03}, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.03)
    _assert_params_equal(m.parameters(), net)
    for i in range(0, 40, 10):
        r = m.backward(X[i:i + 10], y[i:i + 10], return_grads=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(X[i:i + 10]), y[i:i + 10])
        loss.backward()
        assert r.loss == loss.item()
        for name, p in net.named_parameters():
            assert torch.equal(r.grads[name], p.grad)
        opt.step()
        assert m.step() == i // 10 + 1
    _assert_params_equal(m.parameters(), net)
    assert torch.equal(m.forward(X), net(X).detach())


def test_mlp_cross_entropy_adam_matches_local(client: Client) -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    layers = [{"type": "Linear", "in_features": 8, "out_features": 16}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 16, "out_features": 3}]
    m = client.create_model(layers=layers, loss="cross_entropy",
                            optimizer={"type": "adam", "lr": 0.01, "betas": [0.9, 0.99]}, seed=7)
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))
    for i in range(0, 64, 16):
        r = m.backward(X[i:i + 16], y[i:i + 16], step=True)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X[i:i + 16]), y[i:i + 16])
        loss.backward()
        opt.step()
        assert r.loss == loss.item()
        assert r.step == i // 16 + 1
    _assert_params_equal(m.parameters(), net)


def test_expression_with_frozen_parameters_matches_local(client: Client) -> None:
    x = torch.linspace(-2, 2, 16)
    y = 0.5 * x**2 - x + 3
    m = client.create_model(expression="a*x**2 + b*x + c + d", inputs=["x"],
                            parameters={"a": 0.3, "b": -0.7, "c": 0.0, "d": 1.0},
                            trainable=["c"], loss="mse", optimizer={"type": "sgd", "lr": 0.1})
    a, b, d = (torch.tensor(v) for v in (0.3, -0.7, 1.0))
    c = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([c], lr=0.1)
    for _ in range(5):
        r = m.backward(x, y, return_grads=True, step=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(a * x**2 + b * x + c + d, y)
        loss.backward()
        assert r.loss == loss.item()
        assert set(r.grads) == {"c"}  # frozen parameters get no gradient
        opt.step()
    params = m.parameters()
    assert torch.equal(params["c"], c.detach())
    assert params["a"].item() == a.item() and params["b"].item() == b.item()
    info = {p.name: p.trainable for p in m.refresh().parameters}
    assert info == {"a": False, "b": False, "c": True, "d": False}


def test_objective_rosenbrock_sgd_matches_local(client: Client) -> None:
    e = client.create_model(expression="(1 - x)**2 + 100*(y - x**2)**2",
                            parameters={"x": 0.0, "y": 0.0},
                            optimizer={"type": "sgd", "lr": 0.001})
    x = torch.tensor(0.0, requires_grad=True)
    y = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([x, y], lr=0.001)
    for _ in range(50):
        r = e.backward(step=True)
        opt.zero_grad()
        f = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        f.backward()
        opt.step()
        assert r.loss == f.item()
    params = e.parameters()
    assert torch.equal(params["x"], x.detach()) and torch.equal(params["y"], y.detach())


def test_gradients_accumulate_until_step(client: Client) -> None:
    X, y = _data()
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.05}, seed=2)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    opt.zero_grad()
    for i in range(0, 30, 10):
        r = m.backward(X[i:i + 10], y[i:i + 10], return_grads=True)
        nn.functional.mse_loss(net(X[i:i + 10]), y[i:i + 10]).backward()
        for name, p in net.named_parameters():  # the reply shows the accumulated .grad
            assert torch.equal(r.grads[name], p.grad)
    grads = m.grads()
    for name, p in net.named_parameters():
        assert torch.equal(grads[name], p.grad)
    opt.step()
    m.step()
    assert m.grads() == {}  # Step zeroes (sets to None) the gradients
    _assert_params_equal(m.parameters(), net)
    m.backward(X[:10], y[:10])
    m.zero_grad()
    assert m.grads() == {}


def test_momentum_nesterov_sgd_matches_local(client: Client) -> None:
    X, y = _data()
    opt_cfg = {"type": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer=opt_cfg, seed=5)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, nesterov=True,
                          weight_decay=1e-3)
    for _ in range(6):
        r = m.backward(X, y, step=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(X), y)
        loss.backward()
        opt.step()
        assert r.loss == loss.item()
    _assert_params_equal(m.parameters(), net)


def test_input_gradients_match_local(client: Client) -> None:
    X, y = _data(8)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 3},
                                    {"type": "Tanh"},
                                    {"type": "Linear", "in_features": 3, "out_features": 1}],
                            loss="mse", seed=11)
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    xl = X.clone().requires_grad_(True)
    nn.functional.mse_loss(net(xl), y).backward()
    r = m.backward(X, y, return_input_grads=True)
    assert len(r.input_grads) == 1
    assert torch.equal(r.input_grads[0], xl.grad)
    # Retained form with an upstream gradient (split learning).
    fwd = m.forward(X, retain_graph=True)
    assert fwd.forward_id and torch.equal(fwd.output, net(X).detach())
    upstream = torch.ones(8, 1) * 0.5
    xl2 = X.clone().requires_grad_(True)
    net(xl2).backward(upstream)
    r2 = m.backward(forward_id=fwd.forward_id, grad_output=upstream, return_input_grads=True)
    assert r2.loss is None
    assert torch.equal(r2.input_grads[0], xl2.grad)


def test_retained_forward_with_target_matches_fused(client: Client) -> None:
    X, y = _data(10)
    spec = dict(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}], loss="mse",
                seed=0)
    a, b = client.create_model(**spec), client.create_model(**spec)
    fwd = a.forward(X, retain_graph=True)
    assert a.refresh().retained_graphs == 1
    ra = a.backward(forward_id=fwd.forward_id, target=y, return_grads=True)
    rb = b.backward(X, y, return_grads=True)
    assert ra.loss == rb.loss
    assert all(torch.equal(ra.grads[k], rb.grads[k]) for k in rb.grads)
    assert a.refresh().retained_graphs == 0


def test_float64_and_scalar_inputs(client: Client) -> None:
    f = client.create_model(expression="relu(x*w + b)", inputs=["x"],
                            parameters={"w": 1.7, "b": -0.85}, trainable=["b"], loss="mse",
                            optimizer={"type": "sgd", "lr": 0.1}, dtype="float64")
    out = f.forward(0.5)  # a 0-d input: one scalar sample
    assert out.shape == () and out.dtype == torch.float64
    assert out.item() == torch.relu(torch.tensor(0.5, dtype=torch.float64) * 1.7 - 0.85).item()
    r = f.backward(1.0, 2.0, return_grads=True)
    assert r.grads["b"].shape == ()
