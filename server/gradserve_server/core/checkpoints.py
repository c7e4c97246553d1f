"""Checkpoints: one safetensors file per name, JSON metadata in its header, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import FailedPrecondition, InvalidArgument, NotFound
from .ids import check_id
from .model import Model
from .spec import ModelSpec

SUFFIX = ".safetensors"
FORMAT = "gradserve-checkpoint-1"


@dataclass
class CheckpointInfo:
    name: str
    model_id: str
    step: int
    num_bytes: int
    created_unix: float


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors by flat key, JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        plain[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[str(idx)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in meta["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir) if state_dir else None

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise FailedPrecondition("checkpoints need a state directory: start the server with "
                                     "--state-dir (GRADSERVE_STATE_DIR)")
        return self.dir / f"{check_id(name, 'name')}{SUFFIX}"

    def save(self, model: Model, name: str = "") -> CheckpointInfo:
        """Caller holds model.lock so the snapshot is one consistent step."""
        path = self._path(name or model.id)
        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in model.module.state_dict().items()}
        for k, v in model.spec.parameters.items():
            tensors[f"spec.{k}"] = v.detach().cpu().contiguous()
        opt_meta: dict[str, Any] | None = None
        if model.optimizer is not None:
            opt_tensors, opt_meta = _split_optimizer(model.optimizer.state_dict())
            tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        created = time.time()
        meta = {"format": FORMAT, "model_id": model.id, "step": model.step_count,
                "created_unix": created, "spec": model.spec.to_json(), "optimizer": opt_meta}
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"gradserve": json.dumps(meta)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return CheckpointInfo(path.stem, model.id, model.step_count, path.stat().st_size, created)

    def read(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        path = self._path(name)
        if not path.exists():
            raise NotFound(f"name: no checkpoint {name!r} in the state dir")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("gradserve", "{}"))
        if meta.get("format") != FORMAT:
            raise InvalidArgument(f"checkpoint {name!r} is not a gradserve checkpoint")
        return meta, load_file(str(path))

    def restore(self, model: Model, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        missing = set(model.module.state_dict()) - set(state)
        if missing:
            raise InvalidArgument(f"checkpoint lacks {sorted(missing)}")
        model.module.load_state_dict(state)
        if model.optimizer is not None and meta.get("optimizer") is not None:
            opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
            model.optimizer.load_state_dict(_join_optimizer(opt, meta["optimizer"]))
        model.step_count = int(meta["step"])
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])

    @staticmethod
    def spec_of(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ModelSpec:
        spec = ModelSpec.from_json(meta["spec"])
        spec.parameters = {k[len("spec."):]: v for k, v in tensors.items()
                           if k.startswith("spec.")}
        return spec

    def list(self) -> list[CheckpointInfo]:
        if self.dir is None or not self.dir.exists():
            return []
        out = []
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {}).get("gradserve", "{}"))
            except (OSError, ValueError) as exc:  # a foreign or damaged file: list, don't fail
                meta = {"model_id": "", "step": -1, "created_unix": 0.0, "error": str(exc)}
            out.append(CheckpointInfo(path.stem, meta.get("model_id", ""), meta.get("step", -1),
                                      path.stat().st_size, meta.get("created_unix", 0.0)))
        return out

