"""Hypothesis strategies for the oracle: model specs of every source and layer, with the inputs,
targets, losses, optimizers and dtypes that fit them, and Train/TrainStream options.

A drawn spec is a reference.Spec: create_model's arguments for the server and the local module
for the reference, plus how to make inputs and targets (from a torch.Generator, so a drawn data
seed stands for a whole tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from hypothesis import strategies as st
from reference import Layers, Spec
from torch import nn

# Seeds torch.manual_seed accepts, both ends included (docs/models.md "Seeds").
SEEDS = st.one_of(st.integers(0, 1000), st.integers(-(2**63), 2**64 - 1),
                  st.sampled_from([-1, -(2**63), 2**64 - 1]))
DTYPES = st.sampled_from(["float32"] * 6 + ["float64"] * 2 + ["bfloat16", "float16"])
ACTIVATIONS: list[tuple[str, Callable[[Any], dict[str, Any]]]] = [
    ("ReLU", lambda d: {}), ("ReLU6", lambda d: {}),
    ("LeakyReLU", lambda d: {"negative_slope": d(st.sampled_from([0.01, 0.2]))}),
    ("ELU", lambda d: {"alpha": d(st.sampled_from([1.0, 0.5]))}), ("SELU", lambda d: {}),
    ("CELU", lambda d: {"alpha": d(st.sampled_from([1.0, 2.0]))}),
    ("GELU", lambda d: {"approximate": d(st.sampled_from(["none", "tanh"]))}),
    ("SiLU", lambda d: {}), ("Mish", lambda d: {}), ("Sigmoid", lambda d: {}),
    ("Tanh", lambda d: {}), ("Hardtanh", lambda d: {"min_val": -0.5, "max_val": 0.5}),
    ("Hardswish", lambda d: {}), ("Hardsigmoid", lambda d: {}),
    ("Softplus", lambda d: {"beta": d(st.sampled_from([1.0, 2.0])), "threshold": 10.0}),
    ("Softsign", lambda d: {}), ("Softmax", lambda d: {"dim": 1}),
    ("LogSoftmax", lambda d: {"dim": 1}), ("Identity", lambda d: {}),
    ("PReLU", lambda d: {}),
]
ACTIVATION_NAMES = [name for name, _ in ACTIVATIONS if name not in ("Softmax", "LogSoftmax",
                                                                     "Identity", "PReLU")]


def _layer(kind: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, **kwargs}


def _module(layer: dict[str, Any]) -> nn.Module:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in layer.items() if k != "type"}
    return getattr(nn, layer["type"])(**kwargs)


@lru_cache(maxsize=4096)
def _out_shape(kind: str, items: tuple[tuple[str, Any], ...], shape: tuple[int, ...],
               dtype: str = "float32") -> tuple[int, ...] | None:
    """The per-sample output shape of a layer on meta tensors (None: it cannot run on it)."""
    layer = {"type": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in items}}
    try:
        with torch.device("meta"):
            module = _module(layer)
            x = torch.empty((2, *shape), dtype=getattr(torch, dtype))
            out = module(x)
    except Exception:  # noqa: BLE001 - any layer that does not fit this shape
        return None
    if out.dim() < 2 or out[0].numel() == 0 or out[0].numel() > 512:
        return None
    return tuple(out.shape[1:])


def _fits(layer: dict[str, Any], shape: tuple[int, ...], dtype: str = "float32"
          ) -> tuple[int, ...] | None:
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                         for k, v in layer.items() if k != "type"))
    return _out_shape(layer["type"], items, shape, dtype)


# Layers by the rank of the per-sample input they take: (type, kwargs from draw and shape).
def _vector(d: Any, s: tuple[int, ...]) -> list[dict[str, Any]]:
    f = s[0]
    out = [
        _layer("Linear", in_features=f, out_features=d(st.integers(1, 8)),
               bias=d(st.booleans())),
        _layer("Dropout", p=d(st.sampled_from([0.0, 0.3, 0.5]))),
        _layer("BatchNorm1d", num_features=f, momentum=d(st.sampled_from([0.1, 0.5])),
               affine=d(st.booleans())),
        _layer("LayerNorm", normalized_shape=f, elementwise_affine=d(st.booleans())),
        _layer("Identity"),
    ]
    if f % 2 == 0:
        out.append(_layer("GroupNorm", num_groups=2, num_channels=f))
        out.append(_layer("Unflatten", dim=1, unflattened_size=[2, f // 2]))
    return out


def _seq(d: Any, s: tuple[int, ...]) -> list[dict[str, Any]]:
    c, length = s
    k = d(st.integers(1, 3))
    out = [
        _layer("Conv1d", in_channels=c, out_channels=d(st.integers(1, 4)), kernel_size=k,
               stride=d(st.integers(1, 2)), padding=d(st.integers(0, 1)),
               dilation=d(st.integers(1, 2))),
        _layer("ConvTranspose1d", in_channels=c, out_channels=d(st.integers(1, 3)),
               kernel_size=k, stride=d(st.integers(1, 2))),
        _layer("MaxPool1d", kernel_size=d(st.integers(1, 2))),
        _layer("AvgPool1d", kernel_size=d(st.integers(1, 2))),
        _layer("AdaptiveAvgPool1d", output_size=d(st.integers(1, 3))),
        _layer("BatchNorm1d", num_features=c),
        _layer("Dropout1d", p=d(st.sampled_from([0.0, 0.5]))),
        _layer("LayerNorm", normalized_shape=length),
        _layer("Flatten"),
    ]
    if c % 2 == 0:
        out.append(_layer("GroupNorm", num_groups=2, num_channels=c))
    return out


def _image(d: Any, s: tuple[int, ...]) -> list[dict[str, Any]]:
    c = s[0]
    return [
        _layer("Conv2d", in_channels=c, out_channels=d(st.integers(1, 3)),
               kernel_size=d(st.integers(1, 3)), padding=d(st.integers(0, 1)),
               stride=d(st.integers(1, 2))),
        _layer("ConvTranspose2d", in_channels=c, out_channels=d(st.integers(1, 2)),
               kernel_size=d(st.integers(1, 2)), stride=d(st.integers(1, 2))),
        _layer("MaxPool2d", kernel_size=2), _layer("AvgPool2d", kernel_size=2),
        _layer("AdaptiveAvgPool2d", output_size=d(st.integers(1, 2))),
        _layer("AdaptiveMaxPool2d", output_size=d(st.integers(1, 2))),
        _layer("BatchNorm2d", num_features=c),
        _layer("Dropout2d", p=d(st.sampled_from([0.0, 0.5]))),
        _layer("GroupNorm", num_groups=1, num_channels=c),
        _layer("Flatten"),
    ]


def _volume(d: Any, s: tuple[int, ...]) -> list[dict[str, Any]]:
    c = s[0]
    return [_layer("Conv3d", in_channels=c, out_channels=d(st.integers(1, 2)),
                   kernel_size=d(st.integers(1, 2))), _layer("Flatten")]


CANDIDATES = {1: _vector, 2: _seq, 3: _image, 4: _volume}


@st.composite
def layer_stacks(draw: Any, dtype: str) -> tuple[list[dict[str, Any]], list[Callable[
        [torch.Generator, int], torch.Tensor]], tuple[int, ...]]:
    """Layers from a drawn first layer (and input) through a few shape-compatible layers."""
    family = draw(st.sampled_from(["vector", "vector", "seq", "image", "volume", "embedding",
                                   "bilinear"]))
    fdt = "float32"  # what the test sends (the model casts it)

    def floats(shape: tuple[int, ...]) -> Callable[[torch.Generator, int], torch.Tensor]:
        return lambda g, n: torch.randn((n, *shape), generator=g)

    layers: list[dict[str, Any]] = []
    inputs: list[Callable[[torch.Generator, int], torch.Tensor]]
    if family == "embedding":
        num, dim, t = draw(st.integers(2, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
        emb = _layer("Embedding", num_embeddings=num, embedding_dim=dim)
        if draw(st.booleans()):
            emb["padding_idx"] = draw(st.integers(0, num - 1))
        if draw(st.integers(0, 3)) == 0:
            emb["max_norm"] = 1.0
        layers = [emb, _layer("Flatten")]
        def tokens(g: torch.Generator, n: int, t: int = t, num: int = num) -> torch.Tensor:
            return torch.randint(0, num, (n, t), generator=g)

        inputs = [tokens]
        shape: tuple[int, ...] = (t * dim,)
    elif family == "bilinear":
        a, b, h = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
        layers = [_layer("Bilinear", in1_features=a, in2_features=b, out_features=h)]
        inputs = [floats((a,)), floats((b,))]
        shape = (h,)
    else:
        shape = {"vector": (draw(st.integers(1, 6)),),
                 "seq": (draw(st.integers(1, 3)), draw(st.integers(3, 6))),
                 "image": (draw(st.integers(1, 2)), draw(st.integers(3, 5)),
                           draw(st.integers(3, 5))),
                 "volume": (1, 3, 3, 3)}[family]
        inputs = [floats(shape)]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["layer", "layer", "activation"]))
        if kind == "activation":
            name, kwargs = ACTIVATIONS[draw(st.integers(0, len(ACTIVATIONS) - 1))]
            layer = _layer(name, **kwargs(draw))
            if name == "PReLU" and len(shape) == 1 and draw(st.booleans()):
                layer["num_parameters"] = shape[0]
        else:
            layer = draw(st.sampled_from(CANDIDATES[len(shape)](draw, shape)))
        out = _fits(layer, shape, fdt)
        if out is not None:
            layers.append(layer)
            shape = out
    if len(shape) > 1:
        layers.append(_layer("Flatten"))
        shape = (math.prod(shape),)
    return layers, inputs, shape


def _head(loss: str, features: int, k: int) -> list[dict[str, Any]]:
    head = [_layer("Linear", in_features=features, out_features=k)]
    if loss == "bce":
        head.append(_layer("Sigmoid"))
    if loss == "nll":
        head.append(_layer("LogSoftmax", dim=1))
    return head


@st.composite
def losses(draw: Any, k: int) -> tuple[dict[str, Any], Callable[[torch.Generator, torch.Tensor],
                                                                  torch.Tensor | None]]:
    """A loss for outputs [N, k] with its options, and how to make a fitting target."""
    name = draw(st.sampled_from(["mse", "l1", "smooth_l1", "huber", "cross_entropy",
                                 "cross_entropy", "nll", "bce", "bce_with_logits"]))
    loss: dict[str, Any] = {"type": name, "reduction": draw(st.sampled_from(["mean", "sum"]))}
    if name == "smooth_l1" and draw(st.booleans()):
        loss["beta"] = draw(st.sampled_from([0.5, 2.0]))
    if name == "huber" and draw(st.booleans()):
        loss["delta"] = draw(st.sampled_from([0.5, 2.0]))
    if name in ("cross_entropy", "nll"):
        if draw(st.booleans()):
            loss["ignore_index"] = -1
        if draw(st.booleans()):
            loss["weight"] = [draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for _ in range(k)]
        if name == "cross_entropy" and draw(st.booleans()):
            loss["label_smoothing"] = draw(st.sampled_from([0.1, 0.3]))
        probabilities = name == "cross_entropy" and draw(st.integers(0, 4)) == 0
        ignore = loss.get("ignore_index")

        def classes(g: torch.Generator, out: torch.Tensor) -> torch.Tensor:
            if probabilities:
                return torch.softmax(torch.randn(out.shape, generator=g), dim=1)
            y = torch.randint(0, k, out.shape[:1], generator=g)
            if ignore is not None:
                y[torch.rand(y.shape, generator=g) < 0.3] = ignore
            return y

        return loss, classes
    if name == "bce_with_logits" and draw(st.booleans()):
        loss["pos_weight"] = draw(st.one_of(
            st.sampled_from([2.0, 0.5]),
            st.lists(st.sampled_from([1.0, 2.0, 4.0]), min_size=k, max_size=k)))
    if name in ("bce", "bce_with_logits"):
        return loss, lambda g, out: (torch.rand(out.shape, generator=g) > 0.5).float()
    return loss, lambda g, out: torch.randn(out.shape, generator=g)


@st.composite
def optimizers(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from(["sgd", "sgd", "adam", "adamw", "rmsprop", "adagrad"]))
    opt: dict[str, Any] = {"type": name, "lr": draw(st.sampled_from([0.01, 0.05, 0.1, 0.3]))}
    if draw(st.booleans()):
        opt["weight_decay"] = draw(st.sampled_from([0.0, 0.01]))
    if draw(st.integers(0, 4)) == 0:
        opt["maximize"] = True
    if name == "sgd" and draw(st.booleans()):
        opt["momentum"] = draw(st.sampled_from([0.5, 0.9]))
        if draw(st.booleans()):
            opt["nesterov"] = True
        elif draw(st.booleans()):
            opt["dampening"] = 0.1
    if name in ("adam", "adamw"):
        if draw(st.booleans()):
            opt["betas"] = [draw(st.sampled_from([0.8, 0.9])), draw(st.sampled_from([0.99,
                                                                                     0.999]))]
        if draw(st.booleans()):
            opt["amsgrad"] = True
    if name == "rmsprop":
        if draw(st.booleans()):
            opt["momentum"] = 0.5
        if draw(st.booleans()):
            opt["centered"] = True
    if name == "adagrad" and draw(st.booleans()):
        opt["lr_decay"] = 0.01
        opt["initial_accumulator_value"] = 0.1
    return opt


@st.composite
def layer_specs(draw: Any) -> Spec:
    dtype = draw(DTYPES)
    layers, inputs, shape = draw(layer_stacks(dtype))
    k = draw(st.integers(2, 4))
    loss, target = draw(losses(k))
    layers = [*layers, *_head(loss["type"], shape[0], k)]
    create = {"layers": layers, "loss": loss, "optimizer": draw(optimizers()),
              "seed": draw(SEEDS), "dtype": dtype}
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in
                  Layers(*[_module(layer) for layer in layers]).named_parameters()}
    if shapes and draw(st.integers(0, 3)) == 0:  # some parameters frozen
        create["frozen"] = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=2,
                                         unique=True))
    if shapes and draw(st.integers(0, 3)) == 0:  # initial values as Python floats
        name = draw(st.sampled_from(sorted(shapes)))
        seed = draw(st.integers(0, 2**16))
        create["initial_parameters"] = {name: torch.randn(
            shapes[name], generator=torch.Generator().manual_seed(seed)).tolist()}
    return Spec(create, lambda: Layers(*[_module(layer) for layer in layers]),
                lambda g, n: [make(g, n) for make in inputs], target,
                description=f"layers {[layer['type'] for layer in layers]}")


@st.composite
def plugin_specs(draw: Any) -> Spec:
    from importlib.metadata import entry_points

    factory = next(ep for ep in entry_points(group="gradserve.models") if ep.name == "mlp").load()
    d, k = draw(st.integers(1, 5)), draw(st.integers(2, 4))
    kwargs = {"in_features": d, "hidden": draw(st.lists(st.integers(1, 6), max_size=2)),
              "out_features": k, "activation": draw(st.sampled_from(ACTIVATION_NAMES))}
    loss, target = draw(losses(k))
    if loss["type"] in ("bce", "nll"):
        loss = {"type": "mse"}
        target = lambda g, out: torch.randn(out.shape, generator=g)
    create = {"plugin": "mlp", "plugin_kwargs": kwargs, "loss": loss,
              "optimizer": draw(optimizers()), "seed": draw(SEEDS), "dtype": draw(DTYPES)}
    return Spec(create, lambda: factory(**kwargs),
                lambda g, n: [torch.randn(n, d, generator=g)], target,
                description=f"plugin mlp {kwargs}")


# ------------------------------------------------------------------ expressions

UNARY = ["relu", "sigmoid", "tanh", "exp", "log1p", "sin", "cos", "abs", "square", "sqrt",
         "log", "tan"]


@st.composite
def elementwise(draw: Any, names: list[str], depth: int = 0) -> str:
    """An expression text over tensor names (broadcasting to one shape), using at least one."""
    if depth >= 3 or draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(names))
        return name
    form = draw(st.integers(0, 9))
    a = draw(elementwise(names, depth + 1))
    if form == 0:
        return f"-{a}" if not a.startswith("-") else f"-({a})"
    if form <= 2:
        fn = draw(st.sampled_from(UNARY))
        return f"{fn}({a})"
    if form == 3:
        return draw(st.sampled_from([f"softplus({a})", f"softplus({a}, 2)",
                                     f"softplus({a}, beta=2, threshold=5)",
                                     f"clamp({a}, -1, 1)", f"clamp({a}, min=0)",
                                     f"clamp({a}, max=0.5)"]))
    if form == 4:
        b = draw(elementwise(names, depth + 1))
        return f"{draw(st.sampled_from(['maximum', 'minimum']))}({a}, {b})"
    if form == 5:  # constants: Python arithmetic, ints stay ints
        c = draw(st.sampled_from(["2", "(2 + 3)", "2**3", "(7 - 9)", "pi", "e", "0.5", "2**-1",
                                  "(1 / 4)", "3 * 2.5", "1e-3"]))
        return draw(st.sampled_from([f"{c} * {a}", f"({a}) * {c}", f"{a} + {c}",
                                     f"({a}) / {c}", f"{c} - {a}"]))
    if form == 6:
        return f"({a}) ** {draw(st.sampled_from(['2', '3', '0.5', '2.0']))}"
    b = draw(elementwise(names, depth + 1))
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    return f"({a}) {op} ({b})"


@st.composite
def expression_specs(draw: Any) -> Spec:
    dtype = draw(DTYPES)
    d = draw(st.integers(1, 4))
    objective = draw(st.integers(0, 3)) == 0
    params: dict[str, Any] = {}
    # Parameters as tensors, or as Python floats and lists (docs/models.md: torch.tensor(value,
    # dtype=model dtype)).
    python = draw(st.booleans())
    pg = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    w = torch.randn(d, generator=pg)
    b = torch.randn((), generator=pg)
    params["w"] = w.tolist() if python else w
    if draw(st.booleans()):
        params["b"] = b.item() if python else b
    names = list(params)
    inputs: list[str] = []
    if not objective:
        inputs = ["x"]
        if draw(st.booleans()):
            inputs.append("n")  # an int64 input
    if draw(st.integers(0, 3)) == 0 and not objective:
        params["M"] = torch.randn(d, d, generator=pg)
    body = draw(elementwise([*names, *[i for i in inputs if i != "n"]]))
    if not objective and "x" not in body:
        body = f"({body}) * x"  # samples along dimension 0
    if "n" in inputs:
        body = f"({body}) * ({draw(st.sampled_from(['(2 + 3)', '2', '(1 - 3)']))} * n)"
    if "M" in params:
        body = draw(st.sampled_from([f"matmul({body}, M)", f"({body}) @ M"]))
    if objective:
        text = draw(st.sampled_from([f"sum({body})", f"mean({body})", f"sum({body}, 0)",
                                     f"mean({body}, dim=[0])", f"sum({body}, -1, False)"]))
        loss: dict[str, Any] = {"type": "none"}
    else:
        text = draw(st.sampled_from([body, f"sum({body}, 1)", f"mean({body}, -1, True)",
                                     f"sum({body}, dim=[1], keepdim=True)",
                                     f"mean({body}, (1,))"]))
        loss = {"type": draw(st.sampled_from(["mse", "l1", "huber", "smooth_l1", "none"]))}
        if loss["type"] == "none":
            text = f"mean({text})"  # a scalar: Train without targets minimises it
    trainable = draw(st.none() | st.just([n for n in params if n != "b"]))
    create: dict[str, Any] = {"expression": text, "inputs": inputs, "parameters": params,
                              "loss": loss, "optimizer": draw(optimizers()), "dtype": dtype,
                              "seed": draw(SEEDS)}
    if trainable is not None and trainable:
        create["trainable"] = trainable
    order = sorted(params)  # docs/models.md: expression parameters are registered in name order

    def local() -> nn.Module:
        from reference import DTYPES as D
        from reference import Expression, as_tensor

        values = {k: as_tensor(v, D[dtype]).to(D[dtype]).clone() for k, v in params.items()}
        module = Expression(text, inputs, {k: values[k] for k in order})
        for k in order:
            if trainable is not None and trainable and k not in trainable:
                getattr(module, k).requires_grad_(False)
        return module

    def make_inputs(g: torch.Generator, n: int) -> list[torch.Tensor]:
        if objective:
            return []
        xs = [torch.randn(n, d, generator=g)]
        if "n" in inputs:
            xs.append(torch.randint(-3, 4, (n, d), generator=g))
        return xs

    def target(g: torch.Generator, out: torch.Tensor) -> torch.Tensor | None:
        if loss["type"] == "none":
            return None
        return torch.randn(out.shape, generator=g)

    return Spec(create, local, make_inputs, target, description=f"expression {text!r}")


# ------------------------------------------------------------------ exported models


class ResidualNet(nn.Module):
    """Exported: a skip connection around LayerNorm, GELU and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.block(h))


