"""Runtime metadata of a captured function: everything the runtime needs besides the compiled graphs.

It is produced by :mod:`aotcache.aot.capture`, completed by the partition step (number of saved values) and
consumed by :mod:`aotcache.aot.runtime`. It is plain data that round-trips through JSON (``to_json`` /
``from_json``), so the compiled-graph cache can store it next to the compiler artifacts and rebuild a runnable
function in a fresh process without re-tracing.

NOTE [Forward output layout]
The compiled forward returns, in order:
  1. the updated values of data-mutated graph inputs (``mutated_inputs``), applied to the real inputs by
     the runtime's mutation epilogue;
  2. the user outputs that the graph computes (``OutputInfo.kind == "graph"``), tensors or SymInts;
  3. extra SymInts the runtime needs to regenerate views of inputs (``ViewEntry`` references them);
  4. the final effect tokens (see NOTE [Effect tokens] in :mod:`aotcache.aot.functional_trace`), ignored by the runtime;
then, for training graphs only, the values saved for backward (``num_saved``).

NOTE [Output structure]
The user's output structure is stored as aotcache's own JSON tree (:func:`encode_output_structure`), not
``treespec_dumps``: pytree cannot serialize ``torch.return_types`` structseqs, turns ``torch.Size`` back into a
plain tuple, and its generic deserializer may import modules named by the data. Loading never imports or
executes anything named by the data: ``torch.return_types`` structseqs are looked up by name in
``torch.return_types`` only; user namedtuples in modules that are already imported (``sys.modules``), checked
against their recorded fields; other pytree node types only if this process registered them under their
recorded serialization name. An output type that cannot be resolved that way is refused at capture.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.keyed_nodes import in_recorded_key_order, keyed_node
from aotcache.aot.object_outputs import ObjectOutput, rebuild_object, template_type_name

__all__ = ["METADATA_VERSION", "InputInfo", "OutputInfo", "RuntimeMetadata", "SizeEntry", "OutputStructure",
           "UnsupportedOutputError", "encode_output_structure", "object_output_types"]

# 2: out_spec is aotcache's output-structure JSON (NOTE [Output structure]), no longer treespec_dumps
# 3: InputInfo.metadata_mutation
# 5: RuntimeMetadata.grad_tangents
# 6: OutputInfo.grad_free_leaf
# 7: OutputInfo.no_grad_view, RuntimeMetadata.inputs_without_gradient
METADATA_VERSION = 7

# A size/stride/offset entry of a regenerated view: a constant int, or {"extra": j} meaning "the j-th extra
# SymInt output of the forward graph" (symbolic shapes).
SizeEntry = Union[int, dict]

_JSON_SCALARS = (bool, int, float, str, type(None))


@dataclasses.dataclass
class InputInfo:
    """One graph input (primal): whether its data is mutated, and its autograd status at trace time."""

    is_tensor: bool = True
    requires_grad: bool = False
    mutates_data: bool = False
    # whether the updated value (after the function ran) requires grad; decides whether the epilogue's copy_
    # is recorded by autograd
    mutation_requires_grad: bool = False
    # [size, stride, storage_offset] the input has after the function ran, when the function changed them in
    # place (t_(), unsqueeze_(), ...); the runtime replays it with as_strided_ (NOTE [Metadata mutations])
    metadata_mutation: list | None = None


@dataclasses.dataclass
class OutputInfo:
    """One flat user output and how the runtime produces it.

    kinds:
      ``graph``          -- the ``index``-th user output of the compiled forward (tensor or SymInt)
      ``input``          -- the real graph input ``input_index`` itself (``return x``)
      ``alias_of_input`` -- a view of real input ``input_index``, regenerated with as_strided(size, stride, offset)
      ``alias_of_output``-- a view of flat user output ``base_output``, regenerated with as_strided when the
                            base's runtime layout matches the traced one, else the graph value ``index``
      ``constant``       -- a Python constant ``value`` (int, float, bool, str, None)
    """

    kind: str
    index: int = -1
    input_index: int = -1
    base_output: int = -1
    size: list = dataclasses.field(default_factory=list)
    stride: list = dataclasses.field(default_factory=list)
    storage_offset: SizeEntry = 0
    base_size: list = dataclasses.field(default_factory=list)
    base_stride: list = dataclasses.field(default_factory=list)
    requires_grad: bool = False
    value: Any = None
    # a ``graph`` output that requires grad without history (a view made under no_grad), returned as its own
    # autograd leaf: NOTE [Views made under no_grad] in capture.py
    grad_free_leaf: bool = False
    # an ``alias_of_input`` that eager made with a multi-output view op (``unbind``, ``split``, ``chunk``): the
    # regenerated view is marked as one, so that autograd refuses the same in-place changes eager refuses
    multi_output_view: bool = False
    # an ``alias_of_input`` / ``alias_of_output`` that eager made under no_grad: regenerated under no_grad, so
    # that its autograd status is eager's (NOTE [Views of inputs made under no_grad] in runtime.py)
    no_grad_view: bool = False


@dataclasses.dataclass
class RuntimeMetadata:
    """Plain-data description of a captured function's inputs, outputs and forward/backward interface."""

    is_inference: bool
    # positions in the flat argument list that are graph inputs (the rest were constants baked into the trace)
    graph_input_positions: list
    inputs: list  # list[InputInfo], one per graph input
    outputs: list  # list[OutputInfo], one per flat user output
    out_spec: dict  # the user output structure, see NOTE [Output structure]
    num_graph_user_outputs: int
    num_extra_outputs: int
    # indices into the forward outputs (first num_fwd_outputs) that are differentiable: one tangent each
    tangent_indices: list = dataclasses.field(default_factory=list)
    # per tangent: {"stride": [...]} or {"memory_format": "contiguous_format" | "channels_last" | ...}, the layout
    # the backward was traced for; incoming gradients are coerced to it (NOTE [Tangent strides] in runtime)
    tangent_layouts: list = dataclasses.field(default_factory=list)
    # per graph input: whether the backward produces a gradient for it
    grad_inputs: list = dataclasses.field(default_factory=list)
    # per graph input: the tangents (positions in tangent_indices) its gradient reads; with none of them
    # computed by autograd it gets None, as in eager (NOTE [Gradients of unused outputs] in runtime)
    grad_tangents: list = dataclasses.field(default_factory=list)
    # graph inputs that require grad but get no gradient (the function detached them): passed to the autograd
    # function detached (NOTE [Inputs the backward does not reach] in runtime)
    inputs_without_gradient: list = dataclasses.field(default_factory=list)
    num_saved: int = 0
    # symbolic-shape guard expression over the graph inputs (None: static shapes or no guards)
    guards: str | None = None
    # whether the graph may depend on the inputs' storage offsets (entries written before the flag: True)
    offsets_matter: bool = True
    version: int = METADATA_VERSION

    @property
    def mutated_inputs(self) -> list[int]:
        """Graph input indices whose data the function mutates, in input order."""
        return [index for index, info in enumerate(self.inputs) if info.mutates_data]

    @property
    def num_mutation_outputs(self) -> int:
        return len(self.mutated_inputs)

    @property
    def num_fwd_outputs(self) -> int:
        """Number of forward outputs before the saved values (see NOTE [Forward output layout])."""
        return self.num_mutation_outputs + self.num_graph_user_outputs + self.num_extra_outputs

    @property
    def first_extra_output(self) -> int:
        return self.num_mutation_outputs + self.num_graph_user_outputs

    def to_json(self) -> dict:
        """A dict of JSON scalars, lists and dicts only (``json.dumps`` accepts it)."""
        data = dataclasses.asdict(self)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RuntimeMetadata:
        """Rebuild from :meth:`to_json` output.

        :raises ValueError: the data was written by an incompatible metadata version.
        """
        if data.get("version") != METADATA_VERSION:
            raise ValueError(f"aotcache runtime metadata version {data.get('version')!r} is not supported "
                             f"(expected {METADATA_VERSION}); the entry must be recompiled")
        fields = dict(data)
        fields["inputs"] = [InputInfo(**item) for item in data["inputs"]]
        fields["outputs"] = [OutputInfo(**item) for item in data["outputs"]]
        return cls(**fields)


