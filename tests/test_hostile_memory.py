"""Hostile clients against the server's memory: each attack is refused with RESOURCE_EXHAUSTED
before the memory is allocated, the caller learns which budget and what is held, and the server
keeps answering everyone else.

The attacks run against a child server (spawn_server) with a small --max-memory-mb, so that a
regression can only kill that child, never the test runner. The child also gets an address-
space limit (RLIMIT_AS) a few GiB above what it uses at start: were a check to fail, the
allocation fails there instead of taking the machine's memory. Each test asserts that the
child's peak RSS (VmHWM) stayed within its budget plus a slack for what the budget does not
see (freed blocks glibc keeps in its per-thread arenas, torch's and gRPC's own buffers).
"""

from __future__ import annotations

import contextlib
import re
import resource
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ServerProcess
from gradserve import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from gradserve_server.core.budget import SMALL_BYTES, MemoryBudget
from gradserve_server.core.errors import ResourceExhausted

MIB = 1024 * 1024
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
# A Linear(1000, 5000): 5,005,000 parameters, 20 MB of float32; its gradients as much again.
WIDE = [{"type": "Linear", "in_features": 1000, "out_features": 5000}]
WIDE_BYTES = 5_005_000 * 4
# How far the child's peak RSS may rise above its budget and its level before an attack.
RSS_SLACK = 320 * MIB


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM, VmSize)."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    assert found, f"{key} not in /proc/{pid}/status"
    return int(found.group(1)) * 1024


class Guarded:
    """A child server under an address-space limit, with its RSS before the attack."""

    def __init__(self, proc: Any, budget_mb: int) -> None:
        self.proc = proc
        self.budget = budget_mb * MIB
        self.pid = proc.proc.pid
        self.address = proc.address
        # RLIMIT_AS: whatever it maps now plus 3 GiB. The attacks below would need 6-1000 GiB.
        limit = _status(self.pid, "VmSize") + 3 * 1024 * MIB
        resource.prlimit(self.pid, resource.RLIMIT_AS, (limit, limit))
        self.rss_before = _status(self.pid, "VmRSS")

    def client(self) -> Client:
        return Client(self.address, timeout=60, retries=0)

    def assert_rss_bounded(self) -> None:
        peak = _status(self.pid, "VmHWM")
        assert peak - self.rss_before < self.budget + RSS_SLACK, (
            f"peak RSS rose by {(peak - self.rss_before) / MIB:.0f} MiB; the budget is "
            f"{self.budget / MIB:.0f} MiB")
        assert self.proc.proc.poll() is None, "the server died"


@pytest.fixture
def guarded(spawn_server: Callable[..., Any]) -> Callable[..., Guarded]:
    """A child server of its own: start(*flags, budget_mb=...)."""
    def start(*args: str, budget_mb: int = 256) -> Guarded:
        return Guarded(spawn_server("--max-memory-mb", str(budget_mb), *args), budget_mb)

    return start


@pytest.fixture(scope="module")
def shared() -> Iterator[Guarded]:
    """One child server with a 256 MiB budget for the attacks that need no other flag."""
    proc = ServerProcess("--max-memory-mb", "256")
    try:
        yield Guarded(proc, 256)
    finally:
        proc.kill()


def _others_still_served(server: Guarded) -> None:
    """Another client: ListModels, and create, forward, train and delete a tiny model."""
    with server.client() as other:
        assert other.health() == "SERVING"
        other.list_models()
        m = other.create_model(layers=LINEAR, loss="mse", seed=0)
        assert m.forward(torch.ones(3, 2)).shape == (3, 1)
        assert m.backward(torch.ones(3, 2), torch.zeros(3, 1), step=True).step == 1
        m.delete()
    server.assert_rss_bounded()


def _refused(err: Any) -> str:
    details: str = err.value.details
    assert "memory budget (max_memory_mb)" in details, details
    return details


# ---------------------------------------------------------------------- outputs and intermediates


