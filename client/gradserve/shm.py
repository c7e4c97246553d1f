"""Same-host fast path: large Forward/Backward tensors travel through shared memory.

When the client and the server share a host, the Client creates memfds (memfd_create, named
gradserve-<pid>-<random>), sizes them and seals their size (F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL: nobody, the client included, can truncate the memory under the server's mapping),
registers each with the server (RegisterSharedMemory with this process's pid and the
descriptor's number: the server opens /proc/<pid>/fd/<fd>, checks the seals and maps it; the
kernel frees the memory once both processes let go, even if one of them dies) and then sends
large tensors as byte ranges of a segment instead of bytes on the socket. Replies are written by
the server into a range the request offers (shm_reply); the client copies them out before it
reuses the segment.

Negotiated per channel with an automatic fallback: if the server cannot use the segment
(another host or container, an older server, the fast path disabled or refused by auth) the
channel keeps using the wire. Used by the synchronous Client; segments are leased to one call
at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from . import wire
from ._proto.gradserve.v1 import gradserve_pb2 as pb

log = logging.getLogger("gradserve.shm")

DIRECTORY = "/dev/shm"
HEADER = 64  # the nonce lives at the start of a segment; tensors start after it
NONCE = 16
ALIGN = 64
THRESHOLD = 1024 * 1024  # requests with fewer tensor bytes than this stay on the wire
MIN_SEGMENT = 4 * 1024 * 1024
_STALE = re.compile(r"gradserve-(\d+)-[0-9a-f]+")
_LOOPBACK = re.compile(r"^(unix:|unix-abstract:|localhost\b|127\.|\[::1\]|::1\b|ipv4:127\.)")
# Answers to RegisterSharedMemory that mean "not here": fall back to the wire for good.
_UNSUPPORTED = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND}


SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
         | getattr(fcntl, "F_SEAL_SEAL", 0))


def available() -> bool:
    """Sealable memfds (Linux)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and hasattr(fcntl, "F_ADD_SEALS"))


def same_host(address: str) -> bool:
    """True for loopback and unix-socket addresses, where the fast path is tried by default."""
    return bool(_LOOPBACK.match(address.strip().lower()))


