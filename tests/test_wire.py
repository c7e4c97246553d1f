"""gradserve.wire against protobuf's own parser: on every input both give the same message, or
both refuse it. Inputs are above the framing threshold (below it split() is protobuf itself):
real Forward/Backward messages, mutated, truncated, with unknown fields of every wire type
(groups included) at every level, invalid UTF-8 in string fields and map keys, repeated
singular fields and map entries. GRADSERVE_FUZZ=1 runs many more examples.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from gradserve import codec, wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

FUZZ = os.environ.get("GRADSERVE_FUZZ", "") == "1"
EXAMPLES = settings(max_examples=5000 if FUZZ else 300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FRAMED = [pb.ForwardRequest, pb.ForwardResponse, pb.BackwardRequest, pb.BackwardResponse]
BIG = wire.MIN_PAYLOAD
NOISE = np.random.default_rng(0).integers(0, 256, 3 * BIG, dtype=np.uint8).tobytes()
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ab\xe2\x82", b"\xf4\x90\x80\x80"]

# A message as a tree of fields, so that unknown fields can be put at any depth:
# raw bytes (a complete encoded field) or (field number, children) for a length-delimited
# message field, or ("group", number, children, end number) for a group.
Node = bytes | tuple[Any, ...]


# Protobuf varints, padded to `width` bytes when given (protobuf reads up to 10; 5 for tags and
# lengths): the framing's own encoder, which test_fast_paths checks against protobuf.
varint = wire._encode_varint


def encode(nodes: list[Node], pad: int = 0) -> bytes:
    """Wire bytes of a tree; pad > 0 writes length prefixes that many bytes wide."""
    out = bytearray()
    for node in nodes:
        if isinstance(node, bytes):
            out += node
        elif node[0] == "group":
            _, number, children, end = node
            out += varint(number << 3 | 3) + encode(children, pad)
            if end is not None:
                out += varint(end << 3 | 4)
        else:
            number, children = node
            body = encode(children, pad)
            out += varint(number << 3 | 2) + varint(len(body), pad) + body
    return bytes(out)


def tree(msg: Any) -> list[Node]:
    """The fields of a protobuf message as a tree (scalars as raw bytes)."""
    nodes: list[Node] = []
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            single = type(msg)()
            if fd.is_repeated:
                getattr(single, fd.name).extend(value)
            else:
                setattr(single, fd.name, value)
            nodes.append(single.SerializeToString())
        elif fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                nodes.append((fd.number, [string_field(1, key.encode()), (2, tree(item))]))
        elif fd.is_repeated:
            nodes += [(fd.number, tree(item)) for item in value]
        else:
            nodes.append((fd.number, tree(value)))
    return nodes


def string_field(number: int, raw: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(raw)) + raw


# --------------------------------------------------------------------------------- strategies


@st.composite
def tensors(draw: st.DrawFn, big: bool = False) -> pb.Tensor:
    n = draw(st.integers(BIG, BIG + 4096)) if big else draw(st.sampled_from([0, 4, 12, 4000]))
    start = draw(st.integers(0, BIG))
    t = pb.Tensor(dtype=draw(st.sampled_from([0, 1, 4, 9, 77])),
                  shape=draw(st.lists(st.integers(0, 1 << 40), max_size=3)),
                  data=NOISE[start:start + n])
    if draw(st.integers(0, 5)) == 0:
        t.shm.CopyFrom(pb.SharedMemoryRef(region_id="r", offset=8, length=n))
    return t


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """A message of a framed type with at least one tensor above the threshold."""
    cls = draw(st.sampled_from(FRAMED))
    ts = [draw(tensors(big=True))] + draw(st.lists(tensors(big=draw(st.booleans())),
                                                   max_size=3))
    text = st.text(max_size=12)
    if cls is pb.ForwardRequest:
        return pb.ForwardRequest(model_id=draw(text), inputs=ts, retain_graph=draw(st.booleans()))
    if cls is pb.ForwardResponse:
        return pb.ForwardResponse(output=ts[0], forward_id=draw(text))
    if cls is pb.BackwardRequest:
        msg = pb.BackwardRequest(model_id=draw(text), inputs=ts[1:], request_id=draw(text),
                                 step=draw(st.booleans()))
        msg.target.CopyFrom(ts[0])
        if draw(st.booleans()):
            msg.grad_output.CopyFrom(draw(tensors(big=draw(st.booleans()))))
        return msg
    keys = draw(st.lists(st.text(max_size=6), min_size=len(ts), max_size=len(ts), unique=True))
    msg = pb.BackwardResponse(step=draw(st.integers(0, 99)), grads=dict(zip(keys, ts)),
                              input_grads=draw(st.lists(tensors(big=draw(st.booleans())),
                                                        max_size=2)))
    if draw(st.booleans()):
        msg.loss = draw(st.floats(allow_nan=False))
    if draw(st.booleans()):
        msg.output.CopyFrom(ts[0])
    return msg


@st.composite
def unknown_fields(draw: st.DrawFn, depth: int = 0) -> Node:
    """One field of any wire type (valid or not), numbered like a known field or not."""
    number = draw(st.sampled_from([1, 2, 3, 4, 5, 15, 19, 99, (1 << 29) - 1]))
    kind = draw(st.sampled_from(["varint", "fixed64", "fixed32", "bytes", "group",
                                 "open group", "mismatched group", "end group", "type 6",
                                 "type 7", "field 0", "huge tag", "long varint"]))
    if kind == "varint":
        return varint(number << 3) + varint(draw(st.integers(0, 1 << 64 - 1)))
    if kind == "fixed64":
        return varint(number << 3 | 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return varint(number << 3 | 5) + draw(st.binary(min_size=4, max_size=4))
    if kind == "bytes":
        return string_field(number, draw(st.binary(max_size=16)))
    if kind in ("group", "open group", "mismatched group"):
        inner = [draw(unknown_fields(depth + 1))] if depth < 2 and draw(st.booleans()) else []
        end = {"group": number, "open group": None, "mismatched group": number + 1}[kind]
        return ("group", number, inner, end)
    if kind == "end group":
        return varint(number << 3 | 4)
    if kind == "field 0":
        return b"\x00\x01"
    if kind == "huge tag":
        return varint(1 << 32 | 2) + b"\x00"
    if kind == "long varint":
        return varint(number << 3) + b"\xff" * 10 + b"\x01"
    return varint(number << 3 | int(kind[-1])) + b"\x00"


def _containers(nodes: list[Node]) -> list[list[Node]]:
    """Every list of fields in the tree: the message, its tensors, map entries, refs."""
    found = [nodes]
    for node in nodes:
        if isinstance(node, tuple) and node[0] != "group":
            found += _containers(node[1])
    return found


@st.composite
def mutated_trees(draw: st.DrawFn, nodes: list[Node]) -> list[Node]:
    """Structural changes anywhere in the tree."""
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(_containers(nodes)))
        action = draw(st.sampled_from(["unknown", "bad utf-8", "duplicate", "remove",
                                       "big data", "small data"]))
        at = draw(st.integers(0, len(where)))
        if action == "unknown":
            where.insert(at, draw(unknown_fields()))
        elif action == "bad utf-8":  # string fields: model_id, forward_id, request_id, keys
            number = draw(st.sampled_from([1, 4, 10]))
            where.insert(at, string_field(number, draw(st.sampled_from(BAD_UTF8))))
        elif action == "duplicate" and where:
            where.insert(at, draw(st.sampled_from(where)))
        elif action == "remove" and where:
            del where[draw(st.integers(0, len(where) - 1))]
        elif action in ("big data", "small data"):
            n = BIG + 8 if action == "big data" else 3
            where.insert(at, string_field(3, NOISE[:n]))
    return nodes


class Case:
    """A message type and wire bytes, shown briefly when hypothesis reports a failure."""

    def __init__(self, cls: Any, data: bytes) -> None:
        self.cls, self.data = cls, data

    def __repr__(self) -> str:
        return f"Case({self.cls.__name__}, {len(self.data)} bytes: {self.data[:96]!r}...)"


@st.composite
def wire_bytes(draw: st.DrawFn) -> Case:
    msg = draw(messages())
    cls = type(msg)
    how = draw(st.sampled_from(["tree", "protobuf", "framed"]))
    if how == "protobuf":
        data = msg.SerializeToString()
    elif how == "framed":  # what join() writes: padded prefixes, aligned payloads
        split = wire.split(msg.SerializeToString(), cls)
        data = wire.join(split.message, split.payloads)
    else:
        nodes = draw(mutated_trees(tree(msg)))
        data = encode(nodes, pad=draw(st.sampled_from([0, 0, 3, 10])))
    return Case(cls, draw(mutated_bytes(data)))


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """Byte flips, insertions, deletions (mostly outside payloads) and truncations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 2))):
        # mostly near either end, where the message's own fields are (not the payloads)
        near = draw(st.integers(0, min(63, len(out))))
        at = draw(st.sampled_from([near, len(out) - near]) | st.integers(0, len(out)))
        at = max(0, min(at, len(out)))
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        if kind == "set" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del out[at:at + draw(st.integers(1, 4))]
    if draw(st.integers(0, 5)) == 0:
        out = out[:draw(st.integers(0, len(out)))]
    return bytes(out)


