"""GradientService bodies: decode the request, call the core, encode the reply.

They are synchronous and run on executor threads (transport/rpc.py decides which, reads the
request and writes the reply); `call` carries what they need of the RPC.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ..core.datasets import Upload
from ..core.errors import FailedPrecondition, InvalidArgument, NotFound
from ..core.service import Core
from ..core.trainer import NON_FINITE, StreamSession
from . import messages as m
from .call import Call
from .shm import SharedMemoryRegistry

log = logging.getLogger("gradserve.train")


class GradientServicer:
    def __init__(self, core: Core, shm: SharedMemoryRegistry | None = None) -> None:
        self.core = core
        self.shm = shm  # same-host shared-memory regions (None: the fast path is off)

    def _check_size(self, request: Any) -> None:
        self.core.check_request(request.ByteSize())

    def _shm_for(self, call: Call) -> Any:
        return self.shm.bind(call.owner) if self.shm is not None else None

    # ------------------------------------------------------------------ lifecycle

    def CreateModel(self, request: pb.CreateModelRequest, call: Call) -> pb.ModelInfo:
        if not request.HasField("spec"):
            raise InvalidArgument("spec: required")
        self._check_size(request)
        model = self.core.models.create(m.spec_in(request.spec), request.model_id)
        return m.model_info(model.describe())

    def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        return m.model_info(self.core.models.get(request.model_id).describe())

    def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.model_info(x.describe())
                                             for x in self.core.models.list()])

    def DeleteModel(self, request: pb.DeleteModelRequest, call: Call) -> pb.DeleteModelResponse:
        self.core.delete_model(request.model_id)
        return pb.DeleteModelResponse()

    # ------------------------------------------------------------------ gradients

    def Forward(self, request: pb.ForwardRequest, call: Call) -> pb.ForwardResponse:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        out, forward_id = model.forward(
            m.tensors_in(request.inputs, "inputs", owned=request.retain_graph),
            request.retain_graph, request.eval_mode)
        return m.forward_out(out, forward_id, request, self._shm_for(call))

    def Backward(self, request: pb.BackwardRequest, call: Call) -> pb.BackwardResponse:
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
        return m.backward_out(result, request, self._shm_for(call))

    def Step(self, request: pb.StepRequest, call: Call) -> pb.StepResponse:
        model = self.core.models.get(request.model_id)
        return pb.StepResponse(step=model.step(request.keep_grad, request.request_id))

    def ZeroGrad(self, request: pb.ZeroGradRequest, call: Call) -> pb.ZeroGradResponse:
        self.core.models.get(request.model_id).zero_grad(request.request_id)
        return pb.ZeroGradResponse()

    def GetParameters(self, request: pb.GetParametersRequest, call: Call
                      ) -> pb.GetParametersResponse:
        model = self.core.models.get(request.model_id)
        values, grads, buffers = model.get_parameters(list(request.names), request.include_grads,
                                                      request.include_buffers)
        reply = pb.GetParametersResponse(parameters=m.named_out(values),
                                         grads=m.named_out(grads), buffers=m.named_out(buffers))
        if request.include_optimizer_state:
            m.optimizer_state_out(reply, *model.optimizer_state(list(request.names)))
        return reply

    def SetParameters(self, request: pb.SetParametersRequest, call: Call
                      ) -> pb.SetParametersResponse:
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        model.set_parameters(m.named_in(request.parameters, "parameters"), request.request_id)
        return pb.SetParametersResponse()

    # ------------------------------------------------------------------ shared memory

    def RegisterSharedMemory(self, request: pb.RegisterSharedMemoryRequest, call: Call
                             ) -> pb.RegisterSharedMemoryResponse:
        if self.shm is None:
            raise FailedPrecondition("shared memory: the same-host fast path is disabled on this "
                                     "server; use the wire")
        region = self.shm.register(call.owner, request.pid, request.fd, request.size,
                                   request.nonce)
        return pb.RegisterSharedMemoryResponse(region_id=region.id,
                                               idle_ttl_seconds=self.shm.idle_ttl_s)

    def UnregisterSharedMemory(self, request: pb.UnregisterSharedMemoryRequest, call: Call
                               ) -> pb.UnregisterSharedMemoryResponse:
        if self.shm is None:
            raise NotFound(f"region_id: no shared-memory region {request.region_id!r}")
        self.shm.unregister(request.region_id, call.owner)
        return pb.UnregisterSharedMemoryResponse()

    # ------------------------------------------------------------------ training

    def _data(self, msg: pb.DataSource, what: str) -> Any:
        source = msg.WhichOneof("source")
        if source == "inline":
            return m.inline_in(msg.inline, f"{what}.inline")
        if source == "dataset_id":
            return self.core.datasets.get(msg.dataset_id).data
        return None

    def Train(self, request: pb.TrainRequest, call: Call) -> Iterator[pb.TrainEvent]:
        """Validate now; the events come as the returned iterator is advanced."""
        self._check_size(request)
        model = self.core.models.get(request.model_id)
        data = self._data(request.data, "data")
        validation = self._data(request.validation, "validation")
        options = m.options_in(request.options)
        events = self.core.train(model, data, validation, options, call.is_cancelled,
                                 request.checkpoint_every_steps)
        return self._train_events(events)

    @staticmethod
    def _train_events(events: Iterator[Any]) -> Iterator[pb.TrainEvent]:
        try:
            for event in events:
                yield m.event_out(event)
                if event.summary is not None and event.summary.stop_reason == NON_FINITE:
                    # The DONE event carries the summary; the status tells every client it failed.
                    raise FailedPrecondition(f"training stopped: {event.summary.message}")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # release the model as soon as this call ends, however it ends

    def TrainStream(self, first: pb.TrainStreamRequest, call: Call) -> StreamSession:
        """The config message -> a session; TrainStreamBatch steps it once per batch."""
        if first.WhichOneof("message") != "config":
            raise InvalidArgument("the first TrainStream message must be a config")
        cfg = first.config
        model = self.core.models.get(cfg.model_id)
        return self.core.trainer.open_stream(
            model, cfg.clip_grad_norm, cfg.schedule.type or "none",
            m.struct_in(cfg.schedule.params, "config.schedule.params"), cfg.schedule.warmup_steps,
            cfg.schedule.warmup_start_factor, cfg.skip_nonfinite)

    def TrainStreamBatch(self, session: StreamSession, msg: pb.TrainStreamRequest, k: int
                         ) -> pb.TrainStreamResponse | None:
        """One batch message -> one step (None: the stream ends, e.g. on shutdown)."""
        if msg.WhichOneof("message") != "batch":
            raise InvalidArgument(f"message {k + 1}: expected a batch after the config")
        self._check_size(msg)
        result = session.step(m.inline_in(msg.batch, f"batch[{k}]"))
        return None if result is None else m.stream_result_out(result)

    # ------------------------------------------------------------------ datasets

    def UploadDataset(self, first: pb.UploadDatasetRequest, call: Call) -> Upload:
        """The header message -> an upload that UploadChunk fills and UploadDone finishes."""
        if first.WhichOneof("message") != "header":
            raise InvalidArgument("the first UploadDataset message must be a header")
        header = first.header
        inputs, target = m.layouts_in(header)
        return self.core.datasets.begin(header.dataset_id, inputs, target)

    @staticmethod
    def UploadChunk(upload: Upload, chunk: Any) -> None:
        upload.write(chunk)

    def UploadDone(self, upload: Upload) -> pb.DatasetInfo:
        return self._dataset_info(upload.finish())

    @staticmethod
    def _dataset_info(dataset: Any) -> pb.DatasetInfo:
        layouts = [m.layout_out(x) for x in dataset.layouts]
        n_in = len(dataset.data.inputs)
        info = pb.DatasetInfo(dataset_id=dataset.id, num_samples=dataset.data.num_samples,
                              num_bytes=dataset.nbytes, inputs=layouts[:n_in])
        if dataset.has_target:
            info.target.CopyFrom(layouts[n_in])
        return info

    def ListDatasets(self, request: pb.ListDatasetsRequest, call: Call
                     ) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(datasets=[self._dataset_info(d)
                                                 for d in self.core.datasets.list()])

    def DeleteDataset(self, request: pb.DeleteDatasetRequest, call: Call
                      ) -> pb.DeleteDatasetResponse:
        self.core.datasets.delete(request.dataset_id)
        return pb.DeleteDatasetResponse()

    # ------------------------------------------------------------------ the server

    def GetServerInfo(self, request: pb.GetServerInfoRequest, call: Call
                      ) -> pb.GetServerInfoResponse:
        i = self.core.info
        return pb.GetServerInfoResponse(version=i.version, torch_version=i.torch_version,
                                        world_size=i.world_size, backend=i.backend,
                                        devices=i.devices, hosts=i.hosts)

    # ------------------------------------------------------------------ checkpoints

    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, call: Call
                       ) -> pb.CheckpointInfo:
        return m.checkpoint_info_out(self.core.save_checkpoint(request.model_id, request.name))

    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, call: Call) -> pb.ModelInfo:
        model = self.core.load_checkpoint(request.name, request.model_id)
        return m.model_info(model.describe())

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, call: Call
                        ) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            checkpoints=[m.checkpoint_info_out(c) for c in self.core.list_checkpoints()])

    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, call: Call
                         ) -> pb.DeleteCheckpointResponse:
        self.core.delete_checkpoint(request.name)
        return pb.DeleteCheckpointResponse()
