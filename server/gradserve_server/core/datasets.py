"""Uploaded datasets: one buffer per dataset, filled chunk by chunk, tensors as views of it."""

from __future__ import annotations

import builtins
import json
import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from . import statedir
from .budget import MemoryBudget
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .hooks import Hooks
from .ids import check_id, is_id
from .limits import MAX_TENSORS

_ALIGN = 8  # each tensor starts on an 8-byte boundary so that dtype views are legal
FORMAT = "gradserve-dataset-1"
SUFFIX = ".safetensors"
# dtypes a stored dataset may name (str(dtype) without "torch."), checked when read back.
_DTYPES = {str(t).removeprefix("torch."): t for t in statedir.DTYPE_NAMES}
# A header's tensors: torch's limit on dimensions, and elements far beyond any memory.
MAX_DIMS = 64
MAX_ELEMENTS = 1 << 40


@dataclass(frozen=True)
class TensorLayout:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class TrainData:
    """Positional input tensors and an optional target, samples along dimension 0."""

    inputs: list[torch.Tensor]
    target: torch.Tensor | None

    @property
    def num_samples(self) -> int:
        first = self.inputs[0] if self.inputs else self.target
        return 0 if first is None or first.dim() == 0 else int(first.shape[0])

    def check(self, what: str) -> None:
        tensors = [*self.inputs, *([self.target] if self.target is not None else [])]
        if not tensors:
            raise InvalidArgument(f"{what}: no tensors")
        sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
        if -1 in sizes:
            raise InvalidArgument(f"{what}: tensors need a sample dimension (dimension 0)")
        if len(sizes) != 1:
            raise InvalidArgument(f"{what}: tensors disagree on the number of samples "
                                  f"(dimension 0): {sorted(sizes)}")
        if self.num_samples == 0:
            raise InvalidArgument(f"{what}: the dataset has no samples")


@dataclass
class Dataset:
    id: str
    data: TrainData
    layouts: list[TensorLayout]
    has_target: bool
    nbytes: int
    created: float = field(default_factory=time.time)


