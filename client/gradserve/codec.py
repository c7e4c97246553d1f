"""numpy/torch <-> wire Tensor: the only tensor conversion code (the server uses it too).

One dtype table drives both directions. Data is raw little-endian C-order bytes; bfloat16 travels
as its 16-bit pattern. torch is optional: without it, bfloat16 decodes to float32 (exactly).
torch is imported when it is first needed (decoding, bf16 from numpy), not with this module:
encoding a torch tensor needs no import, since its caller already imported torch.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ._install import torch_hint

if TYPE_CHECKING:
    import torch

ArrayLike = Union["torch.Tensor", np.ndarray, float, int, bool, list]

# Largest tensor the codec accepts by element count (guards shape products against overflow).
MAX_ELEMENTS = 1 << 40
# Most dimensions a tensor may have (torch's own limit).
MAX_DIMS = 64


class CodecError(ValueError):
    """A wire tensor that cannot be decoded (bad dtype, shape or byte length)."""


@dataclass(frozen=True)
class _DType:
    wire: pb.DType
    name: str
    numpy: str  # little-endian numpy dtype; bf16 uses its raw 16-bit pattern
    torch: str
    itemsize: int


_TABLE: tuple[_DType, ...] = (
    _DType(pb.DTYPE_FLOAT32, "float32", "<f4", "float32", 4),
    _DType(pb.DTYPE_FLOAT64, "float64", "<f8", "float64", 8),
    _DType(pb.DTYPE_FLOAT16, "float16", "<f2", "float16", 2),
    _DType(pb.DTYPE_BFLOAT16, "bfloat16", "<u2", "bfloat16", 2),
    _DType(pb.DTYPE_INT8, "int8", "i1", "int8", 1),
    _DType(pb.DTYPE_INT16, "int16", "<i2", "int16", 2),
    _DType(pb.DTYPE_INT32, "int32", "<i4", "int32", 4),
    _DType(pb.DTYPE_INT64, "int64", "<i8", "int64", 8),
    _DType(pb.DTYPE_UINT8, "uint8", "u1", "uint8", 1),
    _DType(pb.DTYPE_BOOL, "bool", "?", "bool", 1),
)
_BY_WIRE: dict[int, _DType] = {d.wire: d for d in _TABLE}
_BY_NAME = {d.name: d for d in _TABLE}
# (numpy kind, itemsize) -> entry; bf16 has no numpy dtype and uint16 is not a wire dtype.
_BY_NUMPY = {(np.dtype(d.numpy).kind, d.itemsize): d for d in _TABLE if d.name != "bfloat16"}
# torch.frombuffer reads native byte order; on a big-endian host decoding goes through numpy.
_LITTLE = sys.byteorder == "little"


class _Torch:
    """torch and its dtype tables, loaded on first use (None where torch is not installed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self.module: Any = None
        self.by_torch: dict[Any, _DType] = {}  # torch dtype -> entry
        self.by_wire: dict[int, Any] = {}  # wire enum -> torch dtype

    def load(self) -> Any:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    module: Any
                    try:
                        import torch as module
                    except ImportError:  # the SDK works with numpy alone
                        module = None
                    if module is not None:
                        self.by_torch = {getattr(module, d.torch): d for d in _TABLE}
                        self.by_wire = {e.wire: t for t, e in self.by_torch.items()}
                    self.module = module
                    self._loaded = True
        return self.module

    def tensor(self, value: Any) -> bool:
        """True for a torch tensor. Imports nothing: a tensor's torch is imported already."""
        module = sys.modules.get("torch")
        return module is not None and isinstance(value, getattr(module, "Tensor", ()))


_TORCH = _Torch()

DTYPE_NAMES: tuple[str, ...] = tuple(d.name for d in _TABLE)


def dtype_name(wire: int) -> str:
    """Wire enum value -> 'float32' etc.; CodecError if unknown."""
    try:
        return _BY_WIRE[wire].name
    except KeyError:
        raise CodecError(f"unknown dtype enum value {wire}; expected one of {DTYPE_NAMES}") from None


def dtype_wire(name: str) -> pb.DType:
    """'float32' etc. (or a torch/numpy dtype) -> wire enum value."""
    key = str(name).removeprefix("torch.")
    try:
        return _BY_NAME[key].wire
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r}; expected one of {DTYPE_NAMES}") from None


def _checked_shape(shape: Any, what: str) -> tuple[int, ...]:
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{what}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    dims = tuple(map(int, shape))
    if dims and min(dims) < 0:
        raise CodecError(f"{what}: shape {list(dims)} has a negative dimension")
    # Zeros count as ones: torch overflows on [3, 2**62, 0] (its strides) although it is empty.
    if math.prod(max(d, 1) for d in dims) > MAX_ELEMENTS:
        raise CodecError(f"{what}: shape {list(dims)} is too large (more than {MAX_ELEMENTS} "
                         "elements, counting zero dimensions as one)")
    return dims