def sweep_stale(directory: str = DIRECTORY) -> int:
    """Unlink segments left by gradserve processes that died before registering them."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        found = _STALE.fullmatch(name)
        if found is None or _alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _map(fd: int, size: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in once, now
    return mmap.mmap(fd, size, flags=flags)


@dataclass
class _Segment:
    name: str
    memory: mmap.mmap
    size: int
    region_id: str = ""
    ttl: float = 0.0
    used: float = field(default_factory=time.monotonic)
    busy: bool = False

    @property
    def view(self) -> memoryview:
        return memoryview(self.memory)

    def ref(self, offset: int, length: int) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region_id=self.region_id, offset=offset, length=length)


class SharedMemory:
    """The segments of one channel and the calls that use them."""

    def __init__(self, register: Callable[..., Any], unregister: Callable[..., Any],
                 metadata: Any = (), threshold: int = THRESHOLD,
                 max_bytes: int = 1024 * 1024 * 1024, directory: str = DIRECTORY) -> None:
        self._register = register
        self._unregister = unregister
        self._metadata = metadata
        self.threshold = threshold
        self.max_bytes = max_bytes
        self.directory = directory
        self.enabled = True
        self.reason = ""  # why the fast path was turned off, if it was
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._reply_hint: dict[tuple[str, str], int] = {}
        sweep_stale(directory)

    # ---------------------------------------------------------------- calls

    def call(self, method: Any, request: Any, timeout: float | None = None,
             metadata: Any = None) -> Any:
        """method(request) with the request's large payloads in shared memory when possible."""
        if not (self.enabled and isinstance(request, wire.Framed)):
            return method(request, timeout=timeout, metadata=metadata)
        sizes = {p: memoryview(v).nbytes for p, v in request.payloads.items()}
        need = sum(-(-s // ALIGN) * ALIGN for s in sizes.values())
        if need < self.threshold:
            return method(request, timeout=timeout, metadata=metadata)
        key = (type(request.message).__name__, getattr(request.message, "model_id", ""))
        reply_room = max(need, self._reply_hint.get(key, 0))
        segment = self._lease(HEADER + need + reply_room + ALIGN, timeout)
        if segment is None:
            return method(request, timeout=timeout, metadata=metadata)
        try:
            placed = self._place(segment, request, sizes)
            try:
                reply = method(placed, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if (exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and "shared memory" in (exc.details() or "")):
                    self._discard(segment)  # unknown to the server now: this call goes by wire
                    segment = None
                    return method(request, timeout=timeout, metadata=metadata)
                raise
            return self._collect(segment, reply, key)
        finally:
            if segment is not None:
                self._return(segment)

    def _place(self, segment: _Segment, request: wire.Framed, sizes: dict[Any, int]
               ) -> wire.Framed:
        """A copy of the request with every payload copied into the segment."""
        msg = type(request.message)()
        msg.CopyFrom(request.message)
        view = segment.view
        offset = HEADER
        for path, payload in request.payloads.items():
            size = sizes[path]
            view[offset:offset + size] = memoryview(payload).cast("B")
            wire.get_tensor(msg, path).shm.CopyFrom(segment.ref(offset, size))
            offset = -(-(offset + size) // ALIGN) * ALIGN
        msg.shm_reply.CopyFrom(segment.ref(offset, segment.size - offset))
        return wire.Framed(msg, {})

    def _collect(self, segment: _Segment, reply: Any, key: tuple[str, str]) -> Any:
        """Copy reply tensors out of the segment (it is reused by the next call)."""
        framed = reply if isinstance(reply, wire.Framed) else None
        msg = framed.message if framed is not None else reply
        payloads = dict(framed.payloads) if framed is not None else {}
        total = sum(memoryview(p).nbytes for p in payloads.values())
        for path, t in wire.tensors(msg):
            if not t.HasField("shm"):
                continue
            ref = t.shm
            start, length = int(ref.offset), int(ref.length)
            if ref.region_id != segment.region_id or start < HEADER or start + length > segment.size:
                raise ValueError(f"the server placed {'.'.join(map(str, path))} outside the "
                                 "shared-memory range this call offered")
            payloads[path] = bytearray(segment.view[start:start + length])
            total += length
        self._reply_hint[key] = total
        return wire.Framed(msg, payloads) if payloads else msg

    # ---------------------------------------------------------------- segments

    def _lease(self, size: int, timeout: float | None) -> _Segment | None:
        now = time.monotonic()
        stale: list[_Segment] = []
        found: _Segment | None = None
        with self._lock:
            free = sorted((s for s in self._segments if not s.busy), key=lambda s: s.size)
            for s in free:
                if now - s.used > s.ttl / 2:  # the server may expire it soon: replace it
                    stale.append(s)
                    self._segments.remove(s)
                elif s.size >= size:
                    s.busy = True
                    found = s
                    break
        if found is not None:
            for old in stale:
                self._close(old)
            return found
        with self._lock:
            held = sum(s.size for s in self._segments)
            size = max(size, MIN_SEGMENT)
            size = -(-size // (1024 * 1024)) * 1024 * 1024
            while held + size > self.max_bytes:
                idle = [s for s in self._segments if not s.busy]
                if not idle:
                    break
                victim = min(idle, key=lambda s: s.used)
                self._segments.remove(victim)
                stale.append(victim)
                held -= victim.size
        for old in stale:
            self._close(old)
        if held + size > self.max_bytes:
            return None
        segment = self._create(size, timeout)
        if segment is not None:
            segment.busy = True
            with self._lock:
                self._segments.append(segment)
        return segment

    def _return(self, segment: _Segment) -> None:
        with self._lock:
            segment.busy = False
            segment.used = time.monotonic()

    def _discard(self, segment: _Segment) -> None:
        with self._lock:
            if segment in self._segments:
                self._segments.remove(segment)
        self._close(segment, unregister=False)

    def _create(self, size: int, timeout: float | None) -> _Segment | None:
        if not available():
            self._disable("this platform has no sealable memfds")
            return None
        name = f"gradserve-{os.getpid()}-{secrets.token_hex(12)}"
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            self._disable(f"cannot create a memfd: {exc.strerror}")
            return None
        try:
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
                memory = _map(fd, size)
            except OSError as exc:
                self._disable(f"cannot size, seal or map a memfd: {exc.strerror}")
                return None
            nonce = secrets.token_bytes(NONCE)
            memory[:NONCE] = nonce
            segment = _Segment(name, memory, size)
            try:
                reply = self._register(
                    pb.RegisterSharedMemoryRequest(size=size, nonce=nonce, pid=os.getpid(),
                                                   fd=fd),
                    timeout=timeout or 10.0, metadata=self._metadata)
            except grpc.RpcError as exc:
                memory.close()
                if exc.code() in _UNSUPPORTED:
                    self._disable(f"the server answered {exc.code().name}: {exc.details()}")
                return None
            segment.region_id = reply.region_id
            segment.ttl = reply.idle_ttl_seconds or 300.0
            log.debug("shared memory segment registered", extra={"fields": {
                "bytes": size, "region": segment.region_id}})
            return segment
        finally:
            os.close(fd)  # the mappings keep the memory; the server opened its own descriptor

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.reason = why
        log.info("shared memory fast path off; using the wire: %s", why)

    def _close(self, segment: _Segment, unregister: bool = True) -> None:
        if unregister and segment.region_id:
            with contextlib.suppress(grpc.RpcError, ValueError):
                self._unregister(pb.UnregisterSharedMemoryRequest(region_id=segment.region_id),
                                 timeout=2.0, metadata=self._metadata)
        with contextlib.suppress(BufferError):
            segment.memory.close()

    @property
    def segments(self) -> int:
        return len(self._segments)

    def close(self) -> None:
        """Unregister and unmap every segment (the server's TTL covers a client that cannot)."""
        with self._lock:
            segments, self._segments = self._segments, []
        for s in segments:
            self._close(s)
        self.enabled = False


class Stub:
    """The channel's stub with Forward and Backward sent through a SharedMemory."""

    def __init__(self, stub: Any, shm: SharedMemory) -> None:
        self._stub = stub
        self._shm = shm
        for rpc in _FAST:
            method = getattr(stub, rpc)
            setattr(self, rpc, lambda request, timeout=None, metadata=None, _m=method:
                    shm.call(_m, request, timeout, metadata))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


_FAST = ("Forward", "Backward")
