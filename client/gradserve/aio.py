"""The asyncio client, on grpc.aio: the same calls as the sync Client, awaited.

    async with AsyncClient("127.0.0.1:50051") as client:
        m = await client.create_model(layers=[...], loss="mse")
        await m.backward(X, y)
        async for event in m.train(X, y, epochs=3):
            ...

Requests and replies are built and decoded by the same code as the sync client's
(gradserve.model, _ops); only sending differs: every call returns an awaitable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from . import _channel, _ops, routing
from ._ops import Op, TrainCall
from .client import DEFAULT_TIMEOUT, _RunState
from .errors import from_rpc_error
from .history import History
from .model import FIT_DOC, ClientCalls, ModelCalls, StreamCall, method_from
from .results import ForwardResult, ModelInfo, StreamStep, Tensor, TrainEvent

P = ParamSpec("P")
if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
Awaitable = Coroutine[Any, Any, T]


class AsyncTrainRun(_RunState):
    """Async iterator of TrainEvent for one server-side run.

    Breaking out of `async for`, leaving `async with run:`, or cancel() stops the run; the
    server keeps the last completed step (model.wait_idle() waits until it has let go). A run
    dropped without being iterated is cancelled, with a RuntimeWarning (await fit() instead to
    train to the end).
    """

    _how = "iterate it (async for event in model.train(...)) or await model.fit(...)"

    def __aiter__(self) -> AsyncIterator[TrainEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TrainEvent]:
        self._open()
        try:
            async for msg in self._call:
                yield self._record(msg)
        except grpc.RpcError as exc:
            self._failed(exc)
        except asyncio.CancelledError:
            # grpc.aio ends a read with CancelledError when the call is cancelled locally: after
            # our own cancel() that is the normal end. A cancelled task still propagates.
            if not self._cancelled or _task_cancelling():
                raise
        finally:
            self._close()

    def cancel(self) -> None:
        """Stop the server loop (it keeps the last completed step)."""
        self._handled = True
        if not self._call.done():
            self._cancelled = True
            self._call.cancel()

    def __del__(self) -> None:
        self._warn_unused()
        # Now: grpc.aio's own cancel-on-collection comes only after the request was sent (its
        # send task holds the call), so the dropped run would start on the server after all.
        try:
            self.cancel()
        except RuntimeError:  # the event loop is closed already: nothing can be sent anyway
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


# ------------------------------------------------------------------ async methods from builders
# The Op is built when the method is called (bad arguments raise there); awaiting sends it.


def awaiting(build: Callable[Concatenate[Any, P], Op[T]]
             ) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """A method that returns an awaitable of the builder's Op result."""
    return method_from(build, lambda self, op: self._run(op))


def awaiting_model(build: Callable[P, Op[ModelInfo]]
                   ) -> Callable[Concatenate[Any, P], Awaitable[AsyncRemoteModel]]:
    """A client method that returns an awaitable of the model build's Op describes."""
    return method_from(
        build, lambda self, op: self._run(self._placed(op).then(self._remote)), bound=False)


def async_train(build: Callable[Concatenate[Any, P], TrainCall]
                ) -> Callable[Concatenate[Any, P], AsyncTrainRun]:
    """A method that starts the builder's Train run: an async iterator of its events."""
    return method_from(build, lambda self, call: self._client._train(call))


def async_fit(build: Callable[Concatenate[Any, P], TrainCall]
              ) -> Callable[Concatenate[Any, P], Awaitable[History]]:
    """A method that runs the builder's Train run to its end, collected into a History."""
    method = method_from(build, lambda self, call: self._client._fit(self._client._train(call)))
    method.__doc__ = FIT_DOC
    return method


def async_stream(build: Callable[Concatenate[Any, P], StreamCall]
                 ) -> Callable[Concatenate[Any, P], AsyncIterator[StreamStep]]:
    """A method that streams the builder's requests and yields each decoded reply."""
    return method_from(
        build, lambda self, call: self._client._bidi("TrainStream", self.id, *call))


class AsyncRemoteModel(ModelCalls):
    """Handle to one model on the server (AsyncClient): the calls of RemoteModel, awaited;
    train() is an async iterator."""

    def _run(self, op: Op[T]) -> Awaitable[T]:
        return self._client._run(op)

    @overload
    def forward(self, *inputs: Any, retain_graph: Literal[False] = False,
                eval_mode: bool = False) -> Awaitable[Tensor]: ...
    @overload
    def forward(self, *inputs: Any, retain_graph: Literal[True],
                eval_mode: bool = False) -> Awaitable[ForwardResult]: ...
    @overload
    def forward(self, *inputs: Any, retain_graph: bool,
                eval_mode: bool = False) -> Awaitable[Tensor | ForwardResult]: ...

    def forward(self, *inputs: Any, retain_graph: bool = False,
                eval_mode: bool = False) -> Awaitable[Tensor | ForwardResult]:
        """Run the model. retain_graph=True returns ForwardResult(output, forward_id)."""
        return self._run(self._forward(inputs, retain_graph, eval_mode))

    def wait_idle(self, timeout: float = 30.0) -> Awaitable[ModelInfo]:
        """Wait until no Train/TrainStream run holds the model (after a cancel the server stops
        at the next step boundary); returns the refreshed ModelInfo."""
        return self._client._drive(self._wait_idle(timeout))

    refresh = awaiting(ModelCalls._refresh)
    backward = awaiting(ModelCalls._backward)
    step = awaiting(ModelCalls._step)
    zero_grad = awaiting(ModelCalls._zero_grad)
    parameters = awaiting(ModelCalls._parameters)
    grads = awaiting(ModelCalls._grads)
    optimizer_state = awaiting(ModelCalls._optimizer_state)
    set_parameters = awaiting(ModelCalls._set_parameters)
    train = async_train(ModelCalls._train)
    fit = async_fit(ModelCalls._train)
    train_stream = async_stream(ModelCalls._train_stream)
    save_checkpoint = awaiting(ModelCalls._save_checkpoint)
    delete = awaiting(ModelCalls._delete)


