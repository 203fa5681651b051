"""The hot path of calls with keyword arguments and containers, such as a KV-cache decoding step (NOTE [Call hot path]).

NOTE [Call hot path]
A decoding step of transformers' ``generate`` calls the model with keyword arguments (ids, position ids, flags) and
a cache object, so it missed the hot path of NOTE [Hot path] (plain positional tensors only) and built everything
at every generated token: the pytree flattening and its ``TreeSpec``, the call context, the rank signature and the
dimension spec of automatic dynamic shapes, the signature, and the hashes of both keys (a ``TreeSpec`` holding a
cache object's context hashes in ~10 us). About two thirds of what aotcache added to a token.

The call hot path keeps, per (``extra``, positional count, keyword names in order), the calls seen most recently
as :class:`CallSignature` records, each with the runtime the full path selected for it. A later call matches a
record when

* its arguments have exactly the record's pytree structure: :class:`FlatPlan` walks them along the recorded
  ``TreeSpec`` (the same node types, the same contexts by ``==``, as ``TreeSpec`` equality compares them: another
  registered node such as a ``ModelOutput`` is flattened by its own registered function, so its context is built
  and compared as the full path builds it; a cache object is walked along its recorded context, NOTE [Checking a
  cache object against a recorded structure] in cache_objects.py), and no pytree node type was registered since;
* every leaf has the recorded type, and the non-tensor leaves (ints, bools, floats, strings, cache integers) the
  recorded signature (``argument_signature`` of the full path, under the record's dimension spec); a float the
  graph takes as a symbol is not NaN, infinite or zero (the full path keeps those constants);
* the tensors pass the record's :class:`~aotcache.aot.hot_path.HotSignature`, built with the record's dimension
  spec: grad mode, autocast, numerics flags and active modes, dtype, device, requires_grad, leafness, sizes
  outside the dynamic dimensions, strides and storage offsets where the signature compares them, memory sharing;
  and none is sparse, nested or a torch.func transform's tensor, none of the user's carries Python attributes
  (what the full path refuses or keys separately: such calls take the full path);

and then, as on the full path, the runtime's guards decide. The program guards and the module's state are
checked before, as for every call. A record's dimension spec may be older than the marks of automatic dynamic
shapes (NOTE [Dynamic dimensions]): a call matching it differs from the recorded call only in dimensions the spec
made symbols, so it marks nothing new, and the record's graph, whose guards hold, computes what eager does (the
full path may select a graph traced later, as the plain hot path may). Fallbacks (eager, Dynamo) and graphs used
for their call only are never recorded.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.cache_objects import CacheInt, flattened_here, steps_hold, structure_step
from aotcache.aot.dynamic_dims import float_stays_constant
from aotcache.aot.hot_path import HotSignature, taker
from aotcache.aot.runtime import CompiledRuntime
from aotcache.aot.signature import (argument_signature, dict_context_keys, dict_key_types,
                                    user_arguments_carry_attributes)

__all__ = ["CallSignature", "CallSignatures", "FlatPlan", "call_key"]

_MAX_PER_KEY = 8
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_CONSTANT_TYPES = (bool, int, float, str, CacheInt)
_NONE = type(None)
_UNSEEN = object()
_LAYOUT = operator.attrgetter("layout")
_NESTED = operator.attrgetter("is_nested")
_OFFSET = operator.methodcaller("storage_offset")
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

# one ``step(value, out) -> bool`` per node of a TreeSpec: checks the node, appends its leaves to ``out``
Step = Callable[[Any, list], bool]


def call_key(extra: Any, args: tuple, kwargs: dict) -> tuple:
    """What selects the records a call is compared with: ``extra``, the positional count, the keyword names."""
    return (extra, len(args), tuple(kwargs))


def _nodes_tag() -> int:
    """Changes when a pytree node type is registered (which turns a leaf type into a node, or back)."""
    return len(pytree.SUPPORTED_NODES)


def _leaf(value: Any, out: list) -> bool:
    out.append(value)
    return True


def _compile(spec: pytree.TreeSpec) -> Step | None:
    """The step of ``spec``'s root, or None for a node type the plan does not handle (namedtuples, structseqs)."""
    if spec.is_leaf():
        return _leaf
    node_type, context = spec.type, spec.context
    children = [_compile(child) for child in spec.children()]
    if any(child is None for child in children):
        return None
    count = len(children)
    leaves_only = all(child is _leaf for child in children)
    if node_type is _NONE:
        return lambda value, out: value is None
    if node_type is tuple or node_type is list:
        if leaves_only:
            def sequence_of_leaves(value: Any, out: list) -> bool:
                if type(value) is not node_type or len(value) != count:
                    return False
                out.extend(value)
                return True
            return sequence_of_leaves

        def sequence(value: Any, out: list) -> bool:
            if type(value) is not node_type or len(value) != count:
                return False
            return steps_hold(children, value, out)
        return sequence
    # NOTE [Dict keys equal across types] (signature.py): keys compared with their types where one is not a str
    keys = dict_context_keys(node_type, context)
    key_types = list(map(type, keys)) if keys and any(type(key) is not str for key in keys) else None
    if node_type is dict:
        keys = list(context)

        def mapping(value: Any, out: list) -> bool:
            if type(value) is not dict or list(value) != keys:  # keys in order, as the dict spec's context
                return False
            if key_types is not None and list(map(type, value)) != key_types:
                return False
            if leaves_only:
                out.extend(value.values())
                return True
            return steps_hold(children, value.values(), out)
        return mapping
    if not isinstance(node_type, type) or node_type not in pytree.SUPPORTED_NODES:
        return None  # namedtuple / structseq nodes (by kind, not by type): the full path
    if flattened_here(node_type) and leaves_only:  # NOTE [Checking a cache object against a recorded structure]
        return structure_step(context)
    flatten = pytree.SUPPORTED_NODES[node_type].flatten_fn

    def registered(value: Any, out: list) -> bool:  # a ModelOutput: its own flatten function, its context compared
        if type(value) is not node_type:
            return False
        items, found = flatten(value)
        if len(items) != count or found != context:
            return False
        if key_types is not None and list(map(type, value)) != key_types:
            return False
        return steps_hold(children, items, out)
    return registered


