"""The registry of live models: ids, limits, lookup, deletion."""

from __future__ import annotations

import threading
import uuid

import torch

from .budget import MemoryBudget
from .errors import AlreadyExists, NotFound, ResourceExhausted
from .hooks import Hooks
from .ids import check_id
from .limits import Limits
from .model import Model
from .parallel import LOCAL, Parallel
from .spec import ModelSpec


class ModelStore:
    """Models by id. Store-level operations hold a short lock; model work holds the model's."""

    def __init__(self, device: torch.device, limits: Limits, hooks: Hooks,
                 budget: MemoryBudget | None = None, parallel: Parallel = LOCAL) -> None:
        self.device = device
        self.parallel = parallel  # every model lives on every rank of a group
        self.limits = limits
        self.hooks = hooks
        self.budget = budget if budget is not None else MemoryBudget()
        self._models: dict[str, Model] = {}
        self._lock = threading.Lock()
        self._reserved: set[str] = set()

    def create(self, spec: ModelSpec, model_id: str = "") -> Model:
        model_id = check_id(model_id, "model_id") if model_id else f"model-{uuid.uuid4().hex[:12]}"
        with self._lock:
            if model_id in self._models or model_id in self._reserved:
                raise AlreadyExists(f"model_id: a model {model_id!r} already exists; delete it "
                                    "or choose another id")
            if len(self._models) + len(self._reserved) >= self.limits.max_models:
                raise ResourceExhausted(f"the server holds {len(self._models)} models; the limit "
                                        f"(max_models) is {self.limits.max_models}")
            self._reserved.add(model_id)
        try:
            model = Model(model_id, spec, self.device, self.limits, self.hooks,  # slow: unlocked
                          self.budget)
            self._publish(model)
            with self._lock:
                self._models[model_id] = model
                # Under the lock: a concurrent delete must see the add before its remove.
                self.hooks.model_added(model_id)
        finally:
            with self._lock:
                self._reserved.discard(model_id)
        return model

    def _publish(self, model: Model) -> None:
        """Every rank gets the model's state before anyone can call it (a group's workers build
        their replicas from it); a model no rank could build is closed, not stored."""
        model.parallel = self.parallel
        try:
            self.parallel.publish(model)
        except BaseException:
            model.close()
            raise

    def put(self, model: Model) -> None:
        """Insert or replace a fully built model (checkpoint restore)."""
        self._publish(model)
        with self._lock:
            if model.id in self._reserved:  # a CreateModel of this id is building its model
                raise AlreadyExists(f"model_id: a model {model.id!r} is being created; delete it "
                                    "once it exists, or choose another id")
            old = self._models.get(model.id)
            if old is None and len(self._models) >= self.limits.max_models:
                self.parallel.drop(model.id)  # the workers' replica goes with it
                raise ResourceExhausted(f"the server holds {len(self._models)} models; the limit "
                                        f"(max_models) is {self.limits.max_models}")
            self._models[model.id] = model
            self.hooks.model_added(model.id)
        if old is not None:
            old.deleted.set()
            with old.lock:
                old.close()

    def find(self, model_id: str) -> Model | None:
        return self._models.get(model_id)

    def get(self, model_id: str) -> Model:
        model = self._models.get(model_id)
        if model is None:
            raise NotFound(f"model_id: no model {model_id!r}; ListModels shows the ids that exist")
        return model

    def list(self) -> list[Model]:
        with self._lock:
            return [self._models[k] for k in sorted(self._models)]

    def delete(self, model_id: str) -> None:
        with self._lock:
            model = self._models.pop(model_id, None)
            if model is not None:
                # Under the lock: a re-create of the same id must come after this remove.
                self.hooks.model_removed(model_id)
        if model is None:
            raise NotFound(f"model_id: no model {model_id!r}")
        model.deleted.set()
        with model.lock:
            model.close()
            self.parallel.drop(model_id)

    def __len__(self) -> int:
        return len(self._models)
