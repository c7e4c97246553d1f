"""The synchronous client."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import _channel, _ops
from ._ops import CheckpointInfo, DatasetInfo, Op, TrainEvent
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from ._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from .errors import GradServeError, from_rpc_error
from .history import History
from .model import RemoteModel

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0


class TrainRun:
    """Iterator of TrainEvent for one server-side run. Breaking out or cancel() stops the run."""

    def __init__(self, call: Any, total: int | None, progress: bool) -> None:
        self._call = call
        self._total = total
        self._progress = progress
        self._cancelled = False
        self.events: list[TrainEvent] = []

    def __iter__(self) -> Iterator[TrainEvent]:
        bar = _bar(self._total) if self._progress else None
        try:
            for msg in self._call:
                event = _ops.train_event(msg)
                self.events.append(event)
                if bar is not None:
                    _advance(bar, event)
                yield event
        except grpc.RpcError as exc:
            if not (self._cancelled and exc.code() == grpc.StatusCode.CANCELLED):
                raise from_rpc_error(exc) from None
        finally:
            if bar is not None:
                bar.close()
            self.cancel()

    def cancel(self) -> None:
        """Stop the server loop (it keeps the last completed step)."""
        if self._call.is_active():
            self._cancelled = True
            self._call.cancel()

    @property
    def summary(self) -> _ops.TrainSummary | None:
        return self.events[-1].summary if self.events else None


def _bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="train", dynamic_ncols=True)


def _advance(bar: Any, event: TrainEvent) -> None:
    bar.update(max(0, event.run_step - bar.n))
    bar.set_postfix(loss=f"{event.epoch_loss:.4g}", refresh=event.kind == "done")


class Client:
    """Connection to a gradserve server.

        with Client("127.0.0.1:50051") as client:
            m = client.create_model(layers=[...], loss="mse", optimizer={"type": "sgd", "lr": 0.1})

    token: bearer token; tls / root_certificates / client_cert / client_key: TLS and mutual TLS
    (PEM bytes or file paths); timeout: default deadline of every call in seconds (Train: none);
    retries: attempts after UNAVAILABLE / DEADLINE_EXCEEDED on calls that are safe to repeat.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | None = None,
                 client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = 3,
                 max_message_mb: int = 512) -> None:
        creds = _channel.credentials(tls, root_certificates, client_cert, client_key)
        opts = _channel.options(max_message_mb)
        self.address = address
        self._channel = (grpc.secure_channel(address, creds, opts) if creds
                         else grpc.insecure_channel(address, opts))
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _channel.metadata(token)
        self.timeout = timeout
        self.retries = retries

    # ------------------------------------------------------------------ plumbing

    def _run(self, op: Op[T], timeout: float | None = None) -> T:
        method = getattr(self._stub, op.rpc)
        delays = _channel.backoff(self.retries if op.retryable else 0)
        while True:
            try:
                reply = method(op.request, timeout=timeout or self.timeout,
                               metadata=self._metadata)
                return op.decode(reply)
            except grpc.RpcError as exc:
                delay = next(delays, None) if exc.code() in _channel.RETRY_CODES else None
                if delay is None:
                    raise from_rpc_error(exc) from None
                time.sleep(delay)

    def _train(self, op: Op[TrainEvent], total: int | None, progress: bool | None,
               timeout: float | None) -> TrainRun:
        if progress is None:
            progress = sys.stdout.isatty()
        if progress and not op.request.options.log_every_steps and total:
            op.request.options.log_every_steps = max(1, total // 100)  # ~100 bar updates
        call = self._stub.Train(op.request, timeout=timeout, metadata=self._metadata)
        return TrainRun(call, total, progress)

    @staticmethod
    def _fit(run: TrainRun) -> History:
        history = History()
        for event in run:
            history.add(event)
        return history

    def _bidi(self, rpc: str, requests: Iterator[Any], decode: Any) -> Iterator[Any]:
        call = getattr(self._stub, rpc)(requests, metadata=self._metadata)
        try:
            for reply in call:
                yield decode(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ models

    def create_model(self, *, model_id: str = "", **spec: Any) -> RemoteModel:
        """Create a model from layers=, expression= or plugin= (see README "Model specs")."""
        info = self._run(_ops.create_model(model_id=model_id, **spec))
        return RemoteModel(self, info)

    def model(self, model_id: str) -> RemoteModel:
        """A handle to an existing model (NotFoundError if there is none)."""
        info = self._run(Op("GetModel", pb.GetModelRequest(model_id=model_id), _ops.model_info))
        return RemoteModel(self, info)

    def list_models(self) -> list[RemoteModel]:
        return self._run(Op("ListModels", pb.ListModelsRequest(),
                            lambda r: [RemoteModel(self, _ops.model_info(x)) for x in r.models]))

    def delete_model(self, model_id: str) -> None:
        self._run(Op("DeleteModel", pb.DeleteModelRequest(model_id=model_id), lambda r: None))

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, inputs: Any, target: Any = None, *, dataset_id: str = "",
                       chunk_bytes: int = 4 * 1024 * 1024, timeout: float | None = None
                       ) -> DatasetInfo:
        """Stream a dataset to the server once; train on it with dataset=info.dataset_id."""
        requests = _ops.upload_requests(inputs, target, dataset_id, chunk_bytes)
        try:
            reply = self._stub.UploadDataset(requests, timeout=timeout,
                                             metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _ops.dataset_info(reply)

    def list_datasets(self) -> list[DatasetInfo]:
        return self._run(Op("ListDatasets", pb.ListDatasetsRequest(),
                            lambda r: [_ops.dataset_info(d) for d in r.datasets]))

    def delete_dataset(self, dataset_id: str) -> None:
        self._run(Op("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id),
                     lambda r: None))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, model_id: str, name: str = "") -> CheckpointInfo:
        return self._run(Op("SaveCheckpoint", pb.SaveCheckpointRequest(model_id=model_id,
                                                                       name=name),
                            _ops.checkpoint_info))

    def load_checkpoint(self, name: str, model_id: str = "") -> RemoteModel:
        info = self._run(Op("LoadCheckpoint", pb.LoadCheckpointRequest(name=name,
                                                                       model_id=model_id),
                            _ops.model_info))
        return RemoteModel(self, info)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        return self._run(Op("ListCheckpoints", pb.ListCheckpointsRequest(),
                            lambda r: [_ops.checkpoint_info(c) for c in r.checkpoints]))

    # ------------------------------------------------------------------ health

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... from the standard gRPC health service."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                       timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects and health says SERVING."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic()))) \
                        == "SERVING":
                    return
            except GradServeError:
                pass  # not up yet: keep polling until the deadline
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING within {timeout} s")
            time.sleep(0.1)


__all__ = ["Client", "TrainRun"]
