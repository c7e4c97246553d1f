"""Correctness of the fast paths: framing (gradserve.wire), shared memory (shm), their fallbacks, cleanup.

Every fast path must give exactly what the plain path gives; nothing here is timed (bench/ is).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import message as pb_message
from gradserve import Client, codec, shm, tune_malloc, wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve.aio import AsyncClient
from gradserve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]
BIG = 300_000  # elements: above both the framing and the shared-memory thresholds for any dtype


def sample(dtype: torch.dtype, n: int = BIG, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=g,
                         dtype=dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def model_dtype(dtype: torch.dtype) -> str:
    """A model dtype that leaves inputs of dtype as they are (floating inputs are cast)."""
    return str(dtype).removeprefix("torch.") if dtype.is_floating_point else "float32"


def segments_of(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(shm.DIRECTORY) if n.startswith(f"gradserve-{pid}-"))


needs_shm = pytest.mark.skipif(not shm.available(), reason="needs sealable memfds (Linux)")


def poll(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------ framing (unit)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_join_writes_standard_protobuf_with_aligned_payloads(dtype: torch.dtype) -> None:
    x = sample(dtype)
    meta, payload = codec.encode_parts(x, minimum=1)
    assert payload is not None and not meta.data
    req = pb.BackwardRequest(model_id="m", inputs=[meta, codec.encode(torch.ones(3))],
                             request_id="r")
    req.target.CopyFrom(meta)
    payloads = {("inputs", 0): payload, ("target",): payload}
    data = wire.join(req, payloads)
    plain = pb.BackwardRequest.FromString(data)  # what any protobuf peer reads
    assert plain.model_id == "m" and plain.request_id == "r" and len(plain.inputs) == 2
    assert same(codec.to_torch(plain.inputs[0]), x)
    assert same(codec.to_torch(plain.target), x)
    assert same(codec.to_torch(plain.inputs[1]), torch.ones(3))
    base = np.frombuffer(data, np.uint8).ctypes.data
    views = wire.split(data, pb.BackwardRequest).payloads.values()
    assert len(views) == 2
    for view in views:
        offset = np.frombuffer(view, np.uint8).ctypes.data - base
        assert offset % 8 == 0, "payloads start 8-byte aligned within the message"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_of_plain_protobuf_gives_the_same_values(dtype: torch.dtype) -> None:
    x = sample(dtype, seed=1)
    msg = pb.BackwardResponse(step=3, loss=0.5, grads={"0.weight": codec.encode(x),
                                                        "tiny": codec.encode(torch.ones(2))},
                              input_grads=[codec.encode(x)], output=codec.encode(x))
    framed = wire.split(msg.SerializeToString(), pb.BackwardResponse)
    assert isinstance(framed, wire.Framed)
    assert set(framed.payloads) == {("grads", "0.weight"), ("input_grads", 0), ("output",)}
    assert framed.step == 3 and framed.HasField("loss") and framed.loss == 0.5
    assert same(codec.to_torch(framed.grads["0.weight"]), x)
    assert same(codec.to_torch(framed.grads["tiny"]), torch.ones(2))
    assert same(codec.to_torch(framed.input_grads[0]), x)
    assert same(codec.to_torch(framed.output, writable=False), x)
    # and back: joining the split message gives the same message again
    again = pb.BackwardResponse.FromString(framed.SerializeToString())
    assert again == msg


def test_split_follows_protobuf_last_field_wins_and_odd_offsets() -> None:
    x = torch.arange(100_000, dtype=torch.float32)
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[100_000], data=x.numpy().tobytes())
    for pad in range(8):  # a foreign encoder may put the payload at any offset
        body = b"\x08" + _varint(pb.DTYPE_FLOAT32, 1 + pad) + tensor.SerializeToString()
        data = b"\x1a" + _varint(len(body)) + body  # BackwardRequest.target
        framed = wire.split(data, pb.BackwardRequest)
        assert ("target",) in framed.payloads
        assert same(codec.to_torch(framed.target, writable=False), x)
        assert same(codec.to_torch(framed.target), x)
    # Later occurrences of a singular message field merge into it (protobuf's rule): the
    # last data wins, whether it is large (a payload) or small (left in the message).
    y = -x
    for later in (pb.Tensor(data=y.numpy().tobytes()), pb.Tensor(data=b"\0" * 8)):
        body = later.SerializeToString()
        twice = data + b"\x1a" + _varint(len(body)) + body
        expected = decoded_or_error(pb.BackwardRequest.FromString(twice).target)
        got = decoded_or_error(wire.split(twice, pb.BackwardRequest).target)
        assert type(got) is type(expected)
        if isinstance(got, torch.Tensor):
            assert same(got, expected) and same(got, y)


def decoded_or_error(msg: Any) -> Any:
    try:
        return codec.to_torch(msg)
    except codec.CodecError as exc:
        return exc


def _varint(n: int, width: int = 0) -> bytes:
    """Protobuf varint, padded to `width` bytes when given (parsers accept that)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        more = n or len(out) + 1 < width
        out.append(byte | (0x80 if more else 0))
        if not more:
            return bytes(out)


