"""Rank 0's Parallel: one command stream to the other ranks, in the order calls reach it.

The gRPC server runs calls concurrently; every Work item (and every publish, drop and stop)
takes its turn here, first come first served, so that all ranks see the same commands in the
same order. A command carries a sequence number (every follower checks it) and, for a model, the
count of commands that model has had (a replica that missed one is caught). Between commands
the driver sends a heartbeat every quarter of the timeout, so that followers, which wait for
the next command no longer than --dist-timeout-seconds, know rank 0 is alive while it is idle.

When a collective fails the group is broken for good: the call ends ABORTED naming the lost
rank, health turns NOT_SERVING, and the server stops (on_broken) so that torchrun restarts the
group, which restores the models from --state-dir.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core import estimate
from ..core.checkpoints import CheckpointStore
from ..core.errors import Aborted, InvalidArgument
from ..core.hooks import Hooks
from ..core.model import Model
from ..core.parallel import (
    ASSIGN,
    BACKWARD,
    FORWARD,
    FUSED,
    OPS,
    SPLIT,
    STEP,
    ZERO_GRAD,
    Computed,
    Work,
    batch_rows,
    hyperparameters,
    offsets,
    per_sample,
    shard_weights,
    split_sizes,
)
from .comm import GroupComm, agreed, layout_of
from .group import Group, GroupLost

log = logging.getLogger("gradserve.dist")

NOOP, STOP, PUBLISH, DROP, VERIFY = "noop", "stop", "publish", "drop", "verify"
# Snapshot entries a replica needs (the request-id replies stay with rank 0, which answers).
REPLICA_STATE = ("model.", "grad.", "spec.", "optimizer.", "rng.")
MAX_SHAPES = 1024  # per-sample answers kept, by model and input shapes
# A batch this small travels inside its command (one broadcast to every rank) instead of a
# scatter of shards after it: one collective less per step for small models.
INLINE_BYTES = 64 * 1024


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
# Work that changes a model's state (--dist-verify compares the replicas after each).
CHANGES = frozenset({FUSED, BACKWARD, STEP, ASSIGN, ZERO_GRAD})
POSTED = frozenset({STEP, ZERO_GRAD})  # no collectives: sent ahead of the next command


def state_digest(model: Model) -> str:
    """A hash of what must be identical on every rank: parameters, buffers, gradients and the
    optimizer's state (its tensors and numbers), bit for bit."""
    h = hashlib.blake2b(digest_size=16)

    def add(name: str, t: torch.Tensor | None) -> None:
        h.update(name.encode())
        if t is None:
            h.update(b"\0none")
            return
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_raw(t))

    for name, t in model.module.state_dict().items():
        add(name, t)
    for name, p in model.module.named_parameters():
        add(f"grad.{name}", p.grad)
    if model.optimizer is not None:
        for idx, entry in sorted(model.optimizer.state_dict()["state"].items()):
            for key, value in sorted(entry.items()):
                if isinstance(value, torch.Tensor):
                    add(f"opt.{idx}.{key}", value)
                else:
                    h.update(f"opt.{idx}.{key}={value!r}".encode())
    return h.hexdigest()


