"""Server-side training loops (Train) and caller-driven steps (TrainStream).

The loop equals this local PyTorch code (docs/models.md "The loop, exactly" documents it for users):

    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i, start in enumerate(range(0, n, batch_size)):   # drop_last drops a short tail
            idx = order[start:start + batch_size]            # shuffle=False: a plain slice
            loss = loss_fn(model(x[idx]), y[idx])
            (loss / accumulation_steps if accumulation_steps > 1 else loss).backward()
            if (i + 1) % accumulation_steps == 0 or it was the epoch's last batch:
                clip_grad_norm_(params, clip)                # when clip_grad_norm > 0
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..catalog.schedules import LRScheduler, build_schedule
from .budget import Reservation
from .datasets import TrainData
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .estimate import BACKWARD, FORWARD
from .hooks import Hooks
from .limits import Limits
from .model import Model, nbytes_of

PROGRESS, EPOCH_END, DONE = "progress", "epoch_end", "done"
FLUSH_S = 0.5  # longest delay of a training run's step/loss metrics
COMPLETED, MAX_STEPS, STOP_LOSS, CANCELLED, NON_FINITE, SHUTDOWN = (
    "completed", "max_steps", "stop_loss", "cancelled", "non_finite", "shutdown")


@dataclass
class TrainOptions:
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 0
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    stop_loss: float | None = None
    accumulation_steps: int = 1
    clip_grad_norm: float = 0.0
    schedule: str = "none"
    schedule_params: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_start_factor: float = 0.0
    log_every_steps: int = 0
    skip_nonfinite: bool = False


@dataclass
class Summary:
    steps: int
    epochs: int
    final_loss: float
    stop_reason: str
    skipped_batches: int
    message: str
    model_step: int


@dataclass
class Event:
    kind: str
    step: int
    epoch: int
    batch_loss: float
    epoch_loss: float
    samples_per_second: float
    learning_rate: float
    grad_norm: float
    elapsed_seconds: float
    val_loss: float | None = None
    summary: Summary | None = None
    run_step: int = 0


@dataclass
class StreamResult:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool


class _Batches(Sequence[Any]):
    """One epoch's batches (slices, or index tensors of the shuffled order), made one at a time.

    Made as a list, batch_size 1 over 4 million samples was 2.5 GB of index views before the
    first step, outside the memory budget.
    """

    def __init__(self, n: int, opts: TrainOptions, order: torch.Tensor | None) -> None:
        self.size = opts.batch_size or n
        self.n_batches = n // self.size if opts.drop_last else -(-n // self.size)
        self.order = order

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.n_batches))]
        if not -self.n_batches <= k < self.n_batches:
            raise IndexError(k)
        start = (k % self.n_batches) * self.size
        if self.order is None:
            return slice(start, start + self.size)
        return self.order[start:start + self.size]


class Trainer:
    """Runs loops, bounds how many run at once, and stops them all on shutdown."""

    def __init__(self, limits: Limits, hooks: Hooks) -> None:
        self.limits = limits
        self.hooks = hooks
        self.shutdown = threading.Event()
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    # ---------------------------------------------------------------- claiming a model

    def _claim(self, model: Model) -> None:
        run_id = uuid.uuid4().hex[:12]
        with self._lock:
            if self._active >= self.limits.max_train_runs:
                raise ResourceExhausted(f"{self._active} training runs are active; the limit "
                                        f"(max_train_runs) is {self.limits.max_train_runs}")
            with model.lock:
                if model.training_run is not None:
                    raise FailedPrecondition(
                        f"model {model.id!r} is already training (run {model.training_run}); a "
                        "second run is refused, not queued: cancel the first or wait for it")
                model.training_run = run_id
            self._active += 1
        self.hooks.train_runs(+1)

    def _release(self, model: Model) -> None:
        with self._lock, model.lock:
            model.training_run = None
            self._active -= 1
        self.hooks.train_runs(-1)

    # ---------------------------------------------------------------- one optimizer step

    @staticmethod
    def _lr(model: Model) -> float:
        return float(model.optimizer.param_groups[0]["lr"]) if model.optimizer else 0.0

    @staticmethod
    def _apply_step(model: Model, sched: LRScheduler | None, clip: float, want_norm: bool
                    ) -> tuple[float, float]:
        """Clip, optimizer.step, zero_grad, scheduler.step (caller holds the lock)."""
        lr = Trainer._lr(model)
        norm = model.optimizer_step(clip, want_norm)  # on every rank of a group
        if model.optimizer is not None and sched is not None:
            sched.step()
        model.step_count += 1
        return norm, lr

    # ---------------------------------------------------------------- Train

    def train(self, model: Model, data: TrainData | None, validation: TrainData | None,
              opts: TrainOptions, cancelled: Callable[[], bool],
              after_step: Callable[[Model], None] | None = None) -> Iterator[Event]:
        """Validate now; the returned stream claims the model when first advanced.

        after_step(model) runs with the model's lock held after every optimizer step (autosave).
        """
        n = self._validate(model, data, validation, opts)
        return self._loop(model, data, validation, opts, n, cancelled, after_step)

    def _validate(self, model: Model, data: TrainData | None, validation: TrainData | None,
                  opts: TrainOptions) -> int:
        if opts.accumulation_steps < 1:
            raise InvalidArgument("options.accumulation_steps: must be >= 1")
        if opts.clip_grad_norm < 0 or not math.isfinite(opts.clip_grad_norm):
            raise InvalidArgument("options.clip_grad_norm: must be a finite number >= 0")
        if data is None:
            if model.loss_fn.needs_target or model.spec.inputs or model.spec.source != "expression":
                raise InvalidArgument("data: this model takes inputs/targets; send inline data or "
                                      "a dataset_id (only objective expressions train without)")
            if opts.max_steps <= 0:
                raise InvalidArgument("options.max_steps: an objective model needs max_steps > 0")
            return 0
        for what, d in (("data", data), ("validation", validation)):
            if d is None:
                continue
            d.check(what)
            if model.loss_fn.needs_target and d.target is None:
                raise InvalidArgument(f"{what}.target: loss {model.loss_fn.name!r} needs targets")
        if opts.epochs == 0 and opts.max_steps == 0:
            raise InvalidArgument("options: set epochs or max_steps")
        return data.num_samples

    def _batches(self, n: int, opts: TrainOptions, epoch: int) -> _Batches:
        if not opts.shuffle:
            return _Batches(n, opts, None)
        # Wrapped into torch's seed range: seed 2**64 - 1 at epoch 1 is seed 0, not an overflow.
        seed = (opts.seed + epoch) % 2**64
        return _Batches(n, opts, torch.randperm(n, generator=torch.Generator().manual_seed(seed)))

    def _stop_requested(self, model: Model, cancelled: Callable[[], bool]) -> str | None:
        if self.shutdown.is_set():
            return SHUTDOWN
        if cancelled() or model.deleted.is_set():
            return CANCELLED
        return None

    def _loop(self, model: Model, data: TrainData | None,
              validation: TrainData | None, opts: TrainOptions, n: int,
              cancelled: Callable[[], bool], after_step: Callable[[Model], None] | None
              ) -> Iterator[Event]:
        # Claimed inside the generator so that a stream never started never holds the model.
        self._claim(model)
        try:
            with self._reserve_run(model, data, validation, opts):
                yield from self._run(model, data, validation, opts, n, cancelled, after_step)
        finally:
            self._release(model)

    @staticmethod
    def _reserve_run(model: Model, data: TrainData | None, validation: TrainData | None,
                     opts: TrainOptions) -> Reservation:
        """Reserve the run's largest step (a full batch's forward, loss, backward and optimizer
        step, or a validation batch) in the memory budget, estimated before the first step."""
        def first(d: TrainData) -> list[torch.Tensor]:
            bs = opts.batch_size or d.num_samples
            return [t[:bs] for t in (*d.inputs, *([d.target] if d.target is not None else []))]

        with model.lock:
            batch = first(data) if data is not None else []
            n_in = len(data.inputs) if data is not None else 0
            target = batch[n_in] if len(batch) > n_in else None
            est = model.estimate_call(BACKWARD, batch[:n_in], False, target)
            # Shuffled batches are gathered copies; the optimizer step has temporaries; the
            # shuffled order is one int64 per sample.
            need = est.peak + nbytes_of(batch) + model.trainable_bytes
            if opts.shuffle and data is not None:
                need += 8 * data.num_samples
            if validation is not None:
                vbatch = first(validation)
                n_val = len(validation.inputs)
                val = model.estimate_call(FORWARD, vbatch[:n_val], True)
                need = max(need, val.peak + nbytes_of(vbatch))
            return model.reserve_call(need, "Train", batch[:n_in])

    def _run(self, model: Model, data: TrainData | None, validation: TrainData | None,
             opts: TrainOptions, n: int, cancelled: Callable[[], bool],
             after_step: Callable[[Model], None] | None) -> Iterator[Event]:
        objective = data is None
        batches_per_epoch = opts.max_steps if objective else len(_Batches(n, opts, None))
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / opts.accumulation_steps))
        epochs = 1 if objective else (opts.epochs or math.ceil(opts.max_steps / steps_per_epoch))
        total = min(epochs * steps_per_epoch, opts.max_steps or epochs * steps_per_epoch)
        with model.lock:
            sched = build_schedule(model.optimizer, opts.schedule, opts.schedule_params,
                                   opts.warmup_steps, opts.warmup_start_factor, total)
            model.clear_grads()
            model.module.train()
        inputs = data.inputs if data is not None else []
        target = data.target if data is not None else None
        start = time.perf_counter()
        steps = samples = skipped = micro = 0
        epoch_done = 0
        last_loss = epoch_loss = grad_norm = lr = math.nan
        reason: str | None = None
        message = ""
        tel = self.hooks
        # Telemetry is written in batches (at events, epoch ends, the end, and at least every
        # FLUSH_S): per-step hook calls cost as much as the step of a small model.
        pending_steps = pending_samples = 0
        flushed = start

        def flush() -> None:
            nonlocal pending_steps, pending_samples, flushed
            if pending_steps or pending_samples:
                tel.steps(model.id, pending_steps, pending_samples)
            if pending_steps:
                tel.loss(model.id, last_loss)
                tel.learning_rate(model.id, lr)
                if not math.isnan(grad_norm):
                    tel.grad_norm(model.id, grad_norm)
            pending_steps = pending_samples = 0
            flushed = time.perf_counter()

        def event(kind: str, epoch: int, val: float | None = None,
                  summary: Summary | None = None) -> Event:
            elapsed = time.perf_counter() - start
            return Event(kind, model.step_count, epoch, last_loss, epoch_loss,
                         samples / elapsed if elapsed > 0 else 0.0, lr, grad_norm, elapsed,
                         val, summary, steps)

        for epoch in range(epochs):
            losses: list[float] = []
            batches: Sequence[Any] = (range(opts.max_steps) if objective
                                      else self._batches(n, opts, epoch))
            last = batches_per_epoch - 1  # len(range(2**63)) would overflow
            for i, idx in enumerate(batches):
                reason = self._stop_requested(model, cancelled)
                if reason:
                    break
                t0 = time.perf_counter()
                with model.lock:
                    if objective:
                        value = model.train_batch([], None, opts.accumulation_steps)
                        batch_n = 1
                    else:
                        xs = [t[idx] for t in inputs]
                        y = target[idx] if target is not None else None
                        # forward, loss and (loss / accumulation_steps).backward(), unless the
                        # loss is not finite; in a group, every rank on its shard
                        value = model.train_batch(xs, y, opts.accumulation_steps)
                        batch_n = int(xs[0].shape[0]) if xs else int(y.shape[0])  # type: ignore
                    if not math.isfinite(value):
                        if opts.skip_nonfinite:
                            skipped += 1
                            continue
                        reason = NON_FINITE
                        message = (f"the loss was {value} at epoch {epoch}, batch {i} (model step "
                                   f"{model.step_count}); lower the learning rate, clip gradients "
                                   "or set skip_nonfinite")
                        break
                    micro += 1
                    stepped = micro == opts.accumulation_steps or i == last
                    if stepped:
                        # The norm costs a pass over the gradients: only when an event shows it.
                        emit = (bool(opts.log_every_steps)
                                and (steps + 1) % opts.log_every_steps == 0
                                ) or i == last or steps + 1 == opts.max_steps
                        grad_norm, lr = self._apply_step(model, sched, opts.clip_grad_norm, emit)
                        micro = 0
                        steps += 1
                        if after_step is not None:
                            after_step(model)
                last_loss = value
                losses.append(value)
                samples += batch_n
                t1 = time.perf_counter()
                tel.phase_seconds(model.id, "train_step", t1 - t0)
                # Every batch's samples count, also those that only accumulate gradients.
                pending_samples += batch_n
                if stepped:
                    pending_steps += 1
                if t1 - flushed > FLUSH_S:
                    flush()
                if stepped:
                    if opts.log_every_steps and steps % opts.log_every_steps == 0:
                        epoch_loss = math.fsum(losses) / len(losses)
                        flush()
                        yield event(PROGRESS, epoch)
                    if opts.max_steps and steps >= opts.max_steps:
                        reason = MAX_STEPS
                        break
            if losses:
                epoch_loss = math.fsum(losses) / len(losses)
            flush()
            if reason in (CANCELLED, SHUTDOWN, NON_FINITE) or not losses:
                break
            epoch_done += 1
            val = self._evaluate(model, validation, opts) if validation is not None else None
            tel.loss(model.id, epoch_loss)
            if not math.isnan(lr):
                tel.learning_rate(model.id, lr)
            if not math.isnan(grad_norm):
                tel.grad_norm(model.id, grad_norm)
            yield event(EPOCH_END, epoch, val)
            if reason:
                break
            if opts.stop_loss is not None and epoch_loss < opts.stop_loss:
                reason = STOP_LOSS
                break
        # The last step's loss is what local code would report after the loop.
        final = epoch_loss if not math.isnan(epoch_loss) else last_loss
        summary = Summary(steps, epoch_done, final, reason or COMPLETED, skipped, message,
                          model.step_count)
        if not math.isnan(final):
            tel.loss(model.id, final)
        yield event(DONE, max(0, epoch_done - 1) if reason != CANCELLED else epoch_done,
                    summary=summary)

    def _evaluate(self, model: Model, data: TrainData, opts: TrainOptions) -> float:
        """Mean loss over the validation set in eval mode, weighting batches by their size."""
        n = data.num_samples
        bs = opts.batch_size or n
        total = 0.0
        with model.lock, torch.no_grad():
            model.module.eval()
            try:
                for s in range(0, n, bs):
                    xs = model.prepare_inputs([t[s:s + bs] for t in data.inputs])
                    y = model.prepare_target(
                        data.target[s:s + bs] if data.target is not None else None)
                    loss = model.loss_fn(model.run_module(xs), y)
                    size = min(bs, n - s)
                    total += loss.item() * (size if model.loss_fn.reduction == "mean" else 1)
            finally:
                model.module.train()
        return total / n if model.loss_fn.reduction == "mean" else total

    # ---------------------------------------------------------------- TrainStream

    def open_stream(self, model: Model, clip: float, schedule: str,
                    schedule_params: dict[str, Any], warmup_steps: int,
                    warmup_start_factor: float, skip_nonfinite: bool) -> StreamSession:
        """Validate a TrainStream config; the session claims the model at its first batch."""
        if clip < 0 or not math.isfinite(clip):
            raise InvalidArgument("config.clip_grad_norm: must be a finite number >= 0")
        return StreamSession(self, model, clip, schedule, schedule_params, warmup_steps,
                             warmup_start_factor, skip_nonfinite)

    def stream(self, model: Model, clip: float, schedule: str, schedule_params: dict[str, Any],
               warmup_steps: int, warmup_start_factor: float, skip_nonfinite: bool,
               batches: Iterable[TrainData], cancelled: Callable[[], bool]
               ) -> Iterator[StreamResult]:
        session = self.open_stream(model, clip, schedule, schedule_params, warmup_steps,
                                   warmup_start_factor, skip_nonfinite)
        return self._stream(session, batches, cancelled)

    @staticmethod
    def _stream(session: StreamSession, batches: Iterable[TrainData],
                cancelled: Callable[[], bool]) -> Iterator[StreamResult]:
        try:
            for batch in batches:
                if cancelled():
                    return
                result = session.step(batch)
                if result is None:
                    return
                yield result
        finally:
            session.close()


class StreamSession:
    """One TrainStream: a step per batch, called by whoever receives the batches.

    The model and a training slot are claimed at the first batch, not when the stream opens, so
    a stream that only sent its config holds nothing; close() releases them.
    """

    def __init__(self, trainer: Trainer, model: Model, clip: float, schedule: str,
                 schedule_params: dict[str, Any], warmup_steps: int,
                 warmup_start_factor: float, skip_nonfinite: bool) -> None:
        self.trainer = trainer
        self.model = model
        self.clip = clip
        self.skip_nonfinite = skip_nonfinite
        self._schedule = (schedule, schedule_params, warmup_steps, warmup_start_factor)
        self._sched: LRScheduler | None = None
        self._claimed = False
        self._closed = False
        self._lock = threading.Lock()  # step() and close() never overlap (they may run on
        self.batches = 0               # different threads: the caller's last step, a cancel)

    def _start(self) -> None:
        model = self.model
        self.trainer._claim(model)
        self._claimed = True
        schedule, params, warmup, start_factor = self._schedule
        with model.lock:
            self._sched = build_schedule(model.optimizer, schedule, params, warmup, start_factor,
                                         1 << 30)
            model.clear_grads()
            model.module.train()

    def step(self, batch: TrainData) -> StreamResult | None:
        """One optimizer step on batch; None once the stream must end (shutdown, model deleted)."""
        with self._lock:
            return self._step(batch)

    def _step(self, batch: TrainData) -> StreamResult | None:
        if self._closed:
            return None
        if not self._claimed:
            self._start()
        model, trainer = self.model, self.trainer
        k = self.batches
        self.batches += 1
        if trainer.shutdown.is_set() or model.deleted.is_set():
            return None
        batch.check(f"batch {k}")
        t0 = time.perf_counter()
        with model.lock, model.reserve_batch(BACKWARD, batch.inputs, batch.target,
                                             "TrainStream", model.trainable_bytes):
            value = model.train_batch(batch.inputs, batch.target)  # no backward unless finite
            if not math.isfinite(value):
                if not self.skip_nonfinite:
                    raise FailedPrecondition(
                        f"batch {k}: the loss was {value}; the stream ends (set "
                        "skip_nonfinite to skip such batches)")
                return StreamResult(model.step_count, value, math.nan, trainer._lr(model), True)
            norm, lr = trainer._apply_step(model, self._sched, self.clip, want_norm=True)
        hooks = trainer.hooks
        hooks.phase_seconds(model.id, "train_step", time.perf_counter() - t0)
        hooks.steps(model.id, 1, batch.num_samples)
        hooks.loss(model.id, value)
        hooks.learning_rate(model.id, lr)
        if not math.isnan(norm):
            hooks.grad_norm(model.id, norm)
        return StreamResult(model.step_count, value, norm, lr, False)

    def close(self) -> None:
        """Release the model and the slot (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._claimed:
                self.trainer._release(self.model)
