"""Property-based hardening: malformed specs, expressions, layers, tensors, options and oversize
messages. Every answer is a proper status with a useful message, and the server keeps answering.

A normal run tries a bounded number of examples per property (hypothesis profile "ci"). For a
long fuzzing session, select the "fuzz" profile (thousands of examples per property; the
per-test timeout is lifted too):

    GRADSERVE_FUZZ=1 python -m pytest tests/test_fuzz.py

hypothesis' own flag, `--hypothesis-profile=fuzz --timeout=0`, needs the profiles registered
before pytest configures hypothesis, i.e. from tests/conftest.py:
`from test_fuzz import register_profiles; register_profiles()`.
"""

from __future__ import annotations

import inspect
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from gradserve import Client, GradServeError
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer, build_server
from gradserve_server.catalog.layers import LAYERS
from gradserve_server.catalog.losses import LOSSES
from gradserve_server.catalog.optimizers import OPTIMIZERS
from gradserve_server.catalog.schedules import SCHEDULES
from gradserve_server.settings import Settings
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

FUZZ = os.environ.get("GRADSERVE_FUZZ", "") == "1"


def register_profiles() -> None:
    """'ci': bounded, for every test run; 'fuzz': thousands of examples per property."""
    quiet = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=40, deadline=None,
                              suppress_health_check=quiet)
    settings.register_profile("fuzz", max_examples=4000, deadline=None,
                              suppress_health_check=quiet)


register_profiles()
if FUZZ:
    settings.load_profile("fuzz")
elif settings.get_current_profile_name() == "default":  # --hypothesis-profile wins
    settings.load_profile("ci")
if FUZZ:
    pytestmark = pytest.mark.timeout(0)
# Examples each property tries (the profile loaded above), for scripts/hostile_census.py.
EXAMPLES_PER_PROPERTY = settings().max_examples
OVERSIZE_EXAMPLES = 24