class AsyncClient(ClientCalls[AsyncRemoteModel]):
    """asyncio connection to a gradserve server, or to several; the same calls as Client,
    awaited.

        async with AsyncClient("127.0.0.1:50051") as client:
            m = await client.create_model(layers=[...], loss="mse")
            out = await m.forward(X)

    Options as for Client, several servers included. Create it inside a running event loop
    (grpc.aio binds to it).
    """

    _model_type = AsyncRemoteModel

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051", *,
                 token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None,
                 client_cert: bytes | str | None = None, client_key: bytes | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = _channel.DEFAULT_RETRIES,
                 max_message_mb: int = 512) -> None:
        self.retries = _channel.check_retries(retries)
        creds = _channel.credentials(tls, root_certificates, client_cert, client_key)
        opts = _channel.options(max_message_mb)
        found = routing.endpoints(address)
        self._metadata = _channel.metadata(token)
        self._servers = {e.identity: self._connect(e.target, creds, opts) for e in found}
        self._router = routing.Router(self._servers) if len(found) > 1 else None
        self.servers: tuple[str, ...] = tuple(self._servers)
        self.address = address if isinstance(address, str) else ",".join(self.servers)
        # The first server: with one, every call uses these (as a client always did).
        first = self._servers[found[0].identity]
        self._channel, self._stub, self._health_stub = first.channel, first.stub, first.health
        self.timeout = timeout

    @staticmethod
    def _connect(target: str, creds: grpc.ChannelCredentials | None,
                 opts: list[tuple[str, Any]]) -> _channel.Connection:
        channel = (grpc.aio.secure_channel(target, creds, opts) if creds
                   else grpc.aio.insecure_channel(target, opts))
        # Forward/Backward framed by gradserve.wire
        return _channel.Connection(channel, _channel.stub(channel),
                                   health_pb2_grpc.HealthStub(channel))

    # ------------------------------------------------------------------ the calls

    create_model = awaiting_model(_ops.create_model)
    model = awaiting(ClientCalls[AsyncRemoteModel]._model)
    list_models = awaiting(ClientCalls[AsyncRemoteModel]._list_models)
    delete_model = awaiting(ClientCalls[AsyncRemoteModel]._delete_model)
    upload_dataset = awaiting(ClientCalls[AsyncRemoteModel]._upload_dataset)
    list_datasets = awaiting(ClientCalls[AsyncRemoteModel]._list_datasets)
    delete_dataset = awaiting(ClientCalls[AsyncRemoteModel]._delete_dataset)
    save_checkpoint = awaiting(ClientCalls[AsyncRemoteModel]._save_checkpoint)
    load_checkpoint = awaiting(ClientCalls[AsyncRemoteModel]._load_checkpoint)
    list_checkpoints = awaiting(ClientCalls[AsyncRemoteModel]._list_checkpoints)
    delete_checkpoint = awaiting(ClientCalls[AsyncRemoteModel]._delete_checkpoint)
    health = awaiting(ClientCalls[AsyncRemoteModel]._health)
    server_info = awaiting(ClientCalls[AsyncRemoteModel]._server_info)

    async def health_by_server(self, service: str = "", timeout: float | None = None
                          ) -> dict[str, str]:
        """Each server's health: 'SERVING', 'NOT_SERVING', ..., or the error code (such as
        'UNAVAILABLE') of a server that did not answer."""
        return await self._drive(self._health_by_server(service, timeout))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel connects and health says SERVING (TimeoutError if not)."""
        await self._drive(self._wait_ready(timeout))

    # ------------------------------------------------------------------ plumbing

    async def _run(self, op: Op[T]) -> T:
        """Send op (with retries, within its deadline) and return the decoded reply."""
        return await self._drive(_ops.send(op, self.retries, _channel.deadline(op, self.timeout),
                                           self._router))

    async def _attempt(self, attempt: _ops.Attempt) -> Any:
        """One RPC; grpc.RpcError if it fails."""
        return await self._method(attempt)(attempt.request, timeout=attempt.timeout,
                                          metadata=self._metadata)

    async def _drive(self, program: _ops.Program[T]) -> T:
        """Run a Program (see _ops) with awaited calls and sleeps."""
        steps = _ops.Steps(program)
        for item in steps:
            if not isinstance(item, _ops.Attempt):
                await asyncio.sleep(item)
                continue
            try:
                steps.send(await self._attempt(item))
            except grpc.RpcError as exc:
                if self._closed:
                    raise self._closed_error() from None
                steps.throw(exc if item.server is None else _channel.ServerError(exc, item.server))
            except asyncio.CancelledError:
                # grpc.aio ends the calls of a closed channel with CancelledError: for a task
                # nobody cancelled, that is close()'s doing, and an error of the call.
                if self._closed and not _task_cancelling():
                    raise self._closed_error() from None
                raise
        return steps.result

    def _train(self, call: TrainCall) -> AsyncTrainRun:
        return AsyncTrainRun(*self._open_train(call))

    @staticmethod
    async def _fit(run: AsyncTrainRun) -> History:
        history = History()
        async for event in run:
            history.add(event)
        return history

    async def _bidi(self, rpc: str, key: str, requests: Any, decode: Any
                    ) -> AsyncIterator[Any]:
        call = getattr(self._stub_for(key), rpc)(requests, metadata=self._metadata)
        try:
            async for reply in call:
                yield decode(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        self._closed = True
        for server in self._servers.values():
            await server.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncRemoteModel", "AsyncTrainRun"]
