"""aot_module as a drop-in: attributes and methods of the wrapped module, its parameter / state_dict names,
train / eval / to, and methods such as transformers' generate running the compiled forward."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch import nn

from aotcache.aot import aot_module
from tests.aot.tiny_transformers import tiny_llama


class Counting:
    """A compiler that returns the graph itself and counts how often compiled graphs run."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, gm, example_inputs):
        def run(*args):
            self.runs += 1
            return gm(*args)

        return run


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = 2.0

    def forward(self, x):
        return self.bn(self.fc(x)) * self.scale

    def twice(self, x):
        """A custom method calling self(...)."""
        return self(x) + self.forward(x)


def test_attributes_and_methods_of_the_wrapped_module_are_reachable():
    model = Net()
    wrapped = aot_module(model, cache=False)
    assert wrapped.scale == 2.0 and wrapped.fc is model.fc
    assert inspect.signature(wrapped.twice) == inspect.signature(model.twice)
    assert inspect.signature(wrapped.forward) == inspect.signature(model.forward)  # what Trainer reads
    wrapped.scale = 3.0  # an attribute the wrapped module has is set there
    assert model.scale == 3.0 and "scale" not in wrapped.__dict__
    with pytest.raises(AttributeError, match="no_such_thing"):
        wrapped.no_such_thing
    assert "twice" in dir(wrapped)


def test_names_match_the_original_and_checkpoints_move_both_ways():
    torch.manual_seed(0)
    model = Net()
    wrapped = aot_module(model, cache=False)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in wrapped.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]

    torch.manual_seed(1)
    other = Net()
    wrapped.load_state_dict(other.state_dict())  # eager checkpoint -> wrapper
    torch.testing.assert_close(model.fc.weight, other.fc.weight)
    fresh = Net()
    fresh.load_state_dict(aot_module(other, cache=False).state_dict())  # wrapper checkpoint -> eager
    torch.testing.assert_close(fresh.fc.weight, other.fc.weight)
    with pytest.raises(RuntimeError, match="fc.nope"):
        wrapped.load_state_dict({**other.state_dict(), "fc.nope": torch.zeros(1)})


def test_a_wrapper_inside_a_larger_model_keeps_the_original_names():
    def outer(block):
        parent = nn.Sequential(nn.Linear(4, 4))
        parent.add_module("block", block)
        return parent

    torch.manual_seed(0)
    eager = outer(Net())
    wrapped = outer(aot_module(Net(), cache=False))
    assert list(wrapped.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in eager.named_parameters()]
    wrapped.load_state_dict(eager.state_dict())
    torch.testing.assert_close(wrapped.block.fc.weight, eager.block.fc.weight)
    eager.load_state_dict(wrapped.state_dict())


def test_train_eval_to_and_optimizer_are_seen_by_the_compiled_call():
    torch.manual_seed(0)
    model = Net()
    reference = Net()
    reference.load_state_dict(model.state_dict())
    wrapped = aot_module(model, cache=False)
    x = torch.randn(8, 4)

    torch.testing.assert_close(wrapped(x), reference(x))  # training: batch statistics, running stats updated
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    assert wrapped.eval() is wrapped and not model.training and not model.bn.training
    torch.testing.assert_close(wrapped(x), reference.eval()(x))  # eval: running statistics
    wrapped.train()
    assert model.bn.training

    wrapped.to(torch.float64)
    assert model.fc.weight.dtype == torch.float64
    assert wrapped(x.double()).dtype == torch.float64

    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    wrapped(x.double()).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)


