"""The SDK's one body of logic: build requests, decode replies. Sync and async clients share it.

Each public call is an `Op`: which RPC, the request message, how to decode the reply, and whether
the call is safe to retry. Clients only differ in how they send an Op.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf import struct_pb2

from . import _channel, codec, wire
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from .errors import GradServeError

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Op(Generic[T]):
    rpc: str
    request: Any
    decode: Callable[[Any], T]
    # Which stub sends it: "gradient" (GradientService) or "health" (grpc.health.v1.Health).
    service: str = "gradient"
    # False: no default deadline, only an explicit timeout (uploads scale with the data size).
    deadline: bool = True

    @property
    def retryable(self) -> bool:
        return self.rpc in _channel.RETRYABLE and not (
            self.rpc == "Forward" and self.request.retain_graph)

    def then(self, fn: Callable[[T], U]) -> Op[U]:
        """The same call, its decoded reply passed through fn (e.g. info -> RemoteModel)."""
        decode = self.decode
        return Op(self.rpc, self.request, lambda reply: fn(decode(reply)), self.service,
                  self.deadline)


# A call sequence written once for both clients (polling loops): a generator that yields
# (Op, timeout) to have the op run and its result sent back (errors are thrown in), or a float to
# pause that many seconds; its return value is the result. Client._drive and AsyncClient._drive
# interpret it with blocking and awaiting I/O respectively.
Program = Generator[tuple[Op[Any], float | None] | float, Any, T]


def poll(op: Op[T], ready: Callable[[T], bool], timeout: float, what: str, *,
         tolerate_errors: bool = False, interval: float = 0.1, call_timeout: float = 2.0
         ) -> Program[T]:
    """Run op until ready(result) or timeout seconds pass (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = yield op, max(0.1, min(call_timeout, deadline - time.monotonic()))
            if ready(result):
                return result
        except GradServeError:
            if not tolerate_errors:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        yield interval


def returning(value: U, program: Program[Any]) -> Program[U]:
    """Run program, then return value instead of its result."""
    yield from program
    return value


def request_id() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------ values


def tensor(value: Any, what: str = "tensor") -> pb.Tensor:
    try:
        return codec.encode(value)
    except (codec.CodecError, TypeError, ValueError) as exc:
        raise TypeError(f"{what}: cannot send {type(value).__name__} as a tensor: {exc}") from None


def tensor_part(value: Any, what: str, payloads: dict[Any, Any], path: tuple[Any, ...]
                ) -> pb.Tensor:
    """tensor(), but a large payload goes into payloads[path] (a zero-copy view, see gradserve.wire)."""
    try:
        msg, payload = codec.encode_parts(value, minimum=wire.MIN_PAYLOAD)
    except (codec.CodecError, TypeError, ValueError) as exc:
        raise TypeError(f"{what}: cannot send {type(value).__name__} as a tensor: {exc}") from None
    if payload is not None:
        payloads[path] = payload
    return msg


def tensors(values: Any, what: str) -> list[pb.Tensor]:
    """None -> [], a tuple -> several inputs, anything else -> one input."""
    if values is None:
        return []
    if isinstance(values, tuple):
        return [tensor(v, f"{what}[{i}]") for i, v in enumerate(values)]
    return [tensor(values, what)]


def named(values: Mapping[str, Any] | None, what: str) -> dict[str, pb.Tensor]:
    return {k: tensor(v, f"{what}[{k}]") for k, v in (values or {}).items()}


def decode_named(msgs: Mapping[str, pb.Tensor], order: Sequence[str] = ()) -> dict[str, Any]:
    """Decode a map, in `order` first (state_dict order), then any others sorted."""
    keys = [k for k in order if k in msgs] + sorted(k for k in msgs if k not in set(order))
    return {k: codec.decode(msgs[k], k) for k in keys}


def struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if values:
        out.update(dict(values))
    return out


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ParameterInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    buffer: bool


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    step: int
    device: str
    num_parameters: int
    parameters: tuple[ParameterInfo, ...]
    inputs: tuple[str, ...]
    retained_graphs: int
    training: bool
    loss: str
    optimizer: str
    spec: pb.ModelSpec = field(repr=False)

    @property
    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters if not p.buffer]


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_id=msg.model_id, step=msg.step, device=msg.device,
        num_parameters=msg.num_parameters,
        parameters=tuple(ParameterInfo(p.name, tuple(p.shape), codec.dtype_name(p.dtype),
                                       p.trainable, p.buffer) for p in msg.parameters),
        inputs=tuple(msg.inputs), retained_graphs=msg.retained_graphs, training=msg.training,
        loss=msg.spec.loss.type, optimizer=msg.spec.optimizer.type, spec=msg.spec,
    )


