"""The collectives core's ops call (core/parallel.py's Parallel), the same on every rank.

Rank 0 holds the batch (Work.tensors); the layout of those tensors travels in the command
(args["layout"]: dtype and shape of each, or None), so every rank knows what it receives.
Errors inside an op are agreed: a failed guard makes the next agree/reduce_grads raise the same
error on every rank (the failing rank's own; the others a copy naming the rank), so the ranks
always take the same collectives next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import torch

from ..core import errors
from ..core.model import Model
from ..core.parallel import Work, iter_grads, offsets
from .group import Group

AGREED = "_gradserve_agreed"  # set on an exception every rank raised together


def agreed(exc: BaseException) -> bool:
    """Raised by every rank at the same collective: the stream is still in step."""
    return bool(getattr(exc, AGREED, False))


def _mark(exc: BaseException) -> BaseException:
    setattr(exc, AGREED, True)
    return exc


def layout_of(tensors: Sequence[torch.Tensor | None]) -> list[tuple[str, tuple[int, ...]] | None]:
    return [None if t is None else (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            for t in tensors]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise errors.InvalidArgument(f"unknown dtype {name!r}")
    return dtype


def _row_bytes(entry: tuple[str, tuple[int, ...]]) -> int:
    name, shape = entry
    return math.prod(shape[1:]) * _itemsize(name)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _from_bytes(buf: torch.Tensor, name: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of its own from bytes (buf may sit at any offset of a packed buffer)."""
    dtype = _dtype(name)
    if math.prod(shape) == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if buf.storage_offset() % _itemsize(name):  # a view must be aligned: copy first
        return buf.clone().view(dtype).reshape(tuple(shape))
    return buf.view(dtype).reshape(tuple(shape)).clone()


