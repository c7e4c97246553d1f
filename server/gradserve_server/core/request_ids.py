"""Exactly-once retries: the window of request ids one model remembers, bounded by count and bytes.

A mutating call (Backward, Step, ZeroGrad, SetParameters) may carry a request_id. The first call
with an id runs; a repeat of the same call (same method, same id, same payload) gets the first
reply without running again. The same id under the same method with a different payload is
refused: answering it with the first reply would hide a client bug. Ids are scoped per method.

Only what a retry needs is kept: the reply itself (a Backward's loss, step and the tensors it
was asked to return). When the replies' tensors exceed the byte bound, the oldest replies are
dropped first, but their ids stay (a few hundred bytes each) until the count bound evicts them:
a retry of such a call is refused with FAILED_PRECONDITION saying that it was applied, rather
than applied twice. The window is saved in checkpoints, so this holds across a restart.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

import torch

from .errors import FailedPrecondition, InvalidArgument

T = TypeVar("T")

ENTRY_BYTES = 256          # what an entry costs besides its reply's tensors (key, digest, slots)
# Longest request id: a UUID is 36 characters. ENTRY_BYTES and checkpoint headers assume short
# ids (1024 ids of 4 MiB each would be 4 GiB the memory budget never saw).
MAX_ID_LENGTH = 128
_FULL_HASH_BYTES = 256 * 1024  # tensors up to this size are hashed whole ...
_SAMPLE_BLOCKS = 64            # ... larger ones by this many evenly spaced blocks
_SAMPLE_BLOCK_BYTES = 4096


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is contiguous on the CPU."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if flat.dtype != torch.uint8:
        flat = flat.contiguous().view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def _feed(h: Any, part: Any) -> None:
    if isinstance(part, torch.Tensor):
        h.update(f"T{part.dtype}{tuple(part.shape)}".encode())
        data = _tensor_bytes(part)
        if len(data) <= _FULL_HASH_BYTES:
            h.update(data)
        else:  # cheap on the hot path: bounded work, however large the payload
            last = len(data) - _SAMPLE_BLOCK_BYTES
            stride = last // (_SAMPLE_BLOCKS - 1)
            for start in [*range(0, stride * (_SAMPLE_BLOCKS - 1), stride), last]:
                h.update(data[start:start + _SAMPLE_BLOCK_BYTES])  # first and last included
    elif isinstance(part, Mapping):
        h.update(f"M{len(part)}".encode())
        for key in sorted(part):
            _feed(h, str(key))
            _feed(h, part[key])
    elif isinstance(part, (list, tuple)):
        h.update(f"L{len(part)}".encode())
        for item in part:
            _feed(h, item)
    elif isinstance(part, bytes):
        h.update(b"B%d:" % len(part) + part)
    else:  # str, int, float, bool, None: repr is exact and typed enough ("1" vs 1 vs True)
        text = f"{type(part).__name__}:{part!r}"
        h.update(f"S{len(text)}:{text}".encode())


def check_request_id(request_id: str) -> None:
    """InvalidArgument unless the id has 1-128 characters and no control characters."""
    if len(request_id) <= MAX_ID_LENGTH and request_id.isprintable():
        return
    shown = request_id[:40] + ("..." if len(request_id) > 40 else "")
    raise InvalidArgument(
        f"request_id: {shown!r} ({len(request_id)} characters) is not a request id; give at "
        f"most {MAX_ID_LENGTH} printable characters (a UUID is 36), or none")


def fingerprint(*parts: Any) -> bytes:
    """A 16-byte digest of a request's payload, computed once per call that carries an id.

    Tensors up to 256 KiB are hashed whole; larger ones by 64 blocks of 4 KiB spread over
    their bytes (plus dtype and shape), so the cost stays bounded on large requests. A payload
    that differs only between sampled blocks is not told apart (documented).
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        _feed(h, part)
    return h.digest()


def reply_nbytes(reply: Any) -> int:
    """Bytes of the tensors a reply holds (dataclasses, lists and dicts are walked)."""
    if isinstance(reply, torch.Tensor):
        return reply.numel() * reply.element_size()
    if is_dataclass(reply) and not isinstance(reply, type):
        return sum(reply_nbytes(getattr(reply, f.name)) for f in fields(reply))
    if isinstance(reply, Mapping):
        return sum(reply_nbytes(v) for v in reply.values())
    if isinstance(reply, Sequence) and not isinstance(reply, (str, bytes)):
        return sum(reply_nbytes(v) for v in reply)
    return 0


