"""How a model's work is spread over processes: one process (LOCAL), or a torchrun group (dist/).

This module is the only place in core/ that knows ranks exist. Every computation on a model and
every change of its state is a `Work` item that the model hands to `Parallel.run`:

- in one process (LOCAL) that is a plain call of the op below, with the collectives a no-op, so
  a server without torchrun runs exactly the PyTorch code it always ran;
- in a group, rank 0 announces the work to every rank (dist/driver.py) and each rank runs the
  same op on its own replica of the model, on its contiguous shard of the batch, meeting the
  others at the collectives the op names: scatter (the batch), agree (losses and errors),
  reduce_grads (gradients weighted by shard share), sync_buffers and broadcast (rank 0's values)
  and gather (outputs and input gradients, in batch order).

An op never raises between collectives on its own: local work runs inside `guard()`, and the
next `agree` or `reduce_grads` raises the same error on every rank, so that the ranks never
disagree about which collectives come next.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .model import Model

FUSED, FORWARD, BACKWARD, STEP, ZERO_GRAD, ASSIGN = (
    "fused", "forward", "backward", "step", "zero_grad", "assign")


@dataclass
class Work:
    """One operation on a model, as every rank runs it.

    args travel to every rank (small, picklable). tensors are the batch: rank 0 holds them,
    and ops that split a batch give each rank `sizes[rank]` rows of every tensor, in order (None
    entries stay None). local is what only this rank has (a retained graph).
    """

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor | None] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    local: Any = None


@dataclass
class Computed:
    """What an op returns on the rank that asked (rank 0): gathered over the whole batch."""

    loss: float | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)
    input_grads: list[torch.Tensor] = field(default_factory=list)
    norm: float = math.nan
    # This rank's own shard: what a retained graph keeps.
    local_outputs: list[torch.Tensor] = field(default_factory=list)
    local_inputs: list[torch.Tensor] = field(default_factory=list)


class Parallel(Protocol):
    """Where a model's work runs: one process, or every rank of a torchrun group."""

    rank: int
    world: int

    def run(self, model: Model, work: Work) -> Computed:
        """Run work on the model everywhere it lives; the result of this rank (rank 0)."""

    def publish(self, model: Model) -> None:
        """A model was built or replaced (create, load, restore): every rank gets its state."""

    def drop(self, model_id: str) -> None:
        """A model was deleted: every rank forgets it."""

    # The collectives ops use; every rank calls them in the same order.
    def active(self, work: Work) -> bool:
        """Whether this rank computes on a shard of the batch (False: its shard is empty)."""

    def scatter(self, work: Work) -> list[torch.Tensor | None]:
        """This rank's rows of work.tensors."""

    def guard(self) -> contextlib.AbstractContextManager[Any]:
        """Local work whose error the next agree/reduce_grads raises on every rank."""

    def weight(self, work: Work) -> float:
        """This rank's share of a mean loss (its shard's terms over the batch's; 1: one rank)."""

    def agree(self, guard: Any, values: Sequence[float]) -> list[tuple[float, ...]]:
        """Every rank's values, in rank order; raises everywhere if any rank's guard failed."""

    def stash_grads(self, model: Model) -> Any:
        """Set the gradients aside so that backward leaves only this call's contribution."""

    def reduce_grads(self, model: Model, guard: Any, stash: Any, work: Work, loss: float,
                     finite_only: bool) -> float:
        """Sum every rank's contribution into the gradients (plus what was stashed), and the
        ranks' weighted losses into the batch's loss, which it returns. Raises everywhere if
        any rank's guard failed. finite_only: a loss that is not finite keeps the gradients as
        they were (one process does not backpropagate it at all)."""

    def gather(self, tensors: Sequence[torch.Tensor | None], work: Work
               ) -> list[torch.Tensor]:
        """Every rank's rows of each tensor, concatenated in rank (batch) order, on rank 0."""

    def sync_buffers(self, model: Model, work: Work) -> None:
        """Buffers (BatchNorm statistics) become rank 0's after a training-mode forward."""

    def broadcast(self, work: Work) -> list[torch.Tensor | None]:
        """Rank 0's work.tensors on every rank (whole, not split)."""


