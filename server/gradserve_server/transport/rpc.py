"""GradientService on grpc.aio: read the request, run the body on its lane, write the reply.

Every method is registered request-streaming, with raw bytes in and out (no deserializer):
the handler reads the request message itself, through the StreamWatch (an idle peer is ended
after `--stream-idle-seconds`), parses it where the work runs (large messages never parse on
the event loop; bytes that are not protobuf answer INVALID_ARGUMENT) and returns serialized
bytes. On the wire nothing changes: a unary method still takes one message.

Waiting streams hold no thread: Train advances its loop on the train executor one event at a
time, TrainStream runs one step per batch, UploadDataset copies one chunk per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from gradserve import wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from ..core.errors import InvalidArgument
from ..core.service import Core
from . import fastpath
from .call import Call, parse
from .lanes import Lanes, ThreadedIterator
from .servicer import GradientServicer
from .shm import SharedMemoryRegistry
from .streams import EOF, StreamWatch, explain_eof

T = TypeVar("T")
SERVICE = "gradserve.v1.GradientService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["GradientService"]
# Which executor runs each unary method (lanes.py); "inline" may run on the loop when quick.
UNARY_LANES: dict[str, str] = {
    "CreateModel": "compute", "GetModel": "control", "ListModels": "control",
    "DeleteModel": "compute", "Forward": "inline", "Backward": "inline", "Step": "inline",
    "ZeroGrad": "inline", "GetParameters": "compute", "SetParameters": "compute",
    "RegisterSharedMemory": "control", "UnregisterSharedMemory": "control",
    "ListDatasets": "control", "DeleteDataset": "control", "SaveCheckpoint": "compute",
    "LoadCheckpoint": "compute", "ListCheckpoints": "control", "DeleteCheckpoint": "compute",
    "GetServerInfo": "control",
}
STREAMING = ("Train", "TrainStream", "UploadDataset")
INLINE_MAX_BYTES = 64 * 1024  # larger requests always parse and run on an executor


class GradientService:
    """Builds the method handlers of GradientService for a grpc.aio server."""

    def __init__(self, core: Core, shm: SharedMemoryRegistry | None, lanes: Lanes,
                 watch: StreamWatch) -> None:
        self.core = core
        self.servicer = GradientServicer(core, shm)
        self.shm = shm
        self.lanes = lanes
        self.watch = watch

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        names = {m.name for m in DESCRIPTOR.methods}
        missing = names - set(UNARY_LANES) - set(STREAMING)
        if missing:  # a method added to the proto needs a lane here
            raise RuntimeError(f"GradientService methods without a handler: {sorted(missing)}")
        handlers = {name: self._unary(name, lane) for name, lane in UNARY_LANES.items()}
        handlers["Train"] = grpc.stream_stream_rpc_method_handler(self._train)
        handlers["TrainStream"] = grpc.stream_stream_rpc_method_handler(self._train_stream)
        handlers["UploadDataset"] = grpc.stream_unary_rpc_method_handler(self._upload)
        return handlers

    def add_to(self, server: grpc.aio.Server) -> None:
        handlers = self.handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE,
                                                                              handlers),))

    async def _first(self, context: Any, name: str, what: str) -> bytes:
        raw = await self.watch.read(context, name)
        if raw is EOF:
            await explain_eof(context)
            raise InvalidArgument(f"{name}: the call ended before its {what}")
        return raw  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ unary methods

    def _parser(self, name: str) -> Callable[[bytes, Call], Any]:
        cls = getattr(pb, DESCRIPTOR.methods_by_name[name].input_type.name)
        if name in fastpath.FRAMED:
            split = fastpath.parser(cls, self.shm)
            return lambda raw, call: split(raw, call.owner)
        return lambda raw, _call: parse(cls, raw)

    def _unary(self, name: str, lane: str) -> grpc.RpcMethodHandler:
        method = getattr(self.servicer, name)
        parser = self._parser(name)
        lanes = self.lanes
        pool = lanes.control if lane == "control" else lanes.compute
        inline = lanes.inline if lane == "inline" else None
        read_first = self._first
        models = self.core.models

        def body(request: Any, call: Call) -> bytes:
            return method(request, call).SerializeToString()  # type: ignore[no-any-return]

        def parse_and_run(raw: bytes, call: Call) -> bytes:
            return body(parser(raw, call), call)

        async def behavior(_requests: Any, context: Any) -> bytes:
            call = Call.of(name, context)
            raw = await read_first(context, name, "request message")
            if inline is None or inline.budget_s <= 0 or len(raw) > INLINE_MAX_BYTES:
                return await lanes.run(pool, parse_and_run, raw, call)
            request = parser(raw, call)
            kind = _kind(name, request, len(raw))
            if inline.allows(kind) and _idle_model(models, request):
                return inline.timed(kind, body, request, call)
            return await lanes.run(pool, inline.timed, kind, body, request, call)

        return grpc.stream_unary_rpc_method_handler(behavior)

    # ------------------------------------------------------------------ streams

    async def _setup(self, fn: Callable[[], T], size: int) -> T:
        """A stream's first message -> its state: on the loop when small (a config, a header:
        no lock, no tensor work), so that thousands of streams opening at once queue on no
        executor that other calls need."""
        if size <= INLINE_MAX_BYTES:
            return fn()
        return await self.lanes.run(self.lanes.control, fn)

    async def _train(self, _requests: Any, context: Any) -> None:
        call = Call.of("Train", context)
        raw = await self._first(context, "Train", "request message")
        servicer = self.servicer
        events = await self.lanes.run(
            self.lanes.train, lambda: servicer.Train(parse(pb.TrainRequest, raw), call))
        stream = ThreadedIterator(events, self.lanes.train)
        try:
            while (event := await stream.next()) is not stream.END:
                await self.watch.write(context, "Train", event.SerializeToString())
        finally:
            call.cancelled.set()  # a loop still running stops at its next step
            stream.close()

    async def _train_stream(self, _requests: Any, context: Any) -> None:
        call = Call.of("TrainStream", context)
        raw = await self._first(context, "TrainStream", "config message")
        servicer, lanes, watch = self.servicer, self.lanes, self.watch
        session = await self._setup(
            lambda: servicer.TrainStream(parse(pb.TrainStreamRequest, raw), call), len(raw))
        inline = lanes.inline
        k = 0

        def step(msg: Any, k: int) -> bytes | None:
            reply = servicer.TrainStreamBatch(session, msg, k)
            return None if reply is None else reply.SerializeToString()

        def parse_and_step(raw: bytes, k: int) -> bytes | None:
            return step(parse(pb.TrainStreamRequest, raw), k)

        # The reply of step k is written while batch k+1 is read and stepped: a write waits
        # for gRPC to take the bytes, which need not hold up the next step.
        writing: asyncio.Task[None] | None = None
        try:
            while (raw := await watch.read(context, "TrainStream")) is not EOF:
                if inline.budget_s > 0 and len(raw) <= INLINE_MAX_BYTES:
                    msg = parse(pb.TrainStreamRequest, raw)
                    kind = _kind("TrainStream", msg, len(raw), session.model.id)
                    if inline.allows(kind) and not session.model.lock.locked():
                        reply = inline.timed(kind, step, msg, k)
                    else:
                        reply = await lanes.run(lanes.train, inline.timed, kind, step, msg, k)
                else:
                    reply = await lanes.run(lanes.train, parse_and_step, raw, k)
                if writing is not None:
                    await writing
                    writing = None
                if reply is None:
                    break  # shutdown or the model was deleted: the stream ends
                writing = asyncio.ensure_future(watch.write(context, "TrainStream", reply))
                k += 1
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
            call.cancelled.set()
            _submit(lanes.train, session.close)  # waits for a step in flight, off the loop

    async def _upload(self, _requests: Any, context: Any) -> bytes:
        call = Call.of("UploadDataset", context)
        raw = await self._first(context, "UploadDataset", "header message")
        servicer, lanes, watch = self.servicer, self.lanes, self.watch
        upload = await self._setup(
            lambda: servicer.UploadDataset(parse(pb.UploadDatasetRequest, raw), call), len(raw))
        try:
            while (raw := await watch.read(context, "UploadDataset")) is not EOF:
                await lanes.run(lanes.compute, servicer.UploadChunk, upload, _chunk(raw))
            raw = b""
            try:
                info = await lanes.run(lanes.control, servicer.UploadDone, upload)
            except InvalidArgument as exc:
                exc.__traceback__ = None  # its frames would keep the upload's buffer
                await explain_eof(context)  # short because the caller cancelled?
                raise
            return info.SerializeToString()  # type: ignore[no-any-return]
        finally:
            # However the stream ends (cancelled, idle, refused chunk), the buffer goes now.
            _submit(lanes.control, upload.abort)


def _submit(pool: Any, fn: Callable[[], Any]) -> None:
    try:
        pool.submit(fn)
    except RuntimeError:  # executors shut down: the server is stopping
        fn()


def _kind(name: str, request: Any, size: int, model_id: str | None = None) -> Any:
    """What makes two calls cost the same: method, model, request size, every tensor's shape."""
    msg = request.message if isinstance(request, wire.Framed) else request
    if getattr(msg, "forward_id", ""):
        return None  # a retained graph's cost is not in the request
    shapes = tuple((path, t.dtype, tuple(t.shape)) for path, t in wire.tensors(msg))
    return (name, model_id if model_id is not None else msg.model_id, size, shapes)


def _idle_model(models: Any, request: Any) -> bool:
    """No call holds the model now (the loop must never wait for a model's lock)."""
    model_id = getattr(request, "model_id", "")
    model = models.find(model_id) if model_id else None
    return model is None or not model.lock.locked()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _chunk(raw: bytes) -> Any:
    """UploadDatasetRequest.chunk, as a view of the received bytes when it is all there is."""
    if raw[:1] == b"\x12":  # field 2 (chunk), length-delimited
        length, pos = _varint(raw, 1)
        if length >= 0 and pos + length == len(raw):
            return memoryview(raw)[pos:]
    msg = parse(pb.UploadDatasetRequest, raw)
    if msg.WhichOneof("message") != "chunk":
        raise InvalidArgument("only chunks may follow the header")
    return msg.chunk
