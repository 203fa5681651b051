"""A JSON form of ATen FX graphs: no pickle, no Python source, targets resolved only from ``torch.ops``.

Used by the ``nop`` compiler's artifact. A graph becomes ``{"format", "nodes": [...], "constants": [...]}``
plus one blob of tensor constants written with ``torch.save`` and read back with
``torch.load(weights_only=True)``. Loading resolves every ``call_function`` target either from a
``torch.ops`` namespace (``"aten::add.Tensor"``), from :data:`SAFE_HIGHER_ORDER_OPS` (``"higher_order::
with_effects"``), or from :data:`SAFE_FUNCTIONS`, a fixed whitelist; anything else is refused with
:class:`~aotcache.compilers.base.ArtifactError`, so a stored graph cannot name an arbitrary Python callable.

NOTE [higher-order operators]
A higher-order operator takes callables or subgraphs as operands, so only an allowlist is stored:
``with_effects(token, op, *args, **kwargs)``, which functionalization emits for ops with side effects (e.g.
``aten._linalg_check_errors`` under ``torch.linalg.inv``): its operands are an effect token (a plain tensor
made in the graph), an ATen operator (stored as ``{"op": "aten::name.overload"}`` and resolved from
``torch.ops`` like a target) and ordinary values. ``auto_functionalized`` / ``auto_functionalized_v2``,
which functionalization emits for a custom op that mutates its inputs, take the same kind of operands: the
mutating operator (``{"op": ...}``) and keyword values (graph nodes, ints, lists, None); before, such a
graph was refused, so every graph with a mutating custom op was compiled again by each new process. The
operator itself is checked and keyed by ``autograd_cache/safety.py`` like any operator the graph calls. The
control-flow operators ``cond``, ``while_loop``, ``scan``, ``map_impl``, ``associative_scan`` and
``invoke_subgraph`` (``nested_compile_region``) take their branches and bodies as ``get_attr`` nodes naming
GraphModules: such a node stores its module as a nested description in this same form (NOTE [Subgraphs of
control-flow operators]). So do ``flex_attention`` / ``flex_attention_backward``: the score_mod and the block
mask's mask_mod (and their joint graphs) are ``get_attr`` subgraphs, the block mask's indices graph nodes, the
block sizes ints, the kernel options a dict of scalars; before, every graph using flex attention (transformers'
``attn_implementation="flex_attention"``) was compiled again by each new process.

NOTE [Subgraphs of control-flow operators]
Before, a graph holding a subgraph was refused (GraphSerializationError), so every graph with ``torch.cond``,
``scan``, ``map``, ``while_loop`` or a ``nested_compile_region`` was compiled again by each new process. A
subgraph is an ATen graph like its parent (placeholders, call_function, get_attr, output), so it is written
with the same rules, recursively: ``{"op": "get_attr", "target": name, "subgraph": description}``, its tensor
constants in a blob of their own (``constants/<path>``). Loading resolves its targets by the same allowlist,
so a stored subgraph can name no more than a stored graph can; an operator that takes a callable that is not
a GraphModule (an opaque Python function) stays refused.

Value encoding (args, kwargs): JSON scalars stand for themselves; everything else is a one-key object:
``{"node": name}``, ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": [[key, value], ...]}``,
``{"dtype": "float32"}``, ``{"device": "cpu"}``, ``{"layout": "strided"}``,
``{"memory_format": "channels_last"}``, ``{"float": "inf" | "-inf" | "nan"}``, ``{"complex": [re, im]}``,
``{"slice": [start, stop, step]}``, ``{"ellipsis": null}``, ``{"op": "aten::name.overload"}`` (an operator
passed as a value, NOTE [higher-order operators]).
"""

from __future__ import annotations

import builtins
import io
import math
import operator
import pickle
from typing import Any

import torch
import torch.fx

from aotcache.compilers.base import ArtifactError

__all__ = ["GraphSerializationError", "SAFE_FUNCTIONS", "SAFE_HIGHER_ORDER_OPS", "serialize_graph",
           "deserialize_graph", "target_name", "resolve_target"]

