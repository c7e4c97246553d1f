"""gradserve.io: the file formats the CLI reads and writes, as SDK users call them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gradserve import io


def test_read_spec_json_and_yaml_are_create_model_arguments(tmp_path: Path) -> None:
    spec = {"layers": [{"type": "Linear", "in_features": 2, "out_features": 1}], "loss": "mse"}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    (tmp_path / "s.yaml").write_text("layers:\n  - {type: Linear, in_features: 2, "
                                     "out_features: 1}\nloss: mse\n")
    assert io.read_spec(str(tmp_path / "s.json")) == spec == io.read_spec(str(tmp_path / "s.yaml"))
    for name, text, needle in [("a.json", '{"colour": 1}', "unknown key(s) ['colour']"),
                               ("b.json", "[1, 2]", "expected a mapping"),
                               ("c.json", "{", "not valid JSON"),
                               ("d.yaml", "a: [", "not valid YAML")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(io.FileError, match=rf"{name}: .*{re.escape(needle)}"):
            io.read_spec(str(tmp_path / name))
    with pytest.raises(io.FileError, match="absent.json"):
        io.read_spec(str(tmp_path / "absent.json"))


def test_read_array_from_npy_npz_and_csv(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "one.npz", only=x)
    np.savez(tmp_path / "two.npz", a=x, b=-x)
    (tmp_path / "x.csv").write_text("c1,c2\n0,1\n2,3\n4,5\n")  # a header row is skipped
    assert np.array_equal(io.read_array(str(tmp_path / "x.npy")), x)
    assert np.array_equal(io.read_array(str(tmp_path / "one.npz")), x)
    assert np.array_equal(io.read_array(f"{tmp_path / 'two.npz'}:b"), -x)
    csv = io.read_array(str(tmp_path / "x.csv"))
    assert csv.dtype == np.float32 and np.array_equal(csv, x)
    with pytest.raises(io.FileError, match=r"holds \['a', 'b'\]; name one"):
        io.read_array(str(tmp_path / "two.npz"))
    with pytest.raises(io.FileError, match="no array 'c'"):
        io.read_array(f"{tmp_path / 'two.npz'}:c")
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(io.FileError, match="bad.csv: not a numeric CSV"):
        io.read_array(str(tmp_path / "bad.csv"))


def test_read_dataset_keys_and_csv_target_column(tmp_path: Path) -> None:
    x0, x1, y = np.ones((4, 2)), np.zeros((4, 3)), np.arange(4.0)
    np.savez(tmp_path / "multi.npz", x1=x1, x0=x0, target=y)
    (xs, target) = io.read_dataset(str(tmp_path / "multi.npz"))
    assert [a.shape for a in xs] == [(4, 2), (4, 3)] and np.array_equal(target, y)
    (xs, target) = io.read_dataset(str(tmp_path / "multi.npz"), x_keys=["x1"], y_key="x0")
    assert len(xs) == 1 and np.array_equal(xs[0], x1) and np.array_equal(target, x0)
    np.savez(tmp_path / "nox.npz", y=y)
    with pytest.raises(io.FileError, match="no inputs"):
        io.read_dataset(str(tmp_path / "nox.npz"))
    (tmp_path / "t.csv").write_text("1,2,3\n4,5,6\n")
    (xs, target) = io.read_dataset(str(tmp_path / "t.csv"), target_column=0)
    assert np.array_equal(xs[0], [[2, 3], [5, 6]]) and np.array_equal(target, [[1], [4]])
    (xs, target) = io.read_dataset(str(tmp_path / "t.csv"), target_column="none")
    assert xs[0].shape == (2, 3) and target is None
    with pytest.raises(io.FileError, match="target column '7'"):
        io.read_dataset(str(tmp_path / "t.csv"), target_column="7")
    np.save(tmp_path / "x.npy", x0)
    with pytest.raises(io.FileError, match="an .npz or .csv file"):
        io.read_dataset(str(tmp_path / "x.npy"))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_and_load_tensors_round_trip(tmp_path: Path, suffix: str) -> None:
    values = {"w": torch.randn(3, 2), "b": torch.arange(3), "flag": torch.tensor([True])}
    path = str(tmp_path / f"t{suffix}")
    io.save_tensors(values, path, {"step": "7"})
    loaded = io.load_tensors(path)
    assert list(loaded) == sorted(values) or set(loaded) == set(values)
    for name, value in values.items():
        assert np.array_equal(np.asarray(loaded[name]), value.numpy()), name
    numpy_values = {k: v.numpy() for k, v in values.items()}
    io.save_tensors(numpy_values, path)
    assert all(np.array_equal(np.asarray(io.load_tensors(path)[k]), v)
               for k, v in numpy_values.items())


def test_bfloat16_goes_to_safetensors_only(tmp_path: Path) -> None:
    values = {"w": torch.randn(4).to(torch.bfloat16)}
    io.save_tensors(values, str(tmp_path / "w.safetensors"))
    assert torch.equal(io.load_tensors(str(tmp_path / "w.safetensors"))["w"], values["w"])
    with pytest.raises(io.FileError, match="w is bfloat16"):
        io.save_tensors(values, str(tmp_path / "w.npz"))


def test_tensor_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(io.FileError, match=r"w\.txt: save tensors to .safetensors or .npz"):
        io.save_tensors({}, str(tmp_path / "w.txt"))
    with pytest.raises(io.FileError, match="missing.npz: no such file"):
        io.load_tensors(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(io.FileError, match="junk.safetensors: not a readable"):
        io.load_tensors(str(tmp_path / "junk.safetensors"))
