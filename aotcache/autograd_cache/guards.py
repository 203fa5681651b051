"""Dynamic-shape guards of cache entries, and the position-normalized description of symbolic inputs.

With dynamic shapes one key can hold several entries, each compiled under different assumptions about input
sizes ("s0 > 4", "s0 % 2 == 0"). An entry records those assumptions as a guard expression over input
positions, e.g. ``L['t0'].size()[0] == L['t1'] and 5 <= L['t0'].size()[0]``; on load
:func:`evaluate_guards` checks them against the real inputs. A failing guard is a ``guard_miss``.

NOTE [Guards are evaluated, never eval'ed]
Entries can come from a shared (Redis) tier, so a guard string is untrusted text. It is parsed with
:mod:`ast` and checked against a small whitelist grammar (comparisons, and/or/not, integer arithmetic,
``min``/``max``/``abs``, ``math.floor``-style helpers, ``L['tN']`` input references with ``.size()[k]``,
``.stride()[k]``, ``.storage_offset()``) *before* anything is computed. The text itself is never given to
``eval``: only a code object compiled from the validated tree (NOTE [Guards are compiled once]).
``__import__('os').system('x')`` is rejected as an unknown name without running anything.

NOTE [Guards are compiled once]
With dynamic shapes the guards run on every call, and a model's expression holds hundreds of clauses, so
parsing it per call cost 0.2-0.6 s. :func:`compile_guards` parses and validates an expression once per
process, rewrites each input read (``L['t3'].size()``) into a parameter of a ``lambda``, compiles that
tree to a code object whose globals hold only the whitelisted functions (no builtins), and memoizes it by
expression. A call reads each needed size/stride tuple once, checks ranks and the input count, and runs the
code object: a few microseconds for a BERT-sized expression instead of a tree walk.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch

from aotcache.autograd_cache.safety import BypassAOTAutogradCache

__all__ = [
    "GuardExpressionError",
    "symbolic_inputs",
    "find_shape_env",
    "describe_inputs",
    "produce_guards_expression",
    "input_symbols",
    "dynamo_guards_expression",
    "hinted_inputs",
    "validate_guards_expression",
    "evaluate_guards",
    "compile_guards",
    "CompiledGuards",
    "residual_guards_expression",
]


class GuardExpressionError(ValueError):
    """A guard expression that cannot be produced, parsed, or evaluated (treat the entry as unusable)."""


# ----------------------------------------------------------------------------------------------------
# Symbolic inputs and their position-normalized description (used by the key)
# ----------------------------------------------------------------------------------------------------


def symbolic_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """The graph's inputs as the compile sees them: a placeholder's fake value when it is symbolic, else the input.

    Dynamo hands a backend real tensors but records symbolic fake tensors in ``meta["example_value"]``;
    make_fx records them in ``meta["val"]``. The symbolic form is what the key and the guards must describe;
    for static inputs the example input itself is described.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if example_inputs is not None and len(placeholders) != len(example_inputs):
        raise ValueError(f"the graph has {len(placeholders)} placeholders but {len(example_inputs)} example inputs "
                         "were given; pass one example input per placeholder")
    values = []
    for position, node in enumerate(placeholders):
        meta_value = node.meta.get("example_value", node.meta.get("val"))
        if example_inputs is None or _is_symbolic(meta_value):
            values.append(meta_value)
        else:
            values.append(example_inputs[position])
    return values


