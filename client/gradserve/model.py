"""RemoteModel: a server-side model used like a local one. Written once for sync and async.

Each method builds an Op and hands it to its client: the sync Client returns the result, the
AsyncClient returns an awaitable of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import _ops
from ._ops import ModelInfo


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
        return self._client._run(_ops.Op("GetModel", _ops.pb.GetModelRequest(model_id=self.id),
                                         self._update))

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

    def train_stream(self, batches: Iterable[tuple[Any, Any]], *, clip_grad_norm: float = 0.0,
                     schedule: str | Mapping[str, Any] | None = None,
                     skip_nonfinite: bool = False) -> Any:
        """Send (inputs, target) batches as they are produced; one step and one result each."""
        requests = _ops.train_stream_requests(self.id, batches, clip_grad_norm, schedule,
                                              skip_nonfinite)
        return self._client._bidi("TrainStream", requests, _ops.stream_step)

    def save_checkpoint(self, name: str = "") -> Any:
        return self._client.save_checkpoint(self.id, name)

    def delete(self) -> Any:
        return self._client.delete_model(self.id)
