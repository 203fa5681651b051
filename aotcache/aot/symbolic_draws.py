"""``torch.rand`` / ``randn`` / ``randint`` with a ``generator=`` and symbolic sizes, captured as the ``*_like``
draw of an empty tensor.

NOTE [Generator draws with symbolic sizes]
``torch.rand(x.shape, generator=g)`` in a function captured with dynamic shapes failed its trace ("SymIntArrayRef
expected to contain only concrete integers": the fake kernel of the ``generator`` overloads of these three
factories takes concrete sizes only), and the call fell back to torch.compile: a diffusion sampler passing its
``generator=`` lost the AOT way under ``dynamic=True``. ATen makes these tensors as an empty tensor filled in
place -- ``rand`` with ``uniform_(0, 1)``, ``randn`` with ``normal_(0, 1)``, ``randint`` with ``random_(low,
high)``, each with the same generator -- and so do ``rand_like`` / ``randn_like`` / ``randint_like`` of an empty
tensor, which trace with symbolic sizes (functional ops: no in-place draw in the graph, and none that a trace
without functionalization stops at; ``random_.from`` would not even print as Python). While a function is
captured with symbols, :class:`GeneratorDrawsWithSymbolicSizes` makes such a call that way: the same kernel
draws the same numbers and moves the generator as eager's call does (the generator's slot is then handled as
any generator argument: NOTE [Generator arguments] in generator_args.py). Calls without a generator, with
concrete sizes, or with ``out=`` / ``names=`` go to torch untouched. ``normal``, ``*_like`` and in-place draws
trace as they are. A compiler's decomposition table (Inductor's) turns ``rand_like(t, generator=g)`` back into
``rand(t.shape, generator=g)``, which fails the same way, so a symbolic capture traces without the decompositions
of the ``*_like`` overloads that take a generator (:func:`keep_generator_draws`): the graph holds the ``*_like``
op, which the compiler runs as ATen's kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["GeneratorDrawsWithSymbolicSizes", "keep_generator_draws"]

_FACTORY_KEYWORDS = frozenset({"dtype", "layout", "device", "pin_memory"})


@functools.lru_cache(maxsize=None)
def _generator_like_overloads() -> frozenset:
    """The ``*_like`` draw overloads that take a generator (those present in this torch)."""
    found = set()
    for name in ("rand_like", "randn_like", "randint_like"):
        packet = getattr(torch.ops.aten, name, None)
        for overload in packet.overloads() if packet is not None else ():
            op = getattr(packet, overload)
            if any(argument.name == "generator" for argument in op._schema.arguments):
                found.add(op)
    return frozenset(found)


def keep_generator_draws(decompositions: Mapping | None) -> Mapping | None:
    """``decompositions`` without the ``*_like`` draw overloads that take a generator (NOTE [Generator draws with
    symbolic sizes]); the table itself where it has none of them."""
    if not decompositions:
        return decompositions
    kept = _generator_like_overloads()
    if not any(op in decompositions for op in kept):
        return decompositions
    return {op: fn for op, fn in decompositions.items() if op not in kept}


def _size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The size a ``rand`` / ``randn`` call asks for (``size=``, one sequence, or sizes as varargs)."""
    if "size" in kwargs:
        return kwargs["size"]
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return args[0]
    return args


def _randint_bounds(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """``(low, high, size)`` of a ``randint`` call (``randint(high, size)`` or ``randint(low, high, size)``)."""
    positional = list(args)
    names = ["low", "high", "size"] if len(positional) + sum(k in kwargs for k in ("low", "high", "size")) == 3 \
        else ["high", "size"]
    values = dict(zip(names, positional))
    for name in names[len(positional):]:
        if name not in kwargs:
            return None
        values[name] = kwargs[name]
    return values.get("low", 0), values["high"], values["size"]


def _symbolic(size: Any) -> bool:
    return isinstance(size, (list, tuple, torch.Size)) and any(isinstance(s, torch.SymInt) for s in size)


class GeneratorDrawsWithSymbolicSizes(torch.overrides.TorchFunctionMode):
    """While capturing with symbols: ``rand`` / ``randn`` / ``randint`` with a generator and symbolic sizes as the
    ``*_like`` draw of an empty tensor (NOTE [Generator draws with symbolic sizes])."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        if (func is torch.rand or func is torch.randn or func is torch.randint) and kwargs.get("generator") is not None:
            made = self._draw(func, args, kwargs)
            if made is not None:
                return made
        return func(*args, **kwargs)

    @staticmethod
    def _draw(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        other = set(kwargs) - _FACTORY_KEYWORDS - {"generator", "requires_grad", "size", "low", "high"}
        if other:  # out=, names=: torch decides
            return None
        if func is torch.randint:
            bounds = _randint_bounds(args, kwargs)
            if bounds is None:
                return None
            low, high, size = bounds
            dtype = kwargs.get("dtype") or torch.int64
        else:
            size = _size(args, kwargs)
            dtype = kwargs.get("dtype")
        if not _symbolic(size):
            return None
        factory = {key: kwargs[key] for key in _FACTORY_KEYWORDS if key in kwargs}
        factory["dtype"] = dtype
        empty = torch.empty(tuple(size), **factory)
        generator = kwargs["generator"]
        if func is torch.rand:
            result = torch.rand_like(empty, generator=generator)
        elif func is torch.randn:
            result = torch.randn_like(empty, generator=generator)
        else:
            result = torch.randint_like(empty, low, high, generator=generator)
        if kwargs.get("requires_grad"):
            result.requires_grad_(True)
        return result
