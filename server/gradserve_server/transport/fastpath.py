"""Registers the servicer with Forward and Backward (de)serialized by gradserve._wire.

Their large tensors then skip protobuf's copies: request payloads are zero-copy views of the
received bytes (or of a shared-memory region, see shm.py), reply payloads are copied once into
the bytes sent. Every other method keeps the generated (de)serializers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from gradserve import wire as _wire
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc

from .shm import SharedMemoryRegistry

SERVICE = "gradserve.v1.GradientService"
FRAMED = {"Forward": pb.ForwardRequest, "Backward": pb.BackwardRequest}


class _Capture:
    """Stands in for the server to collect the generated method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.handlers = dict(handlers)


def parser(cls: Any, registry: SharedMemoryRegistry | None) -> Callable[[bytes], Any]:
    """Request bytes -> message, or a Framed message when payloads were split off or the
    request uses shared memory (its tensors then resolve through the registry)."""
    plan = _wire.plan_for(cls.DESCRIPTOR)

    def parse(data: bytes) -> Any:
        msg = _wire.split(data, cls)
        inner = msg.message if isinstance(msg, _wire.Framed) else msg
        if registry is not None and inner.HasField("shm_reply"):
            if not isinstance(msg, _wire.Framed):
                msg = _wire.Framed(msg, {}, plan)
            msg.resolve = registry.resolve
        return msg

    return parse


def _serialize(reply: Any) -> bytes:
    return reply.SerializeToString()  # a Framed reply joins its payloads here


def add_servicer(servicer: pb_grpc.GradientServiceServicer, server: Any,
                 registry: SharedMemoryRegistry | None) -> None:
    capture = _Capture()
    pb_grpc.add_GradientServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    for rpc, cls in FRAMED.items():
        handlers[rpc] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, rpc), request_deserializer=parser(cls, registry),
            response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
