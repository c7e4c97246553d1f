"""A gradserve group's process groups: the command header, collectives with timeouts, liveness.

Two process groups: `cpu` (gloo) carries commands, batches, agreements and gathered results,
which live in host memory; `dev` carries gradients, parameters and buffers on the device
(nccl between GPUs; the same gloo group on CPU). Both have the --dist-timeout-seconds timeout,
so no collective waits forever. Every collective goes through Group._call: its time is counted
(the `communication` phase) and a failure becomes GroupLost.

Liveness: each rank bumps a counter in torchrun's store every BEAT_S; when a collective fails,
rank 0 names the ranks whose counter stopped (a SIGKILLed worker, a lost host).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("gradserve.dist")

MAGIC = 0x6772616473657276  # "gradserv"
HEADER_BYTES = 4096  # a command fits here unless its payload is large (then a second broadcast)
_PREFIX = 24  # magic, sequence number, payload length: three int64
BEAT_S = 0.25
STALE_S = 1.5  # a rank whose counter did not move for this long is gone


class GroupLost(Exception):
    """A collective failed: a rank died or did not answer within the timeout."""


class Diverged(Exception):
    """The ranks no longer agree about the command stream (a bug; the group must restart)."""


@dataclass(frozen=True)
class RankInfo:
    """What each rank tells the others when the group forms."""

    rank: int
    host: str
    pid: int
    device: str
    torch: str
    version: str

    def __str__(self) -> str:
        return f"rank {self.rank} ({self.device} on {self.host}, pid {self.pid})"


class Liveness:
    """Counters in torchrun's store, one per rank, bumped every BEAT_S by a daemon thread."""

    def __init__(self, store: Any, prefix: str, rank: int, world: int) -> None:
        self._store = store
        self._prefix = prefix
        self.rank = rank
        self.world = world
        self._lock = threading.Lock()  # one store client, two threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="gradserve-liveness")
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                with self._lock:
                    self._store.add(self._key(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: so is the group
                return

    def _counts(self) -> list[int | None]:
        out: list[int | None] = []
        for r in range(self.world):
            try:
                with self._lock:
                    out.append(int(self._store.add(self._key(r), 0)))
            except Exception:  # noqa: BLE001 - unreadable: unknown
                out.append(None)
        return out

    def silent(self) -> list[int]:
        """Ranks whose counter does not move for STALE_S (this rank excluded)."""
        before = self._counts()
        time.sleep(STALE_S)
        after = self._counts()
        return [r for r in range(self.world)
                if r != self.rank and before[r] is not None and before[r] == after[r]]

    def stop(self) -> None:
        self._stop.set()


class Group:
    """This rank's view of the group: its peers, process groups and collectives."""

    def __init__(self, rank: int, world: int, device: torch.device, backend: str,
                 timeout_s: float, cpu: Any, ranks: Sequence[RankInfo],
                 liveness: Liveness | None) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        self.backend = backend
        self.timeout_s = timeout_s
        self.cpu = cpu  # gloo group for host-memory traffic (None: the default group)
        self.ranks = list(ranks)
        self.liveness = liveness
        self.seconds = 0.0  # time spent in collectives, read and reset by the driver per op

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError, gloo's connection errors and timeouts
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GroupLost(f"{what} failed: {first}") from None
        finally:
            self.seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- host memory (gloo)

    def broadcast_cpu(self, t: torch.Tensor) -> None:
        self._call("broadcast", dist.broadcast, t, 0, group=self.cpu)

    def all_gather_cpu(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._call("all_gather", dist.all_gather, out, t, group=self.cpu)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._call("all_gather_object", dist.all_gather_object, out, obj, group=self.cpu)
        return out

    def scatter_cpu(self, out: torch.Tensor, parts: list[torch.Tensor] | None) -> None:
        self._call("scatter", dist.scatter, out, parts, src=0, group=self.cpu)

    def send_cpu(self, t: torch.Tensor, dst: int) -> None:
        self._call("send", dist.send, t, dst, group=self.cpu)

    def recv_cpu(self, t: torch.Tensor, src: int) -> None:
        self._call("recv", dist.recv, t, src, group=self.cpu)

    # ---------------------------------------------------------------- device memory

    def all_reduce_dev(self, t: torch.Tensor) -> None:
        self._call("all_reduce", dist.all_reduce, t)

    def broadcast_dev(self, t: torch.Tensor) -> None:
        self._call("broadcast", dist.broadcast, t, 0)

    # ---------------------------------------------------------------- the command stream

    def send_header(self, seq: int, command: dict[str, Any]) -> None:
        """Rank 0: one command to every rank (a second broadcast when it does not fit)."""
        payload = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        buf[:_PREFIX].view(torch.int64).copy_(torch.tensor([MAGIC, seq, len(payload)]))
        inline = len(payload) <= HEADER_BYTES - _PREFIX
        if inline and payload:
            buf[_PREFIX:_PREFIX + len(payload)] = torch.frombuffer(bytearray(payload),
                                                                  dtype=torch.uint8)
        self.broadcast_cpu(buf)
        if not inline:
            self.broadcast_cpu(torch.frombuffer(bytearray(payload), dtype=torch.uint8))

    def recv_header(self) -> tuple[int, dict[str, Any]]:
        """The other ranks: the next command, and its sequence number."""
        buf = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        self.broadcast_cpu(buf)
        magic, seq, length = (int(v) for v in buf[:_PREFIX].view(torch.int64))
        if magic != MAGIC:
            raise Diverged(f"rank {self.rank} expected a command and received other data "
                           "(the ranks' collectives are out of step)")
        if length <= HEADER_BYTES - _PREFIX:
            data = buf[_PREFIX:_PREFIX + length].numpy().tobytes()
        else:
            big = torch.empty(length, dtype=torch.uint8)
            self.broadcast_cpu(big)
            data = big.numpy().tobytes()
        return seq, pickle.loads(data)  # rank 0 of this group wrote it

    def describe(self, ranks: Sequence[int]) -> str:
        return ", ".join(str(self.ranks[r]) if r < len(self.ranks) else f"rank {r}"
                         for r in ranks)

    def lost(self) -> list[int]:
        """After a failed collective: the ranks that stopped beating (may be empty)."""
        return self.liveness.silent() if self.liveness is not None else []

    def close(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