@pytest.mark.hostile("memory")
def test_client_multiplies_a_column_by_a_row_into_ten_gigabytes(shared: Guarded) -> None:
    """x*y with [50000,1] and [1,50000]: a 400 KB request whose output takes 10 GB."""
    server = shared
    with server.client() as client:
        m = client.create_model(expression="x * y", inputs=["x", "y"])
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(50_000, 1), torch.ones(1, 50_000))
        details = _refused(err)
        assert "Forward on model" in details and "[[50000, 1], [1, 50000]]" in details
        assert "(10000000000 bytes)" in details  # the output, estimated before computing
        # The same model still serves what fits.
        assert m.forward(torch.ones(4, 1), torch.ones(1, 4)).shape == (4, 4)
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_matmuls_an_outer_product_of_forty_thousand(shared: Guarded) -> None:
    server = shared
    with server.client() as client:
        m = client.create_model(expression="matmul(x, y)", inputs=["x", "y"])
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(40_000, 1), torch.ones(1, 40_000))
        assert "(6400000000 bytes)" in _refused(err)
        with pytest.raises(ResourceExhaustedError):  # the fused Backward is estimated too
            m.backward((torch.ones(40_000, 1), torch.ones(1, 40_000)))
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_asks_conv_transpose_with_a_huge_stride(shared: Guarded) -> None:
    server = shared
    with server.client() as client:
        m = client.create_model(layers=[{"type": "ConvTranspose2d", "in_channels": 1,
                                         "out_channels": 1, "kernel_size": 3,
                                         "stride": 60_000}])
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(1, 1, 10, 10))
        _refused(err)
        with pytest.raises(ResourceExhaustedError):
            m.forward(torch.ones(1, 1, 10, 10), retain_graph=True)
        assert m.forward(torch.ones(1, 1, 1, 1)).shape == (1, 1, 3, 3)
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_widens_a_hidden_layer_in_backward_and_train(shared: Guarded) -> None:
    """A small model whose hidden activations for one batch exceed the budget: refused before
    the first step in Backward, Train and TrainStream (the model's step stays 0)."""
    server = shared
    layers = [{"type": "Linear", "in_features": 1, "out_features": 100_000},
              {"type": "ReLU"}, {"type": "Linear", "in_features": 100_000, "out_features": 1}]
    x, y = torch.ones(1000, 1), torch.zeros(1000, 1)  # activations: 2 x 400 MB
    with server.client() as client:
        m = client.create_model(layers=layers, loss="mse", seed=0)
        with pytest.raises(ResourceExhaustedError) as err:
            m.backward(x, y)
        assert "Backward on model" in _refused(err)
        with pytest.raises(ResourceExhaustedError) as err:
            list(m.train(x, y, epochs=1, batch_size=1000))
        assert "Train on model" in _refused(err)
        with pytest.raises(ResourceExhaustedError) as err:
            list(m.train_stream([(x, y)]))
        assert "TrainStream on model" in _refused(err)
        assert m.refresh().step == 0
        # Smaller batches of the same data fit: the run is estimated by its batch.
        done = list(m.train(x, y, epochs=1, batch_size=10))[-1]
        assert done.summary.steps == 100
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_exceeds_max_compute_mb_with_one_call(guarded: Any) -> None:
    """--max-compute-mb caps one call even when the budget has room."""
    server = guarded("--max-compute-mb", "16")
    with server.client() as client:
        m = client.create_model(expression="x * y", inputs=["x", "y"])
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(2100, 1), torch.ones(1, 2100))  # 16.8 MiB
        assert "the limit for one call (max_compute_mb) is 16 MiB" in err.value.details
        assert m.forward(torch.ones(1000, 1), torch.ones(1, 1000)).shape == (1000, 1000)
    _others_still_served(server)


# ---------------------------------------------------------------------- retained graphs


