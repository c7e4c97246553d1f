"""gradserve: the command-line client.

    gradserve health
    gradserve create spec.yaml --id m1
    gradserve train m1 --data train.npz --epochs 5 --batch-size 32 --shuffle
    gradserve params export m1 weights.safetensors
    gradserve --json models list
    gradserve --address gs-0:50051,gs-1:50051,gs-2:50051 models list     # several servers
    gradserve --address dns:///gradserve-headless:50051 rebalance --dry-run

Tables for people, --json for scripts. Exit codes: 0 ok, 1 the call failed ("error: CODE:
message" on stderr), 2 usage or unreadable input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from . import codec, io, rebalance
from .client import DEFAULT_TIMEOUT, Client
from .errors import GradServeError
from .model import RemoteModel
from .results import CheckpointInfo, ModelInfo, TrainSummary

DEFAULT_ADDRESS = "127.0.0.1:50051"
OK_REASONS = frozenset({"completed", "max_steps", "stop_loss"})
# Casts of files read with numpy (which has no bfloat16).
NUMPY_DTYPES = tuple(d for d in codec.DTYPE_NAMES if d != "bfloat16")


class UsageError(Exception):
    """Bad arguments or unreadable input files: exit status 2."""


# ------------------------------------------------------------------------------------ output


def _plain(value: Any) -> Any:
    """JSON-ready form of results: dataclasses, tensors, protobuf messages, tuples."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items() if k != "spec"}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _model_json(info: ModelInfo) -> dict[str, Any]:
    out = _plain(info)
    out["spec"] = json_format.MessageToDict(info.spec, preserving_proto_field_name=True)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under upper-case headers."""
    cells = [[h.upper() for h in headers], *[[_fmt(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


class Output:
    """Where results go: a table (people) or JSON (scripts) on stdout."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def emit(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.json:
            print(json.dumps(_plain(data), indent=2))
        else:
            print(text() if callable(text) else text)

    def line(self, data: Any) -> None:
        """One JSON document per line (streams such as training events)."""
        print(json.dumps(_plain(data)), flush=True)


def _date(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix).isoformat(sep=" ", timespec="seconds")


# ------------------------------------------------------------------------------------ input


def _cast(arrays: Sequence[np.ndarray], dtype: str | None) -> tuple[np.ndarray, ...]:
    if dtype is None:
        return tuple(arrays)
    return tuple(a.astype(dtype) for a in arrays)


