"""Eager runs of a wrapped module beside another thread's capture of it (NOTE [Eager runs beside a capture] in
aotcache/aot/capture_threads.py): a fallback signature's run (eager, or through torch.compile), and the code of
a routed method around its compiled forward, must never read the trace tensors a capture swaps into the module,
whichever thread started first; the capture must not read what they do either.

Real threads; the interleaving is forced with events: the capture holds its swap until the other thread has
read the module's tensors (or its call ended), and the other thread waits, before that read, until the swap
began or the capture is waiting for its run to end (``SwapGate.pending``). Before the gate was shared by eager
runs, each of these tests but the unheld race failed with "Attempting to use FunctionalTensor on its own"."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from torch import nn

from aotcache.aot import aot_module
from aotcache.aot.capture_threads import swap_gate, tracing_in_this_thread
from aotcache.aot.fallback import EagerRuntime, PartialRuntime, fallback_counts

CAPTURE, OTHER = "capture-thread", "other-thread"
WAIT = 60  # seconds: only ever reached when something is broken


def _report_of_script(script: str, timeout: float, hang: str) -> dict:
    """Run ``script`` in a fresh Python (this checkout first on its path) and return the JSON of its last line;
    fail naming ``hang`` where it does not end within ``timeout`` seconds."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{hang} hung: {exc.stderr}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


class Choreography:
    """Holds two threads at the points that make them overlap: the capture (thread ``CAPTURE``, its tensors
    swapped) until the other thread has read the module's tensors, and that read (thread ``OTHER``, not traced)
    until the swap began or the capture waits for the other thread's run to end (``SwapGate.pending``)."""

    def __init__(self) -> None:
        self.swapped = threading.Event()
        self.other_running = threading.Event()
        self.other_read = threading.Event()  # also set when the other thread's call ends (an error included)
        self.gate = None  # the module's SwapGate, set once the module exists

    @torch.compiler.disable  # Python run for real between Dynamo's graphs (a partial fallback), not traced
    def before_read(self) -> None:
        name = threading.current_thread().name
        if name == CAPTURE and not self.swapped.is_set():
            self.swapped.set()
            self.other_read.wait(WAIT)
        elif name == OTHER and not tracing_in_this_thread() and not self.other_running.is_set():
            self.other_running.set()
            for _ in range(WAIT * 100):
                if self.swapped.wait(0.01) or getattr(self.gate, "pending", 0):
                    break

    @torch.compiler.disable
    def after_read(self) -> None:
        if threading.current_thread().name == OTHER and not tracing_in_this_thread():
            self.other_read.set()


class Branches(nn.Module):
    """``branch=True`` reads a value into Python control flow (the capture refuses it: a fallback signature)."""

    def __init__(self, choreography: Choreography) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.choreography = choreography

    def forward(self, x, branch=False):
        self.choreography.before_read()
        y = self.linear(x)
        self.choreography.after_read()
        if branch and y.sum() > 0:
            y = y * 2
        return y

    def scaled(self, x):
        """A method that reads a parameter itself, around the (routed, compiled) forward."""
        self.choreography.before_read()
        norm = self.linear.weight.norm()
        self.choreography.after_read()
        return self(x) * norm


def _run(target, name: str, outcome: dict, done: threading.Event | None = None) -> threading.Thread:
    def body():
        try:
            outcome[name] = target()
        except Exception as exc:  # noqa: BLE001 - the assertion shows it
            outcome[name] = exc
        finally:
            if done is not None:
                done.set()

    thread = threading.Thread(target=body, name=name)
    thread.start()
    return thread


def _overlap(choreography: Choreography, other_call, capture_call) -> dict:
    """``other_call()`` in thread OTHER and, once its eager run began, ``capture_call()`` in thread CAPTURE;
    their outcomes by thread name."""
    outcome: dict = {}
    other = _run(other_call, OTHER, outcome, choreography.other_read)
    assert choreography.other_running.wait(WAIT)
    capture = _run(capture_call, CAPTURE, outcome)
    other.join(WAIT)
    capture.join(WAIT)
    return outcome


def _result(outcome: dict, name: str) -> torch.Tensor:
    value = outcome[name]
    assert not isinstance(value, Exception), f"{name}: {value!r}"
    return value


def _setup(on_capture_error: str = "eager"):
    torch.manual_seed(0)
    choreography = Choreography()
    model = Branches(choreography).eval()
    choreography.gate = swap_gate(model)
    weight = model.linear.weight
    wrapped = aot_module(model, "nop", cache=False, dynamic=False, on_capture_error=on_capture_error)
    x = torch.randn(3, 4).abs()  # y.sum() > 0 is not the point; any value falls back
    expected = {"plain": model(x).detach(), "branch": model(x, branch=True).detach(),
                "scaled": model.scaled(x).detach()}
    return choreography, model, weight, wrapped, x, expected


def _assert_clean(model: nn.Module, weight: torch.Tensor, wrapped: nn.Module, x, expected) -> None:
    assert model.linear.weight is weight and type(weight) is nn.Parameter
    assert swap_gate(model).owner is None and "forward" not in model.__dict__
    torch.testing.assert_close(wrapped(x), expected["plain"])
    torch.testing.assert_close(wrapped(x, branch=True), expected["branch"])


def _kinds(wrapped) -> set[str]:
    """The kinds of runtime the wrapper keeps (a fallback counts as EagerRuntime, whether Dynamo runs it or not)."""
    return {"EagerRuntime" if isinstance(runtime, (EagerRuntime, PartialRuntime)) else type(runtime).__name__
            for runtimes in wrapped.compiled._entries.values() for runtime in runtimes}


