"""``torch.compile(model, backend="aotcache")`` under compiled autograd (``compiled_autograd._enable``): the
forward graph's capture and compiled autograd's backward graphs, against eager's gradients."""

from __future__ import annotations

import functools

import torch

from aotcache.aot.fallback import fallback_counts
from aotcache.backend import aotcache_backend

_NOP = functools.partial(aotcache_backend, compiler="nop")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _compiled_autograd_captures(forward_backend) -> int:
    """How many backward graphs compiled autograd traces over two training steps of an MLP compiled with
    ``forward_backend``."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_mlp(), backend=forward_backend)
    with compiled_autograd._enable(torch.compile(backend=_NOP)):
        for _ in range(2):
            compiled(torch.randn(4, 8)).sum().backward()
    return counters["compiled_autograd"]["captures"]


def test_the_capture_does_not_run_compiled_autograd():
    """NOTE [Compiled autograd during a capture]: the joint trace's backward is not handed to compiled autograd
    (which traced a backward of fake tensors inside the capture), only each real ``backward()`` is."""
    assert _compiled_autograd_captures(_NOP) == _compiled_autograd_captures("eager")


def _full_backward_hook_steps(backend):
    """Two training steps of an MLP with a full backward hook on its first layer, forward compiled with
    ``backend`` and backward run by compiled autograd: the hook's readings and the gradients."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    model = _mlp()
    readings: list = []
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: readings.append(grad_out[0].sum().item()))
    compiled = torch.compile(model, backend=backend) if backend is not None else model
    grads = []
    for step in range(2):
        torch.manual_seed(step)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            (compiled(torch.randn(4, 8)) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return readings, grads


def test_full_backward_hook_under_compiled_autograd_runs_eagerly_with_eagers_values():
    """NOTE [Hooks compiled autograd runs from a forward graph]: the forward graph's BackwardState input failed
    the compile; now the graph runs eagerly and the hook sees eager's gradients at every step."""
    expected_readings, expected_grads = _full_backward_hook_steps(None)
    before = dict(fallback_counts())
    readings, grads = _full_backward_hook_steps(_NOP)
    assert len(readings) == 2
    torch.testing.assert_close(readings, expected_readings)
    for step, expected in zip(grads, expected_grads):
        for grad, eager in zip(step, expected):
            torch.testing.assert_close(grad, eager)
    assert sum(fallback_counts().values()) > sum(before.values())  # refused, run as Dynamo's graph