@pytest.mark.hostile("memory")
def test_client_retains_graphs_whose_saved_activations_exceed_max_graph_mb(
        guarded: Any) -> None:
    """Inputs and outputs of 400 bytes, but autograd saves a [100, 4096] activation per graph:
    the per-model limit counts what autograd saves."""
    server = guarded("--max-graph-mb", "1")
    layers = [{"type": "Linear", "in_features": 1, "out_features": 4096}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 4096, "out_features": 1}]
    with server.client() as client:
        m = client.create_model(layers=layers, loss="mse", seed=0)
        with pytest.raises(ResourceExhaustedError) as err:
            m.forward(torch.ones(100, 1), retain_graph=True)
        assert "retain_graph: this graph holds 1639200 bytes" in err.value.details
        assert "(max_graph_mb) is 1 MiB" in err.value.details
        # Graphs of 40 samples (about 656 kB each) fit one at a time: each new one evicts.
        ids = [m.forward(torch.ones(40, 1), retain_graph=True).forward_id for _ in range(6)]
        assert m.refresh().retained_graphs == 1
        with pytest.raises(FailedPreconditionError, match="evicted"):
            m.backward(forward_id=ids[0], target=torch.zeros(40, 1))
        m.backward(forward_id=ids[-1], target=torch.zeros(40, 1))
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_retains_graphs_on_many_models_until_the_budget_is_full(guarded: Any) -> None:
    """Each model's graphs fit its --max-graph-mb; together they hit the server's budget, and
    the next one is refused while the graphs already held stay usable."""
    server = guarded("--max-graph-mb", "64", budget_mb=64)
    layers = [{"type": "Linear", "in_features": 1, "out_features": 4096}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 4096, "out_features": 1}]
    x = torch.ones(1000, 1)  # saves about 16 MB per graph
    with server.client() as client:
        models = [client.create_model(layers=layers, loss="mse", seed=0) for _ in range(8)]
        held = []
        with pytest.raises(ResourceExhaustedError) as err:
            for m in models:
                held.append((m, m.forward(x, retain_graph=True).forward_id))
        details = _refused(err)
        assert "retained graphs" in details
        assert 3 <= len(held) < 8
        for m, forward_id in held:  # consuming them gives the budget back
            m.backward(forward_id=forward_id, target=torch.zeros(1000, 1))
        assert models[-1].forward(x, retain_graph=True).forward_id
    _others_still_served(server)


# ---------------------------------------------------------------------- models and datasets