def object_output_types(out_spec: dict) -> list[str]:
    """The type names of the object outputs (NOTE [Object outputs]) in an output structure; [] if none."""
    found: list[str] = []
    stack = [out_spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "object":
            found.append(template_type_name(str(node.get("token"))) or "object")
        stack.extend(node.get("children", []))
    return sorted(set(found))


def check_json_constant(value: Any, where: str) -> Any:
    """Return ``value`` if it can be stored as a JSON constant, else raise a clear TypeError."""
    if isinstance(value, _JSON_SCALARS):
        return value
    raise TypeError(f"aotcache: {where} is a {type(value).__name__} ({value!r}); only tensors, SymInts and "
                    "int/float/bool/str/None constants are supported as outputs of a captured function")


# ----------------------------------------------------------------------------------------------------------
# Output structure (NOTE [Output structure])
# ----------------------------------------------------------------------------------------------------------


class UnsupportedOutputError(TypeError):
    """An output container whose type could not be rebuilt safely in another process; the message names it."""


# default_factory values of a defaultdict output that are rebuilt by name (no other callable is stored)
_DEFAULT_FACTORIES: dict[str, Callable] = {f.__name__: f for f in (list, dict, set, tuple, int, float, str, bool)}

_SUGGESTION = "return a tuple or a dict instead (or convert the value outside the compiled function)"


def _is_structseq_class(cls: Any) -> bool:
    check = getattr(pytree, "is_structseq_class", None)  # torch >= 2.5; the same test otherwise
    if check is not None:
        return bool(check(cls))
    return (isinstance(cls, type) and cls.__bases__ == (tuple,) and isinstance(getattr(cls, "n_fields", None), int)
            and isinstance(getattr(cls, "n_sequence_fields", None), int))


def _is_namedtuple_class(cls: Any) -> bool:
    return (isinstance(cls, type) and issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)
            and callable(getattr(cls, "_make", None)))


