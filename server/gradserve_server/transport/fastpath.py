"""Forward and Backward requests parsed by gradserve.wire: large tensors skip protobuf's copies.

Request payloads are zero-copy views of the received bytes (or of a shared-memory region the
caller registered, see shm.py), reply payloads are copied once into the bytes sent. Every other
method parses with the generated classes (transport/call.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradserve import wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb

from .call import split
from .messages import check_tensor_counts
from .shm import Owner, SharedMemoryRegistry

FRAMED = {"Forward": pb.ForwardRequest, "Backward": pb.BackwardRequest}


def parser(cls: Any, registry: SharedMemoryRegistry | None
           ) -> Callable[[bytes, Owner], Any]:
    """(request bytes, caller) -> message, or a Framed message when payloads were split off or
    the request uses shared memory (its tensors then resolve in the caller's own regions)."""
    plan = wire.plan_for(cls.DESCRIPTOR)

    def parse(data: bytes, owner: Owner) -> Any:
        msg = split(cls, data)
        inner = msg.message if isinstance(msg, wire.Framed) else msg
        check_tensor_counts(inner)  # before a Framed view wraps every tensor it holds
        if registry is not None and inner.HasField("shm_reply"):
            if not isinstance(msg, wire.Framed):
                msg = wire.Framed(msg, {}, plan)
            msg.resolve = registry.bind(owner).resolve
        return msg

    return parse