@pytest.mark.hostile("memory")
def test_client_creates_a_fifth_large_model(guarded: Any) -> None:
    """Each model is under --max-parameters; together they would not fit: the fifth is refused
    naming the budget, what it needs and what is held."""
    server = guarded(budget_mb=180)
    with server.client() as client:
        models = [client.create_model(layers=WIDE, seed=0) for _ in range(4)]
        with pytest.raises(ResourceExhaustedError) as err:
            client.create_model(layers=WIDE, seed=0, model_id="fifth")
        details = _refused(err)
        assert "model 'fifth' (5005000 parameter and buffer elements" in details
        assert f"({2 * WIDE_BYTES} bytes)" in details  # parameters and gradients
        assert "parameters and buffers 76.4 MiB, gradients 76.4 MiB" in details
        assert [x.id for x in client.list_models()] == sorted(x.id for x in models)
        models[0].delete()
        client.create_model(layers=WIDE, seed=0, model_id="fifth")
        # Optimizer state counts too: Adam keeps two moments per parameter.
        models[1].delete()
        with pytest.raises(ResourceExhaustedError) as err:
            client.create_model(layers=WIDE, seed=0, optimizer={"type": "adam"})
        assert "optimizer 38.2 MiB" in err.value.details
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_uploads_datasets_beyond_the_memory_budget(guarded: Any) -> None:
    server = guarded(budget_mb=64)
    with server.client() as client:
        first = client.upload_dataset(torch.zeros(10 * MIB // 4, 1), dataset_id="first")
        with pytest.raises(ResourceExhaustedError) as err:
            client.upload_dataset(torch.zeros(60 * MIB // 4, 1), dataset_id="second")
        details = _refused(err)
        assert "dataset 'second'" in details and "datasets 10 MiB" in details
        assert [d.dataset_id for d in client.list_datasets()] == ["first"]
        client.delete_dataset(first.dataset_id)
        client.upload_dataset(torch.zeros(40 * MIB // 4, 1), dataset_id="second")
    _others_still_served(server)


def test_budget_gauge_reports_what_is_held(make_server: Any) -> None:
    server = make_server(metrics_port=0, max_memory_mb=512)
    with Client(f"127.0.0.1:{server.port}") as client:
        client.create_model(layers=WIDE, seed=0, optimizer={"type": "adam"})
        client.upload_dataset(torch.zeros(1000, 100))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    held = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^gradserve_memory_budget_bytes\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)}
    assert held["parameters"] == WIDE_BYTES and held["gradients"] == WIDE_BYTES
    assert held["optimizer"] == 2 * WIDE_BYTES and held["datasets"] == 400_000
    assert held["graphs"] == held["compute"] == held["requests"] == 0
    limit = re.search(r"^gradserve_memory_budget_limit_bytes (\S+)$", text, re.MULTILINE)
    assert limit and float(limit.group(1)) == 512 * MIB


# ---------------------------------------------------------------------- the budget itself


def test_budget_reservations_are_all_or_nothing_and_given_back() -> None:
    """Core unit test: refusals charge nothing; reservations end with their block; keep() moves
    a call's bytes to a lasting kind; small calls cost no lock and are not charged."""
    budget = MemoryBudget(10 * MIB)
    budget.charge_all({"parameters": 4 * MIB, "gradients": 4 * MIB}, "model a")
    with pytest.raises(ResourceExhausted, match=r"model b needs 4 MiB .* 2 MiB free"):
        budget.charge_all({"parameters": 2 * MIB, "gradients": 2 * MIB}, "model b")
    assert budget.used == 8 * MIB
    with budget.reserve("compute", 2 * MIB, "call") as r:
        assert budget.free == 0
        r.keep("graphs", MIB, "graph")
        assert budget.held()["graphs"] == MIB and budget.held()["compute"] == MIB
    assert budget.held()["compute"] == 0 and budget.used == 9 * MIB
    small = budget.reserve("requests", SMALL_BYTES - 1, "tiny")
    assert small.nbytes == 0 and budget.held()["requests"] == 0
    small.release()
    assert budget.try_charge("id_cache", MIB) and not budget.try_charge("id_cache", 1)
    budget.release("id_cache", MIB)
    assert budget.free == MIB


@pytest.mark.hostile("memory")
def test_client_fails_calls_in_every_way_and_the_budget_gets_it_all_back(
        make_server: Any) -> None:
    """Refused, failing and cancelled calls give back every reservation: after them the budget
    holds exactly the model's own bytes again (nothing in requests, compute or graphs)."""
    server = make_server(max_memory_mb=64)
    budget = server.core.budget
    layers = [{"type": "Linear", "in_features": 4, "out_features": 4096}, {"type": "ReLU"},
              {"type": "Linear", "in_features": 4096, "out_features": 1}]
    with Client(f"127.0.0.1:{server.port}", timeout=30, retries=0) as client:
        m = client.create_model(layers=layers, loss="mse", seed=0)
        own = budget.held()
        x, y = torch.ones(64, 4), torch.zeros(64, 1)
        with pytest.raises(InvalidArgumentError):
            m.forward(torch.ones(64, 5))                      # wrong shape
        with pytest.raises(InvalidArgumentError):
            m.backward(x, torch.zeros(64, 2))                 # wrong target
        fid = m.forward(x, retain_graph=True).forward_id
        assert budget.held()["graphs"] > 0
        with pytest.raises(InvalidArgumentError):
            m.backward(forward_id=fid, grad_output=torch.ones(3, 3))  # graph taken, then fails
        with pytest.raises(ResourceExhaustedError):
            m.forward(torch.ones(10_000, 4))                  # over the budget
        run = m.train(x.repeat(100, 1), y.repeat(100, 1), epochs=1000, batch_size=64,
                      log_every_steps=1)
        next(iter(run))
        run.cancel()
        m.wait_idle()
        m.backward(x, y, step=True)
        m.parameters()
        held = budget.held()
        # The replies kept for retries (the SDK sends request ids) are charged, exactly.
        assert held.pop("id_cache") == server.core.models.get(m.id).requests.nbytes > 0
        own.pop("id_cache")
        assert held == own


# ---------------------------------------------------------------------- memory the budget did not see


def _stub(address: str) -> Any:
    """A plain generated stub: the attacks below send what the SDK never would."""
    import grpc
    from gradserve._proto.gradserve.v1 import gradserve_pb2_grpc as pbg

    return pbg.GradientServiceStub(grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 256 * MIB)]))


@pytest.mark.hostile("memory", inputs=41)
def test_client_sends_megabyte_request_ids(shared: Guarded) -> None:
    """Each remembered id was charged 256 bytes whatever its length: 100 ZeroGrad calls with
    4 MiB ids held 400 MiB outside the budget (and a checkpoint header too large to read back).
    Ids are bounded; the caller is told which field and the limit."""
    import grpc
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    server = shared
    stub = _stub(server.address)
    with server.client() as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0)
        for i in range(40):
            request = pb.ZeroGradRequest(model_id=m.id, request_id=f"{i}-" + "x" * (4 * MIB))
            with pytest.raises(grpc.RpcError) as err:
                stub.ZeroGrad(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request_id" in err.value.details() and "128" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Step(pb.StepRequest(model_id=m.id, request_id="line\nbreak"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # An id of the documented kind still works, exactly once.
        step = pb.StepRequest(model_id=m.id, request_id="3f1c2a9e-retry-safe")
        assert stub.Step(step).step == stub.Step(step).step == 1
    _others_still_served(server)


@pytest.mark.hostile("memory", inputs=3)
def test_client_sends_millions_of_empty_tensors(shared: Guarded) -> None:
    """A 14 MB Forward with two million empty inputs took 1 GB and 25 s of one thread to decode
    before the input count was checked; the count is checked first now."""
    import grpc
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    server = shared
    stub = _stub(server.address)
    empty = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0])
    with server.client() as client:
        m = client.create_model(layers=LINEAR, loss="mse", seed=0)
        attacks = [
            lambda: stub.Forward(pb.ForwardRequest(model_id=m.id, inputs=[empty] * 2_000_000),
                                 timeout=60),
            lambda: stub.Backward(pb.BackwardRequest(model_id=m.id, forward_id="x",
                                                     grad_outputs=[empty] * 2_000_000),
                                  timeout=60),
            lambda: stub.SetParameters(pb.SetParametersRequest(
                model_id=m.id, parameters={f"p{i}": empty for i in range(200_000)}), timeout=60),
        ]
        for attack in attacks:
            with pytest.raises(grpc.RpcError) as err:
                attack()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "tensors; at most" in err.value.details(), err.value.details()
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_declares_a_dataset_of_a_million_empty_tensors(shared: Guarded) -> None:
    """A 1.8 MB UploadDataset header of 300,000 empty tensors held a control thread for seconds
    (ListModels waited behind two of them) and kept 350 MB per stored dataset, charged 0 bytes."""
    import grpc
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    server = shared
    stub = _stub(server.address)
    header = pb.DatasetHeader(dataset_id="wide", inputs=[
        pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[0, 1])] * 300_000)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadDataset(iter([pb.UploadDatasetRequest(header=header)]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.inputs: 300000 tensors; at most" in err.value.details()
    with server.client() as client:
        assert client.list_datasets() == []
    _others_still_served(server)


@pytest.mark.hostile("memory", inputs=2)
def test_client_declares_an_expression_with_a_million_parameters(shared: Guarded) -> None:
    """300,000 scalar parameters (3.6 MB): 17 s to build, 460 MB of Parameter objects charged
    1.2 MB, and 6 s per GetModel on a control thread."""
    import grpc
    from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

    server = shared
    stub = _stub(server.address)
    scalar = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[], data=b"\0\0\0\0")
    many = {f"w{i}": scalar for i in range(300_000)}
    for source in (pb.ExpressionSource(expression="w0", parameters=many),
                   pb.ExpressionSource(expression="x0", inputs=[f"x{i}" for i in range(300_000)],
                                       parameters={"w": scalar})):
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(expression=source)),
                             timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most" in err.value.details(), err.value.details()
    _others_still_served(server)


