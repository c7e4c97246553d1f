"""Same-host shared memory: sealed memfds clients register, mapped here, expiring when idle.

A client creates a memfd named gradserve-..., sizes it, seals it against shrinking and growing
(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), writes a random nonce at its start and calls
RegisterSharedMemory with its pid, the descriptor number and the size. The server opens
/proc/<pid>/fd/<fd>, checks that it is that sealed memfd of exactly that size (F_GET_SEALS on
the server's own descriptor), maps it, checks the nonce (the caller can write the memory it
names) and closes the descriptor. Because the size is sealed, nobody can truncate the memory
under the server's mapping: a truncation attempt fails in the client (EPERM) and the server
never takes a SIGBUS.

Regions are bound to the caller that registered them: its connection (gRPC peer) and its
credential (bearer token, TLS identity). Another caller naming the id learns nothing: it gets the
same answer as for an id that never existed. Only loopback peers may register. The number of
regions is capped per caller and in total, and a mapping holds no file descriptor (it is made
with mmap(2) directly and unmapped when the last tensor viewing it is gone).

A region that no call used for `idle_ttl_s` seconds is dropped, as on UnregisterSharedMemory.
"""

from __future__ import annotations

import ctypes
import fcntl
import hmac
import logging
import mmap
import os
import stat
import threading
import time
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gradserve import wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ..core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger("gradserve.shm")

HEADER = 64  # bytes at the start of a region that tensors may not use (the nonce lives there)
NONCE = 16
ALIGN = 64  # reply tensors start on cache-line boundaries
MEMFD_PREFIX = "/memfd:gradserve-"  # what /proc/<pid>/fd/<fd> reads as for a client's segment
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW if hasattr(fcntl, "F_SEAL_SHRINK") else 0
# One answer for every registration that fails its checks: a caller learns nothing about files,
# descriptors or processes it names (the server log has the reason at debug level).
UNUSABLE = ("shared memory: the segment named by pid and fd is not usable (it must be a "
            "gradserve memfd of exactly `size` bytes, sealed with F_SEAL_SHRINK and F_SEAL_GROW, "
            "holding the nonce, in a process on this host); use the wire")
_LOOPBACK = ("ipv4:127.", "ipv6:[::1]", "ipv6:[::ffff:127.", "unix:")


def loopback(peer: str) -> bool:
    """A gRPC peer string (context.peer()) of a caller on this host."""
    return peer.startswith(_LOOPBACK)


@dataclass(frozen=True)
class Owner:
    """Who registered a region: the connection and the credential it used."""

    peer: str
    credential: str = ""


# ------------------------------------------------------------------------------------ mappings

_libc: Any = None


