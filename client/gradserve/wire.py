"""Protobuf framing that keeps large tensor payloads out of the message: one copy per direction.

Through protobuf a Tensor's `data` is copied into the message, into the serialized bytes, out of
the parsed message and out of the field on each access. A Framed message carries such payloads
beside a small message instead:

- join() writes standard protobuf wire bytes from the small message and the payloads, copying each
  payload once (into the bytes gRPC sends) and starting it at an 8-byte aligned offset;
- split() parses received wire bytes into a small message plus zero-copy views of the payloads.

Only the message's own Tensor fields are framed (singular, repeated, and map<string, Tensor>):
the messages sent this way (Forward/Backward requests and replies) have no tensors deeper down.
The bytes on the wire are ordinary protobuf, so peers in other languages read and write them as
usual. split() agrees with protobuf's own parser on every input: bytes it does not walk (groups,
malformed fields, invalid UTF-8 map keys, map entries holding several values) are handed to
protobuf whole, which then parses or refuses them as it would anyway.

A Framed message reads like the message itself: tensor fields come back as FramedTensor (dtype,
shape and data, where data is the payload), which is all gradserve.codec looks at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from ._proto.gradserve.v1 import gradserve_pb2 as pb

# Payloads below this size stay in the message: walking the wire format costs more than the copies.
MIN_PAYLOAD = 64 * 1024
_PREFIX = 5  # bytes of a length prefix written before its length is known (lengths < 32 GiB)
_MAX_TAG = 0xFFFFFFFF  # protobuf refuses larger tags
# Top-level fields split() walks in Python before it hands a message to protobuf whole: a
# Forward of two million empty inputs took seconds to walk (protobuf parses it in 0.1 s).
MAX_SPLIT_FIELDS = 4096

Path = tuple[Any, ...]
Resolve = Callable[[Any], Any]


class WireError(ValueError):
    """Bytes the walker does not take (malformed, or outside what it handles)."""


def _tag(field: FieldDescriptor) -> int:
    wire_type = 0 if field.type == FieldDescriptor.TYPE_ENUM else 2
    return (field.number << 3) | wire_type


_TENSOR = pb.Tensor.DESCRIPTOR
_DATA_TAG = _tag(_TENSOR.fields_by_name["data"])
_DTYPE_TAG = _tag(_TENSOR.fields_by_name["dtype"])


# ------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class _Field:
    name: str
    map: bool  # map<string, Tensor>; otherwise a Tensor field
    repeated: bool
    key_tag: int = 0  # map entries: the tags of their key and value fields
    value_tag: int = 0


@dataclass(frozen=True)
class Plan:
    """The Tensor fields of one message type, by tag and by name."""

    by_tag: dict[int, _Field]
    by_name: dict[str, _Field]


_PLANS: dict[str, Plan | None] = {}


def plan_for(desc: Any) -> Plan | None:
    """The plan of a message type, or None when it has no Tensor field of its own."""
    if desc.full_name not in _PLANS:
        fields: dict[int, _Field] = {}
        for f in desc.fields:
            msg = f.message_type
            if msg is None or f.containing_oneof is not None:
                continue  # a oneof member clears its siblings: not worth framing
            if msg is _TENSOR:
                fields[_tag(f)] = _Field(f.name, False, bool(f.is_repeated))
            elif msg.GetOptions().map_entry:
                key, value = msg.fields_by_name["key"], msg.fields_by_name["value"]
                if value.message_type is _TENSOR and key.type == FieldDescriptor.TYPE_STRING:
                    fields[_tag(f)] = _Field(f.name, True, False, _tag(key), _tag(value))
        _PLANS[desc.full_name] = (
            Plan(fields, {f.name: f for f in fields.values()}) if fields else None)
    return _PLANS[desc.full_name]


_EMPTY = Plan({}, {})


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
    ("grads", "0.weight") for a map value.
    """

    __slots__ = ("_plan", "message", "payloads", "resolve")

    def __init__(self, message: Any, payloads: dict[Path, Any], plan: Plan | None = None,
                 resolve: Resolve | None = None) -> None:
        self.message = message
        self.payloads = payloads
        self._plan = plan or plan_for(message.DESCRIPTOR) or _EMPTY
        # Maps a SharedMemoryRef to a buffer (server side); tensors with shm set use it.
        self.resolve = resolve

    def _tensor(self, msg: pb.Tensor, path: Path) -> FramedTensor:
        payload = self.payloads.get(path)
        if payload is None and self.resolve is not None and msg.HasField("shm"):
            return FramedTensor(msg, self.resolve(msg.shm), True)
        return FramedTensor(msg, payload)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.message, name)
        field = self._plan.by_name.get(name)
        if field is None:
            return value
        if field.map:
            return {k: self._tensor(v, (name, k)) for k, v in value.items()}
        if field.repeated:
            return [self._tensor(v, (name, i)) for i, v in enumerate(value)]
        return self._tensor(value, (name,))

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