@pytest.mark.hostile("memory", inputs=3)
def test_client_stacks_a_hundred_thousand_layers(shared: Guarded) -> None:
    """100,000 Identity layers (1.4 MB) took 7 s and 250 MB the budget never saw; an mlp plugin
    with 100,000 hidden sizes did not finish in 30 s (5000 build 10,000 modules); a layer
    with 100,000 keyword arguments took 5 s to read before the first was refused."""
    server = shared
    with server.client() as client:
        before = [m.id for m in client.list_models()]
        with pytest.raises(InvalidArgumentError, match=r"spec.layers: 100000 layers; at most"):
            client.create_model(layers=[{"type": "Identity"}] * 100_000)
        with pytest.raises(InvalidArgumentError, match=r"hidden: a list of 5000 items"):
            client.create_model(plugin="mlp", plugin_kwargs={
                "in_features": 4, "hidden": [4] * 5000, "out_features": 2})
        with pytest.raises(InvalidArgumentError, match=r"kwargs: .* bytes; at most"):
            client.create_model(layers=[{"type": "Linear", "in_features": 1, "out_features": 1,
                                         **{f"k{i}": i for i in range(100_000)}}])
        assert [m.id for m in client.list_models()] == before
    _others_still_served(server)


@pytest.mark.hostile("memory")
def test_client_trains_batches_of_one_on_millions_of_samples(shared: Guarded) -> None:
    """Train built the list of every batch of an epoch before its first step: batch_size 1 over
    4 million one-byte samples (a 4 MB request) held 2.5 GB the budget never saw."""
    server = shared
    x = torch.zeros(4_000_000, dtype=torch.uint8)
    with server.client() as client:
        m = client.create_model(expression="sum(x * w)", inputs=["x"], parameters={"w": 1.0})
        run = m.train(x, batch_size=1, shuffle=True, log_every_steps=100, epochs=1)
        first = next(iter(run))
        assert first.kind == "progress" and first.run_step == 100
        run.cancel()
        m.wait_idle()
        server.assert_rss_bounded()
    _others_still_served(server)


