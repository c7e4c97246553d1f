"""The bearer-token file (--auth-token-file): one token per line, with the scopes it grants.

    # a comment line
    admin-token                 # no scopes: every scope
    reader read
    trainer read,train          # comma-separated, no spaces

A comment starts with '#' at the start of a line or after whitespace; a '#' inside a token or
a scope list is part of it, so `s3cr#et read` is the token `s3cr#et`. Lines that could mean
two things are refused at start with file:line: a '#' glued to a scope list, a space inside a
scope list, empty scopes, unknown scopes, a token listed twice, characters that cannot travel
in an HTTP header.
"""

from __future__ import annotations

import re
from pathlib import Path

from .core.errors import StartupError

# Scopes a token can carry; a line without scopes grants all of them.
SCOPES_ALL = frozenset({"read", "train", "admin", "shm"})
# A comment: '#' at the start of the line or after whitespace, to the end of the line.
_COMMENT = re.compile(r"(?:^|\s)#.*\Z", re.DOTALL)
# Visible ASCII: a token travels in the 'authorization' header, where nothing else survives.
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def parse_line(line: str) -> tuple[str, frozenset[str]] | None:
    """(token, scopes) of one line, or None for a blank or comment line; ValueError if ambiguous."""
    text = _COMMENT.sub("", line).strip()
    if not text:
        return None
    parts = text.split()
    token = parts[0]
    if not _PRINTABLE.fullmatch(token):
        raise ValueError("the token must be printable ASCII without spaces (it travels in the "
                         "'authorization' header)")
    if len(parts) == 1:
        return token, SCOPES_ALL
    if len(parts) > 2:
        raise ValueError(f"expected 'token [scope,scope]', got {len(parts)} fields; scopes are "
                         "comma-separated without spaces, and a comment needs a space before #")
    field = parts[1]
    if "#" in field:
        raise ValueError(f"'#' inside the scopes {field!r}: put a space before a comment")
    scopes = field.split(",")
    if any(not s for s in scopes):
        raise ValueError(f"empty scope in {field!r}")
    unknown = sorted(set(scopes) - SCOPES_ALL)
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; expected some of {sorted(SCOPES_ALL)}")
    return token, frozenset(scopes)


def load_tokens(path: str) -> dict[str, frozenset[str]]:
    """Token -> scopes from the file; StartupError naming file:line on any ambiguous line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"--auth-token-file {path}: cannot read the token file: {exc}") from None
    tokens: dict[str, frozenset[str]] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_line(line)
        except ValueError as exc:
            raise StartupError(f"{path}:{number}: {exc}") from None
        if parsed is None:
            continue
        token, scopes = parsed
        if token in tokens:
            raise StartupError(f"{path}:{number}: this token is already listed on line "
                             f"{lines[token]}; list each token once")
        tokens[token], lines[token] = scopes, number
    if not tokens:
        raise StartupError(f"{path}: no tokens")
    return tokens
