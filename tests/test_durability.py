"""Nothing lost: checkpoints, SIGTERM drain and restore, SIGKILL with autosave, exactly-once retries."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import nn

from gradserve import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

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


def test_sigkill_loses_at_most_the_autosave_interval(spawn_server: Any, tmp_path: Path) -> None:
    first = spawn_server("--state-dir", str(tmp_path), "--autosave-steps", "10")
    X, y = _data()
    seen = 0
    with Client(first.address) as client:
        m = client.create_model(layers=LINEAR, loss="mse", optimizer=OPTIMIZER, seed=0,
                                model_id="job")
        try:
            for event in m.train(X, y, epochs=10_000, batch_size=10, shuffle=True, seed=3,
                                 log_every_steps=1):
                seen = event.step
                if seen == 47:
                    first.signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - the stream breaks when the process dies
            pass
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