def _is_symbolic(value: Any) -> bool:
    """A Sym* value, or a tensor with a symbolic size, stride or storage offset."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(value, torch.Tensor):
        items = (*value.shape, *_strides_or_empty(value), _storage_offset_or_zero(value))
        return any(isinstance(item, torch.SymInt) for item in items)
    return False


def _symnode_expr(value: Any) -> Any:
    """The sympy expression behind a SymInt/SymFloat/SymBool, or the plain number it already is."""
    node = getattr(value, "node", None)
    expr = getattr(node, "expr", None)
    if expr is None:
        raise BypassAOTAutogradCache(f"opaque symbolic value: {type(value).__name__}")
    return expr


def find_shape_env(values: Sequence[Any]) -> Any | None:
    """The ShapeEnv shared by the symbolic values among ``values`` (None when every shape is static)."""
    for value in values:
        candidates = [value] if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else []
        if isinstance(value, torch.Tensor):
            candidates = [*value.shape, *_strides_or_empty(value), _storage_offset_or_zero(value)]
        for candidate in candidates:
            if isinstance(candidate, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                shape_env = getattr(candidate.node, "shape_env", None)
                if shape_env is not None:
                    return shape_env
    return None


def _strides_or_empty(tensor: torch.Tensor) -> tuple[Any, ...]:
    return tuple(tensor.stride()) if tensor.layout == torch.strided else ()


def _storage_offset_or_zero(tensor: torch.Tensor) -> Any:
    return tensor.storage_offset() if tensor.layout == torch.strided else 0


def input_location(position: int, kind: str = "", dim: int | None = None) -> str:
    """The stable name of an input location, in the guard-expression form: ``L['t0'].size()[1]``."""
    base = f"L['t{position}']"
    if kind == "":
        return base
    if kind == "storage_offset":
        return f"{base}.storage_offset()"
    return f"{base}.{kind}()[{dim}]"


def _locations(position: int, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        located = [(input_location(position, "size", dim), size) for dim, size in enumerate(value.shape)]
        located += [(input_location(position, "stride", dim), stride)
                    for dim, stride in enumerate(_strides_or_empty(value))]
        if value.layout == torch.strided:
            located.append((input_location(position, "storage_offset"), value.storage_offset()))
        return located
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return [(input_location(position), value)]
    return []


class _SymbolNamer:
    """Names each free symbol by the first input location where it appears bare (``L['t0'].size()[0]``)."""

    def __init__(self, values: Sequence[Any]) -> None:
        self.names: dict[Any, str] = {}
        for position, value in enumerate(values):
            for location, item in _locations(position, value):
                if isinstance(item, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                    expr = _symnode_expr(item)
                    if getattr(expr, "is_Symbol", False) and expr not in self.names:
                        self.names[expr] = location
        self._extra = 0

    def render(self, item: Any) -> int | float | bool | str:
        """A plain number as itself; a symbolic one as its expression over location names."""
        if not isinstance(item, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return item
        expr = _symnode_expr(item)
        if not expr.free_symbols:  # a symbolic type holding a constant
            convert = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(item)]
            return convert(expr)
        if getattr(expr, "is_Symbol", False) and expr in self.names:
            return self.names[expr]
        import sympy

        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in self.names:  # only inside compound expressions: name by order of appearance
                self.names[symbol] = f"free{self._extra}"
                self._extra += 1
        mapping = {symbol: sympy.Symbol(self.names[symbol]) for symbol in expr.free_symbols}
        return str(expr.xreplace(mapping))


def _memory_format(shape: Sequence[Any], strides: Sequence[Any]) -> str:
    """Which dense memory format the strides spell, computed from concrete numbers only (no guards added)."""
    if not all(isinstance(item, int) for item in (*shape, *strides)):
        return "symbolic"

    def dense_strides(order: Sequence[int]) -> list[int]:
        expected, running = [0] * len(shape), 1
        for dim in reversed(order):
            expected[dim] = running
            running *= max(shape[dim], 1)
        return expected

    def matches(order: Sequence[int]) -> bool:
        expected = dense_strides(order)
        return all(shape[dim] == 1 or strides[dim] == expected[dim] for dim in range(len(shape)))

    rank = len(shape)
    if matches(range(rank)):
        return "contiguous"
    if rank == 4 and matches((0, 2, 3, 1)):
        return "channels_last"
    if rank == 5 and matches((0, 2, 3, 4, 1)):
        return "channels_last_3d"
    return "strided"


def _describe_tensor(tensor: torch.Tensor, namer: _SymbolNamer) -> dict[str, Any]:
    shape = [namer.render(size) for size in tensor.shape]
    description: dict[str, Any] = {
        "kind": "tensor",
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": shape,
        "device": str(tensor.device),
        "layout": str(tensor.layout).removeprefix("torch."),
        "requires_grad": bool(tensor.requires_grad),
    }
    if tensor.layout == torch.strided:
        stride = [namer.render(item) for item in tensor.stride()]
        description["stride"] = stride
        description["storage_offset"] = namer.render(tensor.storage_offset())
        description["memory_format"] = _memory_format(shape, stride)
    if tensor.is_conj():
        description["conj"] = True
    if tensor.is_neg():
        description["neg"] = True
    return description


def describe_inputs(values: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON-ready metadata of each input; a symbol appears by its position-normalized name, never its value.

    :raises BypassAOTAutogradCache: an input the key cannot describe (``"opaque input: Generator"``).
    """
    namer = _SymbolNamer(values)
    described = []
    for value in values:
        if isinstance(value, torch.Tensor):
            described.append(_describe_tensor(value, namer))
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            kind = {torch.SymInt: "symint", torch.SymFloat: "symfloat", torch.SymBool: "symbool"}[type(value)]
            described.append({"kind": kind, "expr": namer.render(value)})
        elif isinstance(value, bool):
            described.append({"kind": "bool", "value": value})
        elif isinstance(value, int):
            described.append({"kind": "int", "value": value})
        elif isinstance(value, float):
            described.append({"kind": "float", "value": repr(value)})
        elif value is None:
            described.append({"kind": "none"})
        elif isinstance(value, (str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
            described.append({"kind": type(value).__name__, "value": str(value)})
        else:
            raise BypassAOTAutogradCache(f"opaque input: {type(value).__name__}")
    return described


# ----------------------------------------------------------------------------------------------------
# Producing guard expressions
# ----------------------------------------------------------------------------------------------------


def _symbols_of(values: Sequence[Any]) -> set[Any]:
    symbols: set[Any] = set()
    for position, value in enumerate(values):
        for _, item in _locations(position, value):
            if isinstance(item, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                symbols |= set(_symnode_expr(item).free_symbols)
    return symbols


def produce_guards_expression(inputs: Sequence[Any], shape_env: Any | None = None) -> str | None:
    """The guards the compile assumed over the symbolic ``inputs``, as an expression over input positions.

    Only guards whose symbols all occur in the inputs are kept (others belong to other graphs sharing the
    ShapeEnv). None when there is nothing symbolic or nothing to check.

    :raises GuardExpressionError: torch could not express the guards, or produced text outside the grammar
        that :func:`evaluate_guards` accepts (the entry must then not be cached).
    """
    shape_env = shape_env if shape_env is not None else find_shape_env(inputs)
    if shape_env is None:
        return None
    symbols = _symbols_of(inputs)
    guards = [guard for guard in shape_env.guards if set(guard.expr.free_symbols) <= symbols]
    placeholders = [value if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int))
                    else None for value in inputs]
    try:
        expression = shape_env.produce_guards_expression(placeholders, guards=guards)
    except Exception as exc:  # torch's guard printer raises assorted errors; the caller bypasses the cache
        raise GuardExpressionError(f"cannot express the shape guards of this graph: {type(exc).__name__}: {exc}"
                                   ) from exc
    if expression is None:
        return None
    validate_guards_expression(expression)
    return expression


def input_symbols(inputs: Sequence[Any]) -> set[Any]:
    """The free symbols of the symbolic ``inputs`` now (read before a compile: its specializations replace them)."""
    return _symbols_of(inputs)


def dynamo_guards_expression(inputs: Sequence[Any], shape_env: Any, symbols: set[Any], since: int) -> str | None:
    """The guards a Dynamo graph's entry is valid under, as an expression over input positions (NOTE [Guards added
    while compiling a Dynamo graph] in pipeline.py): those the compile added to ``shape_env`` (from index
    ``since`` on) and, as torch's FX graph cache does, those it held before over these inputs' symbols only (the
    compile could rely on them), with what it knows of every symbolic input (sizes, strides and offset,
    specialized or related to other inputs, their ranges). None: no symbolic input, nothing to check.

    ``symbols`` are the inputs' free symbols read before the compile (:func:`input_symbols`).

    :raises GuardExpressionError: an added guard over a symbol that is no input's (it cannot be checked by
        position), or torch's printer failed or printed something outside the grammar.
    """
    added = list(shape_env.guards[since:])
    for guard in added:
        foreign = set(guard.expr.free_symbols) - symbols
        if foreign:
            raise GuardExpressionError(f"guard {guard.expr} is over {sorted(map(str, foreign))}, which no graph "
                                       "input holds")
    prior = [guard for guard in shape_env.guards[:since] if set(guard.expr.free_symbols) <= symbols]
    placeholders = [value if _is_symbolic(value) else None for value in inputs]
    if not any(value is not None for value in placeholders):
        if added:
            raise GuardExpressionError("guards were added but no graph input is symbolic")
        return None
    try:
        expression = shape_env.produce_guards_expression(placeholders, guards=prior + added, ignore_static=False)
    except Exception as exc:  # torch's guard printer raises assorted errors; the caller bypasses the cache
        raise GuardExpressionError(f"cannot express the shape guards: {type(exc).__name__}: {exc}") from exc
    if expression is None:
        if added:  # guards were added, so an empty expression would lose them
            raise GuardExpressionError("torch printed no guards for the added ones")
        return None
    validate_guards_expression(expression)
    return expression


def _hint(value: Any) -> Any:
    """The concrete value a symbolic number has in this compile (its hint), or the plain number."""
    if not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value
    hint = getattr(value.node, "hint", None)
    if hint is None and not isinstance(value, torch.SymFloat):
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

        try:  # a derived value whose hint was not computed yet
            hint = guarding_hint_or_throw(value)
        except RuntimeError:  # no hint to compute from: an unbacked symbol
            hint = None
    if hint is None:
        raise GuardExpressionError(f"symbolic value {value} has no hint (unbacked): its guards cannot be checked")
    return hint


def hinted_inputs(inputs: Sequence[Any]) -> list[Any]:
    """``inputs`` with every symbolic number replaced by its hint, and every tensor of symbolic size, stride or
    offset by a meta tensor of the hinted ones: what a guard expression is checked against at lookup, without
    adding guards to the ShapeEnv.

    :raises GuardExpressionError: a symbol without a hint (unbacked).
    """
    hinted = []
    for value in inputs:
        if isinstance(value, torch.Tensor) and _is_symbolic(value):
            if value.is_nested:  # a jagged layout's ragged size is a nested int, with no number to stand for it
                raise GuardExpressionError("a nested tensor input: its ragged size has no hint to check guards on")
            size = [_hint(item) for item in value.shape]
            stride = [_hint(item) for item in _strides_or_empty(value)] or None
            offset = _hint(_storage_offset_or_zero(value))
            if stride is None:  # a non-strided layout: only its sizes can be guarded
                hinted.append(torch.empty(size, dtype=value.dtype, device="meta"))
            else:
                span = 1 + sum((n - 1) * step for n, step in zip(size, stride)) if all(size) else 0
                hinted.append(torch.empty(offset + span, dtype=value.dtype, device="meta").as_strided(
                    size, stride, offset))
        else:
            hinted.append(_hint(value))
    return hinted


# ----------------------------------------------------------------------------------------------------
# The restricted evaluator
# ----------------------------------------------------------------------------------------------------

_MAX_EXPRESSION_CHARS = 1_000_000
_MAX_EXPONENT = 256
_MAX_INT_BITS = 4096
_INPUT_NAME = re.compile(r"^t(\d+)$")

_COMPARISONS = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}


