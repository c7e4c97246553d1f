"""Check JSON-like keyword arguments against a callable's signature and coerce JSON numbers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core.errors import InvalidArgument

# Never settable from a spec: placement and dtype belong to the server; in-place ops would write
# into request buffers; underscored names are private.
FORBIDDEN = frozenset({"device", "dtype", "inplace", "out", "params", "self"})


def _coerce(value: Any, default: Any) -> Any:
    """JSON has one number type: give ints where the callable expects ints, tuples for lists."""
    if isinstance(value, list):
        return tuple(_coerce(v, None) for v in value)
    if isinstance(value, float) and not isinstance(default, (float, bool)) and value.is_integer():
        return int(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_kwargs(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    what: str,
    *,
    skip: Iterable[str] = (),
    allowed: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Return kwargs coerced for fn; InvalidArgument naming `what` for unknown or forbidden keys."""
    params = inspect.signature(fn).parameters
    names = {
        n
        for n, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in FORBIDDEN
        and not n.startswith("_")
        and n not in set(skip)
    }
    if allowed is not None:
        names &= set(allowed)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in names:
            raise InvalidArgument(
                f"{what}: unknown or forbidden argument {key!r}; allowed: {sorted(names)}"
            )
        default = params[key].default
        out[key] = _coerce(value, None if default is inspect.Parameter.empty else default)
    missing = [
        n
        for n, p in params.items()
        if n in names and p.default is inspect.Parameter.empty and n not in out
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if missing:
        raise InvalidArgument(f"{what}: missing required argument(s) {missing}")
    return out
