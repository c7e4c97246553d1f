"""Protobuf framing that keeps large tensor payloads out of the message: one copy per direction.

Through protobuf a Tensor's `data` is copied into the message, into the serialized bytes, out of
the parsed message and out of the field on each access. A Framed message carries such payloads
beside a small message instead:

- join() writes standard protobuf wire bytes from the small message and the payloads, copying each
  payload once (into the bytes gRPC sends) and starting it at an 8-byte aligned offset;
- split() parses received wire bytes into a small message plus zero-copy views of the payloads.

The bytes on the wire are ordinary protobuf, so peers in other languages read and write them as
usual. A Framed message reads like the message itself: tensor fields come back as FramedTensor
(dtype, shape and data, where data is the payload), which is all gradserve.codec looks at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._proto.gradserve.v1 import gradserve_pb2 as pb

# Payloads below this size stay in the message: walking the wire format costs more than the copies.
MIN_PAYLOAD = 64 * 1024
_TENSOR = pb.Tensor.DESCRIPTOR
_DATA_TAG = (3 << 3) | 2  # Tensor.data, length-delimited
_DTYPE_TAG = (1 << 3) | 0  # Tensor.dtype, varint
_PREFIX = 5  # bytes of the length prefix of a message that holds payloads (lengths < 32 GiB)

Path = tuple[Any, ...]
Resolve = Callable[[Any], Any]


class WireError(ValueError):
    """Bytes that are not a valid protobuf message of the expected type."""


# ------------------------------------------------------------------------------------ plans


@dataclass
class _Field:
    name: str
    kind: str  # "tensor", "map" (map<string, Tensor>) or "message" (holds tensors deeper down)
    repeated: bool
    plan: _Plan | None = None


@dataclass
class _Plan:
    """The fields of one message type through which Tensors can be reached."""

    by_number: dict[int, _Field] = field(default_factory=dict)
    by_name: dict[str, _Field] = field(default_factory=dict)


_PLANS: dict[str, _Plan | None] = {}


def plan_for(desc: Any) -> _Plan | None:
    """The plan of a message type, or None when no Tensor can be reached from it."""
    name = desc.full_name
    if name in _PLANS:
        return _PLANS[name]
    _PLANS[name] = None  # breaks cycles (Struct <-> Value): a cycle holds no tensor
    plan = _Plan()
    for f in desc.fields:
        msg = f.message_type
        if msg is None:
            continue
        repeated = bool(f.is_repeated)
        if msg is _TENSOR:
            entry = _Field(f.name, "tensor", repeated)
        elif msg.GetOptions().map_entry:
            value = msg.fields_by_name["value"].message_type
            if value is not _TENSOR or msg.fields_by_name["key"].type != f.TYPE_STRING:
                continue
            entry = _Field(f.name, "map", False)
        else:
            sub = plan_for(msg)
            if sub is None:
                continue
            entry = _Field(f.name, "message", repeated, sub)
        plan.by_number[f.number] = entry
        plan.by_name[f.name] = entry
    result = plan if plan.by_number else None
    _PLANS[name] = result
    return result


# ------------------------------------------------------------------------------------ views


class FramedTensor:
    """A Tensor message whose data may lie elsewhere (a payload view or shared memory)."""

    __slots__ = ("message", "payload", "shared")

    def __init__(self, message: pb.Tensor, payload: Any = None, shared: bool = False) -> None:
        self.message = message
        self.payload = payload
        self.shared = shared  # payload is in shared memory that is reused after the call

    @property
    def data(self) -> Any:
        return self.message.data if self.payload is None else self.payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


class Framed:
    """A message plus payloads by path; reads like the message (see module doc).

    Paths: ("inputs", 0) for an element of a repeated field, ("target",) for a singular one,
    ("grads", "0.weight") for a map value, nested messages prefix their own path.
    """

    __slots__ = ("_path", "_plan", "message", "payloads", "resolve")

    def __init__(self, message: Any, payloads: dict[Path, Any], plan: _Plan | None = None,
                 path: Path = (), resolve: Resolve | None = None) -> None:
        self.message = message
        self.payloads = payloads
        self._plan = plan or plan_for(message.DESCRIPTOR) or _Plan()
        self._path = path
        # Maps a SharedMemoryRef to a buffer (server side); tensors with shm set use it.
        self.resolve = resolve

    def _tensor(self, msg: pb.Tensor, path: Path) -> FramedTensor:
        payload = self.payloads.get(path)
        if payload is None and self.resolve is not None and msg.HasField("shm"):
            return FramedTensor(msg, self.resolve(msg.shm), True)
        return FramedTensor(msg, payload)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.message, name)
        spec = self._plan.by_name.get(name)
        if spec is None:
            return value
        base = (*self._path, name)
        if spec.kind == "tensor":
            if spec.repeated:
                return [self._tensor(v, (*base, i)) for i, v in enumerate(value)]
            return self._tensor(value, base)
        if spec.kind == "map":
            return {k: self._tensor(v, (*base, k)) for k, v in value.items()}
        if spec.repeated:
            return [Framed(v, self.payloads, spec.plan, (*base, i), self.resolve)
                    for i, v in enumerate(value)]
        return Framed(value, self.payloads, spec.plan, base, self.resolve)

    def ByteSize(self) -> int:
        """Bytes of the whole message, payloads and shared-memory tensors included."""
        size = int(self.message.ByteSize()) + sum(len(p) for p in self.payloads.values())
        if self.resolve is not None:
            size += sum(int(t.shm.length) for _, t in tensors(self.message) if t.HasField("shm"))
        return size

    def SerializeToString(self) -> bytes:
        return join(self.message, self.payloads)


def framed(message: Any, payloads: dict[Path, Any]) -> Any:
    """The message itself when there is no payload, else a Framed message."""
    return Framed(message, payloads) if payloads else message


def tensors(message: Any, plan: _Plan | None = None, path: Path = ()
            ) -> Iterator[tuple[Path, pb.Tensor]]:
    """Every Tensor reachable from message, with its path."""
    plan = plan or plan_for(message.DESCRIPTOR)
    if plan is None:
        return
    for name, spec in plan.by_name.items():
        value = getattr(message, name)
        base = (*path, name)
        if spec.kind == "tensor":
            if spec.repeated:
                yield from (((*base, i), v) for i, v in enumerate(value))
            elif message.HasField(name):
                yield base, value
        elif spec.kind == "map":
            yield from (((*base, k), v) for k, v in value.items())
        elif spec.repeated:
            for i, v in enumerate(value):
                yield from tensors(v, spec.plan, (*base, i))
        elif message.HasField(name):
            yield from tensors(value, spec.plan, base)


def get_tensor(message: Any, path: Path) -> pb.Tensor:
    """The Tensor message at path (as written by tensors())."""
    plan = plan_for(message.DESCRIPTOR)
    node = message
    i = 0
    while i < len(path):
        assert plan is not None
        spec = plan.by_name[path[i]]
        node = getattr(node, path[i])
        i += 1
        if spec.kind == "map" or spec.repeated:
            node = node[path[i]]
            i += 1
        plan = spec.plan
    return node


# ------------------------------------------------------------------------------------ varints


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int, width: int = 0) -> bytes:
    """Minimal encoding, or exactly `width` bytes (protobuf parsers accept padded varints)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or len(out) + 1 < width:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _skip(buf: memoryview, pos: int, end: int, wire_type: int) -> tuple[int, int, int]:
    """-> (content start, content end, next position) of a field's value."""
    if wire_type == 0:
        _, nxt = _varint(buf, pos, end)
        return pos, nxt, nxt
    if wire_type == 2:
        n, start = _varint(buf, pos, end)
        stop = start + n
        if stop > end:
            raise WireError("length-delimited field runs past its message")
        return start, stop, stop
    if wire_type == 1:
        nxt = pos + 8
    elif wire_type == 5:
        nxt = pos + 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if nxt > end:
        raise WireError("fixed-size field runs past its message")
    return pos, nxt, nxt


