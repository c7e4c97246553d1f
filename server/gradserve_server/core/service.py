"""Core: the stores and the trainer wired together, plus what spans them (checkpoints, shutdown)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch

from .checkpoints import CheckpointInfo, CheckpointStore
from .datasets import DatasetStore, TrainData
from .errors import FailedPrecondition
from .hooks import Hooks
from .limits import Limits
from .model import Model
from .store import ModelStore
from .trainer import DONE, Event, Trainer, TrainOptions

log = logging.getLogger("gradserve.train")


class Core:
    def __init__(self, device: torch.device, limits: Limits, hooks: Hooks, state_dir: str = "",
                 autosave_steps: int = 0, autosave_seconds: float = 0.0) -> None:
        self.device = device
        self.limits = limits
        self.hooks = hooks
        self.models = ModelStore(device, limits, hooks)
        self.datasets = DatasetStore(limits.max_dataset_bytes, hooks)
        self.trainer = Trainer(limits, hooks)
        self.checkpoints = CheckpointStore(state_dir)
        self.autosave_steps = autosave_steps
        self.autosave_seconds = autosave_seconds

    # ---------------------------------------------------------------- training with autosave

    def train(self, model: Model, data: TrainData | None, validation: TrainData | None,
              options: TrainOptions, cancelled: Callable[[], bool], checkpoint_every: int = 0
              ) -> Iterator[Event]:
        every = checkpoint_every or self.autosave_steps
        autosave = self.checkpoints.dir is not None and (every > 0 or self.autosave_seconds > 0)
        state = {"step": model.step_count, "time": time.monotonic()}

        def after_step(m: Model) -> None:  # called with m.lock held, right after a step
            due_steps = every > 0 and m.step_count - state["step"] >= every
            due_time = (self.autosave_seconds > 0
                        and time.monotonic() - state["time"] >= self.autosave_seconds)
            if due_steps or due_time:
                self.checkpoints.save(m)
                state["step"], state["time"] = m.step_count, time.monotonic()

        events = self.trainer.train(model, data, validation, options, cancelled,
                                    after_step if autosave else None)
        return self._logged(model, events)

    def _logged(self, model: Model, events: Iterator[Event]) -> Iterator[Event]:
        """Pass events through; one log line and one train_ended hook per run, however it ends."""
        start = time.perf_counter()
        # Unless a summary or an error replaces it: the caller closed the stream.
        ended: dict[str, str] = {"stop_reason": "cancelled"}
        try:
            for event in events:
                if event.kind == DONE and event.summary is not None:
                    s = event.summary
                    ended = {}
                    self.hooks.train_ended(s.stop_reason)
                    log.info("train run finished", extra={"fields": {
                        "model": model.id, "steps": s.steps, "epochs": s.epochs,
                        "final_loss": s.final_loss, "stop_reason": s.stop_reason,
                        "seconds": round(time.perf_counter() - start, 3)}})
                yield event
        except Exception as exc:
            ended = {"stop_reason": "error", "error": type(exc).__name__}
            raise
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # release the model now, not whenever the generator is collected
            if ended:  # one line per run, also when it ends without a summary
                self.hooks.train_ended(ended["stop_reason"])
                log.info("train run ended", extra={"fields": {
                    "model": model.id, "model_step": model.step_count, **ended,
                    "seconds": round(time.perf_counter() - start, 3)}})

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, model_id: str, name: str = "") -> CheckpointInfo:
        model = self.models.get(model_id)
        with model.lock:
            return self.checkpoints.save(model, name)

    def load_checkpoint(self, name: str, model_id: str = "") -> Model:
        meta, tensors = self.checkpoints.read(name)
        target = model_id or meta["model_id"]
        existing = self.models.find(target)
        if existing is not None and existing.training_run is not None:
            raise FailedPrecondition(f"model {target!r} is training; cancel the run first")
        spec = self.checkpoints.spec_of(meta, tensors)
        model = Model(target, spec, self.device, self.limits, self.hooks)
        self.checkpoints.restore(model, meta, tensors)
        self.models.put(model)
        return model

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return self.checkpoints.list()

    def restore_all(self) -> int:
        """At start-up: every checkpoint named after its own model comes back under that id."""
        restored = 0
        for info in self.checkpoints.list():
            if info.name == info.model_id:
                self.load_checkpoint(info.name)
                restored += 1
        return restored

    def checkpoint_all(self, deadline: float | None = None) -> int:
        """At shutdown: checkpoint every model (after Train loops stopped).

        deadline: time.monotonic() by which saving must end (the drain's remaining grace).
        """
        if self.checkpoints.dir is None:
            return 0
        saved = 0
        for model in self.models.list():
            with model.lock:
                self.checkpoints.save(model)
            saved += 1
        return saved
