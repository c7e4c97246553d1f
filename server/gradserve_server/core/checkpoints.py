"""Checkpoints: one safetensors file per name holding everything a model is, written atomically.

A checkpoint holds the spec, parameters and buffers, gradients (accumulated, not yet stepped),
optimizer state, the step count, the model's own random stream and its request-id window, so
that a restored model continues exactly where it was, retries included. The JSON metadata lives
in the safetensors header (key "gradserve"); everything read back is validated, and a file that
fails is reported as FAILED_PRECONDITION naming the file and the field (or, at start-up,
moved to quarantine/).
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gradserve.results import CheckpointInfo
from safetensors import safe_open

from . import statedir
from .budget import MemoryBudget
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .hooks import Hooks
from .ids import check_id, is_id
from .limits import Limits
from .model import BackwardResult, Model
from .spec import ModelSpec

SUFFIX = ".safetensors"
FORMAT = "gradserve-checkpoint-2"
READABLE_FORMATS = ("gradserve-checkpoint-1", FORMAT)
# Why a file is unusable: the bounded label set of gradserve_checkpoints_quarantined_total.
UNREADABLE, INVALID, MISMATCH, OVER_LIMIT = "unreadable", "invalid", "mismatch", "over_limit"
QUARANTINE_REASONS = (UNREADABLE, INVALID, MISMATCH, OVER_LIMIT)
_STRIPES = 64


class CheckpointUnusable(FailedPrecondition):
    """A checkpoint file that cannot be loaded; reason is one of QUARANTINE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Loaded:
    """A checkpoint read back and checked: its metadata and tensors."""

    name: str
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])


@dataclass
class Snapshot:
    """What a checkpoint of one model will hold, taken under the model's lock."""

    model: Model
    version: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A CPU tensor holding t's values now; copy=True if later updates must not show."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu()
    return t.clone() if copy else t


