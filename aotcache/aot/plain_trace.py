"""A symbolic trace without functionalization, for functions that mutate nothing.

NOTE [Symbolic trace without functionalization]
Functionalization exists to turn mutations into functional ops; views stay views in the graph either way. A graph
recorded without it that holds no mutating op computes what the functionalized one computes, and is mostly the same
graph (BERT and GPT-2 training steps: the same nodes and guards; functionalization also decomposes a fused kernel
that has a Python decomposition, such as binary_cross_entropy_with_logits, which is otherwise recorded as eager runs
it). With symbolic sizes it is also a fifth of a
capture's cost: every functional wrapper tensor computes its storage size and contiguity with symbols, and every op
is dispatched twice (2-layer BERT training step, CPU s of the first dynamic call: 0.90 -> 0.68; GPT-2 0.94 ->
0.71; a static capture takes 0.25).

So a symbolic capture first traces without functionalization when its static-probe analysis (NOTE [Analysis
without symbols] in capture.py) saw no input mutated, no metadata mutation, no side-effectful op and no in-place
call (:class:`SpotInPlaceCalls`, a torch-function mode: a prediction only, which spares a trace that would stop).
That trace runs under :class:`StopAtUnfunctionalizableOps`, a dispatch mode that stops it at the first op that
would need functionalization -- one whose schema mutates an argument (in-place, out=, resize_, set_; except a
write into a temporary, NOTE [In-place ops on temporaries]), a higher-order op (its subgraphs have functionalization
rules of their own), a side-effectful op (an effect token keeps it alive) -- and the finished graph is checked for
the same ops once more. Where it stops, or fails in any
other way, the capture traces again with functionalization, as before: the forward then runs once more, like any
retrace. Static captures keep functionalization throughout (a static wrapper's arithmetic is cheap), and so do
captures with a caller's symbols (Dynamo's) and the retrace after an analysis mismatch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class NeedsFunctionalization(Exception):
    """The trace without functionalization met an op it cannot record as it is."""


@functools.lru_cache(maxsize=None)
def can_trace_without_functionalization() -> bool:
    """Whether this torch has what the trace without functionalization relies on (private APIs)."""
    try:
        from torch._higher_order_ops.effects import has_effects  # noqa: F401
    except ImportError:
        return False
    return hasattr(TorchDispatchMode, "supports_higher_order_operators")


@functools.lru_cache(maxsize=None)
def unfunctionalizable_op(func: Any) -> str | None:
    """Why ``func`` needs functionalization: it mutates an argument, is a higher-order op or is registered as
    side-effectful; None if it needs none. Cached per op for one trace: each plain trace starts with an empty
    cache, so an effect registered after an op was first traced is seen by the next trace."""
    return _why_unfunctionalizable(func)


def _why_unfunctionalizable(func: Any) -> str | None:
    from torch._higher_order_ops.effects import has_effects

    if isinstance(func, torch._ops.HigherOrderOperator):
        return f"higher-order op {func.name()}"
    schema = getattr(func, "_schema", None)
    if schema is None or schema.is_mutable:
        return f"op {func} mutates an argument"
    if has_effects(func):
        return f"op {func} is side-effectful"
    return None


def plain_trace_applies(analysis: Any, fake_args: Sequence[Any], fake_mode: Any) -> bool:
    """Whether a capture may first trace without functionalization: symbolic, nothing in place seen by its
    analysis (capture.py's ``Analysis``), plain fake tensors that do not share memory with gradients."""
    if (fake_mode.shape_env is None or analysis.needs_functionalization is not None or analysis.effects
            or analysis.shape_sensitive):
        return False
    if any(info.mutates_data or info.metadata_mutation is not None for info in analysis.inputs):
        return False
    tensors = [a for a in fake_args if isinstance(a, torch.Tensor)]
    if any(type(a) is not FakeTensor or a.grad_fn is not None for a in tensors):
        return False
    # NOTE [Arguments that share memory, traced without functionalization]: functionalization wraps each argument
    # slot in a tensor of its own, so autograd gives each slot its own gradient; one fake tensor in two slots (the
    # same tensor passed twice, a module's parameter also passed as an argument) would get the sum in both, and
    # views of one storage would be related through autograd. Such calls keep functionalization where a tensor
    # that shares memory with another requires grad; without gradients (``labels=input_ids``, the usual causal LM
    # training call) nothing tells the slots apart, as nothing writes to them.
    sharing: dict = {}
    for a in tensors:
        sharing.setdefault(StorageWeakRef(a.untyped_storage()), []).append(a)
    if any(len(group) > 1 and any(a.requires_grad for a in group) for group in sharing.values()):
        return False
    return can_trace_without_functionalization()


def argument_states(fake_args: Sequence[Any]) -> list:
    """What a trace without functionalization could change in its fake arguments other than through an op: the
    retrace with functionalization runs on the same ones (inference tensors have no version counter)."""
    return [(a.requires_grad, StorageWeakRef(a.untyped_storage()), None if a.is_inference() else a._version,
             id(a.grad)) if isinstance(a, torch.Tensor) else None for a in fake_args]


class StopAtUnfunctionalizableOps(TorchDispatchMode):
    """Raises :class:`NeedsFunctionalization` at the first op that needs functionalization, before it runs; an
    in-place op on a temporary records its functional form instead (NOTE [In-place ops on temporaries]).

    A tracing mode like FunctionalTensorMode, so declared to Dynamo: torch.cond (and the other control-flow ops)
    runs its op through torch.compile in eager, and Dynamo skips, for the rest of the process, a function called
    under a user's dispatch mode; the retrace with functionalization then failed on that skipped wrapper (a
    RuntimeError where the functional trace gives its own outcome), as did later captures of torch.cond."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        unfunctionalizable_op.cache_clear()
        self._ops = 0
        self._backward_from: int | None = None
        # storage of each op output -> (tensors seen with it, op count when it was first seen)
        self._storages: dict = {}

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def backward_begins(self) -> None:
        """From here on, tensors made before are the forward's (the backward may unpack them: not temporaries)."""
        self._backward_from = self._ops

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._ops += 1
        reason = unfunctionalizable_op(func)
        if reason is not None:
            return self._in_place_on_temporary(func, reason, args, kwargs)
        out = func(*args, **kwargs)
        if func is torch.ops.aten.lift_fresh.default and type(out) is FakeTensor and type(args[0]) is FakeTensor:
            # eager returns its (traced) argument itself, make_fx records a copy (lift_fresh_copy): an alias of it
            self._storages[StorageWeakRef(out.untyped_storage())] = (_EXTERNAL, 0)
        if isinstance(out, torch.Tensor):
            self._note(out, args, kwargs)
        elif isinstance(out, (tuple, list)):
            for value in out:
                if isinstance(value, torch.Tensor):
                    self._note(value, args, kwargs)
        return out

    def _note(self, tensor: torch.Tensor, args: Any, kwargs: Mapping) -> None:
        key = StorageWeakRef(tensor.untyped_storage())
        entry = self._storages.get(key)
        if entry is None:
            # a storage first seen as an op's output is new, unless the op aliased an argument that no op of this
            # trace made (an input, a tangent: ``saved_input.detach()`` in a backward); such a storage is never a
            # temporary's
            arguments = _argument_storages(args, kwargs)
            entry = (_EXTERNAL, 0) if arguments is None or key in arguments else (0, self._ops)
        self._storages[key] = (entry[0] + 1, entry[1])

    def _in_place_on_temporary(self, func: Any, reason: str, args: Any, kwargs: Mapping) -> Any:
        functional = functional_variant(func)
        target = args[0] if args else None
        if functional is None or not self._is_temporary(target):
            raise NeedsFunctionalization(reason)
        result = functional(*args, **kwargs)  # below this mode: make_fx records it
        if not (isinstance(result, torch.Tensor) and _same_layout(result, target)):
            raise NeedsFunctionalization(f"{reason} (its functional form gives another layout)")
        if not _take_proxy(target, result):
            raise NeedsFunctionalization(f"{reason} (make_fx's tracer state is not reachable)")
        return target

    def _is_temporary(self, tensor: Any) -> bool:
        """A tensor an op of this trace made, of its own storage (no view, no other tensor seen with it, not an
        alias of an argument), without a fake constant, and made in the backward if the backward has begun."""
        if type(tensor) is not FakeTensor or tensor._is_view():
            return False
        if getattr(tensor, "constant", None) is not None:
            return False
        seen, first = self._storages.get(StorageWeakRef(tensor.untyped_storage()), (0, 0))
        return seen == 1 and (self._backward_from is None or first > self._backward_from)


_EXTERNAL = 2  # the count of tensors seen with a storage no op of the trace made: never a temporary's


def _argument_storages(args: Any, kwargs: Mapping) -> set | None:
    """The storages of an op's tensor arguments; None where one has no storage to read (a wrapper subclass)."""
    storages = set()
    for value in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(value, torch.Tensor):
            try:
                storages.add(StorageWeakRef(value.untyped_storage()))
            except (RuntimeError, NotImplementedError):
                return None
    return storages


# NOTE [In-place ops on temporaries]
# Gradient formulas write into tensors they just made: clamp's backward combines its masks with logical_and_,
# rms_norm's adds with add_, norm, std, maximum and normalize mask with masked_fill_, cosine_similarity clamps with
# clamp_min_, binary_cross_entropy_with_logits divides with div_ (8 of 60 common ops surveyed in torch 2.13). The
# trace without functionalization stopped there, and the capture paid a second, functionalized trace (an 8-layer
# MLP with clamp: 0.79 -> 1.01 s). Such a write is recorded in its functional form instead (``add_`` as ``add``,
# the same overload and arguments) and the tensor's proxy in make_fx's tracer is pointed at the result, so later
# ops read the new value -- what functionalization does, for the case where nothing else can see the old one: the
# tensor was made by an op of this trace (not an input, tangent or constant), no other tensor was seen with its
# storage (no view, no alias) and the op that made it did not alias an argument (``saved_input.detach()`` in a
# backward writes into an input), it has no fake constant (which the skipped write would leave stale), it was made
# in the backward if the backward has begun (the backward may unpack saved forward tensors as new tensor objects
# without a dispatched op), and the functional form gives the same dtype, sizes and strides. It may require grad:
# autograd's in-place kernel runs above this mode as in eager (bumps the version counter, rebases the history,
# clones the old value where a formula needs it; F.rms_norm's forward add_). Anything else still stops the trace;
# random in-place ops (bernoulli_) and in-place ops without a functional overload of the same arguments too.
_METADATA_WRITES = frozenset({"resize", "resize_as", "set", "as_strided", "t", "transpose", "squeeze", "unsqueeze",
                              "swapdims", "swapaxes", "detach", "requires_grad"})


@functools.lru_cache(maxsize=None)
def functional_variant(func: Any) -> Any:
    """The functional overload recording what the in-place ``func`` does to its first argument (``aten.add.Tensor``
    for ``aten.add_.Tensor``), or None where there is none to use (NOTE [In-place ops on temporaries])."""
    return _find_functional_variant(func) if isinstance(func, torch._ops.OpOverload) else None


def _find_functional_variant(func: Any) -> Any:
    from torch._higher_order_ops.effects import has_effects

    schema = func._schema
    if not schema.name.startswith("aten::") or not schema.name.endswith("_") or schema.name.endswith("__"):
        return None
    if torch.Tag.nondeterministic_seeded in func.tags:
        return None
    arguments = schema.arguments
    first = arguments[0].alias_info if arguments else None
    if first is None or not first.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in arguments[1:]) or len(schema.returns) != 1:
        return None
    base = schema.name[len("aten::"):-1]
    if base in _METADATA_WRITES:
        return None
    variant = getattr(getattr(torch.ops.aten, base, None), func._overloadname, None)
    if not isinstance(variant, torch._ops.OpOverload):
        return None
    other = variant._schema
    if other.is_mutable or len(other.returns) != 1 or other.returns[0].alias_info is not None:
        return None
    if [(a.name, str(a.type)) for a in other.arguments] != [(a.name, str(a.type)) for a in arguments]:
        return None
    if torch.Tag.nondeterministic_seeded in variant.tags or has_effects(variant):
        return None
    return variant


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, device, sizes, strides and offset, compared without adding guards (symbolic sizes compare by
    expression)."""
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    return all(_same_size(x, y) for x, y in zip((*a.shape, *a.stride(), a.storage_offset()),
                                                (*b.shape, *b.stride(), b.storage_offset())))


def _same_size(x: Any, y: Any) -> bool:
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        return isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt) and x.node.expr == y.node.expr
    return x == y


def _take_proxy(target: torch.Tensor, result: torch.Tensor) -> bool:
    """Points ``target``'s proxy in make_fx's tracer at ``result``'s; whether that held."""
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, set_proxy_slot
    except ImportError:
        return False
    proxy_mode = get_proxy_mode()
    if proxy_mode is None:
        return False
    tracer = proxy_mode.tracer
    new = get_proxy_slot(result, tracer, None)
    if new is None:
        return False
    set_proxy_slot(target, tracer, new)
    return get_proxy_slot(target, tracer, None) is new


