"""Uploaded datasets: one buffer per dataset, filled chunk by chunk, tensors as views of it."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .budget import MemoryBudget
from .errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from .hooks import Hooks
from .ids import check_id

_ALIGN = 8  # each tensor starts on an 8-byte boundary so that dtype views are legal
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


class DatasetStore:
    def __init__(self, max_bytes: int, hooks: Hooks, budget: MemoryBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self.hooks = hooks
        self.budget = budget if budget is not None else MemoryBudget()
        self._datasets: dict[str, Dataset] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        return sum(d.nbytes for d in self._datasets.values())

    def upload(self, dataset_id: str, inputs: list[TensorLayout], target: TensorLayout | None,
               chunks: Iterable[bytes]) -> Dataset:
        dataset_id = check_id(dataset_id, "header.dataset_id") if dataset_id else (
            f"dataset-{uuid.uuid4().hex[:12]}")
        layouts = [*inputs, *([target] if target is not None else [])]
        if not inputs:
            raise InvalidArgument("header.inputs: declare at least one input tensor")
        names = [f"header.inputs[{i}]" for i in range(len(inputs))] + ["header.target"]
        for name, layout in zip(names, layouts):
            if len(layout.shape) > MAX_DIMS or any(d < 0 for d in layout.shape) or math.prod(
                    max(d, 1) for d in layout.shape) > MAX_ELEMENTS:
                raise InvalidArgument(f"{name}.shape: {list(layout.shape)[:MAX_DIMS + 1]} is not "
                                      f"a shape the server holds (at most {MAX_DIMS} dimensions, "
                                      f"none negative, {MAX_ELEMENTS} elements)")
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
            # Charged before the buffer exists; a failed upload gives it back below.
            self.budget.charge("datasets", total, lambda: f"dataset {dataset_id!r}")
            self._reserved += total
        stored = False
        try:
            buf = torch.empty(total, dtype=torch.uint8)
            view = buf.numpy()
            expected = sum(lay.nbytes for lay in layouts)
            written, index, in_tensor = 0, 0, 0
            for chunk in chunks:
                data = np.frombuffer(chunk, dtype=np.uint8)
                while data.size:
                    if index >= len(layouts):
                        raise InvalidArgument(f"chunk: more bytes than the header declares "
                                              f"({expected})")
                    room = layouts[index].nbytes - in_tensor
                    take = min(room, data.size)
                    start = offsets[index] + in_tensor
                    view[start:start + take] = data[:take]
                    data, in_tensor, written = data[take:], in_tensor + take, written + take
                    if in_tensor == layouts[index].nbytes:
                        index, in_tensor = index + 1, 0
                    while index < len(layouts) and layouts[index].nbytes == 0:
                        index += 1
            if written != expected:
                raise InvalidArgument(f"chunk: received {written} bytes; the header declares "
                                      f"{expected}")
            tensors = [buf[o:o + lay.nbytes].view(lay.dtype).reshape(lay.shape)
                       for o, lay in zip(offsets, layouts)]
            data_ = TrainData(tensors[:len(inputs)], tensors[len(inputs)] if target else None)
            dataset = Dataset(dataset_id, data_, layouts, target is not None, total)
            with self._lock:
                self._datasets[dataset_id] = dataset
            stored = True
        finally:
            with self._lock:
                self._reserved -= total
            if not stored:
                self.budget.release("datasets", total)
        self.hooks.dataset_bytes(self.bytes_held)
        return dataset

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
            dataset = self._datasets.pop(dataset_id, None)
            if dataset is None:
                raise NotFound(f"dataset_id: no dataset {dataset_id!r}")
            self.budget.release("datasets", dataset.nbytes)
        self.hooks.dataset_bytes(self.bytes_held)