def _split_optimizer(state: dict[str, Any], copy: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors by flat key, JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        plain[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = _host(value, copy)
            else:
                plain[str(idx)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in meta["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------- request-id window replies

def _encode_reply(method: str, reply: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    if isinstance(reply, BackwardResult):
        tensors = {f"grad.{k}": v for k, v in reply.grads.items()}
        tensors.update({f"input.{i}": v for i, v in enumerate(reply.input_grads)})
        if reply.output is not None:
            tensors["output"] = reply.output
        return {"loss": reply.loss, "step": reply.step, "grads": list(reply.grads),
                "inputs": len(reply.input_grads), "output": reply.output is not None}, tensors
    if reply is None or isinstance(reply, int):
        return reply, {}
    raise TypeError(f"{method}: cannot store a reply of type {type(reply).__name__}")


def _decode_reply(method: str, data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if method == "Backward":
        loss = data["loss"]
        return BackwardResult(
            loss=None if loss is None else float(loss), step=int(data["step"]),
            grads={str(k): tensors[f"grad.{k}"] for k in data["grads"]},
            input_grads=[tensors[f"input.{i}"] for i in range(int(data["inputs"]))],
            output=tensors["output"] if data["output"] else None)
    if method == "Step":
        return int(data)
    if data is not None:
        raise ValueError(f"{method}: unexpected reply {data!r}")
    return None


class CheckpointStore:
    def __init__(self, state_dir: str, hooks: Hooks | None = None) -> None:
        self.dir = Path(state_dir) if state_dir else None
        self.hooks = hooks or Hooks()
        # One writer per name at a time; a deletion waits for a save of the same name.
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    def _lock(self, name: str) -> threading.Lock:
        return self._stripes[hash(name) % _STRIPES]

    def _need_dir(self) -> Path:
        if self.dir is None:
            raise FailedPrecondition("checkpoints need a state directory: start the server with "
                                     "--state-dir (GRADSERVE_STATE_DIR)")
        return self.dir

    def path(self, name: str) -> Path:
        return self._need_dir() / f"{check_id(name, 'name')}{SUFFIX}"

    # ------------------------------------------------------------------ saving

    @staticmethod
    def snapshot(model: Model, copy: bool) -> Snapshot:
        """Everything the checkpoint will hold. Caller holds model.lock.

        copy=True clones CPU tensors so that the file can be written after the lock is released
        (autosave, SaveCheckpoint); copy=False (shutdown, nothing else runs) shares them.
        """
        tensors = {f"model.{k}": _host(v, copy) for k, v in model.module.state_dict().items()}
        for name, p in model.module.named_parameters():
            if p.grad is not None:
                tensors[f"grad.{name}"] = _host(p.grad, copy)
        for k, v in model.spec.parameters.items():
            tensors[f"spec.{k}"] = _host(v, False)  # the spec's own values never change
        opt_meta: dict[str, Any] | None = None
        if model.optimizer is not None:
            opt_tensors, opt_meta = _split_optimizer(model.optimizer.state_dict(), copy)
            tensors.update(opt_tensors)
        tensors["rng.cpu"] = model.rng.cpu.clone()
        if model.rng.cuda is not None:
            tensors["rng.cuda"] = model.rng.cuda.clone()
        requests, request_tensors = model.requests.export(_encode_reply)
        tensors.update(request_tensors)  # replies are immutable snapshots already
        meta = {"format": FORMAT, "model_id": model.id, "step": model.step_count,
                "spec": model.spec.to_json(), "optimizer": opt_meta, "requests": requests,
                "torch": torch.__version__}
        return Snapshot(model, model.version, tensors, meta)

    def write(self, snap: Snapshot, name: str = "", if_newer: bool = False
              ) -> CheckpointInfo | None:
        """Write a snapshot as `name` (default: the model's id).

        Refuses a deleted model (a save racing DeleteModel must not bring it back). With
        if_newer (autosave), a snapshot no newer than what is on disk is not written: None.
        """
        model = snap.model
        name = name or model.id
        path = self.path(name)
        own = name == model.id
        with self._lock(name):
            if model.deleted.is_set():
                raise NotFound(f"model_id: model {model.id!r} was deleted or replaced; "
                               "nothing was saved")
            if if_newer and own and snap.version <= model.saved_version and path.exists():
                return None
            created = time.time()
            meta = {**snap.meta, "created_unix": created}
            try:
                text = json.dumps(meta)
            except (TypeError, ValueError) as exc:
                raise FailedPrecondition(f"model {model.id!r}: its state cannot be stored as "
                                         f"JSON ({exc})") from None
            size = statedir.write_atomic(path.parent, path.name, snap.tensors,
                                         {"gradserve": text}, f"checkpoint {name!r}")
            if own:
                model.saved_version = max(model.saved_version, snap.version)
        return CheckpointInfo(name, model.id, int(meta["step"]), size, created)

    def save(self, model: Model, name: str = "") -> CheckpointInfo:
        """Snapshot and write while the caller holds model.lock (no copy: shutdown, Train)."""
        info = self.write(self.snapshot(model, copy=False), name)
        assert info is not None
        return info

    # ------------------------------------------------------------------ reading

    def read(self, name: str) -> Loaded:
        path = self.path(name)
        if not path.exists():
            raise NotFound(f"name: no checkpoint {name!r} in the state dir")
        return self.read_path(path)

    def read_path(self, path: Path) -> Loaded:
        """Read and check a checkpoint file; CheckpointUnusable names the file and what failed."""
        name = path.name.removesuffix(SUFFIX)
        where = f"checkpoint {name!r} ({path})"
        if not is_id(name):
            raise CheckpointUnusable(INVALID, f"{where}: the file name is not a valid checkpoint "
                                              "name")
        _check_regular(path, where)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("gradserve")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointUnusable(UNREADABLE, f"{where}: not a readable safetensors file "
                                                 f"({exc})") from None
        meta = _check_meta(raw, where)
        return Loaded(name, path, meta, tensors)

    def header(self, path: Path) -> dict[str, Any]:
        """Only the metadata (cheap: no tensor is read); CheckpointUnusable if bad."""
        where = f"checkpoint {path.name.removesuffix(SUFFIX)!r} ({path})"
        _check_regular(path, where)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("gradserve")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointUnusable(UNREADABLE, f"{where}: not a readable safetensors file "
                                                 f"({exc})") from None
        return _check_meta(raw, where)

    def build(self, loaded: Loaded, model_id: str, device: torch.device, limits: Limits,
              hooks: Hooks, budget: MemoryBudget | None = None) -> Model:
        """A new model from a checkpoint. ResourceExhausted (over a limit) passes through."""
        where = f"checkpoint {loaded.name!r} ({loaded.path})"
        try:
            spec = spec_of(loaded.meta, loaded.tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointUnusable(INVALID, f"{where}: field spec is not valid: {exc!r}"
                                     ) from None
        try:
            model = Model(model_id, spec, device, limits, hooks, budget)
        # Types were checked above; values that still break a constructor come from the file.
        except (InvalidArgument, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointUnusable(MISMATCH, f"{where}: its spec cannot be built on this "
                                               f"server: {exc}") from None
        try:
            self.restore(model, loaded)
        except BaseException:
            model.close()  # never stored: give its memory budget back
            raise
        return model

    def restore(self, model: Model, loaded: Loaded) -> None:
        """Load a checked checkpoint's state into a freshly built model of its spec."""
        where = f"checkpoint {loaded.name!r} ({loaded.path})"
        meta, tensors = loaded.meta, loaded.tensors

        def bad(field: str, why: str, reason: str = MISMATCH) -> CheckpointUnusable:
            return CheckpointUnusable(reason, f"{where}: {field}: {why}")

        current = model.module.state_dict()
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        if missing or extra:
            raise bad("model", f"the tensors do not match the spec (missing {missing}, "
                               f"unexpected {extra})")
        for k, v in state.items():
            if v.shape != current[k].shape or v.dtype != current[k].dtype:
                raise bad(f"model.{k}", f"{v.dtype} {list(v.shape)} does not fit the model's "
                                        f"{current[k].dtype} {list(current[k].shape)}")
        params = dict(model.module.named_parameters())
        grads = {k[len("grad."):]: v for k, v in tensors.items() if k.startswith("grad.")}
        for k, v in grads.items():
            if k not in params:
                raise bad(f"grad.{k}", "no such parameter")
            if v.shape != params[k].shape or v.dtype != params[k].dtype:
                raise bad(f"grad.{k}", f"{v.dtype} {list(v.shape)} does not fit the parameter's "
                                       f"{params[k].dtype} {list(params[k].shape)}")
        rng_cpu = tensors.get("rng.cpu")
        if rng_cpu is not None and not _valid_rng(rng_cpu, torch.device("cpu")):
            raise bad("rng.cpu", "not a CPU generator state")
        rng_cuda = tensors.get("rng.cuda") if model.device.type == "cuda" else None
        if rng_cuda is not None and not _valid_rng(rng_cuda, model.device):
            raise bad("rng.cuda", "not a CUDA generator state")
        with torch.no_grad():
            model.module.load_state_dict(state)
        for k, v in grads.items():
            params[k].grad = v.to(params[k].device).clone()
        if model.optimizer is not None and meta.get("optimizer") is not None:
            opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
            try:
                _check_groups(meta["optimizer"]["param_groups"],
                              model.optimizer.state_dict()["param_groups"])
                model.optimizer.load_state_dict(_join_optimizer(opt, meta["optimizer"]))
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
                raise bad("optimizer", f"the state does not fit the optimizer: {exc}") from None
            # load_state_dict does not look at shapes: a wrong one would fail at the next Step.
            for p, entry in model.optimizer.state.items():
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.dim() and (
                            value.shape != p.shape or value.dtype != p.dtype):
                        raise bad(f"optimizer state {key!r}",
                                  f"{value.dtype} {list(value.shape)} does not fit its "
                                  f"parameter's {p.dtype} {list(p.shape)}")
        model.step_count = int(meta["step"])
        if rng_cpu is not None:
            model.rng.cpu = rng_cpu.clone()
        if rng_cuda is not None:
            model.rng.cuda = rng_cuda.clone()
        try:
            model.requests.load(meta.get("requests") or [], tensors, _decode_reply)
            model._charge_replies()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad("requests", f"the request-id window is not valid: {exc!r}",
                      INVALID) from None

    # ------------------------------------------------------------------ listing and deleting

    def list(self) -> list[CheckpointInfo]:
        if self.dir is None or not self.dir.exists():
            return []
        out = []
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            name = path.name.removesuffix(SUFFIX)
            try:
                size = path.stat().st_size
            except OSError:
                continue  # deleted while listing
            try:
                meta = self.header(path)
                out.append(CheckpointInfo(name, meta["model_id"], meta["step"], size,
                                          float(meta.get("created_unix", 0.0))))
            except CheckpointUnusable as exc:  # list it, say what is wrong: never fail the call
                out.append(CheckpointInfo(name, "", -1, size, 0.0, error=str(exc)))
        return out

    def delete(self, name: str) -> bool:
        """Remove checkpoint `name` durably; False if there was none."""
        path = self.path(name)
        with self._lock(name):
            try:
                return statedir.remove_durably(path)
            except OSError as exc:
                raise statedir.io_fault(exc, path.parent, f"the deletion of {name!r}") from None

    def files(self) -> builtins.list[Path]:
        if self.dir is None or not self.dir.exists():
            return []
        return sorted(self.dir.glob(f"*{SUFFIX}"))

    def quarantine(self, path: Path, reason: str, detail: str) -> None:
        statedir.quarantine(self._need_dir(), path, reason, detail, self.hooks)


def _check_regular(path: Path, where: str) -> None:
    """CheckpointUnusable for anything but a regular file, before it is opened."""
    why = statedir.not_regular(path)
    if why is not None:
        raise CheckpointUnusable(UNREADABLE, f"{where}: {why}")


def _valid_rng(state: torch.Tensor, device: torch.device) -> bool:
    if state.dtype != torch.uint8 or state.dim() != 1:
        return False
    try:
        torch.Generator(device=device).set_state(state)
    except (RuntimeError, ValueError):
        return False
    return True


def _check_meta(raw: str | None, where: str) -> dict[str, Any]:
    """The header's gradserve metadata, every field the loader relies on checked."""
    if raw is None:
        raise CheckpointUnusable(INVALID, f"{where}: not a gradserve checkpoint (no gradserve "
                                          "metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointUnusable(INVALID, f"{where}: the metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointUnusable(INVALID, f"{where}: the metadata is not a JSON object")
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointUnusable(INVALID, f"{where}: field format: {meta.get('format')!r} is not "
                                          f"one this server reads {READABLE_FORMATS}")
    if not is_id(meta.get("model_id")):
        raise CheckpointUnusable(INVALID, f"{where}: field model_id: {meta.get('model_id')!r} is "
                                          "not a valid id")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointUnusable(INVALID, f"{where}: field step: {step!r} is not a step count")
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointUnusable(INVALID, f"{where}: field spec: missing or not an object")
    if not isinstance(meta.get("created_unix", 0.0), (int, float)):
        raise CheckpointUnusable(INVALID, f"{where}: field created_unix: not a number")
    if not isinstance(meta.get("requests") or [], list):
        raise CheckpointUnusable(INVALID, f"{where}: field requests: not a list")
    return meta


# The JSON types of a stored spec's fields (ModelSpec.to_json); the catalog checks the values.
_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,), "layers": (list,), "expression": (str,), "inputs": (list,),
    "parameter_shapes": (dict,), "plugin": (str,), "plugin_kwargs": (dict,), "loss": (str,),
    "loss_reduction": (str,), "loss_kwargs": (dict,), "optimizer": (str,),
    "optimizer_params": (dict,), "seed": (int, type(None)), "frozen": (list,), "dtype": (str,),
}


def spec_of(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The stored spec, its field types checked; expression parameters from the tensors."""
    data = meta["spec"]
    for key, types in _SPEC_TYPES.items():
        if key not in data:
            raise KeyError(f"spec.{key} is missing")
        if not isinstance(data[key], types) or isinstance(data[key], bool):
            raise TypeError(f"spec.{key}: {type(data[key]).__name__} is not "
                            f"{'/'.join(t.__name__ for t in types)}")
    if not all(isinstance(x, dict) for x in data["layers"]):
        raise TypeError("spec.layers: every layer must be an object")
    if not all(isinstance(x, str) for x in [*data["inputs"], *data["frozen"]]):
        raise TypeError("spec.inputs and spec.frozen must hold names")
    # No tensors from parameter_shapes: the stored shapes could ask for any amount of memory.
    spec = ModelSpec.from_json({**data, "parameter_shapes": {}})
    spec.parameters = {k[len("spec."):]: v for k, v in tensors.items() if k.startswith("spec.")}
    if set(spec.parameters) != set(data["parameter_shapes"]):
        raise ValueError("spec.parameter_shapes does not name the stored expression parameters")
    return spec


def _check_groups(stored: Any, fresh: list[dict[str, Any]]) -> None:
    """Stored param_groups hold the same options, of the same types, as a fresh optimizer's."""
    if not isinstance(stored, list) or len(stored) != len(fresh):
        raise ValueError("param_groups do not match the optimizer's")
    for group, new in zip(stored, fresh):
        # A learning-rate scheduler adds initial_lr to the groups it drives (a Train run with a
        # schedule): the saved value is restored with the rest.
        extra = set(group) - set(new) if isinstance(group, dict) else set()
        if extra == {"initial_lr"} and isinstance(group["initial_lr"], (int, float)) and not \
                isinstance(group["initial_lr"], bool):
            extra = set()
        if not isinstance(group, dict) or extra or set(new) - set(group):
            raise ValueError(f"param_groups options {sorted(group) if isinstance(group, dict) else group} "
                             f"differ from {sorted(new)}")
        for key, value in new.items():
            if key == "params":
                continue
            ok = (isinstance(group[key], (int, float)) and not isinstance(group[key], bool)
                  if isinstance(value, (int, float)) and not isinstance(value, bool)
                  else isinstance(group[key], (list, tuple)) if isinstance(value, (list, tuple))
                  else type(group[key]) is type(value) or value is None)
            if not ok:
                raise ValueError(f"param_groups option {key}: {group[key]!r} is not like "
                                 f"{value!r}")