GRAPH_FORMAT = 1
CONSTANTS_BLOB = "constants"
HIGHER_ORDER_NAMESPACE = "higher_order"
# Higher-order operators a stored graph may call (NOTE [higher-order operators]); all but with_effects take
# their subgraphs as get_attr GraphModules (NOTE [Subgraphs of control-flow operators]).
SAFE_HIGHER_ORDER_OPS = ("with_effects", "cond", "while_loop", "scan", "map_impl", "associative_scan",
                         "invoke_subgraph", "auto_functionalized", "auto_functionalized_v2", "flex_attention",
                         "flex_attention_backward")


class GraphSerializationError(ArtifactError):
    """A graph that cannot be written in the JSON form (unsupported target, argument or attribute)."""


def _safe_functions() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                 "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                 "rshift"):
        table[f"operator.{name}"] = getattr(operator, name)
    for name in ("ceil", "floor", "trunc", "sqrt", "exp", "log"):
        table[f"math.{name}"] = getattr(math, name)
    for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum",
                 "_sym_sqrt", "_sym_cos", "_sym_sin", "_sym_tan", "_sym_cosh", "_sym_sinh", "_sym_tanh",
                 "_sym_acos", "_sym_asin", "_sym_atan", "_sym_log2"):
        if hasattr(torch, name):
            table[f"torch.{name}"] = getattr(torch, name)
    for name in ("int", "float", "bool", "min", "max", "abs"):
        table[f"builtins.{name}"] = getattr(builtins, name)
    return table


# Non-op callables a stored graph may name: Python number arithmetic and torch's SymInt helpers.
SAFE_FUNCTIONS: dict[str, Any] = _safe_functions()


