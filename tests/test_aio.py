"""AsyncClient through a real server: the same calls and results as the sync Client, async
training with cancellation, streams, errors. Coroutines run under asyncio.run (no plugin)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import gradserve
import numpy as np
import pytest
import torch
from gradserve import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from gradserve.aio import AsyncClient, AsyncRemoteModel, AsyncTrainRun
from gradserve_server.app import GradServer

T = TypeVar("T")

LAYERS = [{"type": "Linear", "in_features": 3, "out_features": 4}, {"type": "Tanh"},
          {"type": "Linear", "in_features": 4, "out_features": 1}]
SPEC: dict[str, Any] = {"layers": LAYERS, "loss": "mse",
                        "optimizer": {"type": "sgd", "lr": 0.05}, "seed": 7}


def run(fn: Callable[[AsyncClient], Coroutine[Any, Any, T]], server: GradServer,
        **options: Any) -> T:
    """Run fn(client) on a fresh event loop with an AsyncClient that is closed afterwards."""

    async def main() -> T:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30, **options) as client:
            return await fn(client)

    return asyncio.run(main())


def data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return x, (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1).astype(np.float32)


def test_exported_from_package() -> None:
    assert gradserve.AsyncClient is AsyncClient
    assert gradserve.AsyncTrainRun is AsyncTrainRun
    assert gradserve.AsyncRemoteModel is AsyncRemoteModel


def test_calls_match_the_sync_client(server: GradServer, client: Client) -> None:
    x, y = data()
    sync_model = client.create_model(model_id="sync", **SPEC)
    sync_out = sync_model.forward(x)
    sync_back = sync_model.backward(x, y, return_grads=True, return_input_grads=True)
    sync_step = sync_model.step()
    sync_params = sync_model.parameters()

    async def body(c: AsyncClient) -> dict[str, Any]:
        assert await c.health() == "SERVING"
        await c.wait_ready(timeout=5)
        m = await c.create_model(model_id="async", **SPEC)
        assert isinstance(m, AsyncRemoteModel) and m.id == "async"
        got: dict[str, Any] = {"out": await m.forward(x)}
        got["back"] = await m.backward(x, y, return_grads=True, return_input_grads=True)
        got["grads_before_step"] = await m.grads()
        got["step"] = await m.step()
        got["params"] = await m.parameters()
        got["info"] = await m.refresh()
        got["ids"] = sorted(h.id for h in await c.list_models())
        got["handle"] = (await c.model("async")).info.step
        await m.zero_grad()
        await m.set_parameters({"2.bias": torch.tensor([0.25])})
        got["bias"] = (await m.parameters(["2.bias"]))["2.bias"]
        await m.delete()
        got["after_delete"] = sorted(h.id for h in await c.list_models())
        return got

    got = run(body, server)
    torch.testing.assert_close(got["out"], sync_out, rtol=0, atol=0)
    assert got["back"].loss == sync_back.loss
    for name, grad in sync_back.grads.items():
        torch.testing.assert_close(got["back"].grads[name], grad, rtol=0, atol=0)
        torch.testing.assert_close(got["grads_before_step"][name], grad, rtol=0, atol=0)
    torch.testing.assert_close(got["back"].input_grads[0], sync_back.input_grads[0],
                               rtol=0, atol=0)
    assert got["step"] == sync_step == 1
    assert list(got["params"]) == list(sync_params)
    for name, value in sync_params.items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=0)
    assert got["info"].step == 1 and got["handle"] == 1
    assert got["ids"] == ["async", "sync"]
    assert got["bias"].tolist() == [0.25]
    assert got["after_delete"] == ["sync"]


def test_errors_map_to_the_same_exception_family(server: GradServer) -> None:
    async def body(c: AsyncClient) -> None:
        with pytest.raises(NotFoundError, match="nope"):
            await c.model("nope")
        with pytest.raises(InvalidArgumentError):
            await c.create_model(layers=[{"type": "NoSuchLayer"}])
        with pytest.raises(ValueError, match="exactly one"):
            c.create_model()  # checked while building the request, before any I/O
        m = await c.create_model(**SPEC)
        with pytest.raises(InvalidArgumentError, match="input"):
            await m.forward(np.zeros((2, 5), np.float32))

    run(body, server)


def test_unreachable_server_raises_unavailable_after_retries() -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=5, retries=1) as c:
            with pytest.raises(UnavailableError):
                await c.list_models()

    asyncio.run(main())


def test_polling_helpers_are_shared_by_both_clients(server: GradServer, client: Client) -> None:
    x, y = data(64)
    # wait_ready gives up with TimeoutError on both clients when nothing answers.
    with Client("127.0.0.1:1", retries=0) as nowhere, pytest.raises(TimeoutError, match="SERVING"):
        nowhere.wait_ready(timeout=0.3)

    async def unreachable() -> None:
        async with AsyncClient("127.0.0.1:1", retries=0) as c:
            with pytest.raises(TimeoutError, match="SERVING"):
                await c.wait_ready(timeout=0.3)

    asyncio.run(unreachable())
    # wait_idle on the sync client: after breaking out of a run the model is released.
    m = client.create_model(**SPEC)
    for event in m.train(x, y, epochs=10_000, batch_size=1, log_every_steps=1):
        if event.step >= 2:
            break
    info = m.wait_idle(timeout=10)
    assert not info.training and info.step >= event.step
    assert m.step() == info.step + 1


def test_token_is_sent(make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    server = make_server(auth_token_file=str(tokens))

    async def denied(c: AsyncClient) -> None:
        with pytest.raises(UnauthenticatedError):
            await c.list_models()

    async def allowed(c: AsyncClient) -> list[AsyncRemoteModel]:
        return await c.list_models()

    run(denied, server)
    assert run(allowed, server, token="s3cret") == []


def test_train_events_and_fit_match_the_sync_client(server: GradServer,
                                                    client: Client) -> None:
    x, y = data()
    options: dict[str, Any] = {"epochs": 3, "batch_size": 8, "shuffle": True, "seed": 1,
                               "log_every_steps": 2}
    sync_events = list(client.create_model(model_id="s", **SPEC).train(x, y, **options))
    sync_history = client.create_model(model_id="s2", **SPEC).fit(x, y, **options)

    async def body(c: AsyncClient) -> tuple[list[Any], Any, Any]:
        m = await c.create_model(model_id="a", **SPEC)
        run_ = m.train(x, y, **options)
        assert isinstance(run_, AsyncTrainRun)
        events = [e async for e in run_]
        assert run_.summary == events[-1].summary
        history = await (await c.create_model(model_id="a2", **SPEC)).fit(x, y, **options)
        return events, history, await m.refresh()

    events, history, info = run(body, server)
    assert [(e.kind, e.step, e.epoch, e.batch_loss, e.epoch_loss) for e in events] == \
        [(e.kind, e.step, e.epoch, e.batch_loss, e.epoch_loss) for e in sync_events]
    assert events[-1].summary.stop_reason == "completed"
    assert info.step == events[-1].summary.model_step == 9
    assert history.epoch_losses == sync_history.epoch_losses
    assert len(history.epoch_losses) == 3


async def _last_event_then_break(m: AsyncRemoteModel, x: np.ndarray, y: np.ndarray,
                                 steps: int) -> Any:
    last = None
    async for event in m.train(x, y, epochs=10_000, batch_size=1, log_every_steps=1):
        last = event
        if event.step >= steps:
            break  # leaving the loop cancels the call
    return last


def _check_released(last: Any, info: Any, planned: int) -> None:
    # The server stops at a step boundary: at the last step reported, or after a step that was
    # already under way when the cancel arrived; never near the planned end.
    assert last.kind == "progress" and last.summary is None
    assert not info.training
    assert last.step <= info.step < planned


def test_breaking_out_of_async_for_cancels_the_run(server: GradServer) -> None:
    x, y = data(64)
    planned = 10_000 * 64

    async def body(c: AsyncClient) -> None:
        m = await c.create_model(**SPEC)
        last = await _last_event_then_break(m, x, y, steps=3)
        info = await m.wait_idle(timeout=10)
        _check_released(last, info, planned)
        # The model answers at once: a mutating call is accepted and counts from there.
        out = await m.backward(x, y, step=True)
        assert out.step == info.step + 1
        # And a new run can start; its first event continues the step count.
        async for event in m.train(x, y, epochs=1, batch_size=16, log_every_steps=1):
            assert event.step == info.step + 2
            break
        assert (await m.wait_idle(timeout=10)).training is False

    run(body, server)


def test_cancel_method_and_async_with_stop_the_run(server: GradServer) -> None:
    x, y = data(64)
    planned = 10_000 * 64

    async def body(c: AsyncClient) -> None:
        m = await c.create_model(**SPEC)
        run_ = m.train(x, y, epochs=10_000, batch_size=1, log_every_steps=1)
        seen = []
        async for event in run_:
            seen.append(event)
            if len(seen) == 2:
                run_.cancel()  # the loop then ends without an error
        assert run_.summary is None and run_.events == seen
        _check_released(seen[-1], await m.wait_idle(timeout=10), planned)

        async with m.train(x, y, epochs=10_000, batch_size=1, log_every_steps=1) as run2:
            async for event in run2:
                first = event
                break
        info = await m.wait_idle(timeout=10)
        _check_released(first, info, planned + info.step)
        assert (await m.step()) == info.step + 1

    run(body, server)


def test_a_second_run_is_refused_while_one_is_active(server: GradServer) -> None:
    x, y = data(64)

    async def body(c: AsyncClient) -> None:
        m = await c.create_model(**SPEC)
        async with m.train(x, y, epochs=10_000, batch_size=1, log_every_steps=1) as first:
            async for _ in first:
                with pytest.raises(FailedPreconditionError, match="training"):
                    async for _ in m.train(x, y, epochs=1):
                        pass
                break
        await m.wait_idle(timeout=10)

    run(body, server)


def test_train_stream_takes_async_batches(server: GradServer, client: Client) -> None:
    x, y = data()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    expected = [s.loss for s in client.create_model(**SPEC).train_stream(iter(batches))]

    async def produce() -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        for batch in batches:
            await asyncio.sleep(0)
            yield batch

    async def body(c: AsyncClient) -> tuple[list[Any], list[Any]]:
        m = await c.create_model(**SPEC)
        from_async = [s async for s in m.train_stream(produce())]
        m2 = await c.create_model(**SPEC)
        from_sync = [s async for s in m2.train_stream(batches)]
        return from_async, from_sync

    from_async, from_sync = run(body, server)
    assert [s.loss for s in from_async] == [s.loss for s in from_sync] == expected
    assert [s.step for s in from_async] == [1, 2, 3]


def test_datasets_and_checkpoints(make_server: Callable[..., GradServer],
                                  tmp_path: Path) -> None:
    server = make_server(state_dir=str(tmp_path))
    x, y = data()

    async def body(c: AsyncClient) -> None:
        ds = await c.upload_dataset(x, y, dataset_id="d1", chunk_bytes=100)
        assert (ds.dataset_id, ds.num_samples) == ("d1", 24)
        assert [d.dataset_id for d in await c.list_datasets()] == ["d1"]
        m = await c.create_model(model_id="m", **SPEC)
        history = await m.fit(dataset="d1", epochs=2, batch_size=12)
        assert history.summary.model_step == 4
        saved = await m.save_checkpoint("ck")
        assert (saved.name, saved.model_id, saved.step) == ("ck", "m", 4)
        assert [ck.name for ck in await c.list_checkpoints()] == ["ck"]
        before = await m.parameters()
        await m.step()  # moves nothing (no grads) but counts
        restored = await c.load_checkpoint("ck", "m2")
        assert restored.info.step == 4
        after = await restored.parameters()
        for name, value in before.items():
            torch.testing.assert_close(after[name], value, rtol=0, atol=0)
        await c.delete_dataset("d1")
        assert await c.list_datasets() == []
        await c.delete_checkpoint("ck")
        assert await c.list_checkpoints() == []

    run(body, server)
