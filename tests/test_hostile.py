"""One client must never take the server down: each test is one attack, named for what the
attacker does, and asserts both the attacker's status and that another client still gets
answers (issue 12: shared memory, starvation, memory, auth before parsing, drain)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gradserve import Client, GradServeError, shm
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "/gradserve.v1.GradientService/"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
MIB = 1024 * 1024
needs_memfd = pytest.mark.skipif(not shm.available(), reason="needs sealable memfds (Linux)")


# ------------------------------------------------------------------------------------ helpers


def other_client_is_served(address: str, token: str | None = None) -> None:
    """Another, well-behaved client: health and ListModels answer."""
    with Client(address, timeout=20, shared_memory=False, token=token) as other:
        assert other.health(timeout=10) == "SERVING"
        other.list_models()


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value  # type: ignore[no-any-return]


def raw_unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(SERVICE + method)  # bytes in, bytes out


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def poll(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def sealed_memfd(size: int, nonce: bytes, seal: bool = True) -> int:
    fd = os.memfd_create(f"gradserve-{os.getpid()}-hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, nonce, 0)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def register_memfd(channel: grpc.Channel, fd: int, size: int, nonce: bytes,
                   metadata: Any = None) -> str:
    reply = channel.unary_unary(
        SERVICE + "RegisterSharedMemory",
        request_serializer=pb.RegisterSharedMemoryRequest.SerializeToString,
        response_deserializer=pb.RegisterSharedMemoryResponse.FromString)(
        pb.RegisterSharedMemoryRequest(size=size, nonce=nonce, pid=os.getpid(), fd=fd),
        timeout=10, metadata=metadata)
    return reply.region_id  # type: ignore[no-any-return]


def forward_from_region(channel: grpc.Channel, model_id: str, region_id: str, n: int
                        ) -> pb.ForwardResponse:
    """Forward of n float32 read from a region at offset 64; the reply offered right after."""
    length = 4 * n
    request = pb.ForwardRequest(
        model_id=model_id,
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n],
                          shm=pb.SharedMemoryRef(region_id=region_id, offset=64,
                                                 length=length))],
        shm_reply=pb.SharedMemoryRef(region_id=region_id, offset=64 + length, length=length))
    return channel.unary_unary(  # type: ignore[no-any-return]
        SERVICE + "Forward", request_serializer=pb.ForwardRequest.SerializeToString,
        response_deserializer=pb.ForwardResponse.FromString)(request, timeout=20)


# ------------------------------------------------------------------------------------ 1. shm


@needs_memfd
@pytest.mark.hostile("shared memory")
def test_client_truncates_segment_after_register(spawn_server: Any) -> None:
    server = spawn_server()
    n = 32 * 1024  # 128 KiB: large enough that the reply goes into the region too
    size = 64 + 2 * 4 * n + 64
    nonce = os.urandom(16)
    with Client(server.address, timeout=20, shared_memory=False) as c, \
            grpc.insecure_channel(server.address) as channel:
        model = c.create_model(layers=[{"type": "Identity"}])
        # The old way: a /dev/shm file by name. It must be refused, or survive truncation.
        path = Path("/dev/shm") / f"gradserve-{os.getpid()}-truncated"
        path.write_bytes(nonce + bytes(size - 16))
        handle = open(path, "r+b")  # noqa: SIM115 - kept: the server unlinks the name
        try:
            register = channel.unary_unary(
                SERVICE + "RegisterSharedMemory",
                request_serializer=pb.RegisterSharedMemoryRequest.SerializeToString,
                response_deserializer=pb.RegisterSharedMemoryResponse.FromString)
            try:
                region = register(pb.RegisterSharedMemoryRequest(name=path.name, size=size,
                                                                 nonce=nonce), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            else:
                os.ftruncate(handle.fileno(), 0)
                error = rpc_error(lambda: forward_from_region(channel, model.id,
                                                              region.region_id, n))
                assert error.code() != grpc.StatusCode.OK
        finally:
            handle.close()
            path.unlink(missing_ok=True)
        assert server.proc.poll() is None, "the server died"
        other_client_is_served(server.address)

        # A sealed memfd: the truncation itself fails, and the region keeps working.
        fd = sealed_memfd(size, nonce)
        try:
            region_id = register_memfd(channel, fd, size, nonce)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            values = torch.arange(n, dtype=torch.float32)
            os.pwrite(fd, values.numpy().tobytes(), 64)
            reply = forward_from_region(channel, model.id, region_id, n)
            assert reply.output.HasField("shm")
            out = os.pread(fd, 4 * n, int(reply.output.shm.offset))
            assert torch.equal(torch.frombuffer(bytearray(out), dtype=torch.float32), values)
        finally:
            os.close(fd)

        # An unsealed memfd is refused at registration, so its truncation reaches nothing.
        fd = sealed_memfd(size, nonce, seal=False)
        try:
            error = rpc_error(lambda: register_memfd(channel, fd, size, nonce))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        assert server.proc.poll() is None
        other_client_is_served(server.address)


@needs_memfd
@pytest.mark.hostile("shared memory")
def test_client_registers_regions_past_the_caps(spawn_server: Any) -> None:
    server = spawn_server("--max-shm-regions-per-connection", "4", "--max-shm-regions", "6")
    pid = server.proc.pid
    size, nonce = 4096, os.urandom(16)
    memfds = [sealed_memfd(size, nonce) for _ in range(8)]
    try:
        # distinct channel arguments: two connections, two callers
        with grpc.insecure_channel(server.address, options=[("hostile.conn", 1)]) as a, \
                grpc.insecure_channel(server.address, options=[("hostile.conn", 2)]) as b:
            register_memfd(a, memfds[0], size, nonce)
            before = fds(pid)
            for fd in memfds[1:4]:
                register_memfd(a, fd, size, nonce)
            error = rpc_error(lambda: register_memfd(a, memfds[4], size, nonce))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_shm_regions_per_connection" in (error.details() or "")
            register_memfd(b, memfds[5], size, nonce)
            register_memfd(b, memfds[6], size, nonce)
            error = rpc_error(lambda: register_memfd(b, memfds[7], size, nonce))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_shm_regions" in (error.details() or "")
            # A mapping keeps no descriptor: 5 more regions, no more fds.
            assert fds(pid) - before <= 2, (before, fds(pid))
            other_client_is_served(server.address)
    finally:
        for fd in memfds:
            os.close(fd)


@needs_memfd
@pytest.mark.hostile("shared memory")
def test_client_uses_a_region_id_registered_by_another_connection(
        make_server: Callable[..., GradServer]) -> None:
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    n = 32 * 1024
    size, nonce = 64 + 2 * 4 * n + 64, os.urandom(16)
    fd = sealed_memfd(size, nonce)
    try:
        with Client(address, shared_memory=False) as c, \
                grpc.insecure_channel(address, options=[("hostile.conn", 1)]) as owner, \
                grpc.insecure_channel(address, options=[("hostile.conn", 2)]) as thief:
            model = c.create_model(layers=[{"type": "Identity"}])
            region = register_memfd(owner, fd, size, nonce)
            stolen = rpc_error(lambda: forward_from_region(thief, model.id, region, n))
            unknown = rpc_error(lambda: forward_from_region(thief, model.id, "f" * 32, n))
            assert stolen.code() == unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
            # the same answer as for an id that never existed, up to the id itself
            assert (stolen.details() or "").replace(region, "ID") == \
                (unknown.details() or "").replace("f" * 32, "ID")
            unregister = thief.unary_unary(
                SERVICE + "UnregisterSharedMemory",
                request_serializer=pb.UnregisterSharedMemoryRequest.SerializeToString,
                response_deserializer=pb.UnregisterSharedMemoryResponse.FromString)
            error = rpc_error(lambda: unregister(
                pb.UnregisterSharedMemoryRequest(region_id=region), timeout=10))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert forward_from_region(owner, model.id, region, n).output.HasField("shm")
            other_client_is_served(address)
    finally:
        os.close(fd)


@pytest.mark.hostile("shared memory")
def test_client_probes_dev_shm_files_through_registration(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    existing = Path("/dev/shm") / f"gradserve-{os.getpid()}-probe"
    if Path("/dev/shm").is_dir():
        existing.write_bytes(bytes(8192))
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    try:
        with grpc.insecure_channel(address) as channel, open(plain, "rb") as handle:
            register = channel.unary_unary(
                SERVICE + "RegisterSharedMemory",
                request_serializer=pb.RegisterSharedMemoryRequest.SerializeToString,
                response_deserializer=pb.RegisterSharedMemoryResponse.FromString)
            def answer(request: pb.RegisterSharedMemoryRequest) -> str:
                error = rpc_error(lambda: register(request, timeout=10))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                return error.details() or ""

            # By name: a file that exists and one that does not get the same answer.
            by_name = {answer(pb.RegisterSharedMemoryRequest(name=existing.name, size=4096,
                                                             nonce=bytes(16))),
                       answer(pb.RegisterSharedMemoryRequest(
                           name=f"gradserve-{os.getpid()}-none", size=4096, nonce=bytes(16)))}
            assert len(by_name) == 1, by_name
            # By descriptor: a plain file (right or wrong size), a closed descriptor, another
            # process's descriptor all get one and the same answer.
            by_fd = {answer(pb.RegisterSharedMemoryRequest(pid=pid, fd=fd, size=size,
                                                           nonce=bytes(16)))
                     for pid, fd, size in ((os.getpid(), handle.fileno(), 8192),
                                           (os.getpid(), handle.fileno(), 4096),
                                           (os.getpid(), 9999, 4096), (1, 0, 4096))}
            assert len(by_fd) == 1, by_fd
            answers = by_name | by_fd
            # Neither says whether or how large a file is.
            assert not any(w in a for a in answers for w in ("No such", "8192", "4096 bytes"))
        other_client_is_served(address)
    finally:
        existing.unlink(missing_ok=True)


BAD_REFS = [(0, 16), (63, 16), (2**64 - 1, 16), (64, 2**64 - 1), (MIB - 8, 16), (MIB, 16)]


@needs_memfd
@pytest.mark.hostile("shared memory", inputs=4 + len(BAD_REFS) + 3)
def test_client_aims_shared_memory_references_outside_its_region(
        make_server: Callable[..., GradServer]) -> None:
    """Offsets and lengths past the region (or inside its nonce header), reply ranges past it,
    memfds that are unsealed, misnamed, or registered with the wrong nonce or size, and a
    descriptor closed after registration: each gets its status, nothing is read or written
    outside the region, and the server keeps serving."""
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    nonce = os.urandom(16)
    good = sealed_memfd(MIB, nonce)
    unsealed = sealed_memfd(MIB, nonce, seal=False)
    misnamed = os.memfd_create("other-name", os.MFD_ALLOW_SEALING)
    os.ftruncate(misnamed, MIB)
    os.pwrite(misnamed, nonce, 0)
    fcntl.fcntl(misnamed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    try:
        with grpc.insecure_channel(address) as channel:
            for fd, size, key in ((unsealed, MIB, nonce), (misnamed, MIB, nonce),
                                  (good, MIB, bytes(16)), (good, MIB // 2, nonce)):
                error = rpc_error(lambda fd=fd, size=size, key=key: register_memfd(
                    channel, fd, size, key))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            region = register_memfd(channel, good, MIB, nonce)
            with Client(address, shared_memory=False) as c:
                model_id = c.create_model(layers=[{"type": "Identity"}]).id
            forward = channel.unary_unary(
                SERVICE + "Forward", request_serializer=pb.ForwardRequest.SerializeToString,
                response_deserializer=pb.ForwardResponse.FromString)
            reply = pb.SharedMemoryRef(region_id=region, offset=4096, length=4096)
            for offset, length in BAD_REFS:
                tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shm=pb.SharedMemoryRef(
                    region_id=region, offset=offset, length=length))
                error = rpc_error(lambda t=tensor: forward(pb.ForwardRequest(
                    model_id=model_id, inputs=[t], shm_reply=reply), timeout=10))
                assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED), (offset, error)
            x = torch.arange(100_000, dtype=torch.float32)
            for offset, length in ((0, 4096), (2**64 - 1, 10), (MIB, 1)):  # reply range bad
                out = forward(pb.ForwardRequest(
                    model_id=model_id, inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[100_000],
                                                         data=x.numpy().tobytes())],
                    shm_reply=pb.SharedMemoryRef(region_id=region, offset=offset,
                                                 length=length)), timeout=10)
                assert not out.output.HasField("shm")  # it came back on the wire instead
                assert torch.equal(torch.frombuffer(bytearray(out.output.data),
                                                    dtype=torch.float32), x)
            os.close(good)  # the mapping stays valid; the client's own descriptor is gone
            good = -1
            assert list(forward_from_region(channel, model_id, region, 8).output.shape) == [8]
            with grpc.insecure_channel(address, options=[
                    ("grpc.use_local_subchannel_pool", 1)]) as other:
                error = rpc_error(lambda: other.unary_unary(
                    SERVICE + "UnregisterSharedMemory",
                    request_serializer=pb.UnregisterSharedMemoryRequest.SerializeToString)(
                    pb.UnregisterSharedMemoryRequest(region_id=region), timeout=10))
                assert error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for fd in (good, unsealed, misnamed):
            if fd >= 0:
                os.close(fd)
    other_client_is_served(address)


@pytest.mark.hostile("shared memory")
def test_remote_peer_is_refused_shared_memory() -> None:
    from gradserve_server.core.errors import FailedPrecondition
    from gradserve_server.transport.shm import Owner, SharedMemoryRegistry, loopback

    registry = SharedMemoryRegistry(MIB, 60.0)
    assert loopback("ipv4:127.0.0.1:5000") and loopback("ipv6:[::1]:5000")
    assert loopback("ipv6:[::ffff:127.0.0.1]:5000")
    assert not loopback("ipv4:10.0.0.7:5000") and not loopback("ipv6:[fe80::1]:5000")
    with pytest.raises(FailedPrecondition, match="loopback"):
        registry.register(Owner("ipv4:10.0.0.7:5000"), os.getpid(), 0, 4096, bytes(16))


def _tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text("admin\nreader read\nlocal read,shm\n")
    return str(path)


@needs_memfd
@pytest.mark.hostile("shared memory")
def test_token_without_shm_scope_registers_shared_memory(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    server = make_server(auth_token_file=_tokens(tmp_path))
    address = f"127.0.0.1:{server.port}"
    size, nonce = 4096, os.urandom(16)
    fd = sealed_memfd(size, nonce)
    try:
        with grpc.insecure_channel(address) as channel:
            error = rpc_error(lambda: register_memfd(channel, fd, size, nonce,
                                                     metadata=(("authorization",
                                                                "Bearer reader"),)))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs scope 'shm'" in (error.details() or "")
            assert register_memfd(channel, fd, size, nonce,
                                  metadata=(("authorization", "Bearer local"),))
    finally:
        os.close(fd)
    x = torch.randn(1_000_000)
    with Client(address, token="admin") as admin:
        model_id = admin.create_model(layers=[{"type": "Identity"}]).id
    # The reader's channel falls back to the wire, transparently.
    with Client(address, token="reader", shared_memory=True) as reader:
        assert torch.equal(reader.model(model_id).forward(x), x)
        assert reader._shm is not None and not reader._shm.enabled
        assert "PERMISSION_DENIED" in reader._shm.reason
    with Client(address, token="local", shared_memory=True) as local:
        assert torch.equal(local.model(model_id).forward(x), x)
        assert local._shm is not None and local._shm.enabled and local._shm.segments == 1


@needs_memfd
@pytest.mark.hostile("shared memory", inputs=2)
def test_client_uses_a_region_with_another_token_on_the_same_connection(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    """A region is bound to the credential as well as the connection: another token sent on
    the registering channel gets the answer an unknown id gets, and cannot unregister it."""
    server = make_server(auth_token_file=_tokens(tmp_path))
    address = f"127.0.0.1:{server.port}"
    n = 1024
    size, nonce = 64 + 2 * 4 * n + 64, os.urandom(16)
    fd = sealed_memfd(size, nonce)
    local, admin = (("authorization", "Bearer local"),), (("authorization", "Bearer admin"),)
    try:
        with Client(address, token="admin", shared_memory=False) as c, \
                grpc.insecure_channel(address) as channel:
            model_id = c.create_model(layers=[{"type": "Identity"}]).id
            region = register_memfd(channel, fd, size, nonce, metadata=local)
            forward = channel.unary_unary(
                SERVICE + "Forward", request_serializer=pb.ForwardRequest.SerializeToString,
                response_deserializer=pb.ForwardResponse.FromString)
            request = pb.ForwardRequest(model_id=model_id, inputs=[pb.Tensor(
                dtype=pb.DTYPE_FLOAT32, shape=[n],
                shm=pb.SharedMemoryRef(region_id=region, offset=64, length=4 * n))],
                shm_reply=pb.SharedMemoryRef(region_id=region, offset=64 + 4 * n,
                                             length=4 * n))
            error = rpc_error(lambda: forward(request, timeout=10, metadata=admin))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            unregister = channel.unary_unary(
                SERVICE + "UnregisterSharedMemory",
                request_serializer=pb.UnregisterSharedMemoryRequest.SerializeToString,
                response_deserializer=pb.UnregisterSharedMemoryResponse.FromString)
            error = rpc_error(lambda: unregister(
                pb.UnregisterSharedMemoryRequest(region_id=region), timeout=10, metadata=admin))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            # the owner still uses it
            assert list(forward(request, timeout=10, metadata=local).output.shape) == [n]
    finally:
        os.close(fd)
    other_client_is_served(address, token="admin")


@needs_memfd
@pytest.mark.hostile("shared memory", inputs=240)
def test_client_unregisters_a_region_while_its_calls_read_it(
        make_server: Callable[..., GradServer]) -> None:
    """Forwards reading and writing a region race its UnregisterSharedMemory (and calls keep
    coming after it is gone): each call answers OK or FAILED_PRECONDITION, never INTERNAL or a
    crash, and nothing is unmapped under a running call."""
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    n = 256 * 1024
    size = 64 + 2 * 4 * n + 64
    codes: list[grpc.StatusCode] = []
    with Client(address, shared_memory=False) as c, grpc.insecure_channel(address) as channel:
        model_id = c.create_model(layers=[{"type": "Identity"}]).id
        unregister = channel.unary_unary(
            SERVICE + "UnregisterSharedMemory",
            request_serializer=pb.UnregisterSharedMemoryRequest.SerializeToString,
            response_deserializer=pb.UnregisterSharedMemoryResponse.FromString)
        for _ in range(20):
            nonce = os.urandom(16)
            fd = sealed_memfd(size, nonce)
            try:
                region = register_memfd(channel, fd, size, nonce)
                forward = channel.unary_unary(
                    SERVICE + "Forward", request_serializer=pb.ForwardRequest.SerializeToString,
                    response_deserializer=pb.ForwardResponse.FromString)
                request = pb.ForwardRequest(model_id=model_id, inputs=[pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32, shape=[n], shm=pb.SharedMemoryRef(
                        region_id=region, offset=64, length=4 * n))],
                    shm_reply=pb.SharedMemoryRef(region_id=region, offset=64 + 4 * n,
                                                 length=4 * n))
                # calls before, during and after the unregistration, all in flight at once
                futures = [forward.future(request, timeout=20) for _ in range(5)]
                gone = unregister.future(pb.UnregisterSharedMemoryRequest(region_id=region),
                                         timeout=10)
                futures += [forward.future(request, timeout=20) for _ in range(5)]
                gone.result()
                for future in futures:
                    try:
                        future.result()
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.append(exc.code())
                error = rpc_error(functools.partial(forward_from_region, channel, model_id,
                                                    region, n))
                codes.append(error.code())
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            finally:
                os.close(fd)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, codes
    other_client_is_served(address)


# ------------------------------------------------------------------------------------ 2. starvation


async def _idle_streams(address: str, per_kind: int, model_id: str
                        ) -> tuple[list[Any], list[grpc.aio.Channel]]:
    """per_kind idle streams of Health/Watch, UploadDataset, TrainStream and Train, open at once.

    Each kind has its own connection. gRPC core may drop (CANCELLED) a few streams of a burst
    of thousands before the server sees them, so streams open in small waves and dropped ones
    are replaced until per_kind of each kind are open.
    """
    channels = [grpc.aio.insecure_channel(address, options=[("hostile.conn", i)])
                for i in range(4)]
    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
        inputs=[pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[10, 2])])).SerializeToString()
    config = pb.TrainStreamRequest(config=pb.TrainStreamConfig(
        model_id=model_id)).SerializeToString()

    async def then_silence(first: bytes | None) -> Any:
        if first is not None:
            yield first
        await asyncio.sleep(3600)

    watch = health_pb2_grpc.HealthStub(channels[0]).Watch
    kinds: dict[str, Callable[[], Any]] = {
        "watch": lambda: watch(health_pb2.HealthCheckRequest()),
        "upload": lambda: channels[1].stream_unary(SERVICE + "UploadDataset")(
            then_silence(header)),
        "train_stream": lambda: channels[2].stream_stream(SERVICE + "TrainStream")(
            then_silence(config)),
        "train": lambda: channels[3].stream_stream(SERVICE + "Train")(then_silence(None)),
    }
    calls: dict[str, list[Any]] = {k: [] for k in kinds}
    for _ in range(20):
        for kind, open_one in kinds.items():
            calls[kind] = [c for c in calls[kind] if not c.done()]
            missing = per_kind - len(calls[kind])
            for i in range(missing):
                calls[kind].append(open_one())
                if i % 50 == 49:
                    await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        if all(sum(not c.done() for c in cs) >= per_kind for cs in calls.values()):
            break
    return [c for cs in calls.values() for c in cs], channels


@pytest.mark.hostile("streams, connections, floods")
def test_idle_streams_of_every_kind_do_not_starve_health_or_list_models(
        spawn_server: Any) -> None:
    per_kind = 1000
    server = spawn_server("--threads", "2", "--max-train-runs", "2")
    address = server.address
    stop = threading.Event()
    with Client(address, timeout=60) as c:
        linear = c.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
        x, y = torch.randn(64, 2), torch.randn(64, 1)
        # Every compute slot busy: two Train loops (the run limit) and two threads of slow
        # Forwards (the --threads executor), all the time the idle streams are open.
        runs = []
        for _ in range(2):
            m = c.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
            runs.append(m.train(x, y, max_steps=10**9, batch_size=4, progress=False))
        heavy = c.create_model(layers=[{"type": "Linear", "in_features": 512,
                                        "out_features": 512}] * 16)

        failures: list[BaseException] = []  # what the well-behaved clients met

        def keep_busy() -> None:
            with Client(address, timeout=120) as busy:
                hm = busy.model(heavy.id)
                xb = torch.randn(256, 512)
                while not stop.is_set():
                    try:
                        hm.forward(xb, eval_mode=True)  # a read: safe to retry
                    except GradServeError as exc:
                        if not stop.is_set():  # cut off by the teardown: expected
                            failures.append(exc)
                            return

        def drain(run: Any) -> None:
            with contextlib.suppress(GradServeError):
                list(run)  # until the test cancels it

        workers = [threading.Thread(target=keep_busy, daemon=True) for _ in range(3)]
        trainers = [threading.Thread(target=drain, args=(r,), daemon=True) for r in runs]
        for t in (*workers, *trainers):
            t.start()
        loop = asyncio.new_event_loop()
        runner = threading.Thread(target=loop.run_forever, daemon=True)
        runner.start()
        try:
            calls, channels = asyncio.run_coroutine_threadsafe(
                _idle_streams(address, per_kind, linear.id), loop).result(120)
            open_now = asyncio.run_coroutine_threadsafe(
                _count_open(calls), loop).result(30)
            assert open_now >= 4 * per_kind, open_now
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check
            latencies: dict[str, list[float]] = {"health": [], "list_models": []}
            for _ in range(100):
                t0 = time.perf_counter()
                assert health(health_pb2.HealthCheckRequest(), timeout=5).status == 1
                latencies["health"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c.list_models()
                latencies["list_models"].append(time.perf_counter() - t0)
                time.sleep(0.005)
            # Starved calls wait seconds (for a thread or an idle stream's deadline); a loaded
            # CI machine delays a fair one by tens of milliseconds.
            p99 = {k: sorted(v)[98] for k, v in latencies.items()}
            assert p99["health"] < 1.0 and p99["list_models"] < 1.0, (
                p99, {k: statistics.median(v) for k, v in latencies.items()})
            assert server.proc.poll() is None
            assert not failures, failures  # the busy clients noticed nothing
        finally:
            stop.set()
            for r in runs:
                r.cancel()
            for ch in channels if "channels" in locals() else ():
                asyncio.run_coroutine_threadsafe(ch.close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            runner.join(10)
            for t in (*workers, *trainers):
                t.join(60)


async def _count_open(calls: list[Any]) -> int:
    return sum(not c.done() for c in calls)


def _silent_after(first: bytes | None, release: threading.Event) -> Iterator[bytes]:
    if first is not None:
        yield first
    release.wait(60)


@pytest.mark.hostile("streams, connections, floods")
def test_train_stream_that_sends_only_its_config_holds_no_train_slot(
        make_server: Callable[..., GradServer]) -> None:
    server = make_server(max_train_runs=1)
    address = f"127.0.0.1:{server.port}"
    release = threading.Event()
    with Client(address, timeout=30) as c, grpc.insecure_channel(address) as channel:
        idle_model = c.create_model(layers=LINEAR, loss="mse",
                                    optimizer={"type": "sgd", "lr": 0.01})
        config = pb.TrainStreamRequest(config=pb.TrainStreamConfig(
            model_id=idle_model.id)).SerializeToString()
        idle = channel.stream_stream(SERVICE + "TrainStream")(_silent_after(config, release))
        time.sleep(0.5)  # the config has arrived
        m = c.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
        events = list(m.train(torch.randn(8, 2), torch.randn(8, 1), epochs=1, batch_size=4,
                              progress=False))
        assert events[-1].summary is not None and events[-1].summary.stop_reason == "completed"
        release.set()
        idle.cancel()
        other_client_is_served(address)


@pytest.mark.hostile("streams, connections, floods")
def test_client_opens_streams_and_sends_nothing(make_server: Callable[..., GradServer]) -> None:
    server = make_server(stream_idle_seconds=1.0)
    address = f"127.0.0.1:{server.port}"
    release = threading.Event()
    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
        dataset_id="idle", inputs=[pb.TensorHeader(dtype=pb.DTYPE_FLOAT32,
                                                   shape=[1000, 1000])])).SerializeToString()
    with grpc.insecure_channel(address) as channel:
        started = time.monotonic()
        upload = rpc_error(lambda: channel.stream_unary(SERVICE + "UploadDataset")(
            _silent_after(header, release), timeout=30))
        assert upload.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--stream-idle-seconds" in (upload.details() or "")
        assert time.monotonic() - started < 10
        assert server.core.datasets._reserved == 0  # the 4 MB reservation went with it
        # A unary method opened without its request message (headers only).
        forward = rpc_error(lambda: list(channel.stream_stream(SERVICE + "Forward")(
            _silent_after(None, release), timeout=30)))
        assert forward.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
    other_client_is_served(address)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _uvarint(number << 3 | wire_type) + payload


def _nested(depth: int) -> bytes:
    data = b""
    for _ in range(depth):
        data = _field(2, 2, _uvarint(len(data)) + data)
    return data


# Request bodies no client library would send: each method must answer them with a status
# naming the problem (or treat them as the empty message they parse to), never INTERNAL.
MALFORMED: dict[str, bytes] = {
    "empty": b"", "random": bytes(range(7, 250, 3)), "truncated-varint": b"\x08\xff\xff",
    "length-past-end": b"\x0a\xff\xff\xff\xff\x0f", "overlong-varint": b"\x08" + b"\xff" * 11,
    "field-zero": b"\x00\x01", "group-start": b"\x0b", "group-end": b"\x0c",
    "wire-type-7": b"\x0f", "id-not-utf8": _field(1, 2, b"\x02\xff\xfe"),
    "unknown-field": _field(999, 0, b"\x05"), "largest-field-number": _field(536870911, 0, b"\x01"),
    "nested-200-deep": _nested(200),
}
METHODS = [m for m in pb.DESCRIPTOR.services_by_name["GradientService"].methods]


@pytest.mark.hostile("bytes that are not protobuf", inputs=len(METHODS) * len(MALFORMED))
def test_client_sends_malformed_bytes_to_every_method(make_server: Callable[..., GradServer],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    caplog.set_level(logging.ERROR, logger="gradserve")
    seen: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        for method in METHODS:
            path = SERVICE + method.name
            for name, body in MALFORMED.items():
                try:
                    if method.client_streaming and method.server_streaming:
                        list(channel.stream_stream(path)(iter([body]), timeout=10))
                    elif method.client_streaming:
                        channel.stream_unary(path)(iter([body]), timeout=10)
                    elif method.server_streaming:
                        list(channel.unary_stream(path)(body, timeout=10))
                    else:
                        channel.unary_unary(path)(body, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                    grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.UNAVAILABLE), (method.name, name, code)
                seen[code.name] = seen.get(code.name, 0) + 1
    assert seen.get("INVALID_ARGUMENT", 0) > len(METHODS) * 5, seen
    assert not [r for r in caplog.records if "incident" in r.getMessage()]
    other_client_is_served(address)


@pytest.mark.hostile("bytes that are not protobuf")
def test_client_sends_bytes_that_are_not_protobuf(client: Client, server: GradServer) -> None:
    address = f"127.0.0.1:{server.port}"
    garbage = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x12"
    with grpc.insecure_channel(address) as channel:
        for method in ("GetModel", "Forward", "Backward", "CreateModel", "ListModels"):
            call = raw_unary(channel, method)
            error = rpc_error(lambda: call(garbage, timeout=10))  # noqa: B023 - used at once
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
            assert "not a valid" in (error.details() or "")
        error = rpc_error(lambda: channel.stream_unary(SERVICE + "UploadDataset")(
            iter([garbage]), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    other_client_is_served(address)


@pytest.mark.hostile("streams, connections, floods")
def test_client_cancels_and_times_out_calls(make_server: Callable[..., GradServer],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    server = make_server()
    address = f"127.0.0.1:{server.port}"
    sample = server.metrics.registry.get_sample_value

    def count(method: str, code: str) -> float:
        return sample("gradserve_rpc_duration_seconds_count",
                      {"method": method, "code": code}) or 0.0

    release = threading.Event()
    with Client(address, timeout=30) as c, grpc.insecure_channel(address) as channel:
        m = c.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
        run = m.train(torch.randn(64, 2), torch.randn(64, 1), max_steps=10**9, batch_size=4,
                      log_every_steps=1, progress=False)
        next(iter(run))
        run.cancel()
        header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
            inputs=[pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[1024, 1024])]))

        def upload() -> Iterator[bytes]:
            yield header.SerializeToString()
            yield pb.UploadDatasetRequest(chunk=bytes(MIB)).SerializeToString()
            release.wait(30)

        future = channel.stream_unary(SERVICE + "UploadDataset").future(upload())
        assert poll(lambda: server.core.datasets._reserved > 0, 10)
        future.cancel()
        # A deadline that passes while the call waits for its request message.
        late = rpc_error(lambda: list(channel.stream_stream(SERVICE + "Forward")(
            _silent_after(None, release), timeout=0.5)))
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert poll(lambda: count("Train", "CANCELLED") == 1
                    and count("UploadDataset", "CANCELLED") == 1
                    and count("Forward", "DEADLINE_EXCEEDED") == 1, 10), (
            count("Train", "CANCELLED"), count("UploadDataset", "CANCELLED"),
            count("Forward", "DEADLINE_EXCEEDED"))
        assert poll(lambda: server.core.datasets._reserved == 0, 10)
    assert count("Train", "INTERNAL") == count("UploadDataset", "INTERNAL") == 0
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    other_client_is_served(address)


# ------------------------------------------------------------------------------------ 3. memory


def _upload_then_cancel(address: str, nbytes: int, sent: int) -> None:
    """An UploadDataset of nbytes that sends `sent` bytes and then cancels."""
    chunk = bytes(4 * MIB)
    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
        inputs=[pb.TensorHeader(dtype=pb.DTYPE_UINT8, shape=[nbytes])])).SerializeToString()
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        yield header
        for _ in range(sent // len(chunk)):
            yield pb.UploadDatasetRequest(chunk=chunk).SerializeToString()
        done.set()
        time.sleep(30)

    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 * MIB)]) as channel:
        future = channel.stream_unary(SERVICE + "UploadDataset").future(requests())
        done.wait(60)
        time.sleep(0.2)
        future.cancel()


@pytest.mark.hostile("memory")
def test_client_cancels_big_uploads_midway(spawn_server: Any) -> None:
    server = spawn_server()
    pid = server.proc.pid
    _upload_then_cancel(server.address, 256 * MIB, 128 * MIB)  # warm-up: pools, arenas
    assert poll(lambda: rss(pid) < 600 * MIB, 20)
    time.sleep(1)
    before = rss(pid)
    count = 24 if os.environ.get("GRADSERVE_FUZZ") == "1" else 12  # the 24 in long runs
    for _ in range(count):
        _upload_then_cancel(server.address, 256 * MIB, 192 * MIB)
    assert poll(lambda: rss(pid) <= before * 1.2, 30), (before, rss(pid))
    with Client(server.address) as c:
        assert c.list_datasets() == []
    other_client_is_served(server.address)


@pytest.mark.hostile("memory")
def test_burst_of_large_calls_gives_memory_back(spawn_server: Any) -> None:
    server = spawn_server()
    pid = server.proc.pid
    with Client(server.address, shared_memory=False, timeout=60) as c:
        m = c.create_model(layers=[{"type": "Identity"}])
        m.forward(torch.zeros(4))
        time.sleep(1)
        before = rss(pid)
        x = torch.randn(64 * MIB // 4)

        def burst() -> None:
            with Client(server.address, shared_memory=False, timeout=120) as b:
                bm = b.model(m.id)
                for _ in range(3):
                    bm.forward(x)

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        peak = rss(pid, "VmHWM")
        assert peak > before + 200 * MIB  # the burst did cost memory while it ran
        assert poll(lambda: rss(pid) <= before * 1.2, 30), (before, rss(pid), peak)
    other_client_is_served(server.address)


@pytest.mark.hostile("streams, connections, floods", inputs=400)
def test_client_floods_the_server_with_idle_connections(spawn_server: Any,
                                                      tmp_path: Path) -> None:
    """TCP connections that never speak HTTP/2 (no token needed) took every descriptor the
    server had: SaveCheckpoint failed with "Too many open files" (the SIGTERM drain would have
    too) and /metrics stopped answering. Connections are capped below the descriptor limit,
    so the server's own files keep working; the flooding peers are refused."""
    import resource
    import socket
    import urllib.request

    server = spawn_server("--state-dir", str(tmp_path), env={"GRADSERVE_METRICS_PORT": "0"},
                          rlimits={resource.RLIMIT_NOFILE: (256, 256)})
    metrics_port = next(int(m.group(1)) for line in server.lines
                        if (m := re.search(r'"metrics_port": (\d+)', line)))
    flood: list[socket.socket] = []
    with Client(server.address, timeout=30, shared_memory=False) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="keep")
        try:
            for _ in range(400):
                flood.append(socket.create_connection(("127.0.0.1", int(
                    server.address.rsplit(":", 1)[1])), timeout=5))
            time.sleep(1.0)  # the server has accepted what it will accept
            assert fds(server.proc.pid) < 256
            assert m.save_checkpoint().num_bytes > 0  # its own files still open
            assert m.backward(torch.ones(2, 2), torch.zeros(2, 1), step=True).step == 1
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=10).read()
            assert b"gradserve_models" in body
        finally:
            for sock in flood:
                sock.close()
    assert poll(lambda: fds(server.proc.pid) < 64, 30)
    other_client_is_served(server.address)


