"""Nothing lost: checkpoints, SIGTERM drain and restore, SIGKILL with autosave, exactly-once retries,
no resurrection after delete, quarantine of bad files, full disks and unusable state dirs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import require_root
from gradserve import (
    Client,
    FailedPreconditionError,
    GradServeError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer, build_server
from gradserve_server.core import statedir
from gradserve_server.core.errors import StartupError
from gradserve_server.settings import Settings
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
OPTIMIZER = {"type": "sgd", "lr": 0.01, "momentum": 0.9}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 2, generator=g)
    return X, X @ torch.tensor([[2.0], [-3.4]]) + 4.2


def _local(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The local loop equal to Train(batch_size=10, shuffle=True, seed=3), stopped after `steps`."""
    X, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), **{k: v for k, v in OPTIMIZER.items() if k != "type"})
    done, epoch = 0, 0
    while done < steps:
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(3 + epoch))
        for s in range(0, 1000, 10):
            if done == steps:
                break
            opt.zero_grad()
            nn.functional.mse_loss(net(X[order[s:s + 10]]), y[order[s:s + 10]]).backward()
            opt.step()
            done += 1
        epoch += 1
    return net, opt


def _assert_matches_local(client: Client, model_id: str, steps: int) -> None:
    net, opt = _local(steps)
    remote = client.model(model_id)
    assert remote.info.step == steps
    params = remote.parameters()
    for name, p in net.named_parameters():
        assert torch.equal(params[name], p.detach()), name
    # optimizer state survives: one more identical step on both sides stays identical
    X, y = _data()
    remote.backward(X[:10], y[:10], step=True)
    opt.zero_grad()
    nn.functional.mse_loss(net(X[:10]), y[:10]).backward()
    opt.step()
    params = remote.parameters()
    for name, p in net.named_parameters():
        assert torch.equal(params[name], p.detach()), f"{name} after one more step"


def test_save_and_load_checkpoint(make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    X, y = _data()
    with Client(f"127.0.0.1:{server.port}") as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="ck")
        list(m.train(X, y, max_steps=40, batch_size=10, shuffle=True, seed=3))
        info = m.save_checkpoint("ck-40")
        assert (info.name, info.model_id, info.step) == ("ck-40", "ck", 40)
        assert (tmp_path / "ck-40.safetensors").exists()
        list(m.train(X, y, max_steps=5, batch_size=10))
        restored = client.load_checkpoint("ck-40", model_id="ck-restored")
        assert restored.info.step == 40
        _assert_matches_local(client, "ck-restored", 40)
        assert [c.name for c in client.list_checkpoints()] == ["ck-40"]
        with pytest.raises(InvalidArgumentError, match="not a valid id"):
            m.save_checkpoint("../../etc/evil")
        with pytest.raises(NotFoundError):
            client.load_checkpoint("nothing-here")


def test_checkpoint_without_state_dir(client: Client) -> None:
    m = client.create_model(layers=LINEAR, seed=0)
    with pytest.raises(FailedPreconditionError, match="--state-dir"):
        m.save_checkpoint()


@pytest.mark.hostile("state dir, kills (operator)")
def test_sigterm_mid_train_then_restart(spawn_server: Any, tmp_path: Path) -> None:
    first = spawn_server("--state-dir", str(tmp_path))
    X, y = _data()
    events = []
    with Client(first.address) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="job")
        for event in m.train(X, y, epochs=10_000, batch_size=10, shuffle=True, seed=3,
                             log_every_steps=1):
            events.append(event)
            if len(events) == 30:
                first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    done = events[-1]
    assert done.kind == "done" and done.summary.stop_reason == "shutdown"
    reported = done.summary.model_step
    assert reported >= 30
    second = spawn_server("--state-dir", str(tmp_path))
    with Client(second.address) as client:
        _assert_matches_local(client, "job", reported)


@pytest.mark.hostile("state dir, kills (operator)")
def test_sigkill_loses_at_most_the_autosave_interval(spawn_server: Any, tmp_path: Path) -> None:
    first = spawn_server("--state-dir", str(tmp_path), "--autosave-steps", "10")
    X, y = _data()
    seen = 0
    with Client(first.address) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="job")
        with contextlib.suppress(GradServeError):  # the stream breaks when the process dies
            for event in m.train(X, y, epochs=10_000, batch_size=10, shuffle=True, seed=3,
                                 log_every_steps=1):
                seen = event.step
                if seen == 47:
                    first.signal(signal.SIGKILL)
    first.wait(30)
    second = spawn_server("--state-dir", str(tmp_path))
    with Client(second.address) as client:
        restored = client.model("job").info.step
        assert seen - 10 <= restored <= seen and restored % 10 == 0
        _assert_matches_local(client, "job", restored)