def _offsets(layouts: list[TensorLayout]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for layout in layouts:
        offsets.append(total)
        total += -(-layout.nbytes // _ALIGN) * _ALIGN
    return offsets, total


class DatasetStore:
    def __init__(self, max_bytes: int, hooks: Hooks, persist_dir: Path | None = None,
                 budget: MemoryBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self.hooks = hooks
        self.persist_dir = persist_dir
        self.budget = budget if budget is not None else MemoryBudget()
        self._datasets: dict[str, Dataset] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        return sum(d.nbytes for d in self._datasets.values())

    def upload(self, dataset_id: str, inputs: list[TensorLayout], target: TensorLayout | None,
               chunks: Iterable[bytes]) -> Dataset:
        upload = self.begin(dataset_id, inputs, target)
        try:
            for chunk in chunks:
                upload.write(chunk)
            return upload.finish()
        finally:
            upload.abort()  # no-op once finished

    def begin(self, dataset_id: str, inputs: list[TensorLayout], target: TensorLayout | None
              ) -> Upload:
        """Check the header and reserve its bytes; the caller writes chunks, then finish()es.

        The caller must finish() or abort() the upload: abort() drops the buffer at once and
        returns the reservation (a cancelled stream must not keep hundreds of MiB alive).
        """
        dataset_id = check_id(dataset_id, "header.dataset_id") if dataset_id else (
            f"dataset-{uuid.uuid4().hex[:12]}")
        layouts = [*inputs, *([target] if target is not None else [])]
        if not inputs:
            raise InvalidArgument("header.inputs: declare at least one input tensor")
        if len(inputs) > MAX_TENSORS:
            raise InvalidArgument(f"header.inputs: {len(inputs)} tensors; at most {MAX_TENSORS}")
        names = [f"header.inputs[{i}]" for i in range(len(inputs))] + ["header.target"]
        for name, layout in zip(names, layouts):
            if len(layout.shape) > MAX_DIMS or any(d < 0 for d in layout.shape) or math.prod(
                    max(d, 1) for d in layout.shape) > MAX_ELEMENTS:
                raise InvalidArgument(f"{name}.shape: {list(layout.shape)[:MAX_DIMS + 1]} is not "
                                      f"a shape the server holds (at most {MAX_DIMS} dimensions, "
                                      f"none negative, {MAX_ELEMENTS} elements)")
        for layout in layouts:
            if not layout.shape:
                raise InvalidArgument("header: every tensor needs a sample dimension")
        offsets, total = _offsets(layouts)
        if len({lay.shape[0] for lay in layouts}) != 1:
            raise InvalidArgument("header: tensors disagree on the number of samples (dimension 0)")
        with self._lock:
            if dataset_id in self._datasets:
                raise AlreadyExists(f"header.dataset_id: a dataset {dataset_id!r} already exists; "
                                    "delete it or choose another id")
            if self.bytes_held + self._reserved + total > self.max_bytes:
                raise ResourceExhausted(
                    f"header: the dataset needs {total} bytes; {self.bytes_held + self._reserved} "
                    f"are held and the limit (max_dataset_mb) is "
                    f"{self.max_bytes / (1024 * 1024):g} MiB ({self.max_bytes} bytes)")
            # Charged before the buffer exists; a failed upload gives it back below.
            self.budget.charge("datasets", total, lambda: f"dataset {dataset_id!r}")
            self._reserved += total
        try:
            return Upload(self, dataset_id, layouts, offsets, total, len(inputs),
                          target is not None)
        except BaseException:
            self._unreserve(total)
            raise

    def _unreserve(self, total: int, stored: bool = False) -> None:
        """End an upload's reservation; the budget charge stays only with a stored dataset."""
        with self._lock:
            self._reserved -= total
        if not stored:
            self.budget.release("datasets", total)

    def _add(self, dataset: Dataset, buf: torch.Tensor) -> None:
        if self.persist_dir is not None:  # on disk before the caller hears it is there
            self._write(dataset, buf)
        with self._lock:
            if dataset.id in self._datasets:
                raise AlreadyExists(f"header.dataset_id: a dataset {dataset.id!r} already "
                                    "exists; delete it or choose another id")
            self._datasets[dataset.id] = dataset
        self.hooks.dataset_bytes(self.bytes_held)

    def get(self, dataset_id: str) -> Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            kept = ("" if self.persist_dir is not None else
                    " (uploaded datasets are held in memory only and are gone after a server "
                    "restart; the server keeps them with --persist-datasets 1)")
            raise NotFound(f"dataset_id: no dataset {dataset_id!r}; ListDatasets shows the "
                           f"ids{kept}")
        return dataset

    def list(self) -> list[Dataset]:
        with self._lock:
            return [self._datasets[k] for k in sorted(self._datasets)]

    def delete(self, dataset_id: str) -> None:
        with self._lock:
            dataset = self._datasets.pop(dataset_id, None)
            if dataset is None:
                raise NotFound(f"dataset_id: no dataset {dataset_id!r}")
            self.budget.release("datasets", dataset.nbytes)
        if self.persist_dir is not None:
            try:
                statedir.remove_durably(self.persist_dir / f"{dataset_id}{SUFFIX}")
            except OSError as exc:
                raise statedir.io_fault(exc, self.persist_dir,
                                        f"the deletion of dataset {dataset_id!r}") from None
        self.hooks.dataset_bytes(self.bytes_held)

    # ------------------------------------------------------------------ persistence (opt-in)

    def unpersisted(self) -> builtins.list[str]:
        """Ids of datasets that a restart loses (all of them unless persistence is on)."""
        return [] if self.persist_dir is not None else sorted(self._datasets)

    def _write(self, dataset: Dataset, buf: torch.Tensor) -> None:
        assert self.persist_dir is not None
        meta = {"format": FORMAT, "dataset_id": dataset.id, "inputs": len(dataset.data.inputs),
                "has_target": dataset.has_target, "created_unix": dataset.created,
                "layouts": [{"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}
                            for x in dataset.layouts]}
        statedir.write_atomic(self.persist_dir, f"{dataset.id}{SUFFIX}", {"data": buf},
                              {"gradserve": json.dumps(meta)}, f"dataset {dataset.id!r}")

    def restore(self) -> tuple[builtins.list[str], dict[str, tuple[str, str]]]:
        """At start: load persisted datasets; returns (ids, {file: (reason, why)}) of bad ones."""
        restored: builtins.list[str] = []
        bad: dict[str, tuple[str, str]] = {}
        if self.persist_dir is None or not self.persist_dir.is_dir():
            return restored, bad
        for path in sorted(self.persist_dir.glob(f"*{SUFFIX}")):
            try:
                dataset = self._read(path)
                with self._lock:
                    if self.bytes_held + dataset.nbytes > self.max_bytes:
                        raise ResourceExhausted(
                            f"dataset file {path}: {dataset.nbytes} bytes do not fit the limit "
                            f"(max_dataset_mb) beside the {self.bytes_held} bytes restored")
                    self.budget.charge("datasets", dataset.nbytes,
                                       lambda: f"dataset file {path}")
                    self._datasets[dataset.id] = dataset
                restored.append(dataset.id)
            except ResourceExhausted as exc:
                bad[path.name] = ("over_limit", str(exc))
            except _BadDataset as exc:
                bad[path.name] = (exc.reason, str(exc))
        self.hooks.dataset_bytes(self.bytes_held)
        return restored, bad

    def _read(self, path: Path) -> Dataset:
        where = f"dataset file {path}"
        name = path.name.removesuffix(SUFFIX)
        why = statedir.not_regular(path)
        if why is not None:
            raise _BadDataset("unreadable", f"{where}: {why}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("gradserve")
                meta = json.loads(raw) if raw is not None else None
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise _BadDataset("invalid", f"{where}: not a gradserve dataset")
                nbytes = int(np.prod(f.get_slice("data").get_shape()))
                if nbytes > self.max_bytes:  # before reading it into memory
                    raise ResourceExhausted(f"{where}: {nbytes} bytes exceed the limit "
                                            f"(max_dataset_mb) of {self.max_bytes} bytes")
                buf = f.get_tensor("data")
        except (_BadDataset, ResourceExhausted):
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise _BadDataset("unreadable", f"{where}: not a readable safetensors file "
                                            f"({exc})") from None
        try:
            return _dataset_from(name, meta, buf)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise _BadDataset("invalid", f"{where}: {exc}") from None



class _BadDataset(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _dataset_from(name: str, meta: dict[str, Any], buf: torch.Tensor) -> Dataset:
    """A Dataset over a stored buffer; every field checked (ValueError/KeyError/TypeError)."""
    if meta["dataset_id"] != name or not is_id(name):
        raise ValueError(f"field dataset_id: {meta['dataset_id']!r} does not match the file name")
    layouts = []
    for i, item in enumerate(meta["layouts"]):
        dtype = _DTYPES.get(item["dtype"])
        shape = item["shape"]
        if dtype is None or not isinstance(shape, list) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"field layouts[{i}]: not a dtype and shape")
        layouts.append(TensorLayout(dtype, tuple(shape)))
    n_inputs, has_target = meta["inputs"], meta["has_target"]
    if (not isinstance(n_inputs, int) or not isinstance(has_target, bool) or n_inputs < 1
            or n_inputs + has_target != len(layouts)):
        raise ValueError("fields inputs/has_target do not match the layouts")
    if len({lay.shape[0] for lay in layouts}) != 1:
        raise ValueError("field layouts: tensors disagree on the number of samples")
    offsets, total = _offsets(layouts)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != total:
        raise ValueError(f"tensor data: {buf.numel()} bytes, the layouts need {total}")
    tensors = [buf[o:o + lay.nbytes].view(lay.dtype).reshape(lay.shape)
               for o, lay in zip(offsets, layouts)]
    data = TrainData(tensors[:n_inputs], tensors[n_inputs] if has_target else None)
    created = meta.get("created_unix", time.time())
    return Dataset(name, data, layouts, has_target, total,
                   float(created) if isinstance(created, (int, float)) else time.time())


class Upload:
    """One dataset being received: chunks are copied into one buffer, in declaration order."""

    def __init__(self, store: DatasetStore, dataset_id: str, layouts: list[TensorLayout],
                 offsets: list[int], total: int, n_inputs: int, has_target: bool) -> None:
        self.store = store
        self.id = dataset_id
        self.layouts = layouts
        self.offsets = offsets
        self.total = total
        self.n_inputs = n_inputs
        self.has_target = has_target
        self.expected = sum(lay.nbytes for lay in layouts)
        self.written = self._index = self._in_tensor = 0
        self._skip_empty()
        self._buf: torch.Tensor | None = torch.empty(total, dtype=torch.uint8)
        self._open = True

    def _skip_empty(self) -> None:
        while self._index < len(self.layouts) and self.layouts[self._index].nbytes == 0:
            self._index += 1

    def write(self, chunk: Any) -> None:
        if self._buf is None:
            raise FailedPrecondition("chunk: the upload was already finished or aborted")
        view = self._buf.numpy()
        data = np.frombuffer(chunk, dtype=np.uint8)
        layouts = self.layouts
        try:
            while data.size:
                if self._index >= len(layouts):
                    raise InvalidArgument(f"chunk: more bytes than the header declares "
                                          f"({self.expected})")
                room = layouts[self._index].nbytes - self._in_tensor
                take = min(room, data.size)
                start = self.offsets[self._index] + self._in_tensor
                view[start:start + take] = data[:take]
                data = data[take:]
                self._in_tensor += take
                self.written += take
                if self._in_tensor == layouts[self._index].nbytes:
                    self._index, self._in_tensor = self._index + 1, 0
                    self._skip_empty()
        except BaseException:
            del view, data  # a traceback keeps this frame: it must not keep the buffer too
            raise

    def finish(self) -> Dataset:
        if self._buf is None:
            raise FailedPrecondition("the upload was already finished or aborted")
        if self.written != self.expected:  # before `buf` below: a traceback keeps locals
            raise InvalidArgument(f"chunk: received {self.written} bytes; the header declares "
                                  f"{self.expected}")
        buf = self._buf
        tensors = [buf[o:o + lay.nbytes].view(lay.dtype).reshape(lay.shape)
                   for o, lay in zip(self.offsets, self.layouts)]
        data = TrainData(tensors[:self.n_inputs],
                         tensors[self.n_inputs] if self.has_target else None)
        dataset = Dataset(self.id, data, self.layouts, self.has_target, self.total)
        self._buf = None
        try:
            self.store._add(dataset, buf)
        except BaseException:
            del buf, tensors, data, dataset  # a traceback keeps locals: not the buffer
            self._close()
            raise
        self._close(stored=True)
        return dataset

    def abort(self) -> None:
        """Drop the buffer and the reservation (idempotent)."""
        self._buf = None
        self._close()

    def _close(self, stored: bool = False) -> None:
        if self._open:
            self._open = False
            self.store._unreserve(self.total, stored)
