"""numpy/torch <-> wire Tensor: the only tensor conversion code (the server uses it too).

One dtype table drives both directions. Data is raw little-endian C-order bytes; bfloat16 travels
as its 16-bit pattern. torch is optional: without it, bfloat16 decodes to float32 (exactly).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

if TYPE_CHECKING:
    import torch

try:
    import torch as _torch
except ImportError:  # the SDK works with numpy alone
    _torch = None  # type: ignore[assignment]

if _torch is not None:
    # Decoding wraps the message's immutable bytes without a copy; torch warns once that the
    # buffer is read-only. The server never writes into decoded inputs (in-place layers are refused).
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

ArrayLike = Union["torch.Tensor", np.ndarray, float, int, bool, list]

# Largest tensor the codec accepts by element count (guards shape products against overflow).
MAX_ELEMENTS = 1 << 40
# Most dimensions a tensor may have (torch's own limit).
MAX_DIMS = 64


class CodecError(ValueError):
    """A wire tensor that cannot be decoded (bad dtype, shape or byte length)."""


@dataclass(frozen=True)
class _DType:
    wire: int
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
_BY_WIRE = {d.wire: d for d in _TABLE}
_BY_NAME = {d.name: d for d in _TABLE}
# numpy kinds that map onto a wire dtype (bf16 has no numpy dtype).
# (numpy kind, itemsize) -> entry; bf16 has no numpy dtype and uint16 is not a wire dtype.
_BY_NUMPY = {(np.dtype(d.numpy).kind, d.itemsize): d for d in _TABLE if d.name != "bfloat16"}
# torch dtype -> entry, and wire enum -> torch dtype (empty without torch).
_BY_TORCH: dict[Any, _DType] = (
    {getattr(_torch, d.torch): d for d in _TABLE} if _torch is not None else {})
_TORCH_BY_WIRE: dict[int, Any] = {e.wire: t for t, e in _BY_TORCH.items()}
# torch.frombuffer reads native byte order; on a big-endian host decoding goes through numpy.
_LITTLE = sys.byteorder == "little"

DTYPE_NAMES: tuple[str, ...] = tuple(d.name for d in _TABLE)


def dtype_name(wire: int) -> str:
    """Wire enum value -> 'float32' etc.; CodecError if unknown."""
    try:
        return _BY_WIRE[wire].name
    except KeyError:
        raise CodecError(f"unknown dtype enum value {wire}; expected one of {DTYPE_NAMES}") from None


def dtype_wire(name: str) -> int:
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


def encode(value: ArrayLike, *, dtype: str | None = None) -> pb.Tensor:
    """Encode a torch tensor, numpy array or Python scalar/list (optionally cast to dtype).

    Python floats and lists of floats become float32 and ints int64, as torch.tensor does;
    numpy arrays keep their dtype unless dtype is given.
    """
    entry, arr = _contiguous(value, dtype)
    return pb.Tensor(dtype=entry.wire, shape=arr.shape, data=arr.tobytes())


def encode_parts(value: ArrayLike, *, dtype: str | None = None, minimum: int = 0
                 ) -> tuple[pb.Tensor, memoryview | None]:
    """Like encode, but a payload of at least `minimum` bytes is returned beside the message as
    a zero-copy view of the value's memory (the message then has no data). The value must not
    change until the view has been sent."""
    entry, arr = _contiguous(value, dtype)
    if arr.nbytes < minimum or arr.nbytes == 0:
        return pb.Tensor(dtype=entry.wire, shape=arr.shape, data=arr.tobytes()), None
    view = memoryview(arr.reshape(-1).view(np.uint8))
    return pb.Tensor(dtype=entry.wire, shape=arr.shape), view


def _contiguous(value: ArrayLike, dtype: str | None) -> tuple[_DType, np.ndarray]:
    """The wire dtype and a C-contiguous little-endian array of value (bf16 as its bits)."""
    if _torch is not None and isinstance(value, _torch.Tensor):
        return _torch_array(value, dtype)
    arr = np.asarray(value)
    if not isinstance(value, np.ndarray) and dtype is None:
        dtype = {"f": "float32", "i": "int64", "u": "int64"}.get(arr.dtype.kind)
    if dtype is not None:
        name = _valid_name(dtype)
        if name == "bfloat16":
            if _torch is None:
                raise CodecError("encoding bfloat16 from numpy needs torch installed")
            return _torch_array(_torch.from_numpy(np.array(arr, dtype=np.float32)), name)
        arr = arr.astype(_BY_NAME[name].numpy, copy=False)
    entry = _BY_NUMPY.get((arr.dtype.kind, arr.dtype.itemsize))
    if entry is None:
        raise CodecError(f"unsupported numpy dtype {arr.dtype}; expected one of {DTYPE_NAMES}")
    # ascontiguousarray makes 0-d arrays 1-d: keep the original shape.
    return entry, np.ascontiguousarray(arr, dtype=entry.numpy).reshape(arr.shape)


def _valid_name(name: Any) -> str:
    key = str(name).removeprefix("torch.")
    if key not in _BY_NAME:
        raise CodecError(f"unsupported dtype {name!r}; expected one of {DTYPE_NAMES}")
    return key


def _torch_array(t: "torch.Tensor", dtype: str | None) -> tuple[_DType, np.ndarray]:
    assert _torch is not None
    if dtype is not None:
        t = t.to(getattr(_torch, _valid_name(dtype)))
    entry = _BY_TORCH.get(t.dtype)
    if entry is None:
        raise CodecError(f"unsupported torch dtype {t.dtype}; expected one of {DTYPE_NAMES}")
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = to_host(t)
    if not t.is_contiguous():
        t = t.contiguous()
    if entry.name == "bfloat16":
        t = t.view(_torch.int16)
    arr = t.numpy()
    return entry, arr if _LITTLE else arr.astype(entry.numpy)


def to_host(t: "torch.Tensor") -> "torch.Tensor":
    """Copy a device tensor to host memory: into pinned memory without blocking, then one
    synchronisation (on the copy's stream) right before the bytes are read."""
    assert _torch is not None
    if t.device.type == "cuda":
        host = _torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        _torch.cuda.current_stream(t.device).synchronize()
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


def to_torch(msg: pb.Tensor, what: str = "tensor", *, writable: bool = True) -> "torch.Tensor":
    """Decode to a CPU torch tensor. writable=False shares the message's bytes (no copy).

    msg may also be a framing view (gradserve.wire) whose data is a buffer: a bytearray is used
    as it is; a read-only or misaligned view is copied when needed.
    """
    if _torch is None:
        raise CodecError("decoding to torch needs torch installed")
    entry, shape = _entry(msg, what)
    data: Any = msg.data  # bytes, or a buffer from a framing view
    _check_length(entry, shape, data, what, msg)
    tdtype = _TORCH_BY_WIRE[entry.wire]
    if not data:
        return _torch.empty(shape, dtype=tdtype)
    if not _LITTLE:
        native = np.frombuffer(data, dtype=entry.numpy).astype(entry.numpy.replace("<", ">"))
        return _torch.from_numpy(native).view(tdtype).reshape(shape)
    if writable and not isinstance(data, bytearray):
        data = bytearray(data)
    if entry.name == "bfloat16":
        return _torch.frombuffer(data, dtype=tdtype).reshape(shape)
    # numpy then from_numpy: no torch operator runs, so the GIL is not dropped and retaken
    # (each drop lets a waiting gRPC thread in, which costs more than the decode itself).
    arr = np.frombuffer(data, dtype=entry.numpy)
    if isinstance(data, memoryview) and arr.ctypes.data % entry.itemsize:
        arr = arr.copy()  # a payload view at an odd offset (a foreign sender): align it
    return _torch.from_numpy(arr.reshape(shape))


def decode(msg: pb.Tensor, what: str = "tensor") -> Any:
    """Decode for users: a torch tensor when torch is importable, else a numpy array."""
    return to_torch(msg, what) if _torch is not None else to_numpy(msg, what)


def has_torch() -> bool:
    """True when torch is importable (results are then torch tensors)."""
    return _torch is not None