class FlatPlan:
    """One ``TreeSpec`` compiled into checks: ``plan(tree)`` is its leaves when ``tree`` has exactly that
    structure (see NOTE [Call hot path]), else None."""

    __slots__ = ("spec", "_root")

    def __init__(self, spec: pytree.TreeSpec, root: Step) -> None:
        self.spec = spec
        self._root = root

    @classmethod
    def of(cls, spec: pytree.TreeSpec) -> FlatPlan | None:
        root = _compile(spec)
        return None if root is None else cls(spec, root)

    def __call__(self, tree: Any) -> list | None:
        out: list = []
        return out if self._root(tree, out) else None


class CallSignature:
    """One seen call of some structure and the runtime the full path selected for it (NOTE [Call hot path])."""

    __slots__ = ("plan", "runtime", "_types", "_nodes", "_constants", "_constant_signatures", "_take_tensors",
                 "_tensor_count", "_hot", "_num_state", "_take_graph_args", "_guards", "_full_guards",
                 "_take_pinned", "_pinned_offsets", "_symbolic_floats")

    def __init__(self, plan: FlatPlan, flat_args: list, runtime: Any, num_state: int, services: Any) -> None:
        dynamic = getattr(runtime, "dynamic_spec", False)
        self.plan = plan
        self.runtime = runtime
        self._types = list(map(type, flat_args))
        self._nodes = _nodes_tag()
        tensors = [index for index, kind in enumerate(self._types) if kind in _TENSOR_TYPES]
        self._constants = [index for index, kind in enumerate(self._types) if kind not in _TENSOR_TYPES]
        self._constant_signatures = [argument_signature(flat_args[index], _dims(dynamic, index))
                                     for index in self._constants]
        # floats the graph takes as symbols: NaN, the infinities and the zeros never reach such a graph on the full
        # path (NOTE [Float arguments]: they stay constants, a graph each), so they leave this record too
        self._symbolic_floats = [index for index in self._constants
                                 if self._types[index] is float and _dims(dynamic, index)]
        self._take_tensors = taker(tensors)
        self._tensor_count = len(tensors)
        tensor_dynamic = tuple(map(dynamic.__getitem__, tensors)) if isinstance(dynamic, tuple) else dynamic
        self._hot = HotSignature(list(self._take_tensors(flat_args)), tensor_dynamic, runtime)
        self._num_state = num_state
        self._guards_for(flat_args, dynamic, services)

    def _guards_for(self, flat_args: list, dynamic: Any, services: Any) -> None:
        """The runtime's guards as this record checks them: only the conjuncts that read an input whose reads
        :meth:`matches` does not pin (NOTE [Guards left to check when inputs are pinned] in
        autograd_cache/guards.py), else the whole guards."""
        runtime = self.runtime
        positions = list(runtime.metadata.graph_input_positions)
        self._take_graph_args = taker(positions)
        self._guards: Callable[[Sequence[Any]], bool] | None = None
        self._full_guards = runtime.metadata.guards is not None
        self._take_pinned, self._pinned_offsets = None, None
        if not self._full_guards:
            return
        # static graph inputs: a tensor's sizes and strides are compared by its HotSignature, its storage offset
        # here; a constant's value by its signature
        pinned = [graph_index for graph_index, position in enumerate(positions) if not _dims(dynamic, position)
                  and type(flat_args[position]) in (*_TENSOR_TYPES, *_CONSTANT_TYPES)]
        pinned_tensors = [positions[graph_index] for graph_index in pinned
                          if type(flat_args[positions[graph_index]]) in _TENSOR_TYPES]
        pinned_guards = getattr(services, "pinned_guards", None)  # (services of an older interface: none)
        check = pinned_guards(runtime, frozenset(pinned)) if pinned_guards is not None else None
        # the residual is sound only where the recorded call itself passed the whole guards
        if check is None or not services.guards_hold(runtime, self._take_graph_args(flat_args)):
            return
        self._guards, self._full_guards = check, False
        if pinned_tensors and not self._hot.pin_offsets():  # (the HotSignature compares them, or this record)
            self._take_pinned = taker(pinned_tensors)
            self._pinned_offsets = list(map(_OFFSET, self._take_pinned(flat_args)))

    def guards_hold(self, flat_args: list, full_check: Callable[[Any, list], bool]) -> bool:
        """Whether the runtime's guards admit the call (its ``flat_args`` matched this record):
        ``full_check(runtime, flat_args)`` where the record checks the whole guards."""
        if self._guards is not None:
            return self._guards(self._take_graph_args(flat_args))
        return not self._full_guards or full_check(self.runtime, flat_args)

    @staticmethod
    def recordable(flat_args: list, runtime: Any) -> bool:
        """Whether a call's leaves are plain tensors (strided, not meta, no Python attributes: the caller checked)
        and plain constants, and its runtime a graph kept for reuse."""
        if not isinstance(runtime, CompiledRuntime) or getattr(runtime, "single_use", False):
            return False  # fallbacks run the caller's own containers; NOTE [State changed by a capture]
        for arg in flat_args:
            kind = type(arg)
            if kind in _TENSOR_TYPES:
                if (arg.layout != torch.strided or arg.is_meta or arg.is_nested or _wrapped(arg) or arg.is_conj()
                        or arg.is_neg()):  # (conj / neg views: NOTE [View bits] in signature.py)
                    return False
            elif kind not in _CONSTANT_TYPES:
                return False
        return True

    def matches(self, flat_args: list) -> bool:
        """Whether the call with these leaves (flattened by this record's plan) has this record's signature."""
        if list(map(type, flat_args)) != self._types or _nodes_tag() != self._nodes:
            return False
        dynamic = getattr(self.runtime, "dynamic_spec", False)
        for index, expected in zip(self._constants, self._constant_signatures):
            if argument_signature(flat_args[index], _dims(dynamic, index)) != expected:
                return False
        for index in self._symbolic_floats:
            if float_stays_constant(flat_args[index]):
                return False
        if user_arguments_carry_attributes(flat_args, self._num_state):  # NOTE [Python attributes of tensor
            return False  # arguments]: the full path keys them
        tensors = self._take_tensors(flat_args)
        if self._take_pinned is not None and list(map(_OFFSET, self._take_pinned(flat_args))) != self._pinned_offsets:
            return False  # a storage offset the pinned guards read (NOTE [Guards left to check when inputs are pinned])
        try:
            # what the full path refuses (NOTE [Call hot path]); the layouts only where the signature's C check does
            # not compare them itself (NOTE [Tensor metadata checked in C])
            if any(map(_wrapped, tensors)) or not self._hot.checks_layouts() and (
                    list(map(_LAYOUT, tensors)).count(torch.strided) != self._tensor_count
                    or any(map(_NESTED, tensors))):
                return False
            return self._hot.matches(tensors)
        except RuntimeError:  # a tensor without sizes or strides: the full path names it
            return False


