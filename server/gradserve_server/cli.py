"""gradserve-server: Settings -> build_server -> serve until SIGTERM/SIGINT."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import logs
from .app import build_server
from .settings import Settings

log = logging.getLogger("gradserve")


def tune_malloc() -> None:
    """Keep big tensor buffers out of fresh mmaps: page faults dominate 16-64 MiB messages here."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 512 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.load(argv)
    logs.configure(settings.log_level, settings.log_format)
    tune_malloc()
    server, _port = build_server(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    server.drain()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