def _floordiv(a: Any, b: Any) -> Any:
    if b == 0:
        raise GuardExpressionError("division by zero in a guard expression")
    return a // b


def _mod(a: Any, b: Any) -> Any:
    if b == 0:
        raise GuardExpressionError("modulo by zero in a guard expression")
    return a % b


def _truediv(a: Any, b: Any) -> Any:
    if b == 0:
        raise GuardExpressionError("division by zero in a guard expression")
    return a / b


def _power(a: Any, b: Any) -> Any:
    if isinstance(b, (int, float)) and abs(b) > _MAX_EXPONENT:
        raise GuardExpressionError(f"exponent {b} is too large for a guard expression")
    return a**b


_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: _floordiv, ast.Mod: _mod, ast.Div: _truediv, ast.Pow: _power,
}

# Functions a guard may call: torch's Python printer emits the lower-case ones; the capitalized ones are
# sympy's spelling, accepted for hand-written or older expressions.
_FUNCTIONS: dict[str, Any] = {
    "max": max, "min": min, "abs": abs, "round": round, "int": int, "float": float,
    "Max": max, "Min": min, "Abs": abs, "Mod": _mod, "FloorDiv": _floordiv, "PythonMod": _mod,
    "Eq": lambda a, b: a == b, "Ne": lambda a, b: a != b,
}


