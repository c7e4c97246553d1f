"""The calls of models and clients, written once for the sync and the async client.

Each call is built once, by an underscored method of ModelCalls or ClientCalls that returns what
to send: an Op (see _ops), a TrainCall or a stream of requests. The public methods are thin and
made from those builders by the decorators below, which keep the builder's parameters: the sync
RemoteModel and Client send and return the result, AsyncRemoteModel and AsyncClient
(gradserve.aio) return an awaitable of it. Type checkers see each method's real arguments and
result.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from grpc_health.v1 import health_pb2

from . import _ops, codec, routing
from ._ops import Op, TrainCall
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from .errors import CancelledError, GradServeError
from .results import (
    BackwardResult,
    CheckpointInfo,
    DatasetInfo,
    ForwardResult,
    ModelInfo,
    OptimizerState,
    ServerInfo,
    StreamStep,
    Tensor,
    checkpoint_info,
    dataset_info,
    model_info,
    server_info,
    stream_step,
)

if TYPE_CHECKING:
    from .client import TrainRun
    from .history import History

P = ParamSpec("P")
T = TypeVar("T")
M = TypeVar("M")

# Requests of a TrainStream call (sync or async iterator) and how to decode each reply.
StreamCall = tuple[Any, Callable[[Any], StreamStep]]


def method_from(build: Callable[..., Any], send: Callable[[Any, Any], Any],
                bound: bool = True) -> Any:
    """A method that calls send(self, what build makes): the one body of every thin method.
    bound=False: build is a plain function (not given self). It takes the builder's name,
    docstring and parameters."""
    def method(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        return send(self, build(self, *args, **kwargs) if bound else build(*args, **kwargs))
    method.__name__ = method.__qualname__ = build.__name__.lstrip("_")
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    parameters = list(signature.parameters.values())
    if not bound:  # the method's own self, before the function's parameters
        parameters.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY))
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=parameters, return_annotation=inspect.Signature.empty)
    return method


# ------------------------------------------------------------------ sync methods from builders
# Each keeps its builder's parameters (ParamSpec P) and gives the sync result type.


def blocking(build: Callable[Concatenate[Any, P], Op[T]]) -> Callable[Concatenate[Any, P], T]:
    """A method that sends the builder's Op and returns its result."""
    return method_from(build, lambda self, op: self._run(op))


def blocking_model(build: Callable[P, Op[ModelInfo]]
                   ) -> Callable[Concatenate[Any, P], RemoteModel]:
    """A client method that sends build's Op and returns the model it describes."""
    return method_from(
        build, lambda self, op: self._run(self._placed(op).then(self._remote)), bound=False)


def blocking_train(build: Callable[Concatenate[Any, P], TrainCall]
                   ) -> Callable[Concatenate[Any, P], TrainRun]:
    """A method that starts the builder's Train run: an iterator of its events."""
    return method_from(build, lambda self, call: self._client._train(call))


def blocking_fit(build: Callable[Concatenate[Any, P], TrainCall]
                 ) -> Callable[Concatenate[Any, P], History]:
    """A method that runs the builder's Train run to its end, collected into a History."""
    method = method_from(build, lambda self, call: self._client._fit(self._client._train(call)))
    method.__doc__ = FIT_DOC
    return method


def blocking_stream(build: Callable[Concatenate[Any, P], StreamCall]
                    ) -> Callable[Concatenate[Any, P], Iterator[StreamStep]]:
    """A method that streams the builder's requests and yields each decoded reply."""
    return method_from(
        build, lambda self, call: self._client._bidi("TrainStream", self.id, *call))


FIT_DOC = "train() collected into a History (history.plot() draws the loss curve)."


# ------------------------------------------------------------------ builders


