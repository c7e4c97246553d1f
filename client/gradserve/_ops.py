"""The SDK's one body of logic: build requests, decode replies, retry. Sync and async share it.

Each public call is an `Op`: which RPC, the request message, how to decode the reply, and whether
the call is safe to retry. `call()` turns an Op into a Program, the attempts and backoff of one
call; clients only differ in how they run a Program (blocking or awaiting).
"""

from __future__ import annotations

import operator
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
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf import struct_pb2

from . import _channel, codec, routing, wire
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from .errors import (
    GradServeError,
    InvalidArgumentError,
    NotFoundError,
    TensorArgumentError,
    from_rpc_error,
)
from .results import (
    BackwardResult,
    DatasetInfo,
    ForwardResult,
    ModelInfo,
    OptimizerState,
    Tensor,
    TrainEvent,
    dataset_info,
    model_info,
    optimizer_state,
    train_event,
)

T = TypeVar("T")
U = TypeVar("U")
GRADIENT = "gradserve.v1.GradientService"
HEALTH = "grpc.health.v1.Health"


@dataclass(frozen=True)
class Op(Generic[T]):
    rpc: str
    request: Any
    decode: Callable[[Any], T]
    # The gRPC service: GradientService or the standard health service.
    service: str = GRADIENT
    # False: no default deadline, only an explicit timeout (uploads scale with the data size).
    deadline: bool = True
    # This call's own deadline in seconds (None: the client's default, if deadline is True).
    timeout: float | None = None
    # With several servers, a call sent to every server (UploadDataset) that fails on one is
    # undone on those where it succeeded: the Op that undoes it, from that server's reply.
    undo: Callable[[Any], Op[Any]] | None = None

    @property
    def retryable(self) -> bool:
        """Safe to repeat: named by the retry policy, except a Forward that keeps a graph (each
        attempt would keep one) or runs in training mode (each attempt would update BatchNorm
        statistics and draw dropout masks again; only an eval_mode Forward changes nothing)."""
        return (self.service, self.rpc) in _channel.POLICY.methods and not (
            self.rpc == "Forward" and (self.request.retain_graph or not self.request.eval_mode))

    def then(self, fn: Callable[[T], U]) -> Op[U]:
        """The same call, its decoded reply passed through fn (e.g. info -> RemoteModel)."""
        decode = self.decode
        return Op(self.rpc, self.request, lambda reply: fn(decode(reply)), self.service,
                  self.deadline, self.timeout, self.undo)


class Requests:
    """A request stream that can be sent more than once (to each of several servers): every
    attempt iterates a fresh generator from make()."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[Any]:
        return self._make()


@dataclass(frozen=True)
class Attempt:
    """One RPC of an Op, with this attempt's timeout and, with several servers, the server
    (its identity, gradserve.routing) it goes to; None: the client's only server."""

    op: Op[Any]
    timeout: float | None
    server: str | None = None

    @property
    def request(self) -> Any:
        """What to hand gRPC: the request message, or a fresh iterator of a request stream."""
        request = self.op.request
        return iter(request) if isinstance(request, Requests) else request


# A call sequence written once for both clients: a generator that yields an Attempt to have one
# RPC made (its reply is sent back; a grpc.RpcError is thrown in) or a float to pause that many
# seconds; its return value is the result. Client._drive and AsyncClient._drive run it with
# blocking and awaiting I/O respectively.
Program = Generator[Attempt | float, Any, T]


def call(op: Op[T], retries: int, timeout: float | None, server: str | None = None
         ) -> Program[T]:
    """op, attempted until it succeeds, fails for good, or the deadline `timeout` (seconds, over
    all attempts and waits) passes. Raises the last failure as a GradServeError."""
    attempts = _channel.Attempts(retries, timeout, op.retryable)
    while True:
        try:
            reply = yield Attempt(op, attempts.timeout(), server)
        except grpc.RpcError as exc:
            delay = attempts.delay(exc)
            if delay is None:
                raise from_rpc_error(exc) from None
            yield delay
        else:
            return op.decode(reply)