def test_repeated_request_id_applies_once(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    x = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=torch.ones(1, 2).numpy().tobytes())
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 1], data=torch.zeros(1, 1).numpy().tobytes())
    req = pb.BackwardRequest(model_id=m.id, inputs=[x], target=t, step=True, request_id="r-1")
    first = client._stub.Backward(req)
    again = client._stub.Backward(req)
    assert first == again and first.step == 1
    assert client._stub.Step(pb.StepRequest(model_id=m.id, request_id="s-1")).step == 2
    assert client._stub.Step(pb.StepRequest(model_id=m.id, request_id="s-1")).step == 2
    assert m.refresh().step == 2


class _LoseFirstReply(grpc.UnaryUnaryClientInterceptor):
    """The server applies the call, then the reply is 'lost' as if the network dropped it."""

    def __init__(self) -> None:
        self.calls = 0

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls += 1
        reply = continuation(details, request)
        if self.calls == 1:
            reply.result()  # the server did the work
            raise _Unavailable()
        return reply


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (simulated)"


def test_sdk_retry_after_lost_reply_is_exactly_once(client: Client) -> None:
    from gradserve._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc

    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    lossy = _LoseFirstReply()
    client._stub = pb_grpc.GradientServiceStub(grpc.intercept_channel(client._channel, lossy))
    assert m.step() == 1  # first attempt applied but lost; the retry gets the first result
    assert lossy.calls == 2
    assert m.refresh().step == 1


# ----------------------------------------------------------------------------- helpers

def _restart(make_server: Callable[..., GradServer], server: GradServer,
             **settings: Any) -> GradServer:
    """SIGTERM's path in-process: drain (checkpoint every model), then a new server, same dir."""
    result = server.drain(grace=1)
    assert result.ok, result.failed
    return make_server(state_dir=settings.pop("state_dir", server.settings.state_dir), **settings)


def _client(server: GradServer) -> Client:
    return Client(f"127.0.0.1:{server.port}", timeout=30)