def test_split_rejects_malformed_bytes() -> None:
    data = b"\x12\xff\xff\xff\x0f" + b"\0" * 70_000  # a length that runs past the end
    with pytest.raises((wire.WireError, pb_message.DecodeError)):
        wire.split(data, pb.ForwardRequest)


def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() in (True, False)  # False only without glibc
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert tune_malloc()


# ------------------------------------------------------------------ wire path (server)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tensors_over_the_wire_equal_small_ones(make_server: Callable[..., Any],
                                                      dtype: torch.dtype) -> None:
    server = make_server(max_shm_mb=0)
    x = sample(dtype)
    with Client(f"127.0.0.1:{server.port}", shared_memory=False) as c:
        m = c.create_model(layers=[{"type": "Identity"}], dtype=model_dtype(dtype))
        big = m.forward(x)  # framed: payload views, one copy per direction
        pieces = torch.cat([m.forward(x[i:i + 1000]) for i in range(0, 5000, 1000)])  # plain
    assert same(big, x)
    assert same(big[:5000], pieces)
    big[0] = big[1]  # results are writable


def test_backward_results_match_local_torch_through_framing(make_server: Callable[..., Any]
                                                           ) -> None:
    server = make_server(max_shm_mb=0)
    x, y = torch.randn(512, 256), torch.randn(512, 256)
    with Client(f"127.0.0.1:{server.port}", shared_memory=False) as c:
        m = c.create_model(layers=[{"type": "Linear", "in_features": 256, "out_features": 256}],
                           loss="mse", seed=0)
        r = m.backward(x, y, return_grads=True, return_input_grads=True, return_output=True)
    torch.manual_seed(0)
    local = torch.nn.Sequential(torch.nn.Linear(256, 256))
    xr = x.clone().requires_grad_(True)
    out = local(xr)
    loss = torch.nn.functional.mse_loss(out, y)
    loss.backward()
    assert r.loss == loss.item()
    assert torch.equal(r.grads["0.weight"], local[0].weight.grad)
    assert torch.equal(r.grads["0.bias"], local[0].bias.grad)
    assert torch.equal(r.input_grads[0], xr.grad)
    assert torch.equal(r.output, out.detach())


def test_async_client_sends_and_receives_framed_tensors(server: Any) -> None:
    x = torch.randn(400, 400)

    async def run() -> torch.Tensor:
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            m = await c.create_model(layers=[{"type": "Identity"}])
            return await m.forward(x)

    assert same(asyncio.run(run()), x)


# ------------------------------------------------------------------ shared memory


@needs_shm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_memory_values_equal_the_wire(make_server: Callable[..., Any],
                                             dtype: torch.dtype) -> None:
    server = make_server()
    x = sample(dtype, n=1_100_000)  # over the 1 MiB threshold for every dtype
    address = f"127.0.0.1:{server.port}"
    with Client(address, shared_memory=True) as fast, \
            Client(address, shared_memory=False) as wire:
        m = fast.create_model(layers=[{"type": "Identity"}], dtype=model_dtype(dtype))
        via_shm = m.forward(x)
        via_wire = wire.model(m.id).forward(x)
        assert fast._shm is not None and fast._shm.enabled and fast._shm.segments >= 1
        assert len(server.shm) >= 1
        via_shm[0] = via_shm[1]  # writable, and not a view of the segment:
        again = m.forward(x)  # the segment is reused by this call
    assert same(via_wire, x) and same(again, x)
    assert same(via_shm[1:], x[1:])


@needs_shm
def test_shared_memory_backward_and_retained_graphs(make_server: Callable[..., Any]) -> None:
    server = make_server()
    x, y = torch.randn(2048, 256), torch.randn(2048, 256)
    address = f"127.0.0.1:{server.port}"
    with Client(address, shared_memory=True) as fast, \
            Client(address, shared_memory=False) as wire:
        spec = {"layers": [{"type": "Linear", "in_features": 256, "out_features": 256}],
                "loss": "mse", "seed": 0}
        a, b = fast.create_model(**spec), wire.create_model(**spec)
        ra = a.backward(x, y, return_grads=True, return_input_grads=True, return_output=True)
        rb = b.backward(x, y, return_grads=True, return_input_grads=True, return_output=True)
        assert ra.loss == rb.loss
        for k in rb.grads:
            assert torch.equal(ra.grads[k], rb.grads[k])
        assert torch.equal(ra.input_grads[0], rb.input_grads[0])
        assert torch.equal(ra.output, rb.output)
        # A retained forward keeps its inputs although the client reuses the segment at once.
        fa = a.forward(x, retain_graph=True)
        a.forward(torch.zeros_like(x))  # overwrites the request range of the segment
        fb = b.forward(x, retain_graph=True)
        ga = a.backward(forward_id=fa.forward_id, grad_output=torch.ones(2048, 256),
                        return_grads=True)
        gb = b.backward(forward_id=fb.forward_id, grad_output=torch.ones(2048, 256),
                        return_grads=True)
        for k in gb.grads:
            assert torch.equal(ga.grads[k], gb.grads[k])
        assert fast._shm is not None and fast._shm.enabled


