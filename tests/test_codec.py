"""The tensor codec: a round trip per dtype, byte order, bf16 bits, shapes, and its errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gradserve import InvalidArgumentError, TensorArgumentError, _ops, codec
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


@pytest.mark.parametrize("value", [
    np.zeros(2, dtype=np.complex64), torch.zeros(2, dtype=torch.complex64),
    np.zeros(2, dtype=np.uint64), np.zeros(2, dtype=np.uint16), np.array(["a", "b"]),
    np.array([b"a"]), np.array([{}, 1], dtype=object), ["a", 1.0], [2**63], [2**64],
    np.array(["2026-01-01"], dtype="datetime64[D]"),
], ids=lambda v: type(v).__name__ + ":" + str(getattr(v, "dtype", v)))
def test_unsupported_values_are_refused(value: object) -> None:
    with pytest.raises(codec.CodecError, match="unsupported dtype|do not fit int64"):
        codec.encode(value)
    with pytest.raises(codec.CodecError):
        codec.encode_array(value)


def test_python_ints_up_to_int64_are_kept_exactly() -> None:
    msg = codec.encode([2**63 - 1, -(2**63)])
    assert msg.dtype == pb.DTYPE_INT64
    assert codec.to_numpy(msg).tolist() == [2**63 - 1, -(2**63)]


@pytest.mark.parametrize("value", [
    torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).T,  # bf16, not contiguous
    np.arange(6, dtype=">f8").reshape(2, 3)[:, ::2],  # big-endian, strided
    np.array(True), [1.5, 2.5], [[1, 2], [3, 4]], np.zeros((0, 3), np.int16),
], ids=["bf16", "big-endian", "0-d", "floats", "ints", "empty"])
def test_upload_sends_the_codecs_bytes(value: object) -> None:
    """UploadDataset chunks are the bytes encode() puts in a Tensor (one conversion)."""
    op = _ops.upload(value, None, "d", chunk_bytes=5, timeout=None)
    header, *chunks = list(op.request)
    expected = codec.encode(value)
    assert header.header.inputs[0].dtype == expected.dtype
    assert list(header.header.inputs[0].shape) == list(expected.shape)
    assert b"".join(c.chunk for c in chunks) == expected.data
    assert all(len(c.chunk) <= 5 for c in chunks)


def test_sdk_refuses_unsendable_values_naming_the_argument() -> None:
    """Before anything is sent: an InvalidArgumentError (also a TypeError) naming the argument."""
    x = np.ones((4, 2), np.float32)
    for build, what in [
        (lambda: _ops.upload(x, np.array(["a"] * 4), "d", 1024, None), "target"),
        (lambda: _ops.upload((x, x.astype(np.complex64)), None, "d", 1024, None), "inputs[1]"),
        (lambda: _ops.forward("m", [x, np.zeros(2, np.uint64)], False, False), "inputs[1]"),
        (lambda: _ops.backward("m", [], x, [2**64]), "target"),
        (lambda: _ops.set_parameters("m", {"w": np.array([1j])}), "parameters[w]"),
    ]:
        expected = rf"^INVALID_ARGUMENT: {re.escape(what)}: "
        with pytest.raises(TensorArgumentError, match=expected) as err:
            build()
        assert isinstance(err.value, InvalidArgumentError) and isinstance(err.value, TypeError)


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
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_import_has_no_side_effects() -> None:
    """import gradserve neither imports torch nor changes the warning filters."""
    result = _python("""
        import sys, warnings
        import grpc, numpy  # their own filters (numpy adds some) are not ours
        before = list(warnings.filters)
        import gradserve, gradserve.aio, gradserve.cli, gradserve.io, gradserve.wire
        assert "torch" not in sys.modules, "torch imported"
        assert warnings.filters == before, "warning filters changed"
        from gradserve import codec
        codec.decode(codec.encode([1.0, 2.0]))  # the first decode imports torch
        assert "torch" in sys.modules
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


SCRIPT = shutil.which("gradserve", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "gradserve.probe", "--help"],
    [sys.executable, "-m", "gradserve.cli", "--help"],
    pytest.param([SCRIPT or "gradserve", "--help"], id="gradserve-script",
                 marks=pytest.mark.skipif(SCRIPT is None, reason="not installed")),
])
def test_entry_points_do_not_import_torch(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "gradserve" in imported and "torch" not in imported


def test_readonly_decode_silences_only_its_own_warning() -> None:
    """The server's zero-copy decode does not warn; the same warning from other code shows."""
    result = _python("""
        import warnings
        import numpy as np
        from gradserve import codec
        msg = codec.encode(np.ones(4, np.float32))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            codec.to_torch(msg, writable=False)  # torch warns once here: filtered
            warnings.warn_explicit("The given NumPy array is not writable (yours)", UserWarning,
                                   "yours.py", 1, module="yours")
        print([str(w.message) for w in seen])
    """)
    assert result.stdout.strip() == "['The given NumPy array is not writable (yours)']", \
        result.stderr


def test_server_core_imports_neither_grpc_nor_the_clients() -> None:
    """The core uses the SDK's plain result types (gradserve.results): importing them must not
    load grpc, which only the server's transport and app may import."""
    code = textwrap.dedent("""
        import sys
        import gradserve_server.core.service, gradserve_server.core.trainer
        import gradserve_server.core.checkpoints
        loaded = [m for m in ("grpc", "gradserve.client", "gradserve.aio") if m in sys.modules]
        assert not loaded, loaded
        import gradserve
        assert gradserve.TrainEvent is sys.modules["gradserve.results"].TrainEvent
        assert "grpc" not in sys.modules
        from gradserve import Client  # the clients load on first use
        assert "grpc" in sys.modules and Client.__module__ == "gradserve.client"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_nan_cast_to_an_integer_dtype_is_silent() -> None:
    """NaN and inf sent as an integer dtype: numpy's cast gives whatever it gives (as torch's
    .to does), without a RuntimeWarning leaking into the caller's warning filters."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = codec.encode(np.array([np.nan, np.inf, 1.0]), dtype="int64")
    assert msg.dtype == pb.DTYPE_INT64 and list(msg.shape) == [3]
    assert codec.to_torch(msg)[2].item() == 1