def test_custom_methods_run_the_compiled_forward():
    counting = Counting()
    torch.manual_seed(0)
    model = Net().eval()
    wrapped = aot_module(model, counting, cache=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(wrapped.twice(x), model.twice(x))
    assert counting.runs == 2  # self(x) and self.forward(x), both compiled
    assert "forward" not in model.__dict__  # the router is gone after the call
    model.twice(x)
    assert counting.runs == 2  # the eager model itself is untouched


def test_methods_of_a_module_with_its_own_hooks_run_eagerly_with_a_warning(caplog):
    counting = Counting()
    model = Net().eval()
    model.register_forward_hook(lambda module, args, out: out + 1)
    wrapped = aot_module(model, counting, cache=False)
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        torch.testing.assert_close(wrapped.twice(x), model.twice(x))
    assert counting.runs == 0 and "register the hooks on the aot_module wrapper" in caplog.text


def test_generate_runs_the_compiled_forward_and_gives_eager_tokens():
    model = tiny_llama()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    counting = Counting()
    wrapped = aot_module(model, counting, cache=False, dynamic=False)
    assert wrapped.config is model.config and wrapped.device == model.device
    got = wrapped.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    assert counting.runs == 3  # one compiled forward per new token
    assert wrapped.compiled.num_compiles == 3  # static shapes: one per length


def failures_in_threads(call, expected, *, threads: int, calls: int) -> list[str]:
    """Run ``call()`` ``calls`` times in each of ``threads`` threads at once; what went wrong (a thread's
    exception would otherwise go unseen)."""
    import threading

    failures: list[str] = []

    def worker():
        for _ in range(calls):
            try:
                if not torch.allclose(call(), expected):
                    failures.append("mismatch")
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))

    started = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return failures


def test_methods_called_from_several_threads_give_eager_results_and_leave_the_module_clean():
    torch.manual_seed(0)
    model = Net().eval()
    wrapped = aot_module(model, cache=False)
    x = torch.randn(3, 4)
    expected = model.twice(x)
    assert failures_in_threads(lambda: wrapped.twice(x), expected, threads=3, calls=20) == []
    assert "forward" not in model.__dict__ and wrapped._routing_count == 0


def test_methods_racing_their_first_capture_from_several_threads_give_eager_results():
    """A method called from several threads while its first forward is captured: the router used to take itself
    down for the compiled call, and another thread's call meanwhile ran the module eagerly beside the capture's
    swapped trace tensors (NOTE [Methods run the compiled forward])."""
    for _ in range(4):
        model = Net().eval()
        wrapped = aot_module(model, cache=False)
        x = torch.randn(3, 4)
        assert failures_in_threads(lambda: wrapped.twice(x), model.twice(x), threads=3, calls=5) == []


class WaitsInCapture(nn.Module):
    """Holds its first capture run until another thread has started a call of the same wrapper."""

    def __init__(self, other_started, in_capture) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.other_started, self.in_capture = other_started, in_capture

    def forward(self, x):
        if not self.in_capture.is_set():
            self.in_capture.set()
            self.other_started.wait(120)
            import time

            time.sleep(0.3)  # the other thread reaches the wrapper's parameters while they are swapped
        return self.linear(x)


def test_a_call_from_another_thread_during_a_capture_waits_and_gives_eagers_result():
    """Found on torch 2.14: while one thread captured (the module's parameters swapped for trace tensors, torch's
    process-wide is_compiling flag set), another thread's call read them, or took the inlined path, and failed
    with "Attempting to use FunctionalTensor on its own" (NOTE [Calls during a capture's swap])."""
    import threading

    from aotcache.aot.capture_threads import tracing_in_this_thread

    other_started, in_capture = threading.Event(), threading.Event()
    model = WaitsInCapture(other_started, in_capture)
    wrapped = aot_module(model, "nop", cache=False)
    x = torch.randn(2, 4)
    expected = model.linear(x)
    seen = {}

    def other():
        assert in_capture.wait(120)
        seen["tracing"] = tracing_in_this_thread()
        other_started.set()
        try:
            seen["out"] = wrapped(x)
        except Exception as exc:  # noqa: BLE001
            seen["error"] = exc

    thread = threading.Thread(target=other)
    thread.start()
    first = wrapped(x)
    thread.join(300)
    assert seen.get("error") is None and seen["tracing"] is False
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(seen["out"], expected)
    assert type(model.linear.weight) is nn.Parameter


def test_first_calls_from_several_threads_at_once_give_eagers_results():
    for _ in range(6):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        wrapped = aot_module(model, "nop", cache=False)
        x = torch.randn(4, 8)
        assert failures_in_threads(lambda: wrapped(x), model(x), threads=4, calls=5) == []