def send(op: Op[T], retries: int, timeout: float | None, router: routing.Router | None
         ) -> Program[T]:
    """op sent where it belongs: to the client's only server (router None), or with several
    servers to the owner of its key or to every server, as gradserve.routing.ROUTES says."""
    if router is None:
        return call(op, retries, timeout)
    route = routing.ROUTES[op.rpc]
    if route.kind == routing.KEY:
        return call(op, retries, timeout, router.owner(routing.key_of(route, op.request)))
    return fan_out(op, route, router.servers, retries, timeout)


def fan_out(op: Op[T], route: routing.Route, servers: Sequence[str], retries: int,
            timeout: float | None) -> Program[T]:
    """op sent to every server in turn, within one deadline; the replies merged (route.merge).

    EVERY: each server must answer; the first failure is raised, after op.undo has been sent to
    the servers that had answered. ANY (deletes): done where the thing exists; NOT_FOUND only if
    no server has it; another failure is raised once every server was tried.
    """
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    raw = replace(op, decode=lambda reply: reply)
    replies: list[tuple[str, Any]] = []
    missing: list[str] = []
    failed: list[GradServeError] = []
    for server in servers:
        try:
            replies.append((server, (yield from call(raw, retries, left(), server))))
        except GradServeError as exc:
            if route.kind == routing.ANY and isinstance(exc, NotFoundError):
                missing.append(exc.details.removeprefix(f"{server}: "))
                continue
            failed.append(exc)
            if route.kind == routing.EVERY:
                break
    if failed and route.kind == routing.EVERY and op.undo is not None:
        for server, reply in replies:
            try:  # best effort: the failure below is what the caller must see
                yield from call(op.undo(reply), retries, left(), server)
            except GradServeError:
                pass
    if failed:
        raise failed[0]
    if not replies:
        raise NotFoundError(f"{missing[0]} (on none of the {len(servers)} servers)")
    return op.decode(route.merge([reply for _, reply in replies]))


def poll(op: Op[T], ready: Callable[[T], bool], timeout: float, what: str, *, retries: int,
         tolerate_errors: bool = False, interval: float = 0.1, call_timeout: float = 2.0,
         router: routing.Router | None = None) -> Program[T]:
    """Call op until ready(result) or timeout seconds pass (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            left = max(0.1, min(call_timeout, deadline - time.monotonic()))
            result = yield from send(op, retries, left, router)
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


class Steps(Generic[T]):
    """Steps through a Program for a client's _drive: iterate for what it asks next (an Attempt
    or a pause), answer with send() or throw(); result is its return value."""

    def __init__(self, program: Program[T]) -> None:
        self._program = program
        self._answer: Any = None
        self._error: BaseException | None = None
        self.result: T

    def __iter__(self) -> Iterator[Attempt | float]:
        while True:
            try:
                if self._error is not None:
                    error, self._error = self._error, None
                    item = self._program.throw(error)
                else:
                    item = self._program.send(self._answer)
            except StopIteration as done:
                self.result = done.value
                return
            self._answer = None
            yield item

    def send(self, answer: Any) -> None:
        self._answer = answer

    def throw(self, error: BaseException) -> None:
        self._error = error


def request_id() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------ values


def _refused(value: Any, what: str, exc: Exception) -> TensorArgumentError:
    return TensorArgumentError(f"{what}: cannot send {type(value).__name__} as a tensor: {exc}")


def tensor(value: Any, what: str = "tensor", floats: str = "float32") -> pb.Tensor:
    """The wire Tensor of value; TensorArgumentError naming `what` if it cannot be one.
    floats: the dtype of Python floats (a model's dtype for what is sent to it)."""
    try:
        return codec.encode(value, floats=floats)
    except (TypeError, ValueError) as exc:  # CodecError is a ValueError
        raise _refused(value, what, exc) from None


def tensor_part(value: Any, what: str, payloads: dict[Any, Any], path: tuple[Any, ...],
                floats: str = "float32") -> pb.Tensor:
    """tensor(), but a large payload goes into payloads[path] (a zero-copy view, see
    gradserve.wire)."""
    try:
        msg, payload = codec.encode_parts(value, minimum=wire.MIN_PAYLOAD, floats=floats)
    except (TypeError, ValueError) as exc:
        raise _refused(value, what, exc) from None
    if payload is not None:
        payloads[path] = payload
    return msg


def tensors(values: Any, what: str, floats: str = "float32") -> list[pb.Tensor]:
    """None -> [], a tuple -> several inputs, anything else -> one input."""
    if values is None:
        return []
    if isinstance(values, tuple):
        return [tensor(v, f"{what}[{i}]", floats) for i, v in enumerate(values)]
    return [tensor(values, what, floats)]


def named(values: Mapping[str, Any] | None, what: str,
          floats: str | Mapping[str, str] = "float32") -> dict[str, pb.Tensor]:
    """name -> wire Tensor; floats: one dtype for Python floats, or one per name."""
    def dtype(name: str) -> str:
        return floats if isinstance(floats, str) else floats.get(name, "float32")

    return {k: tensor(v, f"{what}[{k}]", dtype(k)) for k, v in (values or {}).items()}


# torch.manual_seed's range; it maps a negative seed s to s + 2**64, which the uint64 fields of
# the proto carry.
SEEDS = (-(2**63), 2**64 - 1)


def seed_field(value: Any, what: str) -> int:
    """A seed as torch takes it -> the proto's uint64 (InvalidArgumentError naming `what`
    outside torch's range)."""
    try:
        seed = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what}: {value!r} is not an integer") from None
    if not SEEDS[0] <= seed <= SEEDS[1]:
        raise InvalidArgumentError(f"{what}: {seed} is outside torch's seed range "
                                   "[-2**63, 2**64 - 1]")
    return seed % 2**64


