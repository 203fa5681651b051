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


# A training step whose backward compiled autograd hands to backend="aotcache"; prints the gradients (against
# eager's) and the cache's counters. argv[1] picks the activation, so that a second program differs only in the
# backward ops it calls.
_BACKWARD_PROGRAM = """
import functools, json, sys, torch
from torch._dynamo import compiled_autograd
from aotcache.autograd_cache.cache import resolve_cache
from aotcache.backend import aotcache_backend

activation = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[sys.argv[1]]

def grads(compiler_fn):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), activation(), torch.nn.Linear(8, 2))
    context = compiled_autograd._enable(compiler_fn) if compiler_fn else torch.autograd.set_grad_enabled(True)
    with context:
        for step in range(2):
            model(torch.randn(3, 4, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]

eager = grads(None)
compiled = grads(torch.compile(backend=functools.partial(aotcache_backend, compiler="nop")))
worst = max((a - b).abs().max().item() for a, b in zip(eager, compiled))
counters = {k: v for k, v in resolve_cache(True).counters.items() if isinstance(v, int)}
print(json.dumps({"worst": worst, **counters}))
"""


def _run_backward_program(activation: str) -> dict:
    import json

    from tests.conftest import run_python

    proc = run_python("import sys; sys.argv = ['-', %r]\n" % activation + _BACKWARD_PROGRAM)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiled_autograd_backward_graphs_are_stored_and_a_new_process_loads_them(isolated_cache_dir):
    """NOTE [Compiled autograd's ops in the key]: compiled autograd's backward graphs call its ops for torch's own
    autograd nodes, which bypassed the cache (compiled in every process); now a second process loads them and
    compiles nothing, and a backward program calling other ops (tanh's backward for relu's) misses."""
    cold = _run_backward_program("relu")
    warm = _run_backward_program("relu")
    other = _run_backward_program("tanh")
    for run in (cold, warm, other):
        assert run["worst"] < 1e-5, run
        assert run.get("bypass", 0) == 0, run
    assert cold.get("miss", 0) >= 1 and cold.get("compile", 0) == cold["miss"] and cold.get("saved", 0) == cold["miss"]
    assert warm.get("hit", 0) == cold["miss"] and warm.get("miss", 0) == 0 and warm.get("compile", 0) == 0, warm
    assert other.get("hit", 0) == 0 and other.get("miss", 0) >= 1, other


def _graph_calling(target) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    grad = graph.placeholder("grad")
    graph.output(graph.call_function(target, ([grad],)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_compiled_autograd_ops_of_custom_cpp_functions_and_unknown_nodes_are_not_trusted():
    """NOTE [Compiled autograd's ops in the key]: an op of a custom C++ autograd Function (``CppNode<name><n>``,
    numbered per process, its code in an extension) or of a node that is not one of torch's own is a bypass;
    an op of torch's own node is not."""
    import pytest
    from torch._dynamo import compiled_autograd

    from aotcache.autograd_cache.safety import BypassAOTAutogradCache, check_node_safe

    builtin_fn = torch._C._get_tracing_state  # any C++ function: what the op wraps is not what is judged
    custom = compiled_autograd.ops.get(compiled_autograd.ops.add("S15Custom", builtin_fn, True, True))
    unknown = compiled_autograd.ops.get(compiled_autograd.ops.add("S15NotATorchNode", builtin_fn, False, True))
    for op in (custom, unknown):
        node = next(n for n in _graph_calling(op).graph.nodes if n.op == "call_function")
        with pytest.raises(BypassAOTAutogradCache, match="unsafe call: torch._dynamo.compiled_autograd.ops"):
            check_node_safe(node)
    model = torch.nn.Linear(2, 2)
    with compiled_autograd._enable(lambda gm: gm):
        model(torch.randn(1, 2)).sum().backward()
    node = next(n for n in _graph_calling(compiled_autograd.ops.get("AccumulateGrad")).graph.nodes
                if n.op == "call_function")
    check_node_safe(node)  # torch's own node: safe
