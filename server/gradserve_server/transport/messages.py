"""Wire messages <-> core objects. Tensors go through gradserve.codec, nowhere else."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from google.protobuf import json_format, struct_pb2
from gradserve import codec, results, wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ..catalog.layers import MAX_LAYERS
from ..core.datasets import TensorLayout, TrainData
from ..core.errors import InvalidArgument
from ..core.limits import MAX_NAMED_TENSORS, MAX_TENSORS
from ..core.model import BackwardResult, Outputs
from ..core.spec import FLOAT_DTYPES, ModelSpec
from ..core.trainer import StreamResult, TrainOptions


def tensor_in(msg: pb.Tensor, what: str, owned: bool = False) -> torch.Tensor:
    """Zero-copy decode: the server never writes into request tensors.

    owned: the tensor outlives the call (a retained graph), so one in shared memory, which the
    client reuses after the reply, is copied.
    """
    t = codec.to_torch(msg, what, writable=False)
    return t.clone() if owned and getattr(msg, "shared", False) else t


def check_count(msgs: Any, what: str, limit: int = MAX_TENSORS, noun: str = "tensors") -> None:
    """Refuse a repeated or map field with more than `limit` entries, before reading any."""
    if len(msgs) > limit:
        raise InvalidArgument(f"{what}: {len(msgs)} {noun}; at most {limit}")


def check_tensor_counts(msg: Any) -> None:
    """Every Tensor field of a request message within its count (before any is wrapped)."""
    plan = wire.plan_for(msg.DESCRIPTOR)
    for name, field in (plan.by_name.items() if plan is not None else ()):
        if field.map:
            check_count(getattr(msg, name), name, MAX_NAMED_TENSORS)
        elif field.repeated:
            check_count(getattr(msg, name), name)


def tensors_in(msgs: Any, what: str, owned: bool = False) -> list[torch.Tensor]:
    check_count(msgs, what)
    return [tensor_in(m, f"{what}[{i}]", owned) for i, m in enumerate(msgs)]


def named_in(msgs: Mapping[str, pb.Tensor], what: str) -> dict[str, torch.Tensor]:
    check_count(msgs, what, MAX_NAMED_TENSORS)
    return {k: tensor_in(v, f"{what}[{k}]") for k, v in msgs.items()}


def optional_tensor(parent: Any, field: str, what: str) -> torch.Tensor | None:
    return tensor_in(getattr(parent, field), what) if parent.HasField(field) else None


def tensor_out(t: torch.Tensor) -> pb.Tensor:
    return codec.encode(t)


def named_out(values: Mapping[str, torch.Tensor]) -> dict[str, pb.Tensor]:
    return {k: codec.encode(v) for k, v in values.items()}


def optimizer_state_out(reply: pb.GetParametersResponse,
                        state: Mapping[str, Mapping[str, torch.Tensor]],
                        groups: list[dict[str, Any]]) -> None:
    for name, values in state.items():
        reply.optimizer_state[name].SetInParent()
        for key, value in values.items():
            reply.optimizer_state[name].values[key].CopyFrom(codec.encode(value))
    reply.optimizer_param_groups.extend(struct_out(group) for group in groups)


# Keyword arguments, loss, optimizer and schedule options: a few hundred bytes in practice. A
# layer with 100,000 made-up keyword arguments took 5 s to read before the first was refused.
MAX_STRUCT_BYTES = 64 * 1024


def struct_in(msg: struct_pb2.Struct, what: str = "kwargs") -> dict[str, Any]:
    size = msg.ByteSize()
    if size > MAX_STRUCT_BYTES:
        raise InvalidArgument(f"{what}: {size} bytes; at most {MAX_STRUCT_BYTES}")
    try:
        return json_format.MessageToDict(msg)
    except ValueError as exc:  # NaN or infinity: a Struct holds them, JSON has no such numbers
        raise InvalidArgument(f"{what}: not a JSON value: {exc}") from None


def struct_out(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _float_dtype(wire: int) -> str:
    if wire == pb.DTYPE_UNSPECIFIED:
        return "float32"
    name = codec.dtype_name(wire)
    if name not in FLOAT_DTYPES:
        raise InvalidArgument(f"spec.dtype: {name} is not a floating dtype; expected one of "
                              f"{sorted(FLOAT_DTYPES)}")
    return name


# ------------------------------------------------------------------------------------ specs


def spec_in(msg: pb.ModelSpec) -> ModelSpec:
    source = msg.WhichOneof("source")
    if source is None:
        raise InvalidArgument("spec: set exactly one of layers, expression, plugin or exported")
    spec = ModelSpec(source=source)
    if source == "layers":
        check_count(msg.layers.layers, "spec.layers", MAX_LAYERS, "layers")
        spec.layers = [{"type": layer.type,
                        "kwargs": struct_in(layer.kwargs, f"spec.layers[{i}].kwargs")}
                       for i, layer in enumerate(msg.layers.layers)]
    elif source == "expression":
        spec.expression = msg.expression.expression
        spec.inputs = list(msg.expression.inputs)
        spec.parameters = named_in(msg.expression.parameters, "spec.expression.parameters")
    elif source == "exported":
        spec.exported = msg.exported.archive
        spec.output_index = msg.exported.output_index
        spec.output_name = msg.exported.output_name
    else:
        spec.plugin = msg.plugin.name
        spec.plugin_kwargs = struct_in(msg.plugin.kwargs, "spec.plugin.kwargs")
    spec.loss = msg.loss.type or "none"
    spec.loss_reduction = msg.loss.reduction or ("none" if spec.loss == "none" else "mean")
    spec.loss_kwargs = struct_in(msg.loss.kwargs, "spec.loss.kwargs")
    if msg.HasField("optimizer"):
        spec.optimizer = msg.optimizer.type or "sgd"
        spec.optimizer_params = struct_in(msg.optimizer.params, "spec.optimizer.params")
    spec.seed = msg.seed if msg.HasField("seed") else None
    spec.initial_parameters = named_in(msg.initial_parameters, "spec.initial_parameters")
    spec.frozen = list(msg.frozen)
    spec.dtype = _float_dtype(msg.dtype)
    return spec


def spec_out(spec: ModelSpec) -> pb.ModelSpec:
    msg = pb.ModelSpec(
        loss=pb.LossSpec(type=spec.loss, reduction=spec.loss_reduction,
                         kwargs=struct_out(spec.loss_kwargs)),
        optimizer=pb.OptimizerSpec(type=spec.optimizer,
                                   params=struct_out(spec.optimizer_params)),
        frozen=spec.frozen, dtype=codec.dtype_wire(spec.dtype),
    )
    if spec.seed is not None:
        msg.seed = spec.seed
    if spec.source == "layers":
        msg.layers.layers.extend(pb.Layer(type=layer["type"], kwargs=struct_out(layer["kwargs"]))
                                 for layer in spec.layers)
    elif spec.source == "expression":
        msg.expression.expression = spec.expression
        msg.expression.inputs.extend(spec.inputs)
        for name, value in spec.parameters.items():
            msg.expression.parameters[name].CopyFrom(codec.encode(value))
    elif spec.source == "exported":  # the archive stays out of ModelInfo (it may be large)
        msg.exported.SetInParent()
        if spec.output_name:
            msg.exported.output_name = spec.output_name
        elif spec.output_index:
            msg.exported.output_index = spec.output_index
    else:
        msg.plugin.name = spec.plugin
        msg.plugin.kwargs.CopyFrom(struct_out(spec.plugin_kwargs))
    return msg


def model_info(desc: Mapping[str, Any]) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=desc["model_id"], spec=spec_out(desc["spec"]),
        parameters=[pb.ParameterInfo(name=p["name"], shape=p["shape"],
                                     dtype=codec.dtype_wire(p["dtype"]),
                                     trainable=p["trainable"], buffer=p["buffer"])
                    for p in desc["parameters"]],
        step=desc["step"], device=desc["device"], num_parameters=desc["num_parameters"],
        inputs=desc["inputs"], retained_graphs=desc["retained_graphs"],
        training=desc["training"], outputs=desc.get("outputs", []),
    )


def backward_out(result: BackwardResult, request: Any = None, shm: Any = None) -> Any:
    """The reply; large tensors are framed (gradserve.wire) or placed in the request's shm_reply."""
    payloads: dict[Any, Any] = {}
    msg = pb.BackwardResponse(
        step=result.step,
        grads={k: _part(v, payloads, ("grads", k)) for k, v in result.grads.items()},
        input_grads=[_part(t, payloads, ("input_grads", i))
                     for i, t in enumerate(result.input_grads)])
    if result.loss is not None:
        msg.loss = result.loss
    if result.output is not None:
        msg.output.CopyFrom(_part(result.output, payloads, ("output",)))
    msg.outputs.extend(_part(t, payloads, ("outputs", i)) for i, t in enumerate(result.outputs))
    return _reply(msg, payloads, request, shm)


