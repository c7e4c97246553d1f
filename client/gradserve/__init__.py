"""gradserve SDK: train and differentiate PyTorch models that live on a gradserve server.

    from gradserve import Client
    with Client("127.0.0.1:50051") as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}],
                                loss="mse", optimizer={"type": "sgd", "lr": 0.03}, seed=0)
        events = list(m.train(X, y, epochs=3, batch_size=10, shuffle=True))

Results are torch tensors when torch is importable, numpy arrays otherwise. AsyncClient
(gradserve.aio) offers the same calls for asyncio; RemoteModule (gradserve.nn) puts a remote
model inside local autograd; the `gradserve` command (gradserve.cli) drives a server from a shell.
"""

from ._ops import (
    BackwardResult,
    CheckpointInfo,
    DatasetInfo,
    ForwardResult,
    ModelInfo,
    ParameterInfo,
    StreamStep,
    TrainEvent,
    TrainSummary,
)
from .aio import AsyncClient, AsyncTrainRun
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
    UnauthenticatedError,
    UnavailableError,
)
from .history import History
from .tuning import tune_malloc
from .model import RemoteModel

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError", "AsyncClient", "AsyncTrainRun", "BackwardResult", "CancelledError", "CheckpointInfo", "Client",
    "DatasetInfo", "DeadlineExceededError", "FailedPreconditionError", "ForwardResult",
    "GradServeError", "History", "InternalError", "InvalidArgumentError", "ModelInfo",
    "NotFoundError", "ParameterInfo", "PermissionDeniedError", "RemoteModel",
    "ResourceExhaustedError", "StreamStep", "TrainEvent", "TrainRun", "TrainSummary",
    "UnauthenticatedError", "UnavailableError", "tune_malloc",
]