def decode_named(msgs: Mapping[str, pb.Tensor], order: Sequence[str] = ()) -> dict[str, Tensor]:
    """Decode a map, in `order` first (state_dict order), then any others sorted."""
    keys = [k for k in order if k in msgs] + sorted(k for k in msgs if k not in set(order))
    return {k: codec.decode(msgs[k], k) for k in keys}


def struct(values: Mapping[str, Any] | None, what: str) -> struct_pb2.Struct:
    """values as a protobuf Struct (JSON); InvalidArgumentError naming what.key for a value
    JSON cannot carry (a number beyond float64, an object that is not JSON)."""
    out = struct_pb2.Struct()
    for key, value in (values or {}).items():
        try:
            out.update({key: value})
        except (OverflowError, ValueError, TypeError) as exc:
            raise InvalidArgumentError(
                f"{what}.{key}: {value!r:.80} cannot travel as JSON ({exc}); give numbers "
                "within float64, strings, booleans, lists or objects of those") from None
    return out


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
    module: Any = None,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    exported: Any = None,
    loss_output: int | str | None = None,
) -> Op[ModelInfo]:
    """Create a model from layers=, expression=, plugin=, module= or exported= (docs/models.md "Model
    specs"; exported models: docs/exported.md)."""
    floats = codec.dtype_name(codec.dtype_wire(dtype))  # Python floats: the model's dtype
    given = [x is not None for x in (layers, expression, plugin, module, exported)]
    if sum(given) != 1:
        raise ValueError("give exactly one of layers=, expression=, plugin=, module= or "
                         "exported=")
    spec = pb.ModelSpec(frozen=list(frozen), dtype=codec.dtype_wire(dtype))
    if module is not None or exported is not None:  # gradserve.export (imports torch)
        from .export import exported_source

        spec.exported.CopyFrom(exported_source(
            module=module, example_inputs=example_inputs, exported=exported,
            dynamic_shapes=dynamic_shapes, loss_output=loss_output, seed=seed))
    elif layers is not None:
        spec.layers.SetInParent()  # an empty list is still "layers" (the server says what's wrong)
        for i, layer in enumerate(layers):
            layer = dict(layer)
            kind = layer.pop("type", None)
            if not isinstance(kind, str):  # a spec's values are checked as values (ValueError)
                raise ValueError(  # noqa: TRY004
                    f"layers[{i}]: needs a 'type', e.g. {{'type': 'Linear', ...}}")
            spec.layers.layers.append(pb.Layer(type=kind, kwargs=struct(layer, f"layers[{i}]")))
    elif expression is not None:
        spec.expression.SetInParent()
        spec.expression.expression = expression
        spec.expression.inputs.extend(inputs)
        for name, value in (parameters or {}).items():
            spec.expression.parameters[name].CopyFrom(
                tensor(value, f"parameters[{name}]", floats))
        if trainable is not None:
            unknown = set(trainable) - set(parameters or {})
            if unknown:
                raise ValueError(f"trainable: {sorted(unknown)} are not in parameters")
            spec.frozen.extend(n for n in (parameters or {}) if n not in trainable)
    else:
        spec.plugin.SetInParent()
        spec.plugin.name = plugin or ""
        spec.plugin.kwargs.CopyFrom(struct(plugin_kwargs, "plugin_kwargs"))
    if loss is not None:
        cfg = {"type": loss} if isinstance(loss, str) else dict(loss)
        spec.loss.type = cfg.pop("type", "")
        spec.loss.reduction = cfg.pop("reduction", "")
        spec.loss.kwargs.CopyFrom(struct(cfg, "loss"))
    if optimizer is not None:
        cfg = {"type": optimizer} if isinstance(optimizer, str) else dict(optimizer)
        spec.optimizer.type = cfg.pop("type", "sgd")
        spec.optimizer.params.CopyFrom(struct(cfg, "optimizer"))
    if seed is not None:
        spec.seed = seed_field(seed, "seed")
    for name, value in named(initial_parameters, "initial_parameters", floats).items():
        spec.initial_parameters[name].CopyFrom(value)
    return Op("CreateModel", pb.CreateModelRequest(model_id=model_id, spec=spec), model_info)