@pytest.mark.parametrize("api", ["aot_module", "compile"])
def test_deepcopy_gives_an_independent_wrapper_that_runs_compiled(api):
    # found by the sweep: copy.deepcopy(wrapper) (an EMA / reference model) failed: "cannot pickle '_thread.lock'"
    import copy

    import aotcache

    torch.manual_seed(0)
    counting = Counting()
    model = Net()
    wrapped = (aot_module(model, fw_compiler=counting, cache=False) if api == "aot_module"
               else aotcache.compile(model, compiler=counting, cache=False))
    x = torch.randn(5, 4)
    wrapped.eval()
    expected = wrapped(x)
    clone = copy.deepcopy(wrapped)
    assert type(clone) is type(wrapped) and not clone.training
    assert clone.orig_module is not model and clone.fc.weight is not model.fc.weight
    runs = counting.runs
    torch.testing.assert_close(clone(x), expected)
    assert counting.runs > runs  # the copy runs a compiled graph, not the eager forward
    with torch.no_grad():
        clone.fc.weight.add_(1.0)
    torch.testing.assert_close(wrapped(x), expected)  # the original is untouched
    torch.testing.assert_close(clone(x), clone.orig_module(x))
    outer = copy.deepcopy(nn.Sequential(wrapped, nn.ReLU()))  # a wrapper inside a larger model
    assert type(outer[0]) is type(wrapped) and list(outer.state_dict()) == ["0.fc.weight", "0.fc.bias",
                                                                            "0.bn.weight", "0.bn.bias",
                                                                            "0.bn.running_mean", "0.bn.running_var",
                                                                            "0.bn.num_batches_tracked"]


@pytest.mark.parametrize("api", ["aot_module", "compile"])
def test_torch_save_of_a_whole_wrapper_loads_a_working_wrapper(api):
    # found by the sweep: torch.save(wrapper) failed: "Can't pickle local object '_functional_module_call...'"
    import io

    import aotcache

    torch.manual_seed(0)
    model = Net()
    wrapped = (aot_module(model, fw_compiler="nop", cache=False) if api == "aot_module"
               else aotcache.compile(model, compiler="nop", cache=False))
    x = torch.randn(5, 4)
    wrapped.eval()
    expected = wrapped(x)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(wrapped) and not loaded.training
    torch.testing.assert_close(loaded(x), expected)
    assert loaded.compiled.num_compiles == 1  # it runs compiled
    assert list(loaded.state_dict()) == list(model.state_dict())

    with_instance = aot_module(Net(), cache=aotcache.AOTAutogradCache())
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(with_instance, io.BytesIO())


def test_an_lstm_keeps_its_own_weights_after_the_capture_and_its_fingerprint_stays_trusted():
    # found by the sweep: after the first call nn.LSTM's _flat_weights held the capture's FunctionalTensors
    # (NOTE [Caches a module rebuilds from its weights]), so every later fingerprint of the model was untrusted
    from torch.utils import _pytree as pytree

    from aotcache.autograd_cache.fingerprint import fingerprint_module_call

    torch.manual_seed(0)
    model = nn.LSTM(4, 8, num_layers=2, batch_first=True)
    wrapped = aot_module(model, cache=False)
    x = torch.randn(2, 3, 4)
    wrapped(x)[0].sum().backward()
    assert [type(w) for w in model._flat_weights] == [nn.Parameter] * 8
    assert all(w is p for w, p in zip(model._flat_weights, model.parameters()))
    assert all(ref() is p for ref, p in zip(model._flat_weight_refs, model.parameters()))
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    flat, spec = pytree.tree_flatten(((params, buffers, x), {}))
    result = fingerprint_module_call(model, flat, spec, wrapped.compiled.options)
    assert result.trusted, result.reason
    expected = nn.LSTM(4, 8, num_layers=2, batch_first=True)
    expected.load_state_dict(model.state_dict())
    torch.testing.assert_close(wrapped(x)[0], expected(x)[0])
    torch.testing.assert_close(model(x)[0], expected(x)[0])