def _json_arg(value: str, what: str) -> Any:
    """A name ('cosine') or a JSON object ('{"type": "step", "step_size": 10}')."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what}: not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------------ commands


def cmd_health(client: Client, args: argparse.Namespace, out: Output) -> int:
    if len(client.servers) == 1:
        status = client.health(args.service)
        out.emit({"address": client.address, "service": args.service, "status": status}, status)
        if status != "SERVING":
            print(f"error: {client.address} is {status}", file=sys.stderr)
            return 1
        return 0
    statuses = client.health_by_server(args.service)
    out.emit([{"address": s, "service": args.service, "status": v} for s, v in statuses.items()],
             lambda: table(["server", "status"], list(statuses.items())))
    bad = [f"{s} is {v}" for s, v in statuses.items() if v != "SERVING"]
    if bad:
        print(f"error: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _model_rows(models: Sequence[RemoteModel]) -> str:
    return table(["id", "step", "parameters", "loss", "optimizer", "device", "training"],
                 [[m.id, m.info.step, m.info.num_parameters, m.info.loss or "none",
                   m.info.optimizer or "sgd", m.info.device, m.info.training] for m in models])


def cmd_models_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    models = client.list_models()
    out.emit([_model_json(m.info) for m in models], lambda: _model_rows(models))
    return 0


def _show_model(info: ModelInfo) -> str:
    spec = info.spec
    source = spec.WhichOneof("source") or "-"
    head = table(["field", "value"], [
        ["id", info.model_id], ["source", source], ["step", info.step],
        ["device", info.device], ["parameters", info.num_parameters],
        ["dtype", codec.dtype_name(spec.dtype) if spec.dtype else "float32"],
        ["loss", info.loss or "none"], ["optimizer", info.optimizer or "sgd"],
        ["inputs", list(info.inputs) or None], ["retained graphs", info.retained_graphs],
        ["training", info.training]])
    return head + "\n\n" + _param_rows(info)


def _param_rows(info: ModelInfo) -> str:
    return table(["name", "shape", "dtype", "trainable", "buffer"],
                 [[p.name, list(p.shape), p.dtype, p.trainable, p.buffer]
                  for p in info.parameters])


def cmd_models_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.model(args.model).info
    out.emit(_model_json(info), lambda: _show_model(info))
    return 0


def cmd_models_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    for model_id in args.models:
        client.delete_model(model_id)
    out.emit({"deleted": list(args.models)}, "\n".join(f"deleted {m}" for m in args.models))
    return 0


def cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not args.spec and not args.exported:
        raise UsageError("give a spec file, --exported FILE.pt2, or both")
    spec = io.read_spec(args.spec) if args.spec else {}
    if args.exported:
        spec["exported"] = args.exported
    if isinstance(spec.get("exported"), str):  # a path: the archive's bytes go to the server
        try:
            spec["exported"] = Path(spec["exported"]).read_bytes()
        except OSError as exc:
            raise UsageError(f"exported: cannot read {spec['exported']}: {exc}") from None
    if args.id:
        spec["model_id"] = args.id
    try:
        model = client.create_model(**spec)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{args.spec or args.exported}: {exc}") from None
    out.emit(_model_json(model.info), lambda: _show_model(model.info))
    return 0


def _train_data(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(inputs, target, validation) from --data / --x --y / --val."""
    inputs: Any = None
    target: Any = None
    if args.data and (args.x or args.y):
        raise UsageError("give --data or --x/--y, not both")
    if args.dataset and (args.data or args.x or args.y):
        raise UsageError("give --dataset or local files, not both")
    if args.data:
        xs, y = io.read_dataset(args.data, args.x_key, args.y_key, args.target_column)
        inputs, target = _cast(xs, args.x_dtype), y
    elif args.x or args.y:
        inputs = _cast([io.read_array(r) for r in args.x], args.x_dtype) or None
        target = io.read_array(args.y) if args.y else None
    if target is not None and args.y_dtype:
        target = _labels(target.astype(args.y_dtype))
    if isinstance(inputs, tuple) and len(inputs) == 1:
        inputs = inputs[0]
    validation: Any = None
    if args.val:
        vx, vy = io.read_dataset(args.val, args.x_key, args.y_key, args.target_column)
        vxs = _cast(vx, args.x_dtype)
        validation = (vxs[0] if len(vxs) == 1 else vxs,
                      _labels(vy.astype(args.y_dtype)) if vy is not None and args.y_dtype
                      else vy)
    elif args.val_dataset:
        validation = args.val_dataset
    return inputs, target, validation


def _labels(target: np.ndarray) -> np.ndarray:
    """An integer target of one column (a CSV column) becomes class labels of shape (n,)."""
    if target.dtype.kind in "iu" and target.ndim == 2 and target.shape[1] == 1:
        return target[:, 0]
    return target


def _describe(summary: TrainSummary) -> str:
    text = (f"{summary.stop_reason}: {summary.steps} steps, {summary.epochs} epochs, "
            f"final loss {summary.final_loss:.6g}, model step {summary.model_step}")
    if summary.skipped_batches:
        text += f", {summary.skipped_batches} batches skipped"
    return text + (f" ({summary.message})" if summary.message else "")


