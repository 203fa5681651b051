"""Verification harness: run a function or module through AOT Autograd and through eager, compare everything.

``verify(fn, inputs)`` runs ``fn`` eagerly and through ``aot_function`` / ``aot_module`` on independent deep
copies of the inputs (and of the module), for ``steps`` consecutive calls, and compares:

* the outputs (pytree structure, non-tensor leaves by ``==``, tensors by value, dtype, shape and, in training
  mode, ``requires_grad``);
* which inputs / parameters each output aliases (a view of an input must stay a view of that input);
* the inputs after the call (in-place mutations of user inputs) and the module's buffers (e.g. BatchNorm's
  running statistics);
* in training mode, the gradients of every input and parameter that requires grad, after a backward pass with
  the same random cotangents on both sides;
* that the compiler was really used: a forward/inference graph was compiled, and in training mode a backward
  graph was compiled when gradients flowed (so a silent fall-back to eager cannot pass).

Every mismatch is collected and reported together in one ``VerificationError``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["GraphRecorder", "VerificationError", "VerifyReport", "verify", "resolve_compiler", "pytorch_api"]


class VerificationError(AssertionError):
    """AOT Autograd disagreed with eager; the message lists every mismatch found."""


@dataclasses.dataclass
class CompiledGraphRecord:
    """One call of a compiler: which role it had and the graph it was given."""

    role: str  # "forward", "backward" or "inference"
    graph_module: torch.fx.GraphModule
    num_example_inputs: int


class GraphRecorder:
    """Wraps a compiler so each role (forward / backward / inference) records the graphs it compiles.

    ``recorder.compiler_for("backward")`` is a compiler that records then delegates to the wrapped one; it
    forwards ``decompositions()`` so that ``aot_function`` still traces with the wrapped compiler's table.
    """

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.records: list[CompiledGraphRecord] = []

    def compiler_for(self, role: str) -> Callable:
        def recording_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
            self.records.append(CompiledGraphRecord(role, gm, len(example_inputs)))
            return self.inner(gm, example_inputs)

        if hasattr(self.inner, "decompositions"):
            recording_compiler.decompositions = self.inner.decompositions  # type: ignore[attr-defined]
        recording_compiler.__name__ = f"recording_{role}_compiler"
        return recording_compiler

    def count(self, role: str) -> int:
        return sum(1 for record in self.records if record.role == role)

    def graphs(self, role: str) -> list[torch.fx.GraphModule]:
        return [record.graph_module for record in self.records if record.role == role]


@dataclasses.dataclass
class VerifyReport:
    """What ``verify`` ran: the compiled callable, the graphs each compiler role saw, the last outputs."""

    compiled: Callable
    recorder: GraphRecorder
    eager_outputs: list[Any]
    aot_outputs: list[Any]


def resolve_compiler(compiler: str | Callable | None) -> Callable:
    """``None`` or a name -> ``aotcache.compilers.get_compiler(name)`` (default "nop"); a callable as is."""
    if compiler is None:
        compiler = "nop"
    if isinstance(compiler, str):
        from aotcache.compilers import get_compiler

        return get_compiler(compiler)
    return compiler


def aotcache_api() -> Any:
    """The API under test (imported lazily so that collecting tests does not need the implementation)."""
    import aotcache

    return SimpleNamespace(aot_function=aotcache.aot_function, aot_module=aotcache.aot_module, name="aotcache")


def pytorch_api() -> Any:
    """PyTorch's own AOT Autograd (the reference), usable as ``verify(..., api=pytorch_api())``."""
    from functorch.compile import aot_function, aot_module

    # PyTorch's aot_function returns a list where the function returned a tuple: compare those as equal.
    return SimpleNamespace(aot_function=aot_function, aot_module=aot_module, name="pytorch", tuple_as_list=True)


