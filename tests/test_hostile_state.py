"""A careless or hostile operator's state dir: special files, a full volume, a killed save.

Each test names what was done to the state dir and asserts that the server starts, restores
what it can and answers calls (never a hang, never a crash loop).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gradserve import Client, FailedPreconditionError, ResourceExhaustedError
from gradserve_server.app import build_server
from gradserve_server.settings import Settings
from test_durability import small_disk  # noqa: F401 - the 2 MiB tmpfs fixture

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def _served(address: str) -> None:
    with Client(address, timeout=20, retries=0) as other:
        assert other.health(timeout=10) == "SERVING"
        m = other.create_model(layers=LINEAR, loss="mse", seed=0)
        assert m.backward(torch.ones(2, 2), torch.zeros(2, 1), step=True).step == 1
        m.delete()


def _checkpoint(state_dir: Path, model_id: str) -> None:
    """A real checkpoint of a tiny model, written by a server of its own."""
    server, _ = build_server(Settings(port=0, metrics_port=-1, state_dir=str(state_dir)))
    server.start()
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=20) as c:
            c.create_model(layers=LINEAR, loss="mse", seed=0, model_id=model_id).step()
    finally:
        server.drain(grace=10)


class _Unblock:
    """Opens a FIFO for writing after a delay, so that a reader stuck on it returns (the test
    then fails on its time bound instead of hanging the run)."""

    def __init__(self, fifo: Path, after: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fifo, after), daemon=True)
        self._thread.start()

    def _run(self, fifo: Path, after: float) -> None:
        while not self._stop.wait(after):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader: nothing is stuck
                continue
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def unblock() -> Iterator[list[_Unblock]]:
    made: list[_Unblock] = []
    yield made
    for u in made:
        u.close()


@pytest.mark.hostile("state dir, kills (operator)", inputs=3)
def test_operator_leaves_a_fifo_named_like_a_checkpoint(spawn_server: Any, tmp_path: Path,
                                                        unblock: list[Any]) -> None:
    """A FIFO named x.safetensors in the state dir: start-up blocked for ever on opening it (a
    probe-restart loop in Kubernetes), and a ListCheckpoints while one was there froze the
    whole server, health included (safetensors opens the file holding the GIL). Only regular
    files are read; anything else is quarantined at start and listed with its error later.

    The server runs in a child process, and a helper here opens each FIFO for writing after
    20 s: a regression then fails on the time bounds below instead of hanging the run."""
    _checkpoint(tmp_path, "good")
    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    unblock.append(_Unblock(tmp_path / "pipe.safetensors", after=20))
    started = time.monotonic()
    server = spawn_server("--state-dir", str(tmp_path))
    assert time.monotonic() - started < 15, "start-up waited on the FIFO"
    quarantined = sorted(p.name.split(".")[0] for p in (tmp_path / "quarantine").iterdir()
                         if not p.name.endswith(".reason"))
    assert quarantined == ["pipe", "zero"]
    with Client(server.address, timeout=10, retries=0) as client:
        assert [m.id for m in client.list_models()] == ["good"]
        os.mkfifo(tmp_path / "later.safetensors")  # after start: listed, never opened
        unblock.append(_Unblock(tmp_path / "later.safetensors", after=20))
        listed = {c.name: c for c in client.list_checkpoints()}
        assert "not a regular file" in listed["later"].error
        assert listed["good"].error == ""
        with pytest.raises(FailedPreconditionError, match="not a regular file"):
            client.load_checkpoint("later", model_id="x")
        client.delete_checkpoint("later")
        assert not (tmp_path / "later.safetensors").exists()
    _served(server.address)


@pytest.mark.hostile("state dir, kills (operator)")
def test_state_volume_is_full_at_start(small_disk: Path) -> None:  # noqa: F811
    """A state volume at 100 %: the start-up write test failed and the server exited 1, for
    ever (a crash loop), although every checkpoint on it was intact, and nobody could free
    space through the API. The server now starts, restores, serves, and says that saves will
    fail; DeleteCheckpoint frees space and saves work again."""
    _checkpoint(small_disk, "kept")
    _checkpoint(small_disk, "old-snapshot")
    filler = small_disk / "filler"
    with open(filler, "wb") as f, pytest.raises(OSError):  # everything that is left
        while True:
            f.write(bytes(64 * 1024))
            f.flush()
    server, _ = build_server(Settings(port=0, metrics_port=-1, state_dir=str(small_disk)))
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        with Client(address, timeout=20, retries=0) as client:
            kept = client.model("kept")
            assert kept.info.step == 1
            kept.step()
            with pytest.raises(ResourceExhaustedError, match="no space left"):
                kept.save_checkpoint()
            client.delete_checkpoint("old-snapshot")
            filler.unlink()
            assert kept.save_checkpoint().step == 2
        _served(address)
    finally:
        server.stop()


@pytest.mark.hostile("state dir, kills (operator)")
def test_killed_save_left_a_temporary_file_that_fills_the_volume(small_disk: Path  # noqa: F811
                                                                 ) -> None:
    """A save killed half-way leaves .NAME.*.tmp; when it filled the volume, the start-up write
    test failed before leftovers were removed, so the server never started again. Leftovers go
    first now, then the test write."""
    _checkpoint(small_disk, "kept")
    leftover = small_disk / ".kept.safetensors.abc123.tmp"
    with open(leftover, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(bytes(64 * 1024))
            f.flush()
    server, _ = build_server(Settings(port=0, metrics_port=-1, state_dir=str(small_disk)))
    server.start()
    try:
        assert not leftover.exists()
        address = f"127.0.0.1:{server.port}"
        with Client(address, timeout=20, retries=0) as client:
            assert client.model("kept").save_checkpoint().step == 1
        _served(address)
    finally:
        server.stop()