def _entry(msg: pb.Tensor, what: str) -> tuple[_DType, tuple[int, ...]]:
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise CodecError(f"{what}: dtype is unset; expected one of {DTYPE_NAMES}")
    entry = _BY_WIRE.get(msg.dtype)
    if entry is None:
        raise CodecError(f"{what}: unknown dtype enum value {msg.dtype}")
    return entry, _checked_shape(msg.shape, what)


def _check_length(entry: _DType, shape: tuple[int, ...], data: Any, what: str,
                  msg: Any = None) -> None:
    expected = math.prod(shape) * entry.itemsize
    if len(data) != expected:
        if not data and msg is not None and msg.HasField("shm"):
            raise CodecError(f"{what}: shared-memory tensors are accepted only in Forward and "
                             "Backward requests that set shm_reply")
        raise CodecError(
            f"{what}: data has {len(data)} bytes but shape {list(shape)} of {entry.name} "
            f"needs {expected}"
        )


# ------------------------------------------------------------------------------------ encode


def encode(value: ArrayLike, *, dtype: str | None = None, floats: str = "float32"
           ) -> pb.Tensor:
    """Encode a torch tensor, numpy array or Python scalar/list (optionally cast to dtype).

    Python floats and lists holding floats become `floats` (float32 by default, as
    torch.tensor makes them; the SDK passes the model's dtype, so that 1.7 for a float64
    model is the double 1.7) and ints int64, as torch.tensor(value, dtype=floats) does; numpy
    arrays and torch tensors keep their dtype unless dtype is given.
    """
    entry, arr = _contiguous(value, dtype, floats)
    return pb.Tensor(dtype=entry.wire, shape=arr.shape, data=arr.tobytes())


def encode_array(value: ArrayLike, *, dtype: str | None = None, floats: str = "float32"
                 ) -> tuple[pb.DType, np.ndarray]:
    """The wire dtype and the array whose bytes encode() would send (C-contiguous,
    little-endian, bf16 as its 16-bit pattern), without copying a value that already is one."""
    entry, arr = _contiguous(value, dtype, floats)
    return entry.wire, arr


def encode_parts(value: ArrayLike, *, dtype: str | None = None, minimum: int = 0,
                 floats: str = "float32") -> tuple[pb.Tensor, memoryview | None]:
    """Like encode, but a payload of at least `minimum` bytes is returned beside the message as
    a zero-copy view of the value's memory (the message then has no data). The value must not
    change until the view has been sent."""
    entry, arr = _contiguous(value, dtype, floats)
    if arr.nbytes < minimum or arr.nbytes == 0:
        return pb.Tensor(dtype=entry.wire, shape=arr.shape, data=arr.tobytes()), None
    view = arr.reshape(-1).view(np.uint8).data
    return pb.Tensor(dtype=entry.wire, shape=arr.shape), view


def _contiguous(value: ArrayLike, dtype: str | None, floats: str = "float32"
                ) -> tuple[_DType, np.ndarray]:
    """The wire dtype and a C-contiguous little-endian array of value (bf16 as its bits);
    Python floats become `floats`."""
    if _TORCH.tensor(value):
        return _torch_array(value, dtype)  # type: ignore[arg-type]
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":  # complex, str, bytes, object, datetime...
        raise CodecError(f"unsupported dtype {arr.dtype}: a tensor holds numbers, one of "
                         f"{DTYPE_NAMES}")
    if not isinstance(value, np.ndarray) and dtype is None:
        if arr.dtype.kind == "u":  # Python ints numpy only fits in uint64
            raise CodecError("integers above 2**63 - 1 do not fit int64")
        dtype = {"f": floats, "i": "int64"}.get(arr.dtype.kind)
    if dtype is not None:
        name = _valid_name(dtype)
        if name == "bfloat16":
            torch = _TORCH.load()
            if torch is None:
                raise CodecError(f"encoding bfloat16 from numpy needs torch: {torch_hint()}")
            return _torch_array(torch.from_numpy(np.array(arr, dtype=np.float32)), name)
        if name == "float16" and arr.dtype == np.float64:
            # As torch converts: double -> float -> half (numpy would round once, differently).
            arr = arr.astype(np.float32)
        # Out of range becomes inf (NaN to an int: whatever the cast gives), silently, as torch.
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(_BY_NAME[name].numpy, copy=False)
    entry = _BY_NUMPY.get((arr.dtype.kind, arr.dtype.itemsize))
    if entry is None:
        raise CodecError(f"unsupported dtype {arr.dtype}: cast to one of {DTYPE_NAMES}")
    # ascontiguousarray makes 0-d arrays 1-d: keep the original shape.
    return entry, np.ascontiguousarray(arr, dtype=entry.numpy).reshape(arr.shape)


