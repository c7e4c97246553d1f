"""Loss functions a spec may name."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidArgument
from .kwargs import MAX_FLOAT, NON_NEGATIVE, Bound, check_kwargs, suggest

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
    # Arguments that are tensors: sent as a number or a list of numbers, built on the server
    # as torch.tensor(value, dtype=model dtype) (class weights, the positive-class weight).
    tensors: frozenset[str] = frozenset()


LOSSES: dict[str, _LossType] = {
    "none": _LossType(None, False, frozenset()),
    "mse": _LossType(nn.MSELoss, True, frozenset()),
    "l1": _LossType(nn.L1Loss, True, frozenset()),
    "smooth_l1": _LossType(nn.SmoothL1Loss, True, frozenset({"beta"})),
    "huber": _LossType(nn.HuberLoss, True, frozenset({"delta"})),
    "cross_entropy": _LossType(nn.CrossEntropyLoss, False,
                               frozenset({"ignore_index", "label_smoothing", "weight"}),
                               frozenset({"weight"})),
    "nll": _LossType(nn.NLLLoss, False, frozenset({"ignore_index", "weight"}),
                     frozenset({"weight"})),
    "bce": _LossType(nn.BCELoss, True, frozenset()),
    "bce_with_logits": _LossType(nn.BCEWithLogitsLoss, True, frozenset({"pos_weight"}),
                                 frozenset({"pos_weight"})),
}
# Most elements of a tensor argument (one per class): far beyond any classifier's classes.
MAX_TENSOR_ARG = 1 << 20


@dataclass(frozen=True)
class Loss:
    """A configured loss: call it with (output, target) to get a scalar tensor."""

    name: str
    reduction: str
    module: nn.Module | None
    elementwise: bool
    # The same loss with reduction "sum" (validation sums batches, then divides once).
    sum_module: nn.Module | None = None
    # Tensor arguments by name (weight, pos_weight), in the model's dtype and on its device.
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    ignore_index: int = -100
    # Copies of module and sum_module for other devices (the memory estimate's meta tensors).
    _moved: dict[Any, tuple[nn.Module, nn.Module]] = field(default_factory=dict, repr=False)

    @property
    def needs_target(self) -> bool:
        return self.module is not None

    def __call__(self, output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return self._apply(output, target, summed=False)

    def _check_classes(self, output: torch.Tensor) -> None:
        """weight has one value per class (the output's dimension 1, or 0 unbatched);
        pos_weight one, or one per class (the output's last dimension). Said here, naming the
        loss's field: torch's own message blames neither."""
        for key, values in self.tensors.items():
            if output.dim() == 0:
                continue
            classes = output.shape[-1] if key == "pos_weight" else output.shape[
                1 if output.dim() >= 2 else 0]
            allowed = (1, classes) if key == "pos_weight" else (classes,)
            if values.numel() not in allowed:
                raise InvalidArgument(
                    f"spec.loss ({self.name}).{key}: {values.numel()} values for an output of "
                    f"{classes} classes (shape {list(output.shape)}); give "
                    f"{'one, or ' if key == 'pos_weight' else ''}one per class")

    def _modules(self, device: torch.device) -> tuple[nn.Module, nn.Module]:
        assert self.module is not None and self.sum_module is not None
        weights = next(iter(self.tensors.values()), None)
        if weights is None or weights.device == device:
            return self.module, self.sum_module
        found = self._moved.get(device)
        if found is None:
            found = self._moved[device] = (copy.deepcopy(self.module).to(device),
                                           copy.deepcopy(self.sum_module).to(device))
        return found

    def _apply(self, output: torch.Tensor, target: torch.Tensor | None, summed: bool
               ) -> torch.Tensor:
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
        if self.tensors:
            self._check_classes(output)
        module = self._modules(output.device)[1 if summed else 0]
        try:
            return module(output, target)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise InvalidArgument(f"target: loss {self.name!r} failed: {exc}") from None

    def sum_and_count(self, output: torch.Tensor, target: torch.Tensor | None
                      ) -> tuple[float, float]:
        """The loss of a batch summed, and what reduction "mean" divides that sum by, as
        torch does: the output's elements; for class losses with class-index targets, the
        targets that are not ignore_index, each counted as its class weight (when weight is
        given); for class-probability targets, the samples. Summing both over batches and
        dividing once gives the loss of all the batches in one call, whatever their sizes."""
        if self.module is None:
            return float(self._apply(output, target, summed=False)), 1.0
        total = float(self._apply(output, target, summed=True))
        assert target is not None
        if self.elementwise:
            return total, float(output.numel())
        if target.is_floating_point():  # class probabilities: one per sample and position
            return total, float(output.numel() // output.shape[1 if output.dim() > 1 else 0])
        counted = target[target != self.ignore_index].long()
        weight = self.tensors.get("weight")
        if weight is None:
            return total, float(counted.numel())
        return total, float(weight.double()[counted.to(weight.device)].sum())

    def count(self, output: torch.Tensor, target: torch.Tensor | None) -> float:
        """How many terms a mean reduction divides by (sum_and_count's count, without the
        loss): targets that are not ignore_index for class indices (each its class weight when
        weight is given), one per row for class probabilities, else elements. Data parallelism
        weights each shard's mean by its share."""
        if target is None or self.module is None:
            return 1.0
        if not self.elementwise and not target.is_floating_point():
            counted = target[target != self.ignore_index].long()
            weight = self.tensors.get("weight")
            if weight is None:
                return float(counted.numel())
            return float(weight.double()[counted.to(weight.device)].sum())
        if not self.elementwise and target.dim() > 1:  # class probabilities: one term per row
            return float(target.numel() // target.shape[1])
        return float(target.numel())

def _tensor_argument(key: str, value: Any, what: str, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """A number or a flat list of numbers -> torch.tensor(value, dtype=dtype) on device."""
    items = value if isinstance(value, list) else [value]
    if (not items or len(items) > MAX_TENSOR_ARG or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) <= MAX_FLOAT for v in items)):
        raise InvalidArgument(f"{what}.{key}: expected a number or a list of 1 to "
                              f"{MAX_TENSOR_ARG} finite numbers (one per class)")
    return torch.tensor(value, dtype=dtype, device=device)


def build_loss(name: str, reduction: str, kwargs: Mapping[str, Any],
               dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Loss:
    """The loss a spec names; tensor arguments are made in `dtype` on `device` (the model's)."""
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
    what = f"spec.loss ({name})"
    plain = {k: v for k, v in kwargs.items() if k not in entry.tensors}
    checked = check_kwargs(entry.cls.__init__, plain, what,
                           allowed=entry.allowed - entry.tensors, bounds=BOUNDS)
    tensors = {k: _tensor_argument(k, v, what, dtype, device or torch.device("cpu"))
               for k, v in kwargs.items() if k in entry.tensors}
    try:
        module = entry.cls(reduction=reduction, **checked, **tensors)
        summed = entry.cls(reduction="sum", **checked, **tensors)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what}: {exc}") from None
    return Loss(name, reduction, module, entry.elementwise, summed, tensors,
                int(checked.get("ignore_index", -100)))
