"""Several servers: rendezvous routing by id (gradserve.routing), as docs/interop.md specifies it,
through the sync and async SDK, the command line and a Node.js client; `gradserve rebalance`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import require_tool
from gradserve import AsyncClient, Client, routing
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve.cli import main
from gradserve.errors import (
    AlreadyExistsError,
    NotFoundError,
    UnavailableError,
)
from gradserve_server.app import GradServer
from grpc_health.v1 import health_pb2

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "docs" / "interop.md"
NODE_DIR = ROOT / "tests" / "node"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
BATCHNORM = [{"type": "Linear", "in_features": 2, "out_features": 3},
             {"type": "BatchNorm1d", "num_features": 3}, {"type": "Linear", "in_features": 3,
                                                         "out_features": 1}]


# ------------------------------------------------------------------------------ the function


def _section() -> str:
    text = INTEROP.read_text()
    return text[text.index("## Several servers"):text.index("## Generating stubs")]


def _table(header: str) -> list[list[str]]:
    """Rows of the markdown table whose header line starts with `header`, as cell texts."""
    lines = _section().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def vectors() -> tuple[list[tuple[str, str, int]], list[tuple[list[str], str, str]]]:
    weights = [(_code(s)[0], _code(k)[0], int(_code(w)[0], 16))
               for s, k, w in _table("| server | key | weight |")]
    owners = [(_code(s), _code(k)[0], _code(o)[0]) for s, k, o in _table("| servers | key |")]
    return weights, owners


def test_weights_and_owners_are_the_test_vectors_of_the_docs() -> None:
    weights, owners = vectors()
    assert len(weights) >= 9 and len(owners) >= 10
    for server, key, weight in weights:
        assert routing.weight(server, key) == weight, (server, key)
    for servers, key, owner in owners:
        assert routing.owner(key, servers) == owner, (servers, key)
        assert routing.owner(key, reversed(servers)) == owner
    # the vectors exercise every server of a 3-server list, and a non-ASCII key
    assert {o for s, _, o in owners if len(s) == 3 and s[0].startswith("10.")} == {
        "10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"}
    assert any(k == "é" for _, k, _ in owners)


def test_weight_is_sha256_of_server_zero_key_as_documented() -> None:
    import hashlib

    digest = hashlib.sha256(b"10.0.0.1:50051\x00m1").digest()
    assert routing.weight("10.0.0.1:50051", "m1") == int.from_bytes(digest[:8], "big")


def test_addresses_normalize_as_the_docs_show() -> None:
    rows = _table("| given | identity |")
    assert len(rows) >= 5
    for given, identity in rows:
        assert routing.normalize(_code(given)[0]) == _code(identity)[0]


@pytest.mark.parametrize(("address", "says"), [
    ("gradserve-0", "expected host:port"),
    ("gradserve-0:http", "port"),
    ("gradserve-0:0", "port"),
    ("gradserve-0:70000", "port"),
    ("2001:db8::1:50051", "brackets"),
    ("[2001:db8::1]", "[IPv6]:port"),
    ("[1.2.3.4]:50051", "not an IPv6 address"),
    ("[fe80::1%eth0]:50051", "zone"),
    ("gradserve_-.x:1", "not a host name"),
    ("-bad:1", "not a host name"),
    ("grädserve:1", "ASCII"),
    ("unix:/tmp/sock", "port"),
])
def test_malformed_server_addresses_are_refused_naming_what_is_wrong(address: str, says: str
                                                                    ) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        routing.normalize(address)


def test_owner_ignores_order_spelling_and_duplicates() -> None:
    servers = ["B.example:1", "a.example:1", "c.example.:1"]
    same = ["c.example:1", "a.example:1", " b.example:1", "a.example:1"]
    for i in range(200):
        assert routing.owner(f"m{i}", servers) == routing.owner(f"m{i}", same)


def test_ids_spread_evenly_over_the_servers() -> None:
    servers = [f"10.0.0.{i}:50051" for i in range(1, 4)]
    router = routing.Router(servers)
    counts = {s: 0 for s in router.servers}
    for i in range(3000):
        counts[router.owner(f"model-{i}")] += 1
    assert all(850 < n < 1150 for n in counts.values()), counts


def test_adding_a_server_moves_only_the_ids_it_wins_and_removing_one_only_its_own() -> None:
    three = [f"gs-{i}.gs:50051" for i in range(3)]
    four = [*three, "gs-3.gs:50051"]
    ids = [f"model-{i}" for i in range(2000)]
    before = {k: routing.owner(k, three) for k in ids}
    after = {k: routing.owner(k, four) for k in ids}
    moved = [k for k in ids if before[k] != after[k]]
    assert all(after[k] == "gs-3.gs:50051" for k in moved)
    assert 400 < len(moved) < 600  # about a quarter
    # removing gs-3 again: exactly its ids go back where they were
    assert {k: routing.owner(k, three) for k in moved} == {k: before[k] for k in moved}


def test_the_router_caches_what_the_function_says() -> None:
    servers = ["10.0.0.1:50051", "10.0.0.2:50051"]
    router = routing.Router(servers)
    for i in range(100):
        assert router.owner(f"x{i}") == router.owner(f"x{i}") == routing.owner(f"x{i}", servers)


def test_every_rpc_has_a_route_and_the_docs_table_names_it() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GradientService"].methods}
    methods |= {m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods
                if m.name == "Check"}
    assert set(routing.ROUTES) == methods
    documented = {name for call, _ in _table("| call | goes to |") for name in _code(call)}
    assert documented == methods


# ------------------------------------------------------------------------------ address forms


def _fake_dns(records: dict[str, list[str]], ptr: dict[str, str]) -> tuple[Any, Any]:
    def resolve(host: str, port: int, type: int = 0) -> list[Any]:
        if host not in records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, type, 6, "",
                 (ip, port, 0, 0) if ":" in ip else (ip, port)) for ip in records[host]]

    def reverse(sockaddr: Any, flags: int) -> tuple[str, str]:
        assert flags == socket.NI_NAMEREQD
        if sockaddr[0] not in ptr:
            raise socket.gaierror(socket.EAI_NONAME, "no PTR")
        return ptr[sockaddr[0]], str(sockaddr[1])

    return resolve, reverse


def test_a_dns_name_stands_for_every_address_named_by_its_reverse_name() -> None:
    svc = "gradserve-headless.ml.svc.cluster.local"
    pods = {f"10.1.0.{i}": f"gradserve-{i}.{svc}." for i in range(3)}
    records = {"gradserve-headless": [*pods, "fd00::7"],  # a dual-stack pod: one more address
               **{name.rstrip("."): [ip] for ip, name in pods.items()},
               f"gradserve-0.{svc}": ["10.1.0.0", "fd00::7"]}
    ptr = {**pods, "fd00::7": f"gradserve-0.{svc}", "10.1.0.9": "stale.example"}
    resolve, reverse = _fake_dns(records, ptr)
    found = routing.endpoints("dns:///gradserve-headless:50051", resolve=resolve, reverse=reverse)
    assert [e.identity for e in found] == [f"gradserve-{i}.{svc}:50051" for i in range(3)]
    assert all(e.target == e.identity for e in found)  # connect by name: gRPC re-resolves it
    # the same servers listed by name route the same way
    listed = [f"gradserve-{i}.{svc}:50051" for i in (2, 0, 1)]
    assert routing.Router(e.identity for e in found).owner("m1") == routing.owner("m1", listed)
    # an address without a PTR name, or whose name does not lead back to it, is its own name
    records["other"] = ["10.1.0.8", "10.1.0.9"]
    found = routing.endpoints(["dns:///other:7", "b:1"], resolve=resolve, reverse=reverse)
    assert [e.identity for e in found] == ["10.1.0.8:7", "10.1.0.9:7", "b:1"]


def test_a_dns_name_with_one_address_is_one_server_as_before() -> None:
    resolve, reverse = _fake_dns({"single": ["10.0.0.5"], "pod.svc": ["10.0.0.5"]},
                                 {"10.0.0.5": "pod.svc"})
    (only,) = routing.endpoints("dns:///single:50051", resolve=resolve, reverse=reverse)
    assert only.target == "dns:///single:50051" and only.identity == "10.0.0.5:50051"
    # among other servers, it is named like any address of a DNS name
    found = routing.endpoints(["dns:///single:50051", "b:1"], resolve=resolve, reverse=reverse)
    assert [e.identity for e in found] == ["b:1", "pod.svc:50051"]


def test_an_unresolvable_dns_name_is_a_clear_error() -> None:
    resolve, reverse = _fake_dns({}, {})
    with pytest.raises(ValueError, match="cannot resolve 'dns:///nowhere:1'"):
        routing.endpoints("dns:///nowhere:1", resolve=resolve, reverse=reverse)
    with pytest.raises(ValueError, match="expected host:port"):
        routing.endpoints("dns:///noport", resolve=resolve, reverse=reverse)
    with pytest.raises(ValueError, match="empty"):
        routing.endpoints([])


def test_one_address_is_one_server_exactly_as_before(server: GradServer) -> None:
    address = f"127.0.0.1:{server.port}"
    with Client(address) as one:
        assert one._router is None and one.servers == (address,) and one.address == address
        assert one.server_of("anything") == address
        m = one.create_model(layers=LINEAR, model_id="solo")
        assert m.id == "solo" and one.health() == "SERVING"
    with Client([f" 127.0.0.1:{server.port}"]) as listed:  # a list of one: one server too
        assert listed._router is None and listed.model("solo").id == "solo"
    with Client(f"dns:///localhost:{server.port}") as named:
        assert named._router is None and named.model("solo").id == "solo"


# ------------------------------------------------------------------------------ three servers


@pytest.fixture
def three(make_server: Callable[..., GradServer]) -> list[GradServer]:
    return [make_server() for _ in range(3)]


def addresses(servers: list[GradServer]) -> list[str]:
    return [f"127.0.0.1:{s.port}" for s in servers]


def spread(addrs: list[str], prefix: str, each: int) -> list[str]:
    """Ids `prefix-N`, `each` of them owned by every server."""
    ids: dict[str, list[str]] = {a: [] for a in addrs}
    for n in range(10_000):
        mine = ids[routing.owner(f"{prefix}-{n}", addrs)]
        if len(mine) < each:
            mine.append(f"{prefix}-{n}")
        if all(len(v) == each for v in ids.values()):
            return [i for v in ids.values() for i in v]
    raise AssertionError("unreachable: ids spread evenly")


def held(server: GradServer) -> set[str]:
    """Model ids a server holds, asked directly."""
    with Client(f"127.0.0.1:{server.port}", timeout=10) as one:
        return {m.id for m in one.list_models()}


def test_models_created_through_one_client_are_found_through_another(
        three: list[GradServer]) -> None:
    addrs = addresses(three)
    with Client(addrs, timeout=30) as first:
        assert first._router is not None and len(first.servers) == 3
        created = [first.create_model(layers=LINEAR, loss="mse", seed=i) for i in range(25)]
        created += [first.create_model(layers=LINEAR, model_id=f"named-{i}") for i in range(5)]
        ids = [m.id for m in created]
        assert all(re.fullmatch(r"model-[0-9a-f]{12}", i) for i in ids[:25])
        assert [m.id for m in first.list_models()] == sorted(ids)
        by_server = {f"127.0.0.1:{s.port}": held(s) for s in three}
        assert all(by_server.values()), "every server got some of the 30 models"
        assert set().union(*by_server.values()) == set(ids)
        for address, models in by_server.items():  # each on exactly the server routing names
            assert all(routing.owner(i, addrs) == address for i in models)
        # another client, given the servers in another order (and one twice), finds them all
        with Client([addrs[2], addrs[0], addrs[1], addrs[0]], timeout=30) as second:
            assert second.servers == first.servers
            X = torch.randn(4, 2)
            for m in created:
                found = second.model(m.id)
                assert found.info.parameters == m.info.parameters
                torch.testing.assert_close(found.forward(X), m.forward(X), rtol=0, atol=0)


def test_a_stopped_server_gives_unavailable_for_its_models_only(three: list[GradServer]) -> None:
    addrs = addresses(three)
    with Client(addrs, timeout=30) as client:
        models = [client.create_model(layers=LINEAR, model_id=f"m{i}") for i in range(30)]
    down = three[1]
    down_address = f"127.0.0.1:{down.port}"
    lost = {m.id for m in models if routing.owner(m.id, addrs) == down_address}
    assert lost and len(lost) < 30
    down.stop()
    X = np.ones((2, 2), np.float32)
    with Client(list(reversed(addrs)), timeout=5, retries=1) as client:
        for m in models:
            if m.id in lost:
                with pytest.raises(UnavailableError, match=re.escape(down_address)):
                    client.model(m.id)
                with pytest.raises(UnavailableError):
                    m.__class__(client, m.info).forward(X)
            else:
                assert client.model(m.id).forward(X).shape == (2, 1)
                assert client.model(m.id).step() == 1
        # a call for every server cannot be answered in full: it fails, naming the server
        with pytest.raises(UnavailableError, match=re.escape(down_address)):
            client.list_models()
        statuses = client.health_by_server()
        assert statuses == {s: "UNAVAILABLE" if s == down_address else "SERVING"
                            for s in client.servers}


def test_the_async_client_routes_like_the_sync_client(three: list[GradServer]) -> None:
    addrs = addresses(three)

    async def run() -> list[str]:
        async with AsyncClient(addrs, timeout=30) as client:
            models = await asyncio.gather(*[
                client.create_model(layers=LINEAR, loss="mse", seed=i) for i in range(12)])
            X, y = torch.randn(8, 2), torch.randn(8, 1)
            history = await models[0].fit(X, y, epochs=2, batch_size=4)
            assert len(history.epoch_losses) == 2
            steps = [s async for s in models[1].train_stream([(X, y), (X, y)])]
            assert [s.step for s in steps] == [1, 2]
            await models[2].wait_idle()
            assert len(await client.list_models()) == 12
            assert (await client.health()) == "SERVING"
            return [m.id for m in models]

    ids = asyncio.run(run())
    with Client(addrs[::-1], timeout=30) as sync:
        assert sync.model(ids[0]).info.step == 4
        assert sync.model(ids[1]).info.step == 2
    for server, address in zip(three, addrs):
        assert held(server) == {i for i in ids if routing.owner(i, addrs) == address}


def test_train_and_train_stream_run_on_the_models_server(three: list[GradServer]) -> None:
    with Client(addresses(three), timeout=30) as client:
        X, y = torch.randn(16, 2), torch.randn(16, 1)
        for i in range(6):
            m = client.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd"},
                                    model_id=f"t{i}")
            events = list(m.train(X, y, epochs=1, batch_size=8))
            assert events[-1].summary is not None and events[-1].summary.model_step == 2
            assert [s.step for s in m.train_stream([(X, y)])] == [3]
            assert m.refresh().step == 3


def test_datasets_are_uploaded_to_every_server_so_any_model_trains_on_them(
        three: list[GradServer]) -> None:
    addrs = addresses(three)
    X, y = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32), np.zeros(
        (32, 1), np.float32)
    with Client(addrs, timeout=30) as client:
        info = client.upload_dataset(X, y, chunk_bytes=100)
        assert re.fullmatch(r"dataset-[0-9a-f]{12}", info.dataset_id)
        assert [d.dataset_id for d in client.list_datasets()] == [info.dataset_id]
        for s in three:
            with Client(f"127.0.0.1:{s.port}") as one:
                assert [d.num_samples for d in one.list_datasets()] == [32]
        for model_id in spread(addrs, "d", 2):  # models on every server train on it
            m = client.create_model(layers=LINEAR, loss="mse", model_id=model_id)
            summary = list(m.train(dataset=info.dataset_id, epochs=1, batch_size=16))[-1].summary
            assert summary is not None and summary.steps == 2
        named = client.upload_dataset(X, dataset_id="shared")
        with pytest.raises(AlreadyExistsError):
            client.upload_dataset(X, dataset_id="shared")
        assert {d.dataset_id for d in client.list_datasets()} == {info.dataset_id, "shared"}
        client.delete_dataset(named.dataset_id)
        client.delete_dataset(info.dataset_id)
        assert client.list_datasets() == []
        with pytest.raises(NotFoundError, match="on none of the 3 servers"):
            client.delete_dataset(info.dataset_id)


def test_an_upload_that_fails_on_one_server_is_undone_on_the_others(
        three: list[GradServer]) -> None:
    addrs = addresses(three)
    last = addrs.index(max(addrs))  # uploads go in sorted order: this one comes last
    with Client(addrs[last], timeout=30) as one:
        one.upload_dataset(np.ones((4, 2), np.float32), dataset_id="taken")
    with Client(addrs, timeout=30) as client, pytest.raises(AlreadyExistsError):
        client.upload_dataset(np.ones((4, 2), np.float32), dataset_id="taken")
    # the two that took it gave it back; the last keeps its own
    assert [held_datasets(s) for s in three] == [
        {"taken"} if i == last else set() for i in range(3)]
    three[last].stop()
    with Client(addrs, timeout=5, retries=0) as client, pytest.raises(
            UnavailableError, match=str(three[last].port)):
        client.upload_dataset(np.ones((4, 2), np.float32), dataset_id="half")
    assert [held_datasets(s) for i, s in enumerate(three) if i != last] == [set(), set()]


def held_datasets(server: GradServer) -> set[str]:
    with Client(f"127.0.0.1:{server.port}", timeout=10) as one:
        return {d.dataset_id for d in one.list_datasets()}


def test_checkpoints_are_written_and_found_where_their_model_lives(
        make_server: Callable[..., GradServer], tmp_path: Path) -> None:
    servers = [make_server(state_dir=str(tmp_path / f"s{i}")) for i in range(3)]
    addrs = addresses(servers)
    with Client(addrs, timeout=30) as client:
        models = [client.create_model(layers=LINEAR, loss="mse", model_id=f"c{i}", seed=i)
                  for i in range(6)]
        for m in models:
            m.save_checkpoint()  # named after the model
            m.save_checkpoint(f"{m.id}-best")
        names = [c.name for c in client.list_checkpoints()]
        assert names == sorted(names) and len(names) == 12
        for m in models:
            home = servers[addrs.index(client.server_of(m.id))]
            assert (Path(home.settings.state_dir) / f"{m.id}-best.safetensors").exists()
            before = m.parameters()
            m.set_parameters({k: v + 1 for k, v in before.items()})
            restored = client.load_checkpoint(f"{m.id}-best", model_id=m.id)
            assert all(torch.equal(restored.parameters()[k], v) for k, v in before.items())
            client.load_checkpoint(m.id)  # the model's own checkpoint: routed by its name
            client.delete_checkpoint(f"{m.id}-best")
        assert [c.name for c in client.list_checkpoints()] == sorted(m.id for m in models)
        with pytest.raises(NotFoundError):
            client.delete_checkpoint("c0-best")


# ------------------------------------------------------------------------------ command line


def test_cli_takes_several_servers_comma_separated(three: list[GradServer], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    address = ",".join(addresses(three))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"layers": LINEAR, "loss": "mse"}))
    for i in range(6):
        assert main(["--address", address, "create", str(spec), "--id", f"cli-{i}"]) == 0
    capsys.readouterr()
    assert main(["--address", address, "--json", "models", "list"]) == 0
    assert [m["model_id"] for m in json.loads(capsys.readouterr().out)] == [
        f"cli-{i}" for i in range(6)]
    assert main(["--address", address, "health"]) == 0
    out = capsys.readouterr().out
    assert all(f"127.0.0.1:{s.port}" in out for s in three) and out.count("SERVING") == 3
    assert main(["--address", address, "models", "show", "cli-4"]) == 0
    three[0].stop()
    assert main(["--address", address, "--timeout", "3", "health"]) == 1
    captured = capsys.readouterr()
    assert "UNAVAILABLE" in captured.out and f"127.0.0.1:{three[0].port} is UNAVAILABLE" in (
        captured.err)


# ------------------------------------------------------------------------------ Node.js


def _node() -> str:
    import shutil

    node = shutil.which("node")
    require_tool(node is not None, "node (Node.js >= 18)")
    require_tool((NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                 "tests/node dependencies (npm ci --prefix tests/node)")
    assert node is not None
    return node


def _node_run(*args: str, stdin: str = "") -> Any:
    proc = subprocess.run([_node(), str(NODE_DIR / "routing.mjs"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.node
def test_node_routes_like_the_python_sdk() -> None:
    weights, owners = vectors()
    rng = np.random.default_rng(0)
    cases: list[dict[str, Any]] = [{"servers": s, "keys": [k]} for s, k, _ in owners]
    cases += [{"servers": [s], "keys": [k]} for s, k, _ in weights]
    spellings = [" 10.0.0.1:50051", "Gradserve-0.Gradserve-Headless.:50051",
                 "[2001:DB8:0:0:0:0:0:1]:050051", "[::ffff:10.0.0.1]:8", "[1:0:0:2:0:0:0:3]:4",
                 "010.0.0.1:9", "a_b.c:1"]
    for n in (2, 3, 4, 5, 8):
        servers = [f"gs-{i}.gradserve-headless:50051" for i in range(n)]
        servers[0] = spellings[n % len(spellings)]
        keys = [f"model-{secrets.token_hex(6)}" for _ in range(500)]
        keys += ["", "é", "日本", *(f"m{i}" for i in range(50)),
                 *("".join(chr(c) for c in rng.integers(33, 0x2FF, 8)) for _ in range(50))]
        cases.append({"servers": servers[::-1], "keys": keys})
    bad = ["gradserve-0", "[1.2.3.4]:1", "x:0", "[fe80::1%eth0]:1", "grädserve:1", "-x:1"]
    cases += [{"servers": [b], "keys": ["m"]} for b in bad]
    answers = _node_run("owners", stdin=json.dumps(cases))
    assert len(answers) == len(cases)
    compared = 0
    for case, answer in zip(cases, answers):
        if case["servers"][0] in bad:
            assert "error" in answer, case
            with pytest.raises(ValueError):
                routing.normalize(case["servers"][0])
            continue
        assert "error" not in answer, (case, answer)
        router = routing.Router(case["servers"])
        assert answer["servers"] == list(router.servers)
        assert answer["owners"] == [router.owner(k) for k in case["keys"]]
        compared += len(case["keys"])
        for key, row in zip(case["keys"], answer["weights"]):
            assert [int(w, 16) for w in row] == [
                routing.weight(routing.normalize(s), key) for s in case["servers"]]
    assert compared > 2500
    for (servers, key, expected), answer in zip(owners, answers):
        assert answer["owners"] == [expected]


@pytest.mark.node
def test_models_a_node_client_placed_are_found_by_the_python_sdk(
        three: list[GradServer]) -> None:
    addrs = addresses(three)
    placed = _node_run("create", *addrs)
    assert len(placed) == 12
    with Client(addrs[::-1], timeout=30) as client:
        for model_id, server in placed.items():
            assert client.server_of(model_id) == server
            out = client.model(model_id).forward(torch.tensor([1.0, 2.0]))
            assert out.tolist() == [2.0, 4.0]


# ------------------------------------------------------------------------------ rebalance


@pytest.fixture
def cluster(make_server: Callable[..., GradServer], tmp_path: Path
            ) -> Iterator[Callable[[int], list[GradServer]]]:
    """Servers with their own state dirs, as a StatefulSet's pods have."""
    made: list[GradServer] = []

    def more(n: int, **settings: Any) -> list[GradServer]:
        new = [make_server(state_dir=str(tmp_path / f"s{len(made) + i}"), **settings)
               for i in range(n)]
        made.extend(new)
        return new

    yield more


