"""Give memory back to the system once the server is quiet.

Large messages pass through buffers that glibc serves from its heaps (gRPC's slices, protobuf
and torch buffers under its mmap threshold, which rises to 32 MiB as large blocks are freed).
Freed, they stay in the process: after a burst of 64 MiB calls the idle server kept 180 MB
more than before it. malloc_trim(0) returns the free pages of every heap; it runs on an
executor thread when no call has started for QUIET_S seconds after some had (never while
calls are being served, so it costs them nothing). Nothing here changes malloc's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gradserve")
QUIET_S = 2.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim this way
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class Trimmer:
    """Call tick() periodically with the number of calls started so far."""

    def __init__(self, submit: Callable[[Callable[[], Any]], Any],
                 quiet_s: float = QUIET_S) -> None:
        self._trim = _malloc_trim()
        self._submit = submit
        self.quiet_s = quiet_s
        self._seen = 0
        self._since = time.monotonic()
        self._dirty = False
        self.trims = 0

    def tick(self, started: int) -> None:
        now = time.monotonic()
        if started != self._seen:
            self._seen, self._since, self._dirty = started, now, True
            return
        if self._dirty and self._trim is not None and now - self._since >= self.quiet_s:
            self._dirty = False
            self._submit(self._run)

    def _run(self) -> None:
        assert self._trim is not None
        self._trim(0)
        self.trims += 1
