"""Same-host shared memory: regions clients register, mapped here, expiring when idle.

A client creates a POSIX shared-memory segment (/dev/shm/gradserve-...), writes a random nonce at
its start and calls RegisterSharedMemory with its name. The server opens and maps it, checks the
nonce (the caller can write the segment it names), and unlinks the name at once: from then on
the memory lives only as long as the two mappings, so nothing is left behind when either side
dies. Tensors of Forward/Backward requests then reference byte ranges of the region
(Tensor.shm), and replies are written into the range the request offers (shm_reply).

A region that no call used for `idle_ttl_s` seconds is dropped, as on UnregisterSharedMemory; the
mapping itself goes away once no tensor views it any more (a call still running keeps it).
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gradserve import wire as _wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ..core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger("gradserve.shm")

NAME = re.compile(r"gradserve-[A-Za-z0-9._-]{1,200}")
HEADER = 64  # bytes at the start of a region that tensors may not use (the nonce lives there)
NONCE = 16
ALIGN = 64  # reply tensors start on cache-line boundaries


@dataclass
class Region:
    id: str
    memory: mmap.mmap
    size: int
    used: float = field(default_factory=time.monotonic)

    def view(self, offset: int, length: int, what: str) -> memoryview:
        if offset < HEADER or offset + length > self.size:
            raise InvalidArgument(f"{what}: bytes [{offset}, {offset + length}) are outside the "
                                  f"usable part [{HEADER}, {self.size}) of region {self.id}")
        self.used = time.monotonic()
        return memoryview(self.memory)[offset:offset + length]


class SharedMemoryRegistry:
    """The regions of one server. Thread-safe; max_bytes 0 disables the fast path."""

    def __init__(self, max_bytes: int, idle_ttl_s: float, directory: str = "/dev/shm") -> None:
        self.max_bytes = max_bytes
        self.idle_ttl_s = idle_ttl_s
        self.directory = directory
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    # ---------------------------------------------------------------- register / unregister

    def register(self, name: str, size: int, nonce: bytes) -> Region:
        if self.max_bytes <= 0:
            raise FailedPrecondition("shared memory: the same-host fast path is disabled on this "
                                     "server (max_shm_mb=0); use the wire")
        if not NAME.fullmatch(name):
            raise InvalidArgument(f"name: {name!r} is not a gradserve segment name "
                                  "(gradserve-[A-Za-z0-9._-]+)")
        if size <= HEADER or len(nonce) != NONCE:
            raise InvalidArgument(f"size must exceed {HEADER} bytes and nonce must have {NONCE}")
        self.expire()
        with self._lock:
            if self.mapped_bytes + size > self.max_bytes:
                raise ResourceExhausted(
                    f"shared memory: {self.mapped_bytes} bytes are mapped and {size} more would "
                    f"pass the limit (max_shm_mb) of {self.max_bytes // (1024 * 1024)} MiB")
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FailedPrecondition(f"shared memory: cannot open {name} on the server's host "
                                     f"({exc.strerror}); use the wire") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < size:
                raise FailedPrecondition(f"shared memory: {name} is not a segment of {size} bytes")
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if not hmac.compare_digest(memory[:NONCE], nonce):
            memory.close()
            raise FailedPrecondition(f"shared memory: the nonce of {name} does not match")
        try:
            os.unlink(path)  # from now on only the two mappings keep the memory alive
        except FileNotFoundError:
            pass
        region = Region(uuid.uuid4().hex, memory, size)
        with self._lock:
            self._regions[region.id] = region
            self._start_sweeper()
        log.debug("shared memory region registered", extra={"fields": {
            "region": region.id, "bytes": size}})
        return region

    def unregister(self, region_id: str) -> None:
        with self._lock:
            region = self._regions.pop(region_id, None)
        if region is None:
            raise NotFound(f"region_id: no shared-memory region {region_id!r}")
        _release(region)

    def expire(self) -> int:
        """Drop regions idle for longer than the TTL; returns how many."""
        deadline = time.monotonic() - self.idle_ttl_s
        with self._lock:
            stale = [r for r in self._regions.values() if r.used < deadline]
            for r in stale:
                del self._regions[r.id]
        for r in stale:
            _release(r)
        if stale:
            log.info("shared memory regions expired", extra={"fields": {"regions": len(stale)}})
        return len(stale)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for r in regions:
            _release(r)

    def _start_sweeper(self) -> None:
        """A daemon thread expires idle regions even when no call comes (caller holds the lock)."""
        if self._sweeper is not None and self._sweeper.is_alive():
            return
        self._sweeper = threading.Thread(target=self._sweep, name="gradserve-shm-sweeper",
                                         daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        interval = max(0.05, min(self.idle_ttl_s / 4, 5.0))
        while not self._closed.wait(interval):
            self.expire()
            with self._lock:
                if not self._regions:
                    self._sweeper = None
                    return

    # ---------------------------------------------------------------- tensors

    def resolve(self, ref: pb.SharedMemoryRef, what: str = "tensor.shm") -> memoryview:
        """The bytes a SharedMemoryRef names (writable; valid while the call lasts)."""
        region = self._regions.get(ref.region_id)
        if region is None:
            raise FailedPrecondition(
                f"{what}: shared memory: region {ref.region_id!r} is not registered (unregistered, "
                f"or idle for more than {self.idle_ttl_s:g} s); register it again")
        return region.view(int(ref.offset), int(ref.length), what)

    def place_reply(self, message: Any, payloads: dict[Any, Any], reply: pb.SharedMemoryRef
                    ) -> None:
        """Move payloads that fit into the reply range; their Tensor messages get shm refs."""
        offset, end = int(reply.offset), int(reply.offset) + int(reply.length)
        for path in list(payloads):
            payload = payloads[path]
            size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
            start = -(-offset // ALIGN) * ALIGN
            if start + size > end:
                continue  # does not fit: this one goes on the wire
            ref = pb.SharedMemoryRef(region_id=reply.region_id, offset=start, length=size)
            dst = self.resolve(ref, "shm_reply")
            dst[:] = memoryview(payload).cast("B")
            _wire.get_tensor(message, path).shm.CopyFrom(ref)
            del payloads[path]
            offset = start + size


def _release(region: Region) -> None:
    try:
        region.memory.close()
    except BufferError:
        pass  # a running call still views it: the mapping goes when that view is freed
