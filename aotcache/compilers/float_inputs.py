"""Float graph inputs (``SymFloat`` placeholders) turned into 0-d float64 tensor inputs for Inductor.

NOTE [Float inputs for Inductor]
A Python float argument traced as a symbol (NOTE [Float arguments] in ``aot/dynamic_dims.py``) is a ``SymFloat``
placeholder of the graph. Inductor cannot generate code for one (its C++ names the symbol without declaring
it: "'zf28' was not declared"). torch.compile passes such a float to its graph as a 0-d float64 tensor and
rewrites the scalar arithmetic on it into tensor ops (the private pass ``torch.fx.passes._tensorify_python_
scalars``). Before Inductor compiles a graph with float placeholders, :func:`tensorify_float_inputs` does the
same: each float placeholder becomes a 0-d float64 tensor placeholder read with ``_local_scalar_dense``
(``.item()``), which torch's pass then removes by computing its uses as tensor ops (their results keep their
dtypes: it converts back to each op's result dtype). A graph output that is the float input itself (a forward
saving the float for its backward) is returned as that tensor, and the call puts the caller's float back in
its slot (:class:`FloatInputs`), so the runtime sees what the nop compiler would return.

The rewrite is refused (:class:`FloatInputsUnsupported`, and the float is then compiled as a constant per value:
``aot/api.py``) where it would not be exact: torch's pass is missing or changed (it is private; checked by
import and by its result), a use of the float it cannot rewrite remains (it would specialize the symbol, a
guard added after the graph's guards were taken), a size depends on the float, or the graph runs on a GPU
(the tensor is a CPU scalar; not tried here). Inductor computes the float's arithmetic in float64 tensors
where eager uses Python floats: results agree to rounding, as torch.compile's do, not bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx

__all__ = ["FloatInputsUnsupported", "FloatInputs", "tensorify_float_inputs", "caller_retries", "retried_by_caller"]


class FloatInputsUnsupported(RuntimeError):
    """A graph whose float inputs Inductor cannot take as tensors (NOTE [Float inputs for Inductor])."""


_retrying = threading.local()


@contextlib.contextmanager
def caller_retries() -> Iterator[None]:
    """While compiling a call whose float symbols the caller can make constants instead (an ``AOTFunction``):
    :class:`FloatInputsUnsupported` reaches it rather than making the compiler chain fall back to ``nop``."""
    previous = getattr(_retrying, "active", False)
    _retrying.active = True
    try:
        yield
    finally:
        _retrying.active = previous


def retried_by_caller() -> bool:
    """Whether a :class:`FloatInputsUnsupported` raised now is handled by the caller (:func:`caller_retries`)."""
    return getattr(_retrying, "active", False)


@dataclasses.dataclass(frozen=True)
class FloatInputs:
    """Which graph inputs are floats passed as 0-d float64 tensors, and which outputs are such an input itself."""

    inputs: tuple[int, ...]
    passthrough: tuple[tuple[int, int], ...] = ()  # (output index, input index)

    def to_meta(self) -> dict[str, list]:
        return {"inputs": list(self.inputs), "passthrough": [list(pair) for pair in self.passthrough]}

    @classmethod
    def from_meta(cls, meta: Any) -> FloatInputs | None:
        """The plan stored in an artifact's meta (None: no float inputs). :raises ValueError: malformed."""
        if not meta:
            return None
        return cls(tuple(int(i) for i in meta["inputs"]),
                   tuple((int(out), int(inp)) for out, inp in meta.get("passthrough", ())))

    def arguments(self, args: Sequence[Any]) -> list:
        """``args`` with each float input as a 0-d float64 tensor (a fresh list)."""
        converted = list(args)
        for index in self.inputs:
            converted[index] = torch.tensor(float(converted[index]), dtype=torch.float64)
        return converted

    def outputs(self, outputs: Sequence[Any], args: Sequence[Any]) -> Sequence[Any]:
        """``outputs`` with each pass-through slot holding the caller's float again."""
        if not self.passthrough:
            return outputs
        restored = list(outputs)
        for out, inp in self.passthrough:
            restored[out] = args[inp]
        return tuple(restored) if isinstance(outputs, tuple) else restored


