"""``torch.tensor([n])`` of a symbolic integer captured as a graph op, not as the value it was traced with.

NOTE [Tensors made from symbolic scalars]
An integer argument that changes between calls (a diffusion loop's ``timestep`` passed as a Python int) is
traced as a symbol under automatic dynamic shapes (NOTE [Dynamic dimensions]), so that one graph serves every
value. Code commonly turns it into a tensor with ``torch.tensor([t], dtype=..., device=...)`` (diffusers'
UNet does, for its time embedding) or ``torch.tensor(t)``. ``torch.tensor`` reads the numbers out of its
data: with a symbol there, the trace specializes on its value (a guard ``t == 7``), so the "dynamic" graph
held one value only and every new timestep traced again. While a function is captured with symbols,
:class:`SymbolicScalarTensors` builds such a tensor with ``torch.full`` per element (a graph op taking the
symbol), same values, dtype and device as eager's; data without symbols goes to ``torch.tensor`` untouched.
A float symbol is made a float64 element first and then cast, as eager casts the Python float: ``torch.full``
raises where the value overflows the dtype (``torch.tensor(1e308)`` is inf in float32).

NOTE [Symbols printed as their values]
``str(s)`` / ``repr(s)`` of a symbol gave its name (``zf0``, ``s1``) without a guard: a function keying a dict,
a module name or a branch on that text traced the name into a graph that every later value reused (eager reads
the value). While a function is captured with symbols, the text of a ``SymInt`` / ``SymFloat`` is its value's:
the graph specializes on it (a guard ``s == 0.5``), as ``float(s)`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SymbolicScalarTensors"]

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_NUMBERS = (bool, int, float)


def _flatten(data: Any, shape: list[int], depth: int, values: list) -> bool:
    """Append the scalars of the nested lists ``data`` to ``values`` and its sizes to ``shape``; False where
    ``data`` is not a rectangular nest of numbers and symbols (then ``torch.tensor`` decides)."""
    if isinstance(data, (list, tuple)):
        if len(shape) == depth:
            shape.append(len(data))
        elif shape[depth] != len(data):
            return False
        return all(_flatten(item, shape, depth + 1, values) for item in data)
    if len(shape) != depth or not isinstance(data, (*_SYMBOLIC, *_NUMBERS)):
        return False
    values.append(data)
    return True


def _inferred_dtype(values: list) -> torch.dtype:
    """The dtype ``torch.tensor`` infers from Python scalars: bool, int64, or the default float dtype."""
    if all(isinstance(value, (bool, torch.SymBool)) for value in values):
        return torch.bool
    if any(isinstance(value, (float, torch.SymFloat)) for value in values):
        return torch.get_default_dtype()
    return torch.int64


def _tensor_of_symbols(data: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False,
                       pin_memory: bool = False) -> torch.Tensor | None:
    if pin_memory or not isinstance(data, (list, tuple, *_SYMBOLIC)):
        return None
    shape: list[int] = []
    values: list = []
    if not _flatten(data, shape, 0, values) or not values or not any(isinstance(v, _SYMBOLIC) for v in values):
        return None
    dtype = dtype if dtype is not None else _inferred_dtype(values)
    elements = [_element(value, dtype, device) for value in values]
    result = torch.stack(elements).reshape(shape)
    return result.requires_grad_() if requires_grad else result


def _element(value: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """One element as ``torch.tensor`` makes it: a float symbol is cast from float64, as eager casts the Python
    float (``torch.full`` would raise where the value overflows ``dtype``; eager gives inf)."""
    if isinstance(value, torch.SymFloat) and dtype != torch.float64:
        return torch.full((), value, dtype=torch.float64, device=device).to(dtype)
    return torch.full((), value, dtype=dtype, device=device)


_TEXT_TYPES = ((torch.SymInt, int), (torch.SymFloat, float))
_text_lock = threading.Lock()
_text_users = 0
_text_saved: dict[type, Any] = {}


def _value_repr(convert: type) -> Any:
    def __repr__(self: Any) -> str:  # NOTE [Symbols printed as their values]: specializes the symbol
        return repr(convert(self))

    return __repr__


def _print_values(enter: bool) -> None:
    """Install (first user) or remove (last user) the value ``__repr__`` of symbols (process-wide, counted)."""
    global _text_users
    with _text_lock:
        _text_users += 1 if enter else -1
        if enter and _text_users == 1:
            for cls, convert in _TEXT_TYPES:
                _text_saved[cls] = cls.__dict__["__repr__"]
                cls.__repr__ = _value_repr(convert)  # type: ignore[method-assign]
        elif not enter and _text_users == 0:
            for cls, _ in _TEXT_TYPES:
                cls.__repr__ = _text_saved.pop(cls)  # type: ignore[method-assign]


class SymbolicScalarTensors(torch.overrides.TorchFunctionMode):
    """While capturing: ``torch.tensor(data)`` with symbolic scalars in ``data`` as graph ops (NOTE [Tensors made
    from symbolic scalars]), and symbols printed as their values (NOTE [Symbols printed as their values])."""

    def __enter__(self) -> SymbolicScalarTensors:
        _print_values(True)
        try:
            return super().__enter__()
        except BaseException:
            _print_values(False)
            raise

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            _print_values(False)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.tensor and len(args) == 1 and set(kwargs) <= {"dtype", "device", "requires_grad",
                                                                         "pin_memory"}:
            result = _tensor_of_symbols(args[0], **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)
