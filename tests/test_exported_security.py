"""Hostile torch.export archives: each attack is refused (or defused) before anything runs.

Every test names what the attacker does, checks the caller's status and message (which names
the offending member or operator), and checks that the server still serves a healthy model.
The payloads create a file when unpickled or evaluated; where torch's own loader is the thing
being avoided, the test first proves that torch.export.load would indeed create the file.
"""

from __future__ import annotations

import builtins
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from gradserve import Client
from gradserve.errors import InvalidArgumentError, ResourceExhaustedError
from gradserve.export import export_module
from gradserve_server.app import GradServer
from gradserve_server.catalog import exported as ex
from gradserve_server.settings import Settings
from torch import nn

ROOT = "archive"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x)))


@cache
def good() -> bytes:
    torch.manual_seed(0)
    return export_module(Net(), torch.randn(4, 3))


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def pack(files: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def edit_json(files: dict[str, bytes], name: str, fn: Callable[[Any], None]) -> None:
    doc = json.loads(files[f"{ROOT}/{name}"])
    fn(doc)
    files[f"{ROOT}/{name}"] = json.dumps(doc).encode()


class Touch:
    """Unpickling (or evaluating) this creates the file at path."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (builtins.open, (self.path, "w"))


def pickled_weight_archive(target: Path) -> bytes:
    """fc.weight stored with use_pickle, its member a pickle that opens target for writing."""
    files = members(good())
    buf = io.BytesIO()
    torch.save(Touch(target), buf)
    files[f"{ROOT}/data/weights/weight_99"] = buf.getvalue()

    def use_pickle(doc: Any) -> None:
        doc["config"]["fc.weight"].update(path_name="weight_99", use_pickle=True)

    for prog in ("model", "eval"):
        edit_json(files, f"data/weights/{prog}_weights_config.json", use_pickle)
    return pack(files)


def torch_load(data: bytes) -> None:
    """What the server must never do: torch's own loader on client bytes."""
    try:
        torch.export.load(io.BytesIO(data)).module()(torch.ones(2, 3))
    except Exception:  # noqa: BLE001, S110 - the payload ran (or not) before any failure
        pass


@pytest.fixture
def healthy(client: Client) -> Any:
    m = client.create_model(exported=good(), loss="mse")
    return m


def still_serving(client: Client, healthy: Any) -> None:
    assert healthy.forward(torch.ones(2, 3)).shape == (2, 4)
    assert healthy.id in [m.id for m in client.list_models()]


def refused(client: Client, data: bytes, match: str, error: type = InvalidArgumentError) -> None:
    before = len(client.list_models())
    with pytest.raises(error, match=match):
        client.create_model(exported=data, loss="mse")
    assert len(client.list_models()) == before  # nothing half-created


# ------------------------------------------------------------------------------------ pickles


@pytest.mark.hostile("exported archives")
def test_client_pickles_weights_that_would_create_a_file(client: Client, healthy: Any,
                                                         tmp_path: Path) -> None:
    proof = tmp_path / "torch-load-ran-the-pickle"
    torch_load(pickled_weight_archive(proof))
    assert proof.exists()  # the archive really is malicious under torch.export.load
    target = tmp_path / "server-ran-the-pickle"
    refused(client, pickled_weight_archive(target),
            r"weights_config.json\['fc.weight'\]: stored with pickle \(use_pickle\)")
    assert not target.exists()
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_opaque_object_constant(client: Client, healthy: Any,
                                             tmp_path: Path) -> None:
    target = tmp_path / "ran"
    files = members(good())
    files[f"{ROOT}/data/constants/opaque_obj_0"] = pickle.dumps(Touch(target))
    refused(client, pack(files), r"opaque_obj_0' is a pickled Python object")
    assert not target.exists()
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_torchscript_custom_object(client: Client, healthy: Any) -> None:
    files = members(good())
    files[f"{ROOT}/data/constants/custom_obj_0"] = b"PK\x03\x04 not really"
    refused(client, pack(files), r"custom_obj_0' is a pickled TorchScript object")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_hides_pickle_in_sample_inputs(client: Client, healthy: Any,
                                              tmp_path: Path) -> None:
    """torch.save always writes example inputs; torch's loader falls back to full unpickling
    on them. The server never reads them: the model is created and nothing runs."""
    def archive(target: Path) -> bytes:
        files = members(good())
        buf = io.BytesIO()
        torch.save(Touch(target), buf)
        for prog in ("model", "eval"):
            if f"{ROOT}/data/sample_inputs/{prog}.pt" in files:
                files[f"{ROOT}/data/sample_inputs/{prog}.pt"] = buf.getvalue()
        return pack(files)

    proof = tmp_path / "proof"
    torch_load(archive(proof))
    assert proof.exists()
    target = tmp_path / "ran"
    m = client.create_model(exported=archive(target), loss="mse")
    assert m.forward(torch.ones(2, 3)).shape == (2, 4)
    assert not target.exists()


@pytest.mark.hostile("exported archives")
def test_client_puts_code_in_guards_and_symbolic_shapes(client: Client, healthy: Any,
                                                        tmp_path: Path) -> None:
    """ExportedProgram.module() exec()s guards_code and the deserializer sympify()s (evals)
    shape expressions; neither is ever read by the server."""
    def archive(target: Path) -> bytes:
        files = members(good())
        code = f"open({str(target)!r}, 'w') is not None"

        def poison(doc: Any) -> None:
            doc["guards_code"] = [code]
            size = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
            size["as_expr"]["expr_str"] = f"__import__('builtins').open({str(target)!r}, 'w')"

        for prog in ("model", "eval"):
            if f"{ROOT}/models/{prog}.json" in files:
                edit_json(files, f"models/{prog}.json", poison)
        return pack(files)

    proof = tmp_path / "proof"
    torch_load(archive(proof))
    assert proof.exists()
    target = tmp_path / "ran"
    m = client.create_model(exported=archive(target), loss="mse")
    m.forward(torch.ones(2, 3))
    assert not target.exists()
    still_serving(client, m)


# ------------------------------------------------------------------------------------ operators


class Erfinv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(x) * 0.9) * self.w