def forward(model_id: str, inputs: Sequence[Any], retain_graph: bool, eval_mode: bool,
            floats: str = "float32") -> Op[Tensor | ForwardResult]:
    payloads: dict[Any, Any] = {}
    req = wire.framed(pb.ForwardRequest(
        model_id=model_id, retain_graph=retain_graph, eval_mode=eval_mode,
        inputs=[tensor_part(x, f"inputs[{i}]", payloads, ("inputs", i), floats)
                for i, x in enumerate(inputs)]), payloads)
    if retain_graph:
        return Op("Forward", req, lambda r: ForwardResult(outputs(r), r.forward_id))
    return Op("Forward", req, outputs)


def outputs(r: Any) -> Any:
    """The output; a tuple of every output for a model with several (ModelInfo.outputs)."""
    if len(r.outputs):
        return tuple(codec.decode(t, f"outputs[{i}]") for i, t in enumerate(r.outputs))
    return codec.decode(r.output, "output")


def backward(model_id: str, order: Sequence[str], inputs: Any = None, target: Any = None, *,
             forward_id: str = "", grad_output: Any = None, return_grads: bool = False,
             return_input_grads: bool = False, step: bool = False, return_output: bool = False,
             floats: str = "float32") -> Op[BackwardResult]:
    payloads: dict[Any, Any] = {}
    xs = () if inputs is None else inputs if isinstance(inputs, tuple) else (inputs,)
    msg = pb.BackwardRequest(
        model_id=model_id, forward_id=forward_id,
        inputs=[tensor_part(x, f"inputs[{i}]" if isinstance(inputs, tuple) else "inputs",
                            payloads, ("inputs", i), floats) for i, x in enumerate(xs)],
        return_grads=return_grads, return_input_grads=return_input_grads, step=step,
        return_output=return_output, request_id=request_id())
    if target is not None:
        msg.target.CopyFrom(tensor_part(target, "target", payloads, ("target",), floats))
    if isinstance(grad_output, tuple):  # one per output of a multi-output model
        msg.grad_outputs.extend(tensor_part(g, f"grad_output[{i}]", payloads, ("grad_outputs", i),
                                            floats) for i, g in enumerate(grad_output))
    elif grad_output is not None:
        msg.grad_output.CopyFrom(tensor_part(grad_output, "grad_output", payloads,
                                             ("grad_output",), floats))
    req = wire.framed(msg, payloads)

    def decode(r: pb.BackwardResponse) -> BackwardResult:
        return BackwardResult(
            loss=r.loss if r.HasField("loss") else None, step=r.step,
            grads=decode_named(r.grads, order),
            input_grads=[codec.decode(t, "input_grads") for t in r.input_grads],
            output=outputs(r) if r.HasField("output") else None)

    return Op("Backward", req, decode)


