"""Hostile and careless specs, headers, flags, token files and ids: each is refused with the right
code and a message naming the field, never INTERNAL, and the server keeps answering.

The catalog sweep at the end tries hostile values for every argument of every layer, loss,
optimizer, schedule and the example plugin at the core (a GradServeFault is a proper status on the wire;
anything else would be INTERNAL). GRADSERVE_FUZZ=1 widens it to more values and inputs.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gradserve import (
    Client,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.catalog.layers import LAYERS
from gradserve_server.catalog.losses import LOSSES
from gradserve_server.catalog.optimizers import OPTIMIZERS
from gradserve_server.catalog.schedules import SCHEDULES, build_schedule
from gradserve_server.core.errors import GradServeFault, StartupError
from gradserve_server.core.hooks import Hooks
from gradserve_server.core.limits import Limits
from gradserve_server.core.model import Model
from gradserve_server.core.spec import ModelSpec
from gradserve_server.settings import Settings, build_parser, env_name
from gradserve_server.tokens import SCOPES_ALL, load_tokens

FUZZ = os.environ.get("GRADSERVE_FUZZ", "") == "1"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def _others_still_served(server: Any) -> None:
    """Another client lists models and trains a tiny one."""
    with Client(f"127.0.0.1:{server.port}", timeout=30) as other:
        assert other.health() == "SERVING"
        other.list_models()
        m = other.create_model(layers=LINEAR, loss="mse", seed=0)
        assert m.backward(torch.ones(3, 2), torch.zeros(3, 1), step=True).step == 1
        m.delete()


def _refused(call: Any, *needles: str) -> str:
    with pytest.raises(InvalidArgumentError) as err:
        call()
    for needle in needles:
        assert needle in err.value.details, err.value.details
    return str(err.value.details)


# ---------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec, needles", [
    ({"plugin": "mlp", "plugin_kwargs": {"in_features": -5, "hidden": [3], "out_features": 1}},
     ["spec.plugin (mlp).in_features: -5 is out of range; must be >= 1"]),
    ({"plugin": "mlp", "plugin_kwargs": {"in_features": 2, "hidden": [3, 0], "out_features": 1}},
     ["spec.plugin (mlp).hidden: [3, 0] is out of range; each number must be >= 1"]),
    ({"layers": LINEAR, "optimizer": {"type": "adam", "betas": [0.9]}},
     ["spec.optimizer (adam).betas: expected a list of 2 items", "got [0.9]"]),
    ({"layers": LINEAR, "optimizer": {"type": "adam", "betas": [0.9, 1.5]}},
     ["spec.optimizer (adam).betas: [0.9, 1.5] is out of range; each number must be in [0, 1)"]),
    ({"layers": LINEAR, "optimizer": {"type": "sgd", "weight_decay": True}},
     ["spec.optimizer (sgd).weight_decay: expected a number, got True"]),
    ({"layers": LINEAR, "optimizer": {"type": "sgd", "lr": 1e300}},
     ["spec.optimizer (sgd).lr: 1e+300 is out of range (beyond int64 or float32)"]),
    ({"layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 3,
                  "stride": 0}]},
     ["spec.layers[0] (Conv2d).stride: 0 is out of range; must be >= 1"]),
    ({"layers": LINEAR, "loss": {"type": "huber", "delta": -1}},
     ["spec.loss (huber).delta: -1.0 is out of range; must be > 0"]),
    ({"layers": LINEAR, "loss": {"type": "cross_entropy", "label_smoothing": 2}},
     ["spec.loss (cross_entropy).label_smoothing: 2.0 is out of range; must be in [0, 1]"]),
    ({"layers": [{"type": "Linear", "in_features": True, "out_features": 1}]},
     ["spec.layers[0] (Linear).in_features: expected an integer, got True"]),
    ({"layers": [{"type": "Linear", "in_features": 2.5, "out_features": 1}]},
     ["spec.layers[0] (Linear).in_features: expected an integer, got 2.5"]),
    ({"layers": [{"type": "Linear", "in_features": 2, "out_features": 1, "bias": 1}]},
     ["spec.layers[0] (Linear).bias: expected true or false"]),
    ({"layers": [{"type": "Hardtanh", "max_value": 1e300}]},
     ["spec.layers[0] (Hardtanh).max_value: 1e+300 is out of range"]),
    ({"layers": [{"type": "Conv1d", "in_channels": 1, "out_channels": 1, "kernel_size": 2,
                  "padding_mode": "mirror"}]},
     [("spec.layers[0] (Conv1d).padding_mode: expected one of ['zeros', 'reflect', "
       "'replicate', 'circular'], got 'mirror'")]),
], ids=["mlp-negative-in", "mlp-zero-hidden", "adam-one-beta", "adam-beta-above-one",
        "sgd-bool-decay", "sgd-huge-lr", "conv-stride-zero", "huber-negative-delta",
        "label-smoothing-two", "linear-true-features", "linear-fraction-features",
        "linear-int-bias", "hardtanh-huge", "conv-unknown-padding-mode"])
@pytest.mark.hostile("specs, options, ids")
def test_client_sends_nonsensical_constructor_arguments(make_server: Any, spec: dict[str, Any],
                                                        needles: list[str]) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        _refused(lambda: client.create_model(**spec), *needles)
        assert client.list_models() == []
    _others_still_served(server)


@pytest.mark.parametrize("name", ["training", "expr", "input_names", "forward", "T_destination"])
@pytest.mark.hostile("specs, options, ids")
def test_client_names_expression_parameters_after_module_attributes(make_server: Any,
                                                                     name: str) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        _refused(lambda: client.create_model(expression=f"sum({name} * x)", inputs=["x"],
                                              parameters={name: 1.0}),
                 f"spec.expression.parameters: {name!r} is reserved")
        _refused(lambda: client.create_model(expression=f"sum({name})", inputs=[name]),
                 f"spec.expression.inputs: {name!r} is reserved")
    _others_still_served(server)


@pytest.mark.hostile("specs, options, ids")
def test_client_uses_ids_with_a_trailing_newline(make_server: Any) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        _refused(lambda: client.create_model(layers=LINEAR, model_id="model\n"),
                 "model_id: 'model\\n' is not a valid id")
        _refused(lambda: client.upload_dataset(torch.ones(2, 1), dataset_id="data\n"),
                 "header.dataset_id: 'data\\n' is not a valid id")
        assert client.list_models() == [] and client.list_datasets() == []
    _others_still_served(server)


@pytest.mark.hostile("specs, options, ids")
def test_client_asks_for_sparse_embedding_gradients(make_server: Any) -> None:
    """Embedding(sparse=True) built and ran, then every Backward that returned gradients, every
    Adam step, GetParameters(grads) and checkpoints failed with INTERNAL: sparse gradients have
    no wire form, no checkpoint form and most optimizers refuse them. Refused at creation, for
    layer specs and for exported programs alike."""
    from torch import nn

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(10, 3, sparse=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.e(x).sum(1)

    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        _refused(lambda: client.create_model(
            layers=[{"type": "Embedding", "num_embeddings": 10, "embedding_dim": 3,
                     "sparse": True}], loss="mse"),
            "spec.layers[0] (Embedding).sparse", "sparse gradients")
        _refused(lambda: client.create_model(module=Bag(), example_inputs=torch.tensor(
            [[1, 2], [3, 4]]), loss="mse"), "sparse gradients")
        assert client.list_models() == []
        dense = client.create_model(layers=[{"type": "Embedding", "num_embeddings": 10,
                                             "embedding_dim": 3, "sparse": False}],
                                    loss="mse", optimizer={"type": "adam"}, seed=0)
        r = dense.backward(torch.tensor([[1, 2]]), torch.zeros(1, 2, 3), return_grads=True,
                           step=True)
        assert r.grads["0.weight"].shape == (10, 3)
    _others_still_served(server)


@pytest.mark.hostile("specs, options, ids")
def test_client_trains_an_objective_for_two_to_the_63_steps(make_server: Any) -> None:
    """max_steps of 2**63 and more: Python's len() of the step range overflowed after the first
    step, and the run ended with INTERNAL. The run now goes on until it is cancelled."""
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        e = client.create_model(expression="(w - 3)**2", parameters={"w": 0.0},
                                optimizer={"type": "sgd", "lr": 0.1})
        for max_steps in (2**63, 2**64 - 1):
            stream = client._stub.Train(pb.TrainRequest(model_id=e.id, options=pb.TrainOptions(
                max_steps=max_steps, log_every_steps=2)), timeout=30)
            first = next(iter(stream))
            assert first.kind == pb.EVENT_KIND_PROGRESS and first.run_step == 2
            stream.cancel()
            e.wait_idle()
        # A bounded run with an event at every step still ends by itself.
        done = list(e.train(max_steps=7, log_every_steps=1))[-1]
        assert done.summary.stop_reason == "max_steps" and done.summary.steps == 7
    _others_still_served(server)


# ---------------------------------------------------------------------- dataset headers


def _upload(stub: Any, header: pb.DatasetHeader | None, chunks: list[bytes],
            header_again: bool = False) -> grpc.RpcError:
    def requests() -> Any:
        if header is not None:
            yield pb.UploadDatasetRequest(header=header)
        for chunk in chunks:
            yield pb.UploadDatasetRequest(chunk=chunk)
        if header_again and header is not None:
            yield pb.UploadDatasetRequest(header=header)

    with pytest.raises(grpc.RpcError) as err:
        stub.UploadDataset(requests(), timeout=30)
    return err.value


def _header(dtype: int, shape: list[int]) -> pb.DatasetHeader:
    return pb.DatasetHeader(inputs=[pb.TensorHeader(dtype=dtype, shape=shape)])


F32 = pb.DTYPE_FLOAT32
# What a client might send where the SDK would have refused a complex, uint64 or str array
# (the wire has no such dtypes) and other headers and chunks the server cannot use.
BAD_UPLOADS = {
    "unset-dtype": (_header(pb.DTYPE_UNSPECIFIED, [2]), [bytes(8)], "header.inputs[0].dtype"),
    "complex-like-dtype": (_header(40, [2]), [bytes(16)], "unknown dtype enum value 40"),
    "uint64-like-dtype": (_header(99, [2]), [bytes(16)], "unknown dtype enum value 99"),
    "negative-dim": (_header(F32, [2, -1]), [], "negative dimension"),
    "65-dims": (_header(F32, [1] * 65), [bytes(4)], "at most 64 dimensions"),
    "exabyte-shape": (_header(F32, [2**62, 2**62]), [bytes(8)], "1099511627776 elements"),
    "no-sample-dim": (_header(F32, []), [bytes(4)], "sample dimension"),
    "too-many-bytes": (_header(F32, [2]), [bytes(12)], "more bytes than the header declares"),
    "too-few-bytes": (_header(F32, [2]), [bytes(4)], "received 4 bytes; the header declares 8"),
    "chunk-first": (None, [bytes(8)], "the first UploadDataset message must be a header"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
@pytest.mark.hostile("specs, options, ids")
def test_client_uploads_a_header_or_chunks_the_server_cannot_hold(
        make_server: Any, caplog: Any, case: str) -> None:
    header, chunks, needle = BAD_UPLOADS[case]
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        with caplog.at_level(logging.ERROR, logger="gradserve"):
            err = _upload(client._stub, header, chunks)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert needle in err.details(), err.details()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback
        assert client.list_datasets() == []
    _others_still_served(server)


@pytest.mark.hostile("specs, options, ids")
def test_client_sends_a_second_header_after_chunks(make_server: Any) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        err = _upload(client._stub, _header(F32, [2]), [bytes(8)], header_again=True)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "only chunks may follow the header" in err.details()
        assert client.list_datasets() == []
    _others_still_served(server)


# ---------------------------------------------------------------------- flags


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _numeric_flags() -> int:
    """The out-of-range values the test below sends: below and above each bound, as a flag and
    as an environment variable."""
    bounds = [("max" in f.metadata) + 1 for f in fields(Settings)
              if str(f.type) in ("int", "float")]
    return 2 * sum(bounds)


@pytest.mark.parametrize("argv, needle", [
    (["--max-models", "-1"], "--max-models (or GRADSERVE_MAX_MODELS) -1: expected an integer in [1, 9007199254740992]"),
    (["--grace-seconds", "-5"],
     "--grace-seconds (or GRADSERVE_GRACE_SECONDS) -5.0: expected a number in [0, 31536000]"),
    (["--graph-ttl-s", "nan"],
     "--graph-ttl-s (or GRADSERVE_GRAPH_TTL_S) nan: expected a number in (0, 31536000]"),
    (["--port", "70000"], "--port (or GRADSERVE_PORT) 70000: expected an integer in [0, 65535]"),
    (["--max-message-mb", "2048"], "expected an integer in [1, 2047]"),
    (["--max-memory-mb", "-1"], "--max-memory-mb (or GRADSERVE_MAX_MEMORY_MB) -1"),
])
@pytest.mark.hostile("flags (operator)")
def test_operator_starts_the_server_with_an_out_of_range_flag(capsys: Any, argv: list[str],
                                                              needle: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        Settings.load(argv, {})
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.hostile("flags (operator)", inputs=_numeric_flags())
def test_every_numeric_flag_states_and_checks_its_range(capsys: Any) -> None:
    """Table-driven: every int/float field declares a range in its metadata, and a value just
    outside it is refused, from the flag and from the environment alike."""
    for f in fields(Settings):
        if str(f.type) not in ("int", "float"):
            continue
        lo, above, hi = (f.metadata.get(k) for k in ("min", "above", "max"))
        floor = lo - 1 if lo is not None else above
        assert floor is not None, f"{f.name} declares no lower bound"
        bad: list[float] = [floor] + ([hi + 1] if hi is not None else [])
        for value in bad:
            text = str(int(value) if str(f.type) == "int" else float(value))
            for argv, env in (([_flag(f.name), text], {}), ([], {env_name(f.name): text})):
                with pytest.raises(SystemExit):
                    Settings.load(argv, env)
                err = capsys.readouterr().err
                assert f"{_flag(f.name)} (or {env_name(f.name)})" in err, (f.name, err)
        Settings.load([_flag(f.name), str(f.default)], {})  # the default itself is in range


def test_help_lists_every_flag_whatever_its_text() -> None:
    """--help formats every field's help (argparse %-formats it: a bare % once broke it)."""
    text = build_parser().format_help()
    for f in fields(Settings):
        assert _flag(f.name) in text and env_name(f.name) in text


