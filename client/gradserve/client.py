"""The synchronous client."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from . import _channel, _ops, routing, shm
from ._ops import Op, TrainCall
from .errors import from_rpc_error
from .history import History
from .model import ClientCalls, RemoteModel, blocking, blocking_model
from .results import TrainEvent, TrainSummary, train_event

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0


class _RunState:
    """What TrainRun and AsyncTrainRun share: the events so far, the progress bar, telling our
    own cancellation apart from a failure, and the warning for a run nobody iterates."""

    _how = "iterate it (for event in model.train(...)) or call model.fit(...)"

    def __init__(self, call: Any, progress: bool, model_id: str = "") -> None:
        self._call = call
        self._progress = progress
        self._model_id = model_id
        self._cancelled = False
        self._handled = False  # iterated, or cancelled on purpose: dropping it then is fine
        self._pbar: Any = None
        self.events: list[TrainEvent] = []

    def _open(self) -> None:
        self._handled = True
        self._pbar = _bar() if self._progress else None

    def _warn_unused(self) -> None:
        """The run is being dropped: say so if nobody iterated it (a bare `m.train(...)`
        statement does not train to the end: the call is cancelled as its object goes away)."""
        if self._handled:
            return
        self._handled = True
        warnings.warn(
            f"the train run of model {self._model_id!r} was never iterated, so it was cancelled "
            f"(the model keeps any step the server completed meanwhile); {self._how} to train "
            "to the end",
            RuntimeWarning, stacklevel=3)

    def _record(self, msg: Any) -> TrainEvent:
        event = train_event(msg)
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
    def summary(self) -> TrainSummary | None:
        """The DONE event's summary (None until it arrived, e.g. after a cancel)."""
        return self.events[-1].summary if self.events else None


class TrainRun(_RunState):
    """Iterator of TrainEvent for one server-side run. Breaking out or cancel() stops the run.

    The run starts on the server when train() returns and goes on while it is iterated; a run
    dropped without being iterated is cancelled, with a RuntimeWarning (fit() iterates it to the
    end for you).
    """

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
        self._handled = True
        if self._call.is_active():
            self._cancelled = True
            self._call.cancel()

    def __del__(self) -> None:
        self._warn_unused()
        self.cancel()  # what grpc would do as the call goes away: now, not at its collection


def _bar() -> Any:
    from tqdm.auto import tqdm

    return tqdm(unit="step", desc="train", dynamic_ncols=True)


def _advance(bar: Any, event: TrainEvent) -> None:
    if event.total_steps and bar.total != event.total_steps:  # the server's count of the run
        bar.total = event.total_steps
    bar.update(max(0, event.run_step - bar.n))
    bar.set_postfix(loss=f"{event.epoch_loss:.4g}", refresh=event.kind == "done")