def _children(spec: Any) -> list:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _json_key(key: Any, where: str) -> Any:
    if key is None or isinstance(key, (str, bool, int)) or (isinstance(key, float) and math.isfinite(key)):
        return key
    raise UnsupportedOutputError(f"aotcache: {where} has a key of type {type(key).__name__} ({key!r}); only str, "
                                 f"int, float, bool and None keys can be stored. Use string keys.")


def _resolve_namedtuple(module: str, qualname: str) -> Any:
    """The namedtuple class ``module.qualname`` if its module is already imported (never imports), else None."""
    owner = sys.modules.get(module)
    if owner is None or "<locals>" in qualname:
        return None
    for part in qualname.split("."):
        owner = vars(owner).get(part) if hasattr(owner, "__dict__") else None  # no __getattr__ hooks run
        if owner is None:
            return None
    return owner if isinstance(owner, type) and _is_namedtuple_class(owner) else None


def _resolve_return_type(name: str) -> Any:
    cls = getattr(torch.return_types, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and _is_structseq_class(cls) else None


def encode_output_structure(spec: Any, where: str = "output") -> dict:
    """The JSON form of a pytree ``TreeSpec`` of user outputs (NOTE [Output structure]).

    :raises UnsupportedOutputError: a container type that could not be rebuilt safely when loading (a
        namedtuple defined inside a function, an unregistered structseq, a dict key that is not a JSON scalar).
    """
    if spec.is_leaf():
        return {"type": "leaf"}
    node_type, context = spec.type, spec.context
    children = [encode_output_structure(child, f"{where}[{i}]") for i, child in enumerate(_children(spec))]
    if node_type in (tuple, list):
        return {"type": node_type.__name__, "children": children}
    if node_type is type(None):
        return {"type": "none"}
    if node_type is torch.Size:
        return {"type": "size", "children": children}
    if node_type in (dict, collections.OrderedDict):
        keys = [_json_key(key, where) for key in context]
        return {"type": "dict" if node_type is dict else "ordereddict", "keys": keys, "children": children}
    if node_type is collections.defaultdict:
        factory, keys = context
        name = getattr(factory, "__name__", None)
        if factory is not None and _DEFAULT_FACTORIES.get(name) is not factory:
            raise UnsupportedOutputError(f"aotcache: {where} is a defaultdict with default_factory {factory!r}; only "
                                         f"builtin factories ({', '.join(_DEFAULT_FACTORIES)}) can be stored: "
                                         f"{_SUGGESTION}")
        return {"type": "defaultdict", "factory": name if factory is not None else None,
                "keys": [_json_key(key, where) for key in keys], "children": children}
    if node_type is collections.deque:
        return {"type": "deque", "maxlen": context, "children": children}
    if node_type is collections.namedtuple:  # pytree's node type for every namedtuple class; context = the class
        module, qualname = context.__module__, context.__qualname__
        if _resolve_namedtuple(module, qualname) is not context:
            raise UnsupportedOutputError(
                f"aotcache: {where} is a {module}.{qualname} namedtuple, which cannot be rebuilt when a compiled "
                f"function is loaded (only namedtuples defined at module level, or nested in a module-level "
                f"class, are looked up by name): define it at module level, or {_SUGGESTION}")
        return {"type": "namedtuple", "module": module, "qualname": qualname, "fields": list(context._fields),
                "children": children}
    if node_type is ObjectOutput:  # NOTE [Object outputs]: an in-process template, refused by the cache
        return {"type": "object", "token": context, "children": children}
    if _is_structseq_class(node_type):
        if _resolve_return_type(node_type.__name__) is not node_type:
            raise UnsupportedOutputError(f"aotcache: {where} is a {node_type.__module__}.{node_type.__qualname__} "
                                         f"structseq outside torch.return_types, which cannot be stored: {_SUGGESTION}")
        return {"type": "return_types", "name": node_type.__name__, "children": children}
    return _encode_registered_node(node_type, context, children, where)


def _encode_registered_node(node_type: type, context: Any, children: list, where: str) -> dict:
    """Any other pytree node type: stored under the serialization name it was registered with."""
    serialize_def = getattr(pytree, "SUPPORTED_SERIALIZED_TYPES", {}).get(node_type)
    name = getattr(serialize_def, "serialized_type_name", None)
    if not name or name == getattr(pytree, "NO_SERIALIZED_TYPE_NAME_FOUND", None):
        raise UnsupportedOutputError(f"aotcache: {where} is a {node_type.__module__}.{node_type.__qualname__}, a "
                                     f"pytree node registered without a serialized_type_name, so it cannot be "
                                     f"stored: register it with serialized_type_name=..., or {_SUGGESTION}")
    to_dumpable = getattr(serialize_def, "to_dumpable_context", None)
    dumpable = to_dumpable(context) if to_dumpable is not None else context
    try:
        dumpable = json.loads(json.dumps(dumpable))
    except (TypeError, ValueError) as exc:
        raise UnsupportedOutputError(f"aotcache: {where} is a {name} whose pytree context ({context!r}) is not "
                                     f"plain JSON: {_SUGGESTION}") from exc
    return {"type": "registered", "name": name, "context": dumpable, "children": children}


class OutputStructure:
    """The user output structure of :func:`encode_output_structure`, with its types resolved for rebuilding.

    :raises ValueError: (construction) malformed data, or a type that this process cannot resolve without
        importing anything (e.g. the module defining a namedtuple output is not imported yet).
    """

    def __init__(self, data: dict) -> None:
        self.data = data
        self._build = self._compile(data)

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The output value built from the flat ``leaves`` (pytree order)."""
        iterator = iter(leaves)
        value = self._build(iterator)
        if next(iterator, iterator) is not iterator:
            raise ValueError("aotcache: more flat outputs than the recorded output structure holds")
        return value

    def _compile(self, node: Any) -> Callable[[Iterator], Any]:
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise ValueError(f"aotcache: malformed output structure node {node!r}")
        kind = node["type"]
        if kind == "leaf":
            return next
        if kind == "none":
            return lambda leaves: None
        parts = [self._compile(child) for child in node.get("children", [])]

        def items(leaves: Iterator) -> list:
            return [part(leaves) for part in parts]

        if kind in ("tuple", "list", "size", "return_types", "namedtuple", "deque"):
            make = self._sequence_type(node)
            return lambda leaves: make(items(leaves))
        if kind in ("dict", "ordereddict", "defaultdict"):
            keys = list(node.get("keys", []))
            if len(keys) != len(parts):
                raise ValueError("aotcache: malformed output structure (dict keys and values differ in number)")
            if kind == "defaultdict":
                factory_name = node.get("factory")
                if factory_name is not None and factory_name not in _DEFAULT_FACTORIES:
                    raise ValueError(f"aotcache: output structure names unknown defaultdict factory {factory_name!r}")
                factory = _DEFAULT_FACTORIES.get(factory_name) if factory_name is not None else None
                return lambda leaves: collections.defaultdict(factory, zip(keys, items(leaves)))
            mapping = dict if kind == "dict" else collections.OrderedDict
            return lambda leaves: mapping(zip(keys, items(leaves)))
        if kind == "registered":
            return self._registered(node, items)
        if kind == "object":
            token = str(node.get("token"))
            if template_type_name(token) is None:
                raise ValueError(f"aotcache: output structure names object template {token!r}, which this process "
                                 f"does not hold (object outputs are not stored across processes)")
            return lambda leaves: rebuild_object(token, items(leaves))
        raise ValueError(f"aotcache: output structure has unknown node type {kind!r}")

    @staticmethod
    def _sequence_type(node: dict) -> Callable[[list], Any]:
        kind = node["type"]
        if kind in ("tuple", "list"):
            return tuple if kind == "tuple" else list
        if kind == "size":
            return torch.Size
        if kind == "deque":
            maxlen = node.get("maxlen")
            return lambda values: collections.deque(values, maxlen=maxlen)
        if kind == "return_types":
            cls = _resolve_return_type(str(node.get("name")))
            if cls is None:
                raise ValueError(f"aotcache: output type torch.return_types.{node.get('name')} does not exist in "
                                 f"this torch build")
            return cls
        cls = _resolve_namedtuple(str(node.get("module")), str(node.get("qualname")))
        if cls is None or list(cls._fields) != list(node.get("fields", [])):
            raise ValueError(f"aotcache: output namedtuple {node.get('module')}.{node.get('qualname')} with fields "
                             f"{node.get('fields')} is not defined in an imported module of this process (it is "
                             f"never imported on load); import its module before loading")
        return lambda values: cls(*values)

    @staticmethod
    def _registered(node: dict, items: Callable[[Iterator], list]) -> Callable[[Iterator], Any]:
        name = node.get("name")
        node_type = getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {}).get(name)
        node_def = pytree.SUPPORTED_NODES.get(node_type) if node_type is not None else None
        if node_def is None:
            raise ValueError(f"aotcache: output type {name!r} is not a pytree node registered in this process "
                             f"(it is never imported on load); import the library that registers it first")
        from_dumpable = getattr(pytree.SUPPORTED_SERIALIZED_TYPES.get(node_type), "from_dumpable_context", None)
        context = from_dumpable(node.get("context")) if from_dumpable is not None else node.get("context")
        if keyed_node(node_type, context):  # NOTE [Keyed pytree nodes in their own key order]
            return lambda leaves: in_recorded_key_order(node_def.unflatten_fn(items(leaves), context), context)
        return lambda leaves: node_def.unflatten_fn(items(leaves), context)