# ---------------------------------------------------------------------- token files


@pytest.mark.hostile("auth, tokens, TLS")
def test_operator_glues_a_hash_into_a_token(make_server: Any, tmp_path: Path) -> None:
    """`s3cr#et-readonly read` is the token s3cr#et-readonly with scope read, not the token
    s3cr with every scope; `# ...` after whitespace is a comment."""
    path = tmp_path / "tokens"
    path.write_text("# tokens\ns3cr#et-readonly read   # the reader\nadmin-token\n")
    assert load_tokens(str(path)) == {"s3cr#et-readonly": frozenset({"read"}),
                                      "admin-token": SCOPES_ALL}
    server = make_server(auth_token_file=str(path))
    address = f"127.0.0.1:{server.port}"
    with Client(address, token="admin-token") as admin:
        admin.create_model(layers=LINEAR, loss="mse", seed=0, model_id="m")
    with Client(address, token="s3cr", retries=0) as cut, pytest.raises(UnauthenticatedError):
        cut.list_models()
    with Client(address, token="s3cr#et-readonly", retries=0) as reader:
        assert reader.model("m").forward(torch.ones(1, 2)).shape == (1, 1)
        with pytest.raises(PermissionDeniedError, match="needs scope 'train'"):
            reader.model("m").backward(torch.ones(1, 2), torch.ones(1, 1))


