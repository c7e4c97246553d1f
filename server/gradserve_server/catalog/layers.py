"""Allow-listed torch.nn layers for nn.Sequential specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import NON_NEGATIVE, POSITIVE, Bound, check_kwargs, suggest

# Every class a spec may name; kwargs are checked against each constructor's signature.
LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        # linear and embedding
        nn.Linear, nn.Bilinear, nn.Embedding, nn.Identity,
        # convolution and pooling
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
        # normalisation and regularisation
        nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d,
        # shape
        nn.Flatten, nn.Unflatten,
        # activations
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
        nn.Softsign, nn.Softmax, nn.LogSoftmax,
    )
}

# Layers whose forward takes several tensors (a model starting with one takes as many inputs).
INPUTS: dict[str, int] = {"Bilinear": 2}

# Ranges of layer arguments by name (types come from the constructors' annotations): a size or
# a stride of 0 or less builds a layer that cannot run, a negative padding or eps computes
# nonsense.
_SIZES = ("in_features", "out_features", "in1_features", "in2_features", "in_channels",
          "out_channels", "num_features", "num_channels", "num_groups", "num_embeddings",
          "embedding_dim", "num_parameters", "normalized_shape", "kernel_size", "stride",
          "dilation", "groups", "output_size")
BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(_SIZES, POSITIVE),
    "padding": NON_NEGATIVE, "output_padding": NON_NEGATIVE, "eps": NON_NEGATIVE,
    "momentum": Bound(lo=0, hi=1), "p": Bound(lo=0, hi=1), "max_norm": Bound(above=0),
    "norm_type": Bound(above=0), "beta": Bound(above=0),
}

# Argument values that build a layer the rest of the server cannot serve: (layer, argument) ->
# (refused value, why). Sparse gradients have no wire form and no checkpoint form, and Adam,
# AdamW, RMSprop and gradient clipping refuse them.
REFUSED: dict[tuple[str, str], tuple[Any, str]] = {
    ("Embedding", "sparse"): (True, ("sparse gradients are not supported (they cannot be "
                                     "returned, checkpointed or stepped by most optimizers); "
                                     "use false")),
}
# Layers in one spec: each is a Python object the memory budget does not count (100,000
# Identity layers took 250 MB and 7 s to build), and real nn.Sequential stacks are far shorter.
MAX_LAYERS = 1024

# Window geometry of convolution and pooling layers. Far larger values describe no real network
# and make torch misbehave: max_pool1d scans the whole window even outside the input, and a
# kernel_size near 2**31 never returns at all.
WINDOW_ARGS = frozenset({"kernel_size", "stride", "padding", "dilation", "output_padding"})
MAX_WINDOW = 1 << 16


def _check_window(kwargs: Mapping[str, Any], what: str) -> None:
    for key in WINDOW_ARGS & kwargs.keys():
        value = kwargs[key]
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_WINDOW:
                raise InvalidArgument(f"{what}: {key}={value!r} is out of range; window "
                                      f"arguments are at most {MAX_WINDOW}")


def layer_inputs(kind: str) -> int:
    """The tensors a layer's forward takes."""
    return INPUTS.get(kind, 1)


class Layers(nn.Sequential):
    """nn.Sequential whose first layer may take several inputs: layers[0](*inputs), then each
    later layer on the previous output (the local equivalent of a layers model, README)."""

    def forward(self, *inputs: Any) -> Any:
        layers = iter(self)
        out = next(layers)(*inputs)
        for layer in layers:
            out = layer(out)
        return out


def build_sequential(layers: Sequence[Mapping[str, Any]]) -> nn.Sequential:
    """Layers (an nn.Sequential) from [{"type": "Linear", "kwargs": {...}}, ...]; InvalidArgument
    if not allowed. A later layer that takes several inputs is refused: nothing could feed it."""
    if not layers:
        raise InvalidArgument("spec.layers: at least one layer is required")
    if len(layers) > MAX_LAYERS:
        raise InvalidArgument(f"spec.layers: {len(layers)} layers; at most {MAX_LAYERS}")
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        kind = layer.get("type", "")
        what = f"spec.layers[{i}] ({kind or 'no type'})"
        cls = LAYERS.get(kind)
        if cls is None:
            raise InvalidArgument(f"{what}: unknown layer type{suggest(kind, LAYERS)}; allowed: "
                                  f"{sorted(LAYERS)}")
        if i and layer_inputs(kind) > 1:
            raise InvalidArgument(f"{what}: takes {layer_inputs(kind)} inputs, so it can only be "
                                  "the first layer (a later layer gets one tensor, the previous "
                                  "layer's output)")
        kwargs = check_kwargs(cls.__init__, layer.get("kwargs", {}), what, bounds=BOUNDS)
        _check_window(kwargs, what)
        for key, value in kwargs.items():
            refused = REFUSED.get((kind, key))
            if refused is not None and value is refused[0]:
                raise InvalidArgument(f"{what}.{key}: {value!r} is refused: {refused[1]}")
        try:
            modules.append(cls(**kwargs))
        # Whatever a torch constructor raises on the arguments it was given: GroupNorm's
        # num_groups=0 divides by zero, Embedding's padding_idx=1.5 fails as an index.
        except (TypeError, ValueError, RuntimeError, AssertionError, ArithmeticError, LookupError,
                AttributeError) as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
    return Layers(*modules)