def _operator_name(target: Any) -> str | None:
    """``"namespace::op.overload"`` (or ``"namespace::op"`` for a packet) of a torch.ops operator, else None."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target.__name__}"  # __name__ is "<op>.<overload>"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name}"  # "aten::add": resolved to the packet
    return None


def _higher_order_name(target: Any) -> str | None:
    """``"higher_order::<name>"`` of an allowlisted higher-order operator, else None."""
    if not isinstance(target, torch._ops.HigherOrderOperator):
        return None
    name = target.name()
    if name in SAFE_HIGHER_ORDER_OPS and getattr(torch.ops.higher_order, name, None) is target:
        return f"{HIGHER_ORDER_NAMESPACE}::{name}"
    return None


def target_name(target: Any) -> str:
    """The stored name of a ``call_function`` target. :raises GraphSerializationError: not storable."""
    name = _operator_name(target) or _higher_order_name(target)
    if name is not None:
        return name
    for name, function in SAFE_FUNCTIONS.items():
        if function is target:
            return name
    raise GraphSerializationError(f"graph calls {target!r}, which the JSON graph form cannot store (only torch.ops "
                                  "operators, the higher-order operators "
                                  f"{', '.join(SAFE_HIGHER_ORDER_OPS)} and a whitelist of operator/math/torch.sym_* "
                                  "functions); use the inductor or aoti compiler, or decompose the graph to ATen ops")


def _resolve_operator(name: str) -> Any:
    """The torch.ops operator (overload or packet) of a stored name; never a higher-order operator.

    :raises ArtifactError: not an operator name, or not registered in this process.
    """
    namespace, sep, rest = name.partition("::")
    if not sep or not namespace.isidentifier() or namespace == HIGHER_ORDER_NAMESPACE:
        raise ArtifactError(f"stored graph names unknown operator {name!r}")
    op_name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), op_name)
        resolved = getattr(packet, overload) if overload else packet
    except (AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"stored graph calls operator {name!r}, which is not registered in this process "
                            "(load the library that defines it first)") from exc
    if not isinstance(resolved, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise ArtifactError(f"stored graph names {name!r}, which is not a torch.ops operator")
    return resolved


def resolve_target(name: str) -> Any:
    """The callable a stored target name stands for. :raises ArtifactError: unknown or unregistered name."""
    if name in SAFE_FUNCTIONS:
        return SAFE_FUNCTIONS[name]
    namespace, sep, op_name = name.partition("::")
    if sep and namespace == HIGHER_ORDER_NAMESPACE:
        if op_name not in SAFE_HIGHER_ORDER_OPS:
            raise ArtifactError(f"stored graph calls higher-order operator {name!r}, which is not one of the "
                                f"storable ones ({', '.join(SAFE_HIGHER_ORDER_OPS)})")
        operator_ = getattr(torch.ops.higher_order, op_name, None)
        if not isinstance(operator_, torch._ops.HigherOrderOperator):
            raise ArtifactError(f"higher-order operator {name!r} is not available in this torch")
        return operator_
    return _resolve_operator(name)


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------

_MEMORY_FORMATS = {str(fmt).removeprefix("torch."): fmt for fmt in
                   (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(layout).removeprefix("torch."): layout for layout in
            (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr,
             torch.sparse_bsc, torch._mkldnn) if isinstance(layout, torch.layout)}


def _dtype_by_name(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ArtifactError(f"stored graph names unknown dtype {name!r}")
    return value


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, complex):
        return {"complex": [_encode(value.real), _encode(value.imag)]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, list):
        return {"list": [_encode(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(key), _encode(item)] for key, item in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    operator_name = _operator_name(value)
    if operator_name is not None:  # an operand of with_effects (NOTE [higher-order operators])
        return {"op": operator_name}
    raise GraphSerializationError(f"graph argument {value!r} of type {type(value).__name__} cannot be stored in "
                                  "the JSON graph form")


def _decode(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((tag, payload),) = value.items()
        if tag == "node":
            try:
                return nodes[payload]
            except KeyError:
                raise ArtifactError(f"stored graph uses node {payload!r} before defining it") from None
        if tag == "tuple":
            return tuple(_decode(item, nodes) for item in payload)
        if tag == "list":
            return [_decode(item, nodes) for item in payload]
        if tag == "dict":
            return {_decode(key, nodes): _decode(item, nodes) for key, item in payload}
        if tag == "dtype":
            return _dtype_by_name(payload)
        if tag == "device":
            return torch.device(payload)
        if tag == "layout" and payload in _LAYOUTS:
            return _LAYOUTS[payload]
        if tag == "memory_format" and payload in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[payload]
        if tag == "float" and payload in ("inf", "-inf", "nan"):
            return float(payload)
        if tag == "complex":
            return complex(_decode(payload[0], nodes), _decode(payload[1], nodes))
        if tag == "slice":
            return slice(*(_decode(item, nodes) for item in payload))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "op" and isinstance(payload, str):
            return _resolve_operator(payload)
    raise ArtifactError(f"stored graph has an undecodable value {value!r}")


# ----------------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------------


def serialize_graph(gm: torch.fx.GraphModule) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``gm`` as (JSON-able description, blobs). :raises GraphSerializationError: unsupported content."""
    blobs: dict[str, bytes] = {}
    return _serialize_graph(gm, CONSTANTS_BLOB, blobs), blobs


def _serialize_graph(gm: torch.fx.GraphModule, constants_blob: str, blobs: dict[str, bytes]) -> dict[str, Any]:
    """The description of ``gm``; its constants go to ``blobs[constants_blob]``, its subgraphs' to blobs of
    their own (NOTE [Subgraphs of control-flow operators])."""
    nodes: list[dict[str, Any]] = []
    constants: dict[str, torch.Tensor] = {}
    subgraphs: set[str] = set()  # written once; later get_attr nodes of the same module name it only
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            entry["target"] = str(node.target)
            if node.args:  # a default value
                entry["args"] = _encode(tuple(node.args))
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            entry["target"] = node.target
            if isinstance(value, torch.fx.GraphModule):
                if node.target not in subgraphs:
                    subgraphs.add(node.target)
                    entry["subgraph"] = _serialize_graph(value, f"{constants_blob}/{node.target}", blobs)
            elif isinstance(value, torch.Tensor):
                constants[node.target] = value.detach()
            else:
                raise GraphSerializationError(f"graph attribute {node.target!r} is a {type(value).__name__}; "
                                              "only tensor constants and subgraphs can be stored in the JSON "
                                              "graph form")
        elif node.op == "call_function":
            entry["target"] = target_name(node.target)
            entry["args"] = _encode(tuple(node.args))
            entry["kwargs"] = _encode(dict(node.kwargs))
        elif node.op == "output":
            entry["args"] = _encode(tuple(node.args))
        else:
            raise GraphSerializationError(f"graph node {node.name!r} is a {node.op!r}; the JSON graph form holds "
                                          "only placeholder, get_attr, call_function and output nodes")
        nodes.append(entry)
    if constants:
        buffer = io.BytesIO()
        # NOTE [constants blob]: clone so that views of a bigger storage do not drag the whole storage along.
        torch.save({name: tensor.clone() for name, tensor in constants.items()}, buffer)
        blobs[constants_blob] = buffer.getvalue()
    return {"format": GRAPH_FORMAT, "nodes": nodes, "constants": sorted(constants)}


