"""The functionalization a capture traces under (or traces without), and the effect tokens that keep
side-effectful ops in its graph."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from aotcache.aot.plain_trace import StopAtUnfunctionalizableOps

__all__ = ["identity", "to_functional_tensor", "from_functional_tensor", "functionalized", "unfunctionalized",
           "seed_effect_tokens", "all_effect_types", "final_effect_tokens", "keep_linalg_checks_effectful",
           "refuse_backward_effects"]


def identity(value: Any) -> Any:
    return value


def to_functional_tensor(value: Any) -> Any:
    from torch._subclasses.functional_tensor import FunctionalTensor

    return FunctionalTensor.to_functional(value) if isinstance(value, torch.Tensor) else value


def from_functional_tensor(value: Any) -> Any:
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(value, FunctionalTensor):
        torch._sync(value)
        return torch._from_functional_tensor(value.elem)
    return value


@contextlib.contextmanager
def functionalized(discover_effects: bool = False) -> Iterator[Any]:
    """Python functionalization below autograd and above make_fx's proxy mode (see NOTE [Functional trace]);
    yields the FunctionalTensorMode. ``discover_effects`` lets it create effect tokens (analysis only)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    # NOTE [Functional trace]
    # The C++ Functionalize key must stay excluded: FunctionalTensorMode (a Python dispatch mode) does the
    # functionalization, and make_fx's proxy mode, lower on the mode stack, records the functional ops it emits.
    exclude = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize))
    keep_linalg_checks_effectful()
    mode = FunctionalTensorMode(_allow_token_discovery=True) if discover_effects else FunctionalTensorMode()
    with exclude, mode:
        yield mode


@contextlib.contextmanager
def unfunctionalized(mode: StopAtUnfunctionalizableOps) -> Iterator[None]:
    """Ops reach make_fx as they are; the first that would need functionalization stops the trace (NOTE
    [Symbolic trace without functionalization] in plain_trace.py)."""
    with mode:
        yield None


# NOTE [Effect tokens]
# Functionalization routes ops registered as side-effectful (recent torch registers aten._linalg_check_errors,
# which raises eager's error for singular / non-positive-definite input in linalg.inv, cholesky, solve, ...)
# through the ``with_effects`` higher-order op, which takes and returns a *token*, so that the op is neither
# reordered nor removed as dead code, and fails when no token exists. The analysis pass lets the mode create
# tokens and records which effect types the function uses; the trace seeds one token per effect type as a
# graph value (``aten.empty([0])``) and returns the last token of each as an extra forward output (after the
# SymInt extras; the runtime ignores it). Being an output keeps the effectful op alive in the forward graph
# through any partitioner, so the compiled forward raises eager's error. Effectful ops reached only by the
# backward are not kept (partitioners keep what the gradients need); no gradient formula of the linalg ops
# calls the check, whose forward already ran on the same input. Compilers must support ``with_effects``
# (nop as an fx graph, Inductor lowers it); the nop artifact's JSON graph form cannot store it, so such
# graphs are not stored in the compiled-graph cache.
#
# NOTE [Linalg checks on torch 2.11]
# torch registers aten._linalg_check_errors as side-effectful from 2.12 on. On 2.11 it is a plain op with no
# output: the trace records it unused, dead-code elimination drops it, and a compiled linalg.inv of a singular
# matrix returns garbage instead of raising eager's LinAlgError. Where torch has no effect registered for it,
# the first capture registers the same effect torch 2.12 does (ORDERED), once and for the process, so the path
# above applies: the registration must outlive the trace, since Inductor reads it again when it lowers the
# ``with_effects`` node (possibly later, e.g. a recompile). It is feature-detected, never by version, and it
# only adds what later torch has: other torch.compile users of the process get the 2.12 behaviour too.


_linalg_checks_registered = False


def keep_linalg_checks_effectful() -> None:
    """Register aten._linalg_check_errors as side-effectful where torch does not (NOTE [Linalg checks on torch
    2.11]); a no-op after the first call and on torch >= 2.12."""
    global _linalg_checks_registered
    if _linalg_checks_registered:
        return
    _linalg_checks_registered = True
    try:
        from torch._higher_order_ops.effects import _EffectType, _get_effect, _register_effectful_op
        check = torch.ops.aten._linalg_check_errors.default
    except (ImportError, AttributeError):  # a torch without effect tokens or without the check op
        return
    if _get_effect(check) is None:
        _register_effectful_op(check, _EffectType.ORDERED)


def seed_effect_tokens(mode: Any, effects: Sequence[Any]) -> None:
    if mode is None:  # traced without functionalization: it has no effects
        return
    for effect in effects:
        if effect not in mode._tokens:
            mode._tokens[effect] = torch.empty(0)  # traced into the graph: see NOTE [Effect tokens]


def all_effect_types() -> list:
    """Every effect type torch knows (a backward may reach effectful ops that the forward analysis did not)."""
    try:
        from torch._library.effects import EffectType
    except ImportError:
        try:
            from torch._higher_order_ops.effects import _EffectType as EffectType
        except ImportError:  # a torch without effect tokens
            return []
    return list(EffectType)


def final_effect_tokens(mode: Any, effects: Sequence[Any]) -> list:
    if mode is None:
        return []
    return [mode._tokens[effect] for effect in effects]


# NOTE [Effectful ops in the backward]
# The backward's effect tokens are seeded (``all_effect_types``) but returned by no graph output, so every
# ``with_effects`` call the backward traces is dead code that the partition drops. That is meant for
# ``aten._linalg_check_errors`` (NOTE [Effect tokens]), but an op the user registers as side-effectful and calls
# from a custom backward (``torch.library.register_autograd`` whose formula calls a logging op and drops its
# result: PyTorch's test_with_effects.py) then never ran in the compiled backward, where eager and torch's
# aot_eager run it at every backward. Such a joint graph is refused (its Dynamo graph or region runs as Python:
# eager's effects) rather than compiled without the effect. Only the linalg check is exempt.
_BACKWARD_EFFECTS_DROPPED = ("aten::_linalg_check_errors",)


def refuse_backward_effects(gm: torch.fx.GraphModule) -> None:
    """:raises CaptureError: the joint ``gm``'s backward calls a side-effectful op (NOTE [Effectful ops in the
    backward])."""
    with_effects = getattr(torch.ops.higher_order, "with_effects", None)
    if with_effects is None:  # a torch without effect tokens
        return
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is with_effects
                and node.meta.get("partitioner_tag") == "is_backward" and len(node.args) > 1):
            op = node.args[1]
            name = op.name() if callable(getattr(op, "name", None)) else str(op)
            if name not in _BACKWARD_EFFECTS_DROPPED:
                from aotcache.aot.errors import CaptureError

                raise CaptureError(
                    f"aotcache: the backward calls {name}, an op registered as side-effectful; a compiled backward "
                    f"would leave it out (NOTE [Effectful ops in the backward]). It runs uncompiled instead.",
                    reason="unsupported_construct")