@needs_shm
def test_fallback_when_the_server_cannot_open_the_segment(make_server: Callable[..., Any],
                                                          tmp_path: Path) -> None:
    server = make_server()
    assert server.shm is not None
    server.shm.proc = str(tmp_path)  # as if the server ran on another host (or pid namespace)
    x = torch.randn(1_000_000)
    with Client(f"127.0.0.1:{server.port}", shared_memory=True) as c:
        m = c.create_model(layers=[{"type": "Identity"}])
        assert same(m.forward(x), x)
        assert c._shm is not None and not c._shm.enabled
        assert "FAILED_PRECONDITION" in c._shm.reason
        assert same(m.forward(x), x)  # and it stays on the wire
        assert segments_of(os.getpid()) == []
    assert len(server.shm) == 0


@needs_shm
def test_fallback_when_the_server_disables_shared_memory(make_server: Callable[..., Any]
                                                         ) -> None:
    server = make_server(max_shm_mb=0)
    x = torch.randn(1_000_000)
    with Client(f"127.0.0.1:{server.port}", shared_memory=True) as c:
        m = c.create_model(layers=[{"type": "Identity"}])
        assert same(m.forward(x), x)
        assert c._shm is not None and not c._shm.enabled
    assert segments_of(os.getpid()) == []


@needs_shm
def test_close_unregisters_and_leaves_no_files(make_server: Callable[..., Any]) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.port}") as c:  # loopback: on by default
        m = c.create_model(layers=[{"type": "Identity"}])
        m.forward(torch.randn(1_000_000))
        assert c._shm is not None and c._shm.segments == 1
        assert len(server.shm) == 1
        assert segments_of(os.getpid()) == []  # unlinked right after registration
    assert len(server.shm) == 0


