"""The core's error family. Transport maps each class to one gRPC status code (transport/errors.py)."""

from __future__ import annotations


class GradServeFault(Exception):
    """Base of every error the core raises on purpose; the message is shown to the caller."""


class NotFound(GradServeFault):
    """Unknown model, dataset, checkpoint or forward id."""


class AlreadyExists(GradServeFault):
    """The id is taken."""


class InvalidArgument(GradServeFault):
    """The request is malformed: bad spec, expression, shape, dtype or option."""


class ResourceExhausted(GradServeFault):
    """A configured limit would be exceeded."""


class FailedPrecondition(GradServeFault):
    """The request is valid but the model's state does not allow it now."""


class Aborted(GradServeFault):
    """The operation was stopped (server shutting down) and may be retried."""


class StartupError(Exception):
    """The server cannot start (bad flag, unusable file, port taken); the message says why."""
