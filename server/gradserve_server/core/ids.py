"""Ids of models, datasets and checkpoints: safe as file names and metric labels."""

from __future__ import annotations

import re

from .errors import InvalidArgument

# Used with fullmatch: with match, '$' would also accept a trailing newline.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value: str, what: str) -> str:
    """1-128 chars of [A-Za-z0-9._-], starting with a letter or digit (no path traversal)."""
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{what}: {value!r} is not a valid id (1-128 characters of "
                              "A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return value