class Client(ClientCalls[RemoteModel]):
    """Connection to a gradserve server, or to several.

        with Client("127.0.0.1:50051") as client:
            m = client.create_model(layers=[...], loss="mse", optimizer={"type": "sgd", "lr": 0.1})

    address: one server ("host:port", or any gRPC target); or several: a list of "host:port",
    or "dns:///host:port" for every address of a name (a Kubernetes headless Service). With
    several, each call for a model goes to the server that owns its id (gradserve.routing),
    the List calls merge every server's answer, and datasets are uploaded to every server
    (docs/sdk.md, "Several servers"). token: bearer token; tls / root_certificates / client_cert / client_key: TLS and mutual TLS
    (PEM bytes or file paths). timeout: the default deadline of a call in seconds, over all its
    attempts and the waits between them (Train runs have none unless given). retries: further
    attempts after UNAVAILABLE (or a CANCELLED it did not cause) for calls safe to repeat (the methods service_config.json names;
    0: one attempt); DEADLINE_EXCEEDED is never retried. shared_memory: send large
    Forward/Backward tensors through shared memory when the server is on this host
    (gradserve.shm); None (default) tries it for loopback addresses and falls back to the wire
    by itself, False never tries.
    The calls are written once (gradserve.model) for this client and the AsyncClient.
    """

    _model_type = RemoteModel

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051", *,
                 token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None,
                 client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = _channel.DEFAULT_RETRIES,
                 max_message_mb: int = 512, shared_memory: bool | None = None) -> None:
        self.retries = _channel.check_retries(retries)
        creds = _channel.credentials(tls, root_certificates, client_cert, client_key)
        opts = _channel.options(max_message_mb)
        found = routing.endpoints(address)
        self._metadata = _channel.metadata(token)
        self._servers = {e.identity: self._connect(e.target, creds, opts, shared_memory)
                         for e in found}
        self._router = routing.Router(self._servers) if len(found) > 1 else None
        self.servers: tuple[str, ...] = tuple(self._servers)
        self.address = address if isinstance(address, str) else ",".join(self.servers)
        # The first server: with one, every call uses these (as a client always did).
        first = self._servers[found[0].identity]
        self._channel, self._stub, self._health_stub = first.channel, first.stub, first.health
        self._shm: shm.SharedMemory | None = first.shm
        self.timeout = timeout

    def _connect(self, target: str, creds: grpc.ChannelCredentials | None,
                 opts: list[tuple[str, Any]], shared_memory: bool | None
                 ) -> _channel.Connection:
        channel = (grpc.secure_channel(target, creds, opts) if creds
                   else grpc.insecure_channel(target, opts))
        stub: Any = _channel.stub(channel)
        # Same-host fast path (gradserve.shm): tried by default on loopback addresses.
        fast: shm.SharedMemory | None = None
        if shared_memory or (shared_memory is None and shm.same_host(target)
                             and shm.available()):
            fast = shm.SharedMemory(stub.RegisterSharedMemory, stub.UnregisterSharedMemory,
                                    self._metadata)
            stub = shm.Stub(stub, fast)
        return _channel.Connection(channel, stub, health_pb2_grpc.HealthStub(channel), fast)

    # ------------------------------------------------------------------ the calls

    create_model = blocking_model(_ops.create_model)
    model = blocking(ClientCalls[RemoteModel]._model)
    list_models = blocking(ClientCalls[RemoteModel]._list_models)
    delete_model = blocking(ClientCalls[RemoteModel]._delete_model)
    upload_dataset = blocking(ClientCalls[RemoteModel]._upload_dataset)
    list_datasets = blocking(ClientCalls[RemoteModel]._list_datasets)
    delete_dataset = blocking(ClientCalls[RemoteModel]._delete_dataset)
    save_checkpoint = blocking(ClientCalls[RemoteModel]._save_checkpoint)
    load_checkpoint = blocking(ClientCalls[RemoteModel]._load_checkpoint)
    list_checkpoints = blocking(ClientCalls[RemoteModel]._list_checkpoints)
    delete_checkpoint = blocking(ClientCalls[RemoteModel]._delete_checkpoint)
    health = blocking(ClientCalls[RemoteModel]._health)
    server_info = blocking(ClientCalls[RemoteModel]._server_info)

    def health_by_server(self, service: str = "", timeout: float | None = None
                         ) -> dict[str, str]:
        """Each server's health: 'SERVING', 'NOT_SERVING', ..., or the error code (such as
        'UNAVAILABLE') of a server that did not answer."""
        return self._drive(self._health_by_server(service, timeout))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel connects and health says SERVING (TimeoutError if not)."""
        self._drive(self._wait_ready(timeout))

    # ------------------------------------------------------------------ plumbing

    def _run(self, op: Op[T]) -> T:
        """Send op (with retries, within its deadline) and return the decoded reply."""
        return self._drive(_ops.send(op, self.retries, _channel.deadline(op, self.timeout),
                                     self._router))

    def _attempt(self, attempt: _ops.Attempt) -> Any:
        """One RPC; grpc.RpcError if it fails."""
        return self._method(attempt)(attempt.request, timeout=attempt.timeout,
                                          metadata=self._metadata)

    def _drive(self, program: _ops.Program[T]) -> T:
        """Run a Program (see _ops) with blocking calls and sleeps."""
        steps = _ops.Steps(program)
        for item in steps:
            if not isinstance(item, _ops.Attempt):
                time.sleep(item)
                continue
            try:
                steps.send(self._attempt(item))
            except grpc.RpcError as exc:
                if self._closed:
                    raise self._closed_error() from None
                steps.throw(exc if item.server is None else _channel.ServerError(exc, item.server))
        return steps.result

    def _train(self, call: TrainCall) -> TrainRun:
        return TrainRun(*self._open_train(call))

    @staticmethod
    def _fit(run: TrainRun) -> History:
        history = History()
        for event in run:
            history.add(event)
        return history

    def _bidi(self, rpc: str, key: str, requests: Iterator[Any], decode: Any) -> Iterator[Any]:
        call = getattr(self._stub_for(key), rpc)(requests, metadata=self._metadata)
        try:
            for reply in call:
                yield decode(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._closed = True
        for server in self._servers.values():
            if server.shm is not None:
                server.shm.close()
            server.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "TrainRun"]
