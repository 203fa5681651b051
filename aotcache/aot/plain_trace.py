"""A symbolic trace without functionalization, for functions that mutate nothing.

NOTE [Symbolic trace without functionalization]
Functionalization exists to turn mutations into functional ops; views stay views in the graph either way. A graph
recorded without it that holds no mutating op is therefore the graph functionalization would record, op for op
(checked on BERT and GPT-2 training steps: the same nodes and guards). With symbolic sizes it is also a fifth of a
capture's cost: every functional wrapper tensor computes its storage size and contiguity with symbols, and every op
is dispatched twice (2-layer BERT training step, CPU s of the first dynamic call: 0.90 -> 0.68; GPT-2 0.94 ->
0.71; a static capture takes 0.25).

So a symbolic capture first traces without functionalization when its static-probe analysis (NOTE [Analysis
without symbols] in capture.py) saw no input mutated, no metadata mutation, no side-effectful op and no in-place
call (:class:`SpotInPlaceCalls`, a torch-function mode: a prediction only, which spares a trace that would stop).
That trace runs under :class:`StopAtUnfunctionalizableOps`, a dispatch mode that stops it at the first op that
would need functionalization -- one whose schema mutates an argument (in-place, out=, resize_, set_), a
higher-order op (its subgraphs have functionalization rules of their own), a side-effectful op (an effect token
keeps it alive) -- and the finished graph is checked for the same ops once more. Where it stops, or fails in any
other way, the capture traces again with functionalization, as before: the forward then runs once more, like any
retrace. Static captures keep functionalization throughout (a static wrapper's arithmetic is cheap), and so do
captures with a caller's symbols (Dynamo's) and the retrace after an analysis mismatch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx
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


_REASONS: dict = {}  # op -> why it needs functionalization, or None


def unfunctionalizable_op(func: Any) -> str | None:
    """Why ``func`` needs functionalization: it mutates an argument, is a higher-order op or is registered as
    side-effectful; None if it needs none. Cached per op (an op's effect is registered when the op is defined)."""
    try:
        return _REASONS[func]
    except (KeyError, TypeError):
        pass
    reason = _why_unfunctionalizable(func)
    try:
        _REASONS[func] = reason
    except TypeError:
        pass
    return reason


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


class StopAtUnfunctionalizableOps(TorchDispatchMode):
    """Raises :class:`NeedsFunctionalization` at the first op that needs functionalization, before it runs.

    A tracing mode like FunctionalTensorMode, so declared to Dynamo: torch.cond (and the other control-flow ops)
    runs its op through torch.compile in eager, and Dynamo skips, for the rest of the process, a function called
    under a user's dispatch mode; the retrace with functionalization then failed on that skipped wrapper (a
    RuntimeError where the functional trace gives its own outcome), as did later captures of torch.cond."""

    supports_higher_order_operators = True

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        reason = unfunctionalizable_op(func)
        if reason is not None:
            raise NeedsFunctionalization(reason)
        return func(*args, **(kwargs or {}))


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