# "eager" runs the module as written; "fallback" runs it through torch.compile (Dynamo reads the module's
# tensors as its graphs' inputs, and runs the choreography's Python between them)
FALLBACKS = pytest.mark.parametrize("on_capture_error", ["eager", "fallback"])


@FALLBACKS
def test_a_fallback_running_eagerly_while_another_thread_captures_gives_eagers_result(on_capture_error):
    """The fallback signature is known already (an earlier call); its eager run starts, then another thread
    begins a capture of another signature of the same module and swaps its tensors."""
    choreography, model, weight, wrapped, x, expected = _setup(on_capture_error)
    torch.testing.assert_close(wrapped(x, branch=True), expected["branch"])  # the fallback, remembered
    assert _kinds(wrapped) == {"EagerRuntime"}
    outcome = _overlap(choreography, lambda: wrapped(x, branch=True), lambda: wrapped(x))
    torch.testing.assert_close(_result(outcome, OTHER), expected["branch"])
    torch.testing.assert_close(_result(outcome, CAPTURE), expected["plain"])
    assert _kinds(wrapped) == {"EagerRuntime", "CompiledRuntime"} and wrapped.compiled.num_compiles == 2
    _assert_clean(model, weight, wrapped, x, expected)


@FALLBACKS
def test_a_call_falling_back_in_one_thread_while_another_captures_gives_eagers_results(on_capture_error):
    """The reverse order of events: the other thread's own call finds the signature cannot be captured and runs
    it eagerly (no earlier call), while the capture thread captures another signature."""
    choreography, model, weight, wrapped, x, expected = _setup(on_capture_error)
    kind = "eager" if on_capture_error == "eager" else "partial"
    before = fallback_counts().get(f"{kind}:data_dependent", 0)
    # the other thread's capture fails first (under the function's lock), then its eager run begins
    outcome = _overlap(choreography, lambda: wrapped(x, branch=True), lambda: wrapped(x))
    torch.testing.assert_close(_result(outcome, OTHER), expected["branch"])
    torch.testing.assert_close(_result(outcome, CAPTURE), expected["plain"])
    assert fallback_counts().get(f"{kind}:data_dependent", 0) == before + 1
    assert _kinds(wrapped) == {"EagerRuntime", "CompiledRuntime"}
    _assert_clean(model, weight, wrapped, x, expected)


def test_a_capture_beginning_while_another_thread_runs_a_fallback_waits_for_it_without_deadlock():
    """Several threads run the fallback signature while the first capture of another signature happens: the
    capture waits for the eager runs in progress, new eager runs wait for the swap, and all end."""
    from tests.aot.test_module_wrapper import failures_in_threads

    choreography, model, weight, wrapped, x, expected = _setup()
    choreography.swapped.set()  # no holding: the threads only race
    choreography.other_read.set()
    wrapped(x, branch=True)
    capture = _run(lambda: wrapped(x), CAPTURE, outcome := {})
    failures = failures_in_threads(lambda: wrapped(x, branch=True), expected["branch"], threads=3, calls=10)
    capture.join(WAIT)
    assert failures == []
    torch.testing.assert_close(_result(outcome, CAPTURE), expected["plain"])
    _assert_clean(model, weight, wrapped, x, expected)


def test_a_routed_method_reading_parameters_while_another_thread_captures_gives_eagers_result():
    """A method of the wrapped module (as transformers' generate) reads the module outside its forward, which
    runs compiled: that eager part must not meet the capture's swapped tensors either."""
    choreography, model, weight, wrapped, x, expected = _setup()
    outcome = _overlap(choreography, lambda: wrapped.scaled(x), lambda: wrapped(x))
    torch.testing.assert_close(_result(outcome, OTHER), expected["scaled"])
    torch.testing.assert_close(_result(outcome, CAPTURE), expected["plain"])
    assert not any(isinstance(runtime, EagerRuntime)
                   for runtimes in wrapped.compiled._entries.values() for runtime in runtimes)
    _assert_clean(model, weight, wrapped, x, expected)


def test_generate_called_while_another_thread_captures_gives_eager_tokens():
    """transformers' generate (a routed method) started in one thread while another thread's capture of the same
    model has its tensors swapped: generate's own code waits for the swap, its forwards run compiled."""
    from tests.aot.tiny_transformers import tiny_llama

    model = tiny_llama()
    ids, other_ids = torch.tensor([[1, 5, 9, 3]]), torch.tensor([[1, 7, 4, 2, 8, 6]])
    expected_tokens = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    expected_logits = model(other_ids).logits.detach()
    weight = model.model.embed_tokens.weight
    held, generate_started = threading.Event(), threading.Event()

    def hold_the_swap(module, args):  # runs inside the capture, its tensors swapped
        if threading.current_thread().name == CAPTURE and not held.is_set():
            held.set()
            assert generate_started.wait(WAIT)
            time.sleep(1.0)  # a second for generate to reach the module meanwhile (no assertion on time)

    model.model.embed_tokens.register_forward_pre_hook(hold_the_swap)
    wrapped = aot_module(model, "nop", cache=False, dynamic=False)
    outcome: dict = {}
    capture = _run(lambda: wrapped(other_ids).logits, CAPTURE, outcome)
    assert held.wait(WAIT)

    def generate():
        generate_started.set()
        return wrapped.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)

    other = _run(generate, OTHER, outcome)
    capture.join(WAIT)
    other.join(WAIT)
    assert torch.equal(_result(outcome, OTHER), expected_tokens)
    torch.testing.assert_close(_result(outcome, CAPTURE), expected_logits)
    assert model.model.embed_tokens.weight is weight and type(weight) is nn.Parameter
    assert swap_gate(model).owner is None and "forward" not in model.__dict__ and wrapped._routing_count == 0