class Local:
    """One process: every op runs here on the whole batch; collectives do nothing."""

    rank = 0
    world = 1

    def run(self, model: Model, work: Work) -> Computed:
        return OPS[work.op](model, self, work)

    def publish(self, model: Model) -> None:
        pass

    def drop(self, model_id: str) -> None:
        pass

    def active(self, work: Work) -> bool:
        return True

    def scatter(self, work: Work) -> list[torch.Tensor | None]:
        return work.tensors

    def guard(self) -> contextlib.AbstractContextManager[Any]:
        return _NO_GUARD  # errors propagate where they happen

    def weight(self, work: Work) -> float:
        return 1.0

    def agree(self, guard: Any, values: Sequence[float]) -> list[tuple[float, ...]]:
        return [tuple(values)]

    def stash_grads(self, model: Model) -> Any:
        return None  # autograd accumulates into .grad itself

    def reduce_grads(self, model: Model, guard: Any, stash: Any, work: Work, loss: float,
                     finite_only: bool) -> float:
        return loss

    def gather(self, tensors: Sequence[torch.Tensor | None], work: Work
               ) -> list[torch.Tensor]:
        return list(tensors)  # type: ignore[arg-type]

    def sync_buffers(self, model: Model, work: Work) -> None:
        pass

    def broadcast(self, work: Work) -> list[torch.Tensor | None]:
        return work.tensors


_NO_GUARD = contextlib.nullcontext()
LOCAL = Local()


# ---------------------------------------------------------------------------- splitting