# ---------------------------------------------------------------------- charges that were never given back


@pytest.mark.hostile("races on one id", inputs=60)
def test_clients_race_create_and_load_on_one_id(make_server: Any, tmp_path: Path) -> None:
    """CreateModel and LoadCheckpoint of the same id at once: the loaded model was overwritten
    without being closed, and its parameters stayed charged to the budget for good (a budget
    that leaks this way ends up refusing every model)."""
    import threading

    from gradserve import AlreadyExistsError

    server = make_server(state_dir=str(tmp_path), max_memory_mb=256)
    budget = server.core.budget
    layers = [{"type": "Linear", "in_features": 64, "out_features": 64}]
    with Client(f"127.0.0.1:{server.port}", timeout=30, retries=0) as client:
        client.create_model(layers=layers, seed=0, model_id="src").save_checkpoint("snap")
        client.delete_model("src")
        assert budget.used == 0
        for _ in range(60):
            gate = threading.Barrier(2)

            def create(gate: threading.Barrier = gate) -> None:
                gate.wait()
                with contextlib.suppress(AlreadyExistsError):
                    client.create_model(layers=layers, seed=0, model_id="x")

            def load(gate: threading.Barrier = gate) -> None:
                gate.wait()
                with contextlib.suppress(AlreadyExistsError):
                    client.load_checkpoint("snap", model_id="x")

            threads = [threading.Thread(target=create), threading.Thread(target=load)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client.delete_model("x")
            assert budget.used == 0, budget.describe()


@pytest.mark.hostile("races on one id", inputs=3)
def test_calls_queued_on_a_model_being_deleted_leave_no_charge(make_server: Any) -> None:
    """A Forward(retain_graph) or a Backward with a request id that waited for the model's lock
    while DeleteModel ran got it after the model was closed: the graph or the kept reply was
    charged to a model nobody would close again. The core is driven in that order here (the
    lock's hand-over order is up to the scheduler over the wire); such a call now answers
    NOT_FOUND and the budget holds nothing."""
    from gradserve_server.core.errors import NotFound

    server = make_server(max_memory_mb=256)
    budget = server.core.budget
    with Client(f"127.0.0.1:{server.port}", timeout=30, retries=0) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 4, "out_features": 4}],
                                loss="mse", seed=0, model_id="gone")
        model = server.core.models.get(m.id)  # what a call queued on the lock holds
        client.delete_model(m.id)
        assert budget.used == 0
        x = torch.ones(8, 4)
        with pytest.raises(NotFound, match="deleted"):
            model.forward([x], retain_graph=True, eval_mode=False)
        with pytest.raises(NotFound, match="deleted"):
            model.backward(inputs=[x], target=x, forward_id="", grad_output=None,
                           return_grads=True, return_input_grads=False, step=False,
                           return_output=False, request_id="r-1")
        with pytest.raises(NotFound, match="deleted"):
            model.zero_grad(request_id="r-2")
        assert budget.used == 0, budget.describe()
        assert client.list_models() == []
    _others_still_served_in_process(server)


def _others_still_served_in_process(server: Any) -> None:
    with Client(f"127.0.0.1:{server.port}", timeout=30) as other:
        m = other.create_model(layers=LINEAR, loss="mse", seed=0)
        assert m.backward(torch.ones(3, 2), torch.zeros(3, 1), step=True).step == 1
        m.delete()