# A method mapping ``self`` over a pool of worker threads: the method's thread holds the gate (a routed method)
# while it waits for the workers, whose first calls capture. Run in a subprocess, so a regression (a hang: NOTE
# [A swap waits a bounded time]) fails by the timeout instead of hanging the test session.
_POOL_SCRIPT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from torch import nn
import aotcache
from aotcache.aot import aot_module, capture_threads
from aotcache.aot.fallback import fallback_counts

capture_threads.SWAP_WAIT_S = 0.5  # the bound under test; the default is longer

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
    def forward(self, x):
        return self.enc(x)
    def encode_parallel(self, chunks):
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(self, chunks))

torch.manual_seed(0)
report = {}
for api in ("aot_module", "aotcache.compile"):
    model = M().eval()
    chunks = [torch.randn(2, 4) for _ in range(4)]
    expected = model.encode_parallel(chunks)
    if api == "aot_module":
        wrapped = aot_module(model, "nop", cache=False, dynamic=False)
    else:
        wrapped = aotcache.compile(model, compiler="nop", cache=False, dynamic=False)
    before = fallback_counts().get("eager:swap_busy", 0)
    first = wrapped.encode_parallel(chunks)  # the first calls: in the workers, under the method's hold
    busy = fallback_counts().get("eager:swap_busy", 0) - before
    direct = wrapped(chunks[0])  # no hold: captures
    again = wrapped.encode_parallel(chunks)  # the graph now: no swap, nothing waits
    report[api] = {
        "first_equal": all(torch.equal(a, b) for a, b in zip(first, expected)),
        "direct_equal": torch.allclose(direct, expected[0]),
        "again_equal": all(torch.allclose(a, b) for a, b in zip(again, expected)),
        "busy_first": busy,
        "partial": sum(n for reason, n in fallback_counts().items() if reason.startswith("partial:")),
        "busy_again": fallback_counts().get("eager:swap_busy", 0) - before - busy,
        "clean": capture_threads.swap_gate(model).owner is None and "forward" not in model.__dict__
                 and model.enc.weight.__class__ is nn.Parameter,
    }
print(json.dumps(report))
"""


def test_a_method_mapping_self_over_worker_threads_runs_eagerly_at_first_instead_of_hanging():
    """The workers' first calls cannot swap the module's tensors while the method's own thread holds the module
    (it may read them): they wait a bounded time, run eagerly with eager's results (counted as ``swap_busy``), and
    a later call outside the method captures; the method's calls then run compiled. Before the bound, the first
    call hung for good."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, timeout=240,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the method mapping self over worker threads hung: {exc.stderr}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for api, seen in report.items():
        assert seen["first_equal"] and seen["direct_equal"] and seen["again_equal"], (api, seen)
        assert seen["busy_first"] >= 1 and seen["busy_again"] == 0, (api, seen)  # eager at first only
        assert seen["partial"] == 0, (api, seen)  # a busy swap is not the code's failure: nothing remembered
        assert seen["clean"], (api, seen)


_FIRST_CAPTURE_IN_AN_ENDED_THREAD = r"""
import json, threading
import torch
from aotcache.aot import aot_function

def scale(x):
    return x * 2 + 1

def shift(x):
    return x.sin() - 3

x = torch.randn(3, 4)
results = {}
worker = threading.Thread(target=lambda: results.update(worker=aot_function(scale, "nop", cache=False)(x)))
worker.start()
worker.join()  # the thread that made the first FakeTensorMode has ended
main = aot_function(shift, "nop", cache=False)(x)
print(json.dumps({"worker_equal": torch.equal(results["worker"], scale(x)), "main_equal": torch.equal(main, shift(x))}))
"""


