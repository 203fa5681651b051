"""An interrupt (Ctrl-C, pytest-timeout's signal) inside the compile of a captured graph, after the capture, leaves
no torch mode pushed (NOTE [Modes left by an interrupted capture] in aotcache/torch_modes.py): compilers and
partitioners trace the graph again (Inductor's fake tensors, AOTInductor's export, a user compiler's make_fx).

Injected as in test_interrupted_capture.py: KeyboardInterrupt at torch's own mode exit, once the compiler runs."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import aotcache
from aotcache.aot.fallback import fallback_counts
from tests.aot.test_interrupted_capture import _InterruptAfter, _state_left

MODE_EXITS = {  # torch's mode exits, interrupted before they pop the mode
    "torch pops a dispatch mode": lambda: torch.utils._python_dispatch._pop_mode,
    "torch exits a dispatch mode": lambda: torch.utils._python_dispatch.TorchDispatchMode.__exit__,
}


def outside_torch_dispatch(frame) -> bool:
    """A mode exit not nested in an op's dispatch: an exception raised inside ``__torch_dispatch__`` unwinds
    through torch's C++ dispatcher, which aborts the process on a Python-side mode stack it did not expect (a
    torch limit: the signal would abort there too, and nothing left behind could matter)."""
    while frame is not None:
        if frame.f_code.co_name in ("__torch_dispatch__", "__torch_function__"):
            return False
        frame = frame.f_back
    return True


def retracing_compiler(gm: torch.fx.GraphModule, example_inputs):
    """A compiler that traces the graph again on fake tensors (as Inductor and AOTInductor's export do)."""
    make_fx(gm, tracing_mode="fake")(*example_inputs)
    return gm


def _f(x, w):
    return torch.tanh(x @ w).sum(-1)


@pytest.mark.parametrize("point", list(MODE_EXITS))
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_interrupt_inside_a_compiler_leaves_no_mode_and_later_compiles_work(point, grad):
    clean = _state_left()
    assert clean["torch dispatch modes"] == clean["torch function modes"] == 0
    x, w = torch.randn(4, 8, requires_grad=grad), torch.randn(8, 3, requires_grad=grad)
    compiled = aotcache.aot_function(_f, retracing_compiler, cache=False, on_capture_error="raise")
    with pytest.raises(KeyboardInterrupt), _InterruptAfter(MODE_EXITS[point](), None, inside=retracing_compiler,
                                                           where=outside_torch_dispatch) as injected:
        compiled(x, w)
    assert injected.fired
    assert _state_left() == clean

    before = fallback_counts()
    again = aotcache.aot_function(_f, retracing_compiler, cache=False, on_capture_error="raise")(x, w)
    torch.testing.assert_close(again, _f(x, w))
    if grad:
        again.sum().backward()
        assert x.grad is not None
    torch.testing.assert_close(compiled(x, w), _f(x, w))  # the interrupted function compiles on its next call
    assert fallback_counts() == before
