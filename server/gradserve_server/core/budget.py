"""One server-wide memory budget (--max-memory-mb) that every allocation path asks first.

Whatever the server holds for its clients is charged here by kind before it is allocated:
parameters, gradients and optimizer state when a model is created, retained autograd graphs,
uploaded datasets, the request-id cache, request tensors while a call works on them, and the
outputs and intermediates a call will allocate (estimated on meta tensors, core/estimate.py).
A charge that does not fit raises ResourceExhausted naming the budget, the request and what is
held, so a client is refused before the kernel's OOM killer has to choose a victim.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import InvalidArgument, ResourceExhausted
from .hooks import Hooks

log = logging.getLogger("gradserve")

# What the budget holds, in the order messages list it.
KINDS: tuple[str, ...] = ("parameters", "gradients", "optimizer", "graphs", "datasets",
                          "id_cache", "requests", "compute")
_NAMES = {"parameters": "parameters and buffers", "gradients": "gradients",
          "optimizer": "optimizer state", "graphs": "retained graphs", "datasets": "datasets",
          "id_cache": "request-id cache", "requests": "request tensors in flight",
          "compute": "computations in flight"}
# A request's description for refusals; a callable is called only when one is made.
What = str | Callable[[], str]
# Without --max-memory-mb the budget is this share of the memory the process may use; the rest
# is for what the budget cannot see (Python, torch and gRPC themselves, allocator slack).
DEFAULT_FRACTION = 0.75
# Reservations for one call below this are not made: a tiny Forward pays no lock, and what
# concurrent small calls hold together stays far inside the headroom DEFAULT_FRACTION leaves.
SMALL_BYTES = 64 * 1024


def fmt_bytes(n: int) -> str:
    """'2.5 GiB', '300 MiB', '12 KiB', '17 B': sizes in messages, three digits at most."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1000 or unit == "GiB":
            break
        value /= 1024
    digits = 0 if unit == "B" or abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    text = f"{value:.{digits}f}"
    return f"{text.rstrip('0').rstrip('.') if '.' in text else text} {unit}"


def memory_limit() -> tuple[int, str]:
    """The memory this process may use, and where that figure comes from.

    The smaller of physical memory and the cgroup limit (v2 memory.max, v1 limit_in_bytes): in a
    container, the cgroup is what the OOM killer enforces.
    """
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    best, source = physical, "physical memory"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < best:
            best, source = int(text), f"the cgroup limit ({path})"
    return best, source