@pytest.mark.parametrize("line, needle", [
    ("tok read#train", "'#' inside the scopes 'read#train'"),
    ("tok read, train", "expected 'token [scope,scope]', got 3 fields"),
    ("tok read,,train", "empty scope in 'read,,train'"),
    ("tok read,", "empty scope in 'read,'"),
    ("tok write", "unknown scope(s) ['write']"),
    ("tök read", "printable ASCII"),
    ("reader read\nreader train", "already listed on line 2"),
])
@pytest.mark.hostile("auth, tokens, TLS")
def test_operator_writes_an_ambiguous_token_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# first line\n{line}\n", encoding="utf-8")
    with pytest.raises(StartupError) as exit_:
        load_tokens(str(path))
    message = str(exit_.value)
    assert message.startswith(f"{path}:{1 + line.count(chr(10)) + 1}: "), message
    assert needle in message and "\n" not in message


# ---------------------------------------------------------------------- catalog sweep

HOSTILE: list[Any] = [-1, 0, True, 2.5, 1e300, -1e300, None, "x", [], [1, 2, 3], [-1, 0],
                     {"a": 1}]
if FUZZ:
    HOSTILE += [False, -2.5, 1e-300, 2**63, "same", [1], [1, 2], [[1]], 65537, 1e6]