def tensors(message: Any) -> Iterator[tuple[Path, pb.Tensor]]:
    """Every Tensor field value of message (set ones), with its path."""
    plan = plan_for(message.DESCRIPTOR) or _EMPTY
    for name, field in plan.by_name.items():
        value = getattr(message, name)
        if field.map:
            yield from (((name, k), v) for k, v in value.items())
        elif field.repeated:
            yield from (((name, i), v) for i, v in enumerate(value))
        elif message.HasField(name):
            yield (name,), value


def get_tensor(message: Any, path: Path) -> pb.Tensor:
    """The Tensor message at path (as written by tensors())."""
    value = getattr(message, path[0])
    return value if len(path) == 1 else value[path[1]]


# ------------------------------------------------------------------------------------ walker


def _varint(buf: memoryview, pos: int, end: int, most: int = 10) -> tuple[int, int]:
    """(value, next position) of a varint of at most `most` bytes. Protobuf reads up to 10
    bytes for values, 5 for tags and lengths."""
    result = shift = 0
    while True:
        if pos >= end or shift >= 7 * most:
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


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field start, tag, content start, content end) of every field of buf[start:end].
    WireError on a malformed field and on groups (deprecated; protobuf parses those itself)."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end, 5)
        if tag > _MAX_TAG or tag < 8:
            raise WireError("field number 0 or tag too large")
        wire_type = tag & 7
        if wire_type == 0:
            content = pos
            _, pos = _varint(buf, pos, end)
        elif wire_type == 2:
            n, content = _varint(buf, pos, end, 5)
            pos = content + n
        elif wire_type == 1 or wire_type == 5:
            content = pos
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireError(f"wire type {wire_type} (groups are left to protobuf)")
        if pos > end:
            raise WireError("field runs past its message")
        yield field_start, tag, content, pos


@dataclass(frozen=True)
class _Found:
    """One Tensor field (or map entry) of a message's wire bytes."""

    start: int  # the field's first byte (its tag)
    stop: int  # one past its last byte
    tag: int
    field: _Field
    path: Path
    key: bytes  # map entries: the key's UTF-8 bytes
    tensor: tuple[int, int]  # the Tensor's bytes (a map entry: its value's)


def _walk(buf: memoryview, plan: Plan, most: int = 0) -> Iterator[_Found]:
    """The Tensor fields and map entries of buf in order: the one walker of split and join.
    With `most`, WireError once more than that many top-level fields were walked."""
    counts: dict[int, int] = {}
    for n, (start, tag, content, stop) in enumerate(_fields(buf, 0, len(buf))):
        if most and n >= most:
            raise WireError(f"more than {most} fields")
        field = plan.by_tag.get(tag)
        if field is None:
            continue
        key = b""
        if field.map:
            key, tensor = _entry(buf, content, stop, field)
            path: Path = (field.name, key.decode())  # _entry checked the UTF-8
        else:
            tensor = (content, stop)
            index = counts.get(tag, 0)
            counts[tag] = index + 1
            path = (field.name, index) if field.repeated else (field.name,)
        yield _Found(start, stop, tag, field, path, key, tensor)


def _entry(buf: memoryview, start: int, end: int, field: _Field
           ) -> tuple[bytes, tuple[int, int]]:
    """(key, value span) of a map entry: the last key wins, as in protobuf; no value is an
    empty one. Entries protobuf treats specially (several values merge; any other field makes
    the entry an unknown field) are left to protobuf."""
    key = b""
    value: tuple[int, int] | None = None
    for _, tag, content, stop in _fields(buf, start, end):
        if tag == field.key_tag:
            key = bytes(buf[content:stop])
            try:
                key.decode()
            except UnicodeDecodeError:
                raise WireError("map key is not valid UTF-8") from None
        elif tag == field.value_tag:
            if value is not None:
                raise WireError("map entry with several values")
            value = (content, stop)
        else:  # protobuf keeps such an entry as an unknown field of the message
            raise WireError("map entry with a field other than its key and value")
    return key, value or (end, end)


def _last_data(buf: memoryview, start: int, end: int) -> tuple[int, int, int] | None:
    """(field start, content start, end) of a Tensor's last data field (the one that counts)."""
    last = None
    for field_start, tag, content, stop in _fields(buf, start, end):
        if tag == _DATA_TAG:
            last = (field_start, content, stop)
    return last


def _key_field(found: _Found) -> bytes:
    return (_encode_varint(found.field.key_tag) + _encode_varint(len(found.key)) + found.key)


