"""Arrays, tensors and model specs in files: what the `gradserve` command reads and writes.

    from gradserve import io
    xs, y = io.read_dataset("train.npz")              # x (or x0, x1, ... or inputs) and y
    x = io.read_array("data.npz:features")             # .npy, .csv or .npz[:KEY]
    model = client.create_model(**io.read_spec("spec.yaml"))
    io.save_tensors(model.parameters(), "weights.safetensors", {"step": "3"})
    model.set_parameters(io.load_tensors("weights.safetensors"))

Every failure is a FileError naming the file and what is wrong. YAML needs PyYAML and
.safetensors needs safetensors: the server extra has both; with the SDK alone, from a clone of
gradserve, `pip install '.[cli]'`.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _ops, codec
from ._install import extra_hint

# Keys a spec file may hold: Client.create_model's keyword arguments.
SPEC_KEYS = tuple(inspect.signature(_ops.create_model).parameters)


class FileError(ValueError):
    """A file that cannot be read or written as asked; the message names it and says why."""


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise FileError(f"{path}: {exc.strerror or exc}") from None


def _load_npy_or_npz(path: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FileError(f"{path}: cannot read: {exc}") from None


def _load_npz(path: str) -> Any:
    loaded = _load_npy_or_npz(path)
    if isinstance(loaded, np.ndarray):
        raise FileError(f"{path}: holds one array (.npy), not an .npz archive")
    return loaded


# ------------------------------------------------------------------------------------ specs


def read_spec(path: str) -> dict[str, Any]:
    """A JSON or YAML (.yaml/.yml) model spec: the keyword arguments of Client.create_model."""
    text = _read_text(path)
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FileError(f"{path}: YAML specs need "
                            f"{extra_hint('cli', 'PyYAML')} (or use a .json spec)") from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FileError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise FileError(f"{path}: expected a mapping of create_model arguments, e.g. "
                        '{"layers": [...], "loss": "mse"}')
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise FileError(f"{path}: unknown key(s) {unknown}; expected some of {list(SPEC_KEYS)}")
    return spec


# ------------------------------------------------------------------------------------ arrays


def read_csv(path: str) -> np.ndarray:
    """A numeric CSV (an optional header row is skipped) as a 2-D float32 array."""
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise FileError(f"{path}: empty CSV")
    skip = 0
    try:
        [float(v) for v in lines[0].split(",")]
    except ValueError:
        skip = 1  # a header row
    try:
        return np.loadtxt(lines[skip:], delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise FileError(f"{path}: not a numeric CSV: {exc}") from None


def _split_key(ref: str) -> tuple[str, str | None]:
    """'data.npz:x' -> ('data.npz', 'x'); a plain path has no key."""
    path, sep, key = ref.rpartition(":")
    if sep and path.lower().endswith(".npz"):
        return path, key
    return ref, None


def read_array(ref: str) -> np.ndarray:
    """One array from FILE.npy, FILE.csv or FILE.npz[:KEY] (KEY optional with one array)."""
    path, key = _split_key(ref)
    if Path(path).suffix.lower() == ".csv":
        return read_csv(path)
    loaded = _load_npy_or_npz(path)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is None:
            if len(names) != 1:
                raise FileError(f"{path}: holds {names}; name one as {path}:KEY")
            key = names[0]
        if key not in names:
            raise FileError(f"{path}: no array {key!r}; it holds {names}")
        return np.asarray(loaded[key])


def read_dataset(path: str, x_keys: Sequence[str] = (), y_key: str | None = None,
                 target_column: str | int = -1
                 ) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """(inputs, target) from an .npz or a numeric CSV.

    .npz: inputs are the arrays x_keys, else x, inputs, or x0, x1, ...; the target is y_key,
    else y or target (none if absent). CSV: the column target_column (default the last;
    'none' for no target) is the target, shaped (n, 1); the other columns are the input.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return _csv_dataset(path, target_column)
    if suffix != ".npz":
        raise FileError(f"{path}: a dataset is an .npz or .csv file (read .npy files with "
                        "read_array)")
    with _load_npz(path) as loaded:
        names = set(loaded.files)
        keys = list(x_keys) or _default_x_keys(names)
        if not keys:
            raise FileError(f"{path}: no inputs: name them x (or x0, x1, ...) or inputs, or "
                            f"choose the input keys; it holds {sorted(names)}")
        ykey = y_key or next((k for k in ("y", "target") if k in names), None)
        missing = [k for k in [*keys, *([ykey] if ykey else [])] if k not in names]
        if missing:
            raise FileError(f"{path}: no array(s) {missing}; it holds {sorted(names)}")
        inputs = tuple(np.asarray(loaded[k]) for k in keys)
        return inputs, (np.asarray(loaded[ykey]) if ykey else None)


