"""Uploaded datasets: one buffer per dataset, filled chunk by chunk, tensors as views of it."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .hooks import Hooks
from .ids import check_id

_ALIGN = 8  # each tensor starts on an 8-byte boundary so that dtype views are legal


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


class DatasetStore:
    def __init__(self, max_bytes: int, hooks: Hooks) -> None:
        self.max_bytes = max_bytes
        self.hooks = hooks
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
        offsets, total = [], 0
        for layout in layouts:
            if not layout.shape:
                raise InvalidArgument("header: every tensor needs a sample dimension")
            offsets.append(total)
            total += -(-layout.nbytes // _ALIGN) * _ALIGN
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
            self._reserved += total
        try:
            return Upload(self, dataset_id, layouts, offsets, total, len(inputs),
                          target is not None)
        except BaseException:
            self._unreserve(total)
            raise

    def _unreserve(self, total: int) -> None:
        with self._lock:
            self._reserved -= total

    def _add(self, dataset: Dataset) -> None:
        with self._lock:
            if dataset.id in self._datasets:
                raise AlreadyExists(f"header.dataset_id: a dataset {dataset.id!r} already "
                                    "exists; delete it or choose another id")
            self._datasets[dataset.id] = dataset
        self.hooks.dataset_bytes(self.bytes_held)

    def get(self, dataset_id: str) -> Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            raise NotFound(f"dataset_id: no dataset {dataset_id!r}; ListDatasets shows the ids")
        return dataset

    def list(self) -> list[Dataset]:
        with self._lock:
            return [self._datasets[k] for k in sorted(self._datasets)]

    def delete(self, dataset_id: str) -> None:
        with self._lock:
            if self._datasets.pop(dataset_id, None) is None:
                raise NotFound(f"dataset_id: no dataset {dataset_id!r}")
        self.hooks.dataset_bytes(self.bytes_held)



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
        self._close()
        self.store._add(dataset)
        return dataset

    def abort(self) -> None:
        """Drop the buffer and the reservation (idempotent)."""
        self._buf = None
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.store._unreserve(self.total)