def cmd_train(client: Client, args: argparse.Namespace, out: Output) -> int:
    inputs, target, validation = _train_data(args)
    schedule = _json_arg(args.schedule, "--schedule") if args.schedule else None
    progress = args.progress if args.progress is not None else (
        sys.stderr.isatty() and not out.json)
    model = client.model(args.model)
    try:
        run = model.train(
            inputs, target, dataset=args.dataset, validation=validation, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, shuffle=args.shuffle,
            seed=args.seed, drop_last=args.drop_last, stop_loss=args.stop_loss,
            accumulation_steps=args.accumulation_steps, clip_grad_norm=args.clip_grad_norm,
            schedule=schedule, log_every_steps=args.log_every,
            skip_nonfinite=args.skip_nonfinite, checkpoint_every_steps=args.checkpoint_every,
            progress=progress)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        for event in run:
            if out.json:
                out.line(event)
            elif event.kind == "epoch_end" and not progress:
                val = f", val loss {event.val_loss:.6g}" if event.val_loss is not None else ""
                print(f"epoch {event.epoch}: step {event.step}, loss {event.epoch_loss:.6g}{val}",
                      flush=True)
    except KeyboardInterrupt:
        run.cancel()
        print(f"\ninterrupted: the run on {model.id} was cancelled at the next step boundary",
              file=sys.stderr)
        return 130
    summary = run.summary
    if summary is None:
        print("error: the run ended without a summary", file=sys.stderr)
        return 1
    if not out.json:
        print(_describe(summary))
    if summary.stop_reason not in OK_REASONS:
        print(f"error: {summary.stop_reason.upper()}: {summary.message or _describe(summary)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_params_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.model(args.model).info
    out.emit(_plain(info.parameters), lambda: _param_rows(info))
    return 0


def cmd_params_export(client: Client, args: argparse.Namespace, out: Output) -> int:
    model = client.model(args.model)
    if args.grads:
        values = model.grads(args.names)
    else:
        values = model.parameters(args.names, buffers=args.buffers)
    io.save_tensors(values, args.file, {"model_id": model.id, "step": str(model.info.step),
                                       "kind": "grads" if args.grads else "parameters"})
    out.emit({"model_id": model.id, "file": args.file, "step": model.info.step,
              "names": list(values)},
             f"wrote {len(values)} tensor(s) of {model.id} (step {model.info.step}) to "
             f"{args.file}")
    return 0


def cmd_params_import(client: Client, args: argparse.Namespace, out: Output) -> int:
    values = io.load_tensors(args.file)
    if args.names:
        missing = [n for n in args.names if n not in values]
        if missing:
            raise UsageError(f"{args.file}: no tensor(s) {missing}; it holds {list(values)}")
        values = {n: values[n] for n in args.names}
    client.model(args.model).set_parameters(values)
    out.emit({"model_id": args.model, "file": args.file, "names": list(values)},
             f"set {len(values)} tensor(s) of {args.model} from {args.file}")
    return 0


def _checkpoint_rows(items: Sequence[CheckpointInfo]) -> str:
    rows = table(["name", "model", "step", "bytes", "created"],
                 [[c.name, c.model_id, c.step, c.num_bytes, _date(c.created_unix)]
                  for c in items])
    damaged = [f"{c.name}: {c.error}" for c in items if c.error]
    return "\n".join([rows, *damaged])


def cmd_checkpoint_save(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.save_checkpoint(args.model, args.name)
    out.emit(info, lambda: _checkpoint_rows([info]))
    return 0


def cmd_checkpoint_load(client: Client, args: argparse.Namespace, out: Output) -> int:
    model = client.load_checkpoint(args.name, args.into)
    out.emit(_model_json(model.info), lambda: _show_model(model.info))
    return 0


def cmd_checkpoint_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    items = client.list_checkpoints()
    out.emit(items, lambda: _checkpoint_rows(items))
    return 0


def cmd_checkpoint_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    for name in args.names:
        client.delete_checkpoint(name)
    out.emit({"deleted": list(args.names)}, "\n".join(f"deleted {n}" for n in args.names))
    return 0


def cmd_datasets_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    items = client.list_datasets()
    out.emit(items, lambda: table(["id", "samples", "bytes"],
                                  [[d.dataset_id, d.num_samples, d.num_bytes] for d in items]))
    return 0


def cmd_datasets_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    for dataset_id in args.datasets:
        client.delete_dataset(dataset_id)
    out.emit({"deleted": list(args.datasets)},
             "\n".join(f"deleted {d}" for d in args.datasets))
    return 0


def _move_rows(moves: Sequence[rebalance.Move]) -> str:
    return table(["model", "from", "to", "status", "note"],
                 [[m.model_id, m.source, m.target, m.status, m.note or None] for m in moves])


def cmd_rebalance(client: Client, args: argparse.Namespace, out: Output) -> int:
    drain = [s for value in args.drain for s in servers_of(value)]
    with rebalance.Rebalancer(list(client.servers), drain, **_client_options(args)) as rb:
        plan = rb.plan()
        if not args.dry_run:
            rb.run(plan, report=None if out.json else lambda m: print(
                f"{m.model_id}: {m.status}{f' ({m.note})' if m.note else ''}", file=sys.stderr,
                flush=True))

    def text() -> str:
        moved = sum(m.status == rebalance.MOVED for m in plan.moves)
        done = (f"{len(plan.moves)} model(s) would move" if args.dry_run
                else f"{moved} of {len(plan.moves)} model(s) moved")
        lines = [_move_rows(plan.moves)] if plan.moves else []
        lines.append(f"{done}, {plan.staying} already on their server, over "
                     f"{len(plan.servers)} server(s)"
                     + (" (dry run: nothing was changed)" if args.dry_run else ""))
        return "\n".join([*lines, *(f"note: {n}" for n in plan.notes)])

    out.emit({"dry_run": args.dry_run, "servers": list(plan.servers),
              "drain": list(plan.drain), "moves": plan.moves, "staying": plan.staying,
              "notes": plan.notes}, text)
    if not args.dry_run and not plan.ok:
        print("error: some models were not moved (see their status); run the rebalance again",
              file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ parser


def _global_options(parser: argparse.ArgumentParser, environ: Mapping[str, str],
                    suppress: bool) -> None:
    """Connection and output flags. Leaf commands take them too (after the command name); there
    they default to SUPPRESS so that a flag given before the command is kept."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection and output")
    servers = ("server host:port; several, comma-separated, or dns:///NAME:PORT for every "
               "address of a name (env GRADSERVE_ADDRESS")
    g.add_argument("--address", default=default(environ.get("GRADSERVE_ADDRESS",
                                                            DEFAULT_ADDRESS)),
                   help=f"{servers}; default %(default)s)" if not suppress else f"{servers})")
    g.add_argument("--token", default=default(environ.get("GRADSERVE_TOKEN")),
                   help="bearer token (env GRADSERVE_TOKEN)")
    g.add_argument("--tls", action="store_true", default=default(False),
                   help="use TLS with the system's root certificates")
    g.add_argument("--root-certificates", metavar="PEM", default=default(None),
                   help="CA bundle to verify the server (implies --tls)")
    g.add_argument("--client-cert", metavar="PEM", default=default(None),
                   help="client certificate for mutual TLS (with --client-key)")
    g.add_argument("--client-key", metavar="PEM", default=default(None),
                   help="client private key for mutual TLS")
    g.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT),
                   help="deadline of each call in seconds (training runs have none)")
    g.add_argument("--json", action="store_true", default=default(False),
                   help="print JSON for scripts instead of tables")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="gradserve", description="Command-line client of a gradserve server.",
        epilog="Exit codes: 0 ok, 1 the call failed, 2 usage error, 130 interrupted.")
    _global_options(parser, environ, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, fn: Callable[..., int], help: str
             ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        _global_options(p, environ, suppress=True)
        p.set_defaults(fn=fn)
        return p

    def branch(name: str, help: str) -> Any:
        p = commands.add_parser(name, help=help, description=help)
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = leaf(commands, "health", cmd_health, "check the server's health (exit 1 unless SERVING)")
    p.add_argument("--service", default="", help="service name (default: the whole server)")

    models = branch("models", "list, show or delete models")
    leaf(models, "list", cmd_models_list, "list every model")
    p = leaf(models, "show", cmd_models_show, "describe one model and its parameters")
    p.add_argument("model", help="model id")
    p = leaf(models, "delete", cmd_models_delete, "delete models")
    p.add_argument("models", nargs="+", metavar="model", help="model id(s)")

    p = leaf(commands, "create", cmd_create,
             "create a model from a JSON or YAML spec (the keyword arguments of "
             "Client.create_model: layers/expression/plugin, loss, optimizer, seed, ...)")
    p.add_argument("spec", nargs="?", help="spec file (.json, .yaml or .yml)")
    p.add_argument("--id", help="model id (overrides model_id in the spec)")
    p.add_argument("--exported", metavar="FILE.pt2",
                   help="a torch.export archive (torch.export.save); the spec file, if any, "
                        "adds loss, optimizer, loss_output, ...")

    p = leaf(commands, "train", cmd_train, "train a model on the server with a progress bar")
    _train_options(p)

    params = branch("params", "show, export or import a model's parameters")
    p = leaf(params, "show", cmd_params_show, "list parameter names, shapes and dtypes")
    p.add_argument("model", help="model id")
    p = leaf(params, "export", cmd_params_export, "write parameters to .safetensors or .npz")
    p.add_argument("model", help="model id")
    p.add_argument("file", help="output file (.safetensors or .npz)")
    p.add_argument("--names", nargs="+", default=[], help="only these parameters")
    p.add_argument("--buffers", action="store_true", help="include buffers (e.g. BatchNorm)")
    p.add_argument("--grads", action="store_true",
                   help="export the accumulated gradients instead")
    p = leaf(params, "import", cmd_params_import,
             "overwrite parameters from .safetensors or .npz (names must match)")
    p.add_argument("model", help="model id")
    p.add_argument("file", help="input file (.safetensors or .npz)")
    p.add_argument("--names", nargs="+", default=[], help="only these tensors of the file")

    ckpt = branch("checkpoint", "save, load, list or delete checkpoints (server --state-dir)")
    p = leaf(ckpt, "save", cmd_checkpoint_save, "checkpoint a model")
    p.add_argument("model", help="model id")
    p.add_argument("--name", default="", help="checkpoint name (default: the model id)")
    p = leaf(ckpt, "load", cmd_checkpoint_load, "restore a model from a checkpoint")
    p.add_argument("name", help="checkpoint name")
    p.add_argument("--into", default="", metavar="MODEL",
                   help="model id to restore into (default: the id saved in the checkpoint)")
    leaf(ckpt, "list", cmd_checkpoint_list, "list checkpoints")
    p = leaf(ckpt, "delete", cmd_checkpoint_delete, "delete checkpoints from the state dir")
    p.add_argument("names", nargs="+", metavar="name", help="checkpoint name(s)")

    p = leaf(commands, "rebalance", cmd_rebalance,
             "move every model that is not on the server owning its id (after servers were "
             "added or removed: docs/scaling.md); --address names the servers from now on")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--drain", nargs="+", default=[], metavar="ADDRESS",
                   help="servers being removed: move all their models to the others")

    datasets = branch("datasets", "list or delete uploaded datasets")
    leaf(datasets, "list", cmd_datasets_list, "list datasets")
    p = leaf(datasets, "delete", cmd_datasets_delete, "delete datasets")
    p.add_argument("datasets", nargs="+", metavar="dataset", help="dataset id(s)")
    return parser


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model id")
    data = p.add_argument_group("data (one of --data, --x/--y, --dataset; none for objectives)")
    data.add_argument("--data", metavar="FILE",
                      help=".npz with x (or x0, x1, ... or inputs) and y (or target), or a "
                      "numeric .csv whose --target-column is the target")
    data.add_argument("--x", action="append", default=[], metavar="FILE[:KEY]",
                      help="an input array (.npy, .csv or .npz[:KEY]); repeat for more inputs")
    data.add_argument("--y", metavar="FILE[:KEY]", help="the target array (.npy, .csv, .npz)")
    data.add_argument("--dataset", help="id of a dataset uploaded to the server")
    data.add_argument("--val", metavar="FILE", help="validation data, as --data")
    data.add_argument("--val-dataset", metavar="ID", help="validation dataset id")
    data.add_argument("--x-key", action="append", default=[], metavar="KEY",
                      help="input array name(s) in .npz files given with --data/--val")
    data.add_argument("--y-key", metavar="KEY", help="target array name in .npz files")
    data.add_argument("--target-column", default="-1", metavar="N",
                      help="CSV target column index (default -1, the last) or 'none'")
    data.add_argument("--x-dtype", choices=NUMPY_DTYPES, help="cast the inputs (e.g. float64)")
    data.add_argument("--y-dtype", choices=NUMPY_DTYPES,
                      help="cast the target (e.g. int64 for cross_entropy)")
    loop = p.add_argument_group("loop (see TrainOptions in the proto)")
    loop.add_argument("--epochs", type=int, default=0, help="passes over the data")
    loop.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps")
    loop.add_argument("--batch-size", type=int, default=0, help="samples per batch (0: all)")
    loop.add_argument("--shuffle", action="store_true", help="shuffle every epoch")
    loop.add_argument("--seed", type=int, default=0, help="shuffle seed")
    loop.add_argument("--drop-last", action="store_true", help="drop the last partial batch")
    loop.add_argument("--stop-loss", type=float, help="stop once an epoch's loss is below")
    loop.add_argument("--accumulation-steps", type=int, default=1, help="batches per step")
    loop.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the grad norm")
    loop.add_argument("--schedule", metavar="NAME|JSON",
                      help='lr schedule: a name or JSON, e.g. \'{"type": "step", '
                      '"step_size": 10, "gamma": 0.5, "warmup_steps": 5}\'')
    loop.add_argument("--log-every", type=int, default=0, metavar="N",
                      help="a progress event every N steps")
    loop.add_argument("--skip-nonfinite", action="store_true", help="skip NaN/inf batches")
    loop.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                      help="autosave every N steps (needs the server's --state-dir)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always draw the progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never draw the progress bar")


def servers(address: str) -> str | list[str]:
    """--address: one server (kept as given), or several separated by commas."""
    return address if "," not in address else servers_of(address)


def servers_of(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"token": args.token, "tls": args.tls, "root_certificates": args.root_certificates,
            "client_cert": args.client_cert, "client_key": args.client_key,
            "timeout": args.timeout}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gradserve` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    out = Output(args.json)
    try:
        client = Client(servers(args.address), **_client_options(args))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            return int(args.fn(client, args, out))
    except (UsageError, io.FileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GradServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"error: DEADLINE_EXCEEDED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