def _csv_dataset(path: str, target_column: str | int
                 ) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    table = read_csv(path)
    if str(target_column).lower() == "none":
        return (table,), None
    try:
        col = int(target_column)
        y = table[:, col]
    except (ValueError, IndexError):
        raise FileError(f"{path}: target column {target_column!r}: expected a column index "
                        f"within {table.shape[1]} columns, or 'none'") from None
    return (np.delete(table, col % table.shape[1], axis=1),), y[:, None]


def _default_x_keys(names: set[str]) -> list[str]:
    for key in ("x", "inputs"):
        if key in names:
            return [key]
    return sorted((k for k in names if k[:1] == "x" and k[1:].isdigit()), key=lambda k: int(k[1:]))


# ------------------------------------------------------------------------------------ tensors


def _safetensors(path: str, what: str) -> Any:
    try:
        import safetensors
    except ImportError:
        raise FileError(f"{path}: {what} .safetensors needs "
                        f"{extra_hint('cli', 'safetensors')} (or use .npz)") from None
    return safetensors


def _numpy(path: str, name: str, value: Any) -> np.ndarray:
    """value as a numpy array (npz and safetensors' numpy API); bfloat16 does not fit."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise FileError(f"{path}: {name} is bfloat16, which numpy cannot hold; save torch "
                            "tensors to .safetensors instead")
        return np.ascontiguousarray(value.detach().cpu().numpy())
    return np.ascontiguousarray(np.asarray(value))


def save_tensors(values: Mapping[str, Any], path: str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write name -> tensor (torch or numpy) to .safetensors (with string metadata) or .npz."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        _safetensors(path, "writing")
        torch = sys.modules.get("torch")
        meta = dict(metadata or {})
        if torch is not None and all(isinstance(v, torch.Tensor) for v in values.values()):
            from safetensors.torch import save_file as save_torch

            save_torch({k: v.detach().cpu().contiguous() for k, v in values.items()}, path,
                       metadata=meta)
        else:
            from safetensors.numpy import save_file as save_numpy

            save_numpy({k: _numpy(path, k, v) for k, v in values.items()}, path, metadata=meta)
    elif suffix == ".npz":
        arrays = {k: _numpy(path, k, v) for k, v in values.items()}
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds badly
    else:
        raise FileError(f"{path}: save tensors to .safetensors or .npz")


def load_tensors(path: str) -> dict[str, Any]:
    """name -> tensor from .safetensors or .npz: torch tensors when torch is importable (as
    results are), numpy arrays otherwise (.npz: always numpy)."""
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise FileError(f"{path}: no such file")
    if suffix == ".safetensors":
        safetensors = _safetensors(path, "reading")
        try:
            if codec.has_torch():
                from safetensors.torch import load_file as load_torch

                return dict(load_torch(path))
            from safetensors.numpy import load_file as load_numpy

            return dict(load_numpy(path))
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise FileError(f"{path}: not a readable safetensors file: {exc}") from None
    if suffix == ".npz":
        with _load_npz(path) as loaded:
            return {k: np.asarray(loaded[k]) for k in loaded.files}
    raise FileError(f"{path}: load tensors from .safetensors or .npz")


__all__ = ["FileError", "load_tensors", "read_array", "read_csv", "read_dataset", "read_spec",
           "save_tensors"]