# --------------------------------------------------------------------------------- checks


def whole(parsed: Any) -> Any:
    """A split() result as one protobuf message (payloads copied back in)."""
    if not isinstance(parsed, wire.Framed):
        return parsed
    msg = type(parsed.message)()
    msg.CopyFrom(parsed.message)
    for path, payload in parsed.payloads.items():
        wire.get_tensor(msg, path).data = bytes(payload)
    return msg


def note(what: str) -> None:
    if currently_in_test_context():
        event(what)  # --hypothesis-show-statistics shows how often each case came up


def assert_agree(cls: Any, data: bytes) -> None:
    try:
        expected = cls.FromString(data)
    except DecodeError:
        expected = None
    try:
        parsed = wire.split(data, cls)
    except DecodeError:
        assert expected is None, "split refused what protobuf parses"
        note("both refuse")
        return
    assert expected is not None, "split parsed what protobuf refuses"
    note("framed" if isinstance(parsed, wire.Framed) else "parsed by protobuf")
    got = whole(parsed)
    assert got == expected
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True)
    if isinstance(parsed, wire.Framed):  # and joining it again gives the same message
        assert cls.FromString(wire.join(parsed.message, parsed.payloads)) == expected


@EXAMPLES
@given(case=wire_bytes())
@example(case=Case(pb.ForwardRequest, string_field(2, string_field(3, NOISE[:BIG]))
                   + encode([("group", 7, [b"\x08\x01"], 7)])))