# NOTE [NaN checks of a symbolic float]
# torch prints a float input's guards with ``not math.isnan(L['tN'])``. Installed over a symbolic input (a loaded
# Dynamo entry, NOTE [Guards added while compiling a Dynamo graph] in pipeline.py), ``math.isnan`` of a SymFloat
# made it a Python float: a guard ``lr == 0.05`` that specialized the float Dynamo had kept as a graph input
# (NOTE [Dynamo's float inputs kept as graph inputs] in aot/dynamo_floats.py), so a warm process compiled a frame
# per LR value. On a SymFloat the checks stay symbolic (``x != x``: no symbol stands for a NaN, so it adds no
# guard); on numbers they are math's.
def _isnan(value: Any) -> Any:
    return value != value if isinstance(value, torch.SymFloat) else math.isnan(value)


def _isinf(value: Any) -> Any:
    return abs(value) == math.inf if isinstance(value, torch.SymFloat) else math.isinf(value)


def _isfinite(value: Any) -> Any:
    return abs(value) != math.inf if isinstance(value, torch.SymFloat) else math.isfinite(value)


_MATH_MEMBERS: dict[str, Any] = {
    "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc, "sqrt": math.sqrt, "log2": math.log2,
    "inf": math.inf, "nan": math.nan,
    # float inputs: NOTE [Float arguments] in aot/dynamic_dims.py, NOTE [NaN checks of a symbolic float]
    "isnan": _isnan, "isinf": _isinf, "isfinite": _isfinite,
}
_TORCH_MEMBERS: dict[str, Any] = {"sym_float": float, "sym_int": int, "_sym_sqrt": math.sqrt,
                                  "sym_max": max, "sym_min": min}