@pytest.mark.hostile("streams, connections, floods", inputs=100)
def test_unauthenticated_client_fills_the_rpc_limit_with_health_watches(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    """Health/Watch needs no token and never ends by itself: watches up to
    --max-concurrent-rpcs made every call of every client, health Check included, fail with
    RESOURCE_EXHAUSTED (a failing liveness probe restarts the pod). Watches get a share of the
    limit; Check always answers; token holders keep the rest."""
    tokens = tmp_path / "tokens"
    tokens.write_text("admin-token\n")
    server = make_server(auth_token_file=str(tokens), max_concurrent_rpcs=64)
    address = f"127.0.0.1:{server.port}"
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(2)]
    watches = [health_pb2_grpc.HealthStub(channels[i % 2]).Watch(
        health_pb2.HealthCheckRequest(), timeout=60) for i in range(100)]
    try:
        refused = 0
        for w in watches:  # the first message (or the refusal) of each
            try:
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "watch" in (exc.details() or "").lower()
                refused += 1
        assert 0 < refused < 100
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check
        for _ in range(20):
            assert health(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        other_client_is_served(address, token="admin-token")
    finally:
        for w in watches:
            w.cancel()
        for ch in channels:
            ch.close()


@pytest.mark.hostile("streams, connections, floods", inputs=40)
def test_client_fills_the_rpc_limit_with_silent_calls(make_server: Callable[..., GradServer]
                                                     ) -> None:
    """Calls opened without their request message, up to --max-concurrent-rpcs: new calls are
    refused with RESOURCE_EXHAUSTED until the silent ones time out, but health Check answers
    throughout (a probe must not restart a server that is only busy)."""
    server = make_server(max_concurrent_rpcs=32, stream_idle_seconds=60)
    address = f"127.0.0.1:{server.port}"
    release = threading.Event()
    with grpc.insecure_channel(address) as channel:
        silent = [channel.stream_stream(SERVICE + "ListModels")(_silent_after(None, release))
                  for _ in range(40)]
        try:
            time.sleep(1.0)
            with Client(address, timeout=10, retries=0, shared_memory=False) as other:
                with pytest.raises(GradServeError) as err:
                    other.list_models()
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check
            for _ in range(20):
                assert health(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        finally:
            release.set()
            for call in silent:
                call.cancel()
    assert poll(lambda: _lists(address), 10)
    other_client_is_served(address)


def _lists(address: str) -> bool:
    with Client(address, timeout=5, retries=0, shared_memory=False) as c:
        try:
            c.list_models()
            return True
        except GradServeError:
            return False


# ------------------------------------------------------------------------------------ 4. auth


BAD_HEADERS: list[Any] = [
    None, (("authorization", "Bearer wrong"),), (("authorization", "Basic reader"),),
    (("authorization", "Bearer"),), (("authorization", "Bearer " + "x" * 7000),),
    (("authorization", "bearer admin-ish"),), (("authorization", "Bearer reader, admin"),),
    (("authorization", "Bearer admin"), ("authorization", "Bearer wrong")),
]


@pytest.mark.hostile("auth, tokens, TLS", inputs=len(METHODS) * (len(BAD_HEADERS) + 1))
def test_client_without_a_valid_token_calls_every_method(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    """Every GradientService method with a missing, malformed, wrong or last-wins-wrong token
    is refused with UNAUTHENTICATED, and a read-only token with PERMISSION_DENIED outside its
    scope; health and reflection stay open."""
    from gradserve_server.transport.interceptors import SCOPES

    tokens = tmp_path / "tokens"
    tokens.write_text("admin\nreader read\n")
    server = make_server(auth_token_file=str(tokens))
    address = f"127.0.0.1:{server.port}"

    def code(channel: grpc.Channel, method: Any, metadata: Any) -> grpc.StatusCode:
        return _call_code(channel, method, metadata)[0]

    with grpc.insecure_channel(address) as channel:
        for method in METHODS:
            for metadata in BAD_HEADERS:
                got = code(channel, method, metadata)
                assert got == grpc.StatusCode.UNAUTHENTICATED, (method.name, metadata, got)
            got = code(channel, method, (("authorization", "Bearer reader"),))
            if SCOPES.get(method.name, "admin") == "read":
                assert got not in (grpc.StatusCode.UNAUTHENTICATED,
                                   grpc.StatusCode.PERMISSION_DENIED), (method.name, got)
            else:
                assert got == grpc.StatusCode.PERMISSION_DENIED, (method.name, got)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    other_client_is_served(address, token="admin")


# The scope each GradientService method needs, written out here rather than read from the
# server, so that a method moved to a weaker scope (or added without one) fails this test.
NEEDS = {
    **dict.fromkeys(("Forward", "GetModel", "ListModels", "GetParameters", "ListDatasets",
                     "ListCheckpoints", "GetServerInfo"), "read"),
    **dict.fromkeys(("RegisterSharedMemory", "UnregisterSharedMemory"), "shm"),
    **dict.fromkeys(("Backward", "Step", "ZeroGrad", "SetParameters", "Train", "TrainStream",
                     "UploadDataset", "DeleteDataset"), "train"),
    **dict.fromkeys(("CreateModel", "DeleteModel", "SaveCheckpoint", "LoadCheckpoint",
                     "DeleteCheckpoint"), "admin"),
}
# token -> the scopes its line grants (a line without scopes grants all four)
MATRIX_TOKENS = {"t-read": {"read"}, "t-train": {"train"}, "t-admin": {"admin"},
                 "t-shm": {"shm"}, "t-read-train": {"read", "train"},
                 "t-all": {"read", "train", "admin", "shm"}}


def _call_code(channel: grpc.Channel, method: Any, metadata: Any) -> tuple[grpc.StatusCode, str]:
    """The status of one call of method with an empty request (and nothing else sent)."""
    path = SERVICE + method.name
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter([b""]), timeout=10, metadata=metadata))
        elif method.client_streaming:
            channel.stream_unary(path)(iter([b""]), timeout=10, metadata=metadata)
        elif method.server_streaming:
            list(channel.unary_stream(path)(b"", timeout=10, metadata=metadata))
        else:
            channel.unary_unary(path)(b"", timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.hostile("auth, tokens, TLS", inputs=len(METHODS) * (len(MATRIX_TOKENS) + 1))
def test_client_calls_every_method_with_every_scope(make_server: Callable[..., GradServer],
                                                    tmp_path: Path) -> None:
    """Every method x every scope x with and without a token: no token is UNAUTHENTICATED;
    a token without the method's scope is PERMISSION_DENIED naming the method and the scope;
    a token with it reaches the method (an empty request: never UNAUTHENTICATED,
    PERMISSION_DENIED, INTERNAL or UNKNOWN)."""
    assert {m.name for m in METHODS} == set(NEEDS), "give every new method a scope in NEEDS"
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{t} {','.join(sorted(s))}\n" if t != "t-all" else f"{t}\n"
                              for t, s in MATRIX_TOKENS.items()))
    server = make_server(auth_token_file=str(tokens))
    address = f"127.0.0.1:{server.port}"
    wrong: list[tuple[str, str, grpc.StatusCode, str]] = []
    with grpc.insecure_channel(address) as channel:
        for method in METHODS:
            code, _ = _call_code(channel, method, None)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append((method.name, "no token", code, ""))
            need = NEEDS[method.name]
            for token, scopes in MATRIX_TOKENS.items():
                code, details = _call_code(channel, method,
                                           (("authorization", f"Bearer {token}"),))
                if need in scopes:
                    ok = code not in (grpc.StatusCode.UNAUTHENTICATED,
                                      grpc.StatusCode.PERMISSION_DENIED,
                                      grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
                else:
                    ok = (code == grpc.StatusCode.PERMISSION_DENIED
                          and f"{method.name} needs scope {need!r}" in details)
                if not ok:
                    wrong.append((method.name, token, code, details))
    assert not wrong, wrong
    other_client_is_served(address, token="t-all")


@pytest.mark.hostile("auth, tokens, TLS")
def test_unauthenticated_client_sends_huge_requests(spawn_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader read\n")
    server = spawn_server("--auth-token-file", str(tokens))
    pid = server.proc.pid
    n = 400 * MIB
    # A valid ForwardRequest holding one 400 MiB tensor, built without extra copies of it.
    tensor = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[n]).SerializeToString()
    tensor += b"\x1a" + _varint_bytes(n)  # Tensor.data, then its n bytes
    request = b"".join([pb.ForwardRequest(model_id="m").SerializeToString(),
                        b"\x12" + _varint_bytes(len(tensor) + n), tensor, bytes(n)])
    assert len(request) > n
    peak_before = rss(pid, "VmHWM")
    with grpc.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", 512 * MIB)]) as channel:
        for _ in range(4):
            error = rpc_error(lambda: raw_unary(channel, "Forward")(request, timeout=60))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    request = b""
    grown = rss(pid, "VmHWM") - peak_before
    assert grown < 100 * MIB, f"the server's peak RSS grew by {grown / MIB:.0f} MiB"
    other_client_is_served(server.address, token="reader")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.hostile("auth, tokens, TLS")
def test_metrics_stay_on_localhost_when_grpc_listens_on_all_interfaces(
        make_server: Callable[..., GradServer], caplog: pytest.LogCaptureFixture) -> None:
    import urllib.request

    caplog.set_level(logging.WARNING, logger="gradserve")
    server = make_server(host="0.0.0.0", metrics_port=0)
    assert server.metrics_host == "127.0.0.1"
    assert server._metrics_server.server_address[0] == "127.0.0.1"  # type: ignore[attr-defined]
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read()
    assert b"gradserve_models" in body
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without auth" in w and "TLS" in w for w in warnings), warnings
    assert any("--state-dir" in w and "memory only" in w for w in warnings), warnings
    other_client_is_served(f"127.0.0.1:{server.port}")


def test_no_warnings_on_loopback_with_a_state_dir(make_server: Callable[..., GradServer],
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gradserve")
    make_server(state_dir=str(tmp_path), metrics_port=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------ drain


@pytest.mark.hostile("streams, connections, floods")
def test_drain_ends_streams_then_checkpoints_within_the_grace(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    grace = 6.0
    server = make_server(grace_seconds=grace, state_dir=str(tmp_path))
    address = f"127.0.0.1:{server.port}"
    seen: dict[str, Any] = {}
    checkpoint_all = server.core.checkpoint_all

    def recording(*args: Any, **kwargs: Any) -> int:
        seen.update(kwargs, at=time.monotonic())
        return checkpoint_all(*args, **kwargs)

    server.core.checkpoint_all = recording  # type: ignore[method-assign]
    release = threading.Event()
    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(
        inputs=[pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[10, 2])])).SerializeToString()
    with Client(address, timeout=30) as c, grpc.insecure_channel(address) as channel:
        m = c.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
        run = iter(m.train(torch.randn(64, 2), torch.randn(64, 1), max_steps=10**9,
                           batch_size=4, log_every_steps=1, progress=False))
        assert next(run).kind == "progress"
        events: list[Any] = []
        reader = threading.Thread(target=lambda: events.extend(run))  # a client that reads
        reader.start()
        upload = channel.stream_unary(SERVICE + "UploadDataset").future(
            _silent_after(header, release))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        saved = server.drain()
        took = time.monotonic() - started
        reader.join(30)
        assert events[-1].summary is not None and events[-1].summary.stop_reason == "shutdown"
        assert upload.exception(10) is not None
        assert upload.exception().code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
        with pytest.raises(grpc.RpcError):
            for _ in watch:  # NOT_SERVING, then the stream ends
                pass
        release.set()
    assert len(saved.saved) == 1 and saved.ok
    # Calls got min(grace/2, 10 s) at most; nothing here needed it all: the drain did not
    # wait for the idle upload or the health watcher.
    assert took < grace / 2, took
    assert abs(seen["deadline"] - (started + grace)) < 1.0