@dataclass(frozen=True)
class ForwardResult:
    output: Any
    forward_id: str


@dataclass(frozen=True)
class BackwardResult:
    """loss: float (None with grad_output); grads: name -> tensor; input_grads: list."""

    loss: float | None
    step: int
    grads: dict[str, Any]
    input_grads: list[Any]
    output: Any | None


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    num_samples: int
    num_bytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    model_id: str
    step: int
    num_bytes: int
    created_unix: float


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    epochs: int
    final_loss: float
    stop_reason: str
    skipped_batches: int
    message: str
    model_step: int


@dataclass(frozen=True)
class TrainEvent:
    """kind: 'progress', 'epoch_end' or 'done' (the last, with summary)."""

    kind: str
    step: int
    epoch: int
    batch_loss: float
    epoch_loss: float
    samples_per_second: float
    learning_rate: float
    grad_norm: float
    elapsed_seconds: float
    val_loss: float | None
    summary: TrainSummary | None
    run_step: int = 0


@dataclass(frozen=True)
class StreamStep:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool


_KIND = {pb.EVENT_KIND_PROGRESS: "progress", pb.EVENT_KIND_EPOCH_END: "epoch_end",
         pb.EVENT_KIND_DONE: "done"}


def _reason(value: int) -> str:
    return pb.StopReason.Name(value).removeprefix("STOP_REASON_").lower()


def train_event(msg: pb.TrainEvent) -> TrainEvent:
    summary = None
    if msg.HasField("summary"):
        s = msg.summary
        summary = TrainSummary(s.steps, s.epochs, s.final_loss, _reason(s.stop_reason),
                               s.skipped_batches, s.message, s.model_step)
    return TrainEvent(_KIND.get(msg.kind, "unknown"), msg.step, msg.epoch, msg.batch_loss,
                      msg.epoch_loss, msg.samples_per_second, msg.learning_rate, msg.grad_norm,
                      msg.elapsed_seconds, msg.val_loss if msg.HasField("val_loss") else None,
                      summary, msg.run_step)


def stream_step(msg: pb.TrainStreamResponse) -> StreamStep:
    return StreamStep(msg.step, msg.loss, msg.grad_norm, msg.learning_rate, msg.skipped)