# ------------------------------------------------------------------------------------ split


def split(data: bytes, cls: Any, minimum: int = MIN_PAYLOAD) -> Any:
    """Parse wire bytes of cls; payloads of at least `minimum` bytes become views of data."""
    plan = plan_for(cls.DESCRIPTOR)
    if plan is None or len(data) < minimum:
        return cls.FromString(data)
    view = memoryview(data)
    payloads: dict[Path, Any] = {}
    pieces = _split(view, 0, len(view), plan, (), payloads, minimum)
    if pieces is None:
        return cls.FromString(data)
    return Framed(cls.FromString(b"".join(pieces[0])), payloads, plan)


def _plan_fields(buf: memoryview, start: int, end: int, plan: _Plan
                 ) -> Iterator[tuple[int, int, _Field, int, int, int]]:
    """The length-delimited fields of buf[start:end] that the plan knows, in order:
    (field start, tag, spec, content start, content stop, index among repeats of the field)."""
    counts: dict[int, int] = {}
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        content, stop, pos = _skip(buf, pos, end, wire_type)
        spec = plan.by_number.get(number) if wire_type == 2 else None
        if spec is None:
            continue
        index = counts.get(number, 0)
        counts[number] = index + 1
        yield field_start, tag, spec, content, stop, index
    if pos != end:
        raise WireError("field runs past its message")


