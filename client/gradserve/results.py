"""What SDK calls return: one definition of each result, decoded from its reply message.

Plain dataclasses over the generated messages; nothing here talks to a server (no grpc import,
and `import gradserve` loads the clients only when they are used), so the server uses these
types too: its trainer produces TrainEvent and TrainSummary, its checkpoint store
CheckpointInfo, and the encoders below are what its transport sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from . import codec
from ._proto.gradserve.v1 import gradserve_pb2 as pb

if TYPE_CHECKING:
    # A decoded tensor: torch.Tensor when torch is importable, else a numpy array. Type checkers
    # see torch.Tensor (or Any where torch is not installed).
    from torch import Tensor
else:
    Tensor = Any


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
    # Output names of a multi-output (exported) model; forward returns a tuple in this order.
    outputs: tuple[str, ...] = ()

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
        outputs=tuple(msg.outputs),
    )


@dataclass(frozen=True)
class ServerInfo:
    """What a server is: versions, and the devices it computes on (a torchrun group: one per
    rank, in rank order; world_size > 1 splits every batch over them)."""

    version: str
    torch_version: str
    world_size: int
    backend: str  # "gloo" or "nccl" for a group; "" for one process
    devices: tuple[str, ...]
    hosts: tuple[str, ...]


def server_info(msg: pb.GetServerInfoResponse) -> ServerInfo:
    return ServerInfo(msg.version, msg.torch_version, msg.world_size, msg.backend,
                      tuple(msg.devices), tuple(msg.hosts))


@dataclass(frozen=True)
class ForwardResult:
    output: Tensor
    forward_id: str


@dataclass(frozen=True)
class BackwardResult:
    """loss: float (None with grad_output); grads: name -> tensor; input_grads: list."""

    loss: float | None
    step: int
    grads: dict[str, Tensor]
    input_grads: list[Tensor]
    output: Tensor | None


@dataclass(frozen=True)
class OptimizerState:
    """A model's optimizer state: state[parameter name][key] (e.g. Adam's "step", "exp_avg",
    "exp_avg_sq"; SGD's "momentum_buffer"), as optimizer.state_dict()["state"] holds it by
    index; param_groups: each group's hyper-parameters without "params" (lr as a schedule left
    it)."""

    state: dict[str, dict[str, Tensor]]
    param_groups: list[dict[str, Any]]


def optimizer_state(msg: pb.GetParametersResponse, order: Sequence[str] = ()) -> OptimizerState:
    names = [n for n in order if n in msg.optimizer_state]
    names += sorted(n for n in msg.optimizer_state if n not in set(order))
    state = {n: {k: codec.decode(v, f"optimizer_state[{n}][{k}]")
                 for k, v in sorted(msg.optimizer_state[n].values.items())} for n in names}
    groups = [json_format.MessageToDict(g) for g in msg.optimizer_param_groups]
    return OptimizerState(state, groups)


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    num_samples: int
    num_bytes: int


def dataset_info(msg: pb.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(msg.dataset_id, msg.num_samples, msg.num_bytes)


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    model_id: str
    step: int
    num_bytes: int
    created_unix: float
    error: str = ""  # why the file cannot be loaded; empty for a usable checkpoint


def checkpoint_info(msg: pb.CheckpointInfo) -> CheckpointInfo:
    return CheckpointInfo(msg.name, msg.model_id, msg.step, msg.num_bytes, msg.created_unix,
                          msg.error)


def checkpoint_info_message(info: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(name=info.name, model_id=info.model_id, step=info.step,
                             num_bytes=info.num_bytes, created_unix=info.created_unix,
                             error=info.error)


@dataclass(frozen=True)
class TrainSummary:
    """How a Train run ended (the DONE event); stop_reason: completed, max_steps, stop_loss,
    cancelled, non_finite or shutdown."""

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
    val_loss: float | None = None
    summary: TrainSummary | None = None
    run_step: int = 0
    total_steps: int = 0  # the run's steps unless it stops early (a progress bar's total)


_KIND = {pb.EVENT_KIND_PROGRESS: "progress", pb.EVENT_KIND_EPOCH_END: "epoch_end",
         pb.EVENT_KIND_DONE: "done"}
_KIND_WIRE = {name: wire for wire, name in _KIND.items()}
_REASON_PREFIX = "STOP_REASON_"


def _reason(value: int) -> str:
    return pb.StopReason.Name(value).removeprefix(_REASON_PREFIX).lower()


def train_event(msg: pb.TrainEvent) -> TrainEvent:
    summary = None
    if msg.HasField("summary"):
        s = msg.summary
        summary = TrainSummary(s.steps, s.epochs, s.final_loss, _reason(s.stop_reason),
                               s.skipped_batches, s.message, s.model_step)
    return TrainEvent(_KIND.get(msg.kind, "unknown"), msg.step, msg.epoch, msg.batch_loss,
                      msg.epoch_loss, msg.samples_per_second, msg.learning_rate, msg.grad_norm,
                      msg.elapsed_seconds, msg.val_loss if msg.HasField("val_loss") else None,
                      summary, msg.run_step, msg.total_steps)


def train_event_message(event: TrainEvent) -> pb.TrainEvent:
    """The wire message of an event (what the server sends; train_event reads it back)."""
    msg = pb.TrainEvent(
        kind=_KIND_WIRE[event.kind], step=event.step, epoch=event.epoch,
        batch_loss=event.batch_loss, epoch_loss=event.epoch_loss,
        samples_per_second=event.samples_per_second, learning_rate=event.learning_rate,
        grad_norm=event.grad_norm, elapsed_seconds=event.elapsed_seconds,
        run_step=event.run_step, total_steps=event.total_steps)
    if event.val_loss is not None:
        msg.val_loss = event.val_loss
    if event.summary is not None:
        s = event.summary
        msg.summary.CopyFrom(pb.TrainSummary(
            steps=s.steps, epochs=s.epochs, final_loss=s.final_loss,
            stop_reason=pb.StopReason.Value(_REASON_PREFIX + s.stop_reason.upper()),
            skipped_batches=s.skipped_batches, message=s.message, model_step=s.model_step))
    return msg


@dataclass(frozen=True)
class StreamStep:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool


def stream_step(msg: pb.TrainStreamResponse) -> StreamStep:
    return StreamStep(msg.step, msg.loss, msg.grad_norm, msg.learning_rate, msg.skipped)
