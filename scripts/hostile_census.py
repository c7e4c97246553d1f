"""Count the hostile inputs the test suite tries, by class, and optionally run them.

Every attack test carries `@pytest.mark.hostile(kind, inputs=N)` (N: inputs one test item
tries, 1 by default; a sweep or a property test states its own count from the same constants
it runs with). This script collects the tests with pytest itself, so the table follows the
suite: add a marked test and the count changes.

    python scripts/hostile_census.py          # the table of counts (collection only, seconds)
    python scripts/hostile_census.py --run    # also run them: outcomes, INTERNAL answers, RSS

With --run, "INTERNAL" counts incidents logged by in-process servers (gradserve.rpc) and by
child servers (their stderr, read when a test stops them). Two RSS figures: the largest growth
of a child server (spawn_server, the guarded servers of test_hostile_memory.py) from ready to
stopped, and this process's RSS before and after the class (it hosts the in-process servers,
and also builds the attacks). docs/security.md explains the classes and quotes the counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Incidents(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "incident" in record.getMessage():
            self.count += 1


class Census:
    """A pytest plugin: the marked items by kind; with run=True, what happened to them."""

    def __init__(self, run: bool) -> None:
        self.run = run
        self.kinds: dict[str, str] = {}
        self.inputs: Counter[str] = Counter()
        self.tests: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.internal: Counter[str] = Counter()
        self.rss: dict[str, list[float]] = defaultdict(list)
        self.child_growth: dict[str, float] = {}
        self._children = 0
        self.handler = _Incidents()
        self._current: str | None = None
        self._seen = 0

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        keep = []
        for item in items:
            mark = item.get_closest_marker("hostile")
            if mark is None:
                continue
            kind = mark.args[0]
            self.kinds[item.nodeid] = kind
            self.tests[kind] += 1
            self.inputs[kind] += int(mark.kwargs.get("inputs", 1))
            keep.append(item)
        keep.sort(key=lambda item: self.kinds[item.nodeid])  # one class after another
        items[:] = keep

    def _incidents(self) -> int:
        conftest = sys.modules.get("conftest")
        children = sum(getattr(conftest, "CHILD_INCIDENTS", []))
        return self.handler.count + children

    def _child_rss(self) -> list[tuple[int, int]]:
        return list(getattr(sys.modules.get("conftest"), "CHILD_RSS", []))

    def pytest_runtest_setup(self, item: Any) -> None:
        kind = self.kinds[item.nodeid]
        if kind != self._current:
            self._close_class()
            self._current = kind
            self._seen = self._incidents()
            self._children = len(self._child_rss())
            self.rss[kind].append(_rss_mib())

    def _close_class(self) -> None:
        if self._current is not None:
            self.internal[self._current] += self._incidents() - self._seen
            self.rss[self._current].append(_rss_mib())
            grown = [(end - start) / 2**20 for start, end in self._child_rss()[self._children:]]
            if grown:
                self.child_growth[self._current] = max(grown)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self.failed[self.kinds.get(report.nodeid, "?")] += 1

    def pytest_sessionstart(self) -> None:
        logging.getLogger("gradserve.rpc").addHandler(self.handler)

    def pytest_sessionfinish(self) -> None:
        self._close_class()

    def table(self) -> str:
        head = ["class", "tests", "hostile inputs"]
        if self.run:
            head += ["failed", "INTERNAL", "child server RSS growth, largest (MiB)",
                     "test process RSS before → after (MiB)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kind in sorted(self.tests):
            row = [kind, str(self.tests[kind]), str(self.inputs[kind])]
            if self.run:
                before, after = (self.rss[kind] + [float("nan")] * 2)[:2]
                growth = self.child_growth.get(kind)
                row += [str(self.failed[kind]), str(self.internal[kind]),
                        "no child" if growth is None else f"{growth:+.0f}",
                        f"{before:.0f} → {after:.0f}"]
            lines.append("| " + " | ".join(row) + " |")
        total = ["**total**", str(sum(self.tests.values())), str(sum(self.inputs.values()))]
        if self.run:
            total += [str(sum(self.failed.values())), str(sum(self.internal.values())), "", ""]
        lines.append("| " + " | ".join(total) + " |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the tests too")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)
    census = Census(args.run)
    flags = ["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), str(ROOT / "tests")]
    if not args.run:
        flags.append("--collect-only")
    code = pytest.main([*flags, *args.pytest_args], plugins=[census])
    print()
    print(census.table())
    return int(code) if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