def _values(model: Any) -> dict[str, bytes]:
    from gradserve import codec

    return {k: codec.encode(v).SerializeToString()
            for k, v in model.parameters(buffers=True).items()}


def _populate(addrs: list[str], n: int = 30) -> dict[str, dict[str, bytes]]:
    """n models of three kinds, trained a little so their values are their own."""
    X, y = torch.randn(16, 2), torch.randn(16, 1)
    snapshot = {}
    with Client(addrs, timeout=30) as client:
        for i in range(n):
            if i % 3 == 0:
                m = client.create_model(layers=BATCHNORM, loss="mse",
                                        optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9},
                                        seed=i)
            elif i % 3 == 1:
                m = client.create_model(expression="w * x + b", inputs=["x"],
                                        parameters={"w": np.float32(2.0), "b": np.float32(0)},
                                        loss="mse", optimizer={"type": "adam", "lr": 0.1})
            else:
                m = client.create_model(layers=LINEAR, loss="mse", frozen=["0.bias"], seed=i)
            m.backward(X if i % 3 != 1 else X[:, :1], y, step=True)
            snapshot[m.id] = _values(m)
    return snapshot


def test_rebalance_from_3_to_4_servers_moves_exactly_the_models_whose_owner_changed(
        cluster: Callable[..., list[GradServer]], capsys: pytest.CaptureFixture[str]) -> None:
    servers = cluster(3)
    before = _populate(addresses(servers))
    servers += cluster(1)
    addrs = addresses(servers)
    address = ",".join(addrs)
    expected = {i: routing.owner(i, addrs) for i in before
                if routing.owner(i, addrs) != routing.owner(i, addrs[:3])}
    assert expected and set(expected.values()) == {addrs[3]}  # only the new server wins ids

    # the plan: exactly those moves, and nothing changes
    held_before = [held(s) for s in servers]
    assert main(["--address", address, "--json", "rebalance", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["staying"] == len(before) - len(expected)
    assert {m["model_id"]: m["target"] for m in plan["moves"]} == expected
    assert all(m["status"] == "planned" for m in plan["moves"])
    assert [held(s) for s in servers] == held_before
    assert main(["--address", address, "rebalance", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{len(expected)} model(s) would move" in text and "nothing was changed" in text

    # the move
    assert main(["--address", address, "rebalance"]) == 0
    out = capsys.readouterr()
    assert f"{len(expected)} of {len(expected)} model(s) moved" in out.out
    assert out.err.count(": moved") == len(expected)  # progress, one line per model
    for s, address_ in zip(servers, addrs):
        assert held(s) == {i for i in before if routing.owner(i, addrs) == address_}
    with Client(addrs[::-1], timeout=30) as client:
        for model_id, values in before.items():
            assert _values(client.model(model_id)) == values, model_id
    # the new server checkpointed what it took; the old ones dropped their copies' checkpoints
    with Client(addrs[3]) as new:
        assert {c.name for c in new.list_checkpoints()} == set(expected)
    for s in servers[:3]:
        assert not set(expected) & {p.stem for p in Path(s.settings.state_dir).iterdir()}
    # a second run has nothing to do
    assert main(["--address", address, "--json", "rebalance"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["moves"] == [] and again["staying"] == len(before)

    # and back to 3: the fourth server is drained
    assert main(["--address", ",".join(addrs[:3]), "rebalance", "--drain", addrs[3]]) == 0
    assert held(servers[3]) == set()
    with Client(addrs[:3], timeout=30) as client:
        for model_id, values in before.items():
            assert _values(client.model(model_id)) == values


def test_rebalance_leaves_what_it_cannot_move_where_it_is(
        cluster: Callable[..., list[GradServer]], capsys: pytest.CaptureFixture[str]) -> None:
    servers = cluster(3)
    new_server, = cluster(1, max_models=2)  # takes two models, then refuses
    old = addresses(servers)
    addrs = [*old, f"127.0.0.1:{new_server.port}"]
    before = _populate(old, n=9)
    # five more whose owner is the new server
    moving = [i for i in (f"mv-{j}" for j in range(200))
              if routing.owner(i, addrs) == addrs[3]][:5]
    with Client(old, timeout=30) as client:
        for model_id in moving:
            m = client.create_model(layers=LINEAR, loss="mse", model_id=model_id)
            m.backward(torch.randn(4, 2), torch.randn(4, 1), step=True)
            before[model_id] = _values(m)
        pending = moving[0]  # holds gradients not yet applied: it must not move
        client.model(pending).backward(torch.randn(4, 2), torch.randn(4, 1))
    assert main(["--address", ",".join(addrs), "--json", "rebalance"]) == 1
    plan = json.loads(capsys.readouterr().out)
    status = {m["model_id"]: (m["status"], m["note"]) for m in plan["moves"]}
    assert set(moving) <= set(status)
    assert status[pending][0] == "skipped" and "gradients" in status[pending][1]
    moved = {i for i, (s, _) in status.items() if s == "moved"}
    failed = {i for i, (s, _) in status.items() if s == "failed"}
    assert len(moved) == 2 and failed == set(status) - moved - {pending}
    assert all("RESOURCE_EXHAUSTED" in status[i][1] for i in failed)
    # nothing is lost: each model is on its new owner or still on its old one, same values
    assert held(new_server) == moved
    for model_id, values in before.items():
        home = addrs[3] if model_id in moved else routing.owner(model_id, old)
        with Client(home, timeout=30) as one:
            assert _values(one.model(model_id)) == values, model_id
            if model_id == pending:
                assert one.model(model_id).grads()
