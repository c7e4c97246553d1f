"""Optimizers a spec may name, with the hyper-parameters PyTorch gives them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import optim

from ..core.errors import InvalidArgument
from .kwargs import NON_NEGATIVE, Bound, check_kwargs, suggest

_COMMON = frozenset({"lr", "weight_decay", "maximize"})
OPTIMIZERS: dict[str, tuple[type[optim.Optimizer], frozenset[str]]] = {
    "sgd": (optim.SGD, _COMMON | {"momentum", "dampening", "nesterov"}),
    "adam": (optim.Adam, _COMMON | {"betas", "eps", "amsgrad"}),
    "adamw": (optim.AdamW, _COMMON | {"betas", "eps", "amsgrad"}),
    "rmsprop": (optim.RMSprop, _COMMON | {"alpha", "eps", "momentum", "centered"}),
    "adagrad": (optim.Adagrad, _COMMON | {"lr_decay", "initial_accumulator_value", "eps"}),
}
# Ranges by argument (types come from the optimizers' annotations: betas is a pair).
BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(("lr", "eps", "weight_decay", "momentum", "alpha", "lr_decay",
                     "initial_accumulator_value"), NON_NEGATIVE),
    "betas": Bound(lo=0, below=1), "dampening": Bound(lo=0, hi=1),
}


# Tensors of a parameter's size each optimizer keeps per parameter, and the options that add
# one more: the memory budget's estimate of optimizer state (Adam: two moments).
STATE_TENSORS: dict[str, tuple[int, frozenset[str]]] = {
    "sgd": (0, frozenset({"momentum"})),
    "adam": (2, frozenset({"amsgrad"})),
    "adamw": (2, frozenset({"amsgrad"})),
    "rmsprop": (1, frozenset({"momentum", "centered"})),
    "adagrad": (1, frozenset()),
}


def state_factor(name: str, params: Mapping[str, Any]) -> int:
    """How many parameter-sized state tensors the optimizer will hold (STATE_TENSORS)."""
    base, options = STATE_TENSORS.get(name or "sgd", (2, frozenset()))
    return base + sum(1 for key in options if params.get(key))


def build_optimizer(
    name: str, params: Mapping[str, Any], parameters: Iterable[torch.nn.Parameter]
) -> optim.Optimizer | None:
    """The optimizer over `parameters`, or None when the model has none to optimize."""
    name = name or "sgd"
    entry = OPTIMIZERS.get(name)
    if entry is None:
        raise InvalidArgument(
            f"spec.optimizer.type: unknown optimizer {name!r}{suggest(name, OPTIMIZERS)}; "
            f"allowed: {sorted(OPTIMIZERS)}"
        )
    cls, allowed = entry
    kwargs = check_kwargs(cls.__init__, params, f"spec.optimizer ({name})", allowed=allowed,
                          bounds=BOUNDS)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
    parameters = list(parameters)
    if not parameters:
        return None
    try:
        return cls(parameters, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"spec.optimizer ({name}): {exc}") from None
