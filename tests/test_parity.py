"""Remote equals local: same spec, init, data and optimizer give bit-identical numbers on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from gradserve import Client, InvalidArgumentError
from torch import nn


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
    spec = {"layers": [{"type": "Linear", "in_features": 2, "out_features": 1}], "loss": "mse",
                "seed": 0}
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


def test_python_floats_for_a_float64_model_arrive_as_float64(client: Client) -> None:
    f = client.create_model(expression="x*w + b", inputs=["x"], parameters={"w": 1.7, "b": 0.1},
                            initial_parameters={"b": 0.3}, loss="mse", dtype="float64")
    params = f.parameters()
    assert params["w"].dtype == torch.float64 and params["w"].item() == 1.7
    assert params["b"].item() == 0.3
    f.set_parameters({"w": 2.9})
    assert f.parameters()["w"].item() == 2.9
    out = f.forward([0.1, 0.7])  # inputs too: torch.tensor(value, dtype=the model's)
    x = torch.tensor([0.1, 0.7], dtype=torch.float64)
    assert torch.equal(out, x * torch.tensor(2.9, dtype=torch.float64) + 0.3)
    # A float32 model still gets torch.tensor's float32 for a Python float.
    g = client.create_model(expression="x*w", inputs=["x"], parameters={"w": 1.7})
    assert g.parameters()["w"].item() == torch.tensor(1.7).item() != 1.7


def test_input_gradients_come_back_in_the_inputs_dtype(client: Client) -> None:
    X, y = _data(6)
    X64 = X.double()
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", seed=5)
    torch.manual_seed(5)
    net = nn.Linear(2, 1)
    xl = X64.clone().requires_grad_(True)
    nn.functional.mse_loss(net(xl.to(torch.float32)), y).backward()
    r = m.backward(X64, y, return_input_grads=True)
    assert r.input_grads[0].dtype == torch.float64
    assert torch.equal(r.input_grads[0], xl.grad)
    fwd = m.forward(X64, retain_graph=True)
    r2 = m.backward(forward_id=fwd.forward_id, target=y, return_input_grads=True)
    assert torch.equal(r2.input_grads[0], xl.grad)


def test_class_weights_and_pos_weight_match_local_losses(client: Client) -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 4, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    labels[2] = -1
    bits = (torch.rand(12, 3, generator=g) > 0.5).float()
    layers = [{"type": "Linear", "in_features": 4, "out_features": 3}]
    cases = [
        ({"type": "cross_entropy", "weight": [0.2, 1.0, 3.0], "ignore_index": -1,
          "label_smoothing": 0.1},
         nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0]), ignore_index=-1,
                             label_smoothing=0.1), labels),
        ({"type": "nll", "weight": [0.2, 1.0, 3.0], "ignore_index": -1},
         nn.NLLLoss(weight=torch.tensor([0.2, 1.0, 3.0]), ignore_index=-1), labels),
        ({"type": "bce_with_logits", "pos_weight": [1.0, 2.0, 4.0], "reduction": "sum"},
         nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 4.0]), reduction="sum"), bits),
        ({"type": "bce_with_logits", "pos_weight": 3.0},
         nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0)), bits),
    ]
    for loss, local_loss, target in cases:
        m = client.create_model(layers=layers, loss=loss, seed=1)
        torch.manual_seed(1)
        net = nn.Linear(4, 3)
        value = local_loss(net(X), target)
        value.backward()
        r = m.backward(X, target, return_grads=True)
        assert r.loss == value.item(), loss
        assert torch.equal(r.grads["0.weight"], net.weight.grad), loss


def test_bilinear_first_layer_takes_two_inputs(client: Client) -> None:
    g = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(5, 1)
    m = client.create_model(layers=[{"type": "Bilinear", "in1_features": 3, "in2_features": 2,
                                     "out_features": 4}, {"type": "Tanh"},
                                    {"type": "Linear", "in_features": 4, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.1}, seed=7)
    torch.manual_seed(7)
    bil, lin = nn.Bilinear(3, 2, 4), nn.Linear(4, 1)
    out = lin(torch.tanh(bil(a, b)))
    assert torch.equal(m.forward(a, b), out.detach())
    nn.functional.mse_loss(out, y).backward()
    r = m.backward((a, b), y, return_grads=True)
    assert torch.equal(r.grads["0.weight"], bil.weight.grad)


def test_every_seed_torch_accepts_is_accepted(client: Client) -> None:
    from gradserve import InvalidArgumentError

    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    for seed in (-1, -(2**63), 2**64 - 1, 0):
        m = client.create_model(layers=layers, seed=seed)
        torch.manual_seed(seed)
        assert torch.equal(m.parameters()["0.weight"], nn.Linear(3, 2).weight.detach()), seed
    for seed in (2**64, -(2**63) - 1):
        try:
            client.create_model(layers=layers, seed=seed)
        except InvalidArgumentError as exc:
            assert "seed" in exc.details
        else:
            raise AssertionError(f"seed {seed} was accepted")
    X, y = _data(9)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", seed=0)
    events = list(m.train(X, y, epochs=2, batch_size=3, shuffle=True, seed=-1,
                          log_every_steps=1))
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.001)
    losses = []
    for epoch in range(2):
        order = torch.randperm(9, generator=torch.Generator().manual_seed(-1 + epoch))
        for s in range(0, 9, 3):
            loss = nn.functional.mse_loss(net(X[order[s:s + 3]]), y[order[s:s + 3]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert [e.batch_loss for e in events if e.kind == "progress"] == losses


def test_optimizer_state_reads_back_as_local_adam_holds_it(client: Client) -> None:
    X, y = _data(10)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer={"type": "adam", "lr": 0.01,
                                                   "betas": [0.8, 0.99]}, seed=0)
    assert m.optimizer_state().state == {}  # nothing stepped yet
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.99))
    for _ in range(3):
        m.backward(X, y, step=True)
        opt.zero_grad()
        nn.functional.mse_loss(net(X), y).backward()
        opt.step()
    state = m.optimizer_state()
    local = {n: opt.state[p] for n, p in zip(["0.weight", "0.bias"], net.parameters())}
    assert list(state.state) == ["0.weight", "0.bias"]
    for name, entry in local.items():
        assert set(state.state[name]) == set(entry)
        for key, value in entry.items():
            assert torch.equal(state.state[name][key], value), (name, key)
    assert state.param_groups[0]["lr"] == 0.01 and state.param_groups[0]["betas"] == [0.8, 0.99]
    assert list(m.optimizer_state(["0.bias"]).state) == ["0.bias"]


# The README's local equivalent of an expression: the text as Python with these names.
EXPRESSION_NAMES = {
    "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
    "log": torch.log, "log1p": torch.log1p, "sin": torch.sin, "cos": torch.cos,
    "tan": torch.tan, "abs": torch.abs, "sqrt": torch.sqrt, "square": torch.square,
    "sum": torch.sum, "mean": torch.mean, "matmul": torch.matmul,
    "softplus": nn.functional.softplus, "clamp": torch.clamp, "maximum": torch.maximum,
    "minimum": torch.minimum, "pi": math.pi, "e": math.e,
}


@pytest.mark.parametrize("text", [
    "(2 + 3) * n",             # int arithmetic stays int
    "n * 2 - 7 * n",
    "sum(x * w, 1)",           # a positional dim
    "mean(x, -1, True)",
    "sum(x, dim=[0, 1])",
    "mean(x, (0,), keepdim=True) * 2**-1",
    "clamp(x, 0, 1) + softplus(x, 2, 10)",
    "maximum(x, w) + e ** 2",
])
def test_expressions_compute_what_the_same_text_computes_locally(client: Client,
                                                                  text: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    n = torch.tensor([3, -1, 4])
    m = client.create_model(expression=text, inputs=["x", "n"], parameters={"w": w})
    local = eval(text, {"__builtins__": {}}, {**EXPRESSION_NAMES, "x": x, "n": n, "w": w})
    out = m.forward(x, n)
    assert out.dtype == local.dtype and torch.equal(out, local)


@pytest.mark.parametrize(("text", "says"), [
    ("exp(1) * x", "must be a tensor"),      # torch.exp(1) raises TypeError
    ("maximum(x, 0)", "must be a tensor"),    # so does torch.maximum(x, 0)
    ("x * 10**20", "int64"),                 # torch: OverflowError
    ("mean(x, 1, 1)", "keepdim"),            # torch: keepdim must be bool
    ("sum(x, 1.5)", "dim"),
    ("2 * 3", "constant"),
])
def test_expressions_that_raise_locally_are_refused_at_creation(client: Client, text: str,
                                                                says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        client.create_model(expression=text, inputs=["x"])