@cache
def erfinv_archive() -> bytes:
    return export_module(Erfinv(), torch.randn(4, 3))


@pytest.mark.hostile("exported archives")
def test_client_uses_operator_outside_allow_list(client: Client, healthy: Any) -> None:
    refused(client, erfinv_archive(),
            r"graph node 2 \(erfinv\): operator 'torch.ops.aten.erfinv.default' is refused: "
            r"it is not in the operator allow-list")
    still_serving(client, healthy)


def test_operator_extends_allow_list_with_a_setting(make_server: Callable[..., GradServer]
                                                    ) -> None:
    server = make_server(exported_ops="aten.erfinv.default")
    with Client(f"127.0.0.1:{server.port}") as c:
        m = c.create_model(exported=erfinv_archive(), loss="mse")
        x = torch.randn(5, 3)
        assert torch.equal(m.forward(x), Erfinv()(x).detach())


@pytest.mark.parametrize("bad, why", [
    ("aten.erfinv", "expected an ATen operator overload"),
    ("mylib.evil.default", "expected an ATen operator overload"),
    ("aten._print.default", "has effects outside the graph"),
    ("aten.no_such_op.default", "no such operator"),
])
@pytest.mark.hostile("exported archives")
def test_exported_ops_setting_refuses_unsafe_names(bad: str, why: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.load(["--exported-ops", bad], {})
    assert why in capsys.readouterr().err


def _retarget(target: str) -> bytes:
    files = members(good())

    def swap(doc: Any) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = target

    for prog in ("model", "eval"):
        if f"{ROOT}/models/{prog}.json" in files:
            edit_json(files, f"models/{prog}.json", swap)
    return pack(files)


@pytest.mark.hostile("exported archives")
def test_client_uses_custom_operator(client: Client, healthy: Any) -> None:
    refused(client, _retarget("torch.ops.mylib.evil.default"),
            r"operator 'torch.ops.mylib.evil.default' is refused: custom operators")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_uses_higher_order_operator(client: Client, healthy: Any) -> None:
    refused(client, _retarget("torch.ops.higher_order.cond"),
            r"operator 'torch.ops.higher_order.cond' is refused: custom operators")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_uses_side_effecting_operator(client: Client, healthy: Any) -> None:
    refused(client, _retarget("torch.ops.aten._print.default"),
            r"operator 'torch.ops.aten._print.default' is refused: it is not in the operator "
            "allow-list")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_writes_into_its_input_in_place(client: Client, healthy: Any) -> None:
    """An in-place op aimed at the request's input (read-only wire memory) or a parameter."""
    for victim in ("x", "p_fc_weight"):
        files = members(good())

        def aim(doc: Any, victim: str = victim) -> None:
            for node in doc["graph_module"]["graph"]["nodes"]:
                if node["target"] == "torch.ops.aten.add_.Tensor":
                    node["inputs"][0]["arg"] = {"as_tensor": {"name": victim}}

        edit_json(files, "models/model.json", aim)
        refused(client, pack(files), r"writes in place into argument 'self', which may be")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_aims_batch_norm_statistics_at_its_input(client: Client, healthy: Any) -> None:
    """batch_norm updates running_mean in place without saying so in its schema."""
    files = members(good())

    def aim(doc: Any) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.batch_norm.default":
                node["inputs"][3]["arg"] = {"as_tensor": {"name": "x"}}

    edit_json(files, "models/model.json", aim)
    refused(client, pack(files), r"writes in place into argument 'running_mean'")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_graph_allocates_huge_tensor(make_server: Callable[..., GradServer]) -> None:
    """The graph is run on meta tensors first: 320 MB of zeros is refused before allocation."""
    class Blowup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.new_zeros(x.shape[0], 1000, 5000) + self.w).sum((1, 2))

    data = export_module(Blowup(), torch.randn(2, 3))
    server = make_server(max_graph_mb=64)
    with Client(f"127.0.0.1:{server.port}") as c:
        m = c.create_model(exported=data, loss="mse")
        assert m.forward(torch.ones(1, 3)).shape == (1,)  # 2 x 20 MB: within the budget
        with pytest.raises(ResourceExhaustedError, match=r"would allocate more than 64 MiB"):
            m.forward(torch.ones(8, 3))
        assert m.forward(torch.ones(1, 3)).shape == (1,)