def forward_out(out: torch.Tensor | Outputs, forward_id: str, request: Any = None,
                shm: Any = None) -> Any:
    """The reply; a multi-output model's outputs all go in outputs, the loss output in output."""
    payloads: dict[Any, Any] = {}
    if isinstance(out, Outputs):
        msg = pb.ForwardResponse(
            output=_part(out.tensors[out.main], payloads, ("output",)), forward_id=forward_id,
            outputs=[_part(t, payloads, ("outputs", i)) for i, t in enumerate(out.tensors)])
    else:
        msg = pb.ForwardResponse(output=_part(out, payloads, ("output",)), forward_id=forward_id)
    return _reply(msg, payloads, request, shm)


def _part(t: torch.Tensor, payloads: dict[Any, Any], path: tuple[Any, ...]) -> pb.Tensor:
    msg, payload = codec.encode_parts(t, minimum=wire.MIN_PAYLOAD)
    if payload is not None:
        payloads[path] = payload
    return msg


def _reply(msg: Any, payloads: dict[Any, Any], request: Any, shm: Any) -> Any:
    if payloads and shm is not None and isinstance(request, wire.Framed):
        reply = request.message.shm_reply
        if request.message.HasField("shm_reply") and reply.length:
            shm.place_reply(msg, payloads, reply)
    return wire.framed(msg, payloads)


