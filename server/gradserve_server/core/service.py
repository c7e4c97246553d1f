"""Core: the stores and the trainer wired together, plus what spans them (checkpoints, shutdown)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from gradserve.results import CheckpointInfo, TrainEvent

from . import estimate, statedir
from .budget import MemoryBudget, fmt_bytes
from .checkpoints import OVER_LIMIT, CheckpointStore, CheckpointUnusable
from .datasets import DatasetStore, TrainData
from .errors import FailedPrecondition, GradServeFault, NotFound, ResourceExhausted
from .hooks import Hooks
from .limits import Limits
from .model import Model
from .parallel import LOCAL, Parallel
from .store import ModelStore
from .trainer import DONE, Trainer, TrainOptions

log = logging.getLogger("gradserve.train")
state_log = logging.getLogger("gradserve.state")

# Why a checkpoint was written: the trigger label of gradserve_checkpoint_saves_total.
REQUEST, AUTOSAVE, SHUTDOWN_SAVE = "request", "autosave", "shutdown"
SAVE_TRIGGERS = (REQUEST, AUTOSAVE, SHUTDOWN_SAVE)


@dataclass
class CheckpointResult:
    """What checkpoint_all did: every model is in exactly one list."""

    saved: list[str] = field(default_factory=list)       # written now
    unchanged: list[str] = field(default_factory=list)   # its checkpoint was already current
    failed: dict[str, str] = field(default_factory=dict)  # model id -> why

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class ServerInfo:
    """What GetServerInfo answers: versions, and the devices the server computes on."""

    version: str
    torch_version: str
    world_size: int = 1
    backend: str = ""
    devices: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


@dataclass
class RestoreResult:
    """What start-up restored: models and datasets, and the files moved to quarantine/."""

    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)  # file -> why


class Core:
    def __init__(self, device: torch.device, limits: Limits, hooks: Hooks, state_dir: str = "",
                 autosave_steps: int = 0, autosave_seconds: float = 0.0,
                 persist_datasets: bool = False, parallel: Parallel = LOCAL) -> None:
        """Raises StartupError when state_dir is given but unusable (checked now, not at exit)."""
        self.device = device
        self.limits = limits
        self.hooks = hooks
        self.budget = MemoryBudget(limits.max_memory_bytes, hooks,
                                   max_call=limits.max_compute_bytes)
        estimate.warm_up()
        self.parallel = parallel
        self.info = ServerInfo("unknown", torch.__version__, parallel.world, "", [str(device)])
        self.models = ModelStore(device, limits, hooks, self.budget, parallel)
        self.trainer = Trainer(limits, hooks)
        self.checkpoints = CheckpointStore(state_dir, hooks)
        datasets_dir = Path(state_dir) / "datasets" if state_dir and persist_datasets else None
        if state_dir:
            statedir.prepare(Path(state_dir), ("datasets",))
        self.datasets = DatasetStore(limits.max_dataset_bytes, hooks, datasets_dir, self.budget)
        self.autosave_steps = autosave_steps
        self.autosave_seconds = autosave_seconds
        self._autosaver: threading.Thread | None = None
        self._stop_autosave = threading.Event()
        self._autosave_errors: dict[str, str] = {}

    # ---------------------------------------------------------------- start and stop

    def start(self) -> RestoreResult:
        """Restore what the state dir holds, then start the background autosave."""
        result = self.restore_all()
        if self.checkpoints.dir is not None and self.autosave_seconds > 0:
            self._stop_autosave.clear()
            self._autosaver = threading.Thread(target=self._autosave_loop, daemon=True,
                                               name="gradserve-autosave")
            self._autosaver.start()
        return result

    def stop_autosave(self) -> None:
        """Stop the background autosave, waiting for a write in progress."""
        self._stop_autosave.set()
        thread, self._autosaver = self._autosaver, None
        if thread is not None:
            thread.join()

    # ---------------------------------------------------------------- models

    def delete_model(self, model_id: str) -> None:
        """Drop the model and its own checkpoint (the one start-up restores): it stays gone."""
        self.models.delete(model_id)
        if self.checkpoints.dir is not None:
            # After the model is marked deleted: a save of it that starts now is refused, one
            # already writing finishes first (same name lock), then its file is removed.
            self.checkpoints.delete(model_id)

    def describe_budget(self) -> str:
        """'17.6 GiB (75% of 23.5 GiB, physical memory)': for the start-up log line."""
        if not self.limits.max_memory_bytes:
            return "none"
        return f"{fmt_bytes(self.limits.max_memory_bytes)} ({self.limits.memory_source})"

    def check_request(self, nbytes: int) -> None:
        """Refuse a request over --max-request-mb, or one the memory budget has no room for.

        The transport calls this with the request's size before the core works on it; the core
        then charges the request's tensors to the budget while a call holds them.
        """
        limit = self.limits.max_request_bytes
        if nbytes > limit:
            raise ResourceExhausted(f"the request holds {nbytes} bytes; the limit "
                                    f"(max_request_mb) is {limit // (1024 * 1024)} MiB")
        if nbytes > self.budget.free:
            raise self.budget.refusal(nbytes, "the request")

    # ---------------------------------------------------------------- training with autosave

    def train(self, model: Model, data: TrainData | None, validation: TrainData | None,
              options: TrainOptions, cancelled: Callable[[], bool], checkpoint_every: int = 0
              ) -> Iterator[TrainEvent]:
        every = checkpoint_every or self.autosave_steps
        state = {"step": model.step_count}

        def after_step(m: Model) -> None:  # called with m.lock held, right after a step
            if m.step_count - state["step"] >= every:
                self._save_logged(lambda: self.checkpoints.save(m), m.id, AUTOSAVE)
                state["step"] = m.step_count

        autosave = self.checkpoints.dir is not None and every > 0
        events = self.trainer.train(model, data, validation, options, cancelled,
                                    after_step if autosave else None)
        return self._logged(model, events)

    def _logged(self, model: Model, events: Iterator[TrainEvent]) -> Iterator[TrainEvent]:
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

    def _save_logged(self, save: Callable[[], CheckpointInfo | None], model_id: str,
                     trigger: str) -> CheckpointInfo | None:
        """Run a save, count it, and log a failure once per model until it succeeds again."""
        try:
            info = save()
        except GradServeFault as exc:
            if isinstance(exc, NotFound) and trigger != REQUEST:
                return None  # deleted while being saved: nothing to keep
            self.hooks.checkpoint_saved(trigger, "error")
            if trigger == REQUEST:
                raise  # the caller is told; nothing to log
            message = str(exc)
            if self._autosave_errors.get(model_id) != message:
                self._autosave_errors[model_id] = message
                state_log.error("checkpoint of model %s failed (%s): %s", model_id, trigger,
                                message, extra={"fields": {"model": model_id, "trigger": trigger}})
            return None
        if info is not None:
            self.hooks.checkpoint_saved(trigger, "ok")
            if self._autosave_errors.pop(model_id, None) is not None:
                state_log.info("checkpoint of model %s succeeded again", model_id)
        return info

    def save_checkpoint(self, model_id: str, name: str = "") -> CheckpointInfo:
        """SaveCheckpoint: a snapshot under the model's lock, written after it is released."""
        model = self.models.get(model_id)
        self.checkpoints.path(name or model_id)  # a bad name fails before any copy is made
        with model.lock:
            snap = self.checkpoints.snapshot(model, copy=True)
        info = self._save_logged(lambda: self.checkpoints.write(snap, name), model_id, REQUEST)
        assert info is not None
        return info

    def load_checkpoint(self, name: str, model_id: str = "") -> Model:
        loaded = self.checkpoints.read(name)
        target = model_id or loaded.model_id
        existing = self.models.find(target)
        if existing is not None and existing.training_run is not None:
            raise FailedPrecondition(f"model {target!r} is training; cancel the run first")
        model = self.checkpoints.build(loaded, target, self.device, self.limits, self.hooks,
                                       self.budget)
        if name == target:  # the model is exactly its own checkpoint: nothing to autosave
            model.saved_version = model.version
        try:
            self.models.put(model)
        except BaseException:
            model.close()  # never stored: give its memory budget back
            raise
        return model

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return self.checkpoints.list()

    def delete_checkpoint(self, name: str) -> None:
        """DeleteCheckpoint. A live model's own checkpoint is written again at its next save."""
        if not self.checkpoints.delete(name):
            raise NotFound(f"name: no checkpoint {name!r} in the state dir")
        model = self.models.find(name)
        if model is not None:
            model.saved_version = 0  # its state is no longer on disk: the next save writes it

    def restore_all(self) -> RestoreResult:
        """At start-up: every checkpoint named after its own model comes back under that id.

        One bad file never stops the server: unreadable, invalid, mismatched or over-limit
        files are moved to quarantine/ (logged, counted), and the rest are restored.
        """
        result = RestoreResult()
        if self.checkpoints.dir is None:
            return result
        for path in self.checkpoints.files():
            try:
                meta = self.checkpoints.header(path)
                name = path.name.removesuffix(".safetensors")
                if name != meta["model_id"]:
                    continue  # a named snapshot: loaded on request only
                loaded = self.checkpoints.read_path(path)
                model = self.checkpoints.build(loaded, name, self.device, self.limits,
                                               self.hooks, self.budget)
                model.saved_version = model.version
                try:
                    self.models.put(model)
                except BaseException:
                    model.close()  # never stored: give its memory budget back
                    raise
                result.models.append(name)
            except CheckpointUnusable as exc:
                self.checkpoints.quarantine(path, exc.reason, str(exc))
                result.quarantined[path.name] = str(exc)
            except ResourceExhausted as exc:
                detail = f"checkpoint {path.name}: {exc}"
                self.checkpoints.quarantine(path, OVER_LIMIT, detail)
                result.quarantined[path.name] = detail
        datasets, bad = self.datasets.restore()
        result.datasets = datasets
        for file, (reason, detail) in bad.items():
            assert self.datasets.persist_dir is not None
            self.checkpoints.quarantine(self.datasets.persist_dir / file, reason, detail)
            result.quarantined[f"datasets/{file}"] = detail
        return result

    # ---------------------------------------------------------------- background autosave

    def _autosave_loop(self) -> None:
        while not self._stop_autosave.wait(self.autosave_seconds):
            self.autosave_once()

    def autosave_once(self) -> int:
        """Write every model changed since its last checkpoint; returns how many were written.

        Each snapshot is taken under the model's lock (a copy: one model's size at a time) and
        written after the lock is released, so calls on the model do not wait for the disk.
        """
        written = 0
        for model in self.models.list():
            if self._stop_autosave.is_set():
                break
            if model.version == model.saved_version or model.deleted.is_set():
                continue
            with model.lock:
                snap = self.checkpoints.snapshot(model, copy=True)
            info = self._save_logged(partial(self.checkpoints.write, snap, if_newer=True),
                                     model.id, AUTOSAVE)
            written += info is not None
        return written

    # ---------------------------------------------------------------- shutdown

    def checkpoint_all(self, deadline: float | None = None) -> CheckpointResult:
        """At shutdown (after Train loops stopped): save every model, each on its own.

        Every model is tried, smallest first so that a tight budget saves as many as it can; a
        failure (a full disk: RESOURCE_EXHAUSTED naming the directory) is recorded and the next
        model is tried. deadline is a time.monotonic() value: models not started by then fail
        with that reason. Models whose checkpoint is already current are not rewritten.
        """
        self.stop_autosave()
        result = CheckpointResult()
        if self.checkpoints.dir is None:
            return result
        models = self.models.list()
        sizes = {m.id: sum(p.numel() * p.element_size() for p in m.module.state_dict().values())
                 for m in models}
        for model in sorted(models, key=lambda m: (sizes[m.id], m.id)):
            if (model.version == model.saved_version
                    and self.checkpoints.path(model.id).exists()):
                result.unchanged.append(model.id)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                result.failed[model.id] = "not saved: the shutdown budget (--grace-seconds) ran out"
                continue
            try:
                with model.lock:
                    self.checkpoints.save(model)
                self.hooks.checkpoint_saved(SHUTDOWN_SAVE, "ok")
                result.saved.append(model.id)
            except GradServeFault as exc:
                self.hooks.checkpoint_saved(SHUTDOWN_SAVE, "error")
                result.failed[model.id] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one model must not cost the others theirs
                state_log.exception("checkpoint of model %s failed", model.id)
                self.hooks.checkpoint_saved(SHUTDOWN_SAVE, "error")
                result.failed[model.id] = f"{type(exc).__name__}: {exc}"
        for model_id, why in result.failed.items():
            state_log.error("model %s was not checkpointed: %s", model_id, why,
                            extra={"fields": {"model": model_id}})
        gone = self.datasets.unpersisted()
        if gone:
            state_log.warning("%d uploaded dataset(s) are held in memory only and are gone after "
                              "the restart (--persist-datasets 1 keeps them): %s", len(gone),
                              ", ".join(gone))
        return result
