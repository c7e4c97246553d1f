"""Loss functions a spec may name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import NON_NEGATIVE, Bound, check_kwargs, suggest

REDUCTIONS = ("mean", "sum")
# Ranges by argument (types come from the loss classes' annotations); torch would accept a
# negative delta here and fail only when computing the loss.
BOUNDS: dict[str, Bound] = {"delta": Bound(above=0), "beta": NON_NEGATIVE,
                            "label_smoothing": Bound(lo=0, hi=1)}


@dataclass(frozen=True)
class _LossType:
    cls: type[nn.Module] | None
    # Elementwise losses need output and target of one shape; class losses take indices.
    elementwise: bool
    allowed: frozenset[str]


LOSSES: dict[str, _LossType] = {
    "none": _LossType(None, False, frozenset()),
    "mse": _LossType(nn.MSELoss, True, frozenset()),
    "l1": _LossType(nn.L1Loss, True, frozenset()),
    "smooth_l1": _LossType(nn.SmoothL1Loss, True, frozenset({"beta"})),
    "huber": _LossType(nn.HuberLoss, True, frozenset({"delta"})),
    "cross_entropy": _LossType(nn.CrossEntropyLoss, False,
                               frozenset({"ignore_index", "label_smoothing"})),
    "nll": _LossType(nn.NLLLoss, False, frozenset({"ignore_index"})),
    "bce": _LossType(nn.BCELoss, True, frozenset()),
    "bce_with_logits": _LossType(nn.BCEWithLogitsLoss, True, frozenset()),
}


@dataclass(frozen=True)
class Loss:
    """A configured loss: call it with (output, target) to get a scalar tensor."""

    name: str
    reduction: str
    module: nn.Module | None
    elementwise: bool

    @property
    def needs_target(self) -> bool:
        return self.module is not None

    def __call__(self, output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if self.module is None:
            if target is not None:
                raise InvalidArgument(
                    "target: this model was created without a loss (loss 'none': its output is "
                    "the value to minimise, so it takes no target); to train it against "
                    "targets, create it with one, e.g. create_model(..., loss='mse')")
            if output.numel() != 1:
                raise InvalidArgument(
                    f"output: with loss 'none' the model output must be a scalar, got shape "
                    f"{list(output.shape)}; reduce it in the model (sum(...) or mean(...))"
                )
            return output.reshape(())
        if target is None:
            raise InvalidArgument(f"target: loss {self.name!r} needs a target")
        if self.elementwise and output.shape != target.shape:
            raise InvalidArgument(
                f"target: shape {list(target.shape)} does not match the output shape "
                f"{list(output.shape)} for loss {self.name!r} (PyTorch would broadcast silently); "
                f"reshape the target to {list(output.shape)}"
            )
        if not self.elementwise and not target.is_floating_point():
            target = target.long()
        try:
            return self.module(output, target)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise InvalidArgument(f"target: loss {self.name!r} failed: {exc}") from None


    def count(self, output: torch.Tensor, target: torch.Tensor | None) -> int:
        """How many terms a mean reduction divides by: targets that are not ignore_index for
        class indices, else elements. Data parallelism weights each shard's mean by its share."""
        if target is None:
            return 1
        if not self.elementwise and not target.is_floating_point():
            ignore = getattr(self.module, "ignore_index", None)
            return int((target != ignore).sum()) if ignore is not None else target.numel()
        if not self.elementwise and target.dim() > 1:  # class probabilities: one term per row
            return target.numel() // target.shape[1]
        return target.numel()


def build_loss(name: str, reduction: str, kwargs: Mapping[str, Any]) -> Loss:
    name = name or "none"
    entry = LOSSES.get(name)
    if entry is None:
        raise InvalidArgument(f"spec.loss.type: unknown loss {name!r}{suggest(name, LOSSES)}; "
                              f"allowed: {sorted(LOSSES)}")
    if entry.cls is None:
        if kwargs:
            raise InvalidArgument("spec.loss.kwargs: loss 'none' takes no arguments")
        return Loss(name, "none", None, False)
    reduction = reduction or "mean"
    if reduction not in REDUCTIONS:
        raise InvalidArgument(
            f"spec.loss.reduction: {reduction!r} not allowed; expected one of {REDUCTIONS}"
        )
    checked = check_kwargs(entry.cls.__init__, kwargs, f"spec.loss ({name})",
                           allowed=entry.allowed, bounds=BOUNDS)
    try:
        module = entry.cls(reduction=reduction, **checked)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"spec.loss ({name}): {exc}") from None
    return Loss(name, reduction, module, entry.elementwise)