def _float_symbols(value: Any) -> set:
    """The float symbols (``zf*``) in a node's value: a symbolic scalar, or a fake tensor's sizes and strides."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        items = [value]
    elif isinstance(value, torch.Tensor):
        items = [*value.shape, *value.stride(), value.storage_offset()]
    elif isinstance(value, (tuple, list)):
        return set().union(*map(_float_symbols, value)) if value else set()
    else:
        return set()
    found = set()
    for item in items:
        if isinstance(item, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            found |= {s for s in item.node.expr.free_symbols if symbol_is_type(s, SymT.FLOAT)}
    return found


@contextlib.contextmanager
def _dynamo_specializations_kept() -> Iterator[None]:
    """Dynamo's process-wide set of float symbols to specialize at its next restart, as it was: torch's pass adds
    the names of floats it could not rewrite there, for Dynamo's restart; ours is no Dynamo frame."""
    try:
        from torch._dynamo.symbolic_convert import TensorifyState

        names = TensorifyState.force_specializations
    except (ImportError, AttributeError):
        yield
        return
    saved = set(names)
    try:
        yield
    finally:
        names.clear()
        names.update(saved)


def tensorify_float_inputs(gm: torch.fx.GraphModule, fake_mode: Any, on_gpu: bool) -> FloatInputs | None:
    """Rewrite ``gm`` (a copy the caller owns) so that its float placeholders are 0-d float64 tensors; the plan
    to call it with, or None when it has no float placeholder.

    :raises FloatInputsUnsupported: the rewrite is not possible or not exact (NOTE [Float inputs for Inductor]).
    """
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    floats = [index for index, node in enumerate(placeholders) if isinstance(node.meta.get("val"), torch.SymFloat)]
    if not floats:
        return None
    if on_gpu:
        raise FloatInputsUnsupported("float inputs of a GPU graph")
    shape_env = getattr(fake_mode, "shape_env", None)
    try:
        from torch.fx.passes._tensorify_python_scalars import tensorify_python_scalars
    except ImportError as exc:
        raise FloatInputsUnsupported(f"torch has no tensorify pass ({exc})") from None
    if shape_env is None:
        raise FloatInputsUnsupported("no ShapeEnv")
    symbols = set()
    for index in floats:
        symbols |= _float_symbols(placeholders[index].meta["val"])
    guards_before = len(shape_env.guards)
    (output_node,) = [node for node in graph.nodes if node.op == "output"]
    outputs = list(output_node.args[0])
    first_op = next(node for node in graph.nodes if node.op != "placeholder")
    passthrough = []
    for index in floats:
        node = placeholders[index]
        with graph.inserting_before(node):
            tensor = graph.placeholder(f"{node.name}_as_tensor")
        with fake_mode:
            tensor.meta["val"] = torch.empty((), dtype=torch.float64)
        for position, value in enumerate(outputs):
            if value is node:
                outputs[position] = tensor
                passthrough.append((position, index))
        output_node.args = (tuple(outputs),)
        with graph.inserting_before(first_op):
            item = graph.call_function(torch.ops.aten._local_scalar_dense.default, (tensor,))
        item.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(item)
        graph.erase_node(node)
    gm.recompile()
    try:
        with _dynamo_specializations_kept():
            tensorify_python_scalars(gm, shape_env, fake_mode)
    except Exception as exc:  # noqa: BLE001 - a private pass: any failure (or its restart request) refuses
        raise FloatInputsUnsupported(f"torch's tensorify pass failed: {type(exc).__name__}: {exc}") from None
    graph.eliminate_dead_code()
    if len(shape_env.guards) != guards_before or symbols & set(getattr(shape_env, "replacements", {})):
        raise FloatInputsUnsupported("a use of the float specialized it")
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.target is torch.ops.aten._local_scalar_dense.default or _float_symbols(node.meta.get("val")):
            raise FloatInputsUnsupported(f"a use of the float stays scalar ({node.format_node()})")
    gm.recompile()
    return FloatInputs(tuple(floats), tuple(passthrough))
