"""Compiled callables of PyTorch's boxed calling convention (one list of inputs, which the callee may clear) adapted
once, at compile time, to the positional calls of aotcache's runtime (NOTE [boxed compilers])."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["unboxed", "torch_nop_by_name"]


class _BoxedCall:
    """Calls a boxed compiled function (``fn(list_of_args)``) with positional arguments.

    Other attributes (``artifact``, ``output_strides``, ...) are read from the wrapped function, so an adapted
    compiler output keeps whatever optional parts of the contract it offers.
    """

    __slots__ = ("boxed",)

    def __init__(self, boxed: Callable) -> None:
        self.boxed = boxed

    def __call__(self, *args: Any) -> Any:
        return self.boxed(list(args))  # a fresh list: boxed callees may clear it to free inputs early

    def __getattr__(self, name: str) -> Any:
        return getattr(self.boxed, name)


def unboxed(compiled: Callable) -> Callable:
    """``compiled`` callable as ``compiled(*args)``.

    NOTE [boxed compilers]: PyTorch's compilers (``functorch.compile.nop``, ``make_boxed_func``, Inductor's
    ``compile_fx_inner``) mark their result ``_boxed_call = True``: it takes one list of inputs, which it may
    clear. aotcache's runtime calls graphs with positional arguments, so it adapts those once, at compile time.
    """
    if getattr(compiled, "_boxed_call", False) is True:
        return _BoxedCall(compiled)
    return compiled


def torch_nop_by_name(compiler: Any) -> Any:
    """``"nop"`` for PyTorch's own ``functorch.compile.nop``, anything else unchanged.

    NOTE [PyTorch's nop compiler by name]: code written for PyTorch's ``aot_function(f, nop)`` (its tests, tutorials)
    passes ``functorch.compile.nop``, whose output is the graph itself, boxed: no ``artifact()``, so no graph it
    compiled was ever stored ("compiler output not storable", found running PyTorch's test_aotdispatch.py in session
    27) and every process compiled again. It runs the graph as aotcache's ``"nop"`` compiler does, which stores it;
    recognised by identity (the module is imported whenever a caller holds its ``nop``)."""
    module = sys.modules.get("torch._functorch.compilers")
    if module is not None and compiler is getattr(module, "nop", None):
        return "nop"
    return compiler