def test_activation_checkpointing_is_refused_with_a_message_that_names_it():
    # found by the sweep: transformers' gradient_checkpointing_enable() made the capture fail with "reads a
    # tensor of shape (32,) ... from a closure or global", which named nothing the user wrote
    import aotcache
    from aotcache.aot import CaptureError

    model = tiny_llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = aotcache.compile(model, compiler="nop", cache=False, fullgraph=True)
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(CaptureError, match=r"reads a parameter of shape .*activation checkpointing"):
        compiled(ids, labels=ids)

    linear = nn.Linear(4, 4)
    closure = aotcache.aot_function(lambda x: linear(x), cache=False, on_capture_error="raise")
    with pytest.raises(CaptureError, match="compile the module instead"):
        closure(torch.randn(2, 4, requires_grad=True))
    falling_back = aotcache.aot_function(lambda x: linear(x), cache=False)  # the default: never fail
    x = torch.randn(2, 4, requires_grad=True)
    torch.testing.assert_close(falling_back(x), linear(x))
    linear.requires_grad_(False)  # a frozen parameter is a plain constant
    x = torch.randn(2, 4, requires_grad=True)
    torch.testing.assert_close(closure(x), linear(x))


def _model_with_backward_hooks(log: list) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: log.append(float(grad_out[0].sum())))
    model[2].register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 3,))
    return model


def test_module_backward_hooks_run_at_every_backward_as_in_eager():
    # found by exploration: a capture ran a logging hook once on trace tensors (its log held a FunctionalTensor,
    # and later backwards logged nothing); a module with backward hooks now takes the fallback
    eager_log, log = [], []
    eager, model = _model_with_backward_hooks(eager_log), _model_with_backward_hooks(log)
    wrapped = aot_module(model, Counting(), cache=False)
    x = torch.randn(5, 3)
    for _ in range(2):
        eager(x).sum().backward()
        wrapped(x).sum().backward()
    assert len(log) == len(eager_log) == 2 and log == pytest.approx(eager_log)
    for p_eager, p in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad)
    with torch.no_grad():  # no backward, nothing refused: captured
        torch.testing.assert_close(aot_module(model, Counting(), cache=False, on_capture_error="raise")(x), eager(x))


def test_compiled_modules_and_functions_nested_in_a_captured_one_are_inlined():
    # found by exploration: aotcache.compile(aotcache.compile(m)) and aot_function(aot_function(f)) failed with
    # "Attempting to use FunctionalTensor on its own": the inner one ran its own machinery on trace tensors
    import aotcache

    torch.manual_seed(0)
    inner_eager = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    eager = nn.Sequential(inner_eager, nn.Linear(4, 2))
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    model = nn.Sequential(aot_module(inner, Counting(), cache=False), nn.Linear(4, 2))
    wrapped = aot_module(model, Counting(), cache=False, on_capture_error="raise")
    x = torch.randn(5, 3)
    wrapped(x).pow(2).sum().backward()
    eager(x).pow(2).sum().backward()
    for p_eager, p in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad)
    twice = aotcache.compile(aotcache.compile(inner_eager, compiler="nop", cache=False), compiler="nop",
                             cache=False, fullgraph=True)
    torch.testing.assert_close(twice(x), inner_eager(x))
    sine = aotcache.aot_function(aotcache.aot_function(torch.sin, Counting(), cache=False), Counting(),
                                 cache=False, on_capture_error="raise")
    torch.testing.assert_close(sine(x), x.sin())


def test_a_wrapped_sequential_indexes_slices_iterates_and_measures_as_the_module():
    """NOTE [Container protocol]: special methods are looked up on the type, so the wrapper forwards them."""
    from aotcache import aot_module

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = aot_module(model, cache=False)
    assert len(wrapped) == 3 and wrapped[0] is model[0] and wrapped[-1] is model[2]
    assert list(wrapped) == list(model) and model[1] in wrapped and isinstance(wrapped[1:], nn.Sequential)
    assert bool(wrapped) and not bool(aot_module(nn.Sequential(), cache=False))
    torch.testing.assert_close(wrapped(torch.ones(1, 4)), model(torch.ones(1, 4)))
    linear = aot_module(nn.Linear(2, 2), cache=False)
    assert bool(linear)  # a module without a length is true, as in eager
    with pytest.raises(TypeError):
        len(linear)
    with pytest.raises(TypeError):
        linear[0]