# ------------------------------------------------------------------------------------ training


def inline_in(msg: pb.InlineData, what: str) -> TrainData:
    return TrainData(tensors_in(msg.inputs, f"{what}.inputs"),
                     optional_tensor(msg, "target", f"{what}.target"))


def options_in(msg: pb.TrainOptions) -> TrainOptions:
    sched = msg.schedule
    if msg.HasField("stop_loss") and math.isnan(msg.stop_loss):
        raise InvalidArgument("options.stop_loss: must be a number")
    return TrainOptions(
        epochs=msg.epochs if (msg.epochs or msg.max_steps) else 1,
        max_steps=msg.max_steps, batch_size=msg.batch_size, shuffle=msg.shuffle, seed=msg.seed,
        drop_last=msg.drop_last,
        stop_loss=msg.stop_loss if msg.HasField("stop_loss") else None,
        accumulation_steps=msg.accumulation_steps or 1, clip_grad_norm=msg.clip_grad_norm,
        schedule=sched.type or "none",
        schedule_params=struct_in(sched.params, "options.schedule.params"),
        warmup_steps=sched.warmup_steps, warmup_start_factor=sched.warmup_start_factor,
        log_every_steps=msg.log_every_steps, skip_nonfinite=msg.skip_nonfinite,
    )


# Events and checkpoint infos are gradserve.results dataclasses on both sides of the wire.
event_out = results.train_event_message
checkpoint_info_out = results.checkpoint_info_message


def stream_result_out(r: StreamResult) -> pb.TrainStreamResponse:
    return pb.TrainStreamResponse(step=r.step, loss=r.loss, grad_norm=r.grad_norm,
                                  learning_rate=r.learning_rate, skipped=r.skipped)


# ------------------------------------------------------------------------------------ datasets


def layouts_in(msg: pb.DatasetHeader) -> tuple[list[TensorLayout], TensorLayout | None]:
    """A dataset header's input and target layouts; the count is checked before any is read."""
    check_count(msg.inputs, "header.inputs")
    inputs = [layout_in(t, f"header.inputs[{i}]") for i, t in enumerate(msg.inputs)]
    return inputs, layout_in(msg.target, "header.target") if msg.HasField("target") else None


def layout_in(msg: pb.TensorHeader, what: str) -> TensorLayout:
    name = codec.dtype_name(msg.dtype) if msg.dtype else None
    if name is None:
        raise InvalidArgument(f"{what}.dtype: unset")
    if any(d < 0 for d in msg.shape):
        raise InvalidArgument(f"{what}.shape: negative dimension")
    return TensorLayout(getattr(torch, name), tuple(msg.shape))


def layout_out(layout: TensorLayout) -> pb.TensorHeader:
    return pb.TensorHeader(dtype=codec.dtype_wire(str(layout.dtype)), shape=layout.shape)
