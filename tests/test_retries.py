"""Retries and deadlines, counted on a server that fails on purpose.

One mechanism: `retries` is the number of attempts after the first, for calls safe to repeat
(the methods service_config.json names, Forward only in eval mode), on UNAVAILABLE and on a
CANCELLED the client did not cause;
`timeout` is one deadline over every attempt and the waits between them; DEADLINE_EXCEEDED is
never retried. Both clients, the same numbers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from gradserve import (
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    InternalError,
    UnavailableError,
    _channel,
    codec,
)
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from grpc_health.v1 import health_pb2

REPLIES: dict[str, bytes] = {
    "GetModel": pb.ModelInfo(model_id="m").SerializeToString(),
    "CreateModel": pb.ModelInfo(model_id="m").SerializeToString(),
    "ListModels": pb.ListModelsResponse().SerializeToString(),
    "Step": pb.StepResponse(step=1).SerializeToString(),
    "Forward": pb.ForwardResponse(output=codec.encode(np.ones(2, np.float32)),
                                  forward_id="f").SerializeToString(),
    "Check": health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING
                                            ).SerializeToString(),
}


class FailingServer(grpc.GenericRpcHandler):
    """Answers the first `fail` attempts of every method with `code` (after `delay` seconds),
    later ones with a canned reply, and records every attempt's method and request bytes."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, fail: int = 10**9,
                 delay: float = 0.0) -> None:
        self.code, self.fail, self.delay = code, fail, delay
        self.calls: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._answer(method, request, context))

    def _answer(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls.append((method, request))
            attempt = sum(1 for m, _ in self.calls if m == method)
        end = time.monotonic() + self.delay
        while time.monotonic() < end and context.is_active():
            time.sleep(0.01)
        if attempt <= self.fail:
            context.abort(self.code, f"failing on purpose (attempt {attempt})")
        return REPLIES[method]

    def attempts(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    def stop(self) -> None:
        self._server.stop(None)


@pytest.fixture
def failing() -> Iterator[Callable[..., FailingServer]]:
    servers: list[FailingServer] = []

    def start(**options: Any) -> FailingServer:
        servers.append(FailingServer(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def call(kind: str, server: FailingServer, fn: Callable[[Any], Any], **options: Any) -> Any:
    """fn(client) with a sync Client or an AsyncClient (awaited) on server."""
    address = f"127.0.0.1:{server.port}"
    if kind == "sync":
        with Client(address, shared_memory=False, **options) as client:
            return fn(client)

    async def main() -> Any:
        async with AsyncClient(address, **options) as client:
            return await fn(client)

    return asyncio.run(main())


def model(client: Any) -> Any:
    """A handle to model 'm' without a call (the failing server has no models)."""
    from gradserve.results import model_info

    return client._remote(model_info(pb.ModelInfo(model_id="m")))


BOTH = pytest.mark.parametrize("kind", ["sync", "async"])


@BOTH
@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_is_the_number_of_extra_attempts(failing: Callable[..., FailingServer],
                                                 kind: str, retries: int) -> None:
    server = failing()
    with pytest.raises(UnavailableError, match="failing on purpose"):
        call(kind, server, lambda c: c.model("m"), retries=retries, timeout=30)
    assert server.attempts("GetModel") == retries + 1  # not (retries + 1) * 4: one mechanism


@BOTH
def test_calls_not_safe_to_repeat_are_attempted_once(failing: Callable[..., FailingServer],
                                                     kind: str) -> None:
    server = failing()
    with pytest.raises(UnavailableError):
        call(kind, server, lambda c: c.create_model(layers=[{"type": "ReLU"}]), retries=3)
    with pytest.raises(UnavailableError):  # each attempt would keep a graph on the server
        call(kind, server, lambda c: model(c).forward(np.ones(2), retain_graph=True), retries=3)
    assert server.attempts("CreateModel") == 1 and server.attempts("Forward") == 1
    with pytest.raises(UnavailableError):  # each attempt would update BatchNorm statistics
        call(kind, server, lambda c: model(c).forward(np.ones(2)), retries=3)
    assert server.attempts("Forward") == 2
    with pytest.raises(UnavailableError):  # eval mode changes nothing: retried
        call(kind, server, lambda c: model(c).forward(np.ones(2), eval_mode=True), retries=3)
    assert server.attempts("Forward") == 2 + 4


@BOTH
def test_retries_resend_the_same_request_id(failing: Callable[..., FailingServer],
                                            kind: str) -> None:
    server = failing(fail=2)
    assert call(kind, server, lambda c: model(c).step(), retries=3) == 1
    requests = [pb.StepRequest.FromString(body) for method, body in server.calls]
    assert len(requests) == 3 and requests[0].request_id
    assert all(r == requests[0] for r in requests)  # the server applies it once (request ids)


@BOTH
def test_a_cancelled_the_client_did_not_ask_for_is_retried(
        failing: Callable[..., FailingServer], kind: str) -> None:
    """A server-side CANCELLED (gRPC dropped the call; the caller cancelled nothing) is transient
    for a call safe to repeat, like UNAVAILABLE."""
    server = failing(code=grpc.StatusCode.CANCELLED, fail=2)
    assert call(kind, server, lambda c: model(c).step(), retries=3) == 1
    assert server.attempts("Step") == 3
    server = failing(code=grpc.StatusCode.CANCELLED)
    with pytest.raises(CancelledError):
        call(kind, server, lambda c: c.model("m"), retries=1)
    assert server.attempts("GetModel") == 2


@BOTH
def test_deadline_exceeded_is_never_retried(failing: Callable[..., FailingServer],
                                            kind: str) -> None:
    slow = failing(fail=0, delay=5.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        call(kind, slow, lambda c: c.model("m"), retries=3, timeout=0.3)
    assert slow.attempts("GetModel") == 1
    assert time.monotonic() - start < 3.0  # four 0.3 s attempts plus backoff would not fit
    refused = failing(code=grpc.StatusCode.DEADLINE_EXCEEDED)  # the server says it itself
    with pytest.raises(DeadlineExceededError):
        call(kind, refused, lambda c: c.model("m"), retries=3, timeout=30)
    assert refused.attempts("GetModel") == 1


@BOTH
def test_timeout_is_one_deadline_over_attempts_and_backoff(
        failing: Callable[..., FailingServer], kind: str) -> None:
    server = failing()
    start = time.monotonic()
    with pytest.raises(UnavailableError):  # the last attempt's error, once time is up
        call(kind, server, lambda c: c.model("m"), retries=1000, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 2 <= server.attempts("GetModel") < 1000
    assert elapsed < 5.0, f"{elapsed:.1f} s for a 1 s deadline"


@BOTH
def test_other_codes_are_not_retried(failing: Callable[..., FailingServer], kind: str) -> None:
    server = failing(code=grpc.StatusCode.INTERNAL)
    with pytest.raises(InternalError):
        call(kind, server, lambda c: c.model("m"), retries=3)
    assert server.attempts("GetModel") == 1


def test_health_checks_retry_too(failing: Callable[..., FailingServer]) -> None:
    server = failing(fail=1)
    assert call("sync", server, lambda c: c.health(), retries=1) == "SERVING"
    assert server.attempts("Check") == 2


def test_negative_retries_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=-1)


def test_one_list_of_retryable_methods() -> None:
    """The service config other languages load names the methods the SDK retries; its attempt
    count is the SDK's default, and it never retries DEADLINE_EXCEEDED."""
    (entry,) = [m for m in json.loads(_channel.SERVICE_CONFIG)["methodConfig"]
                if "retryPolicy" in m]
    assert {(n["service"], n["method"]) for n in entry["name"]} == _channel.POLICY.methods
    assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert entry["retryPolicy"]["maxAttempts"] == _channel.DEFAULT_RETRIES + 1
    assert Client.__init__.__kwdefaults__["retries"] == _channel.DEFAULT_RETRIES
    options = dict(_channel.options(4))
    assert "grpc.service_config" not in options  # the channel itself retries nothing
    with pytest.raises(ValueError, match="DEADLINE_EXCEEDED"):
        _channel.retry_policy(json.dumps({"methodConfig": [{
            "name": [{"service": "s"}], "retryPolicy": {
                "maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "1s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["DEADLINE_EXCEEDED"]}}]}))


# ------------------------------------------------------------------ against the real server


class _LostReply(grpc.RpcError):
    """What the SDK sees when gRPC drops a call whose handler already ran on the server."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "dropped under load"


def test_a_training_mode_forward_whose_reply_is_lost_is_not_applied_twice(
        client: Client) -> None:
    """A training-mode Forward changes the model (BatchNorm statistics, dropout draws): after
    a lost reply it is not repeated, and the model holds what one local forward leaves."""
    from torch import nn

    m = client.create_model(layers=[{"type": "Linear", "in_features": 3, "out_features": 4},
                                    {"type": "BatchNorm1d", "num_features": 4}], seed=0)
    real = client._attempt
    attempts: list[str] = []

    def lose_the_first_forward_reply(item: Any) -> Any:
        reply = real(item)
        attempts.append(item.op.rpc)
        if item.op.rpc == "Forward" and attempts.count("Forward") in (1, 2):  # 1 of each
            raise _LostReply()
        return reply

    client._attempt = lose_the_first_forward_reply  # type: ignore[method-assign]
    x = torch.randn(8, 3)
    try:
        with pytest.raises(CancelledError):
            m.forward(x)
        assert attempts.count("Forward") == 1
        m.forward(x, eval_mode=True)  # changes nothing: retried after its lost reply
        assert attempts.count("Forward") == 3
    finally:
        client._attempt = real  # type: ignore[method-assign]
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    local(x)
    got = m.parameters(buffers=True)
    assert int(got["1.num_batches_tracked"]) == 1
    assert torch.equal(got["1.running_mean"], local[1].running_mean)
    m.delete()


def test_a_call_cut_short_by_close_is_not_retried(make_server: Callable[..., Any]) -> None:
    """close() from another thread ends the call in flight: that CANCELLED is the client's own
    doing, so it is not retried, and the caller gets a GradServeError saying so."""
    server = make_server()
    c = Client(f"127.0.0.1:{server.port}", shared_memory=False)
    m = c.create_model(layers=[{"type": "Linear", "in_features": 512, "out_features": 512}],
                       loss="mse", seed=0)
    real = c._attempt
    attempts: list[str] = []

    def counted(item: Any) -> Any:
        attempts.append(item.op.rpc)
        return real(item)

    c._attempt = counted  # type: ignore[method-assign]
    x, y = torch.randn(20000, 512), torch.randn(20000, 512)
    timer = threading.Timer(0.2, c.close)
    timer.start()
    with pytest.raises(CancelledError, match="client was closed"):
        m.backward(x, y, step=True)
    timer.join()
    assert attempts == ["Backward"]


def test_an_async_call_cut_short_by_close_raises_a_gradserve_error(
        make_server: Callable[..., Any]) -> None:
    """grpc.aio ends a closed channel's calls with asyncio.CancelledError; a task nobody
    cancelled gets the SDK's CancelledError instead (asyncio would read the other as 'this task
    was cancelled')."""
    server = make_server()

    async def main() -> BaseException | None:
        ac = AsyncClient(f"127.0.0.1:{server.port}")
        am = await ac.create_model(
            layers=[{"type": "Linear", "in_features": 512, "out_features": 512}], loss="mse")
        task = asyncio.ensure_future(am.backward(torch.randn(20000, 512),
                                                 torch.randn(20000, 512), step=True))
        await asyncio.sleep(0.2)
        await ac.close()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - what the task ended with is the result
            return exc
        return None

    error = asyncio.run(main())
    assert error is None or isinstance(error, CancelledError), repr(error)
