"""Check JSON-like keyword arguments against a callable's signature and coerce JSON numbers.

Three checks, the same for every catalog (layers, losses, optimizers, schedules, plugins):
- names: unknown, forbidden and missing arguments;
- types, from the callable's own annotations: `true` is no integer, 2.5 no size, a list of one
  number no pair of Adam betas (an argument without annotation is not type-checked);
- ranges, from a table per catalog (Bound by argument name): sizes >= 1, paddings >= 0, a
  Huber delta > 0. Every number must also fit torch's conversions (int64, finite float32).
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..core.errors import InvalidArgument

# Never settable from a spec: placement and dtype belong to the server; in-place ops would write
# into request buffers; underscored names are private.
FORBIDDEN = frozenset({"device", "dtype", "inplace", "out", "params", "self"})
# Larger numbers describe no hyper-parameter; torch overflows converting them (int64, float32).
MAX_INT = 2**63 - 1
MAX_FLOAT = 3.4028234663852886e38
# Items in one list argument (sizes, paddings, an mlp's hidden widths): hyper-parameters, not
# data. An mlp with 100,000 hidden widths built 200,000 modules before anything refused it.
MAX_LIST = 256


@dataclass(frozen=True)
class Bound:
    """Accepted numbers: lo <= v <= hi, above < v < below (None: open). Applies to every number
    of a list value; None and strings (padding='same') are left to the type check."""

    lo: float | None = None
    hi: float | None = None
    above: float | None = None
    below: float | None = None

    def accepts(self, v: float) -> bool:
        return ((self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)
                and (self.above is None or v > self.above)
                and (self.below is None or v < self.below))

    def __str__(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)': how a message states the range."""
        low = (("[", self.lo) if self.lo is not None else
               ("(", self.above) if self.above is not None else None)
        high = (("]", self.hi) if self.hi is not None else
                (")", self.below) if self.below is not None else None)
        if low and high:
            return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
        return "any number"


POSITIVE = Bound(lo=1)
NON_NEGATIVE = Bound(lo=0)


def _coerce(value: Any, default: Any) -> Any:
    """JSON has one number type: give ints where the callable expects ints, tuples for lists."""
    if isinstance(value, list):
        return tuple(_coerce(v, None) for v in value)
    if isinstance(value, float) and not isinstance(default, (float, bool)) and value.is_integer():
        return int(value) if abs(value) <= MAX_INT else value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def fits(value: Any, ann: Any) -> bool:
    """Whether a JSON value (lists as tuples) is of the annotated type; unknown forms pass."""
    if ann is inspect.Parameter.empty or ann is Any or isinstance(ann, (str, typing.TypeVar)):
        return True
    if ann is None or ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is torch.Size:
        return isinstance(value, tuple) and all(fits(v, int) for v in value)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if _is_union(origin):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return all(fits(v, args[0] if args else Any) for v in value)
    if isinstance(ann, type):
        return isinstance(value, ann)  # torch.Tensor and the like: never a JSON value
    return True


def describe(ann: Any) -> str:
    """The annotation in the words of an error message: 'an integer or a list of 2 integers'."""
    if ann is None or ann is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             torch.Size: "a list of integers"}
    if ann in names:
        return names[ann]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if _is_union(origin):
        parts = [describe(a) for a in args if a is not torch.Tensor]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (tuple, list, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = list(dict.fromkeys(describe(a) for a in args))
            each = items[0] if len(items) == 1 else " / ".join(items)
            return f"a list of {len(args)} items, each {each}"
        return f"a list, each {describe(args[0]) if args else 'anything'}"
    return getattr(ann, "__name__", str(ann))


def _numbers(value: Any) -> Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _numbers(v)


def _shown(value: Any) -> Any:
    """A coerced value as JSON shows it (lists, not tuples), for messages."""
    return [_shown(v) for v in value] if isinstance(value, tuple) else value


def _check_value(key: str, value: Any, ann: Any, bound: Bound | None, what: str) -> None:
    if isinstance(value, tuple) and len(value) > MAX_LIST:
        raise InvalidArgument(f"{what}.{key}: a list of {len(value)} items; at most {MAX_LIST}")
    sent = _shown(value)
    if not fits(value, ann):
        if isinstance(value, float) and value.is_integer() and abs(value) > MAX_INT:
            # an integer JSON carried as a double, too large for int64
            raise InvalidArgument(f"{what}.{key}: {sent!r} is out of range (beyond int64)")
        raise InvalidArgument(f"{what}.{key}: expected {describe(ann)}, got {sent!r}")
    each = "each number " if isinstance(value, tuple) else ""
    for v in _numbers(value):
        if isinstance(v, int) and abs(v) > MAX_INT or isinstance(v, float) and (
                not math.isfinite(v) or abs(v) > MAX_FLOAT):
            raise InvalidArgument(f"{what}.{key}: {sent!r} is out of range (beyond int64 or "
                                  "float32)")
        if bound is not None and not bound.accepts(v):
            raise InvalidArgument(f"{what}.{key}: {sent!r} is out of range; {each}must be "
                                  f"{bound}")


@lru_cache(maxsize=512)
def _signature(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """fn's parameters with annotations resolved (string annotations of plugins included)."""
    try:
        return inspect.signature(fn, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: names only
        return inspect.signature(fn).parameters


def suggest(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'mse'?)' for a near miss of one of choices: another case or underscores
    ('MSE', 'Adam', 'linear', 'CrossEntropyLoss'), a prefix either way ('in' for 'in_features',
    'mse_loss' for 'mse') or a typo; '' when nothing is close."""
    if not isinstance(name, str) or not name:
        return ""

    def norm(text: str) -> str:
        return text.lower().replace("_", "")

    options = sorted(choices, key=lambda c: (-len(c), c))  # the longest prefix wins
    key = norm(name)
    close = ([c for c in options if norm(c) == key]
             or [c for c in options if key.startswith(norm(c)) or norm(c).startswith(key)]
             or difflib.get_close_matches(name, options, n=1, cutoff=0.6))
    return f" (did you mean {close[0]!r}?)" if close and close[0] != name else ""


def check_kwargs(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    what: str,
    *,
    skip: Iterable[str] = (),
    allowed: Iterable[str] | None = None,
    bounds: Mapping[str, Bound] | None = None,
) -> dict[str, Any]:
    """Return kwargs coerced for fn; InvalidArgument naming `what` and the argument for unknown,
    forbidden, missing, mistyped (fn's annotations) or out-of-range (`bounds`) arguments."""
    params = _signature(fn)
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
                f"{what}: unknown or forbidden argument {key!r}{suggest(key, names)}; allowed: "
                f"{sorted(names)}"
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
    for key, value in out.items():
        _check_value(key, value, params[key].annotation, (bounds or {}).get(key), what)
    return out
