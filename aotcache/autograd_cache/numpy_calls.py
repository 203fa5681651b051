"""Dynamo's wrappers of NumPy calls in a graph, named for the cache key (NOTE [NumPy calls in a Dynamo graph])."""

from __future__ import annotations

import operator
import os
import sys
from typing import Any

# NOTE [NumPy calls in a Dynamo graph]
# Dynamo traces NumPy code through ``torch._numpy`` and puts each call in its graph as an *instance* of one of three
# small classes of ``torch._dynamo.utils``: ``numpy_to_tensor_wrapper(f)`` (a ``torch._numpy`` function such as
# ``round``), ``numpy_method_wrapper(name)`` (an ndarray method: ``a.max()``) and ``numpy_operator_wrapper(op)`` (an
# ndarray operator: ``a + a`` with ``operator.add``); attributes go through the module function
# ``numpy_attr_wrapper(obj, name)``, the name a constant argument. An instance has no qualified name of its own
# (``wrapped_round`` is all it says), so every such graph was refused ("unsafe call") and compiled again in every
# process. What one computes is fixed by the torch build (in the key) and by what it wraps, which the token below
# spells out: the wrapped function's module and name (only ``torch._numpy``'s module-level functions, or their
# normalizing decoration, which ``functools.wraps`` names after them), the method name, or the ``operator``
# function. The wrapped function's code must also be in ``torch._numpy``'s files: ``functools.wraps`` lends any
# function that module, name and ``__wrapped__`` (a program that patched ``torch._numpy.round`` with such a function
# hit the real ``round``'s entry). A wrapper of anything else stays refused.
# ``torch._numpy`` also reads its default dtypes (``torch._dynamo.config.numpy_default_float`` / ``_complex`` /
# ``_int``, fixed per process at its first use): ``np.linspace(0, 1, 3)`` is float64 in one process and float32 in
# another, in a graph whose text is the same. So every token carries the process's defaults: a process with other
# defaults misses instead of running a graph traced for the old ones.
_WRAPPER_ATTRIBUTE = {"numpy_to_tensor_wrapper": "f", "numpy_method_wrapper": "method",
                      "numpy_operator_wrapper": "op"}


def numpy_call_token(target: Any) -> str | None:
    """The key's name for ``target`` when it is one of Dynamo's NumPy call wrappers over something the torch build
    fixes; None for anything else (NOTE [NumPy calls in a Dynamo graph])."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return None
    if target is getattr(utils, "numpy_attr_wrapper", None):  # the attribute's name is an argument of the call
        return f"torch._dynamo.utils.numpy_attr_wrapper{_default_dtypes()}"
    kind = type(target).__name__
    attribute = _WRAPPER_ATTRIBUTE.get(kind)
    if attribute is None or getattr(utils, kind, None) is not type(target):
        return None
    wrapped = getattr(target, attribute, None)
    if kind == "numpy_method_wrapper":
        return f"torch._dynamo.utils.{kind}({wrapped}){_default_dtypes()}" \
            if isinstance(wrapped, str) and wrapped.isidentifier() else None
    if kind == "numpy_operator_wrapper":
        name = getattr(wrapped, "__name__", None)
        return f"torch._dynamo.utils.{kind}(operator.{name}){_default_dtypes()}" \
            if isinstance(name, str) and getattr(operator, name, None) is wrapped else None
    module = getattr(wrapped, "__module__", None) or ""
    name = getattr(wrapped, "__qualname__", None)
    if not (module == "torch._numpy" or module.startswith("torch._numpy.")) or not isinstance(name, str) \
            or "<" in name:
        return None
    resolved = _resolve(module, name)  # the module-level function, or the one torch._numpy's decorator wraps
    if resolved is None or (resolved is not wrapped and resolved is not getattr(wrapped, "__wrapped__", None)):
        return None
    if not _code_is_torch_numpys(wrapped):  # functools.wraps lends any function torch._numpy's name
        return None
    return f"torch._dynamo.utils.{kind}({module}.{name}){_default_dtypes()}"


def _default_dtypes() -> str:
    """``torch._numpy``'s default float / complex / int dtypes in this process, as the token's suffix."""
    from torch._numpy import _dtypes_impl

    defaults = _dtypes_impl.default_dtypes()
    return f"[defaults {defaults.float_dtype}, {defaults.complex_dtype}, {defaults.int_dtype}]"


def _code_is_torch_numpys(fn: Any) -> bool:
    """Whether ``fn``'s code is in ``torch._numpy``'s files: its module and name alone can be borrowed
    (``functools.wraps(torch._numpy._funcs_impl.round)(my_round)`` says it is ``round``)."""
    import torch._numpy

    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    package = os.path.dirname(os.path.abspath(torch._numpy.__file__)) + os.sep
    return os.path.abspath(code.co_filename).startswith(package)


def _resolve(module: str, qualname: str) -> Any:
    """The object ``module.qualname`` names in this process, or None."""
    value: Any = sys.modules.get(module)
    for part in qualname.split("."):
        value = getattr(value, part, None)
    return value