def _rewrite(path: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> None:
    """Tamper with a checkpoint: edit its metadata and tensors in place, keep it well-formed."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["gradserve"])
    tensors = load_file(str(path))
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={"gradserve": json.dumps(meta)})


def _quarantined(state: Path) -> dict[str, str]:
    """quarantine/ as {original file name: reason file text}."""
    folder = state / "quarantine"
    if not folder.is_dir():
        return {}
    return {p.name.split(".safetensors")[0] + ".safetensors": p.read_text()
            for p in folder.glob("*.reason")}


def _metric(server: GradServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ----------------------------------------------------------------------------- resurrection

def test_deleted_model_stays_deleted_after_restart(make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        gone = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="gone")
        client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="kept")
        gone.save_checkpoint()                  # its own checkpoint: restored at start
        snapshot = gone.save_checkpoint("gone-snapshot")  # a named one: the user's to delete
        client.delete_model("gone")
        assert not (tmp_path / "gone.safetensors").exists()
    second = _restart(make_server, server)
    with _client(second) as client:
        assert [m.id for m in client.list_models()] == ["kept"]
        names = [c.name for c in client.list_checkpoints()]
        assert names == ["gone-snapshot", "kept"]
        # DeleteCheckpoint removes the snapshot for good; a second delete is NOT_FOUND
        client.delete_checkpoint(snapshot.name)
        with pytest.raises(NotFoundError, match="gone-snapshot"):
            client.delete_checkpoint(snapshot.name)
        with pytest.raises(InvalidArgumentError, match="not a valid id"):
            client.delete_checkpoint("../kept")
    third = _restart(make_server, second)
    with _client(third) as client:
        assert [m.id for m in client.list_models()] == ["kept"]
        assert [c.name for c in client.list_checkpoints()] == ["kept"]


def test_delete_checkpoint_of_a_live_model_is_written_again_at_shutdown(
        make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="live")
        m.save_checkpoint()
        client.delete_checkpoint("live")
        assert client.list_checkpoints() == []
    second = _restart(make_server, server)  # the model was live: the drain saved it again
    with _client(second) as client:
        assert client.model("live").info.step == 0


@pytest.mark.hostile("races on one id")
def test_autosave_racing_delete_never_brings_the_model_back(make_server: Any,
                                                           tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    core = server.core
    with _client(server) as client:
        for i in range(20):
            m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id=f"race-{i}")
            saver = threading.Thread(target=core.autosave_once)
            saver.start()
            client.delete_model(m.id)
            saver.join()
            assert not (tmp_path / f"{m.id}.safetensors").exists(), f"{m.id} came back"


# ----------------------------------------------------------------------------- bad files at start

def _good_and_bad_state(make_server: Any, state: Path) -> None:
    """A state dir with one good model and one file of each bad kind."""
    server = make_server(state_dir=str(state))
    with _client(server) as client:
        for name in ("good", "shape", "badid", "big", "opt"):
            m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id=name,
                                    optimizer=OPTIMIZER)
            X, y = _data()
            m.backward(X[:10], y[:10], step=True)
            m.save_checkpoint()
    server.stop()
    (state / "empty.safetensors").write_bytes(b"")
    data = (state / "good.safetensors").read_bytes()
    (state / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (state / "notjson.safetensors").write_bytes(data)
    _rewrite(state / "notjson.safetensors", lambda meta, t: meta.update(format="something-else"))
    _rewrite(state / "shape.safetensors",
             lambda meta, t: t.update({"model.0.weight": torch.zeros(3, 2)}))
    _rewrite(state / "badid.safetensors", lambda meta, t: meta.update(model_id="../../etc/x"))
    _rewrite(state / "big.safetensors", lambda meta, t: meta["spec"]["layers"][0]["kwargs"].update(
        in_features=4000, out_features=4000))
    _rewrite(state / "opt.safetensors", lambda meta, t: meta["optimizer"]["param_groups"][0].update(
        lr="fast"))

    def bad_momentum(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        meta["model_id"] = "momentum"
        tensors["optimizer.0.momentum_buffer"] = torch.zeros(7)  # loads, then fails at Step

    (state / "momentum.safetensors").write_bytes((state / "good.safetensors").read_bytes())
    _rewrite(state / "momentum.safetensors", bad_momentum)


@pytest.mark.hostile("state dir, kills (operator)")
def test_bad_checkpoint_files_are_quarantined_and_the_rest_restored(make_server: Any,
                                                                    tmp_path: Path) -> None:
    state = tmp_path / "state"
    _good_and_bad_state(make_server, state)
    # --max-parameters below what "big" (4000x4000 after tampering) needs: over the limit
    server = make_server(state_dir=str(state), max_parameters=100_000)
    with _client(server) as client:
        assert [m.id for m in client.list_models()] == ["good"]
        assert client.model("good").info.step == 1
        assert [c.name for c in client.list_checkpoints()] == ["good"]
    reasons = _quarantined(state)
    assert set(reasons) == {"empty.safetensors", "truncated.safetensors", "notjson.safetensors",
                            "shape.safetensors", "badid.safetensors", "big.safetensors",
                            "opt.safetensors", "momentum.safetensors"}
    assert reasons["empty.safetensors"].startswith("unreadable:")
    assert reasons["truncated.safetensors"].startswith("unreadable:")
    assert reasons["notjson.safetensors"].startswith("invalid:") and "format" in \
        reasons["notjson.safetensors"]
    assert reasons["shape.safetensors"].startswith("mismatch:") and "model.0.weight" in \
        reasons["shape.safetensors"]
    assert reasons["badid.safetensors"].startswith("invalid:") and "model_id" in \
        reasons["badid.safetensors"]
    assert reasons["big.safetensors"].startswith("over_limit:") and "max_parameters" in \
        reasons["big.safetensors"]
    assert reasons["opt.safetensors"].startswith("mismatch:") and "lr" in \
        reasons["opt.safetensors"]
    assert reasons["momentum.safetensors"].startswith("mismatch:") and "momentum_buffer" in \
        reasons["momentum.safetensors"]
    metric = "gradserve_checkpoints_quarantined_total"
    assert _metric(server, metric, reason="unreadable") == 2
    assert _metric(server, metric, reason="invalid") == 2
    assert _metric(server, metric, reason="mismatch") == 3
    assert _metric(server, metric, reason="over_limit") == 1


@pytest.mark.hostile("state dir, kills (operator)")
def test_more_checkpoints_than_max_models_starts_with_the_rest_quarantined(
        make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        for name in ("a", "b", "c"):
            client.create_model(layers=LINEAR, seed=0, model_id=name).save_checkpoint()
    server.stop()
    second = make_server(state_dir=str(tmp_path), max_models=2)
    with _client(second) as client:
        assert [m.id for m in client.list_models()] == ["a", "b"]
    assert list(_quarantined(tmp_path)) == ["c.safetensors"]
    assert "max_models" in _quarantined(tmp_path)["c.safetensors"]


@pytest.mark.hostile("state dir, kills (operator)")
def test_server_process_with_bad_files_starts_and_serves(spawn_server: Any, make_server: Any,
                                                        tmp_path: Path) -> None:
    """What Kubernetes sees: the process starts (no crash loop) and serves the good model."""
    state = tmp_path / "state"
    _good_and_bad_state(make_server, state)
    proc = spawn_server("--state-dir", str(state))
    with Client(proc.address, timeout=30) as client:
        client.wait_ready(timeout=30)
        assert client.model("good").info.step == 1
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert any("quarantined" in line and "truncated.safetensors" in line for line in proc.lines)


@pytest.mark.hostile("state dir, kills (operator)")
def test_leftover_temporary_files_are_removed_at_start(make_server: Any, tmp_path: Path) -> None:
    (tmp_path / "datasets").mkdir()
    leftovers = [tmp_path / ".m.safetensors.abc123.tmp", tmp_path / ".gradserve-write-test.7.tmp",
                 tmp_path / "datasets" / ".d.safetensors.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("not ours: left alone")
    make_server(state_dir=str(tmp_path))
    assert not any(p.exists() for p in leftovers)
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.hostile("state dir, kills (operator)")
def test_damaged_checkpoint_after_start_is_listed_and_refused_by_name(
        make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="m")
        m.save_checkpoint("ok")
        data = (tmp_path / "ok.safetensors").read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(data[:100])
        (tmp_path / "evil.safetensors").write_bytes(data)
        _rewrite(tmp_path / "evil.safetensors", lambda meta, t: meta.update(model_id="../../x"))
        listed = {c.name: c for c in client.list_checkpoints()}
        assert listed["ok"].error == "" and listed["ok"].step == 0
        assert "cut.safetensors" in listed["cut"].error and listed["cut"].step == -1
        assert "model_id" in listed["evil"].error
        with pytest.raises(FailedPreconditionError, match=r"cut\.safetensors.*not a readable"):
            client.load_checkpoint("cut")
        with pytest.raises(FailedPreconditionError, match="field model_id"):
            client.load_checkpoint("evil")
        with pytest.raises(FailedPreconditionError, match="field model_id"):
            client.load_checkpoint("evil", model_id="fine")
        assert [x.id for x in client.list_models()] == ["m"]  # nothing half-loaded


# ----------------------------------------------------------------------------- unusable state dir

def _start_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "GRADSERVE_PORT": "0", "GRADSERVE_METRICS_PORT": "-1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gradserve_server", *args], env=full,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.hostile("state dir, kills (operator)")
def test_state_dir_that_cannot_be_created_exits_at_once(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _start_process("--state-dir", str(blocker / "state"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--state-dir" in lines[0] and str(blocker / "state") in lines[0]
    assert "Not a directory" in lines[0]


@pytest.mark.hostile("state dir, kills (operator)")
def test_state_dir_on_a_read_only_mount_exits_at_once(tmp_path: Path) -> None:
    require_root("the test mounts a read-only tmpfs")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        proc = _start_process("--state-dir", str(ro))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "--state-dir" in line and str(ro) in line
    assert "Read-only file system" in line


@pytest.mark.hostile("state dir, kills (operator)")
def test_state_dir_check_names_uid_when_not_writable(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(statedir.os, "open", refuse)
    with pytest.raises(StartupError, match=r"--state-dir .*Permission denied.*uid \d+"):
        statedir.prepare(tmp_path)


@pytest.mark.hostile("state dir, kills (operator)")
def test_temp_dir_inside_the_state_dir_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inside = tmp_path / "tmp"
    inside.mkdir()
    monkeypatch.setenv("TMPDIR", str(inside))
    with pytest.raises(StartupError, match=r"TMPDIR: .* is inside --state-dir .*--tmpfs /tmp"):
        build_server(Settings(port=0, metrics_port=-1, state_dir=str(tmp_path)))
    proc = _start_process("--state-dir", str(tmp_path), env={"TMPDIR": str(inside)})
    assert proc.returncode == 1 and "TMPDIR" in proc.stderr
    # and the compile cache would land in the volume through HOME (the image's home directory)
    monkeypatch.setenv("TMPDIR", str(tmp_path.parent))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    statedir.place_scratch(str(tmp_path))
    assert not os.environ["TRITON_CACHE_DIR"].startswith(str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with pytest.raises(StartupError, match="TORCHINDUCTOR_CACHE_DIR"):
        statedir.place_scratch(str(tmp_path))


# ----------------------------------------------------------------------------- independent saves

def test_one_failing_model_does_not_stop_the_others_at_shutdown(make_server: Any,
                                                                 tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        for name in ("a-blocked", "b", "c"):
            client.create_model(layers=LINEAR, seed=0, model_id=name)
    (tmp_path / "a-blocked.safetensors").mkdir()  # the rename onto it fails
    result = server.drain(grace=1)
    assert not result.ok
    assert sorted(result.saved) == ["b", "c"] and list(result.failed) == ["a-blocked"]
    assert "a-blocked" in result.failed["a-blocked"] and str(tmp_path) in \
        result.failed["a-blocked"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert _metric(server, "gradserve_checkpoint_saves_total", trigger="shutdown",
                   result="error") == 1


def test_shutdown_deadline_fails_the_models_it_could_not_reach(make_server: Any,
                                                               tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        client.create_model(layers=LINEAR, seed=0, model_id="late")
    result = server.core.checkpoint_all(deadline=time.monotonic() - 1)
    assert result.failed == {"late": "not saved: the shutdown budget (--grace-seconds) ran out"}


def test_unchanged_models_are_not_rewritten_at_shutdown(make_server: Any, tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="m")
        m.save_checkpoint()
        m.forward(torch.ones(1, 2), eval_mode=True)  # reads only
        mtime = (tmp_path / "m.safetensors").stat().st_mtime_ns
        result = server.core.checkpoint_all()
        assert result.unchanged == ["m"] and result.saved == []
        assert (tmp_path / "m.safetensors").stat().st_mtime_ns == mtime


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that fills up. Needs root (CI runs as root)."""
    require_root("the test mounts a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


BIG = [{"type": "Linear", "in_features": 1000, "out_features": 1000}]  # 4 MB: never fits


@pytest.mark.hostile("state dir, kills (operator)")
def test_full_disk_answers_resource_exhausted_and_keeps_the_old_checkpoint(
        make_server: Any, small_disk: Path) -> None:
    server = make_server(state_dir=str(small_disk))
    with _client(server) as client:
        big = client.create_model(layers=BIG, seed=0, model_id="big")
        small = client.create_model(layers=LINEAR, seed=0, model_id="small")
        small.save_checkpoint()
        before = (small_disk / "small.safetensors").read_bytes()
        with pytest.raises(ResourceExhaustedError, match=rf"state dir {small_disk}: no space"):
            big.save_checkpoint()
        with pytest.raises(ResourceExhaustedError, match="no space"):
            big.save_checkpoint("small")  # over an existing name: the old file stays whole
        assert (small_disk / "small.safetensors").read_bytes() == before
        assert not list(small_disk.glob(".*.tmp"))
        assert _metric(server, "gradserve_checkpoint_saves_total", trigger="request",
                       result="error") == 2


@pytest.mark.hostile("state dir, kills (operator)")
def test_full_disk_at_sigterm_saves_every_model_that_fits(spawn_server: Any,
                                                          small_disk: Path) -> None:
    proc = spawn_server("--state-dir", str(small_disk))
    with Client(proc.address, timeout=30) as client:
        client.create_model(layers=BIG, seed=0, model_id="a-big")  # first by id, never fits
        for name in ("b", "c"):
            client.create_model(layers=LINEAR, loss="mse", seed=0, model_id=name).step()
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 1  # documented: 1 when any model was not saved
    failed = [line for line in proc.lines if "was not checkpointed" in line]
    assert len(failed) == 1 and "a-big" in failed[0] and "no space" in failed[0]
    second = spawn_server("--state-dir", str(small_disk))
    with Client(second.address, timeout=30) as client:
        assert {m.id: m.info.step for m in client.list_models()} == {"b": 1, "c": 1}


# ----------------------------------------------------------------------------- what a checkpoint holds

def test_gradients_and_request_ids_survive_a_restart(spawn_server: Any, tmp_path: Path) -> None:
    first = spawn_server("--state-dir", str(tmp_path))
    X, y = _data()
    with Client(first.address, timeout=30) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="m")
        step_req = pb.StepRequest(model_id="m", request_id="step-1")
        assert client._stub.Step(step_req).step == 1
        m.backward(X[:10], y[:10])  # accumulated, not stepped
        grads = m.grads()
        assert grads
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    second = spawn_server("--state-dir", str(tmp_path))
    with Client(second.address, timeout=30) as client:
        m = client.model("m")
        after = m.grads()
        assert after.keys() == grads.keys()
        for name in grads:
            assert torch.equal(torch.as_tensor(after[name]), torch.as_tensor(grads[name])), name
        # the retried Step is answered from the window: not applied a second time
        assert client._stub.Step(step_req).step == 1
        assert m.refresh().step == 1
        # and the pending gradients are the ones the next step applies, as in local code
        net, opt = _local(0)
        opt.step()  # step-1 had no gradients: momentum buffers stay empty, params unchanged
        opt.zero_grad()
        nn.functional.mse_loss(net(X[:10]), y[:10]).backward()
        opt.step()
        m.step()
        for name, p in net.named_parameters():
            assert torch.equal(m.parameters()[name], p.detach()), name


def _wait_for_checkpoint(state: Path, name: str, step: int, timeout: float = 30) -> None:
    path = state / f"{name}.safetensors"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        # a file replaced while being read is simply looked at again
        with contextlib.suppress(Exception), safe_open(str(path), framework="pt") as f:
            if json.loads(f.metadata()["gradserve"])["step"] == step:
                return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached step {step} on disk")


@pytest.mark.hostile("state dir, kills (operator)")
def test_sigkill_after_unary_calls_loses_at_most_the_autosave_interval(spawn_server: Any,
                                                                        tmp_path: Path) -> None:
    interval = 0.5
    first = spawn_server("--state-dir", str(tmp_path), "--autosave-seconds", str(interval))
    X, y = _data()
    with Client(first.address, timeout=30) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="unary")
        for i in range(7):  # unary calls only: no Train, no SaveCheckpoint
            m.backward(X[i * 10:(i + 1) * 10], y[i * 10:(i + 1) * 10], step=True)
        done = time.monotonic()
        # the background autosave has written it within one interval (plus the write)
        _wait_for_checkpoint(tmp_path, "unary", 7, timeout=interval + 10)
        waited = time.monotonic() - done
        first.signal(signal.SIGKILL)
    first.wait(30)
    assert waited < interval + 10
    second = spawn_server("--state-dir", str(tmp_path))
    with Client(second.address, timeout=30) as client:
        restored = client.model("unary")
        assert restored.info.step == 7
        net, opt = _local(0)
        for i in range(7):
            opt.zero_grad()
            nn.functional.mse_loss(net(X[i * 10:(i + 1) * 10]), y[i * 10:(i + 1) * 10]).backward()
            opt.step()
        for name, p in net.named_parameters():
            assert torch.equal(restored.parameters()[name], p.detach()), name