def _split(buf: memoryview, start: int, end: int, plan: _Plan, path: Path,
           out: dict[Path, Any], minimum: int) -> tuple[list[Any], int] | None:
    pieces: list[Any] = []
    copied = start  # buf[copied:field start] is still to be copied
    for field_start, tag, spec, content, stop, index in _plan_fields(buf, start, end, plan):
        base = (*path, spec.name, index) if spec.repeated else (*path, spec.name)
        if spec.kind == "tensor":
            sub = _split_tensor(buf, content, stop, base, out, minimum)
        elif spec.kind == "map":
            sub = _split_entry(buf, content, stop, (*path, spec.name), out, minimum)
        else:
            assert spec.plan is not None
            sub = _split(buf, content, stop, spec.plan, base, out, minimum)
        if sub is None:
            continue
        pieces += [buf[copied:field_start], _encode_varint(tag), _encode_varint(sub[1]), *sub[0]]
        copied = stop
    if not pieces:
        return None
    pieces.append(buf[copied:end])
    return pieces, sum(len(p) for p in pieces)


def _split_tensor(buf: memoryview, start: int, end: int, path: Path, out: dict[Path, Any],
                  minimum: int) -> tuple[list[Any], int] | None:
    pieces: list[Any] = []
    copied = pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        content, stop, pos = _skip(buf, pos, end, tag & 7)
        if tag != _DATA_TAG:
            continue
        if stop - content < minimum:
            out.pop(path, None)  # a later data field wins, as in protobuf
            continue
        out[path] = buf[content:stop]
        pieces.append(buf[copied:field_start])
        copied = stop
    if not pieces:
        return None
    pieces.append(buf[copied:end])
    return pieces, sum(len(p) for p in pieces)


def _split_entry(buf: memoryview, start: int, end: int, path: Path, out: dict[Path, Any],
                 minimum: int) -> tuple[list[Any], int] | None:
    key = ""
    value: tuple[int, int] | None = None
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        content, stop, pos = _skip(buf, pos, end, tag & 7)
        if tag == (1 << 3) | 2:
            key = bytes(buf[content:stop]).decode("utf-8", "replace")
        elif tag == (2 << 3) | 2:
            value = (content, stop)
    if value is None:
        return None
    sub = _split_tensor(buf, value[0], value[1], (*path, key), out, minimum)
    if sub is None:
        return None
    # Rewrite the entry as key then value (protobuf accepts either order).
    key_bytes = key.encode()
    pieces = [b"\x0a", _encode_varint(len(key_bytes)), key_bytes, b"\x12",
              _encode_varint(sub[1]), *sub[0]]
    return pieces, sum(len(p) for p in pieces)


# ------------------------------------------------------------------------------------ join


