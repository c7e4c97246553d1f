"""Each configured limit answers RESOURCE_EXHAUSTED with a message naming the limit and its
value, and the server keeps working afterwards. (max_models and max_parameters: test_errors.)"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from gradserve import Client, FailedPreconditionError, ResourceExhaustedError
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
MIB = 1024 * 1024


def _alive(client: Client) -> None:
    assert client.health() == "SERVING"
    m = client.create_model(layers=LINEAR, loss="mse", seed=0)
    assert m.forward(torch.ones(3, 2)).shape == (3, 1)
    assert m.backward(torch.ones(3, 2), torch.zeros(3, 1), step=True).step == 1
    m.delete()


def _client(server: Any) -> Client:
    return Client(f"127.0.0.1:{server.port}", timeout=60, retries=0)


def test_max_request_mb(make_server: Any) -> None:
    server = make_server(max_request_mb=1)
    big = torch.zeros(MIB // 4 + 1024)  # just over 1 MiB of tensor data
    with _client(server) as client:
        m = client.create_model(expression="sum(w * x)", inputs=["x"], parameters={"w": 1.0})
        calls = {
            "Forward": lambda: m.forward(big),
            "Backward": lambda: m.backward(big),
            "CreateModel": lambda: client.create_model(expression="sum(w)",
                                                       parameters={"w": big}),
            "Train": lambda: list(m.train(big.reshape(-1, 1), max_steps=1)),
            "SetParameters": lambda: m.set_parameters({"w": big}),
        }
        for name, call in calls.items():
            with pytest.raises(ResourceExhaustedError) as err:
                call()
            assert "the limit (max_request_mb) is 1 MiB" in err.value.details, name
        assert m.forward(torch.ones(4)).item() == 4.0  # a request under the limit still works
        _alive(client)


def test_max_graph_mb(make_server: Any) -> None:
    server = make_server(max_graph_mb=1)
    with _client(server) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 1, "out_features": 64}],
                                seed=0)
        small = m.forward(torch.ones(2, 1), retain_graph=True).forward_id
        # output 5000 x 64 floats + input: about 1.3 MB retained, over the 1 MiB budget
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(5000, 1), retain_graph=True)
        assert "(max_graph_mb) is 1 MiB" in err.value.details
        assert "holds 1300000 bytes" in err.value.details
        # The refused graph cost the model none of the graphs it held.
        assert m.refresh().retained_graphs == 1
        r = m.backward(forward_id=small, grad_output=torch.ones(2, 64), return_grads=True)
        assert torch.equal(r.grads["0.weight"], torch.full((64, 1), 2.0))
        # Graphs that fit one by one evict the oldest to stay within the budget.
        ids = [m.forward(torch.ones(1500, 1), retain_graph=True).forward_id for _ in range(3)]
        assert m.refresh().retained_graphs == 2
        with pytest.raises(FailedPreconditionError, match="max_graph_mb=1 MiB"):
            m.backward(forward_id=ids[0], grad_output=torch.ones(1500, 64))
        m.backward(forward_id=ids[2], grad_output=torch.ones(1500, 64))
        _alive(client)


def test_max_train_runs(make_server: Any) -> None:
    server = make_server(max_train_runs=1)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    with _client(server) as client:
        a = client.create_model(layers=LINEAR, loss="mse", seed=0)
        b = client.create_model(layers=LINEAR, loss="mse", seed=1)
        run = a.train(x, y, epochs=1_000_000, batch_size=4, log_every_steps=1)
        events = iter(run)
        next(events)  # run A holds the only slot now
        with pytest.raises(ResourceExhaustedError) as err:
            list(b.train(x, y, epochs=1))
        assert "the limit (max_train_runs) is 1" in err.value.details
        with pytest.raises(ResourceExhaustedError, match=r"\(max_train_runs\) is 1"):
            list(b.train_stream([(x[:4], y[:4])]))
        assert b.refresh().step == 0  # refused runs took no step
        run.cancel()
        for _ in events:
            pass
        a.wait_idle()
        # The slot is free again: B trains to completion.
        done = list(b.train(x, y, epochs=1, batch_size=8))[-1]
        assert done.summary.stop_reason == "completed" and done.summary.steps == 4
        _alive(client)


def test_max_dataset_mb(make_server: Any) -> None:
    server = make_server(max_dataset_mb=1)
    x = torch.zeros(150_000, 1)  # 600 kB; two do not fit in 1 MiB
    with _client(server) as client:
        first = client.upload_dataset(x, dataset_id="first")
        assert first.num_bytes == 600_000
        with pytest.raises(ResourceExhaustedError) as err:
            client.upload_dataset(x, dataset_id="second")
        assert "the limit (max_dataset_mb) is 1 MiB" in err.value.details
        assert [d.dataset_id for d in client.list_datasets()] == ["first"]
        # The refusal reserved nothing: after deleting the first, the second fits.
        client.delete_dataset("first")
        assert client.upload_dataset(x, dataset_id="second").num_samples == 150_000
        _alive(client)


def test_message_over_max_message_mb(make_server: Any) -> None:
    """grpc itself refuses a message over --max-message-mb (RESOURCE_EXHAUSTED, with the size),
    in both directions; the connection and the server go on."""
    server = make_server(max_message_mb=1)
    with _client(server) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 1, "out_features": 64}],
                                seed=0)
        big = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[MIB // 4, 1], data=bytes(MIB))
        with pytest.raises(grpc.RpcError) as err:
            client._stub.Forward(pb.ForwardRequest(model_id=m.id, inputs=[big]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details() and str(MIB) in err.value.details()
        # A reply over the limit: 5000 x 64 floats out of a 20 kB request.
        with pytest.raises(ResourceExhaustedError, match="larger than max"):
            m.forward(torch.ones(5000, 1))
        assert m.forward(torch.ones(2, 1)).shape == (2, 64)
        _alive(client)