# ----------------------------------------------------------------------------------------------------
# Running one side (eager or AOT)
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StepResult:
    outputs: Any
    inputs_after: list[Any]  # flat leaves of the (mutated) input copies
    buffers_after: dict[str, torch.Tensor]
    input_grads: list[torch.Tensor | None]
    param_grads: dict[str, torch.Tensor | None]
    aliasing: list[tuple[str, ...]]  # per flat output tensor: names of the inputs/params it shares storage with


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    if tensor.numel() == 0 or tensor.layout != torch.strided:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (storage.data_ptr(), storage.nbytes()) if storage.data_ptr() != 0 else None


def _alias_map(outputs: Any, flat_inputs: list[Any], module: nn.Module | None) -> list[tuple[str, ...]]:
    named: list[tuple[str, torch.Tensor]] = [
        (f"input[{i}]", leaf) for i, leaf in enumerate(flat_inputs) if isinstance(leaf, torch.Tensor)
    ]
    if module is not None:
        named += [(f"param:{n}", p) for n, p in module.named_parameters()]
        named += [(f"buffer:{n}", b) for n, b in module.named_buffers()]
    owners: dict[tuple[int, int], list[str]] = {}
    for name, tensor in named:
        key = _storage_key(tensor)
        if key is not None:
            owners.setdefault(key, []).append(name)
    result = []
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor):
            key = _storage_key(leaf)
            result.append(tuple(owners.get(key, ())) if key is not None else ())
    return result


def _tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _differentiable_outputs(outputs: Any) -> list[torch.Tensor]:
    return [
        leaf for leaf in pytree.tree_leaves(outputs)
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and (leaf.is_floating_point() or leaf.is_complex())
    ]