def test_background_autosave_does_not_block_calls(make_server: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(state_dir=str(tmp_path))
    writing, release = threading.Event(), threading.Event()
    real = statedir.write_safetensors

    def slow_write(*args: Any, **kwargs: Any) -> int:
        writing.set()
        assert release.wait(30), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(statedir, "write_safetensors", slow_write)
    with Client(f"127.0.0.1:{server.port}", timeout=10) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0, model_id="busy")
        saver = threading.Thread(target=server.core.autosave_once)
        saver.start()
        assert writing.wait(10)
        # the write is in progress: the model still answers, mutating calls included
        m.backward(torch.ones(2, 2), torch.zeros(2, 1), step=True)
        assert m.refresh().step == 1
        release.set()
        saver.join(30)
    assert not saver.is_alive()
    with safe_open(str(tmp_path / "busy.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["gradserve"])["step"] == 0  # the snapshot, not later
    assert server.core.autosave_once() == 1  # changed since: written again
    assert server.core.autosave_once() == 0  # unchanged: not rewritten


# ----------------------------------------------------------------------------- datasets

def test_datasets_persist_with_the_flag(make_server: Any, tmp_path: Path) -> None:
    X, y = _data()
    server = make_server(state_dir=str(tmp_path), persist_datasets=1)
    with _client(server) as client:
        info = client.upload_dataset(X.numpy(), y.numpy(), dataset_id="housing")
        client.upload_dataset(X[:5].numpy(), dataset_id="tmp")
        client.delete_dataset("tmp")
    second = _restart(make_server, server, persist_datasets=1)
    with _client(second) as client:
        assert [d.dataset_id for d in client.list_datasets()] == ["housing"]
        assert client.list_datasets()[0] == info
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0)
        list(m.train(dataset="housing", max_steps=40, batch_size=10, shuffle=True, seed=3))
        net, _ = _local(40)
        for name, p in net.named_parameters():
            assert torch.equal(m.parameters()[name], p.detach()), name
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["housing.safetensors"]


def test_datasets_without_the_flag_are_reported_gone(make_server: Any, tmp_path: Path) -> None:
    X, y = _data()
    server = make_server(state_dir=str(tmp_path))
    with _client(server) as client:
        client.upload_dataset(X.numpy(), y.numpy(), dataset_id="housing")
    second = _restart(make_server, server)
    with _client(second) as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0)
        with pytest.raises(NotFoundError, match="--persist-datasets"):
            list(m.train(dataset="housing", max_steps=1))


