"""The synchronous client."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from . import _channel, _ops, shm
from ._ops import Op, TrainEvent
from .errors import GradServeError, from_rpc_error
from .history import History
from .model import ClientCalls

if TYPE_CHECKING:
    from ._ops import CheckpointInfo, DatasetInfo
    from .model import RemoteModel

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0


class _RunState:
    """What TrainRun and AsyncTrainRun share: the events so far, the progress bar, and telling
    our own cancellation apart from a failure."""

    def __init__(self, call: Any, total: int | None, progress: bool) -> None:
        self._call = call
        self._total = total
        self._progress = progress
        self._cancelled = False
        self._pbar: Any = None
        self.events: list[TrainEvent] = []

    def _open(self) -> None:
        self._pbar = _bar(self._total) if self._progress else None

    def _record(self, msg: Any) -> TrainEvent:
        event = _ops.train_event(msg)
        self.events.append(event)
        if self._pbar is not None:
            _advance(self._pbar, event)
        return event

    def _failed(self, exc: grpc.RpcError) -> None:
        """Raise the GradServeError for exc, unless it only reports our own cancel()."""
        if not (self._cancelled and exc.code() == grpc.StatusCode.CANCELLED):
            raise from_rpc_error(exc) from None

    def _close(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.cancel()

    def cancel(self) -> None:
        raise NotImplementedError

    @property
    def summary(self) -> _ops.TrainSummary | None:
        """The DONE event's summary (None until it arrived, e.g. after a cancel)."""
        return self.events[-1].summary if self.events else None


class TrainRun(_RunState):
    """Iterator of TrainEvent for one server-side run. Breaking out or cancel() stops the run."""

    def __iter__(self) -> Iterator[TrainEvent]:
        self._open()
        try:
            for msg in self._call:
                yield self._record(msg)
        except grpc.RpcError as exc:
            self._failed(exc)
        finally:
            self._close()

    def cancel(self) -> None:
        """Stop the server loop (it keeps the last completed step)."""
        if self._call.is_active():
            self._cancelled = True
            self._call.cancel()


def _bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="train", dynamic_ncols=True)


def _advance(bar: Any, event: TrainEvent) -> None:
    bar.update(max(0, event.run_step - bar.n))
    bar.set_postfix(loss=f"{event.epoch_loss:.4g}", refresh=event.kind == "done")


class Client(ClientCalls):
    """Connection to a gradserve server.

        with Client("127.0.0.1:50051") as client:
            m = client.create_model(layers=[...], loss="mse", optimizer={"type": "sgd", "lr": 0.1})

    token: bearer token; tls / root_certificates / client_cert / client_key: TLS and mutual TLS
    (PEM bytes or file paths); timeout: default deadline of every call in seconds (Train: none);
    retries: attempts after UNAVAILABLE / DEADLINE_EXCEEDED on calls that are safe to repeat.
    shared_memory: send large Forward/Backward tensors through shared memory when the server is
    on this host (gradserve.shm); None (default) tries it for loopback addresses and falls back
    to the wire by itself, False never tries.
    The calls themselves (create_model, list_models, health, ...) are written once, in
    ClientCalls, for this client and the AsyncClient.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | None = None,
                 client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = 3,
                 max_message_mb: int = 512, shared_memory: bool | None = None) -> None:
        creds = _channel.credentials(tls, root_certificates, client_cert, client_key)
        opts = _channel.options(max_message_mb)
        self.address = address
        self._channel = (grpc.secure_channel(address, creds, opts) if creds
                         else grpc.insecure_channel(address, opts))
        self._stub: Any = _channel.stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _channel.metadata(token)
        # Same-host fast path (gradserve.shm): tried by default on loopback addresses.
        self._shm: shm.SharedMemory | None = None
        if shared_memory or (shared_memory is None and shm.same_host(address)
                             and shm.available()):
            self._shm = shm.SharedMemory(self._stub.RegisterSharedMemory,
                                         self._stub.UnregisterSharedMemory, self._metadata)
            self._stub = shm.Stub(self._stub, self._shm)
        self.timeout = timeout
        self.retries = retries

    # ------------------------------------------------------------------ plumbing

    def _run(self, op: Op[T], timeout: float | None = None) -> T:
        method = getattr(self._stub if op.service == "gradient" else self._health, op.rpc)
        delays = _channel.backoff(self.retries if op.retryable else 0)
        while True:
            try:
                reply = method(op.request, timeout=_channel.deadline(op, timeout, self.timeout),
                               metadata=self._metadata)
                return op.decode(reply)
            except grpc.RpcError as exc:
                delay = _channel.retry_delay(exc, delays)
                if delay is None:
                    raise from_rpc_error(exc) from None
                time.sleep(delay)

    def _drive(self, program: _ops.Program[T]) -> T:
        """Run a Program (see _ops) with blocking calls and sleeps."""
        reply: Any = None
        error: GradServeError | None = None
        while True:
            try:
                item = program.throw(error) if error is not None else program.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            reply = error = None
            if isinstance(item, tuple):
                try:
                    reply = self._run(*item)
                except GradServeError as exc:
                    error = exc
            else:
                time.sleep(item)

    def _train(self, op: Op[TrainEvent], total: int | None, progress: bool | None,
               timeout: float | None) -> TrainRun:
        if progress is None:
            progress = sys.stdout.isatty()
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
        if self._shm is not None:
            self._shm.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    if TYPE_CHECKING:  # the sync results of the calls inherited from ClientCalls
        def create_model(self, *, model_id: str = "", **spec: Any) -> RemoteModel: ...
        def model(self, model_id: str) -> RemoteModel: ...
        def list_models(self) -> list[RemoteModel]: ...
        def delete_model(self, model_id: str) -> None: ...
        def upload_dataset(self, inputs: Any, target: Any = None, *, dataset_id: str = "",
                           chunk_bytes: int = ..., timeout: float | None = None
                           ) -> DatasetInfo: ...
        def list_datasets(self) -> list[DatasetInfo]: ...
        def delete_dataset(self, dataset_id: str) -> None: ...
        def save_checkpoint(self, model_id: str, name: str = "") -> CheckpointInfo: ...
        def load_checkpoint(self, name: str, model_id: str = "") -> RemoteModel: ...
        def list_checkpoints(self) -> list[CheckpointInfo]: ...
        def delete_checkpoint(self, name: str) -> None: ...
        def health(self, service: str = "", timeout: float | None = None) -> str: ...
        def wait_ready(self, timeout: float = 30.0) -> None: ...


__all__ = ["Client", "TrainRun"]