def step(model_id: str, keep_grad: bool) -> Op[int]:
    return Op("Step", pb.StepRequest(model_id=model_id, keep_grad=keep_grad,
                                     request_id=request_id()), lambda r: r.step)


def zero_grad(model_id: str) -> Op[None]:
    return Op("ZeroGrad", pb.ZeroGradRequest(model_id=model_id, request_id=request_id()),
              lambda r: None)


def get_parameters(model_id: str, order: Sequence[str], names: Sequence[str] = (),
                   which: str = "parameters", include_buffers: bool = False
                   ) -> Op[dict[str, Tensor]]:
    req = pb.GetParametersRequest(model_id=model_id, names=list(names),
                                  include_grads=which == "grads",
                                  include_buffers=include_buffers)

    def decode(r: pb.GetParametersResponse) -> dict[str, Tensor]:
        if which == "grads":
            return decode_named(r.grads, order)
        out = decode_named(r.parameters, order)
        out.update(decode_named(r.buffers, order))
        return out

    return Op("GetParameters", req, decode)


def get_optimizer_state(model_id: str, order: Sequence[str], names: Sequence[str] = ()
                        ) -> Op[OptimizerState]:
    req = pb.GetParametersRequest(model_id=model_id, names=list(names),
                                  include_optimizer_state=True)
    return Op("GetParameters", req, lambda r: optimizer_state(r, order))


def set_parameters(model_id: str, values: Mapping[str, Any],
                   dtypes: Mapping[str, str] | None = None) -> Op[None]:
    """dtypes: each parameter's dtype, which Python floats given for it take."""
    req = pb.SetParametersRequest(model_id=model_id,
                                  parameters=named(values, "parameters", dtypes or {}),
                                  request_id=request_id())
    return Op("SetParameters", req, lambda r: None)


def _data(inputs: Any, target: Any, dataset: str | None, what: str,
          floats: str = "float32") -> pb.DataSource:
    if dataset is not None:
        if inputs is not None or target is not None:
            raise ValueError(f"{what}: give arrays or a dataset id, not both")
        return pb.DataSource(dataset_id=dataset)
    if inputs is None and target is None:
        return pb.DataSource()
    inline = pb.InlineData(inputs=tensors(inputs, f"{what}.inputs", floats))
    if target is not None:
        inline.target.CopyFrom(tensor(target, f"{what}.target", floats))
    return pb.DataSource(inline=inline)


def schedule(spec: str | Mapping[str, Any] | None) -> pb.ScheduleSpec:
    if spec is None:
        return pb.ScheduleSpec()
    cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
    return pb.ScheduleSpec(type=cfg.pop("type", "none"),
                           warmup_steps=int(cfg.pop("warmup_steps", 0)),
                           warmup_start_factor=float(cfg.pop("warmup_start_factor", 0.0)),
                           params=struct(cfg, "schedule"))


@dataclass(frozen=True)
class TrainCall:
    """A Train run to start: the request, whether to draw a progress bar (None: when stdout is
    a terminal; its total is the run's total_steps, which the server reports) and its
    deadline."""

    op: Op[TrainEvent]
    progress: bool | None
    timeout: float | None


def train(model_id: str, inputs: Any = None, target: Any = None, *, dataset: str | None = None,
          validation: tuple[Any, Any] | str | None = None, epochs: int = 0, max_steps: int = 0,
          batch_size: int = 0, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
          stop_loss: float | None = None, accumulation_steps: int = 1,
          clip_grad_norm: float = 0.0, schedule_: str | Mapping[str, Any] | None = None,
          log_every_steps: int = 0, skip_nonfinite: bool = False,
          checkpoint_every_steps: int = 0, progress: bool | None = None,
          timeout: float | None = None, floats: str = "float32") -> TrainCall:
    opts = pb.TrainOptions(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, shuffle=shuffle,
        seed=seed_field(seed, "seed"),
        drop_last=drop_last, accumulation_steps=accumulation_steps,
        clip_grad_norm=clip_grad_norm, schedule=schedule(schedule_),
        log_every_steps=log_every_steps, skip_nonfinite=skip_nonfinite)
    if stop_loss is not None:
        opts.stop_loss = stop_loss
    req = pb.TrainRequest(model_id=model_id,
                          data=_data(inputs, target, dataset, "data", floats),
                          options=opts, checkpoint_every_steps=checkpoint_every_steps)
    if isinstance(validation, str):
        req.validation.CopyFrom(_data(None, None, validation, "validation"))
    elif validation is not None:
        req.validation.CopyFrom(_data(validation[0], validation[1], None, "validation", floats))
    return TrainCall(Op("Train", req, train_event), progress, timeout)