def test_a_capture_after_the_first_one_ran_in_an_ended_thread_does_not_crash():
    """NOTE [A fake CUDA guard owned by a finished thread] (aotcache/fake_device_guard.py): on torch 2.11 without a
    GPU, the fake CUDA guard of the first FakeTensorMode belonged to the thread that made it; once that thread
    ended, the next capture in any thread crashed the process (SIGSEGV). A fresh process: the first capture in a
    worker thread that then ends, a second one in the main thread; both give eager's results."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _FIRST_CAPTURE_IN_AN_ENDED_THREAD], capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"worker_equal": True, "main_equal": True}


class _Registry:
    """Reached by the compiled function: its ``seen`` dict is what another thread of the program adds to (like
    pytest's import hook, which records every import in such a dict)."""

    def __init__(self) -> None:
        self.offset = 1.0
        self.seen = {f"module{i}": bool(i % 2) for i in range(2000)}


@pytest.mark.parametrize("entry", ["aot_function", "aot_module"])
def test_a_call_whose_program_reaches_a_dict_another_thread_adds_to_gives_eagers_result(entry):
    """NOTE [Containers another thread changes] (aotcache/autograd_cache/live_containers.py): the walk of the
    program read a reached dict while another thread added to it, and the call raised "dictionary changed size
    during iteration" where eager runs (seen on torch 2.11 in test_generate_called_while_another_thread_captures
    above). The other thread adds and removes a key at every switch of the GIL (a 10 µs switch interval); each call
    gives eager's result (a new offset at each call: each call walks the program again)."""
    from aotcache.aot import aot_function

    registry = _Registry()

    def shifted(x):
        return x * 2 + registry.offset

    class Shifted(nn.Module):
        def forward(self, x):
            return x * 2 + registry.offset

    compiled = (aot_function(shifted, "nop", cache=False) if entry == "aot_function"
                else aot_module(Shifted(), "nop", cache=False))
    x = torch.randn(3, 4)
    stop, outcome = threading.Event(), {}

    def keep_adding():  # one key in and out: the dict's size changes, its length stays bounded
        while not stop.is_set():
            registry.seen["added"] = True
            time.sleep(0)  # lets the walk run while the dict holds the key
            del registry.seen["added"]

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    adder = threading.Thread(target=keep_adding, name=OTHER)
    adder.start()
    try:
        for call in range(20):
            registry.offset = float(call)  # a changed program: the next call walks it again
            try:
                outcome[call] = compiled(x), shifted(x)
            except RuntimeError as exc:
                outcome[call] = exc, None
    finally:
        stop.set()
        adder.join(WAIT)
        sys.setswitchinterval(switch_interval)
    for call, (result, expected) in outcome.items():
        assert isinstance(result, torch.Tensor), (call, result)
        torch.testing.assert_close(result, expected)


# NOTE [One trace at a time] (capture_threads.py): torch.fx's tracer keeps its patcher in a module global, so
# captures in several threads at once failed ("CURRENT_PATCHER is None in finally block"), and a model that
# captures alone took the fallback (with on_capture_error="raise", the call raised). NOTE [The Dynamo way beside a
# capture] (compile_api.py): one thread's call went the Dynamo way while another thread's first call captured the
# same module again, and Dynamo's guard failed ("Guard failed on the same frame it was created"). Real threads
# released together by a barrier, repeated so that the old overlap happened in nearly every run; only results are
# asserted. Run in a fresh process (the scenarios leave Dynamo's and aotcache's process state behind, which later
# tests in the same worker must not inherit), once for all the tests below.
_FIRST_CALLS_AT_ONCE = r"""
import json, threading
import torch
from torch import nn
import aotcache
from aotcache.aot import aot_module

ROUNDS = 8

class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
    def forward(self, x):
        y = self.linear(x)
        if y.sum() > 0:  # refused by the capture: aotcache.compile takes the Dynamo way
            y = y * 2
        return y

def three_models(seed):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(3)]

def first_calls_at_once(calls, inputs):
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)
    def first_call(i):
        barrier.wait(60)
        try:
            results[i] = calls[i](inputs[i])
        except Exception as exc:
            results[i] = exc
    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results

def failures(results, expected):
    found = []
    for result, want in zip(results, expected):
        if isinstance(result, Exception):
            found.append(f"{type(result).__name__}: {str(result)[:200]}")
        elif not all(torch.allclose(got, want) for got in result):
            found.append("another result than eager's")
    return found

report = {}
for scenario in ("different_models", "same_model", "compile_aot", "compile_dynamo"):
    found, routes = [], set()
    for round_ in range(2 * ROUNDS if scenario == "compile_dynamo" else ROUNDS):  # (the rarer overlap)
        if scenario == "compile_dynamo":
            torch.manual_seed(round_)
            models = [DataDependentBranch()] * 3
            shared = aotcache.compile(models[0], compiler="nop", cache=False)
            wrapped = [shared] * 3
        else:
            models = three_models(round_)
            if scenario == "same_model":
                models = [models[0]] * 3
                wrapped = [aot_module(models[0], "nop", cache=False, on_capture_error="raise")] * 3
            elif scenario == "different_models":
                wrapped = [aot_module(model, "nop", cache=False, on_capture_error="raise") for model in models]
            else:
                wrapped = [aotcache.compile(model, compiler="nop", cache=False) for model in models]
        inputs = [torch.randn(4, 8) for _ in range(3)]
        calls = [lambda x, w=w: (w(x), w(x)) for w in wrapped]
        results = first_calls_at_once(calls, inputs)
        found += failures(results, [model(x) for model, x in zip(models, inputs)])
        routes.update(getattr(w, "route", None) for w in wrapped)
    report[scenario] = {"failures": found, "routes": sorted(map(str, routes))}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def first_calls_at_once_report():
    return _report_of_script(_FIRST_CALLS_AT_ONCE, 400, "first calls from three threads at once")


@pytest.mark.parametrize("scenario", ["different_models", "same_model"])
def test_first_calls_from_three_threads_at_once_all_capture_with_eagers_results(first_calls_at_once_report, scenario):
    """``aot_module`` with ``on_capture_error="raise"``: every first call captures and gives eager's result."""
    assert first_calls_at_once_report[scenario]["failures"] == []


def test_aotcache_compile_first_calls_from_three_threads_at_once_take_the_aot_way(first_calls_at_once_report):
    """Through ``aotcache.compile`` the failed capture chose the Dynamo way (and recorded it for later processes)
    for models that capture whole."""
    assert first_calls_at_once_report["compile_aot"] == {"failures": [], "routes": ["aot"]}


def test_aotcache_compile_first_calls_of_one_model_going_the_dynamo_way_from_three_threads(
        first_calls_at_once_report):
    """NOTE [The Dynamo way beside a capture]: eager's results from every thread, also while another thread
    captures the model again."""
    assert first_calls_at_once_report["compile_dynamo"]["failures"] == []


# NOTE [One trace at a time]: a capture holds the process's trace lock while it runs the user's Python; a forward
# that waits there for a worker thread whose own first call must capture (another model) waited for good. Run in a
# subprocess with a short bound, so a regression fails by the timeout instead of hanging the session.
_TRACE_WAITS_FOR_A_WORKER = r"""
import json, os
from concurrent.futures import ThreadPoolExecutor
import torch
from torch import nn
from aotcache.aot import aot_module, capture_threads
from aotcache.aot.fallback import fallback_counts

os.environ["AOTCACHE_TRACE_WAIT_S"] = "0.5"  # the bound under test; the default is longer

torch.manual_seed(0)
helper = nn.Linear(4, 4)
probe = torch.randn(2, 4)

class Outer(nn.Module):
    def __init__(self, helper_call):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.helper_call = helper_call
    def forward(self, x):
        with ThreadPoolExecutor(1) as pool:  # the worker's first call of the helper captures it
            offset = pool.submit(lambda: self.helper_call(probe).detach()).result()
        return self.lin(x) + offset.sum()

eager = Outer(helper)
wrapped_helper = aot_module(helper, "nop", cache=False)
outer = aot_module(Outer(wrapped_helper), "nop", cache=False)
outer.orig_module.lin.load_state_dict(eager.lin.state_dict())
x = torch.randn(3, 4)
first = outer(x)
again = outer(x)
print(json.dumps({"first_equal": torch.allclose(first, eager(x)), "again_equal": torch.allclose(again, eager(x)),
                  "helper_equal": torch.allclose(wrapped_helper(probe), helper(probe)),
                  "busy": fallback_counts().get("eager:swap_busy", 0)}))
"""


def test_a_capture_waiting_for_a_worker_that_captures_runs_instead_of_hanging():
    report = _report_of_script(_TRACE_WAITS_FOR_A_WORKER, 240, "a capture waiting for a worker thread that captures")
    assert report["first_equal"] and report["again_equal"] and report["helper_equal"], report
    assert report["busy"] >= 1, report  # the worker's call ran eagerly while the outer capture held the lock


# NOTE [A child forked while another thread captures]: a DataLoader worker forked while another thread captured
# inherited the trace lock owned by a thread the child does not have: its capture gave up (ran eagerly), and
# is_compiling() stayed True in it. Run in a subprocess (fork beside pytest's threads), bounded.
_FORK_WHILE_ANOTHER_THREAD_CAPTURES = r"""
import json, multiprocessing, os, threading
import torch
from torch import nn
from aotcache.aot import aot_module, capture_threads
from aotcache.aot.fallback import fallback_counts

inside, release = threading.Event(), threading.Event()

class Held(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
    def forward(self, x):
        inside.set()
        release.wait(120)
        return self.lin(x)

def child(queue):
    os.environ["AOTCACHE_TRACE_WAIT_S"] = "0.5"  # the bug showed as this wait given up; the default is longer
    torch.manual_seed(1)
    model, x = nn.Linear(4, 4), torch.randn(2, 4)
    wrapped = aot_module(model, "nop", cache=False)
    first, again = wrapped(x), wrapped(x)
    queue.put(json.dumps({"equal": torch.equal(first, model(x)) and torch.equal(again, model(x)),
                          "counts": fallback_counts(), "is_compiling": torch.compiler.is_compiling()}))

held = aot_module(Held(), "nop", cache=False)
thread = threading.Thread(target=held, args=(torch.randn(2, 4),))
thread.start()
assert inside.wait(120)
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
print(queue.get(timeout=200))
process.join(60)
release.set()
thread.join(120)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork only")
def test_a_child_forked_while_another_thread_captures_captures_itself():
    report = _report_of_script(_FORK_WHILE_ANOTHER_THREAD_CAPTURES, 300, "a forked child's capture")
    assert report == {"equal": True, "counts": {}, "is_compiling": False}, report


# NOTE [is_compiling held by count]: both saved and put back the flag, and the one ending last left True for good
# (test_aotcache_compile_first_calls_of_one_model_going_the_dynamo_way_from_three_threads left it True, failing
# test_interrupted_capture)
def test_a_capture_overlapping_a_dynamo_compile_session_in_another_thread_leaves_is_compiling_false():
    from aotcache.aot.capture_threads import compiling

    session = getattr(torch.compiler, "_compile_session_context", None)
    if session is None:
        pytest.skip("this torch has no compile session flag")
    captured, session_began, capture_ended = threading.Event(), threading.Event(), threading.Event()

    def dynamo_session():
        captured.wait(WAIT)
        with session():
            session_began.set()
            capture_ended.wait(WAIT)

    thread = threading.Thread(target=dynamo_session)
    thread.start()
    with compiling():
        captured.set()
        session_began.wait(WAIT)
    capture_ended.set()
    thread.join(WAIT)
    try:
        assert not torch.compiler.is_compiling()
    finally:
        torch.compiler._is_compiling_flag = False


# NOTE [A child forked while another thread captures the same model]: the child's first call of the model waited for
# good on the compiled function's lock (held by the capturing thread, which the child does not have), and the module
# held the capture's trace tensors in the child. Run in a subprocess (fork beside pytest's threads); the child is
# bounded (killed where it does not answer), and so is the script. One fresh process per way of wrapping: see NOTE
# [Autograd in a forked child].
_FORK_WHILE_ANOTHER_THREAD_CAPTURES_THE_SAME_MODEL = r"""
import json, multiprocessing, os, sys, tempfile, threading, traceback
cache_dir = tempfile.TemporaryDirectory()
os.environ["AOTCACHE_CACHE_DIR"] = cache_dir.name
import torch
from torch import nn
import aotcache
from aotcache.aot import aot_module
from aotcache.aot.fallback import fallback_counts

class Held(nn.Module):
    '''Holds the first call of a thread other than the main one inside its capture until released.'''
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.inside, self.release = threading.Event(), threading.Event()
    def forward(self, x):
        if threading.current_thread() is not threading.main_thread() and not self.inside.is_set():
            self.inside.set()
            self.release.wait(120)
        return self.lin(x) * self.scale

def eager(model, x):
    with torch.no_grad():
        return model.lin(x) * model.scale

def child(queue, model, wrapped):
    try:
        x = torch.randn(2, 4)
        first, again = wrapped(x), wrapped(x)
        queue.put({"equal": torch.allclose(first, eager(model, x)) and torch.allclose(again, eager(model, x)),
                   "own_tensors": type(model.lin.weight) is nn.Parameter and type(model.scale) is torch.Tensor,
                   "counts": fallback_counts(), "is_compiling": torch.compiler.is_compiling()})
    except BaseException:
        queue.put({"error": traceback.format_exc()[-1500:]})

def fork_during_capture(wrap):
    torch.manual_seed(0)
    model = Held()
    wrapped = wrap(model)
    x = torch.randn(2, 4)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", wrapped(x)))
    thread.start()
    if not model.inside.wait(120):
        raise RuntimeError("the capture never reached the forward")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue, model, wrapped))
    process.start()
    try:
        report = queue.get(timeout=60)
    except Exception:
        report = {"error": "the forked child did not answer within 60 s (hung)"}
    process.join(10)
    if process.is_alive():
        process.kill()
    model.release.set()
    thread.join(120)
    report["parent_equal"] = torch.allclose(out["result"], eager(model, x))
    return report

