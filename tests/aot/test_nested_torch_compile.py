"""A ``torch.compile``-d callable called inside a forward that ``aotcache.compile`` captures runs its Python and is
captured with the call, as torch's own tracers do, instead of being compiled by Dynamo on the capture's fake
tensors (NOTE [torch.compile-d callables inside a capture] in aot/nested_torch_compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import aotcache
from aotcache.aot.dynamo_compile import stance_forces_eager

# NOTE: session 25 set Dynamo's stance "force_eager" for the process during a capture; that broke torch.cond inside
# a capture (torch's cond compiles its branches with Dynamo) and changed other threads' torch.compile, so the choice
# is now made per thread and not inside torch's own higher-order-op compiles: the tests below hold all three.


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from a fresh Dynamo: the helpers' code objects are shared, and Dynamo's recompile limit per
    code object would otherwise make a later test's helper run eagerly whatever the capture does."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _scaled_rows(row_fn, n):
    return row_fn(torch.arange(n, dtype=torch.float32))


class RecordingBackend:
    """A Dynamo backend that notes the kinds of the example inputs of every graph it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, gm, example_inputs):
        self.calls.append([type(t).__name__ for t in example_inputs])
        return gm.forward


class CompilesInside(torch.nn.Module):
    """Calls a torch.compile-d helper made in the forward, whose tensors come from a closure (as transformers'
    flex_attention mask: ``torch.compile(create_block_mask)(mask_mod, ...)``)."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.backend = backend

    def forward(self, x):
        y = self.lin(x)
        rows = torch.compile(_scaled_rows, backend=self.backend)(lambda r: r[None, :] + y, 4)
        return (rows * 2).sum()


def test_a_torch_compiled_helper_inside_a_captured_forward_is_captured_not_compiled_on_fake_tensors():
    """Found: Dynamo compiled the helper during the capture, on the capture's FunctionalTensors (and Inductor's
    kernels then read the fake tensors' memory: Llama + flex_attention ended the process in a segmentation fault).
    Now the helper runs as Python inside the capture: the backend sees no graph, the call is captured whole."""
    backend = RecordingBackend()
    model = CompilesInside(backend)
    x = torch.randn(3, 4)
    wrapped = aotcache.compile(model, compiler="nop")
    out = wrapped(x)
    assert backend.calls == []  # nothing compiled by Dynamo while aotcache captured
    assert wrapped.route == "aot"
    assert torch.equal(out.detach(), model(x).detach())
    out.backward()
    grad = model.lin.weight.grad.clone()
    model.zero_grad()
    model(x).backward()
    torch.testing.assert_close(grad, model.lin.weight.grad, rtol=0, atol=0)


def test_the_callers_stance_is_kept_and_restored_around_a_capture():
    """A capture under the caller's own stance captures and leaves the caller's stance as it was."""
    backend = RecordingBackend()
    with torch.compiler.set_stance("eager_on_recompile"):
        model = CompilesInside(backend)
        wrapped = aotcache.compile(model, compiler="nop")
        out = wrapped(torch.ones(3, 4))
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
    assert torch._dynamo.eval_frame._stance.stance == "default"
    assert wrapped.route == "aot" and backend.calls == []
    assert torch.equal(out.detach(), model(torch.ones(3, 4)).detach())


def test_the_callers_force_eager_stance_still_runs_aotcache_compile_eagerly():
    """The other direction: a caller's ``set_stance("force_eager")`` still runs the wrapper as written."""
    backend = RecordingBackend()
    model = CompilesInside(backend)
    wrapped = aotcache.compile(model, compiler="nop")
    with torch.compiler.set_stance("force_eager"):
        assert stance_forces_eager()
        out = wrapped(torch.ones(3, 4))
    assert not stance_forces_eager()
    assert backend.calls == [] and wrapped.route is None  # run as written: nothing captured, nothing compiled
    assert torch.equal(out.detach(), model(torch.ones(3, 4)).detach())


class Recorder:
    """A nop compiler for aotcache that keeps the graphs it is given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm


def _ops(graphs):
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def _cosh_rows(t):
    return torch.cosh(t) * 3


class CoshRows(torch.nn.Module):
    def forward(self, t):
        return torch.cosh(t) * 3


def _compiled_helper(form, backend, fullgraph):
    """The three forms of a user's compiled callable: torch.compile(fn), the decorator, an OptimizedModule."""
    if form == "function":
        return torch.compile(_cosh_rows, backend=backend, fullgraph=fullgraph)
    if form == "decorator":
        @torch.compile(backend=backend, fullgraph=fullgraph)
        def decorated(t):
            return torch.cosh(t) * 3
        return decorated
    return torch.compile(CoshRows(), backend=backend, fullgraph=fullgraph)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_breaks", "fullgraph"])