def check_graph(gm: fx.GraphModule) -> None:
    """:raises NeedsFunctionalization: ``gm``, traced without functionalization, records an op that needs it."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload,
                                                                   torch._ops.HigherOrderOperator)):
            reason = unfunctionalizable_op(node.target)
            if reason is not None:
                raise NeedsFunctionalization(f"{reason}, found in the graph")


_IN_PLACE_OPERATORS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})
_ATTRIBUTE_WRITES = frozenset({"__set__", "__delete__"})  # x.data = y, x.requires_grad = True, x.grad = g


class SpotInPlaceCalls(torch.overrides.TorchFunctionMode):
    """Notes (in ``seen``) the first torch call that looks in place -- a name ending in ``_`` (``requires_grad_``
    too), an augmented or item assignment, a tensor attribute written (``x.data = y``), ``out=`` or
    ``inplace=True`` -- or is a higher-order op. A prediction for the analysis pass only (calls
    inside other torch functions are not seen): the trace's dispatch mode is what guarantees the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        if self.seen is None:
            name = getattr(func, "__name__", "")
            if isinstance(func, torch._ops.HigherOrderOperator):
                self.seen = f"higher-order op {func.name()}"
            elif ((name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS
                    or name in _ATTRIBUTE_WRITES
                    or (kwargs and (kwargs.get("out") is not None or kwargs.get("inplace") is True))):
                self.seen = f"in-place call {name or func}"
        return func(*args, **(kwargs or {}))
