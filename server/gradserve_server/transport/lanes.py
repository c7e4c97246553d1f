"""Where work runs. The event loop only moves bytes; model work runs on bounded executors.

- compute: one executor for the server's device (`--threads` workers): Forward, Backward, Step,
  parameters, model creation and deletion, checkpoints, dataset chunks.
- train: one thread per training run (`--max-train-runs`, plus a few for runs that are refused):
  a Train loop keeps its thread between events; TrainStream steps run here too.
- control: two threads for cheap calls that must answer while everything else is busy
  (GetModel, ListModels, ListDatasets, shared-memory registration, ...).

A call whose identical predecessor (same method, model and tensor shapes) took less than
`--inline-us` microseconds runs on the event loop itself: handing a 30 us Linear(2,1) Forward
to a thread and back costs more than the Forward (docs/performance.md). Anything slower, larger
or new goes to its executor, and a call that ran long inline sends the next one of its kind
back to the executor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

from ..core.errors import Aborted

T = TypeVar("T")
CONTROL_THREADS = 2
TRAIN_SPARE_THREADS = 4  # refusals (slot limit, model busy) answer while max_train_runs train
_END = object()


class Lanes:
    def __init__(self, device: str, compute_threads: int, train_runs: int,
                 inline_us: int = 0) -> None:
        name = device.replace(":", "")
        self.compute = futures.ThreadPoolExecutor(compute_threads,
                                                  thread_name_prefix=f"gradserve-{name}")
        self.train = futures.ThreadPoolExecutor(train_runs + TRAIN_SPARE_THREADS,
                                                thread_name_prefix="gradserve-train")
        self.control = futures.ThreadPoolExecutor(CONTROL_THREADS,
                                                  thread_name_prefix="gradserve-control")
        self.inline = InlinePolicy(inline_us / 1e6)

    async def run(self, pool: futures.Executor, fn: Callable[..., T], *args: Any) -> T:
        try:
            job = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except RuntimeError:  # the executor is shut down
            raise Aborted("the server is shutting down; retry on another instance") from None
        return await job

    def shutdown(self) -> None:
        """Drop queued work; running work finishes on its own (it holds no loop resources)."""
        for pool in (self.compute, self.train, self.control):
            pool.shutdown(wait=False, cancel_futures=True)


class InlinePolicy:
    """Remembers how long each kind of call took; allows the event loop the quick ones."""

    MAX_KINDS = 4096

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._last: dict[Any, float] = {}

    def allows(self, kind: Any) -> bool:
        if self.budget_s <= 0 or kind is None:
            return False
        last = self._last.get(kind)
        return last is not None and last <= self.budget_s

    def record(self, kind: Any, seconds: float) -> None:
        if kind is None or self.budget_s <= 0:
            return
        if len(self._last) >= self.MAX_KINDS and kind not in self._last:
            self._last.clear()  # many kinds: start over rather than track them all
        self._last[kind] = seconds

    def timed(self, kind: Any, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.record(kind, time.perf_counter() - start)


class ThreadedIterator:
    """A blocking iterator advanced one item at a time on an executor, awaited on the loop.

    No thread is held between items. close() closes the iterator on the executor once the
    step in flight (if any) is done, so a generator's cleanup never runs on the loop.
    """

    def __init__(self, iterator: Iterator[Any], pool: futures.Executor) -> None:
        self._it = iterator
        self._pool = pool
        self._busy: futures.Future[Any] | None = None
        self._closed = False

    def _next(self) -> Any:
        return next(self._it, _END)

    async def next(self) -> Any:
        """The next item, or ThreadedIterator.END."""
        self._busy = self._pool.submit(self._next)
        try:
            return await asyncio.wrap_future(self._busy)
        finally:
            if self._busy.done():
                self._busy = None

    END = _END

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._it, "close", None)
        if close is None:
            return
        busy = self._busy
        if busy is not None and not busy.done():
            busy.add_done_callback(lambda _f: self._submit(close))
        else:
            self._submit(close)

    def _submit(self, fn: Callable[[], Any]) -> None:
        try:
            self._pool.submit(fn)
        except RuntimeError:  # the executor is shut down: the server is stopping
            fn()
