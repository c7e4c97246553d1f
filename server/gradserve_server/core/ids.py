"""Ids of models, datasets and checkpoints: safe as file names and metric labels."""

from __future__ import annotations

import re

from .errors import InvalidArgument

# Used with fullmatch: with match, '$' would also accept a trailing newline.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value: str, what: str) -> str:
    """1-128 chars of [A-Za-z0-9._-], starting with a letter or digit (no path traversal).

    A full match: re.match with "$" would let a trailing newline through.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidArgument(f"{what}: {value!r} is not a valid id (1-128 characters of "
                              "A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return value


def is_id(value: object) -> bool:
    """check_id without the error: for ids read back from files (checkpoints, datasets)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None
