"""gradserve SDK: train and differentiate PyTorch models that live on a gradserve server.

    from gradserve import Client
    with Client("127.0.0.1:50051") as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                                loss="mse", optimizer={"type": "sgd", "lr": 0.03}, seed=0)
        events = list(m.train(X, y, epochs=3, batch_size=10, shuffle=True))

Results are torch tensors when torch is importable, numpy arrays otherwise (torch is imported
when a result is first decoded, not by `import gradserve`). AsyncClient (gradserve.aio) offers the
same calls for asyncio; RemoteModule (gradserve.nn) puts a remote model inside local autograd;
gradserve.io reads and writes arrays and tensors in .npy/.npz/.csv/.safetensors files; the
`gradserve` command (gradserve.cli) drives a server from a shell.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncRemoteModel, AsyncTrainRun
    from .client import Client, TrainRun
    from .errors import (
        AlreadyExistsError,
        CancelledError,
        DeadlineExceededError,
        FailedPreconditionError,
        GradServeError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        TensorArgumentError,
        UnauthenticatedError,
        UnavailableError,
    )
    from .history import History
    from .model import RemoteModel
    from .results import (
        BackwardResult,
        CheckpointInfo,
        DatasetInfo,
        ForwardResult,
        ModelInfo,
        OptimizerState,
        ParameterInfo,
        ServerInfo,
        StreamStep,
        TrainEvent,
        TrainSummary,
    )
    from .tuning import tune_malloc

# Public name -> the submodule that defines it, imported on first use (PEP 562): importing a
# plain-data module such as gradserve.results or gradserve.codec (the server does) then loads
# neither grpc nor the clients.
_WHERE = {
    **dict.fromkeys(("AsyncClient", "AsyncRemoteModel", "AsyncTrainRun"), "aio"),
    **dict.fromkeys(("Client", "TrainRun"), "client"),
    **dict.fromkeys((
        "AlreadyExistsError", "CancelledError", "DeadlineExceededError",
        "FailedPreconditionError", "GradServeError", "InternalError", "InvalidArgumentError",
        "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError",
        "TensorArgumentError", "UnauthenticatedError", "UnavailableError"), "errors"),
    "History": "history",
    "RemoteModel": "model",
    **dict.fromkeys((
        "BackwardResult", "CheckpointInfo", "DatasetInfo", "ForwardResult", "ModelInfo",
        "OptimizerState", "ParameterInfo", "ServerInfo", "StreamStep", "TrainEvent",
        "TrainSummary"),
        "results"),
    "tune_malloc": "tuning",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError", "AsyncClient", "AsyncRemoteModel", "AsyncTrainRun", "BackwardResult",
    "CancelledError", "CheckpointInfo", "Client", "DatasetInfo", "DeadlineExceededError",
    "FailedPreconditionError", "ForwardResult", "GradServeError", "History", "InternalError",
    "InvalidArgumentError", "ModelInfo", "NotFoundError", "OptimizerState", "ParameterInfo",
    "PermissionDeniedError", "RemoteModel", "ResourceExhaustedError", "ServerInfo", "StreamStep",
    "TensorArgumentError", "TrainEvent", "TrainRun", "TrainSummary", "UnauthenticatedError",
    "UnavailableError", "tune_malloc",
]
