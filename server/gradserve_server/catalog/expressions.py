"""Safe math expressions: parsed with ast, checked against an allow-list, compiled to closures.

Nothing is ever passed to eval/exec. Binary operators apply Python's own operators to torch
tensors, so an expression computes exactly what the same text computes in local PyTorch.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InvalidArgument

MAX_LENGTH = 4096
MAX_DEPTH = 64
MAX_NODES = 2000
# Inputs and parameters together. An expression uses at most MAX_NODES names; each declared
# one is a tensor the module holds (300,000 scalar parameters were 460 MB and 17 s to build).
MAX_NAMES = 1024

Env = Mapping[str, Any]
Node = Callable[[Env], Any]

# name -> (torch function, allowed keywords)
FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], frozenset[str]]] = {
    "relu": (torch.relu, frozenset()),
    "sigmoid": (torch.sigmoid, frozenset()),
    "tanh": (torch.tanh, frozenset()),
    "exp": (torch.exp, frozenset()),
    "log": (torch.log, frozenset()),
    "log1p": (torch.log1p, frozenset()),
    "sin": (torch.sin, frozenset()),
    "cos": (torch.cos, frozenset()),
    "tan": (torch.tan, frozenset()),
    "abs": (torch.abs, frozenset()),
    "sqrt": (torch.sqrt, frozenset()),
    "square": (torch.square, frozenset()),
    "sum": (torch.sum, frozenset({"dim", "keepdim"})),
    "mean": (torch.mean, frozenset({"dim", "keepdim"})),
    "matmul": (torch.matmul, frozenset()),
    "softplus": (F.softplus, frozenset({"beta", "threshold"})),
    "clamp": (torch.clamp, frozenset({"min", "max"})),
    "maximum": (torch.maximum, frozenset()),
    "minimum": (torch.minimum, frozenset()),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.MatMult: operator.matmul,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_NUMBER = (int, float)
# Friendly names for refused syntax, so the error says what to change.
_REFUSED = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
    ast.ListComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions",
    ast.JoinedStr: "strings",
    ast.Starred: "star arguments",
}


def _fail(message: str) -> InvalidArgument:
    return InvalidArgument(f"spec.expression: {message}")


def _constant(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise _fail(f"only numeric literals are allowed, got {value!r}")
    if isinstance(value, int) and abs(value) >= 2**63:
        try:
            return float(value)
        except OverflowError:
            raise _fail("numeric literal too large") from None
    return value


def _scalar(op: Callable[..., Any], *args: float) -> float:
    """Arithmetic on two literals, in floats so that 9**9**9 cannot hang the server."""
    try:
        return float(op(*(float(a) for a in args)))
    except (OverflowError, ZeroDivisionError, ValueError, TypeError) as exc:
        raise _fail(f"constant arithmetic failed: {exc}") from None


@dataclass(frozen=True)
class Compiled:
    """A checked expression: call it with an environment of tensors."""

    text: str
    names: frozenset[str]
    fn: Node

    def __call__(self, env: Env) -> Any:
        return self.fn(env)


class _Compiler:
    def __init__(self, names: frozenset[str], dtype: torch.dtype) -> None:
        self.names = names
        self.dtype = dtype
        self.used: set[str] = set()
        self.nodes = 0

    def compile(self, node: ast.AST, depth: int) -> Node:
        self.nodes += 1
        if depth > MAX_DEPTH:
            raise _fail(f"nested deeper than {MAX_DEPTH} levels")
        if self.nodes > MAX_NODES:
            raise _fail(f"more than {MAX_NODES} syntax nodes")
        if isinstance(node, ast.Constant):
            value = _constant(node.value)
            return lambda env: value
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            binop = _BINOPS[type(node.op)]
            left, right = self.compile(node.left, depth + 1), self.compile(node.right, depth + 1)

            def apply(env: Env) -> Any:
                a, b = left(env), right(env)
                if isinstance(a, _NUMBER) and isinstance(b, _NUMBER):
                    return _scalar(binop, a, b)
                return binop(a, b)

            return apply
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            unop, operand = _UNARY[type(node.op)], self.compile(node.operand, depth + 1)
            return lambda env: unop(operand(env))
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        what = _REFUSED.get(type(node))
        if what is None and isinstance(node, (ast.BinOp, ast.UnaryOp)):
            what = f"operator {type(node.op).__name__}"
        raise _fail(f"{what or type(node).__name__} not allowed; use numbers, names, + - * / ** @ "
                    f"and calls of {sorted(FUNCTIONS)}")

    def _name(self, name: str) -> Node:
        if name in self.names:
            self.used.add(name)
            return lambda env: env[name]
        if name in CONSTANTS:
            value = CONSTANTS[name]
            return lambda env: value
        raise _fail(f"unknown name {name!r}; declare it as an input or a parameter")

    def _call(self, node: ast.Call, depth: int) -> Node:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:40]
            raise _fail(f"function {shown!r} not allowed; allowed: {sorted(FUNCTIONS)}")
        name = node.func.id
        fn, allowed = FUNCTIONS[name]
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise _fail("star arguments not allowed")
        args = [self.compile(a, depth + 1) for a in node.args]
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg not in allowed:
                raise _fail(f"{name}() takes keywords {sorted(allowed) or 'none'}, got {kw.arg!r}")
            kwargs[kw.arg] = self._keyword_value(kw.value, name)
        dtype = self.dtype

        def call(env: Env) -> Any:
            values = [
                torch.tensor(v, dtype=dtype) if isinstance(v, _NUMBER) else v
                for v in (a(env) for a in args)
            ]
            return fn(*values, **kwargs)

        return call

    def _keyword_value(self, node: ast.AST, fname: str) -> Any:
        try:
            value = ast.literal_eval(node)  # constants and tuples of constants only
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _fail(f"{fname}() keyword values must be literal numbers") from None
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, (_NUMBER, bool)) for v in items) or len(items) > 16:
            raise _fail(f"{fname}() keyword values must be literal numbers")
        return value


def compile_expression(
    text: str, names: Sequence[str], dtype: torch.dtype = torch.float32
) -> Compiled:
    """Parse and check `text` over the given input/parameter names."""
    if not isinstance(text, str) or not text.strip():
        raise _fail("empty expression")
    if len(text) > MAX_LENGTH:
        raise _fail(f"longer than {MAX_LENGTH} characters ({len(text)})")
    if len(names) > MAX_NAMES:
        raise _fail(f"{len(names)} inputs and parameters; at most {MAX_NAMES}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise _fail(f"syntax error at column {exc.offset}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise _fail("expression too deeply nested") from None
    compiler = _Compiler(frozenset(names), dtype)
    try:
        fn = compiler.compile(tree.body, 0)
    except RecursionError:
        raise _fail("expression too deeply nested") from None
    return Compiled(text=text, names=frozenset(compiler.used), fn=fn)


def check_name(name: str, what: str) -> None:
    """Input and parameter names: identifiers that are not functions, constants or module attrs."""
    if not name.isidentifier() or name.startswith("_") or len(name) > 64:
        raise InvalidArgument(f"{what}: {name!r} is not a valid name (an identifier, no leading _)")
    if (name in FUNCTIONS or name in CONSTANTS or name in _INSTANCE_ATTRS
            or hasattr(ExpressionModule, name)):
        raise InvalidArgument(f"{what}: {name!r} is reserved; choose another name")


# Attributes every ExpressionModule instance has (a parameter of that name cannot be registered):
# nn.Module's own (training, ...) and the expression's.
_INSTANCE_ATTRS = frozenset(vars(nn.Module())) | {"expr", "input_names"}


class ExpressionModule(nn.Module):
    """nn.Module computing a compiled expression; its parameters are named as declared."""

    def __init__(self, expr: Compiled, inputs: Sequence[str], params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.expr = expr
        self.input_names = tuple(inputs)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise InvalidArgument(
                f"inputs: expected {len(self.input_names)} ({', '.join(self.input_names) or 'none'})"
                f", got {len(inputs)}"
            )
        env: dict[str, Any] = dict(self.named_parameters())
        env.update(zip(self.input_names, inputs))
        out = self.expr(env)
        if not isinstance(out, torch.Tensor):
            ref = next(iter(self.parameters()), None)
            out = torch.tensor(out, dtype=ref.dtype if ref is not None else torch.float32)
        return out

    def extra_repr(self) -> str:
        return f"{self.expr.text!r}, inputs={list(self.input_names)}"