WRAPS = {"aot_module": lambda m: aot_module(m, "nop", cache=False),
         "compile_cached": lambda m: aotcache.compile(m, compiler="nop")}
report = fork_during_capture(WRAPS[WRAP])
cache_dir.cleanup()
print(json.dumps(report))
"""

_WRAPS_OF_A_FORKED_CHILD = ["aot_module", "compile_cached"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork only")
@pytest.mark.parametrize("wrap", _WRAPS_OF_A_FORKED_CHILD)
def test_a_child_forked_while_another_thread_captures_the_same_model_captures_it_with_eagers_results(wrap):
    report = _report_of_script(f"WRAP = {wrap!r}\n" + _FORK_WHILE_ANOTHER_THREAD_CAPTURES_THE_SAME_MODEL, 400,
                               "a forked child calling the model another thread captures")
    assert report == {"equal": True, "own_tensors": True, "counts": {}, "is_compiling": False,
                      "parent_equal": True}, report


# NOTE [Autograd in a forked child]
# Once autograd's engine has started its device threads, torch refuses autograd in every process forked afterwards
# ("Unable to handle autograd's threading in combination with fork-based multiprocessing"). The engine starts them
# at the first backward of a process where a non-CPU device guard reports devices: a GPU, and also, on a CUDA build
# of torch 2.11 without a GPU, the fake CUDA guard that FakeTensorMode installs (plain torch: one FakeTensorMode
# entered, one backward, fork, and the child's backward raises; torch 2.13's CPU build registers no CUDA guard). A
# capture traces the backward with autograd, so it cannot succeed in such a child: the call runs eagerly (its forward
# needs no engine) with eager's results, or loads what the parent stored. Found on torch 2.11.0+cu130 on the CPU,
# where a child forked after an earlier capture of the same process fell back ({"region": 1}).
_FORK_AFTER_A_BACKWARD = r"""
import json, logging, multiprocessing, os, tempfile, traceback
cache_dir = tempfile.TemporaryDirectory()
os.environ["AOTCACHE_CACHE_DIR"] = cache_dir.name
import torch
from torch import nn
import aotcache
from aotcache.aot import aot_module
from aotcache.aot.fallback import fallback_counts

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
    def forward(self, x):
        return self.lin(x) * self.scale