def test_a_wrapped_leaf_module_inside_a_captured_model_gets_its_swapped_tensors():
    """NOTE [Wrappers inside a captured module]: ``inner.weight`` of a wrapped nn.Linear submodule is swapped on
    the Linear (through ``orig_module``), not on the wrapper (functional_call failed with a TypeError)."""
    import copy

    class Outer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.inner(x)).relu()

    torch.manual_seed(0)
    eager = Outer(nn.Linear(4, 4))
    model = copy.deepcopy(eager)
    model.inner = aot_module(model.inner, cache=False)
    wrapped = aot_module(model, cache=False, on_capture_error="raise")
    x = torch.randn(2, 4)
    wrapped(x).sum().backward()
    eager(x).sum().backward()
    assert list(dict(model.named_parameters())) == list(dict(eager.named_parameters()))
    for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, msg=name)
    with torch.no_grad():
        model.inner.orig_module.weight.mul_(2)  # an update is seen: the weights are graph inputs
        eager.inner.weight.mul_(2)
    torch.testing.assert_close(wrapped(x), eager(x))


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.factor = 2.0

    def forward(self, x):
        return self.fc(x) * self.factor


def test_a_wrapped_submodule_keeps_the_fingerprint_trusted_and_its_changes_are_seen(tmp_path):
    """NOTE [Compiled wrappers in a walked program]: the wrapper's compile machinery is not program (a warm
    start of the enclosing model hits through its fingerprint), but its wrapped module is: a changed
    attribute of it is a new program, in-process and in the fingerprint."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store import InMemoryCache, TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    torch.manual_seed(0)
    model = nn.Sequential(aot_module(_Scaled(), cache=cache), nn.ReLU())
    x = torch.randn(2, 4)
    expected = torch.relu(model[0].orig_module(x))
    torch.testing.assert_close(aot_module(model, cache=cache)(x), expected)
    warm = aot_module(model, cache=cache)
    torch.testing.assert_close(warm(x), expected)
    assert cache.counters["fingerprint_hit"] == 1 and cache.counters.get("fingerprint_fallback", 0) == 0
    model[0].orig_module.factor = 3.0  # changes the result: never the old graph
    torch.testing.assert_close(warm(x), torch.relu(model[0].orig_module(x)))
    fresh = aot_module(model, cache=cache)
    torch.testing.assert_close(fresh(x), torch.relu(model[0].orig_module(x)))
    model[0].orig_module.factor = 2.0  # back to the first program: its entry again, through the fingerprint
    hits = cache.counters["fingerprint_hit"]
    torch.testing.assert_close(aot_module(model, cache=cache)(x), expected)
    assert cache.counters["fingerprint_hit"] == hits + 1


_OFFSET = 1.0


def _shifted(x):
    return x.sin() + _OFFSET


def test_a_compiled_function_called_by_a_compiled_one_is_walked_as_its_function():
    """NOTE [Compiled wrappers in a walked program]: the inner compiled function is seen as the function it
    runs inline: the outer fingerprint is trusted (warm hit), and a change the inner function reads is seen."""
    global _OFFSET
    import aotcache
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store import InMemoryCache, TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    inner = aotcache.aot_function(_shifted, cache=cache)
    routed = aotcache.compile(_shifted, compiler="nop", cache=cache)
    x = torch.randn(3)
    for wrapped in (inner, routed):
        outer = aotcache.aot_function(lambda x: wrapped(x) * 2, cache=cache)
        torch.testing.assert_close(outer(x), (x.sin() + 1.0) * 2)
        again = aotcache.aot_function(lambda x: wrapped(x) * 2, cache=cache)
        hits = cache.counters["fingerprint_hit"]
        torch.testing.assert_close(again(x), (x.sin() + 1.0) * 2)
        assert cache.counters["fingerprint_hit"] == hits + 1 and cache.counters.get("fingerprint_fallback", 0) == 0
        _OFFSET = 5.0  # read by the inner function: the outer graph must not be reused
        try:
            torch.testing.assert_close(again(x), (x.sin() + 5.0) * 2)
        finally:
            _OFFSET = 1.0