def dataset_info(msg: pb.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(msg.dataset_id, msg.num_samples, msg.num_bytes)


def checkpoint_info(msg: pb.CheckpointInfo) -> CheckpointInfo:
    return CheckpointInfo(msg.name, msg.model_id, msg.step, msg.num_bytes, msg.created_unix)


# ------------------------------------------------------------------------------------ requests


def create_model(
    *,
    model_id: str = "",
    layers: Sequence[Mapping[str, Any]] | None = None,
    expression: str | None = None,
    plugin: str | None = None,
    plugin_kwargs: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    parameters: Mapping[str, Any] | None = None,
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
    loss: str | Mapping[str, Any] | None = None,
    optimizer: str | Mapping[str, Any] | None = None,
    seed: int | None = None,
    initial_parameters: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> Op[ModelInfo]:
    given = [x is not None for x in (layers, expression, plugin)]
    if sum(given) != 1:
        raise ValueError("give exactly one of layers=, expression= or plugin=")
    spec = pb.ModelSpec(frozen=list(frozen), dtype=codec.dtype_wire(dtype))
    if layers is not None:
        spec.layers.SetInParent()  # an empty list is still "layers" (the server says what's wrong)
        for i, layer in enumerate(layers):
            layer = dict(layer)
            kind = layer.pop("type", None)
            if not isinstance(kind, str):
                raise ValueError(f"layers[{i}]: needs a 'type', e.g. {{'type': 'Linear', ...}}")
            spec.layers.layers.append(pb.Layer(type=kind, kwargs=struct(layer)))
    elif expression is not None:
        spec.expression.SetInParent()
        spec.expression.expression = expression
        spec.expression.inputs.extend(inputs)
        for name, value in (parameters or {}).items():
            spec.expression.parameters[name].CopyFrom(tensor(value, f"parameters[{name}]"))
        if trainable is not None:
            unknown = set(trainable) - set(parameters or {})
            if unknown:
                raise ValueError(f"trainable: {sorted(unknown)} are not in parameters")
            spec.frozen.extend(n for n in (parameters or {}) if n not in trainable)
    else:
        spec.plugin.SetInParent()
        spec.plugin.name = plugin or ""
        spec.plugin.kwargs.CopyFrom(struct(plugin_kwargs))
    if loss is not None:
        cfg = {"type": loss} if isinstance(loss, str) else dict(loss)
        spec.loss.type = cfg.pop("type", "")
        spec.loss.reduction = cfg.pop("reduction", "")
        spec.loss.kwargs.CopyFrom(struct(cfg))
    if optimizer is not None:
        cfg = {"type": optimizer} if isinstance(optimizer, str) else dict(optimizer)
        spec.optimizer.type = cfg.pop("type", "sgd")
        spec.optimizer.params.CopyFrom(struct(cfg))
    if seed is not None:
        spec.seed = seed
    for name, value in named(initial_parameters, "initial_parameters").items():
        spec.initial_parameters[name].CopyFrom(value)
    return Op("CreateModel", pb.CreateModelRequest(model_id=model_id, spec=spec), model_info)


def forward(model_id: str, inputs: Sequence[Any], retain_graph: bool, eval_mode: bool
            ) -> Op[Any]:
    payloads: dict[Any, Any] = {}
    req = wire.framed(pb.ForwardRequest(
        model_id=model_id, retain_graph=retain_graph, eval_mode=eval_mode,
        inputs=[tensor_part(x, f"inputs[{i}]", payloads, ("inputs", i))
                for i, x in enumerate(inputs)]), payloads)
    if retain_graph:
        return Op("Forward", req, lambda r: ForwardResult(codec.decode(r.output, "output"),
                                                          r.forward_id))
    return Op("Forward", req, lambda r: codec.decode(r.output, "output"))


def backward(model_id: str, order: Sequence[str], inputs: Any = None, target: Any = None, *,
             forward_id: str = "", grad_output: Any = None, return_grads: bool = False,
             return_input_grads: bool = False, step: bool = False, return_output: bool = False
             ) -> Op[BackwardResult]:
    payloads: dict[Any, Any] = {}
    xs = () if inputs is None else inputs if isinstance(inputs, tuple) else (inputs,)
    msg = pb.BackwardRequest(
        model_id=model_id, forward_id=forward_id,
        inputs=[tensor_part(x, f"inputs[{i}]" if isinstance(inputs, tuple) else "inputs",
                            payloads, ("inputs", i)) for i, x in enumerate(xs)],
        return_grads=return_grads, return_input_grads=return_input_grads, step=step,
        return_output=return_output, request_id=request_id())
    if target is not None:
        msg.target.CopyFrom(tensor_part(target, "target", payloads, ("target",)))
    if grad_output is not None:
        msg.grad_output.CopyFrom(tensor_part(grad_output, "grad_output", payloads,
                                             ("grad_output",)))
    req = wire.framed(msg, payloads)

    def decode(r: pb.BackwardResponse) -> BackwardResult:
        return BackwardResult(
            loss=r.loss if r.HasField("loss") else None, step=r.step,
            grads=decode_named(r.grads, order),
            input_grads=[codec.decode(t, "input_grads") for t in r.input_grads],
            output=codec.decode(r.output, "output") if r.HasField("output") else None)

    return Op("Backward", req, decode)


def step(model_id: str, keep_grad: bool) -> Op[int]:
    return Op("Step", pb.StepRequest(model_id=model_id, keep_grad=keep_grad,
                                     request_id=request_id()), lambda r: r.step)


def zero_grad(model_id: str) -> Op[None]:
    return Op("ZeroGrad", pb.ZeroGradRequest(model_id=model_id, request_id=request_id()),
              lambda r: None)


def get_parameters(model_id: str, order: Sequence[str], names: Sequence[str] = (),
                   which: str = "parameters", include_buffers: bool = False) -> Op[dict[str, Any]]:
    req = pb.GetParametersRequest(model_id=model_id, names=list(names),
                                  include_grads=which == "grads",
                                  include_buffers=include_buffers)

    def decode(r: pb.GetParametersResponse) -> dict[str, Any]:
        if which == "grads":
            return decode_named(r.grads, order)
        out = decode_named(r.parameters, order)
        out.update(decode_named(r.buffers, order))
        return out

    return Op("GetParameters", req, decode)


def set_parameters(model_id: str, values: Mapping[str, Any]) -> Op[None]:
    req = pb.SetParametersRequest(model_id=model_id, parameters=named(values, "parameters"),
                                  request_id=request_id())
    return Op("SetParameters", req, lambda r: None)


def _data(inputs: Any, target: Any, dataset: str | None, what: str) -> pb.DataSource:
    if dataset is not None:
        if inputs is not None or target is not None:
            raise ValueError(f"{what}: give arrays or a dataset id, not both")
        return pb.DataSource(dataset_id=dataset)
    if inputs is None and target is None:
        return pb.DataSource()
    inline = pb.InlineData(inputs=tensors(inputs, f"{what}.inputs"))
    if target is not None:
        inline.target.CopyFrom(tensor(target, f"{what}.target"))
    return pb.DataSource(inline=inline)


def schedule(spec: str | Mapping[str, Any] | None) -> pb.ScheduleSpec:
    if spec is None:
        return pb.ScheduleSpec()
    cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
    return pb.ScheduleSpec(type=cfg.pop("type", "none"),
                           warmup_steps=int(cfg.pop("warmup_steps", 0)),
                           warmup_start_factor=float(cfg.pop("warmup_start_factor", 0.0)),
                           params=struct(cfg))


def num_samples(inputs: Any, target: Any) -> int | None:
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    first = target if first is None else first
    shape = getattr(first, "shape", None)
    if shape is None and first is not None:
        shape = np.shape(first)
    return int(shape[0]) if shape else None


def train(model_id: str, inputs: Any = None, target: Any = None, *, dataset: str | None = None,
          validation: tuple[Any, Any] | str | None = None, epochs: int = 0, max_steps: int = 0,
          batch_size: int = 0, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
          stop_loss: float | None = None, accumulation_steps: int = 1,
          clip_grad_norm: float = 0.0, schedule_: str | Mapping[str, Any] | None = None,
          log_every_steps: int = 0, skip_nonfinite: bool = False,
          checkpoint_every_steps: int = 0) -> Op[TrainEvent]:
    opts = pb.TrainOptions(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, shuffle=shuffle, seed=seed,
        drop_last=drop_last, accumulation_steps=accumulation_steps,
        clip_grad_norm=clip_grad_norm, schedule=schedule(schedule_),
        log_every_steps=log_every_steps, skip_nonfinite=skip_nonfinite)
    if stop_loss is not None:
        opts.stop_loss = stop_loss
    req = pb.TrainRequest(model_id=model_id, data=_data(inputs, target, dataset, "data"),
                          options=opts, checkpoint_every_steps=checkpoint_every_steps)
    if isinstance(validation, str):
        req.validation.CopyFrom(_data(None, None, validation, "validation"))
    elif validation is not None:
        req.validation.CopyFrom(_data(validation[0], validation[1], None, "validation"))
    return Op("Train", req, train_event)


def steps_per_run(n: int | None, epochs: int, max_steps: int, batch_size: int, drop_last: bool,
                  accumulation_steps: int) -> int | None:
    """Optimizer steps a Train run will take (for the progress bar), if knowable."""
    if n is None:
        return max_steps or None
    bs = batch_size or n
    batches = n // bs if drop_last else math.ceil(n / bs)
    per_epoch = math.ceil(batches / max(1, accumulation_steps))
    total = per_epoch * (epochs or (math.ceil(max_steps / per_epoch) if max_steps else 1))
    return min(total, max_steps) if max_steps else total


def train_stream_requests(
    model_id: str, batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
    clip_grad_norm: float, schedule_: str | Mapping[str, Any] | None, skip_nonfinite: bool
) -> Iterator[pb.TrainStreamRequest] | AsyncIterator[pb.TrainStreamRequest]:
    """Config, then one request per batch; async batches (AsyncClient) give async requests."""
    config = pb.TrainStreamRequest(config=pb.TrainStreamConfig(
        model_id=model_id, clip_grad_norm=clip_grad_norm, schedule=schedule(schedule_),
        skip_nonfinite=skip_nonfinite))
    if isinstance(batches, AsyncIterable):
        return _async_stream_requests(config, batches)
    return _stream_requests(config, batches)


def _stream_batch(i: int, x: Any, y: Any) -> pb.TrainStreamRequest:
    batch = pb.InlineData(inputs=tensors(x, f"batch[{i}].inputs"))
    if y is not None:
        batch.target.CopyFrom(tensor(y, f"batch[{i}].target"))
    return pb.TrainStreamRequest(batch=batch)


def _stream_requests(config: pb.TrainStreamRequest, batches: Iterable[tuple[Any, Any]]
                     ) -> Iterator[pb.TrainStreamRequest]:
    yield config
    for i, (x, y) in enumerate(batches):
        yield _stream_batch(i, x, y)


async def _async_stream_requests(config: pb.TrainStreamRequest,
                                 batches: AsyncIterable[tuple[Any, Any]]
                                 ) -> AsyncIterator[pb.TrainStreamRequest]:
    yield config
    i = 0
    async for x, y in batches:
        yield _stream_batch(i, x, y)
        i += 1


def upload_requests(inputs: Any, target: Any, dataset_id: str, chunk_bytes: int
                    ) -> Iterator[pb.UploadDatasetRequest]:
    """Header, then each tensor's bytes in chunks, without one big copy of the dataset."""
    arrays = [_contiguous(x) for x in (inputs if isinstance(inputs, tuple) else (inputs,))]
    header = pb.DatasetHeader(dataset_id=dataset_id)
    for arr, dt in arrays:
        header.inputs.append(pb.TensorHeader(dtype=codec.dtype_wire(dt), shape=arr.shape))
    tgt = _contiguous(target) if target is not None else None
    if tgt is not None:
        header.target.CopyFrom(pb.TensorHeader(dtype=codec.dtype_wire(tgt[1]), shape=tgt[0].shape))
    yield pb.UploadDatasetRequest(header=header)
    for arr, _ in [*arrays, *([tgt] if tgt is not None else [])]:
        view = memoryview(arr).cast("B") if arr.size else memoryview(b"")
        for start in range(0, len(view), chunk_bytes):
            yield pb.UploadDatasetRequest(chunk=bytes(view[start:start + chunk_bytes]))


def _contiguous(value: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous little-endian numpy view (bf16 as its bits) and its wire dtype name."""
    msg_dtype = None
    if codec.has_torch():
        import torch

        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            msg_dtype = str(t.dtype).removeprefix("torch.")
            if msg_dtype == "bfloat16":
                return t.view(torch.int16).numpy(), "bfloat16"
            value = t.numpy()
    arr = np.asarray(value)
    if not isinstance(value, np.ndarray) and arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    name = {"f": "float", "i": "int", "u": "uint", "b": "bool"}[arr.dtype.kind]
    name = "bool" if name == "bool" else f"{name}{arr.dtype.itemsize * 8}"
    return arr, msg_dtype or name
