"""Bring your own architecture: a PyTorch module, exported with torch.export, as a model spec.

    client.create_model(module=net, example_inputs=(x,), loss="cross_entropy", ...)
    client.create_model(exported=torch.export.export(net, (x,)))   # or the bytes of a .pt2 file

torch is imported only here and only when a module or an ExportedProgram is given, so the rest
of the SDK installs without it. The server runs the graph, never this module's code
(docs/exported.md).
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

from ._proto.gradserve.v1 import gradserve_pb2 as pb


def export_module(module: Any, example_inputs: Any, *, dynamic_shapes: Any = None,
                  seed: int | None = None) -> bytes:
    """The .pt2 archive of module: the program "model" (train mode) and "eval" (eval mode).

    module: an nn.Module (its current values are the initial values), or a callable that makes
    one: then, with seed set, it is called as `torch.manual_seed(seed); module()` inside
    torch.random.fork_rng(), the same rule the server uses for layer models, so the local
    equivalent is `torch.manual_seed(seed); net = Net()`.
    example_inputs: a tensor or a tuple of tensors (the positional inputs of forward).
    dynamic_shapes: torch.export's argument; default: dimension 0 of every input is one shared
    dynamic batch dimension (examples need a batch of at least 2). Pass torch.export.Dim
    objects for more, e.g. ({0: Dim("batch"), 1: Dim("seq")},) for a variable sequence length.
    The module is exported in train mode and in eval mode (its mode is restored afterwards);
    when both graphs are the same only one program is written.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        if not callable(module):
            raise TypeError("module: expected an nn.Module or a callable that returns one")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            module = module()
        if not isinstance(module, torch.nn.Module):
            raise TypeError("module(): the factory did not return an nn.Module")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs: a tensor or a tuple of tensors (forward's inputs)")
    if dynamic_shapes is None:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)
    was_training = module.training
    programs = []
    try:
        for mode in (True, False):
            module.train(mode)
            programs.append(torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes))
    finally:
        module.train(was_training)
    train, ev = programs
    if train.graph_module.code == ev.graph_module.code:
        return _save(train)
    if set(train.state_dict) != set(ev.state_dict) or set(train.constants) != set(ev.constants):
        raise ValueError("module: its train-mode and eval-mode exports hold different state; "
                         "export one mode yourself and pass exported=")
    return _with_eval(_save(train), _save(ev))


def _save(program: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _with_eval(model: bytes, ev: bytes) -> bytes:
    """model's archive plus the eval program, which shares model's weight files."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(model)) as a, zipfile.ZipFile(io.BytesIO(ev)) as b, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        root = a.namelist()[0].split("/")[0]
        eroot = b.namelist()[0].split("/")[0]
        for info in a.infolist():
            z.writestr(info.filename, a.read(info))
        z.writestr(f"{root}/models/eval.json", b.read(f"{eroot}/models/model.json"))
        # Same state names as model (checked above): eval reads model's weight files.
        for table in ("weights/model_weights_config.json",
                      "constants/model_constants_config.json", "sample_inputs/model.pt"):
            folder, _, name = table.partition("/")
            z.writestr(f"{root}/data/{folder}/{name.replace('model', 'eval', 1)}",
                       a.read(f"{root}/data/{table}"))
    return out.getvalue()


def archive_bytes(exported: Any) -> bytes:
    """The bytes of an archive: bytes-like as is, a path read, an ExportedProgram saved."""
    if isinstance(exported, (bytes, bytearray, memoryview)):
        return bytes(exported)
    if isinstance(exported, (str, os.PathLike)):
        with open(exported, "rb") as f:
            return f.read()
    if type(exported).__name__ == "ExportedProgram":
        return _save(exported)
    raise TypeError("exported: expected an ExportedProgram, the bytes of a .pt2 archive or its "
                    f"path, got {type(exported).__name__}")


def exported_source(*, module: Any = None, example_inputs: Any = None, exported: Any = None,
                    dynamic_shapes: Any = None, loss_output: int | str | None = None,
                    seed: int | None = None) -> pb.ExportedSource:
    """The ExportedSource of a spec from create_model's module=/exported= arguments."""
    if (module is None) == (exported is None):
        raise ValueError("give module= (with example_inputs=) or exported=, not both")
    if module is not None:
        if example_inputs is None:
            raise ValueError("module=: example_inputs= is required (a tensor or a tuple)")
        data = export_module(module, example_inputs, dynamic_shapes=dynamic_shapes, seed=seed)
    else:
        if example_inputs is not None or dynamic_shapes is not None:
            raise ValueError("example_inputs= and dynamic_shapes= go with module=; an "
                             "exported program already has its shapes")
        data = archive_bytes(exported)
    source = pb.ExportedSource(archive=data)
    if isinstance(loss_output, str):
        source.output_name = loss_output
    elif loss_output is not None:
        if isinstance(loss_output, bool) or not isinstance(loss_output, int) or loss_output < 0:
            raise ValueError("loss_output: an output index (>= 0) or an output name")
        source.output_index = loss_output
    return source


__all__ = ["archive_bytes", "export_module", "exported_source"]