@example(case=Case(pb.BackwardResponse, string_field(2, string_field(1, b"\xff") + string_field(
    2, string_field(3, NOISE[:BIG])))))
@example(case=Case(pb.ForwardResponse, b"\x0a" + varint(BIG + 2, 6) + string_field(3, NOISE[:BIG])))
@pytest.mark.hostile("bytes that are not protobuf", inputs=EXAMPLES.max_examples)
def test_split_agrees_with_protobuf(case: Case) -> None:
    assert_agree(case.cls, case.data)


def test_unknown_group_fields_are_parsed_as_protobuf_does() -> None:
    payload = string_field(3, NOISE[:BIG])
    for group in [("group", 7, [], 7), ("group", 7, [("group", 8, [b"\x08\x01"], 8)], 7)]:
        data = string_field(2, payload + encode([group])) + encode([group])
        framed = pb.ForwardRequest.FromString(data)  # protobuf keeps them as unknown fields
        assert whole(wire.split(data, pb.ForwardRequest)) == framed
    with pytest.raises(DecodeError):  # a group that does not end, as protobuf
        wire.split(string_field(2, payload) + encode([("group", 7, [], 8)]), pb.ForwardRequest)


def test_invalid_utf8_map_key_is_refused_as_protobuf_does() -> None:
    entry = string_field(1, b"\xc0\x80") + string_field(2, string_field(3, NOISE[:BIG]))
    data = string_field(2, entry)
    with pytest.raises(DecodeError):
        pb.BackwardResponse.FromString(data)
    with pytest.raises(DecodeError):
        wire.split(data, pb.BackwardResponse)


def test_map_entries_replace_and_singular_fields_merge() -> None:
    """A later map entry replaces an earlier one of the same key (payload included); a later
    occurrence of a singular Tensor field merges into it (an earlier payload stays)."""
    big = string_field(3, NOISE[:BIG])
    entry = string_field(1, b"k") + string_field(2, big)
    later = string_field(1, b"k") + string_field(2, b"\x08\x01")
    data = string_field(2, entry) + string_field(2, later)
    assert not whole(wire.split(data, pb.BackwardResponse)).grads["k"].data
    assert_agree(pb.BackwardResponse, data)
    data = string_field(3, big) + string_field(3, b"\x08\x01")
    assert whole(wire.split(data, pb.BackwardRequest)).target.data == NOISE[:BIG]
    assert_agree(pb.BackwardRequest, data)


def test_plans_come_from_the_descriptor() -> None:
    plan = wire.plan_for(pb.BackwardResponse.DESCRIPTOR)
    assert plan is not None
    assert {f.name: (f.map, f.repeated) for f in plan.by_name.values()} == {
        "grads": (True, False), "input_grads": (False, True), "output": (False, False),
        "outputs": (False, True)}
    assert wire.plan_for(pb.StepRequest.DESCRIPTOR) is None
    # A message whose tensors are nested deeper is not framed: split() is protobuf there.
    assert wire.plan_for(pb.TrainRequest.DESCRIPTOR) is None


def test_payloads_are_views_of_the_received_bytes() -> None:
    x = np.arange(BIG, dtype=np.float32)
    data = pb.ForwardRequest(model_id="m", inputs=[codec.encode(x)]).SerializeToString()
    framed = wire.split(data, pb.ForwardRequest)
    assert isinstance(framed, wire.Framed) and set(framed.payloads) == {("inputs", 0)}
    view = framed.payloads[("inputs", 0)]
    assert isinstance(view, memoryview) and view.obj is data
    assert np.array_equal(codec.to_numpy(framed.inputs[0]), x)