# ------------------------------------------------------------------------------------ the zip


@pytest.mark.hostile("exported archives")
def test_client_sends_unknown_file(client: Client, healthy: Any) -> None:
    for name, match in ((f"{ROOT}/extra/run_me.py", r"unknown member 'extra/run_me.py'"),
                        (f"{ROOT}/data/aotinductor/model/model.so",
                         r"'data/aotinductor/model/model.so' is compiled code")):
        files = members(good())
        files[name] = b"import os"
        refused(client, pack(files), match)
    still_serving(client, healthy)


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", f"{ROOT}/../models/model.json",
    f"{ROOT}/models/../models/x.json", f"{ROOT}\\models\\model.json", f"{ROOT}//archive_format",
])
@pytest.mark.hostile("exported archives")
def test_client_uses_path_traversal_names(client: Client, healthy: Any, name: str) -> None:
    files = members(good())
    files[name] = b"x"
    refused(client, pack(files), r"unsafe or malformed path|outside the archive's root")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_zip_bomb(client: Client, healthy: Any) -> None:
    files = members(good())
    files[f"{ROOT}/data/weights/weight_0"] = bytes(16 * 1024 * 1024)
    bomb = pack(files, zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1024 * 1024
    refused(client, bomb, r"member 'archive/data/weights/weight_0' expands \d+-fold")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_oversize_members(client: Client, healthy: Any,
                                       make_server: Callable[..., GradServer]) -> None:
    files = members(good())
    files[f"{ROOT}/archive_format"] = b"pt2" + b" " * 100
    refused(client, pack(files), r"member 'archive/archive_format' holds 103 bytes; at most 64",
            ResourceExhaustedError)
    small = make_server(max_exported_mb=1)
    files = members(good())
    files[f"{ROOT}/data/sample_inputs/model.pt"] = bytes(2 * 1024 * 1024)
    with Client(f"127.0.0.1:{small.port}") as c:
        refused(c, pack(files), r"bytes; the limit \(max_exported_mb\) is 1 MiB",
                ResourceExhaustedError)
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_claims_more_elements_than_the_member_holds(client: Client, healthy: Any) -> None:
    files = members(good())

    def grow(doc: Any) -> None:
        meta = doc["config"]["fc.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": 1 << 30}, {"as_int": 3}]

    edit_json(files, "data/weights/model_weights_config.json", grow)
    refused(client, pack(files), r"\['fc.weight'\]: 'data/weights/weight_0' holds 48 bytes, "
                                 "too few")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_too_many_nodes_or_parameters(make_server: Callable[..., GradServer]
                                                   ) -> None:
    server = make_server(max_exported_nodes=2, max_parameters=10_000)
    with Client(f"127.0.0.1:{server.port}") as c:
        refused(c, good(), r"graph nodes; the limit \(max_exported_nodes\) is 2",
                ResourceExhaustedError)
    server = make_server(max_parameters=20)
    with Client(f"127.0.0.1:{server.port}") as c:
        refused(c, good(), r"elements; the limit \(max_parameters\) is 20", ResourceExhaustedError)


