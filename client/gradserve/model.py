"""RemoteModel and the client calls: written once for the sync and async clients.

Each method builds an Op and hands it to its client: the sync Client returns the result, the
AsyncClient returns an awaitable of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from . import _ops
from ._ops import ModelInfo, Op
from ._proto.gradserve.v1 import gradserve_pb2 as pb


class RemoteModel:
    """Handle to one model on the server. Results are torch tensors (numpy without torch)."""

    def __init__(self, client: Any, info: ModelInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.model_id

    def __repr__(self) -> str:
        return f"RemoteModel({self.id!r}, step={self.info.step}, device={self.info.device!r})"

    @property
    def _order(self) -> list[str]:
        return [p.name for p in self.info.parameters]

    def refresh(self) -> Any:
        """Re-read the model's info from the server (step, retained graphs, ...)."""
        return self._client._run(self._get_op())

    def _get_op(self) -> Op[ModelInfo]:
        return Op("GetModel", pb.GetModelRequest(model_id=self.id), self._update)

    def wait_idle(self, timeout: float = 30.0) -> Any:
        """Wait until no Train/TrainStream run holds the model (after a cancel the server stops
        at the next step boundary); returns the refreshed ModelInfo."""
        return self._client._drive(_ops.poll(
            self._get_op(), lambda info: not info.training, timeout,
            f"model {self.id!r} still training"))

    def _update(self, msg: Any) -> ModelInfo:
        self.info = _ops.model_info(msg)
        return self.info

    def forward(self, *inputs: Any, retain_graph: bool = False, eval_mode: bool = False) -> Any:
        """Run the model. retain_graph=True returns ForwardResult(output, forward_id)."""
        return self._client._run(_ops.forward(self.id, inputs, retain_graph, eval_mode))

    def backward(self, inputs: Any = None, target: Any = None, *, forward_id: str = "",
                 grad_output: Any = None, return_grads: bool = False,
                 return_input_grads: bool = False, step: bool = False,
                 return_output: bool = False) -> Any:
        """Gradients: fused (inputs, target), objective (no arguments), or of a retained forward
        (forward_id with target or grad_output). inputs: an array, or a tuple of arrays."""
        return self._client._run(_ops.backward(
            self.id, self._order, inputs, target, forward_id=forward_id, grad_output=grad_output,
            return_grads=return_grads, return_input_grads=return_input_grads, step=step,
            return_output=return_output))

    def step(self, keep_grad: bool = False) -> Any:
        """optimizer.step(), then zero the gradients unless keep_grad; returns the step count."""
        return self._client._run(_ops.step(self.id, keep_grad))

    def zero_grad(self) -> Any:
        return self._client._run(_ops.zero_grad(self.id))

    def parameters(self, names: Sequence[str] = (), *, buffers: bool = False) -> Any:
        """name -> tensor, in state_dict order (buffers=True adds e.g. BatchNorm statistics)."""
        return self._client._run(_ops.get_parameters(self.id, self._order, names,
                                                     include_buffers=buffers))

    def grads(self, names: Sequence[str] = ()) -> Any:
        """name -> accumulated gradient (parameters without one are absent)."""
        return self._client._run(_ops.get_parameters(self.id, self._order, names, "grads"))

    def set_parameters(self, values: Mapping[str, Any]) -> Any:
        """Overwrite parameters/buffers in place (any subset); optimizer state is kept."""
        return self._client._run(_ops.set_parameters(self.id, values))

    def train(self, inputs: Any = None, target: Any = None, *, dataset: str | None = None,
              validation: tuple[Any, Any] | str | None = None, epochs: int = 0,
              max_steps: int = 0, batch_size: int = 0, shuffle: bool = False, seed: int = 0,
              drop_last: bool = False, stop_loss: float | None = None,
              accumulation_steps: int = 1, clip_grad_norm: float = 0.0,
              schedule: str | Mapping[str, Any] | None = None, log_every_steps: int = 0,
              skip_nonfinite: bool = False, checkpoint_every_steps: int = 0,
              progress: bool | None = None, timeout: float | None = None) -> Any:
        """Train on the server; returns an iterator of TrainEvent (breaking out cancels)."""
        op = _ops.train(self.id, inputs, target, dataset=dataset, validation=validation,
                        epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                        shuffle=shuffle, seed=seed, drop_last=drop_last, stop_loss=stop_loss,
                        accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm,
                        schedule_=schedule, log_every_steps=log_every_steps,
                        skip_nonfinite=skip_nonfinite,
                        checkpoint_every_steps=checkpoint_every_steps)
        total = _ops.steps_per_run(_ops.num_samples(inputs, target), epochs, max_steps,
                                   batch_size, drop_last, accumulation_steps)
        return self._client._train(op, total, progress, timeout)

    def fit(self, inputs: Any = None, target: Any = None, **kwargs: Any) -> Any:
        """train() collected into a History (history.plot() draws the loss curve)."""
        return self._client._fit(self.train(inputs, target, **kwargs))

    def train_stream(self, batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
                     *, clip_grad_norm: float = 0.0,
                     schedule: str | Mapping[str, Any] | None = None,
                     skip_nonfinite: bool = False) -> Any:
        """Send (inputs, target) batches as they are produced; one step and one result each.
        With the AsyncClient, batches may also be an async iterable."""
        requests = _ops.train_stream_requests(self.id, batches, clip_grad_norm, schedule,
                                              skip_nonfinite)
        return self._client._bidi("TrainStream", requests, _ops.stream_step)

    def save_checkpoint(self, name: str = "") -> Any:
        return self._client.save_checkpoint(self.id, name)

    def delete(self) -> Any:
        return self._client.delete_model(self.id)


