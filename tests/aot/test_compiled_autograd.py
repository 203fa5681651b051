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


# Backward programs that differ between argv[1] == "a" and "b" only in a node's attribute, which compiled autograd
# passes to its op as a constant of the graph text (ATTRIBUTES), or only in values the graph reads as inputs: saved
# tensors, a saved scalar (a wrapped-number tensor), sizes compiled autograd lifts (VALUES, narrow's start over two
# sizes). Prints, per program, eager's and compiled autograd's largest gradient difference and the cache's counts.
_ATTRIBUTE_PROGRAM = """
import functools, json, sys, torch
from torch._dynamo import compiled_autograd
from aotcache.autograd_cache.cache import resolve_cache
from aotcache.backend import aotcache_backend

variant = sys.argv[1]
a = variant == "a"
weights = torch.arange(12.0).view(3, 4)


def leaf(rows=3, seed=0):
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_()


# Backward programs whose node attributes differ between the variants: a new process must miss.
ATTRIBUTES = {
    "add_alpha": lambda x: (torch.add(x, x.cos(), alpha=2.0 if a else 3.0) * weights).sum(),
    "leaky_relu_slope": lambda x: (torch.nn.functional.leaky_relu(x, 0.1 if a else 0.2) * weights).sum(),
    "softmax_dim": lambda x: (torch.softmax(x, 0 if a else 1) * weights).sum(),
    "mse_reduction": lambda x: torch.nn.functional.mse_loss(x, weights, reduction="mean" if a else "sum"),
    "gelu_approximate": lambda x: (torch.nn.functional.gelu(x, approximate="none" if a else "tanh") * weights).sum(),
}
# Backward programs whose differences are values the graph reads as inputs (saved tensors, a hook's tensor,
# lifted sizes): a new process must hit, with eager's gradients.
VALUES = {
    "mul_by_scalar": lambda x: (x * (2.0 if a else 5.0) * weights).sum(),
    "gather_index": lambda x: (x.gather(1, torch.tensor([[0], [1], [2]] if a else [[3], [2], [1]])) * 3).sum(),
    "narrow_start": lambda x: (x.narrow(0, 2 if a else 3, 2) * weights[:2]).sum(),
}


def grads(fn, compiler_fn, rows):
    context = compiled_autograd._enable(compiler_fn) if compiler_fn else torch.autograd.set_grad_enabled(True)
    result = []
    with context:
        for step, n in enumerate(rows):  # two sizes: compiled autograd's dynamic graph for the lifted sizes
            x = leaf(n, step)
            fn(x).backward()
            result.append(x.grad)
    return result


cache = resolve_cache(True)
compiler = torch.compile(backend=functools.partial(aotcache_backend, compiler="nop"))
report = {}
for name, fn in {**ATTRIBUTES, **VALUES}.items():
    rows = [5, 6] if name == "narrow_start" else [3]
    before = dict(cache.counters)
    eager = grads(fn, None, rows)
    compiled = grads(fn, compiler, rows)
    counts = {k: cache.counters.get(k, 0) - before.get(k, 0) for k in ("hit", "miss", "bypass")}
    worst = max((e - c).abs().max().item() for e, c in zip(eager, compiled))
    report[name] = {"worst": worst, **counts}
print(json.dumps(report))
"""


def test_compiled_autograd_backward_graphs_key_node_attributes_and_not_input_values(isolated_cache_dir):
    """NOTE [Compiled autograd's ops in the key]: a backward whose node attribute differs (add's alpha, leaky_relu's
    slope, softmax's dim, a loss's reduction, gelu's approximate) misses in a new process; one whose differences
    are the graph's inputs (a saved tensor, a saved scalar, narrow's start lifted by compiled autograd) loads the
    first process's graphs; every gradient is eager's."""
    import json

    from tests.conftest import run_python

    runs = {}
    for variant in ("a", "b"):
        proc = run_python("import sys; sys.argv = ['-', %r]\n" % variant + _ATTRIBUTE_PROGRAM)
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    for variant, report in runs.items():
        for name, run in report.items():
            assert run["worst"] < 1e-5 and run["bypass"] == 0, (variant, name, run)
            assert variant == "b" or (run["miss"] >= 1 and run["hit"] == 0), (variant, name, run)
    attributes = ("add_alpha", "leaky_relu_slope", "softmax_dim", "mse_reduction", "gelu_approximate")
    for name in attributes:
        assert runs["b"][name]["hit"] == 0 and runs["b"][name]["miss"] == runs["a"][name]["miss"], (name, runs)
    for name in ("mul_by_scalar", "gather_index", "narrow_start"):
        assert runs["b"][name]["miss"] == 0 and runs["b"][name]["hit"] == runs["a"][name]["miss"], (name, runs)


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
    # ops.add refuses a name it already holds: a fresh name lets the test run twice in one process
    not_a_node = f"S15NotATorchNode{len(vars(compiled_autograd.ops))}"
    unknown = compiled_autograd.ops.get(compiled_autograd.ops.add(not_a_node, builtin_fn, False, True))
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
