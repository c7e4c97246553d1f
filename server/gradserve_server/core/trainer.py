"""Server-side training loops (Train) and caller-driven steps (TrainStream).

The loop equals the local PyTorch code in docs/models.md "The loop, exactly" (written there once,
for users; the differential oracle in tests/oracle/ runs that text against this code):

    for epoch in range(epochs):
        for batch in the epoch's batches:                    # _batches: the documented order
            micro-step: forward, loss, backward of loss / accumulation_steps  (_micro_step)
            when accumulation_steps micro-steps wait, or at the epoch's last batch:
                optimizer step: clip, optimizer.step, scheduler.step, zero_grad (_optimizer_step)
        epoch end: epoch loss, validation, stop_loss (_end_epoch)

An objective model (no data) runs one epoch of max_steps * accumulation_steps evaluations and
stops as soon as a value is below stop_loss, before its backward.
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
from gradserve.results import TrainEvent, TrainSummary

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
class StreamResult:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool


@dataclass(frozen=True)
class RunPlan:
    """How long a Train run is, worked out before it starts (stops may end it sooner)."""

    epochs: int
    batches_per_epoch: int
    total_steps: int


@dataclass
class _Run:
    """The state of one Train run, shared by its pieces (batches, micro-steps, optimizer steps,
    epoch ends, metrics)."""

    model: Model
    opts: TrainOptions
    plan: RunPlan
    objective: bool
    schedule: LRScheduler | None
    after_step: Callable[[Model], None] | None
    start: float
    steps: int = 0
    samples: int = 0
    skipped: int = 0
    micro: int = 0  # batches whose gradients wait for the next optimizer step
    epochs_done: int = 0
    losses: list[float] = field(default_factory=list)  # this epoch's batch losses
    last_loss: float = math.nan
    epoch_loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = math.nan
    reason: str | None = None
    message: str = ""
    # Metrics not yet written: they are written in batches (at events, epoch ends, the end, and
    # at least every FLUSH_S), since per-step hook calls cost as much as a small model's step.
    pending_steps: int = 0
    pending_samples: int = 0
    flushed: float = 0.0

    def event(self, kind: str, epoch: int, val: float | None = None,
              summary: TrainSummary | None = None) -> TrainEvent:
        elapsed = time.perf_counter() - self.start
        return TrainEvent(kind, self.model.step_count, epoch, self.last_loss, self.epoch_loss,
                          self.samples / elapsed if elapsed > 0 else 0.0, self.lr,
                          self.grad_norm, elapsed, val, summary, self.steps,
                          self.plan.total_steps)

    def update_epoch_loss(self) -> None:
        if self.losses:
            self.epoch_loss = math.fsum(self.losses) / len(self.losses)


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

    # ---------------------------------------------------------------- Train

    def train(self, model: Model, data: TrainData | None, validation: TrainData | None,
              opts: TrainOptions, cancelled: Callable[[], bool],
              after_step: Callable[[Model], None] | None = None) -> Iterator[TrainEvent]:
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

    def plan(self, objective: bool, n: int, opts: TrainOptions) -> RunPlan:
        """Epochs, batches per epoch and optimizer steps of a run that is not stopped early."""
        batches_per_epoch = (opts.max_steps * opts.accumulation_steps if objective
                             else len(_Batches(n, opts, None)))
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / opts.accumulation_steps))
        epochs = 1 if objective else (opts.epochs or math.ceil(opts.max_steps / steps_per_epoch))
        total = min(epochs * steps_per_epoch, opts.max_steps or epochs * steps_per_epoch)
        return RunPlan(epochs, batches_per_epoch, total)

    def _batches(self, n: int, opts: TrainOptions, epoch: int) -> _Batches:
        """The epoch's batches of sample indices, as the documented loop takes them."""
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
              ) -> Iterator[TrainEvent]:
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
             after_step: Callable[[Model], None] | None) -> Iterator[TrainEvent]:
        """The loop: epochs of batches, an event at the chosen cadence, the summary last."""
        plan = self.plan(data is None, n, opts)
        with model.lock:
            sched = build_schedule(model.optimizer, opts.schedule, opts.schedule_params,
                                   opts.warmup_steps, opts.warmup_start_factor, plan.total_steps)
            model.clear_grads()  # on every rank of a group
            model.module.train()
        start = time.perf_counter()
        run = _Run(model, opts, plan, data is None, sched, after_step, start, flushed=start)
        for epoch in range(plan.epochs):
            run.losses = []
            batches: Sequence[Any] = (range(plan.batches_per_epoch) if data is None
                                      else self._batches(n, opts, epoch))
            last = plan.batches_per_epoch - 1  # len(range(2**63)) would overflow
            for i, idx in enumerate(batches):
                run.reason = self._stop_requested(model, cancelled)
                if run.reason:
                    break
                stepped = self._train_batch(run, data, idx, epoch, i, i == last)
                if run.reason:
                    break
                if stepped:
                    if opts.log_every_steps and run.steps % opts.log_every_steps == 0:
                        run.update_epoch_loss()
                        self._flush(run)
                        yield run.event(PROGRESS, epoch)
                    if opts.max_steps and run.steps >= opts.max_steps:
                        run.reason = MAX_STEPS
                        break
            end = self._end_epoch(run, epoch, validation)
            if end is None:
                break
            yield end
            if run.reason:
                break
            if opts.stop_loss is not None and run.epoch_loss < opts.stop_loss:
                run.reason = STOP_LOSS
                break
        yield self._done(run)

    def _train_batch(self, run: _Run, data: TrainData | None, idx: Any, epoch: int, i: int,
                     last: bool) -> bool:
        """One batch: a micro-step, then an optimizer step when its accumulation group is
        complete or the epoch ends (also when that last batch was skipped: the epoch's pending
        gradients are always applied). Returns whether it stepped. A batch that stops the run
        (run.reason: a non-finite loss, an objective below stop_loss) does not step."""
        model, opts = run.model, run.opts
        t0 = time.perf_counter()
        stop_below = opts.stop_loss if run.objective else None
        with model.lock:
            value, batch_n = self._micro_step(model, data, idx, opts.accumulation_steps,
                                              stop_below)
            finite = math.isfinite(value)
            if not finite and not opts.skip_nonfinite:
                run.reason = NON_FINITE
                run.message = (f"the loss was {value} at epoch {epoch}, batch {i} (model "
                               f"step {model.step_count}); lower the learning rate, clip "
                               "gradients or set skip_nonfinite")
                return False
            if not finite:
                run.skipped += 1
            elif stop_below is not None and value < stop_below:
                run.reason = STOP_LOSS  # the local `while f() >= stop_loss: step`
            else:
                run.micro += 1
            stepped = (run.reason is None and run.micro > 0
                       and (run.micro == opts.accumulation_steps or last))
            if stepped:
                # The norm costs a pass over the gradients: only when an event may show it (an
                # epoch's last step is at its last batch unless batches can be skipped or an
                # objective can stop; then at every step).
                shown = (bool(opts.log_every_steps)
                         and (run.steps + 1) % opts.log_every_steps == 0
                         ) or last or run.steps + 1 == opts.max_steps or (
                    opts.skip_nonfinite or run.objective)
                self._optimizer_step(run, shown)
        if finite:
            run.last_loss = value
            run.losses.append(value)
            run.samples += batch_n
            # Every batch's samples count, also those that only accumulate gradients.
            run.pending_samples += batch_n
        t1 = time.perf_counter()
        self.hooks.phase_seconds(model.id, "train_step", t1 - t0)
        if stepped:
            run.pending_steps += 1
        if t1 - run.flushed > FLUSH_S:
            self._flush(run)
        return stepped

    @staticmethod
    def _micro_step(model: Model, data: TrainData | None, idx: Any, accumulation: int,
                    stop_below: float | None = None) -> tuple[float, int]:
        """Forward and loss of one batch (data None: the objective), then the backward of the
        loss divided by `accumulation` (when gradients accumulate over several batches) unless
        the loss is not finite or below stop_below. Returns (the loss, samples in the batch).
        Caller holds the lock."""
        if data is None:
            return model.train_batch([], None, accumulation, stop_below), 1
        xs = [t[idx] for t in data.inputs]
        y = data.target[idx] if data.target is not None else None
        # In a group every rank runs this on its shard of the batch (core/parallel.py).
        value = model.train_batch(xs, y, accumulation, stop_below)
        return value, int(xs[0].shape[0]) if xs else int(y.shape[0])  # type: ignore[union-attr]

    @staticmethod
    def _optimizer_step(run: _Run, want_norm: bool) -> None:
        """The optimizer step closing an accumulation group, through the model's one step path;
        then the run's counters and after_step (autosave). Caller holds the lock."""
        stats = run.model.apply_step(clip=run.opts.clip_grad_norm, schedule=run.schedule,
                                     want_norm=want_norm)
        run.grad_norm, run.lr = stats.grad_norm, stats.lr
        run.micro = 0
        run.steps += 1
        if run.after_step is not None:
            run.after_step(run.model)

    def _flush(self, run: _Run) -> None:
        """Write the run's pending step and loss metrics."""
        tel, model_id = self.hooks, run.model.id
        if run.pending_steps or run.pending_samples:
            tel.steps(model_id, run.pending_steps, run.pending_samples)
        if run.pending_steps:
            tel.loss(model_id, run.last_loss)
            tel.learning_rate(model_id, run.lr)
            if not math.isnan(run.grad_norm):
                tel.grad_norm(model_id, run.grad_norm)
        run.pending_steps = run.pending_samples = 0
        run.flushed = time.perf_counter()

    def _end_epoch(self, run: _Run, epoch: int, validation: TrainData | None) -> TrainEvent | None:
        """The epoch's loss, validation and metrics, as an EPOCH_END event; None when the epoch
        did not complete (cancelled, shut down, non-finite, or every batch skipped)."""
        run.update_epoch_loss()
        self._flush(run)
        if run.reason in (CANCELLED, SHUTDOWN, NON_FINITE) or not run.losses:
            return None
        run.epochs_done += 1
        val = (self._evaluate(run.model, validation, run.opts) if validation is not None
               else None)
        tel, model_id = self.hooks, run.model.id
        tel.loss(model_id, run.epoch_loss)
        if not math.isnan(run.lr):
            tel.learning_rate(model_id, run.lr)
        if not math.isnan(run.grad_norm):
            tel.grad_norm(model_id, run.grad_norm)
        return run.event(EPOCH_END, epoch, val)

    def _done(self, run: _Run) -> TrainEvent:
        """The DONE event with the run's summary."""
        # Data: the epoch loss of the last epoch that ran a batch (what a local loop prints
        # last); an objective: the last value of f computed.
        final = (run.last_loss if run.objective or math.isnan(run.epoch_loss)
                 else run.epoch_loss)
        reason = run.reason or COMPLETED
        summary = TrainSummary(run.steps, run.epochs_done, final, reason, run.skipped, run.message,
                          run.model.step_count)
        if not math.isnan(final):
            self.hooks.loss(run.model.id, final)
        epoch = run.epochs_done if reason == CANCELLED else max(0, run.epochs_done - 1)
        return run.event(DONE, epoch, summary=summary)

    def _evaluate(self, model: Model, data: TrainData, opts: TrainOptions) -> float:
        """The loss of the whole validation set in eval mode, computed in batches: per batch the
        loss summed and what a mean divides by (Loss.sum_and_count), so that ignore_index and
        class weights count as they do in one call over the set, whatever the batch size."""
        n = data.num_samples
        bs = opts.batch_size or n
        sums: list[float] = []
        counts: list[float] = []
        with model.lock, torch.no_grad():
            model.module.eval()
            try:
                for s in range(0, n, bs):
                    xs = model.prepare_inputs([t[s:s + bs] for t in data.inputs])
                    y = model.prepare_target(
                        data.target[s:s + bs] if data.target is not None else None)
                    total, count = model.loss_fn.sum_and_count(model.run_module(xs), y)
                    sums.append(total)
                    counts.append(count)
            finally:
                model.module.train()
        if model.loss_fn.reduction != "mean":
            return math.fsum(sums)
        denominator = math.fsum(counts)
        return math.fsum(sums) / denominator if denominator else math.nan

    # ---------------------------------------------------------------- TrainStream

    def open_stream(self, model: Model, clip: float, schedule: str,
                    schedule_params: dict[str, Any], warmup_steps: int,
                    warmup_start_factor: float, skip_nonfinite: bool) -> StreamSession:
        """Validate a TrainStream config; the session claims the model at its first batch."""
        if clip < 0 or not math.isfinite(clip):
            raise InvalidArgument("config.clip_grad_norm: must be a finite number >= 0")
        if schedule == "cosine" and "t_max" not in schedule_params:
            raise InvalidArgument("config.schedule (cosine).t_max: required in a TrainStream (its "
                                  "length is unknown, so there is no default)")
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
            # A stream's length is unknown: cosine needs its t_max (build_schedule says so).
            self._sched = build_schedule(model.optimizer, schedule, params, warmup, start_factor,
                                         None)
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
                return StreamResult(model.step_count, value, math.nan, model.learning_rate, True)
            stats = model.apply_step(clip=self.clip, schedule=self._sched, want_norm=True)
            norm, lr = stats.grad_norm, stats.lr
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
