"""Safe math expressions: parsed with ast, checked against an allow-list, compiled to closures.

Nothing is ever passed to eval/exec. An expression computes exactly what the same text computes
as Python with FUNCTIONS' torch functions and CONSTANTS bound (docs/models.md, "Expressions"):
binary operators are Python's own, applied to tensors; arithmetic on constants is folded with
Python's semantics (int op int stays int); arguments after a function's tensors are passed as
the literals they are (sum(x, 1) is torch.sum(x, 1)). Text that would raise locally for every input (exp(1),
maximum(x, 0), an integer beyond int64) is refused at creation.
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

# How a function's arguments after its tensors may be given (positionally or by keyword).
DIM = "an integer or a list of integers"
BOOL = "true or false (True, False)"
NUMBER = "a number"


@dataclass(frozen=True)
class Function:
    """An allowed function: the torch callable, how many leading arguments are tensors, and
    its later arguments in torch's order with the kind of literal each takes."""

    fn: Callable[..., torch.Tensor]
    tensors: int = 1
    options: tuple[tuple[str, str], ...] = ()


_REDUCE = (("dim", DIM), ("keepdim", BOOL))
FUNCTIONS: dict[str, Function] = {
    "relu": Function(torch.relu),
    "sigmoid": Function(torch.sigmoid),
    "tanh": Function(torch.tanh),
    "exp": Function(torch.exp),
    "log": Function(torch.log),
    "log1p": Function(torch.log1p),
    "sin": Function(torch.sin),
    "cos": Function(torch.cos),
    "tan": Function(torch.tan),
    "abs": Function(torch.abs),
    "sqrt": Function(torch.sqrt),
    "square": Function(torch.square),
    "sum": Function(torch.sum, 1, _REDUCE),
    "mean": Function(torch.mean, 1, _REDUCE),
    "matmul": Function(torch.matmul, 2),
    "softplus": Function(F.softplus, 1, (("beta", NUMBER), ("threshold", NUMBER))),
    # Tensor bounds are refused: torch takes them positionally but not as keywords.
    "clamp": Function(torch.clamp, 1, (("min", NUMBER), ("max", NUMBER))),
    "maximum": Function(torch.maximum, 2),
    "minimum": Function(torch.minimum, 2),
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
INT64 = (-(2**63), 2**63 - 1)
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


@dataclass(frozen=True)
class Const:
    """A value known when the expression is compiled: a literal, pi, e, or arithmetic on them
    (folded with Python's own operators, as local code computes it)."""

    value: float  # an int stays an int


def _checked(value: Any) -> float:
    """A constant as torch will take it: an int within int64 (torch raises OverflowError on a
    larger one) or a float."""
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise _fail(f"constant arithmetic gives {value!r}, not a real number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise _fail(f"the integer {value} does not fit int64 (torch refuses it); write it as a "
                    "float, e.g. 1e20")
    return value


def _fold(op: Callable[[Any, Any], Any], a: float, b: float) -> float:
    """op(a, b) with Python's semantics (int op int stays int; / is true division), refusing
    what would fail locally or could not be computed quickly (9**9**9)."""
    if (op is operator.pow and isinstance(a, int) and isinstance(b, int) and b > 0
            and abs(a) > 1 and b * math.log2(abs(a)) > 64):  # beyond int64, whatever the sign
        raise _fail(f"the integer {a}**{b} does not fit int64 (torch refuses it); write it "
                    "as a float, e.g. 1e20")
    try:
        return _checked(op(a, b))
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
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.used: set[str] = set()
        self.nodes = 0

    def compile(self, node: ast.AST, depth: int) -> Node | Const:
        """A closure computing the node from the environment, or its value when constant."""
        self.nodes += 1
        if depth > MAX_DEPTH:
            raise _fail(f"nested deeper than {MAX_DEPTH} levels")
        if self.nodes > MAX_NODES:
            raise _fail(f"more than {MAX_NODES} syntax nodes")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, _NUMBER):
                raise _fail(f"only numeric literals are allowed, got {node.value!r}")
            return Const(_checked(node.value))
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            binop = _BINOPS[type(node.op)]
            left, right = self.compile(node.left, depth + 1), self.compile(node.right, depth + 1)
            if isinstance(left, Const) and isinstance(right, Const):
                return Const(_fold(binop, left.value, right.value))
            lf, rf = _closure(left), _closure(right)
            return lambda env: binop(lf(env), rf(env))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            unop, operand = _UNARY[type(node.op)], self.compile(node.operand, depth + 1)
            if isinstance(operand, Const):
                return Const(_checked(unop(operand.value)))
            return lambda env: unop(operand(env))
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        what = _REFUSED.get(type(node))
        if what is None and isinstance(node, (ast.BinOp, ast.UnaryOp)):
            what = f"operator {type(node.op).__name__}"
        raise _fail(f"{what or type(node).__name__} not allowed; use numbers, names, + - * / ** @ "
                    f"and calls of {sorted(FUNCTIONS)}")

    def _name(self, name: str) -> Node | Const:
        if name in self.names:
            self.used.add(name)
            return lambda env: env[name]
        if name in CONSTANTS:
            return Const(CONSTANTS[name])
        raise _fail(f"unknown name {name!r}; declare it as an input or a parameter")

    def _call(self, node: ast.Call, depth: int) -> Node:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:40]
            raise _fail(f"function {shown!r} not allowed; allowed: {sorted(FUNCTIONS)}")
        name = node.func.id
        spec = FUNCTIONS[name]
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise _fail("star arguments not allowed")
        options = dict(spec.options)
        usage = (f"{name}({', '.join(['tensor'] * spec.tensors + list(options))}): "
                 f"{spec.tensors} tensor argument(s)"
                 + "".join(f", then {k}: {kind}" for k, kind in spec.options))
        if len(node.args) < spec.tensors:
            raise _fail(f"{name}() takes {usage}")
        tensors = []
        for i, arg in enumerate(node.args[:spec.tensors]):
            value = self.compile(arg, depth + 1)
            if isinstance(value, Const):  # torch.exp(1), torch.maximum(x, 0) raise locally
                raise _fail(f"{name}() argument {i + 1} must be a tensor (an expression of "
                            f"inputs or parameters), not the number {value.value!r}; "
                            f"{name} takes {usage}")
            tensors.append(value)
        extra = node.args[spec.tensors:]
        if len(extra) > len(spec.options):
            raise _fail(f"{name}() takes {usage}; got {len(node.args)} positional arguments")
        given = list(zip([k for k, _ in spec.options], extra))
        for kw in node.keywords:
            if kw.arg is None or kw.arg not in options:
                raise _fail(f"{name}() takes keywords {sorted(options) or 'none'}, got {kw.arg!r}")
            if any(k == kw.arg for k, _ in given):
                raise _fail(f"{name}() got {kw.arg!r} twice")
            given.append((kw.arg, kw.value))
        kwargs = {k: self._option(v, options[k], name, k, depth) for k, v in given}
        fn = spec.fn

        def call(env: Env) -> Any:
            return fn(*(t(env) for t in tensors), **kwargs)

        return call

    def _option(self, node: ast.AST, kind: str, fname: str, key: str, depth: int) -> Any:
        """A literal option: the value torch gets, checked to be of the kind torch takes."""
        def bad() -> InvalidArgument:
            return _fail(f"{fname}() argument {key!r} must be {kind}")

        if kind == BOOL:
            if not (isinstance(node, ast.Constant) and isinstance(node.value, bool)):
                raise bad()
            return node.value
        if kind == DIM and isinstance(node, (ast.List, ast.Tuple)):
            if len(node.elts) > 64:
                raise bad()
            dims = [self._option(e, DIM, fname, key, depth + 1) for e in node.elts]
            if not all(isinstance(d, int) for d in dims):
                raise bad()
            return dims if isinstance(node, ast.List) else tuple(dims)
        value = self.compile(node, depth + 1)
        if not isinstance(value, Const) or (kind == DIM and not isinstance(value.value, int)):
            raise bad()
        return value.value


def _closure(value: Node | Const) -> Node:
    if isinstance(value, Const):
        constant = value.value
        return lambda env: constant
    return value


def compile_expression(text: str, names: Sequence[str]) -> Compiled:
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
    compiler = _Compiler(frozenset(names))
    try:
        fn = compiler.compile(tree.body, 0)
    except RecursionError:
        raise _fail("expression too deeply nested") from None
    if isinstance(fn, Const):
        raise _fail(f"the expression is the constant {fn.value!r}: it must use an input or a "
                    "parameter")
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
        return self.expr(env)

    def extra_repr(self) -> str:
        return f"{self.expr.text!r}, inputs={list(self.input_names)}"
