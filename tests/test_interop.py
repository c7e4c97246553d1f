"""Driven from other services: a Node.js client, discovery through reflection, proto lint/breaking.

The Node and buf tools come from tests/node (npm ci --prefix tests/node). Locally the tests skip
without them; in CI they are required.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import require_tool
from gradserve import Client, codec
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"
DOCS = ROOT / "docs" / "interop.md"
PROTO_CHECK = ROOT / "scripts" / "proto-check.sh"
DOC_ADDRESS = "127.0.0.1:50051"  # the address the docs use; replaced by the test server's
TOOL_TIMEOUT_S = 120  # a bound on hangs, not a performance assertion

# The model interop.mjs creates, written with the Python SDK.
TWIN_SPEC: dict[str, Any] = {
    "layers": [{"type": "Linear", "in_features": 3, "out_features": 4}, {"type": "Tanh"},
               {"type": "Linear", "in_features": 4, "out_features": 1}],
    "loss": "mse", "optimizer": {"type": "adam", "lr": 0.01}, "seed": 0}
TWIN_TRAIN: dict[str, Any] = {"epochs": 3, "batch_size": 4, "shuffle": True, "seed": 0,
                              "log_every_steps": 1}


def _node() -> str:
    node = shutil.which("node")
    require_tool(node is not None, "node (Node.js >= 18)")
    require_tool((NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                 "tests/node dependencies (npm ci --prefix tests/node)")
    assert node is not None
    return node


def _buf() -> str:
    require_tool(BUF.exists(), "buf (npm ci --prefix tests/node)")
    return str(BUF)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, cwd=ROOT, **kwargs)


# ------------------------------------------------------------------------------ Node.js client


def _assert_same_tensor(node: dict[str, Any], value: torch.Tensor, what: str) -> None:
    """Node's tensor equals the SDK's: same dtype, shape and bytes, and Node decoded it right."""
    wire = codec.encode(value)
    assert node["dtype"] == pb.DType.Name(wire.dtype), what
    assert node["shape"] == list(wire.shape), what
    assert base64.b64decode(node["data"]) == wire.data, f"{what}: bytes differ"
    assert node["values"] == value.flatten().tolist(), f"{what}: Node decoded other values"


@pytest.mark.node
def test_node_client_matches_python_sdk(server: GradServer, client: Client) -> None:
    proc = _run([_node(), str(NODE_DIR / "interop.mjs"), str(server.port)])
    assert proc.returncode == 0, proc.stderr
    node = json.loads(proc.stdout)

    # The inputs Node sent, rebuilt here; they are exact in float32.
    x = np.array(node["inputs"]["x"], dtype=np.float32)
    y = np.array(node["inputs"]["y"], dtype=np.float32)
    assert x.shape == (10, 3) and y.shape == (10, 1)
    assert x.astype(np.float64).tolist() == node["inputs"]["x"]

    twin = client.create_model(model_id="python-twin", **TWIN_SPEC)
    assert node["model"]["model_id"] == "node-twin"
    assert node["model"]["num_parameters"] == twin.info.num_parameters == 21
    assert [(p["name"], tuple(p["shape"]), p["dtype"]) for p in node["model"]["parameters"]] == [
        (p.name, p.shape, "DTYPE_" + p.dtype.upper()) for p in twin.info.parameters]

    # Fused Backward: identical loss, gradients and output (same seed -> same initial weights).
    result = twin.backward(x, y, return_grads=True, return_output=True)
    assert node["backward"]["loss"] == result.loss
    assert node["backward"]["step"] == result.step == 0
    assert sorted(node["backward"]["grads"]) == sorted(result.grads)
    for name, grad in result.grads.items():
        _assert_same_tensor(node["backward"]["grads"][name], grad, f"grad {name}")
    _assert_same_tensor(node["backward"]["output"], result.output, "backward output")

    # Step, then the same request id again: one step, not two.
    assert twin.step() == node["step"] == 1
    assert node["step_again"] == 1

    # Train read as a stream: the same events (timings aside).
    events = list(twin.train(x, y, progress=False, **TWIN_TRAIN))
    assert len(node["train"]) == len(events)
    for k, (theirs, ours) in enumerate(zip(node["train"], events)):
        assert theirs["kind"] == f"EVENT_KIND_{ours.kind.upper()}", k
        assert (theirs["step"], theirs["run_step"], theirs["epoch"]) == (
            ours.step, ours.run_step, ours.epoch), k
        assert (theirs["batch_loss"], theirs["epoch_loss"]) == (ours.batch_loss, ours.epoch_loss), k
        assert (theirs["learning_rate"], theirs["grad_norm"]) == (
            ours.learning_rate, ours.grad_norm), k
    done = node["train"][-1]["summary"]
    assert events[-1].summary is not None
    assert done == {"steps": events[-1].summary.steps, "epochs": 3,
                    "final_loss": events[-1].summary.final_loss,
                    "stop_reason": "STOP_REASON_COMPLETED",
                    "model_step": events[-1].summary.model_step}
    assert done["model_step"] == 1 + done["steps"]  # the Step above plus this run's

    # Parameters and a Forward after all of it: bit-identical.
    params = twin.parameters()
    assert sorted(node["parameters"]) == sorted(params)
    for name, value in params.items():
        _assert_same_tensor(node["parameters"][name], value, f"parameter {name}")
    _assert_same_tensor(node["forward"], twin.forward(x), "forward output")


# ------------------------------------------------------------------------------ discovery


def _doc_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _fenced(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def _commands(section: str) -> list[list[str]]:
    """Shell commands of the section's sh blocks, line continuations joined, as argv lists."""
    commands = []
    for block in _fenced(section, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _request(argv: list[str]) -> tuple[str, Any]:
    """(method, JSON body) of a documented buf curl or grpcurl call."""
    body = json.loads(argv[argv.index("-d") + 1])
    method = argv[-1].rsplit("/", 2)[-2:]
    return "/".join(method), body


@pytest.mark.node
def test_documented_buf_curl_calls_discover_and_call_the_server(server: GradServer) -> None:
    buf = _buf()
    section = _doc_section("Discovery from the command line")
    commands = _commands(section)
    buf_calls = [c for c in commands if c[:2] == ["buf", "curl"]]
    grpcurl_calls = [c for c in commands if c[0] == "grpcurl"]
    assert len(buf_calls) == 3 and grpcurl_calls

    # grpcurl users get the same requests as buf curl users.
    assert ([_request(c) for c in buf_calls if "-d" in c]
            == [_request(c) for c in grpcurl_calls if "-d" in c])

    outputs = []
    for argv in buf_calls:
        args = [a.replace(DOC_ADDRESS, f"127.0.0.1:{server.port}") for a in argv[2:]]
        proc = _run([buf, "curl", *args])
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        outputs.append(proc.stdout)

    listed = set(outputs[0].split())
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    assert {f"{service.full_name}/{m.name}" for m in service.methods} <= listed
    assert "grpc.health.v1.Health/Check" in listed

    created = json.loads(outputs[1])
    assert created["modelId"] == "double" and created["inputs"] == ["x"]

    answer = json.loads(outputs[2])
    documented = [json.loads(b) for b in _fenced(section, "json")]
    assert documented == [answer]
    data = base64.b64decode(answer["output"]["data"])
    assert np.frombuffer(data, "<f4").tolist() == [2.0, 4.0, 6.0]
    assert answer["output"]["shape"] == ["3"]


@pytest.mark.node
def test_buf_curl_reports_status_codes(server: GradServer) -> None:
    proc = _run([_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
                 "-d", '{"model_id": "nope"}',
                 f"http://127.0.0.1:{server.port}/gradserve.v1.GradientService/GetModel"])
    assert proc.returncode != 0
    error = json.loads(proc.stderr)
    assert error["code"] == "not_found"
    assert "'nope'" in error["message"]
    # The same answer is shown in the docs' Errors section.
    assert json.loads(_fenced(_doc_section("Errors"), "text")[0]) == error


# ------------------------------------------------------------------------------ proto lint + breaking


@pytest.mark.node
def test_proto_check_passes_on_the_contract() -> None:
    proc = _run([str(PROTO_CHECK)], env={**os.environ, "BUF": _buf()})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "buf lint passed" in proc.stdout
    assert "no breaking changes" in proc.stdout


CHANGES = {
    # name: (old text, new text, expected exit status, text expected in the output)
    "additive field": ("  bool eval_mode = 4;\n",
                       "  bool eval_mode = 4;\n  // New.\n  bool new_flag = 5;\n", 0,
                       "no breaking changes"),
    "renamed field": ("  bool retain_graph = 3;", "  bool keep_graph = 3;", 100,
                      'changed name from "retain_graph" to "keep_graph"'),
    "renumbered field": ("  bool eval_mode = 4;", "  bool eval_mode = 5;", 100,
                         'Previously present field "4" with name "eval_mode"'),
    "removed rpc": ("  rpc ZeroGrad(ZeroGradRequest) returns (ZeroGradResponse);\n", "", 100,
                    'Previously present RPC "ZeroGrad"'),
    "lint violation": ("message ZeroGradResponse {}\n",
                       "message ZeroGradResponse {}\n\nmessage zero_grad_note {}\n", 100,
                       "PascalCase"),
}


@pytest.mark.node
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_proto_check_catches_breaking_changes(tmp_path: Path, change: str) -> None:
    old, new, status, expected = CHANGES[change]
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "gradserve", tmp_path / "protos" / "gradserve")
    proto = tmp_path / "protos" / "gradserve" / "v1" / "gradserve.proto"
    text = proto.read_text()
    assert text.count(old) == 1, f"{change}: the contract no longer has {old!r}"
    proto.write_text(text.replace(old, new))
    proc = _run([str(PROTO_CHECK), str(tmp_path)], env={**os.environ, "BUF": _buf()})
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ docs


def test_docs_dtype_table_matches_the_codec() -> None:
    """Every wire dtype is documented with its enum value and size."""
    table = {m["name"]: (int(m["value"]), int(m["size"])) for m in re.finditer(
        r"^\| `(?P<name>DTYPE_\w+)`\s*\|\s*(?P<value>\d+)\s*\|\s*(?P<size>\d+)\s*\|",
        DOCS.read_text(), flags=re.MULTILINE)}
    expected = {pb.DType.Name(codec.dtype_wire(name)): (
        codec.dtype_wire(name), torch.empty(0, dtype=getattr(torch, name)).element_size())
        for name in codec.DTYPE_NAMES}
    assert table == expected
