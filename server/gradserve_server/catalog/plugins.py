"""Operator-installed models: factories registered under the entry-point group gradserve.models."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import POSITIVE, Bound, check_kwargs
from .layers import LAYERS

GROUP = "gradserve.models"
# Ranges of plugin arguments by conventional name (types come from the factory's annotations).
BOUNDS: dict[str, Bound] = dict.fromkeys(
    ("in_features", "out_features", "hidden", "in_channels", "out_channels", "num_features",
     "num_embeddings", "embedding_dim"), POSITIVE)


@lru_cache(maxsize=1)
def available() -> dict[str, Any]:
    """Entry points by name, discovered once per process."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def build_plugin(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    eps = available()
    if name not in eps:
        raise InvalidArgument(
            f"spec.plugin.name: no plugin {name!r} installed; available: {sorted(eps)}"
        )
    factory: Callable[..., Any] = eps[name].load()
    checked = check_kwargs(factory, kwargs, f"spec.plugin ({name})", bounds=BOUNDS)
    try:
        module = factory(**checked)
    # Whatever a factory raises on the arguments it was given: torch's RuntimeError for a
    # negative size, an assertion, an index out of range.
    except (TypeError, ValueError, RuntimeError, AssertionError, ArithmeticError, LookupError,
            AttributeError) as exc:
        raise InvalidArgument(f"spec.plugin ({name}): {exc}") from None
    if not isinstance(module, nn.Module):
        raise InvalidArgument(f"spec.plugin ({name}): the factory did not return an nn.Module")
    return module


def mlp(in_features: int, hidden: list[int], out_features: int, activation: str = "ReLU") -> nn.Module:
    """Example plugin: a multi-layer perceptron Linear-act-...-Linear."""
    act = LAYERS.get(activation)
    if act is None or not issubclass(act, nn.Module) or act.__module__ != "torch.nn.modules.activation":
        raise ValueError(f"activation must be a torch.nn activation name, got {activation!r}")
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)
