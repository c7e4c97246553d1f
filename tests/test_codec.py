"""The tensor codec: a round trip per dtype, byte order, bf16 bits, shapes, and its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gradserve import codec
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb


@pytest.mark.parametrize("name", codec.DTYPE_NAMES)
def test_torch_round_trip_per_dtype(name: str) -> None:
    t = (torch.arange(-6, 6).reshape(3, 4) * 1.25).to(getattr(torch, name))
    msg = codec.encode(t)
    assert msg.dtype == codec.dtype_wire(name) and list(msg.shape) == [3, 4]
    back = codec.to_torch(msg)
    assert back.dtype == t.dtype and torch.equal(back, t)
    back[0, 0] = 1  # decoded tensors are writable by default (a copy)


@pytest.mark.parametrize("name", [n for n in codec.DTYPE_NAMES if n != "bfloat16"])
def test_numpy_round_trip_per_dtype(name: str) -> None:
    arr = (np.arange(-6, 6).reshape(2, 6) * 1.25).astype(name)
    back = codec.to_numpy(codec.encode(arr))
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_wire_bytes_are_little_endian_c_order() -> None:
    arr = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=">f4").T  # big-endian and not C-contiguous
    msg = codec.encode(arr)
    assert msg.data == np.array([1.0, 3.0, 2.0, 4.0], dtype="<f4").tobytes()


def test_bfloat16_travels_as_its_16_bit_pattern() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    msg = codec.encode(t)
    assert msg.data == t.view(torch.int16).numpy().astype("<i2").tobytes()
    as_f32 = codec.to_numpy(msg)  # numpy has no bf16: exact float32
    assert as_f32.dtype == np.float32 and as_f32.tolist() == [1.0, -2.5, 3.140625]


def test_scalars_empty_and_python_values() -> None:
    assert list(codec.encode(2.5).shape) == [] and codec.encode(2.5).dtype == pb.DTYPE_FLOAT32
    assert codec.encode([1, 2]).dtype == pb.DTYPE_INT64
    assert codec.encode(True).dtype == pb.DTYPE_BOOL
    empty = codec.to_torch(codec.encode(torch.zeros(0, 3)))
    assert empty.shape == (0, 3)
    assert codec.to_torch(codec.encode(torch.tensor(7.0))).item() == 7.0


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 7), "needs 8"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1], data=b""), "negative"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"), "dtype is unset"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "unknown dtype"),
        (pb.Tensor(dtype=pb.DTYPE_INT8, shape=[1 << 30, 1 << 30], data=b""), "more than"),
    ],
)
def test_decode_errors_name_the_problem(msg: pb.Tensor, needle: str) -> None:
    with pytest.raises(codec.CodecError, match=needle):
        codec.to_torch(msg, "inputs[0]")


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(codec.CodecError, match="unsupported"):
        codec.encode(np.zeros(2, dtype=np.complex64))
    with pytest.raises(codec.CodecError, match="unsupported"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))


def test_sdk_without_torch_returns_numpy() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np
        from gradserve import codec
        assert not codec.has_torch()
        out = codec.decode(codec.encode(np.ones((2, 2), np.float32)))
        assert isinstance(out, np.ndarray) and out.sum() == 4
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
