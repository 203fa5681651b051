"""``torch._check_tensor_all`` inside a capture: a runtime check in the graph instead of a data-dependent read.

NOTE [Tensor checks in a capture]
``torch._check_tensor_all(cond)`` reads ``cond.all()`` on the host (``.item()``) and raises when it is False.
Libraries call it where they see tracing, as the trace-friendly form of ``if not cond: raise``: transformers'
``torch_compilable_check`` (131 model files of 5.25.0 call it; the placeholder-count check of its multimodal
models, Gemma3, Llava, Qwen2-VL and others, has a tensor condition) calls it whenever
``torch.compiler.is_compiling()``, which a capture sets (NOTE [is_compiling during capture]). On fake tensors
that read has no value, so the capture failed: such a model took the Dynamo way, and with ``fullgraph=True``
raised where ``torch.compile`` (whose Dynamo puts the check in its graph as a runtime assertion) runs. In a
capture, the check is traced as ``torch._assert_async(cond.all(), message)``: the compiled graph checks the real
values at every call and raises a RuntimeError when the condition is False, as torch.compile's graph does (eager
raises with the code's own message, which may format tensor values and so cannot be traced; transformers' eager
path raises a ValueError). Nothing uses the assertion's result, so the partitioners keep it
in the training forward as a side effect (NOTE [Random draws nothing uses] in partition.py).

The capture's function runs under a torch-function mode (thread-local, like the capture) that answers the
host read the check makes, ``cond._is_all_true()``, with the graph assertion and a value whose ``.item()`` is
True: ``torch._check_tensor_all_with`` (which ``torch._check_tensor_all`` calls) passes on, and nothing of torch
is replaced (so a direct ``torch._check_tensor_all_with`` is traced too, and ``torch.compile(backend="aotcache")``,
whose Dynamo graph reads ``_is_all_true().item()``, captures it). A torch-function mode is off while it handles a
call, so for the whole ``torch.autograd.grad`` of the joint trace: each autograd node that may run the program's
Python pushes the mode while it runs (:func:`tensor_checks_in_backward`), for a custom backward's check and a
checkpointed region's recomputation. It was replaced before (``torch._check_tensor_all_with``, process-wide while
any thread captured), which broke three ways (found in the session-14 review): the capture saves and puts back the
Python state its function reads between its runs (NOTE [State changed by a capture]), and it read the replacement
and the counter of captures, so a capture's second run found torch's function back and failed, and the counter went
negative; Dynamo's handler of ``torch._check_tensor_all_with`` reads its arguments by comparing itself with torch's
attribute, so a ``torch.compile`` in another thread tracing a call of it failed with fullgraph=True; and Dynamo's
table of handlers, when first built during a capture, kept the replacement for good.

NOTE [Cost of the tensor-check mode]
A torch-function mode sends every torch call of its thread through its Python handler, torch's own tracing
machinery included: describing a real tensor to make its fake one (``meta_utils``), the fake and proxy modes'
property reads, the capture's own analysis. Session 14 pushed it around the whole capture and on every node of
the traced backward: a 2-layer BERT's dynamic inference capture went 7843 times through the handler, 161 times
with the mode on only while the model runs; cold captures took 4.7% more CPU time than without the mode
(geometric mean over tiny BERT, GPT-2, Llama and a conv net; ``bench/tensor_check_mode.py``, docs/aot.md), now
not measurably more. The checks can only come from the program's Python, so the mode is on only while it runs:
around the captured function (:func:`checking_tensors`, each of its runs)
and around the backward nodes that run the program's Python (:func:`_runs_python`): a custom
``autograd.Function``'s backward, and a node with a saved tensor whose unpack hook is Python (a non-reentrant
checkpoint recomputing its region there, a ``saved_tensors_hooks`` of the function). Autograd's own formulas
(C++) reach no check, and a tensor hook the function registers is refused (NOTE [Module backward
hooks] in module_refusals.py).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["checking_tensors", "tensor_checks_in_graph", "tensor_checks_in_backward"]

_MESSAGE = ("torch._check_tensor_all: a condition of the compiled code was False (eager raises here, with the "
            "code's message)")


class _Passed:
    """What the host read of a check traced as a graph assertion gives: a condition that holds."""

    __slots__ = ()

    def item(self) -> bool:
        return True

    def __bool__(self) -> bool:
        return True


_PASSED = _Passed()


class _TensorChecksAsAssertions(TorchFunctionMode):
    """``cond._is_all_true()`` (the host read of ``torch._check_tensor_all``) as a graph assertion."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if (func is torch.Tensor._is_all_true or func is torch._is_all_true) and len(args) == 1 and not kwargs \
                and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool:
            torch._assert_async(args[0].all(), _MESSAGE)
            return _PASSED
        return func(*args, **(kwargs or {}))


