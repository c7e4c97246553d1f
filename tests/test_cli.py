"""The `gradserve` command: main() in-process against the fixture server, plus one subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradserve import Client
from gradserve.cli import main
from gradserve_server.app import GradServer

SPEC: dict[str, Any] = {
    "layers": [{"type": "Linear", "in_features": 2, "out_features": 3}, {"type": "Tanh"},
               {"type": "Linear", "in_features": 3, "out_features": 1}],
    "loss": "mse", "optimizer": {"type": "sgd", "lr": 0.1}, "seed": 11,
}
YAML_SPEC = """\
layers:
  - {type: Linear, in_features: 2, out_features: 3}
  - {type: Tanh}
  - {type: Linear, in_features: 3, out_features: 1}
loss: mse
optimizer: {type: sgd, lr: 0.1}
seed: 11
"""


class Runner:
    """main(argv) against one server; returns (exit code, stdout, stderr)."""

    def __init__(self, address: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.address = address
        self.capsys = capsys

    def __call__(self, *argv: str, address: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([*(["--address", self.address] if address else []), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self("--json", *argv)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(server: GradServer, capsys: pytest.CaptureFixture[str]) -> Runner:
    return Runner(f"127.0.0.1:{server.port}", capsys)


def data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    return x, np.sin(x[:, :1] - x[:, 1:]).astype(np.float32)


def test_health_table_and_json(cli: Runner) -> None:
    assert cli("health")[:2] == (0, "SERVING\n")
    assert cli.json("health")["status"] == "SERVING"


def test_address_from_the_environment(cli: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADSERVE_ADDRESS", cli.address)
    assert cli("health", address=False)[0] == 0
    monkeypatch.setenv("GRADSERVE_ADDRESS", "127.0.0.1:1")
    code, _, err = cli("--timeout", "5", "health", address=False)
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")


def test_create_from_json_and_yaml_equals_the_sdk(cli: Runner, client: Client,
                                                  tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    (tmp_path / "spec.yaml").write_text(YAML_SPEC)
    code, out, err = cli("create", str(tmp_path / "spec.json"), "--id", "from-json")
    assert code == 0, err
    assert "from-json" in out and "0.weight" in out
    created = cli.json("create", str(tmp_path / "spec.yaml"), "--id", "from-yaml")
    assert created["model_id"] == "from-yaml" and created["num_parameters"] == 13
    assert created["spec"]["optimizer"] == {"type": "sgd", "params": {"lr": 0.1}}
    reference = client.create_model(model_id="sdk", **SPEC).parameters()
    for model_id in ("from-json", "from-yaml"):
        params = client.model(model_id).parameters()
        for name, value in reference.items():
            assert torch.equal(params[name], value), (model_id, name)


def test_models_list_show_delete(cli: Runner, client: Client) -> None:
    client.create_model(model_id="m1", **SPEC)
    client.create_model(model_id="m2", **SPEC)
    code, out, _ = cli("models", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["ID", "STEP", "PARAMETERS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["m1", "m2"]
    listed = cli.json("models", "list")
    assert [(m["model_id"], m["num_parameters"]) for m in listed] == [("m1", 13), ("m2", 13)]
    shown = cli.json("models", "show", "m1")
    assert [p["name"] for p in shown["parameters"]] == ["0.weight", "0.bias", "2.weight",
                                                        "2.bias"]
    # --json after the command name works too
    code, out, _ = cli("models", "show", "m2", "--json")
    assert code == 0 and json.loads(out)["model_id"] == "m2"
    assert cli("models", "delete", "m1")[0] == 0
    assert [m.id for m in client.list_models()] == ["m2"]


def test_failed_call_exits_1_with_the_status(cli: Runner) -> None:
    code, out, err = cli("models", "show", "missing")
    assert (code, out) == (1, "")
    assert err.startswith("error: NOT_FOUND: ") and "missing" in err


def test_usage_errors_exit_2(cli: Runner, tmp_path: Path) -> None:
    assert cli("models", "frobnicate")[0] == 2
    assert cli("train")[0] == 2  # no model id
    assert cli()[0] == 2  # no command
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [], "colour": "red"}))
    code, _, err = cli("create", str(bad))
    assert code == 2 and "colour" in err
    code, _, err = cli("create", str(tmp_path / "absent.json"))
    assert code == 2 and "absent.json" in err
    code, _, err = cli("--client-cert", "c.pem", "health")
    assert code == 2 and "client_key" in err


def _sdk_trained(client: Client, x: np.ndarray, y: np.ndarray, **options: Any
                 ) -> dict[str, torch.Tensor]:
    model = client.create_model(**SPEC)
    list(model.train(x, y, **options))
    return model.parameters()  # type: ignore[no-any-return]


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("layout", ["npz", "npy", "csv"])
def test_train_from_files_equals_the_sdk(cli: Runner, client: Client, tmp_path: Path,
                                         layout: str) -> None:
    x, y = data()
    if layout == "npz":
        np.savez(tmp_path / "train.npz", x=x, y=y)
        files = ["--data", str(tmp_path / "train.npz")]
    elif layout == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        files = ["--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy")]
    else:
        np.savetxt(tmp_path / "train.csv", np.hstack([x, y]), delimiter=",", header="a,b,t",
                   comments="", fmt="%.9g")
        files = ["--data", str(tmp_path / "train.csv")]
    client.create_model(model_id="m", **SPEC)
    code, out, err = cli("train", "m", *files, "--epochs", "3", "--batch-size", "8",
                         "--shuffle", "--seed", "4")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("completed: 12 steps, 3 epochs")
    _assert_same(client.model("m").parameters(),
                 _sdk_trained(client, x, y, epochs=3, batch_size=8, shuffle=True, seed=4))


def test_train_classifier_from_csv_labels(cli: Runner, client: Client, tmp_path: Path) -> None:
    x, _ = data()
    labels = (x[:, 0] > x[:, 1]).astype(np.int64) + (x[:, 0] > 1).astype(np.int64)
    np.savetxt(tmp_path / "cls.csv", np.hstack([x, labels[:, None]]), delimiter=",",
               fmt="%.9g")
    spec = {"layers": [{"type": "Linear", "in_features": 2, "out_features": 3}],
            "loss": "cross_entropy", "optimizer": {"type": "sgd", "lr": 0.5}, "seed": 2}
    client.create_model(model_id="cls", **spec)
    code, _, err = cli("train", "cls", "--data", str(tmp_path / "cls.csv"), "--y-dtype", "int64",
                       "--epochs", "2", "--batch-size", "8")
    assert code == 0, err
    reference = client.create_model(**spec)
    list(reference.train(x, labels, epochs=2, batch_size=8))
    _assert_same(client.model("cls").parameters(), reference.parameters())


def test_train_json_lines_and_progress_bar(cli: Runner, client: Client, tmp_path: Path) -> None:
    x, y = data()
    np.savez(tmp_path / "train.npz", inputs=x, target=y)
    np.savez(tmp_path / "val.npz", x=x[:8], y=y[:8])
    client.create_model(model_id="m", **SPEC)
    code, out, err = cli("--json", "train", "m", "--data", str(tmp_path / "train.npz"),
                         "--val", str(tmp_path / "val.npz"), "--epochs", "2",
                         "--batch-size", "16", "--log-every", "1")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in events] == ["progress", "progress", "epoch_end"] * 2 + ["done"]
    assert all(e["val_loss"] is not None for e in events if e["kind"] == "epoch_end")
    assert events[-1]["summary"]["stop_reason"] == "completed"
    assert events[-1]["summary"]["model_step"] == client.model("m").info.step == 4

    code, out, err = cli("train", "m", "--data", str(tmp_path / "train.npz"), "--max-steps",
                         "3", "--batch-size", "8", "--progress")
    assert code == 0
    assert "3/3" in err  # the bar, on stderr
    assert out.startswith("max_steps: 3 steps")


def test_train_that_diverges_exits_1(cli: Runner, client: Client, tmp_path: Path) -> None:
    x, y = data()
    np.save(tmp_path / "x.npy", x * 1e3)
    np.save(tmp_path / "y.npy", y)
    client.create_model(model_id="m", **{**SPEC, "optimizer": {"type": "sgd", "lr": 1e6}})
    code, _, err = cli("train", "m", "--x", str(tmp_path / "x.npy"), "--y",
                       str(tmp_path / "y.npy"), "--epochs", "50")
    # Reported either as a failed call or as a DONE event with stop reason non_finite.
    assert code == 1
    assert err.startswith(("error: FAILED_PRECONDITION: ", "error: NON_FINITE: ")), err


def test_params_export_and_import(cli: Runner, client: Client, tmp_path: Path) -> None:
    import safetensors.numpy as safetensors_numpy  # the server extra depends on it
    model = client.create_model(model_id="m", **SPEC)
    expected = model.parameters()
    code, out, _ = cli("params", "show", "m")
    assert code == 0 and "2.weight" in out and "[1, 3]" in out

    assert cli("params", "export", "m", str(tmp_path / "w.safetensors"))[0] == 0
    assert cli("params", "export", "m", str(tmp_path / "w.npz"))[0] == 0
    from_st = safetensors_numpy.load_file(str(tmp_path / "w.safetensors"))
    with np.load(tmp_path / "w.npz") as from_npz:
        for name, value in expected.items():
            np.testing.assert_array_equal(from_st[name], value.numpy())
            np.testing.assert_array_equal(from_npz[name], value.numpy())

    changed = {k: v.numpy() * 2 for k, v in expected.items()}
    np.savez(tmp_path / "new.npz", **changed)
    assert cli("params", "import", "m", str(tmp_path / "new.npz"), "--names", "0.bias")[0] == 0
    after = model.parameters()
    np.testing.assert_array_equal(after["0.bias"].numpy(), changed["0.bias"])
    assert torch.equal(after["0.weight"], expected["0.weight"])
    assert cli("params", "import", "m", str(tmp_path / "w.safetensors"))[0] == 0
    _assert_same(model.parameters(), expected)
    code, _, err = cli("params", "export", "m", str(tmp_path / "w.txt"))
    assert code == 2 and ".safetensors or .npz" in err


def test_checkpoint_save_list_load(make_server: Callable[..., GradServer], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    server = make_server(state_dir=str(tmp_path / "state"))
    cli = Runner(f"127.0.0.1:{server.port}", capsys)
    with Client(cli.address) as client:
        model = client.create_model(model_id="m", **SPEC)
        x, y = data()
        model.backward(x, y, step=True)
        saved = cli.json("checkpoint", "save", "m", "--name", "ck1")
        assert (saved["name"], saved["model_id"], saved["step"]) == ("ck1", "m", 1)
        code, out, _ = cli("checkpoint", "list")
        assert code == 0 and out.splitlines()[1].split()[:3] == ["ck1", "m", "1"]
        restored = cli.json("checkpoint", "load", "ck1", "--into", "copy")
        assert (restored["model_id"], restored["step"]) == ("copy", 1)
        _assert_same(client.model("copy").parameters(), model.parameters())
        assert cli.json("checkpoint", "delete", "ck1") == {"deleted": ["ck1"]}
        assert client.list_checkpoints() == []
        code, _, err = cli("checkpoint", "delete", "ck1")
        assert code != 0 and "ck1" in err


def test_token_flag_and_environment(make_server: Callable[..., GradServer], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    cli = Runner(f"127.0.0.1:{make_server(auth_token_file=str(tokens)).port}", capsys)
    code, _, err = cli("models", "list")
    assert code == 1 and err.startswith("error: UNAUTHENTICATED: ")
    assert cli("--token", "t0ken", "models", "list")[0] == 0
    monkeypatch.setenv("GRADSERVE_TOKEN", "t0ken")
    assert cli("models", "list")[0] == 0


def test_console_entry_point_in_a_subprocess(server: GradServer, tmp_path: Path) -> None:
    # The installed `gradserve` script when present (the pyproject entry point), else -m.
    script = shutil.which("gradserve", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "gradserve.cli"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    env = {**os.environ, "GRADSERVE_ADDRESS": f"127.0.0.1:{server.port}"}
    done = subprocess.run([*command, "--json", "create", str(spec), "--id", "sub"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_id"] == "sub"