class Guard:
    """Holds the error of the local work it wraps instead of raising it."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if isinstance(exc, Exception) and self.error is None:
            self.error = exc
            return True
        return False

    def describe(self) -> tuple[str, str] | None:
        if self.error is None:
            return None
        exc = self.error
        if isinstance(exc, errors.GradServeFault):
            return type(exc).__name__, str(exc)
        return "", f"{type(exc).__name__}: {exc}"


class GroupComm:
    """Parallel's collectives over a Group (rank 0's Driver and the Followers share them)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.rank = group.rank
        self.world = group.world

    # ---------------------------------------------------------------- shards

    @staticmethod
    def _whole(work: Work) -> bool:
        return not any(work.sizes[1:])

    def active(self, work: Work) -> bool:
        return work.sizes[self.rank] > 0

    def weight(self, work: Work) -> float:
        return float(work.args["weights"][self.rank])

    def scatter(self, work: Work) -> list[torch.Tensor | None]:
        """This rank's rows: from the command itself when rank 0 put a small batch in it
        (args["inline"]: each tensor's bytes), else one scatter of padded shards."""
        layout = work.args["layout"]
        sizes = work.sizes
        starts = offsets(sizes)
        lo, n = starts[self.rank], sizes[self.rank]
        if self.rank == 0:
            if not self._whole(work) and work.args.get("inline") is None:
                self._scatter_out(work, starts)
            return [None if t is None else t[lo:lo + n] if not self._whole(work) else t
                    for t in work.tensors]
        inline = work.args.get("inline")
        if inline is not None:
            return [None if e is None else
                    _from_bytes(torch.frombuffer(bytearray(b), dtype=torch.uint8), e[0],
                                e[1])[lo:lo + n]
                    for e, b in zip(layout, inline)]
        if self._whole(work):
            return [None if e is None else torch.empty((0, *e[1][1:]), dtype=_dtype(e[0]))
                    for e in layout]
        rows = [_row_bytes(e) if e is not None else 0 for e in layout]
        recv = torch.empty(self._width(work, rows), dtype=torch.uint8)
        self.group.scatter_cpu(recv, None)
        out: list[torch.Tensor | None] = []
        at = 0
        for entry, row in zip(layout, rows):
            if entry is None:
                out.append(None)
                continue
            out.append(_from_bytes(recv[at:at + n * row], entry[0], (n, *entry[1][1:])))
            at += n * row
        return out

    def _width(self, work: Work, rows: Sequence[int]) -> int:
        return max(work.sizes[r] * sum(rows) for r in range(1, self.world))

    def _scatter_out(self, work: Work, starts: Sequence[int]) -> None:
        rows = [_row_bytes(e) if e is not None else 0 for e in work.args["layout"]]
        width = self._width(work, rows)
        parts = [torch.zeros(width, dtype=torch.uint8)]
        for r in range(1, self.world):
            chunk = [_as_bytes(t[starts[r]:starts[r] + work.sizes[r]])
                     for t in work.tensors if t is not None]
            buf = torch.cat(chunk) if chunk else torch.empty(0, dtype=torch.uint8)
            parts.append(torch.nn.functional.pad(buf, (0, width - buf.numel())))
        self.group.scatter_cpu(torch.empty(width, dtype=torch.uint8), parts)

    def gather(self, tensors: Sequence[torch.Tensor | None], work: Work
               ) -> list[torch.Tensor]:
        """Point to point: each worker with rows sends them, rank 0 knows every size (the
        rows per rank, its own tensors' trailing shapes)."""
        present = [t for t in tensors if t is not None]
        if self._whole(work) or not present:
            return present if self.rank == 0 else []
        if self.rank != 0:
            if work.sizes[self.rank]:
                self.group.send_cpu(torch.cat([_as_bytes(t) for t in present]), 0)
            return []
        pieces: list[list[torch.Tensor]] = [[t.detach().cpu()] for t in present]
        for r in range(1, self.world):
            n = work.sizes[r]
            if not n:
                continue
            shapes = [(n, *t.shape[1:]) for t in present]
            sizes = [math.prod(shape) * t.element_size() for shape, t in zip(shapes, present)]
            buf = torch.empty(sum(sizes), dtype=torch.uint8)
            self.group.recv_cpu(buf, r)
            at = 0
            for k, (t, shape, size) in enumerate(zip(present, shapes, sizes)):
                pieces[k].append(_from_bytes(buf[at:at + size],
                                             str(t.dtype).removeprefix("torch."), shape))
                at += size
        return [torch.cat(p) for p in pieces]

    # ---------------------------------------------------------------- agreement

    def guard(self) -> Guard:
        return Guard()

    def agree(self, guard: Any, values: Sequence[float]) -> list[tuple[float, ...]]:
        failed = guard is not None and guard.error is not None
        row = torch.tensor([1.0 if failed else 0.0, *values], dtype=torch.float64)
        rows = self.group.all_gather_cpu(row)
        if any(float(r[0]) for r in rows):
            self._fail(guard)
        return [tuple(float(v) for v in r[1:]) for r in rows]

    def _fail(self, guard: Guard | None) -> None:
        """Every rank learns who failed and why, then raises: its own error, or a copy."""
        reports = self.group.all_gather_object(guard.describe() if guard is not None else None)
        if guard is not None and guard.error is not None:
            raise _mark(guard.error)
        first = next(r for r, rep in enumerate(reports) if rep is not None)
        kind, message = reports[first]
        text = f"rank {first} of {self.world}: {message}"
        cls = getattr(errors, kind, None) if kind else None
        if isinstance(cls, type) and issubclass(cls, errors.GradServeFault):
            raise _mark(cls(text))
        raise _mark(RuntimeError(text))

    # ---------------------------------------------------------------- gradients and state

    def stash_grads(self, model: Model) -> dict[str, torch.Tensor]:
        stash: dict[str, torch.Tensor] = {}
        for name, p in iter_grads(model):
            if p.grad is not None:
                stash[name] = p.grad
                p.grad = None
        return stash

    def reduce_grads(self, model: Model, guard: Any, stash: Any, work: Work, loss: float,
                     finite_only: bool) -> float:
        """One collective: the ranks' contributions, a has-gradient mask, a failure count and
        the weighted losses, summed (rank 0's alone when it computed the whole batch: a
        broadcast, bit for bit)."""
        params = list(iter_grads(model))
        failed = guard is not None and guard.error is not None
        numels = [p.numel() for _, p in params]
        mask_at = sum(numels)
        flat = torch.zeros(mask_at + len(params) + 2, dtype=model.dtype, device=model.device)
        at = 0
        for i, (_, p) in enumerate(params):
            if p.grad is not None and not failed:
                flat[at:at + p.numel()].copy_(p.grad.reshape(-1))
                flat[mask_at + i] = 1
            at += p.numel()
        flat[-2] = 1 if failed else 0
        flat[-1] = 0.0 if failed else loss
        try:
            if self._whole(work):
                self.group.broadcast_dev(flat)
            else:
                self.group.all_reduce_dev(flat)
        except BaseException:
            self._restore(params, stash)
            raise
        total = float(flat[-1])
        if float(flat[-2]) > 0:
            self._restore(params, stash)
            self._fail(guard)
        if finite_only and not math.isfinite(total):
            self._restore(params, stash)  # as if this batch had not been backpropagated
            return total
        at = 0
        for i, (name, p) in enumerate(params):
            part = flat[at:at + p.numel()].view_as(p)
            at += p.numel()
            if float(flat[mask_at + i]) > 0:
                p.grad = stash[name] + part if name in stash else part
            else:
                p.grad = stash.get(name)
        return total

    @staticmethod
    def _restore(params: Sequence[tuple[str, torch.nn.Parameter]], stash: Any) -> None:
        for name, p in params:
            p.grad = stash.get(name)

    def sync_buffers(self, model: Model, work: Work) -> None:
        """Rank 0's buffers everywhere. The others get new tensors rather than an in-place
        copy: a graph that saved the old ones (BatchNorm saves its running statistics) must
        still backpropagate."""
        owners = [(m, name, b) for m in model.module.modules()
                  for name, b in m._buffers.items() if b is not None]
        for dtype in sorted({b.dtype for _, _, b in owners}, key=str):
            same = [(m, name, b) for m, name, b in owners if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for _, _, b in same])
            self.group.broadcast_dev(flat)
            if self.rank != 0:
                at = 0
                for m, name, b in same:
                    m._buffers[name] = flat[at:at + b.numel()].view_as(b).clone()
                    at += b.numel()

    def broadcast(self, work: Work) -> list[torch.Tensor | None]:
        """Rank 0's work.tensors, whole, on every rank: one buffer (layout from the command)."""
        layout = work.args["layout"]
        sizes = [0 if e is None else math.prod(e[1]) * _itemsize(e[0]) for e in layout]
        if self.rank == 0:
            chunk = [_as_bytes(t) for t in work.tensors if t is not None]
            buf = torch.cat(chunk) if chunk else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(sum(sizes), dtype=torch.uint8)
        if buf.numel():
            self.group.broadcast_cpu(buf)
        if self.rank == 0:
            return list(work.tensors)
        out: list[torch.Tensor | None] = []
        at = 0
        for entry, size in zip(layout, sizes):
            out.append(None if entry is None else _from_bytes(buf[at:at + size], *entry))
            at += size
        return out


def _itemsize(name: str) -> int:
    return torch.empty((), dtype=_dtype(name)).element_size()
