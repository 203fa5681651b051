"""Python floats that Dynamo passes unspecialized (0-d float64 tensors read with ``.item()``), kept as float
inputs of the compiled graph where torch's tensorify pass turns every use of them into tensor arithmetic.

NOTE [Dynamo's float inputs kept as graph inputs]
Where a float changes between calls (an LR under a scheduler, single-tensor Adam's step size), Dynamo passes it
unspecialized: a 0-d float64 tensor input whose only uses are ``.item()``, the value a backed ``SymFloat`` of
Dynamo's ShapeEnv (its ``item_memo``) that Dynamo does not guard. torch's own backends trace it as that symbol and
run the private pass ``torch.fx.passes._tensorify_python_scalars`` on the joint graph: every use rewritten as
tensor arithmetic keeps the float a graph input (one graph for all values); a use the pass cannot rewrite makes
it ask Dynamo to restart with the float specialized (a constant guarded by value). aotcache's backend used to
specialize every such float (NOTE [Dynamo's float inputs] in dynamo_graph.py): a graph per value, up to the
recompile limit, then eager steps. Now, where the compilers take float graph inputs (``AOTOptions.float_symbols``:
nop, a user's callable, Inductor on CPU) and torch's pass exists and is enabled (feature-detected: it is
private), such a float is kept:

* a copy of Dynamo's graph reads the placeholder itself where it read its ``.item()`` (Dynamo's graph stays as it
  is, for the eager fallbacks that call it with Dynamo's tensors), and the capture gets Dynamo's symbol in that
  slot, so the captured graph has a ``SymFloat`` input as for aotcache's own float arguments (NOTE [Float
  arguments] in dynamic_dims.py); each call passes the tensor's ``.item()`` there;
* after the capture, :meth:`KeptFloats.check` runs torch's pass on a copy of the captured graph
  (``tensorify_float_inputs``, the rewrite Inductor's graphs get) and requires that it rewrote every use, that
  the capture added no guard over the float's symbol and did not specialize it; otherwise the compile is
  abandoned (:class:`FloatsNotTensorified`) and the float is specialized as before (Dynamo restarts): never a
  value baked into a graph that Dynamo does not guard. A capture or compile that fails with the float as an input
  is retried the same way, so a graph that cannot be captured for another reason ends as it did before. A float
  passed as a keyword argument (``alpha=-lr``), which the pass never rewrites, is specialized without a capture.

The cache key sees the float as a ``symfloat`` input (a position-normalized symbol, never its value) and the
graph without a constant for it, so a new process loads the entry for any starting value; the check ran when
the entry was stored, and the key holds the torch version the pass came from. The nop compiler runs the float's
arithmetic on Python floats (single-tensor Adam and Adagrad: ``aot_eager``'s steps bit for bit); Inductor on
float64 tensors (torch's Inductor's steps). A float read inside a checkpointed region, an unbacked ``.item()`` of a tensor argument
(``capture_scalar_outputs``) and AOTInductor or GPU graphs keep their earlier handling.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aotcache.aot.signed_zero_guards import is_zero_float

__all__ = ["FloatsNotTensorified", "KeptFloats", "keep_float_inputs", "tensorify_available"]


class FloatsNotTensorified(RuntimeError):
    """A kept float input whose uses torch's tensorify pass cannot all rewrite (NOTE [Dynamo's float inputs kept
    as graph inputs]): the float must be specialized instead."""


def tensorify_available() -> bool:
    """Whether this torch has the tensorify pass and Dynamo's restart for floats, with the pass enabled."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis  # noqa: F401
        from torch._dynamo.symbolic_convert import TensorifyState  # noqa: F401
        from torch.fx.passes._tensorify_python_scalars import tensorify_python_scalars  # noqa: F401
    except ImportError:
        return False
    try:
        return _tensorify_pass_enabled()
    except Exception:  # noqa: BLE001 - a private knob that could not be read: do not rely on the pass
        return False


def _tensorify_pass_enabled() -> bool:
    """Whether torch's tensorify pass runs (NOTE [The tensorify pass's switch])."""
    try:
        from torch._dynamo.utils import _is_tensorify_enabled
    except ImportError:
        pass
    else:
        return bool(_is_tensorify_enabled())
    # NOTE [The tensorify pass's switch]
    # Newer torch reads the pass's switch in one helper, ``_is_tensorify_enabled``. torch 2.11 has no such helper:
    # the pass itself reads the same two things at its start, the ``TENSORIFY_PYTHON_SCALARS`` environment
    # variable ("0" or "FALSE" turn it off) and otherwise the ``pytorch/compiler:tensorify_python_scalars``
    # knob (always on outside Meta). Without this, every float was specialized on 2.11 (a graph per LR value).
    from torch._utils_internal import justknobs_check

    setting = os.getenv("TENSORIFY_PYTHON_SCALARS")
    if setting is not None:
        return setting not in ("0", "FALSE")
    return bool(justknobs_check("pytorch/compiler:tensorify_python_scalars"))


