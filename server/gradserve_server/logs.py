"""Logging set-up: text or one JSON object per line, with structured fields.

Code logs structured data as `log.info("message", extra={"fields": {...}})`; the JSON format
puts the fields at the top level of the object, the text format appends them as key=value.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: non-finite floats become null so every line stays valid."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        out.update((k, _finite(v)) for k, v in getattr(record, "fields", {}).items())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, allow_nan=False)


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)  # quoted and escaped, as logfmt does
    return text


class TextFormatter(logging.Formatter):
    """A human line: time level logger: message key=value ..."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return text


def configure(level: str, fmt: str) -> None:
    """Send every log record to stderr in the chosen format (text or json) at the given level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