def split_sizes(n: int, world: int) -> list[int]:
    """Rows per rank: contiguous shards of the batch order, the first n % world one row longer
    (numpy.array_split). A batch smaller than the world leaves the last ranks empty."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def offsets(sizes: Sequence[int]) -> list[int]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


def shard_weights(counts: Sequence[float], reduction: str) -> list[float]:
    """Each rank's loss weight from the terms (Loss.count) of its shard of the batch.

    A mean over the whole batch is the mean of the shard means weighted by each shard's share
    of the terms (rows, or targets that are not ignore_index), so that the summed gradients
    are the gradient of the single-process loss; a sum needs no weights. No terms at all:
    NaN, as one process computes it.
    """
    if reduction != "mean":
        return [1.0 if c else 0.0 for c in counts]
    total = sum(counts)
    if total == 0:
        return [math.nan if c else 0.0 for c in counts]
    return [c / total for c in counts]


def _backward(model: Model, roots: Sequence[torch.Tensor],
              grads: Sequence[torch.Tensor] | None) -> None:
    model.differentiate(roots, grads)  # the one backward pass of every path


def _share(value: float, weight: float) -> float:
    """A rank's part of the batch's loss (a shard without terms adds nothing, not its NaN)."""
    return value if weight == 1.0 else 0.0 if weight == 0 else value * weight


def _present(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]  # inputs are never None


def _input_grads(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]


# ---------------------------------------------------------------------------- ops

def fused(model: Model, par: Parallel, work: Work) -> Computed:
    """Forward, loss and backward of a batch (Train, TrainStream, a Backward with inputs).

    args: inputs (how many of tensors are inputs; the next is the target), input_grads,
    output (gather the outputs), divide (accumulation: backward of loss / divide), finite_only
    (no gradients from a batch whose loss is not finite), stop_below (no backward of a loss
    below it: an objective, never split, reaching stop_loss), timed (forward/backward phases).
    """
    a = work.args
    parts = par.scatter(work)
    n_in = a["inputs"]
    active = par.active(work)
    weight = par.weight(work)
    stash = par.stash_grads(model)
    outs: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    value = 0.0
    wanted: list[torch.Tensor] = []
    with par.guard() as guard:
        model.set_mode(False)
        # Input gradients are the leaves' (each floating input in its own dtype, as sent):
        # what a local x.grad holds when the model casts x to its dtype.
        xs = model.prepare_inputs(_present(parts[:n_in]), requires_grad=a["input_grads"],
                                  leaves=wanted)
        y = model.prepare_target(parts[n_in])
        if active:
            start = time.perf_counter()
            outs = model.run_outputs(xs)
            if a["timed"]:
                model._timed("forward", start)
                start = time.perf_counter()
            loss = model.loss_fn(outs[model.main_output], y)
            value = loss.item()
            # One process never backpropagates a loss that is not finite (finite_only); in a
            # group only the sum tells, so reduce_grads drops the gradients afterwards.
            below = a.get("stop_below")
            if weight != 0 and (par.world > 1 or not a["finite_only"] or math.isfinite(value)
                                ) and not (below is not None and value < below):
                root = loss if weight == 1.0 else loss * weight
                _backward(model, [root / a["divide"] if a["divide"] > 1 else root], None)
            if a["timed"]:
                model._timed("backward", start)
    par.sync_buffers(model, work)
    total = par.reduce_grads(model, guard, stash, work, _share(value, weight),
                             a["finite_only"])
    if a["finite_only"] and not math.isfinite(total):
        return Computed(loss=total)
    shown = outs if a["output"] else []
    got = par.gather([*shown, *_input_grads(wanted)], work)
    return Computed(loss=total, outputs=got[:len(shown)], input_grads=got[len(shown):],
                    local_outputs=outs, local_inputs=xs)


def forward(model: Model, par: Parallel, work: Work) -> Computed:
    """Forward of a batch, gathered in order. args: eval, retain (keep the graph: every rank
    keeps its shard's). work.local on rank 0: SavedBytes measuring what the graph saves."""
    a = work.args
    parts = par.scatter(work)
    active = par.active(work)
    outs: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    leaves: list[torch.Tensor] = []
    with par.guard() as guard:
        model.set_mode(a["eval"])
        present = _present(parts)
        xs = model.prepare_inputs(present, requires_grad=bool(a["retain"]), leaves=leaves)
        if active:
            if a["retain"]:
                saved = work.local
                if saved is not None:  # the inputs are counted apart from what autograd saves
                    saved.exclude([*xs, *leaves])
                with saved.hooks() if saved is not None else contextlib.nullcontext():
                    outs = model.run_outputs(xs)
            else:
                with torch.no_grad():
                    outs = model.run_outputs(xs)
    par.agree(guard, ())
    if not a["eval"]:
        par.sync_buffers(model, work)
    got = par.gather(outs, work)
    # The graph's inputs: each floating input as its leaf (its own dtype, as sent; input
    # gradients are the leaves'), the others as prepared.
    found = iter(leaves)
    graph_inputs = [next(found) if x.is_floating_point() and leaves else x for x in xs]
    return Computed(outputs=got, local_outputs=outs, local_inputs=graph_inputs)


def backward(model: Model, par: Parallel, work: Work) -> Computed:
    """Backward through a retained graph (work.local; None on a rank with an empty shard).

    args: kind (grad_outputs, grad_output or loss: tensors are those, or [target]),
    input_grads, output (gather the graph's outputs), timed.
    """
    a = work.args
    parts = par.scatter(work)
    graph = work.local
    active = graph is not None
    kind = a["kind"]
    weight = par.weight(work) if kind == "loss" else 1.0
    stash = par.stash_grads(model)
    value = 0.0
    wanted: list[torch.Tensor] = []
    shown: list[torch.Tensor] = []
    start = time.perf_counter()
    with par.guard() as guard:
        if active:
            out = graph.output
            wanted = [x for x in graph.inputs if x.requires_grad] if a["input_grads"] else []
            shown = list(graph.outputs) if a["output"] else []
            roots: list[torch.Tensor] = []
            grads: list[torch.Tensor] | None = None
            if kind == "grad_outputs":
                grads = []
                for o, g in zip(graph.outputs, parts):
                    if o.requires_grad:
                        roots.append(o)
                        grads.append(g.to(device=o.device, dtype=o.dtype))  # type: ignore[union-attr]
            elif kind == "grad_output":
                g = model.prepare_target(parts[0])
                assert g is not None
                roots, grads = [out], [g.to(out.dtype)]
            else:
                loss = model.loss_fn(out, model.prepare_target(parts[0]))
                value = float(loss.detach())
                roots = [loss if weight == 1.0 else loss * weight]
            if weight != 0:
                _backward(model, roots, grads)
    total = par.reduce_grads(model, guard, stash, work, _share(value, weight), False)
    if a["timed"]:
        model._timed("backward", start)
    got = par.gather([*shown, *_input_grads(wanted)], work)
    return Computed(loss=total if kind == "loss" else None, outputs=got[:len(shown)],
                    input_grads=got[len(shown):])


def optimizer_step(model: Model, par: Parallel, work: Work) -> Computed:
    """Clip (clip > 0), optimizer.step() and zero_grad() (zero): gradients are equal on every
    rank, so every rank steps to the same parameters. args.groups (from rank 0 in a group):
    the optimizer's hyperparameters, which a schedule changes on rank 0 only."""
    a = work.args
    norm = math.nan
    params = ([p for p in model.module.parameters() if p.grad is not None] if a["clip"] > 0
              else [])
    if params:
        norm = float(torch.nn.utils.clip_grad_norm_(params, a["clip"]))
    elif a["norm"]:
        norm = model.total_grad_norm()
    opt = model.optimizer
    if opt is not None:
        for group, values in zip(opt.param_groups, a.get("groups", ())):
            group.update(values)
        opt.step()
        if a["zero"]:
            opt.zero_grad()
    return Computed(norm=norm)


def hyperparameters(model: Model) -> list[dict[str, Any]]:
    """The optimizer's param_groups without their parameters (what a schedule changes)."""
    opt = model.optimizer
    if opt is None:
        return []
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def zero_grad(model: Model, par: Parallel, work: Work) -> Computed:
    model.module.zero_grad()
    return Computed()


def assign(model: Model, par: Parallel, work: Work) -> Computed:
    """SetParameters: rank 0's values into parameters/buffers on every rank. args: names."""
    values = par.broadcast(work)
    with par.guard() as guard:
        model._assign(dict(zip(work.args["names"], values)), work.args["what"])  # type: ignore[arg-type]
    par.agree(guard, ())
    return Computed()


OPS: dict[str, Callable[[Model, Parallel, Work], Computed]] = {
    FUSED: fused, FORWARD: forward, BACKWARD: backward, STEP: optimizer_step,
    ZERO_GRAD: zero_grad, ASSIGN: assign,
}
# Ops whose tensors are a batch split over the ranks (the others broadcast theirs whole).
SPLIT = frozenset({FUSED, FORWARD, BACKWARD})


def per_sample(shapes: Sequence[torch.Size] | None, n: int) -> bool:
    """Every output has the batch's rows first (shapes from a meta run): it can be split."""
    return shapes is not None and len(shapes) > 0 and all(
        len(s) > 0 and s[0] == n for s in shapes)


def batch_rows(tensors: Sequence[torch.Tensor | None]) -> int:
    """The rows every tensor shares along dim 0, or 0 when they do not (no split)."""
    present = [t for t in tensors if t is not None]
    if not present or any(t.dim() == 0 for t in present):
        return 0
    n = int(present[0].shape[0])
    return n if all(int(t.shape[0]) == n for t in present) else 0


def iter_grads(model: Model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters in a fixed order (the same on every rank)."""
    return ((n, p) for n, p in model.module.named_parameters() if p.requires_grad)
