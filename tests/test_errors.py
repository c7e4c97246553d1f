"""Every status code the server uses, provoked through the SDK; the server survives each."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
import pytest
import torch
from gradserve import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    GradServeError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from gradserve.errors import from_rpc_error
from gradserve_server.catalog import plugins
from torch import nn

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def _alive(client: Client) -> None:
    assert client.health() == "SERVING"
    m = client.create_model(layers=LINEAR, seed=0)
    assert m.forward(torch.ones(1, 2)).shape == (1, 1)
    m.delete()


def test_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError, match="no model 'nope'") as err:
        client.model("nope")
    # The status the server sent, kept on the error and shown first.
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert str(err.value) == f"NOT_FOUND: {err.value.details}"
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    with pytest.raises(NotFoundError, match="forward_id"):
        m.backward(forward_id="0" * 32, target=torch.zeros(1, 1))
    with pytest.raises(NotFoundError, match="missing"):
        client.delete_dataset("missing")


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_status_maps_to_its_error_class(code: grpc.StatusCode) -> None:
    """Each status becomes the GradServeError subclass of that code (or the base class)."""
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return "why"

    error = from_rpc_error(Failed())
    assert error.code == code and error.details == "why"
    exact = [cls for cls in GradServeError.__subclasses__() if cls.code == code]
    assert type(error) is (exact[0] if exact else GradServeError)


def test_already_exists(client: Client) -> None:
    client.create_model(layers=LINEAR, model_id="dup")
    with pytest.raises(AlreadyExistsError, match="dup"):
        client.create_model(layers=LINEAR, model_id="dup")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"layers": [{"type": "Conv9d"}]}, "unknown layer type"),
        ({"layers": [{"type": "Linear", "in_features": 2}]}, "missing required argument"),
        ({"layers": [{"type": "Linear", "in_features": 2, "out_features": 1, "bogus": 1}]},
         "unknown or forbidden argument 'bogus'"),
        ({"layers": [{"type": "ReLU", "inplace": True}]}, "forbidden"),
        ({"layers": []}, "at least one layer"),
        ({"expression": "__import__('os').system('true')"}, "not allowed"),
        ({"expression": "x.real", "parameters": {"x": 1.0}}, "attribute access"),
        ({"expression": "[v for v in x]", "parameters": {"x": 1.0}}, "comprehensions"),
        ({"expression": "(lambda: 1)()"}, "not allowed"),
        ({"expression": "x +", "parameters": {"x": 1.0}}, "syntax error"),
        ({"expression": "x + z", "parameters": {"x": 1.0}}, "unknown name 'z'"),
        ({"expression": "-(" * 100 + "x" + ")" * 100, "parameters": {"x": 1.0}}, "nested"),
        ({"expression": "x" + "+x" * 3000, "parameters": {"x": 1.0}}, "longer than"),
        ({"layers": LINEAR, "loss": "hinge"}, "unknown loss"),
        ({"layers": LINEAR, "loss": {"type": "mse", "reduction": "avg"}}, "reduction"),
        ({"layers": LINEAR, "optimizer": {"type": "lbfgs"}}, "unknown optimizer"),
        ({"layers": LINEAR, "optimizer": {"type": "sgd", "lr": -1.0}},
         "spec.optimizer (sgd).lr: -1.0 is out of range"),
        ({"layers": LINEAR, "optimizer": {"type": "adam", "betas": [0.9, 2.0]}}, "beta"),
        ({"layers": LINEAR, "optimizer": {"type": "sgd", "momentum": "fast"}}, "expected a number"),
        ({"layers": LINEAR, "frozen": ["0.nope"]}, "unknown parameter"),
        ({"layers": LINEAR, "initial_parameters": {"0.weight": [1.0, 2.0, 3.0]}}, "shape"),
        ({"layers": LINEAR, "dtype": "int32"}, "not a floating dtype"),
        ({"plugin": "not-installed"}, "no plugin"),
    ],
)
def test_invalid_specs(client: Client, spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        client.create_model(**spec)
    assert needle in err.value.details, err.value.details
    _alive(client)


def test_huge_constant_is_refused_without_hanging(client: Client) -> None:
    """9**9**9 is never computed (a 370-million-digit integer): it is refused at creation, as
    torch would refuse an integer beyond int64, with INVALID_ARGUMENT saying so."""
    with pytest.raises(InvalidArgumentError, match=r"9\*\*387420489 does not fit int64"):
        client.create_model(expression="9**9**9 * x", parameters={"x": 1.0})
    _alive(client)


def test_invalid_inputs(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    with pytest.raises(InvalidArgumentError, match="forward pass failed"):
        m.forward(torch.ones(3, 5))
    with pytest.raises(InvalidArgumentError, match="does not match the output shape"):
        m.backward(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(InvalidArgumentError, match="takes 1 input"):
        m.forward(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(InvalidArgumentError, match="needs a target"):
        m.backward(torch.ones(3, 2))
    with pytest.raises(InvalidArgumentError, match="model_id"):
        client.create_model(layers=LINEAR, model_id="../etc/passwd")
    # a byte length that does not match the shape, sent with the raw stub
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    bad = pb.ForwardRequest(model_id=m.id, inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2],
                                                             data=b"\0" * 12)])
    with pytest.raises(grpc.RpcError) as err:
        client._stub.Forward(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes" in err.value.details() and "needs 16" in err.value.details()
    params_before = m.parameters()
    with pytest.raises(InvalidArgumentError):
        m.set_parameters({"0.weight": torch.ones(1, 2), "0.bias": torch.ones(7)})
    after = m.parameters()  # all-or-nothing: the valid half was not applied
    assert all(torch.equal(params_before[k], after[k]) for k in after)
    _alive(client)


def test_resource_exhausted(make_server: Any) -> None:
    server = make_server(max_models=2, max_parameters=100)
    with Client(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(ResourceExhaustedError, match="max_parameters"):
            client.create_model(layers=[{"type": "Linear", "in_features": 100,
                                         "out_features": 100}])
        client.create_model(layers=LINEAR)
        client.create_model(layers=LINEAR)
        with pytest.raises(ResourceExhaustedError, match=r"limit \(max_models\) is 2"):
            client.create_model(layers=LINEAR)


def test_failed_precondition_evicted_graph(make_server: Any) -> None:
    server = make_server(max_graphs=2)
    with Client(f"127.0.0.1:{server.port}") as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0)
        first = m.forward(torch.ones(1, 2), retain_graph=True).forward_id
        for _ in range(2):
            m.forward(torch.ones(1, 2), retain_graph=True)
        assert m.refresh().retained_graphs == 2
        with pytest.raises(FailedPreconditionError, match="evicted"):
            m.backward(forward_id=first, target=torch.zeros(1, 1))


def test_failed_precondition_nothing_to_differentiate(client: Client) -> None:
    m = client.create_model(layers=[{"type": "ReLU"}], loss="mse")
    with pytest.raises(FailedPreconditionError, match="nothing to differentiate"):
        m.backward(torch.ones(2, 2), torch.zeros(2, 2))


class _BuggyEntryPoint:
    name = "buggy"

    @staticmethod
    def load() -> Any:
        class Buggy(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = nn.Parameter(torch.ones(1))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                outputs: dict[str, torch.Tensor] = {}
                return outputs["missing"]  # an operator's bug: KeyError

        return Buggy


def test_internal_error_is_generic_and_logged(client: Client, monkeypatch: Any,
                                              caplog: Any) -> None:
    monkeypatch.setattr(plugins, "available", lambda: {"buggy": _BuggyEntryPoint()})
    m = client.create_model(plugin="buggy")
    with caplog.at_level(logging.ERROR, logger="gradserve.rpc"), \
            pytest.raises(InternalError) as err:
        m.forward(torch.ones(1))
    assert "incident" in err.value.details
    assert "KeyError" not in err.value.details and "Traceback" not in err.value.details
    # ...but the server's log has the traceback, for the operator.
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
    _alive(client)


def test_client_changes_parameters_between_retained_forward_and_backward(client: Client) -> None:
    """A retained graph saved a parameter that SetParameters then changed in place: Backward
    refuses with INVALID_ARGUMENT, as local autograd raises, instead of using the new value."""
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 2},
                                    {"type": "Tanh"},
                                    {"type": "Linear", "in_features": 2, "out_features": 1}],
                            loss="mse", seed=0)
    fwd = m.forward(torch.ones(3, 2), retain_graph=True)
    m.set_parameters({"2.weight": torch.zeros(1, 2)})
    with pytest.raises(InvalidArgumentError, match="modified by an inplace operation"):
        m.backward(forward_id=fwd.forward_id, target=torch.zeros(3, 1))
    # Local autograd refuses the same sequence.
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    out = net(torch.ones(3, 2))
    with torch.no_grad():
        net[2].weight.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        nn.functional.mse_loss(out, torch.zeros(3, 1)).backward()
    # A new Forward works.
    assert m.backward(torch.ones(3, 2), torch.zeros(3, 1)).loss is not None
    _alive(client)


def test_expression_parameters_are_in_name_order(client: Client) -> None:
    """A proto map has no order: the parameters (optimizer, state_dict, clip_grad_norm's sum)
    are in name order, whatever order the caller wrote them in."""
    m = client.create_model(expression="sum(z * x + a * x + m)", inputs=["x"],
                            parameters={"z": 1.0, "m": 2.0, "a": 3.0})
    assert [p.name for p in m.info.parameters] == ["a", "m", "z"]
    assert list(m.parameters()) == ["a", "m", "z"]


@pytest.mark.parametrize("loss, target, want", [
    ({"type": "cross_entropy", "weight": [1.0, 2.0]}, torch.tensor([0, 1, 2, 0]),
     "spec.loss (cross_entropy).weight: 2 values for an output of 3 classes"),
    ({"type": "nll", "weight": [1.0]}, torch.tensor([0, 1, 2, 0]),
     "spec.loss (nll).weight: 1 values for an output of 3 classes"),
    ({"type": "bce_with_logits", "pos_weight": [1.0, 2.0]}, torch.rand(4, 3),
     "spec.loss (bce_with_logits).pos_weight: 2 values for an output of 3 classes"),
])
def test_client_gives_loss_weights_for_the_wrong_number_of_classes(
        client: Client, loss: dict[str, Any], target: torch.Tensor, want: str) -> None:
    """The classes are known at the first batch: the refusal names the loss's field, not the
    target (which is right), and the model is unchanged."""
    m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 3}],
                            loss=loss, optimizer="sgd", seed=0)
    before = m.parameters()
    with pytest.raises(InvalidArgumentError, match=re.escape(want)):
        m.backward(torch.randn(4, 2), target, step=True)
    assert all(torch.equal(before[k], v) for k, v in m.parameters().items())
    assert m.refresh().step == 0
    m.delete()


def test_client_sends_a_number_json_cannot_carry(client: Client) -> None:
    """A value beyond float64 in a spec is refused by the SDK naming the field, as the server
    would, not with a bare OverflowError."""
    with pytest.raises(InvalidArgumentError, match=r"loss\.weight: .*cannot travel as JSON"):
        client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 3}],
                            loss={"type": "cross_entropy", "weight": [1, 2, 10**400]})
    assert client.list_models() == []


def test_client_gives_an_integer_beyond_int64(client: Client) -> None:
    """An integer too large is out of range, not 'not an integer'."""
    with pytest.raises(InvalidArgumentError,
                       match=r"ignore_index: .* is out of range \(beyond int64\)"):
        client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 3}],
                            loss={"type": "cross_entropy", "ignore_index": 2**70})
