"""Operator-installed models: factories registered under the entry-point group gradserve.models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import check_kwargs
from .layers import LAYERS

GROUP = "gradserve.models"


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
    checked = check_kwargs(factory, kwargs, f"spec.plugin ({name})")
    try:
        module = factory(**checked)
    except (TypeError, ValueError) as exc:
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
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)