_INPUT_METHODS = frozenset({"size", "stride", "storage_offset", "dim"})


def _reject(node: ast.AST, why: str) -> GuardExpressionError:
    return GuardExpressionError(f"guard expression rejected: {why} ({ast.dump(node)[:120]})")


def _check_input_reference(node: ast.Subscript) -> None:
    if not (isinstance(node.value, ast.Name) and node.value.id == "L"):
        raise _reject(node, "only L['tN'] may be subscripted by a string")
    key = node.slice
    if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and _INPUT_NAME.match(key.value)):
        raise _reject(node, "an input reference must be L['t<position>']")


def _validate_node(node: ast.AST, input_keys: set[ast.AST]) -> None:
    """Whitelist check of one AST node (children are visited by the caller).

    ``input_keys`` are the string constants that sit in ``L['tN']`` subscripts, the only strings allowed.
    """
    if isinstance(node, (ast.Expression, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd)):
        return
    if isinstance(node, ast.BoolOp) or isinstance(node, ast.UnaryOp):
        return
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise _reject(node, f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node.op, ast.Pow):
            exponent = node.right
            if not (isinstance(exponent, ast.Constant) and type(exponent.value) is int
                    and 0 <= exponent.value <= _MAX_EXPONENT):
                raise _reject(node, f"an exponent must be an integer constant from 0 to {_MAX_EXPONENT}")
        return
    if isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARISONS for op in node.ops):
            raise _reject(node, "only ==, !=, <, <=, >, >= comparisons are allowed")
        return
    if type(node) in _COMPARISONS or type(node) in _BINARY:
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or isinstance(node.value, (int, float)):
            if isinstance(node.value, int) and node.value.bit_length() > _MAX_INT_BITS:
                raise _reject(node, "integer constant too large")
            return
        if isinstance(node.value, str) and node in input_keys:
            return
        raise _reject(node, f"constant of type {type(node.value).__name__} is not allowed")
    if isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            _check_input_reference(node)
        elif not (isinstance(key, ast.Constant) and type(key.value) is int):
            raise _reject(node, "only integer indexing of sizes/strides is allowed")
        return
    if isinstance(node, ast.Name):
        if node.id not in ("L", "math", "torch") and node.id not in _FUNCTIONS:
            raise _reject(node, f"unknown name {node.id!r}")
        return
    if isinstance(node, ast.Attribute):
        base = node.value
        if isinstance(base, ast.Name) and base.id == "math" and node.attr in _MATH_MEMBERS:
            return
        if isinstance(base, ast.Name) and base.id == "torch" and node.attr in _TORCH_MEMBERS:
            return
        if isinstance(base, ast.Subscript) and node.attr in _INPUT_METHODS:
            _check_input_reference(base)
            return
        raise _reject(node, f"attribute {node.attr!r} is not allowed")
    if isinstance(node, ast.Call):
        if node.keywords:
            raise _reject(node, "keyword arguments are not allowed")
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
            return
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("math", "torch"):
            return  # member checked by the Attribute rule
        if isinstance(func, ast.Attribute) and func.attr in _INPUT_METHODS:
            if node.args:
                raise _reject(node, f".{func.attr}() takes no arguments in a guard")
            return
        raise _reject(node, "call of a function that is not whitelisted")
    raise _reject(node, f"syntax {type(node).__name__} is not allowed")