def default_budget_bytes() -> tuple[int, str]:
    """DEFAULT_FRACTION of memory_limit(), with a description for the start-up log."""
    limit, source = memory_limit()
    return int(limit * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of {fmt_bytes(limit)}, {source}"


class Reservation:
    """Bytes charged for the length of one operation; released on exit (idempotent)."""

    __slots__ = ("_budget", "kind", "nbytes")

    def __init__(self, budget: MemoryBudget, kind: str, nbytes: int) -> None:
        self._budget: MemoryBudget | None = budget
        self.kind = kind
        self.nbytes = nbytes

    def keep(self, kind: str, nbytes: int, what: What) -> None:
        """Turn nbytes of this reservation into a lasting charge of `kind` (a retained graph).

        Up to what is reserved this cannot fail; the excess is charged like any other request.
        """
        budget = self._budget
        if budget is None:
            raise RuntimeError("keep() after release()")
        moved = min(nbytes, self.nbytes)
        if nbytes > moved:
            budget.charge(kind, nbytes - moved, what)
        budget.move(self.kind, kind, moved)
        self.nbytes -= moved

    def release(self) -> None:
        if self.nbytes:  # an empty reservation (a small call's) is shared: nothing to give back
            budget, self._budget = self._budget, None
            if budget is not None:
                budget.release(self.kind, self.nbytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class MemoryBudget:
    """Bytes held by kind against one limit; every method is thread-safe and O(1).

    charge/release: lasting holdings (a model's parameters, a dataset, a retained graph).
    reserve: a Reservation for the length of one call (request tensors, a computation).
    try_charge: for caches that evict instead of failing (the request-id cache).
    """

    def __init__(self, limit: int = 0, hooks: Hooks | None = None, *, max_call: int = 0,
                 setting: str = "max_memory_mb") -> None:
        if limit < 0 or max_call < 0:
            raise InvalidArgument("memory budget: limits must be >= 0")
        self.limit = limit or (1 << 62)  # 0: no budget (core used on its own, tests)
        self.max_call = min(max_call or self.limit, self.limit)
        self.setting = setting
        self._held = dict.fromkeys(KINDS, 0)
        self._used = 0
        self._lock = threading.Lock()
        self._empty = {kind: Reservation(self, kind, 0) for kind in KINDS}
        if hooks is not None:
            hooks.memory_budget(self.limit, self.held)

    # ---------------------------------------------------------------- reading

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return max(0, self.limit - self._used)

    def held(self) -> dict[str, int]:
        """Bytes held by kind (a copy)."""
        with self._lock:
            return dict(self._held)

    def describe(self) -> str:
        """'4 GiB of 6 GiB held (parameters and buffers 2 GiB, datasets 2 GiB)'."""
        held = self.held()
        parts = [f"{_NAMES[k]} {fmt_bytes(v)}" for k, v in held.items() if v]
        return (f"{fmt_bytes(sum(held.values()))} of {fmt_bytes(self.limit)} held"
                f" ({', '.join(parts) or 'nothing'})")

    def refusal(self, nbytes: int, what: What) -> ResourceExhausted:
        what = what() if callable(what) else what
        return ResourceExhausted(
            f"{what} needs {fmt_bytes(nbytes)} ({nbytes} bytes) of memory; the server's memory "
            f"budget ({self.setting}) has {fmt_bytes(self.free)} free: {self.describe()}")

    # ---------------------------------------------------------------- changing

    def _check_kind(self, kind: str) -> None:
        if kind not in self._held:
            raise ValueError(f"unknown budget kind {kind!r}; expected one of {KINDS}")

    def try_charge(self, kind: str, nbytes: int) -> bool:
        """Charge nbytes if they fit; False (and nothing charged) if not."""
        self._check_kind(kind)
        if nbytes <= 0:
            return True
        with self._lock:
            if self._used + nbytes > self.limit:
                return False
            self._held[kind] += nbytes
            self._used += nbytes
        return True

    def charge(self, kind: str, nbytes: int, what: What) -> None:
        """Charge nbytes or raise ResourceExhausted naming `what` (the request) and the holdings."""
        if not self.try_charge(kind, nbytes):
            raise self.refusal(nbytes, what)

    def charge_all(self, charges: Mapping[str, int], what: What) -> None:
        """Several kinds at once, all or nothing (a model's parameters, gradients, state)."""
        for kind in charges:
            self._check_kind(kind)
        total = sum(max(0, n) for n in charges.values())
        with self._lock:
            fits = self._used + total <= self.limit
            if fits:
                for kind, n in charges.items():
                    self._held[kind] += max(0, n)
                self._used += total
        if not fits:
            raise self.refusal(total, what)

    def release(self, kind: str, nbytes: int) -> None:
        self._check_kind(kind)
        if nbytes <= 0:
            return
        with self._lock:
            if nbytes > self._held[kind]:  # a bug elsewhere; never let the books go negative
                log.error("memory budget: releasing %d bytes of %s, only %d held", nbytes, kind,
                          self._held[kind])
                nbytes = self._held[kind]
            self._held[kind] -= nbytes
            self._used -= nbytes

    def move(self, source: str, target: str, nbytes: int) -> None:
        """Re-label held bytes (a computation's reservation becoming a retained graph)."""
        self._check_kind(source)
        self._check_kind(target)
        with self._lock:
            nbytes = min(nbytes, self._held[source])
            self._held[source] -= nbytes
            self._held[target] += nbytes

    def reserve(self, kind: str, nbytes: int, what: What) -> Reservation:
        """Charge nbytes for the length of an operation: `with budget.reserve(...):`.

        Below SMALL_BYTES nothing is charged (an empty, shared reservation).
        """
        if nbytes < SMALL_BYTES:
            return self._empty[kind]
        self.charge(kind, nbytes, what)
        return Reservation(self, kind, max(0, nbytes))

    def convert(self, source: str, nbytes: int) -> Reservation:
        """Held bytes of `source` become a computation's reservation (a graph being consumed)."""
        self.move(source, "compute", nbytes)
        return Reservation(self, "compute", max(0, nbytes))

    def reserve_call(self, nbytes: int, what: What) -> Reservation:
        """A computation's estimated allocations, checked against the per-call limit first."""
        if nbytes > self.max_call and self.max_call < self.limit:
            what = what() if callable(what) else what
            raise ResourceExhausted(
                f"{what} would allocate about {fmt_bytes(nbytes)} ({nbytes} bytes) for its "
                f"outputs and intermediates; the limit for one call (max_compute_mb) is "
                f"{fmt_bytes(self.max_call)}")
        return self.reserve("compute", nbytes, what)
