"""An interrupt (Ctrl-C, pytest-timeout's signal) inside a per-op kernel's AOTInductor compile leaves torch's mode
stacks and flags as they were and no index entry; the next precompile compiles and dispatch then hits (NOTE [Modes
left by an interrupted capture] in aotcache/torch_modes.py). Real AOTInductor compiles (slow)."""

from __future__ import annotations

import pytest
import torch

import aotcache.eager as eager
from aotcache.compilers import aoti_lib
from aotcache.eager.index import OpIndex
from aotcache.eager.meta import op_file_name
from tests.aot.test_interrupted_capture import _InterruptAfter
from tests.aot.test_interrupted_compile import MODE_EXITS, outside_torch_dispatch

pytestmark = pytest.mark.slow
aten = torch.ops.aten


def _modes() -> dict:
    return {"torch dispatch modes": torch._C._len_torch_dispatch_stack(),
            "torch function modes": torch._C._len_torch_function_stack(),
            "in a torch dispatch mode": torch.utils._python_dispatch.is_in_torch_dispatch_mode()}


def _index_entries(op) -> list:
    return list(OpIndex(op.namespace, op_file_name(op), "cpu").read().entries)


@pytest.fixture(autouse=True)
def _stock_kernels():
    eager.reset_stats()
    yield
    eager.disable()


@pytest.mark.parametrize("point", list(MODE_EXITS))
def test_interrupted_precompile_leaves_no_mode_and_no_entry_then_compiles(point):
    clean = _modes()
    assert clean == {"torch dispatch modes": 0, "torch function modes": 0, "in a torch dispatch mode": False}
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(KeyboardInterrupt), _InterruptAfter(MODE_EXITS[point](), None, inside=aoti_lib.build_library,
                                                           where=outside_torch_dispatch) as injected:
        eager.precompile(aten.mul.Tensor, (a, b))
    assert injected.fired
    assert _modes() == clean
    assert _index_entries(aten.mul.Tensor) == []  # nothing half-written: the index is appended after the compile

    assert eager.precompile(aten.mul.Tensor, (a, b)).status == "compiled"
    assert eager.precompile(aten.mul.Tensor, (a, b)).status == "exists"
    expected = a * b
    with eager.enabled([aten.mul.Tensor]):
        out = torch.mul(a, b)
    torch.testing.assert_close(out, expected)
    assert eager.stats()["hits"] == 1 and eager.stats()["compiles"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected interrupt
def test_interrupted_compile_on_miss_leaves_the_dispatch_flags_and_no_entry():
    """Compile on miss runs on a helper thread (NOTE [compile on a fresh thread]): its modes die with the thread,
    but torch's in-dispatch-mode flags are process-wide, and were left True for every later call."""
    clean = _modes()
    a, b = torch.randn(5, 2), torch.randn(5, 2)
    expected = a - b
    with eager.enabled([aten.sub.Tensor], compile_on_miss=True):
        with _InterruptAfter(MODE_EXITS["torch exits a dispatch mode"](), None, inside=aoti_lib.build_library,
                             where=outside_torch_dispatch, threads=True) as injected:
            first = torch.sub(a, b)  # the interrupt ends the helper thread; this call ran the stock kernel
    assert injected.fired
    assert _modes() == clean
    torch.testing.assert_close(first, expected)
    assert _index_entries(aten.sub.Tensor) == []
    assert eager.precompile(aten.sub.Tensor, (a, b)).status == "compiled"
    eager.reset_stats()
    with eager.enabled([aten.sub.Tensor]):
        out = torch.sub(a, b)
    torch.testing.assert_close(out, expected)
    assert eager.stats()["hits"] == 1