# Required arguments that make each layer buildable; the sweep replaces one at a time.
BASE: dict[str, dict[str, Any]] = {
    "Linear": {"in_features": 3, "out_features": 2},
    "Bilinear": {"in1_features": 3, "in2_features": 3, "out_features": 2},
    "Embedding": {"num_embeddings": 5, "embedding_dim": 2},
    **{k: {"in_channels": 3, "out_channels": 2, "kernel_size": 2}
       for k in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d")},
    **{k: {"kernel_size": 2} for k in ("MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d")},
    **{k: {"output_size": 2}
       for k in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d")},
    "BatchNorm1d": {"num_features": 3}, "BatchNorm2d": {"num_features": 3},
    "LayerNorm": {"normalized_shape": 3}, "GroupNorm": {"num_groups": 1, "num_channels": 3},
    "Unflatten": {"dim": 1, "unflattened_size": [3, 1]},
}
INPUTS = [torch.randn(2, 3), torch.randn(2, 3, 8, 8)] + (
    [torch.randn(2, 3, 8), torch.randn(2, 3, 4, 4, 4), torch.randint(0, 5, (2, 3))] if FUZZ
    else [torch.randint(0, 5, (2, 3))])


def _attempt(call: Any, *args: Any) -> tuple[Any, str | None]:
    """(result, None), (None, None) for a GradServeFault (a proper status), or (None, the error
    that would be INTERNAL on the wire)."""
    try:
        return call(*args), None
    except GradServeFault:
        return None, None
    except Exception as exc:  # noqa: BLE001 - this is what the sweep looks for
        return None, f"{type(exc).__name__}: {exc}"


def _model(spec: ModelSpec) -> Model:
    return Model("m", spec, torch.device("cpu"), Limits(max_parameters=10**7), Hooks())


def _backward_twice(model: Model, target: torch.Tensor) -> None:
    for _ in range(2):  # the second step runs on the optimizer's state
        model.backward(inputs=[torch.randn(2, 3)], target=target, forward_id="",
                       grad_output=None, return_grads=False, return_input_grads=False,
                       step=True, return_output=False)


def _layer_args(cls: type) -> list[str]:
    return [k for k, p in inspect.signature(cls.__init__).parameters.items()  # type: ignore[misc]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and k not in ("self", "device", "dtype", "inplace") and not k.startswith("_")]


def _training_cases() -> list[tuple[str, str, str]]:
    cases = [("loss", n, a) for n, e in LOSSES.items() for a in sorted(e.allowed)]
    cases += [("optimizer", n, a) for n, (_, allowed) in OPTIMIZERS.items()
              for a in sorted(allowed)]
    cases += [("plugin", "mlp", a) for a in ("in_features", "hidden", "out_features",
                                             "activation")]
    return cases


def _sweep_size() -> int:
    """Specs the sweep below builds (each layer also runs on every input that fits)."""
    args = sum(len(_layer_args(cls)) for cls in LAYERS.values())
    args += len(_training_cases()) + sum(len(names) for _, names in SCHEDULES.values())
    return args * len(HOSTILE)


def _sweep_layers() -> list[str]:
    found = []
    for name, cls in sorted(LAYERS.items()):
        for arg in _layer_args(cls):
            for value in HOSTILE:
                label = f"{name}.{arg}={value!r}"
                spec = ModelSpec(source="layers", layers=[
                    {"type": name, "kwargs": {**BASE.get(name, {}), arg: value}}])
                model, error = _attempt(_model, spec)
                for x in INPUTS if model is not None else []:
                    inputs = [x, x] if name == "Bilinear" else [x]
                    error = error or _attempt(model.forward, inputs, False, False)[1]
                if error:
                    found.append(f"{label}: {error}")
    return found


def _sweep_training() -> list[str]:
    found = []
    for kind, name, arg in _training_cases():
        for value in HOSTILE:
            spec = ModelSpec(source="layers", loss="mse",
                             layers=[{"type": "Linear",
                                      "kwargs": {"in_features": 3, "out_features": 2}}])
            if kind == "loss":
                spec.loss, spec.loss_kwargs = name, {arg: value}
            elif kind == "optimizer":
                spec.optimizer, spec.optimizer_params = name, {"lr": 0.1, arg: value}
            else:
                spec = ModelSpec(source="plugin", plugin="mlp", loss="mse", plugin_kwargs={
                    "in_features": 3, "hidden": [4], "out_features": 2, arg: value})
            model, error = _attempt(_model, spec)
            for target in ([torch.randn(2, 2), torch.randint(0, 2, (2,))]
                           if model is not None else []):
                error = error or _attempt(_backward_twice, model, target)[1]
            if error:
                found.append(f"{kind} {name}.{arg}={value!r}: {error}")
    return found


def _sweep_schedules() -> list[str]:
    found = []
    for kind, (_, names) in sorted(SCHEDULES.items()):
        for arg in sorted(names):
            for value in HOSTILE:
                optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)

                def steps(opt: torch.optim.Optimizer = optimizer, k: str = kind,
                          params: dict[str, Any] = {arg: value}) -> None:  # noqa: B006
                    schedule = build_schedule(opt, k, params, 2, 0.5, 10)
                    for _ in range(12):  # through warm-up and past the schedule's end
                        opt.step()
                        if schedule is not None:
                            schedule.step()

                error = _attempt(steps)[1]
                if error:
                    found.append(f"schedule {kind}.{arg}={value!r}: {error}")
    return found


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.hostile("specs, options, ids", inputs=_sweep_size())
def test_catalog_sweep_finds_no_internal_error() -> None:
    """Every layer argument, loss, optimizer and schedule option and mlp plugin argument, with
    hostile values, built and run at the core: each outcome is success or a GradServeFault."""
    found = _sweep_layers() + _sweep_training() + _sweep_schedules()
    assert not found, "\n".join(found[:20])