@needs_shm
def test_killed_client_leaves_no_files_and_its_region_expires(make_server: Callable[..., Any]
                                                              ) -> None:
    server = make_server(shm_ttl_s=1.0)
    script = textwrap.dedent(f"""
        import sys, torch
        from gradserve import Client
        c = Client("127.0.0.1:{server.port}", shared_memory=True)
        m = c.create_model(layers=[{{"type": "Identity"}}])
        x = torch.randn(1_000_000)
        m.forward(x)
        print("ready", flush=True)
        while True:
            m.forward(x)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert len(server.shm) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert segments_of(proc.pid) == []
    poll(lambda: len(server.shm) == 0, "the dead client's region to expire")


@needs_shm
def test_expired_region_is_registered_again(make_server: Callable[..., Any]) -> None:
    server = make_server(shm_ttl_s=0.3)
    x = torch.randn(1_000_000)
    with Client(f"127.0.0.1:{server.port}", shared_memory=True) as c:
        m = c.create_model(layers=[{"type": "Identity"}])
        assert same(m.forward(x), x)
        poll(lambda: len(server.shm) == 0, "the idle region to expire")
        assert same(m.forward(x), x)  # a fresh segment (or the wire), never a wrong answer
        assert c._shm is not None and c._shm.enabled
        assert len(server.shm) == 1


@needs_shm
def test_a_request_naming_an_unknown_region_falls_back_to_the_wire(
        make_server: Callable[..., Any]) -> None:
    server = make_server()
    x = torch.randn(1_000_000)
    with Client(f"127.0.0.1:{server.port}", shared_memory=True) as c:
        m = c.create_model(layers=[{"type": "Identity"}])
        m.forward(x)
        assert server.shm is not None
        server.shm.close()  # the server forgot every region (as after a restart)
        assert same(m.forward(x), x)


def test_register_checks_descriptor_seals_and_nonce(make_server: Callable[..., Any],
                                                    tmp_path: Path) -> None:
    import fcntl

    server = make_server()
    with Client(f"127.0.0.1:{server.port}", shared_memory=False) as c:
        register = c._stub.RegisterSharedMemory

        def refused(**fields: Any) -> str:
            with pytest.raises(Exception) as info:
                register(pb.RegisterSharedMemoryRequest(**{"size": 4096, "nonce": b"0" * 16,
                                                           **fields}))
            return str(info.value)

        # The old way, a name in /dev/shm, is refused: such files can be truncated under us.
        assert "FAILED_PRECONDITION" in refused(name="gradserve-0-old")
        # A file that is not a memfd: refused, and the answer says nothing about it.
        f = tmp_path / "plain"
        f.write_bytes(bytes(4096))
        with open(f, "r+b") as handle:
            plain = refused(pid=os.getpid(), fd=handle.fileno())
        missing = refused(pid=os.getpid(), fd=987654)
        assert "FAILED_PRECONDITION" in plain and plain == missing
        if shm.available():
            def memfd(seal: bool, size: int = 4096, nonce: bytes = b"A" * 16) -> int:
                fd = os.memfd_create(f"gradserve-{os.getpid()}-t", os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, size)
                os.pwrite(fd, nonce, 0)
                if seal:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm.SEALS)
                return fd

            unsealed, sealed = memfd(False), memfd(True)
            try:
                assert refused(pid=os.getpid(), fd=unsealed, nonce=b"A" * 16) == plain
                assert refused(pid=os.getpid(), fd=sealed, nonce=b"B" * 16) == plain  # nonce
                assert refused(pid=os.getpid(), fd=sealed, nonce=b"A" * 16, size=8192) == plain
                ok = register(pb.RegisterSharedMemoryRequest(size=4096, nonce=b"A" * 16,
                                                             pid=os.getpid(), fd=sealed))
                assert ok.region_id and len(server.shm) == 1
                c._run(_unregister_op(ok.region_id))
                assert len(server.shm) == 0
            finally:
                os.close(unsealed)
                os.close(sealed)
        with pytest.raises(NotFoundError):
            c._run(_unregister_op("no-such-region"))


def _unregister_op(region_id: str) -> Any:
    from gradserve._ops import Op

    return Op("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(region_id=region_id),
              lambda r: None)


def test_shared_memory_tensor_outside_forward_backward_is_refused(client: Client) -> None:
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4],
                  shm=pb.SharedMemoryRef(region_id="x", offset=64, length=16))
    m = client.create_model(layers=[{"type": "Identity"}])
    from gradserve._ops import Op

    req = pb.SetParametersRequest(model_id=m.id, parameters={"w": t})
    with pytest.raises(InvalidArgumentError):
        client._run(Op("SetParameters", req, lambda r: None))
    # and in a Forward without shm_reply
    with pytest.raises(InvalidArgumentError):
        client._run(Op("Forward", pb.ForwardRequest(model_id=m.id, inputs=[t]), lambda r: r))


def test_shared_memory_ref_to_an_unknown_region_is_a_failed_precondition(client: Client) -> None:
    from gradserve._ops import Op

    m = client.create_model(layers=[{"type": "Identity"}])
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4],
                  shm=pb.SharedMemoryRef(region_id="gone", offset=64, length=16))
    req = pb.ForwardRequest(model_id=m.id, inputs=[t],
                            shm_reply=pb.SharedMemoryRef(region_id="gone", offset=128, length=0))
    with pytest.raises(FailedPreconditionError, match="shared memory"):
        client._run(Op("Forward", req, lambda r: r))


def test_sweep_removes_segments_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"gradserve-{pid}-abcdef"
    mine = tmp_path / f"gradserve-{os.getpid()}-abcdef"
    other = tmp_path / "unrelated"
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert shm.sweep_stale(str(tmp_path)) == 1
    assert not stale.exists() and mine.exists() and other.exists()


def test_loopback_addresses_try_shared_memory_by_default() -> None:
    assert shm.same_host("127.0.0.1:50051") and shm.same_host("localhost:1")
    assert shm.same_host("[::1]:50051") and shm.same_host("unix:/tmp/s")
    assert not shm.same_host("10.0.0.7:50051") and not shm.same_host("example.com:443")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_results_equal_cpu(make_server: Callable[..., Any]) -> None:
    cpu, gpu = make_server(device="cpu"), make_server(device="cuda")
    x, y = torch.randn(1024, 512), torch.randn(1024, 512)
    spec = {"layers": [{"type": "Linear", "in_features": 512, "out_features": 512}],
            "loss": "mse", "seed": 0}
    with Client(f"127.0.0.1:{cpu.port}") as a, Client(f"127.0.0.1:{gpu.port}") as b:
        ma, mb = a.create_model(**spec), b.create_model(**spec)
        assert torch.allclose(ma.forward(x), mb.forward(x), atol=1e-5)
        ra = ma.backward(x, y, return_grads=True, return_output=True)
        rb = mb.backward(x, y, return_grads=True, return_output=True)
        assert torch.allclose(ra.grads["0.weight"], rb.grads["0.weight"], atol=1e-5)
        assert torch.allclose(ra.output, rb.output, atol=1e-5)