_this_thread = threading.local()


@contextlib.contextmanager
def tensor_checks_in_graph() -> Iterator[None]:
    """Trace ``torch._check_tensor_all`` in this thread's capture as a graph assertion (NOTE [Tensor checks in a
    capture]): the block is a capture, whose function runs under :func:`checking_tensors` and whose joint trace's
    backward under :func:`tensor_checks_in_backward`. Pushes no mode itself (NOTE [Cost of the tensor-check
    mode])."""
    depth = getattr(_this_thread, "depth", 0)
    try:  # set inside the try (NOTE [Interrupted captures] in capture_threads.py)
        _this_thread.depth = depth + 1
        yield
    finally:
        _this_thread.depth = depth


def checking_tensors(fn: Callable) -> Callable:
    """``fn`` with the mode that traces tensor checks on while it runs, inside a :func:`tensor_checks_in_graph`
    block (elsewhere ``fn`` itself runs)."""

    def run_checking_tensors(*args: Any) -> Any:
        if not getattr(_this_thread, "depth", 0):
            return fn(*args)
        with _TensorChecksAsAssertions():
            return fn(*args)

    return run_checking_tensors


def _runs_python(node: Any) -> bool:
    """Whether running autograd ``node`` may run Python code of the program: a custom ``autograd.Function``'s
    backward, or the unpack hook of a saved tensor (a non-reentrant checkpoint's recomputation of its region)."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return True
    for name in _saved_tensor_attributes(type(node)):
        saved = getattr(node, name, None)
        for one in saved if isinstance(saved, (list, tuple)) else (saved,):
            if getattr(one, "unpack_hook", None) is not None:
                return True
    return False


@functools.lru_cache(maxsize=None)
def _saved_tensor_attributes(node_type: type) -> tuple[str, ...]:
    """The attributes of an autograd node type that hold its saved tensors unpacked (``_raw_saved_<name>``)."""
    return tuple(name for name in dir(node_type) if name.startswith("_raw_saved_"))


@contextlib.contextmanager
def tensor_checks_in_backward(nodes: Sequence[Any]) -> Iterator[None]:
    """The mode of :func:`checking_tensors` on while each of the autograd ``nodes`` that may run the program's
    Python runs, in the joint trace's ``torch.autograd.grad`` (NOTE [Tensor checks in a capture]; as NOTE [Checks
    inside custom backwards] does for its own mode)."""
    if not getattr(_this_thread, "depth", 0):
        yield
        return
    mode = _TensorChecksAsAssertions()
    handles = []

    def push(grad_outputs: Any) -> None:
        torch._C._push_on_torch_function_stack(mode)

    def pop(grad_inputs: Any, grad_outputs: Any) -> None:
        _remove(mode)

    for node in nodes:
        if _runs_python(node):
            handles.append(node.register_prehook(push))
            handles.append(node.register_hook(pop))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while _remove(mode):  # pushed by a node that raised
            pass


def _remove(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's torch-function stack wherever it is (another mode's hooks may have pushed
    theirs after it), keeping the order of the others; whether it was there."""
    above = []
    found = False
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            found = True
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    return found