# ------------------------------------------------------------------------------------ split


def split(data: bytes, cls: Any, minimum: int = MIN_PAYLOAD) -> Any:
    """Parse wire bytes of cls; payloads of at least `minimum` bytes become views of data.
    Refuses exactly what cls.FromString refuses (with its DecodeError)."""
    plan = plan_for(cls.DESCRIPTOR)
    if plan is None or len(data) < minimum:
        return cls.FromString(data)
    try:
        pieces, payloads = _split(memoryview(data), plan, minimum)
    except WireError:
        return cls.FromString(data)  # protobuf's own verdict on what the walker leaves
    if not payloads:
        return cls.FromString(data)
    return Framed(cls.FromString(b"".join(pieces)), payloads, plan)


def _split(buf: memoryview, plan: Plan, minimum: int) -> tuple[list[Any], dict[Path, Any]]:
    pieces: list[Any] = []
    payloads: dict[Path, Any] = {}
    copied = 0  # buf[copied:] is still to be copied
    for found in _walk(buf, plan, MAX_SPLIT_FIELDS):
        if found.field.map:
            payloads.pop(found.path, None)  # a later entry replaces an earlier one
        data = _last_data(buf, *found.tensor)
        if data is None:
            continue  # no data here; a singular field keeps an earlier one (protobuf merges)
        data_start, content, data_stop = data
        if data_stop - content < minimum:
            payloads.pop(found.path, None)  # this (small) data wins; it stays in the message
            continue
        payloads[found.path] = buf[content:data_stop]
        t_start, t_stop = found.tensor
        body: list[Any] = [buf[t_start:data_start], buf[data_stop:t_stop]]
        size = t_stop - t_start - (data_stop - data_start)
        if found.field.map:  # rewritten as key then value (protobuf reads either order)
            value_head = _encode_varint(found.field.value_tag) + _encode_varint(size)
            body = [_key_field(found), value_head, *body]
            size += len(body[0]) + len(value_head)
        pieces += [buf[copied:found.start], _encode_varint(found.tag), _encode_varint(size), *body]
        copied = found.stop
    pieces.append(buf[copied:])
    return pieces, payloads


# ------------------------------------------------------------------------------------ join


def join(message: Any, payloads: Mapping[Path, Any]) -> bytes:
    """Wire bytes of message with each payload as the data of the Tensor at its path."""
    small = message.SerializeToString()
    plan = plan_for(message.DESCRIPTOR)
    if not payloads or plan is None:
        return small
    buf = memoryview(small)
    pieces: list[Any] = []
    written = copied = 0
    for found in _walk(buf, plan):
        payload = payloads.get(found.path)
        if payload is None:
            continue
        head: list[Any] = [buf[copied:found.start], _encode_varint(found.tag), b""]
        if found.field.map:
            head += [_key_field(found), _encode_varint(found.field.value_tag), b""]
        t_start, t_stop = found.tensor
        meta = buf[t_start:t_stop]
        at = written + sum(len(h) for h in head) + _PREFIX * (2 if found.field.map else 1)
        body = _tensor_body(meta, _dtype(buf, t_start, t_stop), payload, at)
        size = sum(len(b) for b in body[:-1]) + memoryview(payload).nbytes
        if found.field.map:
            head[-1] = _encode_varint(size, _PREFIX)
            size += len(head[3]) + len(head[4]) + _PREFIX
        head[2] = _encode_varint(size, _PREFIX)
        pieces += [*head, *body]
        written += len(head[0]) + len(head[1]) + _PREFIX + size
        copied = found.stop
    pieces.append(buf[copied:])
    return b"".join(pieces)


def _dtype(buf: memoryview, start: int, end: int) -> int:
    dtype = 0
    for _, tag, content, stop in _fields(buf, start, end):
        if tag == _DTYPE_TAG:
            dtype = _varint(buf, content, stop)[0]
    return dtype


def _tensor_body(meta: memoryview, dtype: int, payload: Any, at: int) -> list[Any]:
    """The Tensor's own fields, then its data field with the payload 8-byte aligned in the
    output (`at` is where meta starts there)."""
    length = _encode_varint(memoryview(payload).nbytes)
    data_tag = _encode_varint(_DATA_TAG)
    # Pad by repeating the dtype field (the last value wins and it is the same) so that the
    # payload starts on an 8-byte boundary: views of it are then aligned for every dtype.
    gap = -(at + len(meta) + len(data_tag) + len(length)) % 8
    pad = b""
    if gap:
        width = gap + 8 if gap == 1 else gap  # a padded dtype field takes 2 to 11 bytes
        pad = _encode_varint(_DTYPE_TAG) + _encode_varint(dtype, width - 1)
    return [meta, pad, data_tag, length, payload]
