"""torch's mode stacks put back after an interrupted trace: every place aotcache traces (a capture, the compile
of a captured graph, a per-op kernel's AOTInductor compile) runs inside :func:`torch_modes_kept`.

Below the aot core and the per-op kernel cache (torch only), so that the per-op cache's compile path does not
import the aot core to use it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

__all__ = ["torch_modes_kept"]

# torch.utils._python_dispatch's flags of being inside a dispatch mode (NOTE [Modes left by an interrupted capture])
_DISPATCH_MODE_FLAGS = ("_is_in_torch_dispatch_mode", "_is_in_non_infra_torch_dispatch_mode",
                        "_is_in_any_mode_without_ignore_compile_internals")


@contextlib.contextmanager
def torch_modes_kept() -> Iterator[None]:
    """NOTE [Modes left by an interrupted capture]
    torch's tracing pushes its modes (fake tensors, proxies, functionalization) in ``with`` blocks, whose
    ``__exit__`` pops them in several Python steps. An exception raised asynchronously inside such a step (Ctrl-C,
    pytest-timeout's signal, any signal handler) left the mode on this thread's stack: every later call of every
    compiled function then ran under an active FakeTensorMode, was refused as "the call runs under a torch
    dispatch mode" and ran eagerly (found running PyTorch's OpInfo tests with pytest-timeout: after one test was
    interrupted, each later one fell back, ``eager:unsupported_construct``). When a traced step ends in an
    exception, the dispatch modes it left (not on the stack when it began) and the torch-function modes above the
    depth it began at are popped, innermost first, before the exception goes on. Modes the caller had entered
    stay. torch's flags of being inside a dispatch mode, set and put back by the same ``__enter__`` / ``__exit__``,
    are put back as the step found them when it left a mode (left True, Dynamo skips every frame where
    ``inline_torch_dispatch_torch_compile`` is off). The traced steps: a capture (aot/capture.py), the partition
    and compile of a captured graph (Inductor's FakeTensorMode and tracing, AOTInductor's export:
    ``compile_captured`` in aot/compile_step.py) and a per-op kernel's compile (eager/compile.py); the same
    interrupt inside Inductor's compile of a per-op graph left the process's later eager calls under fake
    tensors."""
    c = torch._C
    length, at, pop = (getattr(c, name, None) for name in (
        "_len_torch_dispatch_stack", "_get_dispatch_stack_at", "_pop_torch_dispatch_stack"))
    if length is None or at is None or pop is None:  # feature-detected: such a torch pops nothing
        yield
        return
    dispatch_before = [at(i) for i in range(length())]
    functions_before = c._len_torch_function_stack()
    python_dispatch = sys.modules.get("torch.utils._python_dispatch")
    flags_before = {name: getattr(python_dispatch, name) for name in _DISPATCH_MODE_FLAGS
                    if python_dispatch is not None and hasattr(python_dispatch, name)}
    try:
        yield
    except BaseException:
        def left() -> list:
            return [mode for mode in (at(i) for i in range(length())) if all(mode is not b for b in dispatch_before)]

        if left():  # only then: the flags are process-wide, and another thread's mode may have set them meanwhile
            for name, value in flags_before.items():
                setattr(python_dispatch, name, value)
        for _ in range(length()):  # bounded: each turn pops one mode
            modes = left()
            if not modes:
                break
            pop(getattr(modes[-1], "_mode_key", None))  # an infra mode (fake, proxy, functional) by its key
        while c._len_torch_function_stack() > functions_before:
            c._pop_torch_function_stack()
        raise