def train_stream_requests(
    model_id: str, batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
    clip_grad_norm: float, schedule_: str | Mapping[str, Any] | None, skip_nonfinite: bool,
    floats: str = "float32"
) -> Iterator[pb.TrainStreamRequest] | AsyncIterator[pb.TrainStreamRequest]:
    """Config, then one request per batch; async batches (AsyncClient) give async requests."""
    config = pb.TrainStreamRequest(config=pb.TrainStreamConfig(
        model_id=model_id, clip_grad_norm=clip_grad_norm, schedule=schedule(schedule_),
        skip_nonfinite=skip_nonfinite))
    if isinstance(batches, AsyncIterable):
        return _async_stream_requests(config, batches, floats)
    return _stream_requests(config, batches, floats)


def _stream_batch(i: int, x: Any, y: Any, floats: str) -> pb.TrainStreamRequest:
    batch = pb.InlineData(inputs=tensors(x, f"batch[{i}].inputs", floats))
    if y is not None:
        batch.target.CopyFrom(tensor(y, f"batch[{i}].target", floats))
    return pb.TrainStreamRequest(batch=batch)


def _stream_requests(config: pb.TrainStreamRequest, batches: Iterable[tuple[Any, Any]],
                     floats: str) -> Iterator[pb.TrainStreamRequest]:
    yield config
    for i, (x, y) in enumerate(batches):
        yield _stream_batch(i, x, y, floats)


async def _async_stream_requests(config: pb.TrainStreamRequest,
                                 batches: AsyncIterable[tuple[Any, Any]], floats: str
                                 ) -> AsyncIterator[pb.TrainStreamRequest]:
    yield config
    i = 0
    async for x, y in batches:
        yield _stream_batch(i, x, y, floats)
        i += 1


def upload(inputs: Any, target: Any, dataset_id: str, chunk_bytes: int,
           timeout: float | None) -> Op[DatasetInfo]:
    """UploadDataset: a header, then each tensor's bytes in chunks, without one big copy of the
    dataset. Every array is converted (or refused) before anything is sent."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: {chunk_bytes} must be at least 1")
    several = isinstance(inputs, tuple)
    xs = inputs if several else (inputs,)
    arrays = [_array(x, f"inputs[{i}]" if several else "inputs") for i, x in enumerate(xs)]
    header = pb.DatasetHeader(dataset_id=dataset_id, inputs=[
        pb.TensorHeader(dtype=dtype, shape=arr.shape) for dtype, arr in arrays])
    if target is not None:
        arrays.append(_array(target, "target"))
        dtype, arr = arrays[-1]
        header.target.CopyFrom(pb.TensorHeader(dtype=dtype, shape=arr.shape))
    tensors = [a for _, a in arrays]
    return Op("UploadDataset", Requests(lambda: _upload_requests(header, tensors, chunk_bytes)),
              dataset_info, deadline=False, timeout=timeout, undo=_undo_upload)


def _undo_upload(info: pb.DatasetInfo) -> Op[None]:
    return Op("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=info.dataset_id),
              lambda r: None)


def _array(value: Any, what: str) -> tuple[pb.DType, np.ndarray]:
    try:
        return codec.encode_array(value)
    except (TypeError, ValueError) as exc:
        raise _refused(value, what, exc) from None


def _upload_requests(header: pb.DatasetHeader, arrays: list[np.ndarray], chunk_bytes: int
                     ) -> Iterator[pb.UploadDatasetRequest]:
    yield pb.UploadDatasetRequest(header=header)
    for arr in arrays:
        view = arr.reshape(-1).view(np.uint8).data
        for start in range(0, len(view), chunk_bytes):
            yield pb.UploadDatasetRequest(chunk=bytes(view[start:start + chunk_bytes]))