def _parse(expression: str) -> ast.Expression:
    if not isinstance(expression, str):
        raise GuardExpressionError(f"a guard expression must be a string, got {type(expression).__name__}")
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise GuardExpressionError(f"guard expression too long ({len(expression)} characters)")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise GuardExpressionError(f"guard expression is not valid syntax: {exc.msg}") from None
    input_keys = {node.slice for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                  and isinstance(node.value, ast.Name) and node.value.id == "L"}
    for node in ast.walk(tree):
        _validate_node(node, input_keys)
    return tree


def validate_guards_expression(expression: str) -> None:
    """Check that ``expression`` is inside the guard grammar, without evaluating anything.

    :raises GuardExpressionError: naming the first construct that is not allowed.
    """
    _parse(expression)


# ----------------------------------------------------------------------------------------------------
# Compiling a validated expression (NOTE [Guards are compiled once])
# ----------------------------------------------------------------------------------------------------

# What a guard may read of input N, as the name of the compiled function's parameter holding it.
_READS = {"size": "s", "stride": "st", "storage_offset": "o", "dim": "d", "value": "v"}


def _size(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        raise GuardExpressionError(f"guard calls .size() on a non-tensor input ({type(value).__name__})")
    return value.shape


def _stride(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        raise GuardExpressionError(f"guard calls .stride() on a non-tensor input ({type(value).__name__})")
    return value.stride()


def _storage_offset(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        raise GuardExpressionError(f"guard calls .storage_offset() on a non-tensor input ({type(value).__name__})")
    return value.storage_offset()


def _dim(value: Any) -> int:
    if not isinstance(value, torch.Tensor):
        raise GuardExpressionError(f"guard calls .dim() on a non-tensor input ({type(value).__name__})")
    return value.dim()


def _number(value: Any) -> Any:
    if isinstance(value, (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value
    raise GuardExpressionError(f"guard uses an input of type {type(value).__name__} as a number")


_EXTRACT = {"size": _size, "stride": _stride, "storage_offset": _storage_offset, "dim": _dim, "value": _number}


class _Namespace:
    """``math`` / ``torch`` as a compiled guard sees them: only the whitelisted members, nothing else."""

    def __init__(self, members: dict[str, Any]) -> None:
        self.__dict__.update(members)


def _guard_globals() -> dict[str, Any]:
    return {"__builtins__": {}, **_FUNCTIONS, "math": _Namespace(_MATH_MEMBERS),
            "torch": _Namespace(_TORCH_MEMBERS)}


class _Lower(ast.NodeTransformer):
    """Rewrites a validated tree: each ``L['tN'].size()`` (``.stride()``, ``.storage_offset()``, ``.dim()``) and
    each bare ``L['tN']`` becomes a parameter name; records which reads of which inputs the guard needs and
    the largest index it takes of each size/stride tuple (checked before the expression runs)."""

    def __init__(self) -> None:
        self.reads: dict[tuple[int, str], str] = {}
        self.rank_needed: dict[tuple[int, str], int] = {}

    def _read(self, position: int, kind: str) -> ast.Name:
        name = self.reads.setdefault((position, kind), f"{_READS[kind]}{position}")
        return ast.Name(id=name, ctx=ast.Load())

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _INPUT_METHODS and isinstance(func.value, ast.Subscript):
            return self._read(_input_position(func.value), func.attr)
        return self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            return self._read(_input_position(node), "value")
        lowered = self.generic_visit(node)
        assert isinstance(lowered, ast.Subscript)
        if isinstance(lowered.value, ast.Name) and isinstance(lowered.slice, ast.Constant):
            for (position, kind), name in self.reads.items():
                if name == lowered.value.id and kind in ("size", "stride"):
                    index = lowered.slice.value
                    need = index + 1 if index >= 0 else -index
                    key = (position, kind)
                    self.rank_needed[key] = max(self.rank_needed.get(key, 0), need)
                    return lowered
        raise GuardExpressionError("guard indexes something that is not a size or stride tuple")

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "L":
            raise GuardExpressionError("name 'L' used as a value")
        return node


def _input_position(node: ast.Subscript) -> int:
    return int(_INPUT_NAME.match(node.slice.value).group(1))  # type: ignore[union-attr]


class CompiledGuards:
    """A guard expression compiled once: ``guards(inputs) -> bool`` (NOTE [Guards are compiled once]).

    :raises GuardExpressionError: when called, inputs the expression does not fit (too few, a rank too small,
        a size of a non-tensor), or arithmetic that fails (division by zero).
    """

    __slots__ = ("expression", "_function", "_reads", "_min_inputs", "_rank_checks")

    def __init__(self, expression: str) -> None:
        tree = _parse(expression)  # NOTE [Guards are evaluated, never eval'ed]: the whitelist check first
        lower = _Lower()
        body = lower.visit(tree.body)
        reads = list(lower.reads.items())
        arguments = ast.arguments(posonlyargs=[], args=[ast.arg(arg=name) for _, name in reads], vararg=None,
                                  kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
        lambda_tree = ast.fix_missing_locations(ast.Expression(body=ast.Lambda(args=arguments, body=body)))
        code = compile(lambda_tree, "<aotcache guards>", "eval")
        self.expression = expression
        self._function = eval(code, _guard_globals())  # a code object built from the validated tree only
        self._reads = [(position, _EXTRACT[kind]) for (position, kind), _ in reads]
        self._min_inputs = 1 + max((position for (position, _), _ in reads), default=-1)
        self._rank_checks = [(index, need) for index, ((position, kind), _) in enumerate(reads)
                             if (need := lower.rank_needed.get((position, kind), 0))]

    def __call__(self, inputs: Sequence[Any]) -> bool:
        if len(inputs) < self._min_inputs:
            raise GuardExpressionError(f"guard refers to input {self._min_inputs - 1} but only {len(inputs)} "
                                       "were given")
        values = [extract(inputs[position]) for position, extract in self._reads]
        for index, need in self._rank_checks:
            if len(values[index]) < need:
                raise GuardExpressionError(f"guard indexes dimension {need - 1} of a rank-{len(values[index])} "
                                           "input")
        try:
            return bool(self._function(*values))
        except GuardExpressionError:
            raise
        except ZeroDivisionError:
            raise GuardExpressionError("division by zero in a guard expression") from None
        except (TypeError, OverflowError, ValueError, IndexError) as exc:
            raise GuardExpressionError(f"guard expression does not fit these inputs: {type(exc).__name__}: {exc}"
                                       ) from None


_COMPILED_LIMIT = 512
_compiled: dict[str, CompiledGuards] = {}
_compiled_lock = threading.Lock()


def compile_guards(expression: str) -> CompiledGuards:
    """The compiled form of ``expression``, built once per process and expression (a bounded memo).

    :raises GuardExpressionError: the expression is outside the grammar.
    """
    found = _compiled.get(expression) if isinstance(expression, str) else None
    if found is not None:
        return found
    compiled = CompiledGuards(expression)
    with _compiled_lock:
        if len(_compiled) >= _COMPILED_LIMIT:
            _compiled.pop(next(iter(_compiled)))  # oldest first: entries are only ever added
        _compiled[expression] = compiled
    return compiled


def evaluate_guards(expression: str | None, real_inputs: Sequence[Any]) -> bool:
    """True when the real inputs satisfy the recorded guards (None or empty means no guards).

    The expression is validated against the whitelist grammar and compiled once (:func:`compile_guards`);
    nothing in its text is executed as Python.

    :raises GuardExpressionError: the expression is outside the grammar or does not fit the inputs.
    """
    if expression is None or not expression.strip():
        return True
    return compile_guards(expression)(real_inputs)


# NOTE [Guards left to check when inputs are pinned]
# A dynamic graph's guards (produced with ``ignore_static=False``) state every size, stride and storage offset of
# its static inputs too: for a tiny Llama's decoding step, ~150 comparisons over 29 inputs, of which only the 4
# cache tensors have a dynamic dimension (~30 us per call). The call hot path (NOTE [Call hot path] in
# aot/call_hot_path.py) compares the static inputs' sizes, strides and offsets with a recorded call's anyway,
# and that call passed the guards. When every read of some inputs gives what it gave at a call where the guards
# held, a conjunct of the top-level ``and`` that reads only those inputs held then and holds now (guards are
# pure functions of what they read), so only the conjuncts that read another input are left to evaluate.
# :func:`residual_guards_expression` gives them, as an expression of the same grammar and input names.
@functools.lru_cache(maxsize=64)  # parsing a guard of ~150 comparisons takes ~30 ms: once per graph and pinning
def residual_guards_expression(expression: str, pinned: frozenset[int]) -> str:
    """The conjuncts of ``expression`` that read an input not in ``pinned`` (graph input positions), joined with
    ``and``; ``""`` when none does. Only sound where the pinned inputs read as at a call the whole expression
    admitted (NOTE [Guards left to check when inputs are pinned]).

    :raises GuardExpressionError: the expression is outside the grammar.
    """
    tree = _parse(expression)  # NOTE [Guards are evaluated, never eval'ed]: the whitelist check first
    body = tree.body
    conjuncts = body.values if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And) else [body]
    kept = [conjunct for conjunct in conjuncts
            if any(_input_position(node) not in pinned for node in ast.walk(conjunct)
                   if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L")]
    if not kept:
        return ""
    return ast.unparse(kept[0] if len(kept) == 1 else ast.BoolOp(op=ast.And(), values=kept))