def _make_cotangents(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cotangents = []
    for out in outputs:
        real_dtype = out.real.dtype if out.is_complex() else out.dtype
        values = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(real_dtype)
        cotangents.append(values.to(out.dtype) if out.is_complex() else values)
    return cotangents


def _run_step(call: Callable, module: nn.Module | None, inputs: Sequence[Any], *, train: bool, step: int,
              rng_seed: int | None) -> _StepResult:
    flat_inputs, _ = pytree.tree_flatten(list(inputs))
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    with torch.set_grad_enabled(train):
        outputs = call(*inputs)
    aliasing = _alias_map(outputs, flat_inputs, module)
    if train:
        diff_outputs = _differentiable_outputs(outputs)
        if diff_outputs:
            torch.autograd.backward(diff_outputs, _make_cotangents(diff_outputs, seed=1000 + step))
    input_grads = [leaf.grad if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None
                   for leaf in flat_inputs]
    param_grads = {}
    buffers_after = {}
    if module is not None:
        param_grads = {name: p.grad for name, p in module.named_parameters()}
        buffers_after = {name: b.detach().clone() for name, b in module.named_buffers()}
    return _StepResult(
        outputs=outputs,
        inputs_after=[leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in flat_inputs],
        buffers_after=buffers_after,
        input_grads=[g.detach().clone() if g is not None else None for g in input_grads],
        param_grads={n: g.detach().clone() if g is not None else None for n, g in param_grads.items()},
        aliasing=aliasing,
    )


# ----------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------


class _Mismatches:
    def __init__(self, atol: float | None, rtol: float | None) -> None:
        self.atol = atol
        self.rtol = rtol
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{where}: {message}")

    def tensors(self, where: str, expected: torch.Tensor, actual: torch.Tensor, *, check_requires_grad: bool
                ) -> None:
        if check_requires_grad and expected.requires_grad != actual.requires_grad:
            self.add(where, f"requires_grad eager={expected.requires_grad} aot={actual.requires_grad}")
        try:
            torch.testing.assert_close(actual.detach(), expected.detach(), atol=self.atol, rtol=self.rtol,
                                       equal_nan=True, check_device=True, check_dtype=True, check_layout=True)
        except AssertionError as error:
            self.add(where, str(error).strip().replace("\n", " | "))

    def grads(self, where: str, expected: torch.Tensor | None, actual: torch.Tensor | None) -> None:
        # NOTE [None vs zero gradients]
        # Eager leaves ``.grad`` as None where no gradient flowed; a compiled backward may produce explicit
        # zeros instead. Both mean "no contribution", so None matches an all-zero gradient, nothing else.
        if expected is None and actual is None:
            return
        if expected is None or actual is None:
            present = actual if expected is None else expected
            if bool((present == 0).all()):
                return
            self.add(where, f"gradient is None on the {'eager' if expected is None else 'aot'} side only")
            return
        self.tensors(where, expected, actual, check_requires_grad=False)

    def values(self, where: str, expected: Any, actual: Any, *, check_requires_grad: bool,
               tuple_as_list: bool = False) -> None:
        if tuple_as_list:
            expected, actual = _tuples_to_lists(expected), _tuples_to_lists(actual)
        expected_leaves, expected_spec = pytree.tree_flatten(expected)
        actual_leaves, actual_spec = pytree.tree_flatten(actual)
        if expected_spec != actual_spec:
            self.add(where, f"output structure differs: eager {expected_spec} vs aot {actual_spec}")
            return
        for index, (exp, act) in enumerate(zip(expected_leaves, actual_leaves)):
            leaf_where = f"{where}[{index}]"
            if isinstance(exp, torch.Tensor) or isinstance(act, torch.Tensor):
                if not (isinstance(exp, torch.Tensor) and isinstance(act, torch.Tensor)):
                    self.add(leaf_where, f"eager {type(exp).__name__} vs aot {type(act).__name__}")
                else:
                    self.tensors(leaf_where, exp, act, check_requires_grad=check_requires_grad)
            elif exp != act:
                self.add(leaf_where, f"non-tensor value eager {exp!r} vs aot {act!r}")


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return [_tuples_to_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    return value


def _compare_steps(step: int, eager: _StepResult, aot: _StepResult, mismatches: _Mismatches, *, train: bool,
                   check_aliasing: bool, tuple_as_list: bool) -> None:
    prefix = f"step {step}"
    mismatches.values(f"{prefix} output", eager.outputs, aot.outputs, check_requires_grad=train,
                      tuple_as_list=tuple_as_list)
    if check_aliasing and eager.aliasing != aot.aliasing:
        mismatches.add(f"{prefix} aliasing", f"outputs alias eager {eager.aliasing} vs aot {aot.aliasing}")
    mismatches.values(f"{prefix} input after call", eager.inputs_after, aot.inputs_after, check_requires_grad=False)
    for name in sorted(set(eager.buffers_after) | set(aot.buffers_after)):
        if name not in eager.buffers_after or name not in aot.buffers_after:
            mismatches.add(f"{prefix} buffer {name}", "present on one side only")
        else:
            mismatches.tensors(f"{prefix} buffer {name}", eager.buffers_after[name], aot.buffers_after[name],
                               check_requires_grad=False)
    if train:
        for index, (exp, act) in enumerate(zip(eager.input_grads, aot.input_grads)):
            mismatches.grads(f"{prefix} grad of input[{index}]", exp, act)
        for name in eager.param_grads:
            mismatches.grads(f"{prefix} grad of param {name}", eager.param_grads[name], aot.param_grads.get(name))


def _clone_tensor(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    clone = value.detach().clone()
    return clone.requires_grad_(value.requires_grad) if value.is_leaf else clone


def copy_inputs(inputs: Sequence[Any]) -> list[Any]:
    """An independent copy of ``inputs``: a deep copy (which keeps inputs that share memory sharing it), or
    per-tensor clones for tensors that cannot be deep-copied (sparse CSR with requires_grad)."""
    try:
        return copy.deepcopy(list(inputs))
    except (NotImplementedError, RuntimeError):
        return pytree.tree_map(_clone_tensor, list(inputs))


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def verify(
    fn: Callable | nn.Module,
    inputs: Sequence[Any],
    *,
    compiler: str | Callable | None = None,
    partition_fn: Callable | None = None,
    decompositions: dict | None = None,
    train: bool = True,
    steps: int = 2,
    atol: float | None = None,
    rtol: float | None = None,
    check_aliasing: bool = True,
    check_compiled: bool = True,
    rng_seed: int | None = 0,
    api: Any = None,
) -> VerifyReport:
    """Compare ``aot_function(fn)`` (or ``aot_module``) with eager on deep copies of ``inputs``.

    ``train=True`` runs with grad enabled and backpropagates random cotangents; ``train=False`` runs under
    ``torch.no_grad()``. ``compiler`` is a compiler name or callable (default the nop compiler), used for the
    forward, backward and inference graphs. ``atol``/``rtol`` default to ``torch.testing.assert_close``'s.
    ``rng_seed`` seeds the global RNG before each call on both sides (random ops then match when the compiled
    graph draws the same numbers). ``api`` swaps the implementation (``pytorch_api()`` runs the reference).

    :raises VerificationError: listing every output, aliasing, mutation and gradient mismatch.
    """
    api = api if api is not None else aotcache_api()
    recorder = GraphRecorder(resolve_compiler(compiler))
    options: dict[str, Any] = {
        "fw_compiler": recorder.compiler_for("forward"),
        "bw_compiler": recorder.compiler_for("backward"),
        "inference_compiler": recorder.compiler_for("inference"),
    }
    if partition_fn is not None:
        options["partition_fn"] = partition_fn
    if decompositions is not None:
        options["decompositions"] = decompositions

    is_module = isinstance(fn, nn.Module)
    eager_module = copy.deepcopy(fn) if is_module else None
    aot_module = copy.deepcopy(fn) if is_module else None
    if is_module:
        compiled = api.aot_module(aot_module, **options)
        eager_call = eager_module
    else:
        compiled = api.aot_function(fn, **options)
        eager_call = fn

    mismatches = _Mismatches(atol, rtol)
    eager_outputs, aot_outputs = [], []
    for step in range(steps):
        eager_inputs = copy_inputs(inputs)
        aot_inputs = copy_inputs(inputs)
        eager_result = _run_step(eager_call, eager_module, eager_inputs, train=train, step=step, rng_seed=rng_seed)
        aot_result = _run_step(compiled, aot_module, aot_inputs, train=train, step=step, rng_seed=rng_seed)
        _compare_steps(step, eager_result, aot_result, mismatches, train=train, check_aliasing=check_aliasing,
                       tuple_as_list=getattr(api, "tuple_as_list", False))
        eager_outputs.append(eager_result.outputs)
        aot_outputs.append(aot_result.outputs)
        if step == 0 and check_compiled:
            _check_compiler_use(recorder, eager_result, train=train, mismatches=mismatches)

    if mismatches.messages:
        shown = "\n  ".join(mismatches.messages[:40])
        more = f"\n  ... and {len(mismatches.messages) - 40} more" if len(mismatches.messages) > 40 else ""
        raise VerificationError(f"AOT ({api.name}) differs from eager:\n  {shown}{more}")
    return VerifyReport(compiled=compiled, recorder=recorder, eager_outputs=eager_outputs, aot_outputs=aot_outputs)


def _check_compiler_use(recorder: GraphRecorder, eager: _StepResult, *, train: bool, mismatches: _Mismatches
                        ) -> None:
    """The forward/inference compiler ran; a backward was compiled iff gradients flowed (training only)."""
    forward_like = recorder.count("forward") + recorder.count("inference")
    if forward_like == 0:
        mismatches.add("compiler use", "no forward or inference graph was compiled (ran eagerly?)")
    gradients_flowed = any(g is not None for g in eager.input_grads) or any(
        g is not None for g in eager.param_grads.values())
    # NOTE [outputs that are views of inputs]
    # An output that aliases an input may be regenerated outside the compiled graph (as a view of the
    # input), with gradients flowing through eager view ops; a backward graph is only required when some
    # differentiable output is not such a view.
    computed_outputs = [aliases for aliases, out in zip(eager.aliasing, _tensor_leaves(eager.outputs))
                        if out.requires_grad and not aliases]
    if train and gradients_flowed and computed_outputs and recorder.count("backward") == 0:
        mismatches.add("compiler use", "gradients flowed but no backward graph was compiled")
    if not train and recorder.count("backward") != 0:
        mismatches.add("compiler use", "a backward graph was compiled under no_grad (expected inference only)")