def join(message: Any, payloads: Mapping[Path, Any]) -> bytes:
    """Wire bytes of message with each payload as the data of the Tensor at its path."""
    small = message.SerializeToString()
    plan = plan_for(message.DESCRIPTOR)
    if not payloads or plan is None:
        return small
    pieces: list[Any] = []
    view = memoryview(small)
    _join(view, 0, len(view), plan, (), dict(payloads), 0, pieces)
    return b"".join(pieces)


def _holds(payloads: Mapping[Path, Any], path: Path) -> bool:
    n = len(path)
    return any(p[:n] == path for p in payloads)


def _join(buf: memoryview, start: int, end: int, plan: _Plan, path: Path,
          payloads: dict[Path, Any], offset: int, pieces: list[Any]) -> int:
    """Append the bytes of buf[start:end] with payloads spliced in; offset is where they start
    in the output. Returns the number of bytes appended."""
    written = 0
    copied = start
    for field_start, tag, spec, content, stop, index in _plan_fields(buf, start, end, plan):
        if spec.kind == "map":
            key, value = _entry_key(buf, content, stop)
            base: Path = (*path, spec.name, key)
        else:
            base = (*path, spec.name, index) if spec.repeated else (*path, spec.name)
        if not _holds(payloads, base):
            continue
        head = buf[copied:field_start]
        tag_bytes = _encode_varint(tag)
        pieces += [head, tag_bytes]
        prefix_at = len(pieces)
        pieces.append(b"")  # the length prefix, filled in below
        written += len(head) + len(tag_bytes) + _PREFIX
        inner = offset + written
        if spec.kind == "tensor":
            size = _join_tensor(buf, content, stop, payloads.pop(base), inner, pieces)
        elif spec.kind == "map":
            size = _join_entry(buf, key, value, payloads.pop(base), inner, pieces)
        else:
            assert spec.plan is not None
            size = _join(buf, content, stop, spec.plan, base, payloads, inner, pieces)
        pieces[prefix_at] = _encode_varint(size, _PREFIX)
        written += size
        copied = stop
    tail = buf[copied:end]
    pieces.append(tail)
    return written + len(tail)


def _entry_key(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, int]]:
    key = ""
    value = (start, start)
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        content, stop, pos = _skip(buf, pos, end, tag & 7)
        if tag == (1 << 3) | 2:
            key = bytes(buf[content:stop]).decode("utf-8", "replace")
        elif tag == (2 << 3) | 2:
            value = (content, stop)
    return key, value


def _join_entry(buf: memoryview, key: str, value: tuple[int, int], payload: Any, offset: int,
                pieces: list[Any]) -> int:
    key_bytes = key.encode()
    head = [b"\x0a", _encode_varint(len(key_bytes)), key_bytes, b"\x12"]
    pieces += head
    prefix_at = len(pieces)
    pieces.append(b"")
    written = sum(len(h) for h in head) + _PREFIX
    size = _join_tensor(buf, value[0], value[1], payload, offset + written, pieces)
    pieces[prefix_at] = _encode_varint(size, _PREFIX)
    return written + size


def _join_tensor(buf: memoryview, start: int, end: int, payload: Any, offset: int,
                 pieces: list[Any]) -> int:
    """The Tensor's own fields, then its data field with the payload 8-byte aligned."""
    dtype = 0
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        content, stop, pos = _skip(buf, pos, end, tag & 7)
        if tag == _DTYPE_TAG:
            dtype = _varint(buf, content, stop)[0]
    meta = buf[start:end]
    pieces.append(meta)
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    length = _encode_varint(size)
    at = offset + len(meta)
    # Pad by repeating the dtype field (the last value wins and it is the same) so that the
    # payload starts on an 8-byte boundary: views of it are then aligned for every dtype.
    gap = -(at + 1 + len(length)) % 8
    pad = b""
    if gap:
        width = gap + 8 if gap == 1 else gap  # a padded dtype field takes 2 to 11 bytes
        pad = bytes([_DTYPE_TAG]) + _encode_varint(dtype, width - 1)
    pieces += [pad, bytes([_DATA_TAG]), length, payload]
    return len(meta) + len(pad) + 1 + len(length) + size