class ClientCalls:
    """Every call of Client and AsyncClient, written once: each builds an Op and returns
    self._run(op) (the sync Client returns the result, the AsyncClient an awaitable)."""

    timeout: float

    def _run(self, op: Op[Any], timeout: float | None = None) -> Any:
        raise NotImplementedError

    def _drive(self, program: _ops.Program[Any]) -> Any:
        raise NotImplementedError

    def _remote(self, info: ModelInfo) -> RemoteModel:
        return RemoteModel(self, info)

    # ------------------------------------------------------------------ models

    def create_model(self, *, model_id: str = "", **spec: Any) -> Any:
        """Create a model from layers=, expression= or plugin= (see README "Model specs")."""
        return self._run(_ops.create_model(model_id=model_id, **spec).then(self._remote))

    def model(self, model_id: str) -> Any:
        """A handle to an existing model (NotFoundError if there is none)."""
        return self._run(Op("GetModel", pb.GetModelRequest(model_id=model_id),
                            _ops.model_info).then(self._remote))

    def list_models(self) -> Any:
        return self._run(Op("ListModels", pb.ListModelsRequest(),
                            lambda r: [self._remote(_ops.model_info(x)) for x in r.models]))

    def delete_model(self, model_id: str) -> Any:
        return self._run(Op("DeleteModel", pb.DeleteModelRequest(model_id=model_id),
                            lambda r: None))

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, inputs: Any, target: Any = None, *, dataset_id: str = "",
                       chunk_bytes: int = 4 * 1024 * 1024, timeout: float | None = None) -> Any:
        """Stream a dataset to the server once; train on it with dataset=info.dataset_id."""
        requests = _ops.upload_requests(inputs, target, dataset_id, chunk_bytes)
        return self._run(Op("UploadDataset", requests, _ops.dataset_info, deadline=False),
                         timeout)

    def list_datasets(self) -> Any:
        return self._run(Op("ListDatasets", pb.ListDatasetsRequest(),
                            lambda r: [_ops.dataset_info(d) for d in r.datasets]))

    def delete_dataset(self, dataset_id: str) -> Any:
        return self._run(Op("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id),
                            lambda r: None))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, model_id: str, name: str = "") -> Any:
        return self._run(Op("SaveCheckpoint", pb.SaveCheckpointRequest(model_id=model_id,
                                                                       name=name),
                            _ops.checkpoint_info))

    def load_checkpoint(self, name: str, model_id: str = "") -> Any:
        return self._run(Op("LoadCheckpoint", pb.LoadCheckpointRequest(name=name,
                                                                       model_id=model_id),
                            _ops.model_info).then(self._remote))

    def list_checkpoints(self) -> Any:
        return self._run(Op("ListCheckpoints", pb.ListCheckpointsRequest(),
                            lambda r: [_ops.checkpoint_info(c) for c in r.checkpoints]))

    def delete_checkpoint(self, name: str) -> Any:
        """Remove a checkpoint from the server's state dir (NotFoundError if there is none)."""
        return self._run(Op("DeleteCheckpoint", pb.DeleteCheckpointRequest(name=name),
                            lambda r: None))

    # ------------------------------------------------------------------ health

    @staticmethod
    def _health_op(service: str) -> Op[str]:
        return Op("Check", health_pb2.HealthCheckRequest(service=service),
                  lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
                  service="health")

    def health(self, service: str = "", timeout: float | None = None) -> Any:
        """'SERVING', 'NOT_SERVING', ... from the standard gRPC health service."""
        return self._run(self._health_op(service), timeout)

    def wait_ready(self, timeout: float = 30.0) -> Any:
        """Wait until the channel connects and health says SERVING (TimeoutError if not)."""
        address = getattr(self, "address", "the server")
        return self._drive(_ops.returning(None, _ops.poll(
            self._health_op(""), lambda s: s == "SERVING", timeout, f"{address} not SERVING",
            tolerate_errors=True)))