# Small limits, so that oversize messages stay small and runaway specs are refused cheaply.
MESSAGE_MB, REQUEST_MB = 4, 2
MIB = 1024 * 1024
PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
# grpc answers a payload that does not parse as the request message itself, before any of our
# code runs, with INTERNAL and exactly this text (as grpc-go and grpc-java do).
GRPC_PARSE_ERROR = "Exception deserializing request!"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[GradServer]:
    """One server for every example of the module (hypothesis runs many per test)."""
    server, _port = build_server(Settings(
        port=0, metrics_port=-1, threads=8, max_message_mb=MESSAGE_MB, max_request_mb=REQUEST_MB,
        max_parameters=2_000_000, max_dataset_mb=4, max_models=64))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_client(fuzz_server: GradServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{fuzz_server.port}", timeout=30, retries=0) as c:
        yield c


class Probe:
    """A reference model that must keep answering with the same output after every example."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.model = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="probe")
        self.x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
        self.expected = self.model.forward(self.x)

    def alive(self) -> None:
        assert self.client.health() == "SERVING"
        assert torch.equal(self.model.forward(self.x), self.expected)


@pytest.fixture(scope="module")
def probe(fuzz_client: Client) -> Probe:
    return Probe(fuzz_client)


@pytest.fixture(scope="module")
def stub(fuzz_client: Client) -> Any:
    return fuzz_client._stub


# --------------------------------------------------------------------------------- checks


def check_status(code: grpc.StatusCode, details: str | None) -> None:
    """A proper status for bad input, with a message a caller can act on."""
    assert code in PROPER, f"{code.name}: {details}"
    assert details and details.strip(), f"{code.name} without a message"
    assert "Traceback" not in details and "incident" not in details, details


def answered(call: Callable[[], Any]) -> Any:
    """Run an SDK call: its result, or None after checking the error it raised."""
    try:
        return call()
    except GradServeError as exc:
        check_status(exc.code, exc.details)
        return None


def raw(call: Callable[[], Any]) -> Any:
    """Run a raw stub call: its reply, or None after checking its status."""
    try:
        return call()
    except grpc.RpcError as exc:
        check_status(exc.code(), exc.details())
        return None


def cleanup(client: Client, keep: frozenset[str] = frozenset({"probe", "target"})) -> None:
    for model in client.list_models():
        if model.id not in keep:
            model.delete()
    for dataset in client.list_datasets():
        client.delete_dataset(dataset.dataset_id)


# --------------------------------------------------------------------------------- strategies

def mostly(plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
           ) -> st.SearchStrategy[Any]:
    """Three parts plausible to one part hostile: deep paths get exercised as well."""
    return st.one_of(plausible, plausible, plausible, hostile)


# JSON values as a Struct carries them: NaN and infinities included (the wire allows them).
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
# Values a layer or optimizer argument usually takes.
plausible_values = st.one_of(
    st.integers(1, 4), st.booleans(), st.floats(0, 1), st.lists(st.integers(1, 3), min_size=1,
                                                                 max_size=3),
    st.sampled_from(["zeros", "reflect", "tanh", "none", "mean", 1e-3, 0.9, -1]))
arg_values = mostly(plausible_values, json_values)


def _arg_names(fn: Any) -> tuple[list[str], list[str]]:
    """(required, optional) keyword names of fn."""
    params = [p for n, p in inspect.signature(fn).parameters.items()
              if n not in ("self", "args", "kwargs")]
    return ([p.name for p in params if p.default is inspect.Parameter.empty],
            [p.name for p in params if p.default is not inspect.Parameter.empty])


def rarely(draw: st.DrawFn) -> bool:
    """True one time in ten: one hostile ingredient per layer at most, usually."""
    return draw(st.integers(0, 9)) == 0


@st.composite
def layer_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A layer of a known (or, rarely, made-up) type with its required arguments (rarely one
    missing), some optional ones, rarely forbidden or invented ones, each with any JSON value."""
    kind = draw(st.text(max_size=10) if rarely(draw) else st.sampled_from(sorted(LAYERS)))
    required, optional = _arg_names(LAYERS[kind].__init__) if kind in LAYERS else ([], [])
    keys = [k for k in required if not rarely(draw)]
    allowed = [k for k in optional if k not in ("device", "dtype", "inplace")]
    if allowed:
        keys += draw(st.lists(st.sampled_from(allowed), max_size=3))
    if rarely(draw):
        keys.append(draw(st.sampled_from(["device", "dtype", "inplace", "_weight", ""])
                         | st.text(max_size=8).filter(lambda k: k != "type")))
    return {"type": kind, **{k: draw(arg_values) for k in keys}}


def _small(value: Any) -> bool:
    """Only modest numbers: forward passes of such layers stay small (no huge outputs)."""
    if isinstance(value, dict):
        return all(_small(v) for v in value.values())
    if isinstance(value, list):
        return all(_small(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value) and abs(value) <= 32
    return True


FUNCTIONS = ["relu", "sigmoid", "tanh", "exp", "log", "log1p", "sin", "cos", "tan", "abs",
             "sqrt", "square", "sum", "mean", "matmul", "softplus", "clamp", "maximum", "minimum"]
TOKENS = [
    "x", "y", "u", "pi", "e", "2", "0.5", "1e308", "9", "0", "-", "+", "*", "/", "**", "@", "(",
    ")", ",", " ", "dim=", "keepdim=", "min=", "max=", "beta=", "True", *(f + "(" for f in FUNCTIONS),
    "__import__", "('os')", ".", "real", "__class__", "lambda", ":", "[", "]", " for ", " in ",
    " if ", " else ", "'s'", "{", "}", "==", " and ", "not ", ":=", "*x", "**{}", "f'{x}'",
    "\x00", "\n", "\\", "#", "...", "None", "open", "eval", "getattr", "globals",
]


@st.composite
def math_expressions(draw: st.DrawFn, depth: int = 0) -> str:
    """Mostly well-formed expressions over x, y and u, so that evaluation runs too."""
    if depth > 4 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(["x", "y", "u", "pi", "e", "2", "0.5", "1e308", "-1", "0",
                                     "9**9**9", "10**400"]))
    kind = draw(st.integers(0, 3))
    a = draw(math_expressions(depth + 1))
    if kind == 0:
        op = draw(st.sampled_from(["+", "-", "*", "/", "**", "@"]))
        return f"({a} {op} {draw(math_expressions(depth + 1))})"
    if kind == 1:
        return f"-{a}"
    fn = draw(st.sampled_from(FUNCTIONS))
    args = [a, *draw(st.lists(math_expressions(depth + 1), max_size=1))]
    keyword = draw(st.sampled_from(["", "dim=0", "dim=1", "dim=-1", "dim=(0, 0)", "keepdim=True",
                                    "min=0", "max=1e308", "beta=2", "dim=99", "dim=1.5"]))
    return f"{fn}({', '.join(args + ([keyword] if keyword else []))})"


expressions = st.one_of(
    math_expressions(), math_expressions(), math_expressions(),
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30).map("".join),
    st.text(max_size=200),
    st.integers(1, 3000).map(lambda n: "(" * n + "x" + ")" * n),          # deep nesting
    st.integers(1, 400).map(lambda n: "x" + "**9" * n),                   # huge exponents
    st.integers(4000, 6000).map(lambda n: ("x+" * n)[: n] + "x"),         # over 4096 characters
    st.integers(1, 5000).map(lambda n: "9" * n + " * x"),                 # huge literals
)

