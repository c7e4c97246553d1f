"""gradserve-server: Settings -> build_server -> serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from . import logs
from .core.errors import StartupError
from .settings import Settings

log = logging.getLogger("gradserve")


def quiet_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless OMP_WAIT_POLICY is set already).

    The server shares its cores with gRPC threads and, on one host, with its clients: spinning
    torch threads took those cores away (a local MLP step went from 1.1 ms to 84 ms beside a
    busy server; docs/performance.md). It only works before torch is imported, hence here.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tune_malloc(settings: Settings) -> None:
    """--tune-malloc 1: keep big message buffers out of fresh mmaps (page faults dominate 16-64 MiB
    messages here) in one heap, which malloc_trim can empty when the server is quiet
    (transport/memory.py; docs/performance.md "Memory"). Before any thread starts."""
    if settings.tune_malloc:
        from gradserve import tuning

        tuning.tune_malloc(arenas=1)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the default soft 1024 is a few hundred clients
    (each connection is a descriptor; --max-connections is derived from this limit)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # e.g. a hard limit above the kernel's nr_open: keep the soft one


def refuse(exc: Exception) -> int:
    """One line on stderr, exit status 1: the server cannot start as configured."""
    print(f"gradserve-server: {exc}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    quiet_openmp()
    settings = Settings.load(argv)  # --help and usage errors answer before torch is imported
    logs.configure(settings.log_level, settings.log_format)
    from .app import build_server  # imports torch: after quiet_openmp
    tune_malloc(settings)
    raise_fd_limit()
    group = None
    try:
        from .dist.launch import TorchrunEnv

        env = TorchrunEnv.from_environ(os.environ, one=settings.dist_backend != "auto")
        if env is not None:  # torchrun with WORLD_SIZE > 1 (or a backend named): a group
            from .dist.launch import follow, start_group, tag_logs

            tag_logs(env.rank)
            group = start_group(settings, env)
            if group.rank != 0:
                leave(follow(group, settings))
        server, _port = build_server(settings, group)
    except StartupError as exc:
        return refuse(exc)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop.set()

    # Before start: a SIGTERM right after "serving" (or while models restore) drains too.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except StartupError as exc:
        if server.driver is not None:
            server.driver.stop(1)  # the other ranks exit 1 too: the launch failed
        server.stop()
        if group is not None:
            leave(refuse(exc))
        return refuse(exc)
    # A timed wait lets the signal handler run promptly; a group that lost a rank stops too.
    while not stop.wait(1.0) and not server.group_lost.is_set():
        pass
    result = server.drain()
    log.info("stopped")
    if server.group_lost.is_set():
        leave(1)  # torchrun restarts the group (--max-restarts); the models were checkpointed
    code = 0 if result.ok else 1  # 1: some model was not checkpointed (each one is logged)
    if group is not None:
        leave(code)
    return code


def leave(code: int) -> NoReturn:
    """A group member exits now: with a rank gone, finalizers (process groups, executor threads
    stuck in a collective) could hold the process for their timeouts, and torchrun waits."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
