"""Allow-listed torch.nn layers for nn.Sequential specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import check_kwargs

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


def build_sequential(layers: Sequence[Mapping[str, Any]]) -> nn.Sequential:
    """nn.Sequential from [{"type": "Linear", "kwargs": {...}}, ...]; InvalidArgument if not allowed."""
    if not layers:
        raise InvalidArgument("spec.layers: at least one layer is required")
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        kind = layer.get("type", "")
        what = f"spec.layers[{i}] ({kind or 'no type'})"
        cls = LAYERS.get(kind)
        if cls is None:
            raise InvalidArgument(f"{what}: unknown layer type; allowed: {sorted(LAYERS)}")
        kwargs = check_kwargs(cls.__init__, layer.get("kwargs", {}), what)
        try:
            modules.append(cls(**kwargs))
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
    return nn.Sequential(*modules)