@pytest.mark.hostile("state dir, kills (operator)")
def test_damaged_dataset_file_is_quarantined(make_server: Any, tmp_path: Path) -> None:
    X, y = _data()
    server = make_server(state_dir=str(tmp_path), persist_datasets=1)
    with _client(server) as client:
        client.upload_dataset(X.numpy(), y.numpy(), dataset_id="a")
        client.upload_dataset(X.numpy(), y.numpy(), dataset_id="b")
    server.stop()
    path = tmp_path / "datasets" / "a.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    second = make_server(state_dir=str(tmp_path), persist_datasets=1)
    with _client(second) as client:
        assert [d.dataset_id for d in client.list_datasets()] == ["b"]
    assert list(_quarantined(tmp_path)) == ["a.safetensors"]


def test_version_1_checkpoints_still_load(make_server: Any, tmp_path: Path) -> None:
    """Files written before gradients, streams and request ids were stored load as they were."""
    server = make_server(state_dir=str(tmp_path))
    X, y = _data()
    with _client(server) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="old")
        m.backward(X[:10], y[:10], step=True)
        m.save_checkpoint()
        params = m.parameters()

        def downgrade(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
            meta["format"] = "gradserve-checkpoint-1"
            del meta["requests"], meta["torch"]
            for key in [k for k in tensors if k.startswith(("grad.", "requests."))]:
                del tensors[key]

        _rewrite(tmp_path / "old.safetensors", downgrade)
        loaded = client.load_checkpoint("old", model_id="copy")
        assert loaded.info.step == 1
        assert all(torch.equal(loaded.parameters()[k], v) for k, v in params.items())


def test_checkpoint_after_a_scheduled_train_loads_and_continues(make_server: Any,
                                                                  tmp_path: Path) -> None:
    """A Train run with a schedule leaves initial_lr in the optimizer's param_groups (as a
    local scheduler does): the checkpoint keeps it, loads, and the next step equals local."""
    server = make_server(state_dir=str(tmp_path))
    X, y = _data()
    with Client(f"127.0.0.1:{server.port}") as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0)
        list(m.train(X, y, max_steps=3, batch_size=10, schedule={"type": "step", "step_size": 1,
                                                                  "gamma": 0.5}))
        m.save_checkpoint("sched")
        restored = client.load_checkpoint("sched", model_id="sched-restored")
        groups = restored.optimizer_state().param_groups
        assert groups[0]["initial_lr"] == OPTIMIZER["lr"]
        assert groups[0]["lr"] == OPTIMIZER["lr"] * 0.5 ** 3
        a = m.backward(X[:4], y[:4], step=True, return_grads=False)
        b = restored.backward(X[:4], y[:4], step=True, return_grads=False)
        assert a.loss == b.loss
        for name, value in m.parameters().items():
            assert torch.equal(restored.parameters()[name], value), name