def _dims(dynamic: Any, index: int) -> Any:
    return dynamic[index] if isinstance(dynamic, tuple) else dynamic


class CallSignatures:
    """Per :func:`call_key`, the call records seen most recently (at most a few each); one per program digest."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, list[CallSignature]] = {}
        self._plans: dict[Any, FlatPlan | None] = {}  # per TreeSpec (None: a structure the plan cannot follow)

    def find(self, key: tuple, tree: Any, full_check: Callable[[Any, list], bool]) -> tuple[CallSignature, list] | None:
        """The first record (newest first) the call ``tree`` (``(args, kwargs)``) matches and whose runtime's guards
        admit it (``full_check``: as :meth:`CallSignature.guards_hold`), and the call's flat arguments; or None."""
        records = self._by_key.get(key)
        if not records:
            return None
        plan, flat = None, None
        for record in records:
            if record.plan is not plan:
                plan = record.plan
                flat = plan(tree)
            # a graph with dynamic dimensions whose guards refuse the call (a size 1 specialized) is not the end:
            # an older record (the static graph of that size) may serve it
            if flat is not None and record.matches(flat) and record.guards_hold(flat, full_check):
                return record, flat
        return None

    def remember(self, key: tuple, in_spec: Any, flat_args: list, runtime: Any, num_state: int, services: Any
                 ) -> None:
        """Record a call the full path served with ``runtime`` (a call of a structure the plan cannot follow, or
        with leaves it does not take, is not recorded)."""
        if not CallSignature.recordable(flat_args, runtime):
            return
        plan_key = (in_spec, dict_key_types(in_spec))  # equal specs may differ in their keys' types
        plan = self._plans.get(plan_key, _UNSEEN)
        if plan is _UNSEEN:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[plan_key] = FlatPlan.of(in_spec)
        if plan is None:
            return
        record = CallSignature(plan, flat_args, runtime, num_state, services)
        seen = [old for old in self._by_key.get(key, ())  # the same call and graph recorded before: replaced
                if old.runtime is not runtime or old.plan is not plan or not old.matches(flat_args)]
        seen.insert(0, record)
        if len(self._by_key) >= 64 and key not in self._by_key:
            self._by_key.clear()
        self._by_key[key] = seen[:_MAX_PER_KEY]  # one assignment: readers need no lock
