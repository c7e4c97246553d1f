"""GradientService: each method decodes the request, calls the core, encodes the reply."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import closing
from collections.abc import Iterator
from typing import Any

import grpc

from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from ..core.errors import FailedPrecondition, InvalidArgument
from ..core.service import Core
from ..core.trainer import NON_FINITE
from . import messages as m
from .shm import SharedMemoryRegistry

log = logging.getLogger("gradserve.train")


def _cancelled(context: grpc.ServicerContext, poll_s: float = 0.01) -> Any:
    """True once the caller cancels or its deadline passes; cheap enough to ask every step.

    gRPC's termination callback sets a flag; the context itself is asked at most every 10 ms
    (asking it costs a trip into the gRPC core, which a tiny training step would feel).
    """
    flag = threading.Event()
    context.add_callback(flag.set)
    next_poll = [time.monotonic() + poll_s]

    def cancelled() -> bool:
        if flag.is_set():
            return True
        now = time.monotonic()
        if now < next_poll[0]:
            return False
        next_poll[0] = now + poll_s
        return not context.is_active()

    return cancelled


class GradientServicer(pb_grpc.GradientServiceServicer):
    def __init__(self, core: Core, shm: SharedMemoryRegistry | None = None) -> None:
        self.core = core
        self.shm = shm  # same-host shared-memory regions (None: the fast path is off)

    def _check_size(self, request: Any) -> None:
        self.core.check_request(request.ByteSize())

    # ------------------------------------------------------------------ lifecycle

    def CreateModel(self, request: pb.CreateModelRequest, context: Any) -> pb.ModelInfo:
        if not request.HasField("spec"):
            raise InvalidArgument("spec: required")
        self._check_size(request)
        model = self.core.models.create(m.spec_in(request.spec), request.model_id)
        return m.model_info(model.describe())

    def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        return m.model_info(self.core.models.get(request.model_id).describe())

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.model_info(x.describe())
                                             for x in self.core.models.list()])

    def DeleteModel(self, request: pb.DeleteModelRequest, context: Any) -> pb.DeleteModelResponse:
        self.core.delete_model(request.model_id)
        return pb.DeleteModelResponse()

    # ------------------------------------------------------------------ gradients

    def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        out, forward_id = model.forward(
            m.tensors_in(request.inputs, "inputs", owned=request.retain_graph),
            request.retain_graph, request.eval_mode)
        return m.forward_out(out, forward_id, request, self.shm)

    def Backward(self, request: pb.BackwardRequest, context: Any) -> pb.BackwardResponse:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        result = model.backward(
            inputs=m.tensors_in(request.inputs, "inputs"),
            target=m.optional_tensor(request, "target", "target"),
            forward_id=request.forward_id,
            grad_output=m.optional_tensor(request, "grad_output", "grad_output"),
            grad_outputs=m.tensors_in(request.grad_outputs, "grad_outputs"),
            return_grads=request.return_grads, return_input_grads=request.return_input_grads,
            step=request.step, return_output=request.return_output,
            request_id=request.request_id,
        )
        return m.backward_out(result, request, self.shm)

    def Step(self, request: pb.StepRequest, context: Any) -> pb.StepResponse:
        model = self.core.models.get(request.model_id)
        return pb.StepResponse(step=model.step(request.keep_grad, request.request_id))

    def ZeroGrad(self, request: pb.ZeroGradRequest, context: Any) -> pb.ZeroGradResponse:
        self.core.models.get(request.model_id).zero_grad(request.request_id)
        return pb.ZeroGradResponse()

    def GetParameters(self, request: pb.GetParametersRequest, context: Any
                      ) -> pb.GetParametersResponse:
        model = self.core.models.get(request.model_id)
        values, grads, buffers = model.get_parameters(list(request.names), request.include_grads,
                                                      request.include_buffers)
        return pb.GetParametersResponse(parameters=m.named_out(values), grads=m.named_out(grads),
                                        buffers=m.named_out(buffers))

    def SetParameters(self, request: pb.SetParametersRequest, context: Any
                      ) -> pb.SetParametersResponse:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        model.set_parameters(m.named_in(request.parameters, "parameters"), request.request_id)
        return pb.SetParametersResponse()

    # ------------------------------------------------------------------ shared memory

    def RegisterSharedMemory(self, request: pb.RegisterSharedMemoryRequest, context: Any
                             ) -> pb.RegisterSharedMemoryResponse:
        if self.shm is None:
            raise FailedPrecondition("shared memory: the same-host fast path is disabled on this "
                                     "server; use the wire")
        region = self.shm.register(request.name, request.size, request.nonce)
        return pb.RegisterSharedMemoryResponse(region_id=region.id,
                                               idle_ttl_seconds=self.shm.idle_ttl_s)

    def UnregisterSharedMemory(self, request: pb.UnregisterSharedMemoryRequest, context: Any
                               ) -> pb.UnregisterSharedMemoryResponse:
        if self.shm is not None:
            self.shm.unregister(request.region_id)
        return pb.UnregisterSharedMemoryResponse()

    # ------------------------------------------------------------------ training

    def _data(self, msg: pb.DataSource, what: str) -> Any:
        source = msg.WhichOneof("source")
        if source == "inline":
            return m.inline_in(msg.inline, f"{what}.inline")
        if source == "dataset_id":
            return self.core.datasets.get(msg.dataset_id).data
        return None

    def Train(self, request: pb.TrainRequest, context: Any) -> Iterator[pb.TrainEvent]:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        data = self._data(request.data, "data")
        validation = self._data(request.validation, "validation")
        options = m.options_in(request.options)
        events = self.core.train(model, data, validation, options, _cancelled(context),
                                 request.checkpoint_every_steps)
        # closing(): release the model as soon as this call ends, however it ends.
        with closing(events):
            for event in events:
                yield m.event_out(event)
                if event.summary is not None and event.summary.stop_reason == NON_FINITE:
                    # The DONE event carries the summary; the status tells every client it failed.
                    raise FailedPrecondition(f"training stopped: {event.summary.message}")

    def TrainStream(self, request_iterator: Iterator[pb.TrainStreamRequest], context: Any
                    ) -> Iterator[pb.TrainStreamResponse]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidArgument("the first TrainStream message must be a config")
        cfg = first.config
        model = self.core.models.get(cfg.model_id)

        def batches() -> Iterator[Any]:
            for k, msg in enumerate(request_iterator):
                if msg.WhichOneof("message") != "batch":
                    raise InvalidArgument(f"message {k + 1}: expected a batch after the config")
                self._check_size(msg)
                yield m.inline_in(msg.batch, f"batch[{k}]")

        results = self.core.trainer.stream(
            model, cfg.clip_grad_norm, cfg.schedule.type or "none",
            m.struct_in(cfg.schedule.params, "config.schedule.params"), cfg.schedule.warmup_steps,
            cfg.schedule.warmup_start_factor, cfg.skip_nonfinite, batches(), _cancelled(context))
        with closing(results):
            for result in results:
                yield m.stream_result_out(result)

    # ------------------------------------------------------------------ datasets

    def UploadDataset(self, request_iterator: Iterator[pb.UploadDatasetRequest], context: Any
                      ) -> pb.DatasetInfo:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidArgument("the first UploadDataset message must be a header")
        header = first.header

        def chunks() -> Iterator[bytes]:
            for msg in request_iterator:
                if msg.WhichOneof("message") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                yield msg.chunk

        dataset = self.core.datasets.upload(
            header.dataset_id,
            [m.layout_in(t, f"header.inputs[{i}]") for i, t in enumerate(header.inputs)],
            m.layout_in(header.target, "header.target") if header.HasField("target") else None,
            chunks())
        return self._dataset_info(dataset)

    @staticmethod
    def _dataset_info(dataset: Any) -> pb.DatasetInfo:
        layouts = [m.layout_out(x) for x in dataset.layouts]
        n_in = len(dataset.data.inputs)
        info = pb.DatasetInfo(dataset_id=dataset.id, num_samples=dataset.data.num_samples,
                              num_bytes=dataset.nbytes, inputs=layouts[:n_in])
        if dataset.has_target:
            info.target.CopyFrom(layouts[n_in])
        return info

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: Any
                     ) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(datasets=[self._dataset_info(d)
                                                 for d in self.core.datasets.list()])

    def DeleteDataset(self, request: pb.DeleteDatasetRequest, context: Any
                      ) -> pb.DeleteDatasetResponse:
        self.core.datasets.delete(request.dataset_id)
        return pb.DeleteDatasetResponse()

    # ------------------------------------------------------------------ checkpoints

    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: Any
                       ) -> pb.CheckpointInfo:
        return _checkpoint_info(self.core.save_checkpoint(request.model_id, request.name))

    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: Any) -> pb.ModelInfo:
        model = self.core.load_checkpoint(request.name, request.model_id)
        return m.model_info(model.describe())

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context: Any
                        ) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            checkpoints=[_checkpoint_info(c) for c in self.core.list_checkpoints()])

    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context: Any
                         ) -> pb.DeleteCheckpointResponse:
        self.core.delete_checkpoint(request.name)
        return pb.DeleteCheckpointResponse()


def _checkpoint_info(c: Any) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(name=c.name, model_id=c.model_id, step=c.step,
                             num_bytes=c.num_bytes, created_unix=c.created_unix, error=c.error)