def _mmap(fd: int, size: int) -> memoryview:
    """A writable shared mapping of fd that holds no descriptor; unmapped with its last view."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buffer = (ctypes.c_ubyte * size).from_address(addr)
    weakref.finalize(buffer, _libc.munmap, addr, size)
    return memoryview(buffer).cast("B")


@dataclass
class Region:
    id: str
    owner: Owner
    memory: memoryview | None
    size: int
    used: float = field(default_factory=time.monotonic)

    def view(self, offset: int, length: int, what: str) -> memoryview:
        memory = self.memory
        if memory is None:
            raise FailedPrecondition(f"{what}: shared memory: region {self.id!r} was released; "
                                     "register it again")
        if offset < HEADER or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"{what}: bytes [{offset}, {offset + length}) are outside the "
                                  f"usable part [{HEADER}, {self.size}) of region {self.id}")
        self.used = time.monotonic()
        return memory[offset:offset + length]

    def release(self) -> None:
        # The mapping goes when the last tensor viewing it is freed (a running call keeps it).
        self.memory = None


class SharedMemoryRegistry:
    """The regions of one server. Thread-safe; max_bytes 0 disables the fast path."""

    def __init__(self, max_bytes: int, idle_ttl_s: float, max_regions: int = 256,
                 max_regions_per_owner: int = 32, proc: str = "/proc") -> None:
        self.max_bytes = max_bytes
        self.idle_ttl_s = idle_ttl_s
        self.max_regions = max_regions
        self.max_regions_per_owner = max_regions_per_owner
        self.proc = proc  # where /<pid>/fd/<fd> is looked up (tests point it elsewhere)
        self._regions: dict[str, Region] = {}
        self._per_owner: Counter[Owner] = Counter()
        self._lock = threading.Lock()

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    # ---------------------------------------------------------------- register / unregister

    def register(self, owner: Owner, pid: int, fd: int, size: int, nonce: bytes) -> Region:
        if self.max_bytes <= 0:
            raise FailedPrecondition("shared memory: the same-host fast path is disabled on this "
                                     "server (max_shm_mb=0); use the wire")
        if not loopback(owner.peer):
            raise FailedPrecondition("shared memory: only callers on the server's host "
                                     "(loopback) may use it; use the wire")
        if not REQUIRED_SEALS:
            raise FailedPrecondition("shared memory: this server's platform has no sealed "
                                     "memfds; use the wire")
        if pid <= 0 or fd < 0:
            raise FailedPrecondition("shared memory: register a sealed memfd by pid and fd (a "
                                     "client of this version or later); use the wire")
        if size <= HEADER or len(nonce) != NONCE:
            raise InvalidArgument(f"size must exceed {HEADER} bytes and nonce must have {NONCE}")
        self.expire()
        with self._lock:
            self._check_room(owner, size)
            self._per_owner[owner] += 1  # reserved now: concurrent calls cannot pass the caps
        try:
            memory = self._open(pid, fd, size, nonce)
        except BaseException:
            with self._lock:
                self._forget_owner(owner)
            raise
        region = Region(uuid.uuid4().hex, owner, memory, size)
        with self._lock:
            self._regions[region.id] = region
        log.debug("shared memory region registered", extra={"fields": {
            "region": region.id, "bytes": size, "peer": owner.peer}})
        return region

    def _check_room(self, owner: Owner, size: int) -> None:
        """Caps on regions (per caller, in total) and bytes (caller holds the lock)."""
        if self._per_owner[owner] >= self.max_regions_per_owner:
            raise ResourceExhausted(
                f"shared memory: this connection holds {self._per_owner[owner]} regions; the "
                f"limit (max_shm_regions_per_connection) is {self.max_regions_per_owner}; "
                "unregister one first")
        if sum(self._per_owner.values()) >= self.max_regions:
            raise ResourceExhausted(
                f"shared memory: the server holds {self.max_regions} regions, its limit "
                "(max_shm_regions); use the wire or try again later")
        mapped = self.mapped_bytes
        if mapped + size > self.max_bytes:
            raise ResourceExhausted(
                f"shared memory: {mapped} bytes are mapped and {size} more would pass the "
                f"limit (max_shm_mb) of {self.max_bytes // (1024 * 1024)} MiB")

    def _forget_owner(self, owner: Owner) -> None:
        self._per_owner[owner] -= 1
        if self._per_owner[owner] <= 0:
            del self._per_owner[owner]

    def _open(self, pid: int, fd: int, size: int, nonce: bytes) -> memoryview:
        """Map the caller's sealed memfd, or raise the one generic error (reason logged)."""
        path = os.path.join(self.proc, str(int(pid)), "fd", str(int(fd)))
        opened = -1
        try:
            # Read the link and stat the target before opening: never open a device, a FIFO or
            # a file that is not a gradserve memfd on a caller's behalf.
            if not os.readlink(path).startswith(MEMFD_PREFIX):
                raise _Unusable("not a gradserve memfd")
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                raise _Unusable("not a regular file")
            opened = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
            st = os.fstat(opened)
            if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
                raise _Unusable("the descriptor changed while it was opened")
            if st.st_size != size:
                raise _Unusable(f"size {st.st_size}, not {size}")
            seals = fcntl.fcntl(opened, fcntl.F_GET_SEALS)
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise _Unusable(f"seals {seals:#x} lack SHRINK and GROW")
            memory = _mmap(opened, size)
        except (OSError, _Unusable) as exc:
            log.debug("shared memory registration refused", extra={"fields": {
                "pid": pid, "fd": fd, "reason": str(exc)}})
            raise FailedPrecondition(UNUSABLE) from None
        finally:
            if opened >= 0:
                os.close(opened)
        if not hmac.compare_digest(bytes(memory[:NONCE]), nonce):
            log.debug("shared memory registration refused: nonce", extra={"fields": {
                "pid": pid, "fd": fd}})
            raise FailedPrecondition(UNUSABLE)
        return memory

    def unregister(self, region_id: str, owner: Owner) -> None:
        with self._lock:
            region = self._regions.get(region_id)
            if region is None or region.owner != owner:
                raise NotFound(f"region_id: no shared-memory region {region_id!r} on this "
                               "connection")
            self._drop(region)

    def _drop(self, region: Region) -> None:
        """Forget region (caller holds the lock)."""
        if self._regions.pop(region.id, None) is not None:
            self._forget_owner(region.owner)
        region.release()

    def expire(self) -> int:
        """Drop regions idle for longer than the TTL; returns how many."""
        deadline = time.monotonic() - self.idle_ttl_s
        with self._lock:
            stale = [r for r in self._regions.values() if r.used < deadline]
            for r in stale:
                self._drop(r)
        if stale:
            log.info("shared memory regions expired", extra={"fields": {"regions": len(stale)}})
        return len(stale)

    def close(self) -> None:
        with self._lock:
            for r in list(self._regions.values()):
                self._drop(r)

    # ---------------------------------------------------------------- tensors

    def bind(self, owner: Owner) -> Bound:
        """This registry as one caller sees it: only the regions that caller registered."""
        return Bound(self, owner)

    def resolve(self, ref: pb.SharedMemoryRef, owner: Owner, what: str = "tensor.shm"
                ) -> memoryview:
        """The bytes a SharedMemoryRef names (writable; valid while the call lasts)."""
        region = self._regions.get(ref.region_id)
        if region is None or region.owner != owner:
            raise FailedPrecondition(
                f"{what}: shared memory: region {ref.region_id!r} is not registered on this "
                f"connection (unregistered, idle for more than {self.idle_ttl_s:g} s, or never "
                "registered here); register it again")
        return region.view(int(ref.offset), int(ref.length), what)

    def place_reply(self, message: Any, payloads: dict[Any, Any], reply: pb.SharedMemoryRef,
                    owner: Owner) -> None:
        """Move payloads that fit into the reply range; their Tensor messages get shm refs."""
        offset, end = int(reply.offset), int(reply.offset) + int(reply.length)
        for path in list(payloads):
            payload = payloads[path]
            size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
            start = -(-offset // ALIGN) * ALIGN
            if start + size > end:
                continue  # does not fit: this one goes on the wire
            ref = pb.SharedMemoryRef(region_id=reply.region_id, offset=start, length=size)
            dst = self.resolve(ref, owner, "shm_reply")
            dst[:] = memoryview(payload).cast("B")
            wire.get_tensor(message, path).shm.CopyFrom(ref)
            del payloads[path]
            offset = start + size


class _Unusable(Exception):
    """A registration check failed (logged, never shown to the caller)."""



class Bound:
    """A registry bound to one caller (what fastpath and the reply encoder use)."""

    __slots__ = ("owner", "registry")

    def __init__(self, registry: SharedMemoryRegistry, owner: Owner) -> None:
        self.registry = registry
        self.owner = owner

    def resolve(self, ref: pb.SharedMemoryRef, what: str = "tensor.shm") -> memoryview:
        return self.registry.resolve(ref, self.owner, what)

    def place_reply(self, message: Any, payloads: dict[Any, Any], reply: pb.SharedMemoryRef
                    ) -> None:
        self.registry.place_reply(message, payloads, reply, self.owner)
