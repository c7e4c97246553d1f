from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_COMPLETED: _ClassVar[StopReason]
    STOP_REASON_MAX_STEPS: _ClassVar[StopReason]
    STOP_REASON_STOP_LOSS: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_NON_FINITE: _ClassVar[StopReason]
    STOP_REASON_SHUTDOWN: _ClassVar[StopReason]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_PROGRESS: _ClassVar[EventKind]
    EVENT_KIND_EPOCH_END: _ClassVar[EventKind]
    EVENT_KIND_DONE: _ClassVar[EventKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_COMPLETED: StopReason
STOP_REASON_MAX_STEPS: StopReason
STOP_REASON_STOP_LOSS: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_NON_FINITE: StopReason
STOP_REASON_SHUTDOWN: StopReason
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_PROGRESS: EventKind
EVENT_KIND_EPOCH_END: EventKind
EVENT_KIND_DONE: EventKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shm")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shm: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region_id", "offset", "length")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    region_id: str
    offset: int
    length: int
    def __init__(self, region_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("layers", "expression", "plugin", "exported", "loss", "optimizer", "seed", "initial_parameters", "frozen", "dtype")
    class InitialParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    layers: LayersSource
    expression: ExpressionSource
    plugin: PluginSource
    exported: ExportedSource
    loss: LossSpec
    optimizer: OptimizerSpec
    seed: int
    initial_parameters: _containers.MessageMap[str, Tensor]
    frozen: _containers.RepeatedScalarFieldContainer[str]
    dtype: DType
    def __init__(self, layers: _Optional[_Union[LayersSource, _Mapping]] = ..., expression: _Optional[_Union[ExpressionSource, _Mapping]] = ..., plugin: _Optional[_Union[PluginSource, _Mapping]] = ..., exported: _Optional[_Union[ExportedSource, _Mapping]] = ..., loss: _Optional[_Union[LossSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., seed: _Optional[int] = ..., initial_parameters: _Optional[_Mapping[str, Tensor]] = ..., frozen: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("type", "kwargs")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    type: str
    kwargs: _struct_pb2.Struct
    def __init__(self, type: _Optional[str] = ..., kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class LayersSource(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class ExpressionSource(_message.Message):
    __slots__ = ("expression", "inputs", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    expression: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.MessageMap[str, Tensor]
    def __init__(self, expression: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class PluginSource(_message.Message):
    __slots__ = ("name", "kwargs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ExportedSource(_message.Message):
    __slots__ = ("archive", "output_index", "output_name")
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    archive: bytes
    output_index: int
    output_name: str
    def __init__(self, archive: _Optional[bytes] = ..., output_index: _Optional[int] = ..., output_name: _Optional[str] = ...) -> None: ...

class LossSpec(_message.Message):
    __slots__ = ("type", "reduction", "kwargs")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    type: str
    reduction: str
    kwargs: _struct_pb2.Struct
    def __init__(self, type: _Optional[str] = ..., reduction: _Optional[str] = ..., kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("type", "params")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    type: str
    params: _struct_pb2.Struct
    def __init__(self, type: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "trainable", "buffer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    trainable: bool
    buffer: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., trainable: _Optional[bool] = ..., buffer: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "spec", "parameters", "step", "device", "num_parameters", "inputs", "retained_graphs", "training", "outputs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    spec: ModelSpec
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    step: int
    device: str
    num_parameters: int
    inputs: _containers.RepeatedScalarFieldContainer[str]
    retained_graphs: int
    training: bool
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., step: _Optional[int] = ..., device: _Optional[str] = ..., num_parameters: _Optional[int] = ..., inputs: _Optional[_Iterable[str]] = ..., retained_graphs: _Optional[int] = ..., training: _Optional[bool] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("model_id", "spec")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    spec: ModelSpec
    def __init__(self, model_id: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "retain_graph", "eval_mode", "shm_reply")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_GRAPH_FIELD_NUMBER: _ClassVar[int]
    EVAL_MODE_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    retain_graph: bool
    eval_mode: bool
    shm_reply: SharedMemoryRef
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., retain_graph: _Optional[bool] = ..., eval_mode: _Optional[bool] = ..., shm_reply: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output", "forward_id", "outputs")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    forward_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., forward_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "target", "forward_id", "grad_output", "return_grads", "return_input_grads", "step", "return_output", "request_id", "grad_outputs", "shm_reply")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADS_FIELD_NUMBER: _ClassVar[int]
    RETURN_INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    target: Tensor
    forward_id: str
    grad_output: Tensor
    return_grads: bool
    return_input_grads: bool
    step: bool
    return_output: bool
    request_id: str
    grad_outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    shm_reply: SharedMemoryRef
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., forward_id: _Optional[str] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., return_grads: _Optional[bool] = ..., return_input_grads: _Optional[bool] = ..., step: _Optional[bool] = ..., return_output: _Optional[bool] = ..., request_id: _Optional[str] = ..., grad_outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., shm_reply: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("loss", "grads", "input_grads", "step", "output", "outputs")
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    grads: _containers.MessageMap[str, Tensor]
    input_grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    step: int
    output: Tensor
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, loss: _Optional[float] = ..., grads: _Optional[_Mapping[str, Tensor]] = ..., input_grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., step: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model_id", "keep_grad", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    keep_grad: bool
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., keep_grad: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class ZeroGradRequest(_message.Message):
    __slots__ = ("model_id", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ZeroGradResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("model_id", "names", "include_grads", "include_buffers", "include_optimizer_state")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GRADS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    include_grads: bool
    include_buffers: bool
    include_optimizer_state: bool
    def __init__(self, model_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., include_grads: _Optional[bool] = ..., include_buffers: _Optional[bool] = ..., include_optimizer_state: _Optional[bool] = ...) -> None: ...

class ParameterOptimizerState(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, Tensor]
    def __init__(self, values: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class GetParametersResponse(_message.Message):
    __slots__ = ("parameters", "grads", "buffers", "optimizer_state", "optimizer_param_groups")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class OptimizerStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParameterOptimizerState
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParameterOptimizerState, _Mapping]] = ...) -> None: ...
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.MessageMap[str, Tensor]
    grads: _containers.MessageMap[str, Tensor]
    buffers: _containers.MessageMap[str, Tensor]
    optimizer_state: _containers.MessageMap[str, ParameterOptimizerState]
    optimizer_param_groups: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, parameters: _Optional[_Mapping[str, Tensor]] = ..., grads: _Optional[_Mapping[str, Tensor]] = ..., buffers: _Optional[_Mapping[str, Tensor]] = ..., optimizer_state: _Optional[_Mapping[str, ParameterOptimizerState]] = ..., optimizer_param_groups: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class SetParametersRequest(_message.Message):
    __slots__ = ("model_id", "parameters", "request_id")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    parameters: _containers.MessageMap[str, Tensor]
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SetParametersResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InlineData(_message.Message):
    __slots__ = ("inputs", "target")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    target: Tensor
    def __init__(self, inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DataSource(_message.Message):
    __slots__ = ("inline", "dataset_id")
    INLINE_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    inline: InlineData
    dataset_id: str
    def __init__(self, inline: _Optional[_Union[InlineData, _Mapping]] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class ScheduleSpec(_message.Message):
    __slots__ = ("type", "params", "warmup_steps", "warmup_start_factor")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_START_FACTOR_FIELD_NUMBER: _ClassVar[int]
    type: str
    params: _struct_pb2.Struct
    warmup_steps: int
    warmup_start_factor: float
    def __init__(self, type: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., warmup_steps: _Optional[int] = ..., warmup_start_factor: _Optional[float] = ...) -> None: ...

class TrainOptions(_message.Message):
    __slots__ = ("epochs", "max_steps", "batch_size", "shuffle", "seed", "drop_last", "stop_loss", "accumulation_steps", "clip_grad_norm", "schedule", "log_every_steps", "skip_nonfinite")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    STOP_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LOG_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    SKIP_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    max_steps: int
    batch_size: int
    shuffle: bool
    seed: int
    drop_last: bool
    stop_loss: float
    accumulation_steps: int
    clip_grad_norm: float
    schedule: ScheduleSpec
    log_every_steps: int
    skip_nonfinite: bool
    def __init__(self, epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., shuffle: _Optional[bool] = ..., seed: _Optional[int] = ..., drop_last: _Optional[bool] = ..., stop_loss: _Optional[float] = ..., accumulation_steps: _Optional[int] = ..., clip_grad_norm: _Optional[float] = ..., schedule: _Optional[_Union[ScheduleSpec, _Mapping]] = ..., log_every_steps: _Optional[int] = ..., skip_nonfinite: _Optional[bool] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("model_id", "data", "validation", "options", "checkpoint_every_steps")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    data: DataSource
    validation: DataSource
    options: TrainOptions
    checkpoint_every_steps: int
    def __init__(self, model_id: _Optional[str] = ..., data: _Optional[_Union[DataSource, _Mapping]] = ..., validation: _Optional[_Union[DataSource, _Mapping]] = ..., options: _Optional[_Union[TrainOptions, _Mapping]] = ..., checkpoint_every_steps: _Optional[int] = ...) -> None: ...

class TrainSummary(_message.Message):
    __slots__ = ("steps", "epochs", "final_loss", "stop_reason", "skipped_batches", "message", "model_step")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_STEP_FIELD_NUMBER: _ClassVar[int]
    steps: int
    epochs: int
    final_loss: float
    stop_reason: StopReason
    skipped_batches: int
    message: str
    model_step: int
    def __init__(self, steps: _Optional[int] = ..., epochs: _Optional[int] = ..., final_loss: _Optional[float] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., skipped_batches: _Optional[int] = ..., message: _Optional[str] = ..., model_step: _Optional[int] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("kind", "step", "epoch", "batch_loss", "epoch_loss", "samples_per_second", "learning_rate", "grad_norm", "elapsed_seconds", "val_loss", "summary", "run_step", "total_steps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    step: int
    epoch: int
    batch_loss: float
    epoch_loss: float
    samples_per_second: float
    learning_rate: float
    grad_norm: float
    elapsed_seconds: float
    val_loss: float
    summary: TrainSummary
    run_step: int
    total_steps: int
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., batch_loss: _Optional[float] = ..., epoch_loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., val_loss: _Optional[float] = ..., summary: _Optional[_Union[TrainSummary, _Mapping]] = ..., run_step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class TrainStreamConfig(_message.Message):
    __slots__ = ("model_id", "clip_grad_norm", "schedule", "skip_nonfinite")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SKIP_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    clip_grad_norm: float
    schedule: ScheduleSpec
    skip_nonfinite: bool
    def __init__(self, model_id: _Optional[str] = ..., clip_grad_norm: _Optional[float] = ..., schedule: _Optional[_Union[ScheduleSpec, _Mapping]] = ..., skip_nonfinite: _Optional[bool] = ...) -> None: ...

class TrainStreamRequest(_message.Message):
    __slots__ = ("config", "batch")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    config: TrainStreamConfig
    batch: InlineData
    def __init__(self, config: _Optional[_Union[TrainStreamConfig, _Mapping]] = ..., batch: _Optional[_Union[InlineData, _Mapping]] = ...) -> None: ...

class TrainStreamResponse(_message.Message):
    __slots__ = ("step", "loss", "grad_norm", "learning_rate", "skipped")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., skipped: _Optional[bool] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DatasetHeader(_message.Message):
    __slots__ = ("dataset_id", "inputs", "target")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    target: TensorHeader
    def __init__(self, dataset_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., target: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DatasetHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("dataset_id", "num_samples", "num_bytes", "inputs", "target")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    num_samples: int
    num_bytes: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    target: TensorHeader
    def __init__(self, dataset_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., num_bytes: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., target: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("model_id", "name")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    name: str
    def __init__(self, model_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("name", "model_id", "step", "num_bytes", "created_unix", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    step: int
    num_bytes: int
    created_unix: float
    error: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., step: _Optional[int] = ..., num_bytes: _Optional[int] = ..., created_unix: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("name", "model_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "torch_version", "world_size", "backend", "devices", "hosts")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    torch_version: str
    world_size: int
    backend: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., torch_version: _Optional[str] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name", "size", "nonce", "pid", "fd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    nonce: bytes
    pid: int
    fd: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("region_id", "idle_ttl_seconds")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    region_id: str
    idle_ttl_seconds: float
    def __init__(self, region_id: _Optional[str] = ..., idle_ttl_seconds: _Optional[float] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region_id",)
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    region_id: str
    def __init__(self, region_id: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
