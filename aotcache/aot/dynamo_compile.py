"""torch's own ``torch.compile`` for aotcache's Dynamo ways (the capture fallback, ``aotcache.compile``'s Dynamo
route), also where a program has replaced ``torch.compile`` with a redirect to aotcache.

NOTE [A redirected torch.compile]
A test suite or an application may send every ``torch.compile`` to aotcache by replacing the attribute
(``torch.compile = lambda m, **kw: aotcache.compile(m, **kw)``, as transformers' own test suite wraps it to force
``fullgraph``). aotcache's Dynamo ways called ``torch.compile(target, backend=<aotcache's backend>)``, which then
came back into ``aotcache.compile`` with that backend: a model with a graph break (T5's ``unique_consecutive``
check) failed with a TypeError where torch.compile works. These ways now call torch's own function: the current
``torch.compile`` when it is torch's, else the one seen when this module was first imported, else
``torch._dynamo.optimize`` (what torch.compile itself ends with) for a redirect installed before aotcache was
imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["stance_forces_eager", "torch_compile"]


def _is_torch_own(function: Any) -> bool:
    """Whether ``function`` is the ``compile`` that ``torch/__init__.py`` defines (a wrapper has other code)."""
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != "compile":
        return False
    return os.path.realpath(code.co_filename) == os.path.realpath(torch.__file__)


_SEEN_AT_IMPORT = torch.compile if _is_torch_own(torch.compile) else None


def torch_compile(target: Callable, backend: Callable, dynamic: bool | None) -> Callable:
    """``torch.compile(target, backend=backend, dynamic=dynamic)`` with torch's own function (NOTE [A redirected
    torch.compile])."""
    current = torch.compile
    if _is_torch_own(current):
        return current(target, backend=backend, dynamic=dynamic)
    if _SEEN_AT_IMPORT is not None:
        return _SEEN_AT_IMPORT(target, backend=backend, dynamic=dynamic)
    return torch._dynamo.optimize(backend=backend, dynamic=dynamic)(target)


# NOTE [torch.compiler.set_stance]
# ``with torch.compiler.set_stance("force_eager"):`` runs every torch.compile-d callable as written, uncompiled
# (transformers' generate tests take eager references so, around models whose generate compiles their forward).
# aotcache.compile, shaped like torch.compile, ignored it: its AOT way captured and compiled there. It now runs such
# calls eagerly too. The stance lives in Dynamo's module; when Dynamo is not imported no stance can have been set,
# so the check costs a dictionary lookup and never imports Dynamo (a warm start of the AOT way does not).
# The other stances ("eager_on_recompile", "fail_on_recompile") are Dynamo's recompile policy and not followed.
def stance_forces_eager() -> bool:
    """Whether ``torch.compiler.set_stance("force_eager")`` is in effect (NOTE [torch.compiler.set_stance])."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    stance = getattr(eval_frame, "_stance", None)
    return getattr(stance, "stance", None) == "force_eager"