class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

def autograd_runs_here():
    '''Whether torch lets this process run a backward (the probe of NOTE [Autograd in a forked child]).'''
    x = torch.ones(2, requires_grad=True)
    try:
        torch.autograd.grad((x * 2).sum(), x)
    except RuntimeError as exc:
        if "fork" not in str(exc):
            raise
        return False
    return True

def child(queue):
    try:
        warnings = Warnings()
        logging.getLogger("aotcache").addHandler(warnings)
        torch.manual_seed(1)
        model = Scaled()
        wrapped = WRAPS[WRAP](model)
        x = torch.randn(2, 4)
        first, again = wrapped(x), wrapped(x)
        with torch.no_grad():
            want = model(x)
        queue.put({"equal": torch.equal(first, want) and torch.equal(again, want), "counts": fallback_counts(),
                   "autograd_runs": autograd_runs_here(),
                   "names_the_fork": any("fork-based multiprocessing" in m for m in warnings.messages)})
    except BaseException:
        queue.put({"error": traceback.format_exc()[-1500:]})

WRAPS = {"aot_module": lambda m: aot_module(m, "nop", cache=False),
         "compile_cached": lambda m: aotcache.compile(m, compiler="nop")}
torch.manual_seed(1)
WRAPS[WRAP](Scaled())(torch.randn(2, 4)).sum().backward()
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
try:
    report = queue.get(timeout=120)
except Exception:
    report = {"error": "the forked child did not answer within 120 s (hung)"}
process.join(10)
if process.is_alive():
    process.kill()
cache_dir.cleanup()
print(json.dumps(report))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork only")
@pytest.mark.parametrize("wrap", _WRAPS_OF_A_FORKED_CHILD)
def test_a_child_forked_after_a_backward_gives_eagers_results_where_torch_refuses_it_autograd(wrap):
    report = _report_of_script(f"WRAP = {wrap!r}\n" + _FORK_AFTER_A_BACKWARD, 400, "a child forked after a backward")
    if report.get("autograd_runs", True):  # the child may capture: nothing falls back
        assert report == {"equal": True, "counts": {}, "autograd_runs": True, "names_the_fork": False}, report
    elif wrap == "compile_cached":  # the parent stored the graph: the child loads it, no capture needed
        assert report == {"equal": True, "counts": {}, "autograd_runs": False, "names_the_fork": False}, report
    else:  # the capture cannot trace the backward: eager's results, the fallback counted and named
        assert report == {"equal": True, "counts": {"partial:trace_failed": 1, "region": 1}, "autograd_runs": False,
                          "names_the_fork": True}, report