@pytest.mark.hostile("exported archives")
def test_client_sends_duplicate_or_garbage_members(client: Client, healthy: Any) -> None:
    data = good()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr(f"{ROOT}/models/model.json", b"{}")
    refused(client, out.getvalue(), r"member 'archive/models/model.json' appears twice")
    refused(client, b"definitely not a zip", r"not a zip archive")
    refused(client, data[:1000], r"not a zip archive")
    files = members(data)
    files[f"{ROOT}/models/model.json"] = b"[" * 100_000
    refused(client, pack(files), r"models/model.json' is not valid JSON")
    still_serving(client, healthy)


@pytest.mark.hostile("exported archives")
def test_client_sends_program_from_another_schema(client: Client, healthy: Any) -> None:
    files = members(good())
    edit_json(files, "models/model.json", lambda d: d["schema_version"].update(major=99))
    refused(client, pack(files), r"serialization schema 99; this server reads schema 8")
    still_serving(client, healthy)


# ------------------------------------------------------------------------------------ the core


def test_exported_module_runs_on_meta_tensors() -> None:
    """Output sizes can be checked before computing: functional_call with meta state."""
    module = ex.build_exported(good(), ex.ArchiveLimits())
    state = {k: torch.empty_like(v, device="meta")
             for k, v in [*module.named_parameters(), *module.named_buffers()]}
    (out,) = torch.func.functional_call(module, state, (torch.empty(5, 3, device="meta"),))
    assert out.device.type == "meta" and out.shape == (5, 4)
    rng = torch.get_rng_state()
    module.check_memory([torch.empty(5, 3)], 1 << 20)
    assert torch.equal(rng, torch.get_rng_state())  # meta runs draw no random numbers


def test_docs_list_every_allowed_operator() -> None:
    assert ex.OPS <= set(ex.allowed_ops())  # every table entry is an operator of this torch
    docs = (Path(__file__).resolve().parent.parent / "docs" / "exported.md").read_text()
    for op in sorted(ex.OPS):
        assert f"`{op.removeprefix(ex.ATEN_PREFIX)}`" in docs, op
    for op in ex.PY_OPS:
        assert f"`{op}`" in docs, op


@pytest.mark.hostile("exported archives")
def test_client_sends_a_million_member_directory(client: Client, healthy: Any) -> None:
    """The entry count comes from the end record before zipfile builds one object per entry."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for i in range(20_100):
            z.writestr(f"{ROOT}/data/weights/weight_{i}", b"")
    refused(client, out.getvalue(), r"20100 members; at most 20064", ResourceExhaustedError)
    still_serving(client, healthy)