@dataclasses.dataclass
class KeptFloats:
    """The floats of one Dynamo graph kept as float inputs: their positions among the graph's inputs, Dynamo's
    symbols for them (``SymFloat``) and the names of those symbols."""

    positions: tuple[int, ...]
    names: tuple[str, ...]
    values: tuple[Any, ...]
    shape_env: Any
    guards_before: int = 0

    @property
    def symbols(self) -> frozenset:
        return frozenset(symbol for value in self.values for symbol in value.node.expr.free_symbols)

    def rewrite(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[torch.fx.GraphModule, list]:
        """A copy of ``gm`` reading each kept float's placeholder where ``gm`` read its ``.item()``, and the example
        inputs with Dynamo's symbol in those slots."""
        copied = _copy_graph_module(gm)
        placeholders = [node for node in copied.graph.nodes if node.op == "placeholder"]
        examples = list(example_inputs)
        for position, value in zip(self.positions, self.values):
            node = placeholders[position]
            for user in list(node.users):
                user.replace_all_uses_with(node)
                copied.graph.erase_node(user)
            node.meta = {**node.meta, "example_value": value, "val": value}
            examples[position] = value
        copied.recompile()
        return copied, examples

    def arguments(self, args: Sequence[Any]) -> list:
        """Dynamo's call arguments with each kept float's 0-d tensor read as the Python float it holds."""
        converted = list(args)
        for position in self.positions:
            value = converted[position]
            if isinstance(value, torch.Tensor):
                converted[position] = value.item()
        return converted

    def start(self) -> None:
        """Before the capture: remember how many guards Dynamo's ShapeEnv holds."""
        self.guards_before = len(self.shape_env.guards)

    def check(self, captured: Any) -> None:
        """After the capture: :raises FloatsNotTensorified: the captured graph specialized a kept float or has a
        use of it torch's tensorify pass cannot rewrite (NOTE [Dynamo's float inputs kept as graph inputs])."""
        from aotcache.compilers.float_inputs import FloatInputsUnsupported, tensorify_float_inputs

        added = [guard for guard in self.shape_env.guards[self.guards_before:]
                 if set(guard.expr.free_symbols) & self.symbols]
        if added:
            raise FloatsNotTensorified(f"the capture guarded on the float ({added[0].expr})")
        if self.symbols & set(getattr(self.shape_env, "replacements", {})):
            raise FloatsNotTensorified("the capture specialized the float")
        held = set()
        for node in captured.graph.graph.nodes:
            value = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(value, torch.SymFloat):
                held |= set(value.node.expr.free_symbols)
        if not self.symbols <= held:
            raise FloatsNotTensorified("the captured graph does not take the float as an input")
        try:
            tensorify_float_inputs(_copy_graph_module(captured.graph), captured.fake_mode, on_gpu=False)
        except FloatInputsUnsupported as exc:
            raise FloatsNotTensorified(str(exc)) from None

    def specialize_and_restart(self) -> None:
        """Ask Dynamo to restart with the kept floats specialized (a constant per value, guarded by Dynamo)."""
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState

        for name in self.names:
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its own graph (node meta copied shallowly) sharing its attributes."""
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(getattr(gm, "meta", {}))
    return copied


def _memo_symbol(node: torch.fx.Node) -> tuple[Any, str | None]:
    """The backed ``SymFloat`` Dynamo made for a float placeholder (its fake's ``item_memo``) and its name."""
    from torch._subclasses.fake_tensor import FakeTensor

    value = node.meta.get("example_value")
    memo = value.item_memo if isinstance(value, FakeTensor) else None
    if not isinstance(memo, torch.SymFloat):
        return None, None
    has_hint = getattr(memo.node, "has_hint", None)
    if has_hint is not None and not has_hint():
        return None, None  # unbacked: a tensor argument's .item() (capture_scalar_outputs), not a Python float
    return memo, getattr(getattr(memo.node, "_expr", None), "name", None)


def _reaches_a_keyword(node: torch.fx.Node) -> bool:
    """Whether the float read from ``node`` (or a number computed from it) is passed as a keyword argument
    (``add_(buf, alpha=-lr)``, ``addcdiv_(..., value=-step_size)``): a Scalar that torch's tensorify pass, which
    rewrites positional arguments only, leaves as it is. Such a float is specialized without trying the capture
    first (it would be captured, checked and abandoned in every process, warm ones included)."""
    numbers = (torch.SymInt, torch.SymFloat, torch.SymBool)
    pending, seen = list(node.users), set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            in_keywords: list = []
            torch.fx.node.map_arg(user.kwargs, in_keywords.append)
            if current in in_keywords:
                return True
            if isinstance(user.meta.get("example_value"), numbers):
                pending.append(user)
    return False


def _graph_is_on_cpu(example_inputs: Sequence[Any]) -> bool:
    return all(value.device.type == "cpu" for value in example_inputs if isinstance(value, torch.Tensor))


def keep_float_inputs(gm: nn.Module, example_inputs: Sequence[Any], options: Any) -> KeptFloats | None:
    """The floats of Dynamo's graph ``gm`` to keep as graph inputs (NOTE [Dynamo's float inputs kept as graph
    inputs]), or None: none, or they cannot be kept here (they are then specialized as before). Read only:
    :meth:`KeptFloats.rewrite` makes the graph that takes them."""
    if not isinstance(gm, torch.fx.GraphModule) or not options.float_symbols():
        return None
    if not _graph_is_on_cpu(example_inputs) or not tensorify_available():
        return None
    from torch._dynamo.symbolic_convert import TensorifyState

    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    chosen = []
    for position, node in enumerate(placeholders):
        memo, name = _memo_symbol(node)
        if memo is None or name is None or TensorifyState.should_specialize(name) or is_zero_float(memo):
            continue  # a zero is specialized in place, its sign kept (NOTE [Zero floats specialized in place])
        if node.users and all(user.op == "call_method" and user.target == "item" and len(user.args) == 1
                              and not user.kwargs for user in node.users) and not _reaches_a_keyword(node):
            chosen.append((position, name, memo))
    if not chosen:
        return None
    return KeptFloats(tuple(p for p, _, _ in chosen), tuple(n for _, n, _ in chosen), tuple(m for _, _, m in chosen),
                      chosen[0][2].node.shape_env)
