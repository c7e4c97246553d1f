"""Exactly-once retries: ids scoped by method, a reused id with another payload refused, the window
bounded by bytes, and the window kept across a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gradserve import Client, codec
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer
from gradserve_server.core.errors import FailedPrecondition, InvalidArgument
from gradserve_server.core.ids import check_id
from gradserve_server.core.request_ids import RequestIdWindow, fingerprint

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
WIDE = [{"type": "Linear", "in_features": 256, "out_features": 256}]  # 256 KiB of gradients


def _t(x: torch.Tensor) -> pb.Tensor:
    return codec.encode(x)


def _backward(model_id: str, request_id: str, x: torch.Tensor, y: torch.Tensor,
              **flags: Any) -> pb.BackwardRequest:
    return pb.BackwardRequest(model_id=model_id, inputs=[_t(x)], target=_t(y),
                              request_id=request_id, **flags)


def _same(a: Any, b: Any) -> bool:
    """Replies as bytes: large ones arrive framed (payloads beside the message)."""
    return bool(a.SerializeToString() == b.SerializeToString())


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_ids_are_scoped_by_method(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    stub = client._stub
    x, y = torch.ones(1, 2), torch.zeros(1, 1)
    first = stub.Backward(_backward(m.id, "shared", x, y))
    # a Step reusing the Backward's id is its own call: it steps (it used to answer INTERNAL)
    assert stub.Step(pb.StepRequest(model_id=m.id, request_id="shared")).step == 1
    # a Step reusing a ZeroGrad's id steps too (it used to answer OK without stepping)
    stub.ZeroGrad(pb.ZeroGradRequest(model_id=m.id, request_id="zg"))
    assert stub.Step(pb.StepRequest(model_id=m.id, request_id="zg")).step == 2
    assert m.refresh().step == 2
    # and each is still answered once per method
    assert _same(stub.Backward(_backward(m.id, "shared", x, y)), first)
    assert stub.Step(pb.StepRequest(model_id=m.id, request_id="shared")).step == 1


@pytest.mark.hostile("specs, options, ids")
def test_client_reuses_an_id_with_another_payload(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0)
    stub = client._stub
    x, y = torch.ones(1, 2), torch.zeros(1, 1)
    stub.Backward(_backward(m.id, "r-1", x, y, step=True))
    before = m.parameters()
    code, details = _code(lambda: stub.Backward(_backward(m.id, "r-1", x * 2, y, step=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id 'r-1'" in details and "different payload" in details
    # no gradients are left after the step, so this Step leaves the parameters as they are
    assert stub.Step(pb.StepRequest(model_id=m.id, request_id="s")).step == 2
    code, details = _code(lambda: stub.Step(pb.StepRequest(model_id=m.id, request_id="s",
                                                           keep_grad=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "request_id 's'" in details
    assert m.refresh().step == 2  # r-1 and s, nothing else
    after = m.parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the reuse was not applied
    # other clients are unaffected
    assert client.create_model(layers=LINEAR, seed=0).forward(x).shape == (1, 1)


def test_window_is_bounded_by_bytes_and_refuses_to_reapply_dropped_replies(
        make_server: Callable[..., GradServer]) -> None:
    server = make_server(request_id_window_mb=1)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        m = client.create_model(layers=WIDE, loss="mse", seed=0)
        stub = client._stub
        x, y = torch.ones(4, 256), torch.zeros(4, 256)
        replies = [stub.Backward(_backward(m.id, f"b{i}", x, y, return_grads=True))
                   for i in range(20)]  # 20 x 256 KiB of gradients
        window = server.core.models.get(m.id).requests
        assert len(window) == 20
        assert window.nbytes <= 1024 * 1024
        # the newest reply is kept whole: its retry gets it, bit for bit
        assert _same(stub.Backward(_backward(m.id, "b19", x, y, return_grads=True)),
                     replies[19])
        # the oldest was dropped: its retry is refused and not applied again
        grads_before = m.grads()
        code, details = _code(lambda: stub.Backward(_backward(m.id, "b0", x, y,
                                                              return_grads=True)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "already applied" in details and "--request-id-window-mb" in details
        after = m.grads()
        assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(grads_before[k]))
                   for k in after)


def test_window_keeps_replies_across_a_restart(make_server: Callable[..., GradServer],
                                               tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    x, y = torch.ones(3, 2), torch.zeros(3, 1)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.1},
                            seed=0, model_id="m")
        req = _backward("m", "b-1", x, y, return_grads=True, return_input_grads=True,
                        return_output=True, step=True)
        first = client._stub.Backward(req)
        zero = pb.ZeroGradRequest(model_id="m", request_id="z-1")
        client._stub.ZeroGrad(zero)
    assert server.drain(grace=1).ok
    second = make_server(state_dir=str(tmp_path))
    with Client(f"127.0.0.1:{second.port}", timeout=30) as client:
        assert _same(client._stub.Backward(req), first)
        client._stub.ZeroGrad(zero)
        assert client.model("m").info.step == 1
        code, _ = _code(lambda: client._stub.Backward(_backward("m", "b-1", x + 1, y, step=True)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------------------ unit


def test_window_unit_bounds_and_order() -> None:
    window = RequestIdWindow(max_entries=3, max_bytes=2 * 1024 + 3 * 256)
    calls: list[int] = []

    def run(rid: str, n: int) -> Any:
        return window.run("Backward", rid, lambda: fingerprint(rid),
                          lambda: calls.append(n) or torch.zeros(256))  # 1 KiB reply

    for i in range(3):
        run(f"r{i}", i)
    assert calls == [0, 1, 2] and len(window) == 3
    assert window.nbytes <= window.max_bytes  # r0's reply was dropped to fit 2 KiB
    with pytest.raises(FailedPrecondition, match="already applied"):
        run("r0", 99)
    assert torch.equal(run("r2", 99), torch.zeros(256)) and calls == [0, 1, 2]
    run("r3", 3)  # the count bound forgets r0 entirely
    assert len(window) == 3
    run("r0", 4)
    assert calls == [0, 1, 2, 3, 4]


def test_fingerprint_sees_dtype_shape_and_bytes() -> None:
    big = torch.zeros(1 << 20)
    changed = big.clone()
    changed[-1] = 1.0  # the last block is always sampled
    assert fingerprint(big) != fingerprint(changed)
    assert fingerprint(big) == fingerprint(big.clone())
    assert fingerprint(torch.zeros(2)) != fingerprint(torch.zeros(2, dtype=torch.float64))
    assert fingerprint(torch.zeros(2)) != fingerprint(torch.zeros(1, 2))
    assert fingerprint(torch.zeros(2, dtype=torch.bfloat16)) != fingerprint(torch.zeros(1))
    assert fingerprint(True) != fingerprint(1) != fingerprint("1")


@pytest.mark.hostile("specs, options, ids")
def test_ids_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        check_id("model\n", "model_id")
    assert check_id("model", "model_id") == "model"