class ModelCalls:
    """What RemoteModel and AsyncRemoteModel share: the model's info and each call's builder."""

    def __init__(self, client: Any, info: ModelInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.model_id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.id!r}, step={self.info.step}, "
                f"device={self.info.device!r})")

    @property
    def _order(self) -> list[str]:
        return [p.name for p in self.info.parameters]

    @property
    def _floats(self) -> str:
        """The model's dtype: what Python floats sent to it become (torch.tensor(v, dtype=))."""
        return codec.dtype_name(self.info.spec.dtype or pb.DTYPE_FLOAT32)

    def _update(self, msg: pb.ModelInfo) -> ModelInfo:
        self.info = model_info(msg)
        return self.info

    def _refresh(self) -> Op[ModelInfo]:
        """Re-read the model's info from the server (step, retained graphs, ...)."""
        return Op("GetModel", pb.GetModelRequest(model_id=self.id), self._update)

    def _wait_idle(self, timeout: float) -> _ops.Program[ModelInfo]:
        return _ops.poll(self._refresh(), lambda info: not info.training, timeout,
                         f"model {self.id!r} still training", retries=self._client.retries,
                         router=self._client._router)

    def _forward(self, inputs: Sequence[Any], retain_graph: bool, eval_mode: bool
                 ) -> Op[Tensor | ForwardResult]:
        return _ops.forward(self.id, inputs, retain_graph, eval_mode, self._floats)

    def _backward(self, inputs: Any = None, target: Any = None, *, forward_id: str = "",
                  grad_output: Any = None, return_grads: bool = False,
                  return_input_grads: bool = False, step: bool = False,
                  return_output: bool = False) -> Op[BackwardResult]:
        """Gradients: fused (inputs, target), objective (no arguments), or of a retained forward
        (forward_id with target or grad_output). inputs: an array, or a tuple of arrays."""
        return _ops.backward(
            self.id, self._order, inputs, target, forward_id=forward_id, grad_output=grad_output,
            return_grads=return_grads, return_input_grads=return_input_grads, step=step,
            return_output=return_output, floats=self._floats)

    def _step(self, keep_grad: bool = False) -> Op[int]:
        """optimizer.step(), then zero the gradients unless keep_grad; returns the step count."""
        return _ops.step(self.id, keep_grad)

    def _zero_grad(self) -> Op[None]:
        """Zero the accumulated gradients."""
        return _ops.zero_grad(self.id)

    def _parameters(self, names: Sequence[str] = (), *, buffers: bool = False
                    ) -> Op[dict[str, Tensor]]:
        """name -> tensor, in state_dict order (buffers=True adds e.g. BatchNorm statistics)."""
        return _ops.get_parameters(self.id, self._order, names, include_buffers=buffers)

    def _grads(self, names: Sequence[str] = ()) -> Op[dict[str, Tensor]]:
        """name -> accumulated gradient (parameters without one are absent)."""
        return _ops.get_parameters(self.id, self._order, names, "grads")

    def _optimizer_state(self, names: Sequence[str] = ()) -> Op[OptimizerState]:
        """The optimizer's state: per parameter (of names, or every one the optimizer has
        stepped) and its parameter groups' hyper-parameters."""
        return _ops.get_optimizer_state(self.id, self._order, names)

    def _set_parameters(self, values: Mapping[str, Any]) -> Op[None]:
        """Overwrite parameters/buffers in place (any subset); optimizer state is kept."""
        floating = ("float32", "float64", "float16", "bfloat16")
        return _ops.set_parameters(self.id, values, {
            p.name: p.dtype for p in self.info.parameters if p.dtype in floating})

    def _train(self, inputs: Any = None, target: Any = None, *, dataset: str | None = None,
               validation: tuple[Any, Any] | str | None = None, epochs: int = 0,
               max_steps: int = 0, batch_size: int = 0, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False, stop_loss: float | None = None,
               accumulation_steps: int = 1, clip_grad_norm: float = 0.0,
               schedule: str | Mapping[str, Any] | None = None, log_every_steps: int = 0,
               skip_nonfinite: bool = False, checkpoint_every_steps: int = 0,
               progress: bool | None = None, timeout: float | None = None) -> TrainCall:
        """Train on the server: the run's events, as they come (breaking out cancels it)."""
        return _ops.train(self.id, inputs, target, dataset=dataset, validation=validation,
                          epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, drop_last=drop_last, stop_loss=stop_loss,
                          accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm,
                          schedule_=schedule, log_every_steps=log_every_steps,
                          skip_nonfinite=skip_nonfinite,
                          checkpoint_every_steps=checkpoint_every_steps, progress=progress,
                          timeout=timeout, floats=self._floats)

    def _train_stream(self,
                      batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]], *,
                      clip_grad_norm: float = 0.0,
                      schedule: str | Mapping[str, Any] | None = None,
                      skip_nonfinite: bool = False) -> StreamCall:
        """Send (inputs, target) batches as they are produced; one step and one result each.
        With the AsyncClient, batches may also be an async iterable."""
        requests = _ops.train_stream_requests(self.id, batches, clip_grad_norm, schedule,
                                              skip_nonfinite, self._floats)
        return requests, stream_step

    def _save_checkpoint(self, name: str = "") -> Op[CheckpointInfo]:
        """Checkpoint the model on the server (its --state-dir); name defaults to the id."""
        return ClientCalls._save_checkpoint(self._client, self.id, name)

    def _delete(self) -> Op[None]:
        """Delete the model on the server."""
        return ClientCalls._delete_model(self._client, self.id)