class TwoHeads(nn.Module):
    """Exported: two inputs, batch norm, two outputs by name (the loss applies to "score")."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(2, 6)
        self.bn = nn.BatchNorm1d(6)
        self.score, self.aux = nn.Linear(6, 2), nn.Linear(6, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bn(torch.tanh(self.a(u) + self.b(v)))
        return {"score": self.score(h), "aux": self.aux(h)}


ARCHIVE_SEED = 5


@lru_cache(maxsize=2)
def archive(name: str) -> bytes:
    """The model exported once per session (export takes seconds): built as
    `torch.manual_seed(ARCHIVE_SEED); net = Net()`."""
    from gradserve.export import export_module

    if name == "residual":
        return export_module(ResidualNet, (torch.randn(4, 4),), seed=ARCHIVE_SEED)
    return export_module(TwoHeads, (torch.randn(4, 3), torch.randn(4, 2)), seed=ARCHIVE_SEED)


@st.composite
def exported_specs(draw: Any) -> Spec:
    name = draw(st.sampled_from(["residual", "two_heads"]))
    k = 3 if name == "residual" else 2
    loss, target = draw(losses(k))
    if loss["type"] in ("bce", "nll"):  # those need a squashing head the archive lacks
        loss = {"type": "cross_entropy"}
        target = lambda g, out: torch.randint(0, k, out.shape[:1], generator=g)
    net = ResidualNet if name == "residual" else TwoHeads

    def local() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ARCHIVE_SEED)
            return net()

    create: dict[str, Any] = {"exported": archive(name), "loss": loss,
                              "optimizer": draw(optimizers()), "seed": draw(SEEDS),
                              "dtype": draw(st.sampled_from(["float32", "float32", "float64"]))}
    if name == "two_heads":
        create["loss_output"] = "score"

    def make_inputs(g: torch.Generator, n: int) -> list[torch.Tensor]:
        if name == "residual":
            return [torch.randn(max(n, 2), 4, generator=g)]
        return [torch.randn(max(n, 2), 3, generator=g), torch.randn(max(n, 2), 2, generator=g)]

    return Spec(create, local, make_inputs, target, reseed=True, description=f"exported {name}")


def specs() -> st.SearchStrategy[Spec]:
    """Every source: layers (every allowed layer), expressions, the mlp plugin, exported."""
    return st.one_of(layer_specs(), layer_specs(), expression_specs(), expression_specs(),
                     plugin_specs(), exported_specs())


# ------------------------------------------------------------------ Train options


@st.composite
def schedules(draw: Any, stream: bool = False) -> dict[str, Any] | None:
    kind = draw(st.sampled_from(["none", "step", "exponential", "cosine", "linear", None]))
    if kind is None:
        return None
    s: dict[str, Any] = {"type": kind}
    if kind == "step":
        s.update(step_size=draw(st.integers(1, 3)), gamma=0.5)
    elif kind == "exponential":
        s["gamma"] = draw(st.sampled_from([0.9, 0.5]))
    elif kind == "cosine":
        if stream or draw(st.booleans()):
            s["t_max"] = draw(st.integers(1, 6))
        if draw(st.booleans()):
            s["eta_min"] = 0.001
    elif kind == "linear":
        s.update(start_factor=0.5, end_factor=1.0, total_iters=draw(st.integers(1, 4)))
    if draw(st.booleans()):
        s["warmup_steps"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            s["warmup_start_factor"] = 0.25
    return s


@st.composite
def train_options(draw: Any, objective: bool) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if objective:
        o["max_steps"] = draw(st.integers(1, 12))
    else:
        o["epochs"] = draw(st.integers(0 if draw(st.booleans()) else 1, 3))
        if draw(st.booleans()) or not o["epochs"]:
            o["max_steps"] = draw(st.integers(1, 10))
        o["batch_size"] = draw(st.integers(0, 5))
        o["shuffle"] = draw(st.booleans())
        if o["shuffle"]:
            o["seed"] = draw(SEEDS.filter(lambda s: -(2**63) <= s < 2**64 - 10))
        o["drop_last"] = draw(st.booleans())
    if draw(st.booleans()):
        o["stop_loss"] = draw(st.sampled_from([0.01, 0.5, 1.0, 5.0, -1e9, 1e9]))
    if draw(st.booleans()):
        o["accumulation_steps"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        o["clip_grad_norm"] = draw(st.sampled_from([0.1, 1.0]))
    schedule = draw(schedules())
    if schedule is not None:
        o["schedule"] = schedule
    o["log_every_steps"] = draw(st.integers(0, 2))
    o["skip_nonfinite"] = draw(st.booleans())
    return o
