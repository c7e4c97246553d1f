"""The SDK surface as written in the issue, through a real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradserve import Client, GradServeError, NotFoundError, codec


def test_issue_example_end_to_end(client: Client) -> None:
    X = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    y = (X @ np.array([[2.0], [-3.4]], dtype=np.float32) + 4.2).astype(np.float32)
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", optimizer={"type": "sgd", "lr": 0.03}, seed=0,
                            model_id="linreg")
    e = client.create_model(expression="(1 - x)**2 + 100*(y - x**2)**2",
                            parameters={"x": 0.0, "y": 0.0},
                            optimizer={"type": "sgd", "lr": 0.001})
    assert e.id.startswith("model-")
    out = m.forward(X)
    assert isinstance(out, torch.Tensor) and out.shape == (100, 1)
    r = m.backward(X, y, return_grads=True)
    assert isinstance(r.loss, float) and set(r.grads) == {"0.weight", "0.bias"}
    assert e.backward().loss == 1.0  # f(0, 0) = 1
    assert m.step() == 1
    m.zero_grad()
    params = m.parameters()
    assert list(params) == ["0.weight", "0.bias"]
    m.set_parameters({"0.weight": torch.tensor([[2.0, -3.4]]), "0.bias": torch.tensor([4.2])})
    assert torch.equal(m.parameters()["0.bias"], torch.tensor([4.2]))
    events = list(m.train(X, y, epochs=3, batch_size=10, shuffle=True))
    assert events[-1].kind == "done" and events[-1].summary.epochs == 3
    assert [x.id for x in client.list_models()] == sorted([m.id, e.id])
    assert client.model("linreg").info.step == m.refresh().step
    m.delete()
    with pytest.raises(NotFoundError) as err:
        client.model("linreg")
    assert isinstance(err.value, GradServeError) and "linreg" in err.value.details


def test_numpy_inputs_and_python_floats(client: Client) -> None:
    m = client.create_model(layers=[{"type": "Linear", "in_features": 1, "out_features": 1}],
                            loss="mse", seed=0, initial_parameters={
                                "0.weight": [[2.0]], "0.bias": [1.0]})
    # float64 numpy input is cast to the model dtype (float32), as documented
    out = m.forward(np.array([[1.0], [2.0]]))
    assert out.dtype == torch.float32 and out.flatten().tolist() == [3.0, 5.0]


@pytest.mark.parametrize("size", [12, 300_000], ids=["small", "framed"])
def test_every_dtype_travels_through_the_server_unchanged(client: Client, size: int) -> None:
    """An identity model gives back what it got, for every wire dtype (floating models of the
    input's dtype, so nothing is cast), in the message and framed beside it (> 64 KiB)."""
    for name in codec.DTYPE_NAMES:
        dtype = getattr(torch, name)
        model_dtype = name if dtype.is_floating_point else "float32"
        m = client.create_model(expression="u", inputs=["u"], dtype=model_dtype)
        t = (torch.arange(size) % 17 - 8).to(dtype) * (1.5 if dtype.is_floating_point else 1)
        out = m.forward(t)
        assert out.dtype == t.dtype and torch.equal(out, t), name
        m.delete()


def test_plugin_model(client: Client) -> None:
    m = client.create_model(plugin="mlp", plugin_kwargs={"in_features": 4, "hidden": [8],
                                                         "out_features": 2},
                            loss="cross_entropy", seed=0)
    assert [p.name for p in m.info.parameters] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    r = m.backward(torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1]))
    assert r.loss > 0


def test_frozen_layer_parameters(client: Client) -> None:
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", frozen=["0.weight"], optimizer={"type": "sgd", "lr": 0.5},
                            seed=0)
    before = m.parameters()
    m.backward(torch.ones(4, 2), torch.zeros(4, 1), step=True)
    after = m.parameters()
    assert torch.equal(before["0.weight"], after["0.weight"])
    assert not torch.equal(before["0.bias"], after["0.bias"])


def test_batchnorm_buffers_and_eval_mode(client: Client) -> None:
    m = client.create_model(layers=[{"type": "BatchNorm1d", "num_features": 2}], loss="mse",
                            seed=0)
    x = torch.randn(16, 2) * 3 + 1
    m.backward(x, torch.zeros(16, 2))
    state = m.parameters(buffers=True)
    assert {"running_mean", "running_var", "num_batches_tracked"} <= {
        k.split(".", 1)[1] for k in state}
    bn = torch.nn.BatchNorm1d(2)
    bn(x)
    assert bn.running_mean is not None
    assert torch.allclose(state["0.running_mean"], bn.running_mean)
    bn.eval()
    assert torch.allclose(m.forward(x, eval_mode=True), bn(x).detach(), atol=1e-6)