def deserialize_graph(description: dict[str, Any], blobs: dict[str, bytes]) -> torch.fx.GraphModule:
    """Rebuild the GraphModule of :func:`serialize_graph`. :raises ArtifactError: malformed or unsafe content."""
    return _deserialize_graph(description, blobs, CONSTANTS_BLOB, depth=0)


# Subgraphs nest as deep as control flow does; a description deeper than this is not one aotcache wrote.
_MAX_SUBGRAPH_DEPTH = 32


def _deserialize_graph(description: dict[str, Any], blobs: dict[str, bytes], constants_blob: str,
                       depth: int) -> torch.fx.GraphModule:
    if depth > _MAX_SUBGRAPH_DEPTH:
        raise ArtifactError(f"stored graph nests subgraphs deeper than {_MAX_SUBGRAPH_DEPTH} levels")
    try:
        if int(description["format"]) != GRAPH_FORMAT:
            raise ArtifactError(f"stored graph has format {description['format']!r}, this aotcache reads "
                                f"{GRAPH_FORMAT}; recompile")
        node_entries = list(description["nodes"])
        constant_names = list(description.get("constants", []))
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"stored graph description is malformed: {exc}") from exc
    attributes: dict[str, Any] = {}
    if constant_names:
        try:
            loaded = torch.load(io.BytesIO(blobs[constants_blob]), weights_only=True)
        # (weights_only refuses bytes that are not a checkpoint with pickle.UnpicklingError, no RuntimeError)
        except (KeyError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise ArtifactError(f"stored graph constants cannot be read: {exc}") from exc
        if not isinstance(loaded, dict) or sorted(loaded) != sorted(constant_names):
            raise ArtifactError("stored graph constants do not match the graph's get_attr nodes")
        attributes.update(loaded)
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    try:
        for entry in node_entries:
            op, name = entry["op"], entry["name"]
            if op == "placeholder":
                default = _decode(entry["args"], nodes) if "args" in entry else ()
                node = graph.create_node("placeholder", entry["target"], default, name=name)
            elif op == "get_attr":
                target = str(entry["target"])
                if "subgraph" in entry:  # NOTE [Subgraphs of control-flow operators]
                    if target in attributes:
                        raise ArtifactError(f"stored graph defines attribute {target!r} twice")
                    attributes[target] = _deserialize_graph(entry["subgraph"], blobs,
                                                            f"{constants_blob}/{target}", depth + 1)
                elif target not in attributes:
                    raise ArtifactError(f"stored graph reads attribute {target!r}, which it does not hold")
                node = graph.create_node("get_attr", target, name=name)
            elif op == "call_function":
                node = graph.create_node("call_function", resolve_target(entry["target"]),
                                         _decode(entry["args"], nodes), _decode(entry["kwargs"], nodes), name=name)
            elif op == "output":
                (result,) = _decode(entry["args"], nodes)
                graph.output(result)
                continue
            else:
                raise ArtifactError(f"stored graph has a node of kind {op!r}")
            nodes[name] = node
    except ArtifactError:
        raise  # (a ValueError: said once, not wrapped again at each level of subgraphs)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"stored graph description is malformed: {exc}") from exc
    return torch.fx.GraphModule(attributes, graph)