DTYPE_ENUMS = st.integers(-3, 14) | st.integers(-(2**31), 2**31 - 1)
shapes = st.lists(st.integers(0, 4), max_size=4) | st.lists(
    st.integers(-3, 3) | st.integers(-(2**63), 2**63 - 1), max_size=6) | st.lists(
    st.just(1), min_size=60, max_size=80)
special_floats = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e38, 1e-45])


@st.composite
def wire_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Tensors as a careless or hostile client would send them."""
    dtype = draw(DTYPE_ENUMS)
    shape = draw(shapes)
    itemsize = {1: 4, 2: 8, 3: 2, 4: 2, 5: 1, 6: 2, 7: 4, 8: 8, 9: 1, 10: 1}.get(dtype, 4)
    try:
        exact = math.prod(shape) * itemsize if all(d >= 0 for d in shape) else -1
    except OverflowError:
        exact = -1
    if 0 <= exact <= 4096 and draw(st.booleans()):
        if dtype == pb.DTYPE_FLOAT32 and exact and draw(st.booleans()):
            values = draw(st.lists(special_floats, min_size=exact // 4, max_size=exact // 4))
            data = struct.pack(f"<{len(values)}f", *values)
        else:
            data = draw(st.binary(min_size=exact, max_size=exact))
    else:
        data = draw(st.binary(max_size=64))  # almost never the right length
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


# --------------------------------------------------------------------------------- specs


@given(text=expressions, inputs=st.sampled_from([[], ["u"], ["u", "u"], ["x"], ["_u"]]),
       x=st.sampled_from([1.5, [1.0, -2.0], [[1.0, 2.0], [3.0, 4.0]], math.nan, []]))
@example(text="__import__('os').system('echo hacked')", inputs=[], x=1.0)
@example(text="x.__class__.__mro__", inputs=[], x=1.0)
@example(text="(lambda: x)()", inputs=[], x=1.0)
@example(text="[v for v in x]", inputs=[], x=1.0)
@example(text="x**9**9**9**9", inputs=[], x=2.0)
@example(text="-(" * 200 + "x" + ")" * 200, inputs=[], x=1.0)
@example(text="x" + " + x" * 1500, inputs=[], x=1.0)
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_expressions(fuzz_client: Client, probe: Probe, text: str, inputs: list[str],
                     x: Any) -> None:
    """Any text as an expression: refused with INVALID_ARGUMENT, or it builds and evaluates."""
    m = answered(lambda: fuzz_client.create_model(expression=text, inputs=inputs,
                                                  parameters={"x": x, "y": -0.5}))
    event(f"created: {m is not None}")
    if m is not None:
        if inputs == ["u"]:
            answered(lambda: m.forward(torch.tensor([0.5, 2.0])))
            answered(lambda: m.backward(torch.tensor([0.5, 2.0]), return_grads=True))
        else:
            answered(lambda: m.backward(return_grads=True))
            answered(lambda: m.step())
        m.delete()
    probe.alive()


@given(layers=st.lists(layer_dicts(), min_size=1, max_size=3) | st.just([]),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       integral=st.booleans())
@example(layers=[{"type": "BatchNorm1d", "num_features": 3e9, "affine": False}], shape=[2, 3],
         integral=False)
@example(layers=[{"type": "MaxPool1d", "kernel_size": 2**31 - 1, "stride": 1}], shape=[1, 2, 2],
         integral=False)
@example(layers=[{"type": "GroupNorm", "num_groups": 0, "num_channels": 4}], shape=[2, 4],
         integral=False)
@example(layers=[{"type": "Linear", "in_features": math.nan, "out_features": 1}], shape=[1, 1],
         integral=False)
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_layer_specs(fuzz_client: Client, probe: Probe, layers: list[dict[str, Any]],
                     shape: list[int], integral: bool) -> None:
    """Random layer types and keyword arguments (any JSON value): refused with a proper status,
    or built; a built model with modest numbers also runs forward and backward."""
    m = answered(lambda: fuzz_client.create_model(layers=layers, loss="mse", seed=0))
    event(f"created: {m is not None}")
    if m is not None:
        if all(_small(layer) for layer in layers):
            x = (torch.randint(0, 3, shape) if integral
                 else torch.linspace(-2, 2, math.prod(shape)).reshape(shape))
            out = answered(lambda: m.forward(x))
            event(f"forward ran: {out is not None}")
            if out is not None:
                answered(lambda: m.backward(x, torch.zeros_like(out), step=True))
        m.delete()
    probe.alive()


@given(
    loss=mostly(st.sampled_from(sorted(LOSSES)), st.text(max_size=8)),
    reduction=mostly(st.sampled_from(["", "mean", "sum"]), st.sampled_from(["none", "avg"])),
    loss_kwargs=st.dictionaries(st.sampled_from(["beta", "delta", "label_smoothing",
                                                 "ignore_index", "weight", "reduce"]),
                                arg_values, max_size=2),
    optimizer=mostly(st.sampled_from(sorted(OPTIMIZERS)), st.text(max_size=8)),
    opt_params=st.dictionaries(st.sampled_from(["lr", "momentum", "betas", "eps", "nesterov",
                                                "weight_decay", "maximize", "foreach", "params",
                                                "alpha", "centered", "lr_decay"]),
                               arg_values, max_size=3),
    seed=st.none() | st.integers(0, 2**64 - 1),
    dtype=mostly(st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
                 st.sampled_from(["int32", "bool"])),
    frozen=st.lists(mostly(st.sampled_from(["0.weight", "0.bias"]),
                           st.sampled_from(["nope", ""]) | st.text(max_size=5)), max_size=2),
    initial=st.dictionaries(st.sampled_from(["0.weight", "0.bias", "1.weight"]),
                            st.sampled_from([[1.0, 2.0], [[1.0, 2.0]], [0.5], 3, [[True, False]],
                                             [math.nan, math.inf]]), max_size=2),
    model_id=mostly(st.just(""), st.text(max_size=140)),
)
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_model_specs(fuzz_client: Client, probe: Probe, loss: str, reduction: str,
                     loss_kwargs: dict[str, Any], optimizer: str, opt_params: dict[str, Any],
                     seed: int | None, dtype: str, frozen: list[str],
                     initial: dict[str, Any], model_id: str) -> None:
    """Losses, optimizers, seeds, dtypes, frozen names, initial values and ids in any
    combination: refused with a proper status, or the model trains one step."""
    assume(model_id not in ("probe", "target"))
    m = answered(lambda: fuzz_client.create_model(
        layers=LINEAR, loss={"type": loss, "reduction": reduction, **loss_kwargs},
        optimizer={"type": optimizer, **opt_params}, seed=seed, dtype=dtype, frozen=frozen,
        initial_parameters=initial, model_id=model_id))
    event(f"created: {m is not None}")
    if m is not None:
        answered(lambda: m.backward(torch.ones(3, 2), torch.zeros(3, 1), step=True))
        answered(lambda: m.backward(torch.ones(3, 2), torch.tensor([0, 1, 0]), step=True))
        m.delete()
    probe.alive()


@given(dtype=DTYPE_ENUMS, layers=st.integers(0, 2), which=st.integers(0, 3),
       parameters=st.dictionaries(st.text(max_size=6), wire_tensors(), max_size=2))
@pytest.mark.hostile("bytes that are not protobuf", inputs=EXAMPLES_PER_PROPERTY)
def test_raw_specs(stub: Any, probe: Probe, dtype: int, layers: int, which: int,
                   parameters: dict[str, pb.Tensor]) -> None:
    """Specs only the wire can express: unknown dtype enums, empty or several sources, and
    expression parameters or initial values with any dtype, shape and byte length."""
    spec = pb.ModelSpec(dtype=dtype)
    if which == 0:
        spec.layers.layers.extend([pb.Layer(type="Linear")] * layers)
    elif which == 1:
        spec.expression.expression = " + ".join(parameters) or "1"
        for name, t in parameters.items():
            spec.expression.parameters[name].CopyFrom(t)
    elif which == 2:
        spec.plugin.name = "mlp"
    for name, t in parameters.items():
        spec.initial_parameters[name].CopyFrom(t)
    reply = raw(lambda: stub.CreateModel(pb.CreateModelRequest(spec=spec)))
    if reply is not None:
        stub.DeleteModel(pb.DeleteModelRequest(model_id=reply.model_id))
    probe.alive()


# --------------------------------------------------------------------------------- tensors


@pytest.fixture(scope="module")
def target(fuzz_client: Client) -> Any:
    """The model the tensor properties send their inputs to (its parameters may drift)."""
    return fuzz_client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="target")


@given(inputs=st.lists(wire_tensors(), max_size=2), target_=st.none() | wire_tensors(),
       grad=st.none() | wire_tensors(), retain=st.booleans(), step=st.booleans(),
       flags=st.lists(st.booleans(), min_size=3, max_size=3))
@example(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2])], target_=pb.Tensor(
    dtype=pb.DTYPE_FLOAT32, shape=[0, 1]), grad=None, retain=True, step=True,
    flags=[True, True, True])
@example(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 70 + [2], data=bytes(8))],
         target_=None, grad=None, retain=False, step=False, flags=[False, False, False])
@pytest.mark.hostile("bytes that are not protobuf", inputs=EXAMPLES_PER_PROPERTY)
def test_wire_tensors(stub: Any, probe: Probe, target: Any, inputs: list[pb.Tensor],
                      target_: pb.Tensor | None, grad: pb.Tensor | None, retain: bool,
                      step: bool, flags: list[bool]) -> None:
    """Any dtype enum, shape and byte length, NaN/inf and empty tensors in Forward and Backward
    (fused and retained): a result or a proper status."""
    fwd = raw(lambda: stub.Forward(pb.ForwardRequest(model_id=target.id, inputs=inputs,
                                                     retain_graph=retain)))
    req = pb.BackwardRequest(model_id=target.id, step=step, return_grads=flags[0],
                             return_input_grads=flags[1], return_output=flags[2])
    if fwd is not None and fwd.forward_id:
        req.forward_id = fwd.forward_id
    else:
        req.inputs.extend(inputs)
    if target_ is not None:
        req.target.CopyFrom(target_)
    if grad is not None:
        req.grad_output.CopyFrom(grad)
    raw(lambda: stub.Backward(req))
    probe.alive()


@given(values=st.dictionaries(st.sampled_from(["0.weight", "0.bias", "1.weight", ""]),
                              wire_tensors(), min_size=1, max_size=2))
@example(values={"0.weight": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=bytes(8)),
                 "0.bias": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[7], data=bytes(28))})
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_set_parameters_all_or_nothing(stub: Any, probe: Probe, target: Any,
                                       values: dict[str, pb.Tensor]) -> None:
    """SetParameters with malformed tensors: refused as a whole (nothing written), or applied."""
    before = target.parameters()
    reply = raw(lambda: stub.SetParameters(pb.SetParametersRequest(model_id=target.id,
                                                                   parameters=values)))
    if reply is None:
        after = target.parameters()
        assert all(torch.equal(before[k], after[k]) for k in before)
    probe.alive()


# --------------------------------------------------------------------------------- training


any_float = st.floats(allow_nan=True, allow_infinity=True)


@given(
    n=mostly(st.integers(1, 6), st.just(0)), features=mostly(st.just(2), st.just(3)),
    target_shift=mostly(st.just(0), st.integers(-2, 2)),
    epochs=st.integers(0, 3), max_steps=st.integers(0, 5),
    batch_size=mostly(st.integers(0, 7), st.just(2**32 - 1)), shuffle=st.booleans(),
    seed=mostly(st.integers(0, 100), st.integers(0, 2**64 - 1)), drop_last=st.booleans(),
    stop_loss=mostly(st.none() | st.floats(0, 1), any_float),
    accumulation=mostly(st.integers(0, 3), st.just(2**32 - 1)),
    clip=mostly(st.just(0.0) | st.floats(0.1, 10), any_float),
    schedule=mostly(st.sampled_from(["", "none", *sorted(SCHEDULES)]), st.text(max_size=6)),
    schedule_params=mostly(
        st.fixed_dictionaries({}, optional={"step_size": st.integers(1, 3),
                                            "gamma": st.floats(0.1, 1), "eta_min": st.just(0.0),
                                            "start_factor": st.floats(0.1, 1)}),
        st.dictionaries(st.sampled_from(["step_size", "gamma", "t_max", "eta_min",
                                         "start_factor", "end_factor", "total_iters",
                                         "last_epoch"]), json_values, max_size=2)),
    warmup=mostly(st.integers(0, 3), st.just(2**32 - 1)),
    warmup_factor=mostly(st.just(0.0) | st.floats(0.01, 1), any_float),
    log_every=st.integers(0, 2), skip_nonfinite=st.booleans(),
    nan_data=mostly(st.just(False), st.just(True)),
)
@example(n=4, features=2, target_shift=0, epochs=3, max_steps=0, batch_size=2, shuffle=True,
         seed=2**64 - 1, drop_last=False, stop_loss=None, accumulation=1, clip=0.0,
         schedule="step", schedule_params={"step_size": 0}, warmup=0, warmup_factor=0.0,
         log_every=1, skip_nonfinite=False, nan_data=False)
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_train_options(stub: Any, fuzz_client: Client, probe: Probe, n: int, features: int,
                       target_shift: int, epochs: int, max_steps: int, batch_size: int,
                       shuffle: bool, seed: int, drop_last: bool, stop_loss: float | None,
                       accumulation: int, clip: float, schedule: str,
                       schedule_params: dict[str, Any], warmup: int, warmup_factor: float,
                       log_every: int, skip_nonfinite: bool, nan_data: bool) -> None:
    """Train with any options and small, possibly inconsistent, data: the stream ends with OK
    or a proper status, and the model is released afterwards."""
    target_n = max(0, n + target_shift)
    m = fuzz_client.create_model(layers=LINEAR, loss="mse", seed=0)
    x = torch.full((n, features), math.nan) if nan_data else torch.ones(n, features)
    opts = pb.TrainOptions(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, shuffle=shuffle, seed=seed,
        drop_last=drop_last, accumulation_steps=accumulation, clip_grad_norm=clip,
        log_every_steps=log_every, skip_nonfinite=skip_nonfinite,
        schedule=pb.ScheduleSpec(type=schedule, warmup_steps=warmup,
                                 warmup_start_factor=warmup_factor))
    opts.schedule.params.update(schedule_params)
    if stop_loss is not None:
        opts.stop_loss = stop_loss
    data = pb.InlineData(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n, features],
                                           data=x.numpy().tobytes())],
                         target=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[target_n, 1],
                                          data=bytes(4 * target_n)))
    events = raw(lambda: list(stub.Train(pb.TrainRequest(
        model_id=m.id, data=pb.DataSource(inline=data), options=opts), timeout=60)))
    event(f"trained: {bool(events)}")
    if events:
        assert events[-1].kind == pb.EVENT_KIND_DONE
    info = m.wait_idle()
    assert not info.training
    m.delete()
    probe.alive()


@given(headers=st.lists(st.tuples(DTYPE_ENUMS, shapes), min_size=0, max_size=2),
       target_header=st.none() | st.tuples(DTYPE_ENUMS, shapes),
       chunks=st.lists(st.binary(max_size=64), max_size=4), header_twice=st.booleans(),
       dataset_id=st.just("") | st.text(max_size=20))
@pytest.mark.hostile("specs, options, ids", inputs=EXAMPLES_PER_PROPERTY)
def test_upload_headers(stub: Any, fuzz_client: Client, probe: Probe,
                        headers: list[tuple[int, list[int]]],
                        target_header: tuple[int, list[int]] | None, chunks: list[bytes],
                        header_twice: bool, dataset_id: str) -> None:
    """UploadDataset with any declared dtypes and shapes and chunks of any length."""
    header = pb.DatasetHeader(dataset_id=dataset_id, inputs=[
        pb.TensorHeader(dtype=d, shape=s) for d, s in headers])
    if target_header is not None:
        header.target.CopyFrom(pb.TensorHeader(dtype=target_header[0], shape=target_header[1]))
    messages = [pb.UploadDatasetRequest(header=header)] * (2 if header_twice else 1)
    messages += [pb.UploadDatasetRequest(chunk=c) for c in chunks]
    raw(lambda: stub.UploadDataset(iter(messages)))
    cleanup(fuzz_client)
    probe.alive()


# --------------------------------------------------------------------------------- wire


def _base_messages(model_id: str) -> dict[str, bytes]:
    x = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=bytes(8))
    y = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 1], data=bytes(4))
    return {
        "Forward": pb.ForwardRequest(model_id=model_id, inputs=[x]).SerializeToString(),
        "Backward": pb.BackwardRequest(model_id=model_id, inputs=[x],
                                       target=y).SerializeToString(),
        "SetParameters": pb.SetParametersRequest(
            model_id=model_id, parameters={"0.bias": pb.Tensor(
                dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4))}).SerializeToString(),
        "GetParameters": pb.GetParametersRequest(model_id=model_id).SerializeToString(),
        "CreateModel": pb.CreateModelRequest(spec=pb.ModelSpec(layers=pb.LayersSource(
            layers=[pb.Layer(type="ReLU")]))).SerializeToString(),
    }


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid message with bytes flipped, cut, inserted or appended; or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 3))
        if kind == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == 1:
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@given(data=st.data(), method=st.sampled_from(["Forward", "Backward", "SetParameters",
                                               "GetParameters", "CreateModel"]))
@pytest.mark.hostile("bytes that are not protobuf", inputs=EXAMPLES_PER_PROPERTY)
def test_mutated_wire_bytes(fuzz_client: Client, probe: Probe, target: Any,
                            data: st.DataObject, method: str) -> None:
    """Mutated and random request bytes: a proper status, grpc's own parse error, or a result
    for bytes that still form a valid request."""
    payload = data.draw(mutated(_base_messages(target.id)[method]))
    call = fuzz_client._channel.unary_unary(f"/gradserve.v1.GradientService/{method}")
    try:
        call(payload, timeout=30)
    except grpc.RpcError as exc:
        if not (exc.code() == grpc.StatusCode.INTERNAL and exc.details() == GRPC_PARSE_ERROR):
            check_status(exc.code(), exc.details())
    cleanup(fuzz_client)
    probe.alive()


# --------------------------------------------------------------------------------- size


def _oversize(rpc: str, model_id: str, nbytes: int) -> Callable[[Any], Any]:
    n = nbytes // 4
    big = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=bytes(4 * n))
    if rpc == "Forward":
        return lambda s: s.Forward(pb.ForwardRequest(model_id=model_id, inputs=[big]))
    if rpc == "Backward":
        return lambda s: s.Backward(pb.BackwardRequest(model_id=model_id, inputs=[big]))
    if rpc == "SetParameters":
        return lambda s: s.SetParameters(pb.SetParametersRequest(model_id=model_id,
                                                                 parameters={"0.weight": big}))
    if rpc == "CreateModel":
        return lambda s: s.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(
            expression=pb.ExpressionSource(expression="sum(w)", parameters={"w": big}))))
    if rpc == "Train":
        return lambda s: list(s.Train(pb.TrainRequest(model_id=model_id, data=pb.DataSource(
            inline=pb.InlineData(inputs=[big])))))
    return lambda s: list(s.TrainStream(iter([
        pb.TrainStreamRequest(config=pb.TrainStreamConfig(model_id=model_id)),
        pb.TrainStreamRequest(batch=pb.InlineData(inputs=[big]))])))


@settings(max_examples=OVERSIZE_EXAMPLES)  # 12 kinds of oversize request, a few sizes each
@given(rpc=st.sampled_from(["Forward", "Backward", "SetParameters", "CreateModel", "Train",
                            "TrainStream"]),
       over=st.sampled_from(["request", "message"]), extra=st.integers(4, 256 * 1024))
@pytest.mark.hostile("memory", inputs=OVERSIZE_EXAMPLES)
def test_oversize_messages(stub: Any, probe: Probe, target: Any, rpc: str, over: str,
                           extra: int) -> None:
    """Bigger than --max-request-mb: our RESOURCE_EXHAUSTED naming the limit; bigger than
    --max-message-mb: grpc's own RESOURCE_EXHAUSTED. Either way the server goes on."""
    limit = (REQUEST_MB if over == "request" else MESSAGE_MB) * MIB
    with pytest.raises(grpc.RpcError) as err:
        _oversize(rpc, target.id, limit + extra)(stub)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    details = err.value.details()
    if over == "request":
        assert f"(max_request_mb) is {REQUEST_MB} MiB" in details, details
    else:
        assert "larger than max" in details and str(MESSAGE_MB * MIB) in details, details
    assert not target.refresh().training
    probe.alive()