class Turns:
    """A first-come-first-served lock: calls get the group in the order they asked for it."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next = 0
        self._serving = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._cv:
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                self._cv.wait()
        try:
            yield
        finally:
            self.release()

    def try_take(self) -> bool:
        """Take the group now if nobody holds it or waits for it."""
        with self._cv:
            if self._next != self._serving:
                return False
            self._next += 1
            return True

    def release(self) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


class Driver(GroupComm):
    """Parallel for rank 0 of a group (core/parallel.py)."""

    def __init__(self, group: Group, hooks: Hooks, verify: bool = False) -> None:
        super().__init__(group)
        self.hooks = hooks
        self.verify = verify
        self.broken = threading.Event()
        self.reason = ""
        self.on_broken: Callable[[str], None] | None = None
        self._turns = Turns()
        self._seq = 0
        self._counts: dict[str, int] = {}
        self._pending: list[dict[str, Any]] = []  # posted work, sent with the next command
        self._stopped = False
        self._last = time.monotonic()
        self._twins: dict[str, nn.Module | None] = {}
        self._cache_lock = threading.Lock()
        self._shapes: OrderedDict[tuple[Any, ...], bool] = OrderedDict()
        self._beat_s = max(0.2, group.timeout_s / 4)
        self._closing = threading.Event()
        self._beater = threading.Thread(target=self._beat, daemon=True,
                                        name="gradserve-heartbeat")
        self._beater.start()

    # ---------------------------------------------------------------- Parallel

    def run(self, model: Model, work: Work) -> Computed:
        self._plan(model, work)
        if work.op in POSTED:
            return self._post(model, work)
        with self._turns():
            self._check()
            try:
                self._announce(work.op, model.id, work.args, work.sizes, model.graph_ids)
                done = OPS[work.op](model, self, work)
            except BaseException as exc:
                if agreed(exc):
                    raise
                self._out_of_step(exc)
                raise
            finally:
                self._report(model.id)
            if self.verify and (work.op in CHANGES or (work.op == FORWARD
                                                       and not work.args["eval"])):
                self._verify(model, work.op)
            return done

    def _post(self, model: Model, work: Work) -> Computed:
        """Work without collectives (an optimizer step, zero_grad) runs here now and travels
        to the others ahead of the next command, which saves a broadcast per training step;
        every rank still applies it in the same place of the stream."""
        with self._turns():
            self._check()
            done = OPS[work.op](model, self, work)
            count = self._counts[model.id] = self._counts.get(model.id, 0) + 1
            self._pending.append({"op": work.op, "model": model.id, "args": work.args,
                                  "count": count})
            if self.verify:
                self._verify(model, work.op)
            return done

    def publish(self, model: Model) -> None:
        snap = CheckpointStore.snapshot(model, copy=False)
        tensors = {k: v for k, v in snap.tensors.items() if k.startswith(REPLICA_STATE)}
        meta = {**snap.meta, "requests": []}
        work = Work(PUBLISH, {"meta": meta, "names": list(tensors),
                              "layout": layout_of(list(tensors.values()))},
                    list(tensors.values()))
        with self._turns():
            self._check()
            try:
                self._announce(PUBLISH, model.id, work.args, [], [])
                self.broadcast(work)
                self.agree(None, ())  # a rank that cannot build the replica says why
            except BaseException as exc:
                if not agreed(exc):
                    self._out_of_step(exc)
                raise
            finally:
                self._report(model.id)
            self._counts[model.id] = 0
            with self._cache_lock:
                self._twins.pop(model.id, None)
                for key in [k for k in self._shapes if k[0] == model.id]:
                    del self._shapes[key]
            if self.verify:
                self._verify(model, PUBLISH)

    def drop(self, model_id: str) -> None:
        with self._cache_lock:
            self._twins.pop(model_id, None)
        self._counts.pop(model_id, None)
        with self._turns():
            if self.broken.is_set() or self._stopped:
                return  # the model goes here; a broken group's replicas go with it
            try:
                self._announce(DROP, model_id, {}, [], [])
            except GroupLost as exc:
                self._lost(exc)

    # ---------------------------------------------------------------- lifecycle

    def stop(self, code: int = 0) -> None:
        """Tell every rank to exit with code (after the last call; idempotent)."""
        self._closing.set()
        with self._turns():
            if self._stopped or self.broken.is_set():
                return
            self._stopped = True
            try:
                self._announce(STOP, "", {"code": code}, [], [])
            except GroupLost as exc:
                log.warning("could not tell the other ranks to stop: %s", exc)
        self.group.close()

    def _check(self) -> None:
        if self.broken.is_set():
            raise Aborted(self._aborted())
        if self._stopped:
            raise Aborted("the server is shutting down; retry on another instance")

    def _aborted(self) -> str:
        return (f"{self.reason}; the group restarts (torchrun --max-restarts) and restores "
                "its models from --state-dir: retry then")

    def _break(self, reason: str) -> None:
        if self.broken.is_set():
            return
        self.reason = reason
        self.broken.set()
        self._closing.set()
        log.error("distributed group broken: %s", reason)
        callback = self.on_broken
        if callback is not None:
            callback(reason)

    def _lost(self, exc: GroupLost) -> Aborted:
        ranks = self.group.lost()
        who = self.group.describe(ranks) if ranks else "a rank (none stopped its heartbeat)"
        self._break(f"the distributed group lost {who}: {exc}")
        return Aborted(self._aborted())

    def _out_of_step(self, exc: BaseException) -> None:
        """A collective failed, or rank 0 left an op between collectives: the group is done."""
        if isinstance(exc, GroupLost):
            raise self._lost(exc) from None
        if isinstance(exc, Exception):
            log.error("rank 0 failed inside a group command; the ranks are out of step",
                      exc_info=exc)
            self._break(f"rank 0 failed inside a group command ({type(exc).__name__}: {exc})")
            raise Aborted(self._aborted()) from None

    # ---------------------------------------------------------------- the stream

    def _announce(self, op: str, model_id: str, args: dict[str, Any], sizes: list[int],
                  live: list[str]) -> None:
        count = None
        if model_id and op not in (PUBLISH, DROP, VERIFY):
            count = self._counts[model_id] = self._counts.get(model_id, 0) + 1
        self._seq += 1
        before, self._pending = self._pending, []
        self.group.send_header(self._seq, {"op": op, "model": model_id, "args": args,
                                           "sizes": sizes, "live": live, "count": count,
                                           "before": before})
        self._last = time.monotonic()

    def _beat(self) -> None:
        while not self._closing.wait(self._beat_s / 2):
            if time.monotonic() - self._last < self._beat_s or not self._turns.try_take():
                continue
            try:
                if not self.broken.is_set() and not self._stopped:
                    self._announce(NOOP, "", {}, [], [])
            except GroupLost as exc:
                self._lost(exc)
            finally:
                self._turns.release()
                self._report("")

    def _report(self, model_id: str) -> None:
        seconds, self.group.seconds = self.group.seconds, 0.0
        if model_id and seconds:
            self.hooks.phase_seconds(model_id, "communication", seconds)

    def _verify(self, model: Model, op: str) -> None:
        """--dist-verify: every rank hashes the model's state; any difference breaks the group."""
        try:
            self._announce(VERIFY, model.id, {"op": op}, [], [])
            digests = self.group.all_gather_object(state_digest(model))
        except GroupLost as exc:
            raise self._lost(exc) from None
        finally:
            self._report(model.id)
        if len(set(digests)) != 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            self._break(f"the replicas of model {model.id!r} differ after {op} (rank(s) "
                        f"{differ} against rank 0)")
            raise Aborted(self._aborted())
        log.info("replicas identical", extra={"fields": {
            "model": model.id, "op": op, "seq": self._seq, "digest": digests[0],
            "ranks": len(digests)}})

    # ---------------------------------------------------------------- planning (rank 0 only)

    def _plan(self, model: Model, work: Work) -> None:
        """Rows per rank and what the others need to know, before the turn is taken."""
        if work.op in SPLIT:
            work.args["layout"] = layout_of(work.tensors)
            if work.sizes:  # a retained graph's split: the tensors must have its rows
                n = sum(work.sizes)
                if any(work.sizes[1:]):
                    for t in work.tensors:
                        if t is not None and (t.dim() == 0 or int(t.shape[0]) != n):
                            raise InvalidArgument(
                                f"shape {list(t.shape)} does not fit the retained forward's "
                                f"batch of {n} rows")
            else:
                inputs = (work.tensors[:work.args["inputs"]] if work.op == FUSED
                          else work.tensors)
                n = batch_rows(work.tensors)
                if n >= 2 and self._per_sample(model, inputs, n):
                    work.sizes = split_sizes(n, self.world)
                else:
                    work.sizes = [max(n, 1)] + [0] * (self.world - 1)
            target = (work.tensors[work.args["inputs"]] if work.op == FUSED
                      else work.tensors[0] if work.args.get("kind") == "loss" else None)
            if work.op == FUSED or work.args.get("kind") == "loss":
                work.args["weights"] = self._weights(model, work, target)
            nbytes = sum(t.numel() * t.element_size() for t in work.tensors if t is not None)
            if any(work.sizes[1:]) and nbytes <= INLINE_BYTES:
                work.args["inline"] = [None if t is None else _raw(t) for t in work.tensors]
        elif work.op == STEP:
            work.args["groups"] = hyperparameters(model)
        elif work.op == ASSIGN:
            work.args["layout"] = layout_of(work.tensors)

    @staticmethod
    def _weights(model: Model, work: Work, target: torch.Tensor | None) -> list[float]:
        """Each rank's share of the loss, from the terms of its shard (core/parallel.py)."""
        if not any(work.sizes[1:]):
            return [1.0] + [0.0] * (len(work.sizes) - 1)
        counts = []
        for lo, n in zip(offsets(work.sizes), work.sizes):
            shard = target[lo:lo + n] if target is not None else None
            counts.append(model.loss_fn.count(torch.empty(0), shard) if n else 0)
        return shard_weights(counts, model.loss_fn.reduction)

    def _per_sample(self, model: Model, inputs: list[torch.Tensor | None], n: int) -> bool:
        """Whether every output has the batch's rows first (a run on meta tensors, cached):
        only then can the batch be split. Caller holds the model's lock."""
        present = [t for t in inputs if t is not None]
        key = (model.id, tuple((tuple(t.shape), t.dtype) for t in present))
        with self._cache_lock:  # calls on different models plan at the same time
            found = self._shapes.get(key)
            if found is not None:
                return found
            known = model.id in self._twins
            twin = self._twins.get(model.id)
        if not known:
            twin = estimate.meta_twin(model.module)
            with self._cache_lock:
                self._twins[model.id] = twin
        shapes = None
        if twin is not None and present:
            xs = [torch.empty(t.shape, dtype=model.dtype if t.is_floating_point() else t.dtype,
                              device="meta") for t in present]
            try:
                with torch.no_grad():
                    out = twin(*xs)
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
                shapes = [o.shape for o in outs if isinstance(o, torch.Tensor)]
            except Exception:  # noqa: BLE001 - the real call reports its own error
                shapes = None
        ok = per_sample(shapes, n)
        with self._cache_lock:
            self._shapes[key] = ok
            while len(self._shapes) > MAX_SHAPES:
                self._shapes.popitem(last=False)
        return ok
