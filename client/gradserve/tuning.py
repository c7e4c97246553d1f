"""Process-wide tuning that large tensor messages benefit from (opt-in for SDK users).

    import gradserve
    gradserve.tune_malloc()   # once, at start-up, in a process that sends or receives big tensors
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 512 * 1024 * 1024,
                trim_threshold: int = 1024 * 1024 * 1024, arenas: int = 0) -> bool:
    """Keep big buffers on the heap instead of fresh mmaps, and keep freed memory for reuse.

    glibc serves allocations above M_MMAP_THRESHOLD (a few MiB, adaptive) with a new mmap and
    unmaps them on free, so every 16-64 MiB message buffer page-faults afresh; with these
    thresholds the pages are reused and round trips of large tensors take about half the time
    (docs/performance.md). Same as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the
    environment. The price: memory freed after a burst stays in the process. arenas > 0 caps
    glibc's heaps (MALLOC_ARENA_MAX), so that malloc_trim(0) can give all of it back (it cannot
    shrink per-thread heaps); set it before threads start. Returns False where there is no glibc
    (nothing to tune).
    """
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if arenas > 0:
        ok = mallopt(_M_ARENA_MAX, int(arenas)) == 1 and ok
    return mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
