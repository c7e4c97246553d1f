"""Shared fixtures: a real server on port 0 (the CLI's own factory) and an SDK client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="server tests need the [server] extra")

from gradserve import Client
from gradserve_server.app import GradServer, build_server
from gradserve_server.settings import Settings
from test_fuzz import register_profiles

register_profiles()

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Incidents (INTERNAL answers) each child server logged, and its RSS in bytes when it was ready
# and when it was stopped, appended when it is stopped: what scripts/hostile_census.py reports
# besides the in-process servers' own log records.
CHILD_INCIDENTS: list[int] = []
CHILD_RSS: list[tuple[int, int]] = []


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def require_tool(ok: bool, what: str) -> None:
    """Skip locally when a platform tool is missing; in CI a missing tool is a failure."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed")


def require_root(why: str) -> None:
    """Skip locally without root (and mount(8)); CI runs as root, so there it is a failure."""
    import shutil

    if os.geteuid() == 0 and shutil.which("mount") is not None:
        return
    if IN_CI:
        pytest.fail(f"root and mount(8) are required in CI ({why})")
    pytest.skip(f"needs root and mount(8) ({why})")


@pytest.fixture
def make_server() -> Iterator[Callable[..., GradServer]]:
    """Start servers with Settings overrides; all are stopped at teardown."""
    started: list[GradServer] = []

    def make(**overrides: object) -> GradServer:
        base = Settings(port=0, metrics_port=-1, threads=16)
        server, _port = build_server(replace(base, **overrides))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., GradServer]) -> GradServer:
    return make_server()


@pytest.fixture
def client(server: GradServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


class ServerProcess:
    """`python -m gradserve_server` in a child process (for signals and restarts)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 rlimits: dict[int, tuple[int, int]] | None = None) -> None:
        import re
        import resource
        import subprocess
        import sys

        def limit() -> None:  # in the child, before it runs the server (e.g. RLIMIT_NOFILE)
            for which, value in (rlimits or {}).items():
                resource.setrlimit(which, value)

        full_env = {**os.environ, "GRADSERVE_PORT": "0", "GRADSERVE_METRICS_PORT": "-1",
                    "GRADSERVE_LOG_FORMAT": "json", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "gradserve_server", *args],
                                     env=full_env, stderr=subprocess.PIPE, text=True,
                                     # only setrlimit runs between fork and exec
                                     preexec_fn=limit if rlimits else None)  # noqa: PLW1509
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        for _ in range(200):
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited early:\n" + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r'"grpc": "[^"]*:(\d+)"', line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("server did not report its port")
        self.address = f"127.0.0.1:{self.port}"
        self.rss_ready = _rss(self.proc.pid)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        self.lines.extend(self.proc.stderr.readlines())
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            CHILD_RSS.append((self.rss_ready, _rss(self.proc.pid)))
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.lines.extend(self.proc.stderr.readlines())
            self.proc.stderr.close()
            CHILD_INCIDENTS.append(sum("(incident " in line for line in self.lines))


@pytest.fixture
def spawn_server() -> Iterator[Callable[..., ServerProcess]]:
    procs: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None,
              rlimits: dict[int, tuple[int, int]] | None = None) -> ServerProcess:
        proc = ServerProcess(*args, env=env, rlimits=rlimits)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.kill()


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TorchrunServer:
    """`torchrun --standalone --nproc-per-node N -m gradserve_server` in a session of its own.

    torchrun starts every rank in a new session, so teardown kills the whole tree by pid (found
    under /proc before anything is killed): no rank can outlive a test.
    """

    def __init__(self, nproc: int, *args: str, env: dict[str, str] | None = None,
                 max_restarts: int = 0, port: int = 0) -> None:
        import subprocess
        import sys
        import threading

        self.nproc = nproc
        self.port = port or free_port()
        full_env = {**os.environ, "GRADSERVE_PORT": str(self.port),
                    "GRADSERVE_METRICS_PORT": "-1", "GRADSERVE_LOG_FORMAT": "json",
                    "GRADSERVE_DIST_TIMEOUT_SECONDS": "10", "GRADSERVE_THREADS": "4",
                    **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "--monitor-interval=0.2", "-m", "gradserve_server", *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def records(self, msg: str | None = None) -> list[dict[str, Any]]:
        """rank log lines (JSON) so far, those with message msg when given."""
        import json

        out = []
        with self._changed:
            lines = list(self.lines)
        for line in lines:
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if msg is None or rec.get("msg") == msg:
                    out.append(rec)
        return out

    def wait_for(self, msg: str, count: int = 1, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait until `count` records with message msg were logged; fails on exit or timeout."""
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.records(msg)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count} x {msg!r} within {timeout:g} s (exit "
                                         f"{self.proc.poll()}):\n" + "".join(self.lines[-60:]))
                self._changed.wait(min(left, 0.5))

    def serving(self, count: int = 1, timeout: float = 120.0) -> None:
        self.wait_for("gradserve serving", count, timeout)

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of the latest group (its rank 0's "distributed group formed" line)."""
        import re

        formed = self.records("distributed group formed")[-1]
        pids = {}
        for text in formed["ranks"]:
            found = re.match(r"rank (\d+) .*pid (\d+)\)", text)
            assert found, text
            pids[int(found.group(1))] = int(found.group(2))
        return pids

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        import signal as signals

        pids = [*descendants(self.proc.pid), self.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        finally:
            self._reader.join(10)


@pytest.fixture
def torchrun_server() -> Iterator[Callable[..., TorchrunServer]]:
    started: list[TorchrunServer] = []

    def start(nproc: int, *args: str, **kwargs: Any) -> TorchrunServer:
        server = TorchrunServer(nproc, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
