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

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["stance_forces_eager", "torch_compile", "torch_compiled_callables_as_python"]


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
    if _captures_forcing_eager:  # the stance is a capture's own (NOTE [torch.compile-d callables inside a capture])
        stance = _stance_before_captures
    return getattr(stance, "stance", None) == "force_eager"


# NOTE [torch.compile-d callables inside a capture]
# A forward may call a torch.compile-d callable, compiled where it is called: transformers' flex_attention masks
# call torch.compile(create_block_mask)(...) inside the model's forward. torch's own tracers run such a callable's
# Python (make_fx and export skip Dynamo while they trace), but they recognise themselves through flags that
# aotcache's capture cannot set alone: is_fx_symbolic_tracing() is False while torch.compiler.is_compiling() is
# True (NOTE [is_compiling during capture]). So Dynamo compiled the callable on the capture's fake tensors (its
# tensors came from a closure, not arguments) and ran the compiled code on them: Inductor's kernels read the
# fake tensors' memory, and Llama with attn_implementation="flex_attention" under aotcache.compile ended the
# process with a segmentation fault in its first generate; with other backends Dynamo traced aotcache's own
# capture modes. A capture now runs with Dynamo's stance "force_eager", so a torch.compile-d callable runs its
# Python and is captured as part of the call, as torch's tracers do (aotcache's own wrappers are inlined anyway:
# NOTE [Nested compiled functions]). Dynamo's stance is one for the process: while a capture runs, other
# threads' torch.compile-d callables run eagerly too (eager's results), and the first capture to start sets it
# and the last to end restores the stance before them. aotcache.compile keeps following the caller's stance,
# not this one (stance_forces_eager). Where Dynamo refuses the change (a capture started inside a running
# Dynamo frame) the capture goes on as before.
_stance_lock = threading.Lock()
_captures_forcing_eager = 0
_stance_before_captures: Any = None
_stance_setter: Any = None


@contextlib.contextmanager
def torch_compiled_callables_as_python() -> Iterator[None]:
    """Run torch.compile-d callables as their Python while a capture traces (NOTE [torch.compile-d callables
    inside a capture])."""
    global _captures_forcing_eager, _stance_before_captures, _stance_setter
    entered = False
    try:
        with _stance_lock:
            if _captures_forcing_eager == 0:
                eval_frame = sys.modules.get("torch._dynamo.eval_frame")
                before = getattr(eval_frame, "_stance", None)
                try:
                    setter = torch.compiler.set_stance("force_eager")  # sets the stance as it is made
                except RuntimeError:  # inside a running torch.compile region: Dynamo refuses a stance change
                    setter = None
                if setter is not None:
                    _stance_before_captures, _stance_setter = before, setter
            if _captures_forcing_eager or _stance_setter is not None:
                _captures_forcing_eager, entered = _captures_forcing_eager + 1, True
        yield
    finally:
        if entered:
            with _stance_lock:
                _captures_forcing_eager -= 1
                if _captures_forcing_eager == 0:
                    setter, _stance_setter, _stance_before_captures = _stance_setter, None, None
                    setter.__exit__(None, None, None)  # the stance before the first capture
