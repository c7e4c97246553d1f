"""Checked by mypy in tests/test_typing.py, never run: what the SDK's calls return to a type
checker. A line ending in `# E: code` must get exactly that mypy error; no other line any."""

from __future__ import annotations

from typing import Any, assert_type

import numpy as np
import torch
from gradserve import (
    AsyncClient,
    AsyncRemoteModel,
    AsyncTrainRun,
    BackwardResult,
    CheckpointInfo,
    Client,
    DatasetInfo,
    ForwardResult,
    History,
    ModelInfo,
    OptimizerState,
    RemoteModel,
    StreamStep,
    TrainEvent,
    TrainRun,
)

LINEAR: list[dict[str, Any]] = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def sync_calls(client: Client, x: torch.Tensor, y: np.ndarray) -> None:
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    assert_type(m, RemoteModel)
    assert_type(m.forward(x), torch.Tensor)
    assert_type(m.forward(x, retain_graph=True), ForwardResult)
    assert_type(m.forward(x, retain_graph=True).output, torch.Tensor)
    assert_type(m.backward(x, y), BackwardResult)
    assert_type(m.backward(x, y, return_grads=True).grads, dict[str, torch.Tensor])
    assert_type(m.step(), int)
    assert_type(m.zero_grad(), None)
    assert_type(m.parameters(), dict[str, torch.Tensor])
    assert_type(m.grads(["0.weight"]), dict[str, torch.Tensor])
    assert_type(m.set_parameters({"0.bias": y}), None)
    assert_type(m.optimizer_state(), OptimizerState)
    assert_type(m.optimizer_state(["0.weight"]).state, dict[str, dict[str, torch.Tensor]])
    assert_type(m.refresh(), ModelInfo)
    assert_type(m.wait_idle(timeout=1.0), ModelInfo)
    assert_type(m.train(x, y, epochs=2, batch_size=4), TrainRun)
    for event in m.train(x, y, epochs=2):
        assert_type(event, TrainEvent)
    assert_type(m.fit(x, y, epochs=2), History)
    for result in m.train_stream([(x, y)]):
        assert_type(result, StreamStep)
    assert_type(m.save_checkpoint("c"), CheckpointInfo)
    assert_type(m.delete(), None)
    assert_type(client.model("m"), RemoteModel)
    assert_type(client.list_models(), list[RemoteModel])
    assert_type(client.load_checkpoint("c"), RemoteModel)
    assert_type(client.list_checkpoints(), list[CheckpointInfo])
    assert_type(client.upload_dataset(y, y), DatasetInfo)
    assert_type(client.list_datasets(), list[DatasetInfo])
    assert_type(client.health(), str)
    assert_type(client.wait_ready(), None)
    several = Client(["10.0.0.1:50051", "10.0.0.2:50051"])
    assert_type(several.servers, tuple[str, ...])
    assert_type(several.server_of("m"), str)
    assert_type(several.health_by_server(), dict[str, str])


async def async_calls(client: AsyncClient, x: torch.Tensor, y: np.ndarray) -> None:
    m = await client.create_model(layers=LINEAR, loss="mse", seed=0)
    assert_type(m, AsyncRemoteModel)
    assert_type(await m.forward(x), torch.Tensor)
    assert_type(await m.forward(x, retain_graph=True), ForwardResult)
    assert_type(await m.backward(x, y), BackwardResult)
    assert_type(await m.step(keep_grad=True), int)
    assert_type(await m.parameters(buffers=True), dict[str, torch.Tensor])
    assert_type(await m.optimizer_state(), OptimizerState)
    assert_type(await m.refresh(), ModelInfo)
    assert_type(await m.wait_idle(), ModelInfo)
    assert_type(m.train(x, y, epochs=2), AsyncTrainRun)
    async for event in m.train(x, y, epochs=2):
        assert_type(event, TrainEvent)
    assert_type(await m.fit(x, y, epochs=2), History)
    async for result in m.train_stream([(x, y)]):
        assert_type(result, StreamStep)
    assert_type(await client.model("m"), AsyncRemoteModel)
    assert_type(await client.list_models(), list[AsyncRemoteModel])
    assert_type(await client.upload_dataset(y), DatasetInfo)
    assert_type(await client.health(), str)
    assert_type(await client.health_by_server(), dict[str, str])
    assert_type(client.server_of("m"), str)


def wrong_calls(client: Client, m: RemoteModel, x: torch.Tensor) -> None:
    m.step(keep_grad="yes")  # E: arg-type
    m.backward(x, x, return_gradz=True)  # E: call-arg
    client.create_model(layer=LINEAR)  # E: call-arg
    client.create_model(layers=LINEAR, seed="0")  # E: arg-type
    m.train(x, x, epochs=1.5)  # E: arg-type
    Client(("a:1", 2))  # E: arg-type