@pytest.mark.parametrize("form", ["function", "decorator", "module"])
def test_each_form_of_a_compiled_helper_is_traced_into_the_captured_graph(form, fullgraph):
    """The helper's ops are in aotcache's forward graph, Dynamo compiles nothing during the capture, and values and
    gradients are eager's. With ``fullgraph=True`` (torch 2.13 raises "found no compiled frames" for a call that
    compiled none under the default stance) the capture does not fail either."""
    backend = RecordingBackend()
    helper = _compiled_helper(form, backend, fullgraph)

    def fn(x, w):
        return helper(x @ w).sum(dim=0)

    recorder = Recorder()
    compiled = aotcache.aot_function(fn, fw_compiler=recorder, cache=False)
    torch.manual_seed(0)
    x, w = torch.randn(3, 4), torch.randn(4, 5, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    out = compiled(x, w)
    assert backend.calls == []
    assert "aten.cosh.default" in _ops(recorder.graphs[:1])  # the forward graph
    with torch.compiler.set_stance("force_eager"):
        want = fn(x, w_ref)
    assert torch.equal(out, want)
    out.sum().backward()
    want.sum().backward()
    assert torch.equal(w.grad, w_ref.grad)
    assert compiled.traces.traces() == 1


def test_a_helper_compiled_before_the_capture_does_not_run_its_compiled_code_inside_it():
    """A helper already compiled by Dynamo (its code cached and its guards passing for the capture's fake tensors
    too) runs its Python inside the capture, not the cached code, and is traced; afterwards it runs its compiled
    code as before."""
    backend = RecordingBackend()
    helper = torch.compile(_cosh_rows, backend=backend)
    x = torch.randn(3, 4)
    helper(x)
    assert len(backend.calls) == 1

    def fn(t):
        return helper(t + 1)

    recorder = Recorder()
    compiled = aotcache.aot_function(fn, fw_compiler=recorder, cache=False)
    assert torch.equal(compiled(x), _cosh_rows(x + 1))
    assert "aten.cosh.default" in _ops(recorder.graphs[:1])
    assert len(backend.calls) == 1  # no compile during the capture
    helper(x)
    assert len(backend.calls) == 1  # the cached code still serves eager calls


def _cond_and_a_compiled_helper(helper):
    def fn(x):
        h = helper(x)
        return torch.cond(h.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (h,))
    return fn


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_cond_beside_a_compiled_helper_inside_a_capture(dynamic, monkeypatch):
    """torch.cond compiles its branches with Dynamo on the capture's thread (torch's higher-order-op path): that
    compile goes on as without aotcache while the user's helper beside it runs its Python."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")
    backend = RecordingBackend()
    fn = _cond_and_a_compiled_helper(torch.compile(_cosh_rows, backend=backend))
    compiled = aotcache.aot_function(fn, "nop", dynamic=dynamic, cache=False)
    for rows in (5, 7):
        x = torch.randn(rows, 3, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out = compiled(x)
        want = _cond_and_a_compiled_helper(_cosh_rows)(x_ref)  # the plain helper (torch.cond fails in force_eager)
        torch.testing.assert_close(out, want)
        out.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert backend.calls == []


def test_another_threads_torch_compile_during_a_capture_is_compiled_as_usual():
    """While one thread's capture is inside the helper, another thread's torch.compile-d call is compiled by Dynamo
    (its backend sees the graph, with real tensors) and gives its usual values."""
    import threading

    inside, other_done = threading.Event(), threading.Event()
    capture_backend, other_backend = RecordingBackend(), RecordingBackend()
    waiting_helper = torch.compile(_cosh_rows, backend=capture_backend)

    def fn(x):
        inside.set()
        assert other_done.wait(120)
        return waiting_helper(x)

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    other = torch.compile(lambda t: torch.sinh(t) + 1, backend=other_backend)
    got = {}

    def capture():
        got["capture"] = compiled(torch.ones(2, 3))

    thread = threading.Thread(target=capture)
    thread.start()
    try:
        assert inside.wait(120)
        got["other"] = other(torch.ones(2, 3))
    finally:
        other_done.set()
        thread.join(120)
    assert other_backend.calls == [["Tensor"]]
    assert torch.equal(got["other"], torch.sinh(torch.ones(2, 3)) + 1)
    assert capture_backend.calls == []
    assert torch.equal(got["capture"], _cosh_rows(torch.ones(2, 3)))


def test_torch_compile_with_the_aotcache_backend_inlines_the_helper_as_before():
    """Under ``torch.compile(model, backend="aotcache")`` Dynamo inlines the nested compiled helper (its backend is
    never called) and aotcache compiles Dynamo's graph: nothing of this fix applies there."""
    backend = RecordingBackend()
    model = CompilesInside(backend)
    x = torch.randn(3, 4)
    out = torch.compile(model, backend="aotcache")(x)
    assert backend.calls == []
    assert torch.equal(out.detach(), model(x).detach())


class BranchesOnData(torch.nn.Module):
    """A data-dependent branch (the capture falls back to Dynamo) beside a compiled helper."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.helper = torch.compile(_cosh_rows, backend=backend)

    def forward(self, x):
        y = self.helper(self.lin(x))
        if y.sum() > 0:
            y = y * 2
        return y


def test_a_capture_that_falls_back_runs_the_helper_the_dynamo_way():
    """The capture fails on the branch and the call goes the Dynamo way, outside any capture: values are eager's,
    and the helper's own backend is still not asked for Dynamo's inlined graph."""
    backend = RecordingBackend()
    model = BranchesOnData(backend)
    wrapped = aotcache.compile(model, compiler="nop")
    x = torch.randn(3, 4)
    out = wrapped(x)
    assert wrapped.route == "dynamo"
    with torch.compiler.set_stance("force_eager"):
        want = model(x)
    assert torch.equal(out, want)
    assert backend.calls == []


def test_without_torchs_hop_compile_probe_nothing_is_wrapped_and_captures_go_on(monkeypatch):
    """Fault: a torch without ``_in_hop_compile`` (or ``_callback_from_stance``) gets no wrapper (torch.cond inside a
    capture must keep compiling its branches), and a capture goes on as before."""
    from aotcache.aot import nested_torch_compile

    monkeypatch.setattr(nested_torch_compile, "_installed", [])
    monkeypatch.setattr(nested_torch_compile, "_hop_compile_probe", lambda: None)
    decide = torch._dynamo.eval_frame._callback_from_stance
    with nested_torch_compile.torch_compiled_callables_as_python():
        assert getattr(nested_torch_compile._this_thread, "captures", 0) == 0
    assert torch._dynamo.eval_frame._callback_from_stance is decide
    compiled = aotcache.aot_function(lambda x: x.cosh() * 2, "nop", cache=False)
    x = torch.randn(3)
    assert torch.equal(compiled(x), x.cosh() * 2)


_WARM_SCRIPT = r"""
import json, torch, aotcache
from aotcache.autograd_cache.cache import default_cache
from tests.aot.test_nested_torch_compile import CompilesInside, RecordingBackend

backend = RecordingBackend()
model = CompilesInside(backend)
wrapped = aotcache.compile(model, compiler="nop")
x = torch.linspace(-1, 1, 12).reshape(3, 4)
out = wrapped(x)
compiles = len(backend.calls)
print(json.dumps({**default_cache().stats(), "equal": bool(torch.equal(out, model(x))), "route": wrapped.route,
                  "dynamo_compiles": compiles}))
"""


def test_a_forward_with_a_compiled_helper_is_stored_and_a_fresh_process_hits(tmp_path):
    """The captured graph (the helper's ops in it) is stored: a fresh process loads it without capturing."""
    from tests.conftest import run_python

    env = {"AOTCACHE_CACHE_DIR": str(tmp_path / "cache")}
    cold = json.loads(run_python(_WARM_SCRIPT, env=env).stdout.strip().splitlines()[-1])
    assert cold["miss"] >= 1 and cold["hit"] == 0 and cold["equal"] and cold["route"] == "aot", cold
    assert cold["dynamo_compiles"] == 0, cold
    warm = json.loads(run_python(_WARM_SCRIPT, env=env).stdout.strip().splitlines()[-1])
    assert warm["hit"] >= 1 and warm["miss"] == 0 and warm["equal"] and warm["route"] == "aot", warm
    assert warm["dynamo_compiles"] == 0, warm


_FLEX_GENERATE_SCRIPT = r"""
import torch, aotcache
from tests.aot.tiny_transformers import tiny_llama

def greedy(model):
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)

want_tokens, want_logits = greedy(tiny_llama())
flex = tiny_llama()
flex.config._attn_implementation = "flex_attention"
wrapped = aotcache.compile(flex, compiler="nop")
tokens, logits = greedy(wrapped)
assert wrapped.route == "aot", wrapped.route
assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
torch.testing.assert_close(logits, want_logits)
print("ok")
"""


@pytest.mark.slow
def test_llama_flex_attention_generate_through_aotcache_compile_equals_eager_attention(tmp_path):
    """The bug as found: Llama with ``attn_implementation="flex_attention"`` (its mask built by
    ``torch.compile(create_block_mask)`` inside the forward), greedy ``generate`` through ``aotcache.compile``
    ended the process with a segmentation fault (Inductor's kernels read the capture's fake tensors). Now the mask
    helper runs its Python inside the capture, the calls are captured (the AOT way), and the tokens and logits are
    eager attention's. A fresh process, as the failure was a crash."""
    env = {**os.environ, "AOTCACHE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _FLEX_GENERATE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=550)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout


def test_a_capture_that_raises_leaves_the_thread_compiling_as_usual():
    """A user's error inside the captured forward (after the helper ran) is raised as eager raises it, and the
    thread's capture count is restored: the helper called eagerly next is compiled by Dynamo, with eager's values."""
    from aotcache.aot.nested_torch_compile import _this_thread

    backend = RecordingBackend()
    helper = torch.compile(_cosh_rows, backend=backend)

    def fn(x):
        helper(x)
        raise ValueError("the user's own error")

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    with pytest.raises(ValueError, match="the user's own error"):
        compiled(torch.ones(2, 3))
    assert _this_thread.captures == 0
    x = torch.randn(2, 3)
    assert torch.equal(helper(x), _cosh_rows(x))
    assert backend.calls == [["Tensor"]]


class CountsCalls(torch.nn.Module):
    """A submodule that writes a buffer in place, compiled by the user with torch.compile."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(4))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x).relu() + self.calls


class HoldsACompiledSubmodule(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.compile(CountsCalls(), backend=backend)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_a_torch_compiled_submodule_is_captured_with_its_parameters_and_buffer():
    """An OptimizedModule held as a submodule: captured whole (its parameters are the module's inputs, so a changed
    weight is seen), values, gradients and the in-place buffer are eager's, and afterwards the submodule called by
    itself is compiled by Dynamo as usual."""
    backend = RecordingBackend()
    model, reference = HoldsACompiledSubmodule(backend), HoldsACompiledSubmodule(RecordingBackend())
    reference.load_state_dict(model.state_dict())
    wrapped = aotcache.compile(model, compiler="nop")
    x = torch.randn(3, 4)
    for _ in range(2):
        out = wrapped(x)
        with torch.compiler.set_stance("force_eager"):
            want = reference(x)
        assert torch.equal(out, want)
    assert wrapped.route == "aot"
    out.sum().backward()
    want.sum().backward()
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param.grad, expected.grad), name
    assert torch.equal(model.inner.calls, reference.inner.calls)
    with torch.no_grad():
        model.inner.lin.weight.mul_(2)
        reference.inner.lin.weight.mul_(2)
    with torch.compiler.set_stance("force_eager"):
        want = reference(x)
    assert torch.equal(wrapped(x), want)
    assert backend.calls == []
    model.inner(x)
    assert len(backend.calls) == 1  # Dynamo compiled it, outside any capture


_PROBE = torch.arange(4.0)  # a global the forward reads: a real tensor inside a capture too


def _doubled_sine(t):
    return t.sin() * 2


class CompilesInAWorker(torch.nn.Module):
    """Hands a torch.compile-d helper to a thread it starts: on a tensor of the forward (a capture's trace tensor
    while captured) or on a global (a real tensor always)."""

    def __init__(self, backend, source):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.backend, self.source = backend, source

    def forward(self, x):
        from concurrent.futures import ThreadPoolExecutor

        y = self.lin(x)
        helper = torch.compile(_doubled_sine, backend=self.backend)
        with ThreadPoolExecutor(1) as pool:
            z = pool.submit(helper, y if self.source == "forward" else _PROBE).result()
        return (y + z).sum() if self.source == "forward" else (y * z.sum()).sum()


@pytest.mark.parametrize("source", ["forward", "constant"])
@pytest.mark.parametrize("entry", ["compile", "aot_module"])
def test_a_worker_thread_of_the_forward_calling_a_compiled_helper(entry, source):
    """Checked in session 27 (NOTE [torch.compile-d callables inside a capture]): the worker is not the capturing
    thread, so Dynamo compiles the helper there. Handed the capture's tensors it fails as plain Python on them fails
    (a FunctionalTensor outside its mode; with Inductor the compiled kernel's data_ptr raises): the capture falls
    back, eager's values. Handed a real tensor it compiles as usual and the call is captured whole."""
    model = CompilesInAWorker(RecordingBackend(), source)
    wrapped = (aotcache.compile(model, compiler="nop", cache=False) if entry == "compile"
               else aotcache.aot_module(model, "nop", cache=False))
    x = torch.randn(3, 4)
    for _ in range(2):
        out = wrapped(x)
        torch.testing.assert_close(out, model(x))
    out.backward()
    grad = model.lin.weight.grad.clone()
    model.zero_grad()
    model(x).backward()
    torch.testing.assert_close(grad, model.lin.weight.grad)
    if entry == "compile":
        assert wrapped.route == ("dynamo" if source == "forward" else "aot")