class ClientCalls(Generic[M]):
    """What Client and AsyncClient share: each call's builder. M is the client's model class."""

    timeout: float
    retries: int
    servers: tuple[str, ...]
    _model_type: Callable[[Any, ModelInfo], M]
    _router: routing.Router | None  # None: one server
    _stub: Any  # the first (or only) server's
    _servers: Mapping[str, Any]  # identity -> its connection (channel, stub, health)
    _health_stub: Any
    _metadata: Any
    _closed: bool = False  # close() was called: a call it cut short is not retried

    def _closed_error(self) -> GradServeError:
        return CancelledError("the client was closed (close()) while this call was in flight; "
                              "it may or may not have run on the server")

    def _remote(self, info: ModelInfo) -> M:
        return self._model_type(self, info)

    def _stub_for(self, key: str) -> Any:
        """The stub of the server that owns key (the only one's, with one server)."""
        return self._stub if self._router is None else self._servers[
            self._router.owner(key)].stub

    def _method(self, attempt: _ops.Attempt) -> Any:
        """The stub method (sync or async) one attempt calls, on the server it names."""
        conn = self._servers[attempt.server] if attempt.server is not None else None
        stub = self._stub if conn is None else conn.stub
        health = self._health_stub if conn is None else conn.health
        return getattr(stub if attempt.op.service == _ops.GRADIENT else health, attempt.op.rpc)

    def _open_train(self, call: TrainCall) -> tuple[Any, bool, str]:
        """A Train call's stream, whether to show progress (a terminal, unless told), and the
        model id: what TrainRun and AsyncTrainRun are made of."""
        progress = sys.stdout.isatty() if call.progress is None else call.progress
        model_id = call.op.request.model_id
        stream = self._stub_for(model_id).Train(call.op.request, timeout=call.timeout,
                                                metadata=self._metadata)
        return stream, progress, model_id

    def _placed(self, op: Op[ModelInfo]) -> Op[ModelInfo]:
        """CreateModel without an id, with several servers: the client picks the id (as the
        server would) so that the call goes to the server that will own it."""
        if self._router is not None and not op.request.model_id:
            op.request.model_id = routing.new_id("model")
        return op

    def server_of(self, model_id: str) -> str:
        """The server that owns model_id (where a model of that id is created and looked for):
        its identity in `servers`. With one server, that server."""
        return self.servers[0] if self._router is None else self._router.owner(model_id)

    # ------------------------------------------------------------------ models

    def _model(self, model_id: str) -> Op[M]:
        """A handle to an existing model (NotFoundError if there is none)."""
        return Op("GetModel", pb.GetModelRequest(model_id=model_id), model_info).then(
            self._remote)

    def _list_models(self) -> Op[list[M]]:
        """Every model on the server (on every server, sorted by id)."""
        return Op("ListModels", pb.ListModelsRequest(),
                  lambda r: [self._remote(model_info(x)) for x in r.models])

    def _delete_model(self, model_id: str) -> Op[None]:
        """Delete a model (NotFoundError if there is none)."""
        return Op("DeleteModel", pb.DeleteModelRequest(model_id=model_id), lambda r: None)

    # ------------------------------------------------------------------ datasets

    def _upload_dataset(self, inputs: Any, target: Any = None, *, dataset_id: str = "",
                        chunk_bytes: int = 4 * 1024 * 1024, timeout: float | None = None
                        ) -> Op[DatasetInfo]:
        """Stream a dataset to the server once; train on it with dataset=info.dataset_id.
        With several servers it is uploaded to each (any model can train on it), under one id."""
        if self._router is not None and not dataset_id:
            dataset_id = routing.new_id("dataset")
        return _ops.upload(inputs, target, dataset_id, chunk_bytes, timeout)

    def _list_datasets(self) -> Op[list[DatasetInfo]]:
        """Every uploaded dataset."""
        return Op("ListDatasets", pb.ListDatasetsRequest(),
                  lambda r: [dataset_info(d) for d in r.datasets])

    def _delete_dataset(self, dataset_id: str) -> Op[None]:
        """Delete an uploaded dataset."""
        return Op("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id),
                  lambda r: None)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model_id: str, name: str = "") -> Op[CheckpointInfo]:
        """Checkpoint a model on the server (its --state-dir); name defaults to the model id."""
        return Op("SaveCheckpoint", pb.SaveCheckpointRequest(model_id=model_id, name=name),
                  checkpoint_info)

    def _load_checkpoint(self, name: str, model_id: str = "") -> Op[M]:
        """Restore a model from a checkpoint (into model_id, default the saved id)."""
        return Op("LoadCheckpoint", pb.LoadCheckpointRequest(name=name, model_id=model_id),
                  model_info).then(self._remote)

    def _server_info(self) -> Op[ServerInfo]:
        """The server's versions, world size, backend and devices (with several servers: the
        first one's, in sorted order; every server is asked and must answer)."""
        return Op("GetServerInfo", pb.GetServerInfoRequest(), server_info)

    def _list_checkpoints(self) -> Op[list[CheckpointInfo]]:
        """Every checkpoint on the server."""
        return Op("ListCheckpoints", pb.ListCheckpointsRequest(),
                  lambda r: [checkpoint_info(c) for c in r.checkpoints])

    def _delete_checkpoint(self, name: str) -> Op[None]:
        """Remove a checkpoint from the server's state dir (NotFoundError if there is none)."""
        return Op("DeleteCheckpoint", pb.DeleteCheckpointRequest(name=name), lambda r: None)

    # ------------------------------------------------------------------ health

    def _health(self, service: str = "", timeout: float | None = None) -> Op[str]:
        """'SERVING', 'NOT_SERVING', ... from the standard gRPC health service (with several
        servers: SERVING if every one is, else the first other status)."""
        return Op("Check", health_pb2.HealthCheckRequest(service=service),
                  lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
                  service=_ops.HEALTH, timeout=timeout)

    def _health_by_server(self, service: str, timeout: float | None
                          ) -> _ops.Program[dict[str, str]]:
        statuses: dict[str, str] = {}
        for server in self.servers:
            try:
                statuses[server] = yield from _ops.call(
                    self._health(service), self.retries, timeout or self.timeout,
                    None if self._router is None else server)
            except GradServeError as exc:
                statuses[server] = exc.code.name
        return statuses

    def _wait_ready(self, timeout: float) -> _ops.Program[None]:
        address = getattr(self, "address", "the server")
        return _ops.returning(None, _ops.poll(
            self._health(), lambda s: s == "SERVING", timeout, f"{address} not SERVING",
            retries=self.retries, tolerate_errors=True, router=self._router))