class _HoldsItsCapture(nn.Module):
    """Its first call, in a thread, holds the process's trace lock (inside its capture) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inside, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        if not self.inside.is_set():
            self.inside.set()
            self.release.wait(WAIT)
        return self.lin(x)


def test_a_call_run_eagerly_for_a_busy_trace_lock_captures_at_its_next_call_and_records_no_route(
        monkeypatch, tmp_path):
    """NOTE [One trace at a time]: a call that gave up waiting for another thread's trace runs eagerly for that call
    only. The next call captures; ``aotcache.compile`` leaves its route undecided meanwhile (it said "the whole call
    captured" and skipped the route record's reading at the next call) and records nothing in the store."""
    import aotcache
    from aotcache import compile_api

    monkeypatch.setenv("AOTCACHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AOTCACHE_TRACE_WAIT_S", "0.5")  # the bound this test waits out, once
    records = []
    real_record = compile_api.record_route
    monkeypatch.setattr(compile_api, "record_route", lambda *args: records.append(args) or real_record(*args))
    torch.manual_seed(0)  # (before the other capture: a seed set during it is the captured function's)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(3, 4)
    compiled = aotcache.compile(model, compiler="nop")
    holder = _HoldsItsCapture()
    held = aot_module(holder, "nop", cache=False, on_capture_error="raise")
    thread = threading.Thread(target=held, args=(torch.randn(2, 4),))
    thread.start()
    try:
        assert holder.inside.wait(WAIT)
        busy_before = fallback_counts().get("eager:swap_busy", 0)
        first = compiled(x)
        assert fallback_counts().get("eager:swap_busy", 0) == busy_before + 1  # ran eagerly: the lock was busy
        assert compiled.router.route is None
        traces = compiled.compiled.num_compiles
    finally:
        holder.release.set()
        thread.join(WAIT)
    again = compiled(x)
    assert compiled.compiled.num_compiles == traces + 1 and compiled.router.route == "aot"  # captured this time
    assert fallback_counts().get("eager:swap_busy", 0) == busy_before + 1
    assert torch.allclose(first, model(x)) and torch.allclose(again, model(x))
    assert records == []


@pytest.mark.parametrize("text, seconds", [("2.5", 2.5), ("0", 0.0), (" 600 ", 600.0), (None, 60.0)])
def test_the_trace_wait_is_read_from_its_variable(monkeypatch, text, seconds):
    """NOTE [How long a call waits for another thread's trace]: ``AOTCACHE_TRACE_WAIT_S``, 60 s when unset."""
    from aotcache.aot.capture_threads import trace_wait_s

    if text is None:
        monkeypatch.delenv("AOTCACHE_TRACE_WAIT_S", raising=False)
    else:
        monkeypatch.setenv("AOTCACHE_TRACE_WAIT_S", text)
    assert trace_wait_s() == seconds


@pytest.mark.parametrize("text", ["soon", "-1", "inf", "nan", ""])
def test_a_bad_trace_wait_raises_a_config_error_at_the_first_capture(monkeypatch, text):
    """Not a wait that never ends (inf), nor a capture failure that sends the model to the fallback: the capture
    raises, naming the variable, whichever ``on_capture_error``."""
    from aotcache.config import ConfigError

    monkeypatch.setenv("AOTCACHE_TRACE_WAIT_S", text)
    wrapped = aot_module(nn.Linear(4, 4), "nop", cache=False)  # on_capture_error="fallback"
    with pytest.raises(ConfigError, match="AOTCACHE_TRACE_WAIT_S"):
        wrapped(torch.randn(2, 4))
    assert wrapped.compiled._fallbacks == {}  # nothing remembered against the model
    monkeypatch.setenv("AOTCACHE_TRACE_WAIT_S", "60")
    x = torch.ones(2, 4)
    assert torch.allclose(wrapped(x), wrapped.orig_module(x)) and wrapped.compiled._fallbacks == {}


# A known gap, on main too (not the fork's): what another thread changes on the model while a capture runs its Python
# (model.eval(), a buffer it registers, a flag it sets: the usual steps before starting DataLoader workers) is undone
# when the capture's next run of the Python starts from the call's state (NOTE [State changed by a capture] in
# aot/api.py), so the parent ends in training mode (dropout on) without the buffer; a child forked meanwhile puts
# back the swap-start state too (module_put_back), so it matches the parent and is as wrong.
_FORK_AFTER_THE_FORKING_THREAD_CHANGED_THE_MODEL = r"""
import json, multiprocessing, threading, traceback
import torch
from torch import nn
from aotcache.aot import aot_module

class Held(nn.Module):
    '''Holds the first call of a thread other than the main one inside its capture until released.'''
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.inside, self.release = threading.Event(), threading.Event()
    def forward(self, x):
        if threading.current_thread() is not threading.main_thread() and not self.inside.is_set():
            self.inside.set()
            self.release.wait(120)
        return self.drop(self.lin(x)) * self.scale

def state(model):
    return {"training": model.training, "drop_training": model.drop.training,
            "offset": type(model.__dict__["_buffers"].get("offset")).__name__, "note": getattr(model, "note", None),
            "own_tensors": type(model.lin.weight) is nn.Parameter and type(model.scale) is torch.Tensor}

def child(queue, model, wrapped):
    try:
        report = state(model)
        x = torch.randn(2, 4)
        with torch.no_grad():
            want = model.lin(x) * model.scale
        report["equal"] = torch.allclose(wrapped(x), want)
        queue.put(report)
    except BaseException:
        queue.put({"error": traceback.format_exc()[-1500:]})

torch.manual_seed(0)
model = Held()
wrapped = aot_module(model, "nop", cache=False)
thread = threading.Thread(target=wrapped, args=(torch.randn(2, 4),))
thread.start()
if not model.inside.wait(120):
    raise RuntimeError("the capture never reached the forward")
model.eval()  # the forking thread's own changes, made while the other thread's swap is under way
model.register_buffer("offset", torch.zeros(4))
model.note = "set by the forking thread"
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue, model, wrapped))
process.start()
try:
    report = {"child": queue.get(timeout=60)}
except Exception:
    report = {"child": {"error": "the forked child did not answer within 60 s (hung)"}}
process.join(10)
if process.is_alive():
    process.kill()
model.release.set()
thread.join(120)
report["parent"] = state(model)
print(json.dumps(report))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork only")
@pytest.mark.xfail(strict=True, reason="a capture's restore of the call's state (NOTE [State changed by a capture]) "
                   "undoes what another thread changed on the model during the capture, in the parent and in a "
                   "child forked meanwhile")
def test_a_child_forked_mid_capture_keeps_what_the_forking_thread_changed_on_the_model():
    report = _report_of_script(_FORK_AFTER_THE_FORKING_THREAD_CHANGED_THE_MODEL, 400,
                               "a forked child of a thread that changed the model another thread captures")
    want = {"training": False, "drop_training": False, "offset": "Tensor", "note": "set by the forking thread",
            "own_tensors": True}
    assert report == {"child": {**want, "equal": True}, "parent": want}, report


def _capture_beside(draw):
    """Run ``draw()`` in this thread while another thread's capture of a fresh model is under way; return the
    wrapped model once the capture ended, and ``draw``'s result."""
    torch.manual_seed(0)  # (before the capture: a seed set during it is the captured function's)
    holder = _HoldsItsCapture()
    wrapped = aot_module(holder, "nop", cache=False)
    thread = threading.Thread(target=wrapped, args=(torch.randn(2, 4),))
    thread.start()
    try:
        assert holder.inside.wait(WAIT)
        drawn = draw()
    finally:
        holder.release.set()
        thread.join(WAIT)
    return wrapped, drawn


# A known gap, on main too: NOTE [Host random numbers] (aot/host_random.py) compares the process's generator states
# before and after a capture, so another thread's draws during it (data augmentation, a model's init in a thread
# of a server) read as the captured function's own: the capture is refused ("seeds or sets torch's global random
# generator") and the model goes to the fallback for good, and Python's and numpy's generators are put back, so the
# other thread draws the same numbers again.
@pytest.mark.xfail(strict=True, reason="host-random checks compare process-wide generator states: another thread's "
                   "torch draws during a capture refuse it (NOTE [Host random numbers])")
def test_another_threads_torch_draws_during_a_capture_do_not_refuse_it():
    busy_before = dict(fallback_counts())
    wrapped, _ = _capture_beside(lambda: torch.randn(3))
    assert wrapped.compiled._fallbacks == {} and fallback_counts() == busy_before


@pytest.mark.xfail(strict=True, reason="host-random checks put Python's generator back after a capture: another "
                   "thread's draws during it are drawn again (NOTE [Host random numbers])")
def test_another_threads_python_draws_during_a_capture_are_not_drawn_again():
    import random

    random.seed(5)
    _, first = _capture_beside(random.random)
    second = random.random()
    random.seed(5)
    assert (first, second) == (random.random(), random.random())


# NOTE [A child forked while another thread captures the same model]: the child's put-back of a module runs in the
# fork handler, before the rest of what the child forgets. One that raised (fault injected here: a put-back that
# fails) ended the handler there: that gate stayed owned by the thread the child lacks (its next swap waited on the
# old lock for good), and every compiled function's lock another thread held stayed held (the hang the put-back
# came with, back).
_FORK_WITH_A_FAILING_PUT_BACK = r"""
import json, multiprocessing, threading, traceback
import torch
from torch import nn
from aotcache.aot import capture_threads

module = nn.Linear(4, 4)
gate = capture_threads.swap_gate(module)
lock = capture_threads.ForkSafeLock()
inside, release = threading.Event(), threading.Event()

def failing_put_back():
    raise RuntimeError("injected: the put-back fails")

def hold():  # another thread holds the function's lock and the module's swap, as a capture does
    with lock, gate.swapping(lambda: failing_put_back):
        inside.set()
        release.wait(120)

def child(queue):
    try:
        queue.put({"function_lock_free": not lock.locked(), "gate_owner": gate.owner,
                   "gate_lock_free": not gate._lock.locked()})
    except BaseException:
        queue.put({"error": traceback.format_exc()[-1500:]})

thread = threading.Thread(target=hold)
thread.start()
if not inside.wait(120):
    raise RuntimeError("the holder never started")
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
try:
    report = queue.get(timeout=60)
except Exception:
    report = {"error": "the forked child did not answer within 60 s"}
process.join(10)
if process.is_alive():
    process.kill()
release.set()
thread.join(120)
print(json.dumps(report))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork only")
def test_a_failing_put_back_in_a_forked_child_still_frees_what_other_threads_held():
    report = _report_of_script(_FORK_WITH_A_FAILING_PUT_BACK, 300, "a forked child whose put-back fails")
    assert report == {"function_lock_free": True, "gate_owner": None, "gate_lock_free": True}, report