@pytest.mark.hostile("bytes that are not protobuf")
def test_long_quotes_are_clipped(stub: Any, probe: Probe) -> None:
    """A message quoting a huge id stays small enough for the status header: the caller gets
    the real error (NOT_FOUND), not a header-size failure."""
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(pb.ForwardRequest(model_id="\N{SNOWMAN}" * 20_000))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().endswith("(truncated)")
    probe.alive()


@pytest.mark.hostile("specs, options, ids")
def test_schedule_arguments_checked_before_the_run(fuzz_client: Client, probe: Probe) -> None:
    """Schedule arguments torch only trips over while stepping are refused up front; the
    documented default cosine t_max works."""
    m = fuzz_client.create_model(layers=LINEAR, loss="mse", seed=0)
    x, y = torch.ones(4, 2), torch.zeros(4, 1)
    for schedule, needle in [({"type": "step", "step_size": 0}, "step_size"),
                             ({"type": "cosine", "t_max": 0}, "T_max"),
                             ({"type": "exponential", "gamma": "fast"}, "expected a number")]:
        with pytest.raises(GradServeError, match=needle) as err:
            list(m.train(x, y, epochs=2, schedule=schedule))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    events = list(m.train(x, y, epochs=3, batch_size=2, schedule="cosine"))
    assert events[-1].summary.steps == 6
    assert m.refresh().step == 6
    probe.alive()