def _valid_name(name: Any) -> str:
    key = str(name).removeprefix("torch.")
    if key not in _BY_NAME:
        raise CodecError(f"unsupported dtype {name!r}; expected one of {DTYPE_NAMES}")
    return key


def _torch_array(t: torch.Tensor, dtype: str | None) -> tuple[_DType, np.ndarray]:
    torch = _TORCH.load()
    if dtype is not None:
        t = t.to(getattr(torch, _valid_name(dtype)))
    entry = _TORCH.by_torch.get(t.dtype)
    if entry is None:
        raise CodecError(f"unsupported dtype {t.dtype}: cast to one of {DTYPE_NAMES}")
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = to_host(t)
    if not t.is_contiguous():
        t = t.contiguous()
    if entry.name == "bfloat16":
        t = t.view(torch.int16)
    arr = t.numpy()
    return entry, arr if _LITTLE else arr.astype(entry.numpy)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy a device tensor to host memory: into pinned memory without blocking, then one
    synchronisation (on the copy's stream) right before the bytes are read."""
    torch = _TORCH.load()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host
    return t.cpu()


# ------------------------------------------------------------------------------------ decode


def to_numpy(msg: pb.Tensor, what: str = "tensor", *, writable: bool = True) -> np.ndarray:
    """Decode to numpy. bfloat16 becomes float32 (exact). writable=False avoids a copy."""
    entry, shape = _entry(msg, what)
    data = msg.data  # read the bytes field once: each access copies
    _check_length(entry, shape, data, what, msg)
    arr = np.frombuffer(data, dtype=entry.numpy).reshape(shape)
    if entry.name == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return arr.copy() if writable and not arr.flags.writeable else arr


def to_torch(msg: pb.Tensor, what: str = "tensor", *, writable: bool = True) -> torch.Tensor:
    """Decode to a CPU torch tensor. writable=False shares the message's bytes (no copy).

    msg may also be a framing view (gradserve.wire) whose data is a buffer: a bytearray is used
    as it is; a read-only or misaligned view is copied when needed.
    """
    torch = _TORCH.load()
    if torch is None:
        raise CodecError(f"decoding to torch needs torch: {torch_hint()}")
    entry, shape = _entry(msg, what)
    data: Any = msg.data  # bytes, or a buffer from a framing view
    _check_length(entry, shape, data, what, msg)
    tdtype = _TORCH.by_wire[entry.wire]
    if not data:
        return torch.empty(shape, dtype=tdtype)
    if not _LITTLE:
        native = np.frombuffer(data, dtype=entry.numpy).astype(entry.numpy.replace("<", ">"))
        return torch.from_numpy(native).view(tdtype).reshape(shape)
    if writable and not isinstance(data, bytearray):
        data = bytearray(data)
    elif not writable:
        quiet_readonly_warnings()
    if entry.name == "bfloat16":
        return torch.frombuffer(data, dtype=tdtype).reshape(shape)
    # numpy then from_numpy: no torch operator runs, so the GIL is not dropped and retaken
    # (each drop lets a waiting gRPC thread in, which costs more than the decode itself).
    arr = np.frombuffer(data, dtype=entry.numpy)
    if isinstance(data, memoryview) and arr.ctypes.data % entry.itemsize:
        arr = arr.copy()  # a payload view at an odd offset (a foreign sender): align it
    return torch.from_numpy(arr.reshape(shape))


_READONLY_WARNINGS = ("The given buffer is not writable", "The given NumPy array is not writable")
_MODULE = rf"{__name__.replace('.', '[.]')}$"
# As warnings.filterwarnings stores them (to see whether they are still there).
_FILTERS = [("ignore", re.compile(m, re.IGNORECASE), UserWarning, re.compile(_MODULE), 0)
            for m in _READONLY_WARNINGS]


def quiet_readonly_warnings() -> None:
    """Silence torch's warning that a tensor wraps read-only memory, for this module's own
    decodes only: to_torch(writable=False) over request bytes that nothing writes into (the
    server refuses in-place layers). The filter names this module, so the same warning from
    any other code still shows. Called by to_torch(writable=False) itself (again after
    something reset the filters); the server may call it at start-up. Idempotent."""
    if not all(f in warnings.filters for f in _FILTERS):
        for message in _READONLY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                    module=_MODULE)


def decode(msg: pb.Tensor, what: str = "tensor") -> Any:
    """Decode for users: a torch tensor when torch is importable, else a numpy array."""
    return to_torch(msg, what) if _TORCH.load() is not None else to_numpy(msg, what)


def has_torch() -> bool:
    """True when torch is importable (results are then torch tensors). Imports it."""
    return _TORCH.load() is not None
