"""Shared fixtures: a real server on port 0 (the CLI's own factory) and an SDK client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch", reason="server tests need the [server] extra")

from gradserve import Client  # noqa: E402
from gradserve_server.app import GradServer, build_server  # noqa: E402
from gradserve_server.settings import Settings  # noqa: E402

from test_fuzz import register_profiles  # noqa: E402 - before --hypothesis-profile applies

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
