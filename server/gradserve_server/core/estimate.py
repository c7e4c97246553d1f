"""Memory a call will allocate, measured by running it on meta tensors first.

A meta tensor has a shape and a dtype but no data, so running a model on meta inputs costs
microseconds to milliseconds and allocates nothing, whatever the shapes. Every storage the run
creates is counted while it is alive (a TorchDispatchMode sees each operator's outputs; a
weakref on the storage sees it freed), which gives the peak; saved_tensors_hooks count what
autograd keeps for backward. This works for any nn.Module whose operators have meta kernels:
layers, expressions, plugins, torch.fx GraphModules. A run that stops part way (inputs the
model refuses, data-dependent shapes, .item()) estimates what was allocated until it stopped.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("gradserve")

FORWARD, RETAIN, BACKWARD = "forward", "retain", "backward"


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it), valid for meta tensors too."""
    return int(t.untyped_storage()._cdata)


class SavedBytes:
    """saved_tensors_hooks that count the distinct storages autograd saves for backward.

    Storages in `exclude` (parameters, buffers, tensors already counted) are skipped. The pack
    hook returns a detached alias: returning the tensor itself would tie a saved output to its
    own grad_fn, a reference cycle that outlives the graph. Hooked tensors escape autograd's
    own check that a saved tensor was not modified in place before backward (SetParameters or
    Step between a retained Forward and its Backward), so unpack makes it, as local code does.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.seen = set(exclude)
        self.nbytes = 0

    def exclude(self, tensors: Sequence[torch.Tensor]) -> None:
        """Storages counted elsewhere (a retained graph's inputs) are not counted as saved."""
        self.seen.update(storage_key(t) for t in tensors)

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        key = storage_key(t)
        if key not in self.seen:
            self.seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        alias = t.detach()  # shares t's version counter
        return alias, alias._version

    @staticmethod
    def unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        t, version = packed
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                f"expected version {version} instead (a parameter or buffer the retained graph "
                "saved was changed by SetParameters or Step after its Forward; run Forward "
                "again)")
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _PeakMode(TorchDispatchMode):
    """Counts the bytes of storages operators create while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing here is compiled; the default wraps __torch_dispatch__ in dynamo.disable,
        # whose first call imports torch._dynamo (over a second, on a server's first request).
        return False

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            # Outputs that alias an argument (views, in-place and out= ops) allocate nothing.
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                storage = t.untyped_storage()
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, nbytes)
        return out


def warm_up() -> None:
    """Run one tiny estimate now: the first meta run imports torch._dynamo (1-3 s here, via
    torch's own meta kernels), which belongs to start-up, not to a client's first call."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its init from the global RNG
        twin = meta_twin(nn.Linear(1, 1))
    if twin is not None:
        run(twin, [(torch.Size([1, 1]), torch.float32, False)], BACKWARD, False,
            lambda out, _target: out.sum(), None)


@dataclass(frozen=True)
class Estimate:
    """Bytes one call allocates at its peak, and what autograd keeps of them (its graph)."""

    peak: int
    saved: int
    output: int


def meta_twin(module: nn.Module) -> nn.Module | None:
    """A copy of module whose parameters, buffers and tensor attributes are meta tensors.

    deepcopy with a memo that maps each real tensor to its meta twin: nothing real is copied,
    and the twin runs the module's own forward (modes and frozen flags included).
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = torch.empty_like(value, device="meta")
    try:
        twin = copy.deepcopy(module, memo)
    except Exception as exc:  # noqa: BLE001 - any module: no twin means no estimate
        log.warning("memory pre-check: cannot copy %s to meta tensors (%s); its calls are not "
                    "estimated", type(module).__name__, exc)
        return None
    for p in twin.parameters():
        if p.requires_grad:  # like a model after its first backward: grads accumulate in place
            p.grad = torch.empty_like(p)
    return twin


def run(twin: nn.Module, inputs: Sequence[tuple[torch.Size, torch.dtype, bool]], phase: str,
        eval_mode: bool, loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        target: tuple[torch.Size, torch.dtype] | None) -> Estimate | None:
    """Run one call on meta tensors: forward (no_grad), retain (keep the graph) or backward.

    If the run fails part way (inputs of the wrong shape, a loss that refuses the output, an
    operator without a meta kernel), the estimate is what was allocated until then: the real
    call fails at the same point having allocated as much (the loss after a huge forward).
    """
    twin.train(not eval_mode)
    xs = [torch.empty(shape, dtype=dtype, device="meta").requires_grad_(
        rg and dtype.is_floating_point) for shape, dtype, rg in inputs]
    exclude = {storage_key(t) for t in (*twin.parameters(), *twin.buffers())}
    saved = SavedBytes(exclude | {storage_key(x) for x in xs})
    mode = _PeakMode()
    output = kept = 0
    try:
        with mode, torch.set_grad_enabled(phase != FORWARD), saved.hooks():
            out = twin(*xs)
            if not isinstance(out, torch.Tensor):
                return None
            output = out.untyped_storage().nbytes()
            if phase == BACKWARD:
                y = (torch.empty(target[0], dtype=target[1], device="meta")
                     if target is not None else None)
                value = loss(out, y)
                if value.requires_grad:
                    value.backward()
            kept = saved.nbytes + (0 if storage_key(out) in saved.seen else output)
    except Exception as exc:  # noqa: BLE001 - shape errors, ops without meta kernels
        log.debug("memory pre-check: partial estimate (%s: %s)", type(exc).__name__, exc)
        kept = saved.nbytes + output
    finally:
        twin.train(True)
    return Estimate(peak=mode.peak, saved=kept, output=output)