# ------------------------------------------------------------------ the sync model


class RemoteModel(ModelCalls):
    """Handle to one model on the server (sync Client). Results are torch tensors (numpy arrays
    without torch)."""

    def _run(self, op: Op[T]) -> T:
        return self._client._run(op)

    @overload
    def forward(self, *inputs: Any, retain_graph: Literal[False] = False,
                eval_mode: bool = False) -> Tensor: ...
    @overload
    def forward(self, *inputs: Any, retain_graph: Literal[True],
                eval_mode: bool = False) -> ForwardResult: ...
    @overload
    def forward(self, *inputs: Any, retain_graph: bool,
                eval_mode: bool = False) -> Tensor | ForwardResult: ...

    def forward(self, *inputs: Any, retain_graph: bool = False,
                eval_mode: bool = False) -> Tensor | ForwardResult:
        """Run the model. retain_graph=True returns ForwardResult(output, forward_id)."""
        return self._run(self._forward(inputs, retain_graph, eval_mode))

    def wait_idle(self, timeout: float = 30.0) -> ModelInfo:
        """Wait until no Train/TrainStream run holds the model (after a cancel the server stops
        at the next step boundary); returns the refreshed ModelInfo."""
        return self._client._drive(self._wait_idle(timeout))

    refresh = blocking(ModelCalls._refresh)
    backward = blocking(ModelCalls._backward)
    step = blocking(ModelCalls._step)
    zero_grad = blocking(ModelCalls._zero_grad)
    parameters = blocking(ModelCalls._parameters)
    grads = blocking(ModelCalls._grads)
    optimizer_state = blocking(ModelCalls._optimizer_state)
    set_parameters = blocking(ModelCalls._set_parameters)
    train = blocking_train(ModelCalls._train)
    fit = blocking_fit(ModelCalls._train)
    train_stream = blocking_stream(ModelCalls._train_stream)
    save_checkpoint = blocking(ModelCalls._save_checkpoint)
    delete = blocking(ModelCalls._delete)