@dataclass
class _Entry:
    fingerprint: bytes
    reply: Any
    reply_bytes: int   # tensor bytes of the reply while it is kept
    kept: bool         # False: the reply was dropped to stay within the byte bound


# An encoder turns (method, reply) into JSON-safe data and named tensors; a decoder reverses it.
Encoder = Callable[[str, Any], tuple[Any, dict[str, torch.Tensor]]]
Decoder = Callable[[str, Any, Mapping[str, torch.Tensor]], Any]


class RequestIdWindow:
    """(method, request_id) -> the first reply; at most max_entries ids and max_bytes in all.

    Not thread-safe by itself: the model's lock guards every call (as it guards the model).
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._kept: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # replies with tensors
        self._reply_bytes = 0

    @property
    def nbytes(self) -> int:
        """Memory the window holds: replies' tensors plus a fixed cost per remembered id."""
        return self._reply_bytes + ENTRY_BYTES * len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, method: str, request_id: str, payload: Callable[[], bytes],
            fn: Callable[[], T]) -> T:
        """fn() at most once per (method, request_id); a repeat gets the first reply.

        payload() computes the request's fingerprint; it is only called when there is an id.
        """
        if not request_id:
            return fn()
        check_request_id(request_id)
        if self.max_entries <= 0:
            return fn()
        digest = payload()
        key = (method, request_id)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != digest:
                raise FailedPrecondition(
                    f"request_id {request_id!r}: already used by an earlier {method} call with a "
                    "different payload; a retry must resend the same request, and each distinct "
                    "call needs a new id")
            if not entry.kept:
                raise FailedPrecondition(
                    f"request_id {request_id!r}: this {method} call was already applied and was "
                    "not applied again, but its reply is no longer kept (the window keeps "
                    f"{self.max_bytes} bytes of replies per model: --request-id-window-mb)")
            return entry.reply  # type: ignore[no-any-return]
        reply = fn()
        self._add(key, _Entry(digest, reply, reply_nbytes(reply), True))
        return reply

    def _add(self, key: tuple[str, str], entry: _Entry) -> None:
        self._entries[key] = entry
        if entry.reply_bytes:
            self._kept[key] = entry
            self._reply_bytes += entry.reply_bytes
        while len(self._entries) > self.max_entries:
            old_key, old = self._entries.popitem(last=False)
            if self._kept.pop(old_key, None) is not None:
                self._reply_bytes -= old.reply_bytes
        self.trim(self.max_bytes)

    def trim(self, max_bytes: int) -> None:
        """Drop kept replies, oldest first, until they hold at most max_bytes (ids stay known)."""
        while self._kept and self.nbytes > max_bytes:
            _, old = self._kept.popitem(last=False)
            self._reply_bytes -= old.reply_bytes
            old.reply, old.reply_bytes, old.kept = None, 0, False

    # ------------------------------------------------------------------ checkpoints

    def export(self, encode: Encoder) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """JSON-safe entries and their tensors (named requests.<i>.<part>), oldest first."""
        out: list[dict[str, Any]] = []
        tensors: dict[str, torch.Tensor] = {}
        for i, ((method, request_id), entry) in enumerate(self._entries.items()):
            item: dict[str, Any] = {"method": method, "id": request_id,
                                    "fingerprint": entry.fingerprint.hex(), "kept": entry.kept}
            if entry.kept:
                data, named = encode(method, entry.reply)
                item["reply"] = data
                tensors.update({f"requests.{i}.{k}": v for k, v in named.items()})
            out.append(item)
        return out, tensors

    def load(self, entries: Sequence[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor],
             decode: Decoder) -> None:
        """Replace the window with exported entries; raises ValueError/KeyError/TypeError if bad."""
        self._entries.clear()
        self._kept.clear()
        self._reply_bytes = 0
        for i, item in enumerate(entries):
            method, request_id = str(item["method"]), str(item["id"])
            if not request_id or len(request_id) > MAX_ID_LENGTH or not request_id.isprintable():
                raise ValueError(f"entry {i}: not a request id")
            digest = bytes.fromhex(item["fingerprint"])
            if item.get("kept"):
                prefix = f"requests.{i}."
                named = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                reply = decode(method, item.get("reply"), named)
                entry = _Entry(digest, reply, reply_nbytes(reply), True)
            else:
                entry = _Entry(digest, None, 0, False)
            self._add((method, request_id), entry)
