"""Regressions found by ``bench/odd_forwards.py`` (forwards that do unusual but legal things): each ran in eager
and failed, or gave other results, through ``aot_function`` / ``aot_module``, ``aotcache.compile`` or
``torch.compile(backend="aotcache")`` (nop compiler)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.fallback import fallback_counts


def _routes(obj):
    """The three entry points, each over its own deep copy of ``obj`` (a module or a function)."""
    module = isinstance(obj, nn.Module)
    return {
        "aot": lambda: (aotcache.aot_module if module else aotcache.aot_function)(copy.deepcopy(obj) if module
                                                                                   else obj, "nop", cache=False),
        "compile": lambda: aotcache.compile(copy.deepcopy(obj) if module else obj, compiler="nop", cache=False),
        "dynamo": lambda: torch.compile(copy.deepcopy(obj) if module else obj, backend="aotcache",
                                        options={"compiler": "nop", "cache": False}),
    }


ROUTES = ("aot", "compile", "dynamo")


# ---- NOTE [Captures that fail where eager may run] ----------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_dynamic_quantized_linear_runs_as_in_eager(route):
    """Its packed weights (a ScriptObject) broke the fake-tensor cache ('__eq__' is not implemented for
    LinearPackedParamsBase, a NotImplementedError) where eager runs."""
    torch.manual_seed(0)
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)),
                                                   {nn.Linear}, dtype=torch.qint8)
    compiled = _routes(model)[route]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(3):
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), model(x))


def _shape_checked(x):
    # what a forward's ``assert`` does outside a test module. pytest rewrites an ``assert`` written in a test file
    # into calls of its assertion helpers, whose module globals reach pytest's session state (the capture's log
    # names its config's ExitStack); a failing one ran them, and in an xdist worker that had run other files first
    # (torch 2.11 venv, pytest 9.2) the capture refused "changes Python state it reads" and took the Dynamo route
    if x.shape[-1] != 4:
        raise AssertionError("last dimension must be 4")
    return x * 2


@pytest.mark.parametrize("route", ("aot", "compile"))
def test_an_error_eager_raises_too_keeps_its_type_and_later_calls_compile(route):
    compiled = _routes(_shape_checked)[route]()
    with pytest.raises(AssertionError, match="last dimension"):
        compiled(torch.randn(3, 5))
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), x * 2)
    if route == "compile":
        assert compiled.route == "aot", compiled.router.reason  # the failing call decided nothing


def test_strict_mode_raises_the_capture_failure_itself(monkeypatch):
    torch.manual_seed(0)
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = aotcache.aot_module(model, "nop", cache=False, on_capture_error="raise")
        with pytest.raises(NotImplementedError):
            compiled(torch.randn(2, 4))


# ---- NOTE [TorchScript submodules] ----------------------------------------------------------------------

class _WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.mark.parametrize("route", ("aot", "compile"))
def test_scripted_submodule_gives_eager_outputs_and_gradients(route):
    """Failed with "contains(): incompatible function arguments" (the module snapshot) and ``KeyError: 0`` (the
    program walk): a ScriptModule's registries are C++-backed wrappers."""
    torch.manual_seed(0)
    eager = _WithScripted()
    torch.manual_seed(0)  # (a deep copy of a ScriptModule has non-leaf parameters: torch's own behaviour)
    mine = _WithScripted()
    compiled = (aotcache.aot_module(mine, "nop", cache=False) if route == "aot" else
                aotcache.compile(mine, compiler="nop", cache=False))
    for seed in range(2):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
        out = compiled(x)
        torch.testing.assert_close(out, eager(x))
        out.sum().backward()
    eager(torch.randn(3, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
    eager(torch.randn(3, 4, generator=torch.Generator().manual_seed(1))).sum().backward()
    for (name, ref), (_, got) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(got.grad, ref.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


# ---- NOTE [Host random numbers]: seeding torch inside ---------------------------------------------------

def _seeds_inside(x):
    torch.manual_seed(123)
    return x + torch.rand_like(x)


@pytest.mark.parametrize("route", ("aot", "compile"))
def test_manual_seed_inside_gives_eager_values_and_generator_state(route):
    """The graph did not replay the seeding: calls after the first drew on from the generator (other values)."""
    compiled = _routes(_seeds_inside)[route]()
    for call in range(3):
        x = torch.full((3, 4), float(call))
        torch.manual_seed(call)
        got, got_state = compiled(x), torch.get_rng_state()
        torch.manual_seed(call)
        want, want_state = _seeds_inside(x), torch.get_rng_state()
        torch.testing.assert_close(got, want)
        assert torch.equal(got_state, want_state)


def test_a_capture_that_seeds_leaves_the_generator_where_it_was():
    from aotcache.aot.errors import CaptureError

    compiled = aotcache.aot_function(_seeds_inside, "nop", cache=False, on_capture_error="raise")
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with pytest.raises(CaptureError, match="manual_seed"):
        compiled(torch.zeros(2))
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == 7


def test_random_ops_without_seeding_still_capture_whole():
    compiled = aotcache.aot_function(lambda x: x * torch.rand_like(x), "nop", cache=False, on_capture_error="raise")
    torch.manual_seed(3)
    got = compiled(torch.ones(4))
    torch.manual_seed(3)
    torch.testing.assert_close(got, torch.rand(4))


# ---- NOTE [Argument containers changed in place] --------------------------------------------------------

def _appends(x, log):
    log.append(x.shape[0])
    log.append("called")
    return x * len(log)


@pytest.mark.parametrize("route", ROUTES)
def test_list_argument_appended_to_as_in_eager(route):
    """The capture appended to a copy rebuilt from the flat arguments: the caller's list never changed."""
    compiled = _routes(_appends)[route]()
    for call in range(3):
        mine, theirs = [0], [0]
        x = torch.full((2, 3), float(call))
        torch.testing.assert_close(compiled(x, mine), _appends(x, theirs))
        assert mine == theirs == [0, 2, "called"]


def _sets_key(x, state):
    state["seen"] = state.get("seen", 0) + 1
    return x + 1


def test_dict_argument_changed_in_place_as_in_eager():
    compiled = aotcache.aot_function(_sets_key, "nop", cache=False)
    state: dict = {}
    for _ in range(3):
        compiled(torch.zeros(2), state)
    assert state == {"seen": 3}
    assert any(kind.endswith("unsupported_construct") for kind in fallback_counts())


def test_containers_read_but_not_changed_are_captured_whole():
    compiled = aotcache.aot_function(lambda xs, d: xs[0] + xs[1] * d["s"], "nop", cache=False,
                                     on_capture_error="raise")
    xs = [torch.ones(2), torch.ones(2)]
    torch.testing.assert_close(compiled(xs, {"s": torch.full((2,), 3.0)}), torch.full((2,), 4.0))
    assert len(xs) == 2


# ---- NOTE [torch.func levels of a failed capture] -------------------------------------------------------

class _FuncGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.func.grad(lambda t: (t.sin() * self.w).sum())(x) * 2


@pytest.mark.parametrize("route", ROUTES)
def test_func_grad_inside_forward_runs_as_in_eager(route):
    """Under torch.compile the aotcache region capture stopped between torch.func's level push and pop; Dynamo's
    functorch guard then failed ("Guard failed on the same frame it was created", an AssertionError)."""
    torch.manual_seed(0)
    eager = _FuncGrad()
    compiled = _routes(eager)[route]()
    x = torch.randn(3, 4, requires_grad=True)
    torch.testing.assert_close(compiled(x), eager(x))
    assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0


# ---- NOTE [Refused arguments take the fallback] ---------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    scale: float


def _scaled(batch):
    return batch.x * batch.scale


def test_an_argument_compared_by_identity_runs_through_the_fallback():
    """aot_function raised RefusedArgumentError (a TypeError) for a plain dataclass batch, where eager runs."""
    from aotcache.aot.errors import RefusedArgumentError

    compiled = aotcache.aot_function(_scaled, "nop", cache=False)
    for call in range(3):
        x = torch.full((2, 3), float(call), requires_grad=True)
        out = compiled(_Batch(x, 2.0))
        torch.testing.assert_close(out, x.detach() * 2)
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((2, 3), 2.0))
    strict = aotcache.aot_function(_scaled, "nop", cache=False, on_capture_error="raise")
    with pytest.raises(RefusedArgumentError, match="_Batch"):
        strict(_Batch(torch.ones(2), 2.0))


# ---- NOTE [Double backward through the joint graph]: torch.compile regions ------------------------------

class _Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return torch.tanh(self.lin(x)).sum()


class _BatchNormCritic(nn.Module):
    """A critic updating its running statistics in the call that is differentiated twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)

    def forward(self, x):
        return torch.tanh(self.out(self.norm(self.lin(x)))).sum()


def _gradient_penalty(model, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x), x, create_graph=True)
    loss = (g.norm(dim=-1) - 1).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_double_backward_through_a_cached_torch_compile_region():
    """A region loaded from the cache had no joint graph: create_graph=True raised DoubleBackwardError. It is
    captured again at its first double backward; a first compile (a miss) keeps the capture's."""
    torch.manual_seed(0)
    eager = _Critic()
    x = torch.randn(3, 4)
    want_loss, want_grads = _gradient_penalty(eager, x)
    for attempt in ("miss", "hit"):
        torch._dynamo.reset()
        model = copy.deepcopy(eager)
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, backend="aotcache", options={"compiler": "nop"})
        loss, grads = _gradient_penalty(compiled, x)
        torch.testing.assert_close(loss, want_loss, msg=attempt)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, msg=attempt)
    from aotcache.autograd_cache.cache import default_cache

    assert default_cache().stats()["hit"] == 1  # the second attempt loaded the region


class _ConvBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.conv(x)) + x).abs().mean()


def _input_gradient_with_graph(model, x):
    (gx,) = torch.autograd.grad(model(x), x, create_graph=True)
    return gx


@pytest.mark.parametrize("dynamic", (False, True), ids=("static", "dynamic"))
def test_double_backward_inside_the_compiled_function(dynamic):
    """``autograd.grad(create_graph=True)`` inside the torch.compile'd function: Dynamo traced the runtime's own
    replay of the joint graph as user code, and under dynamic=True the double backward raised DoubleBackwardError
    (NOTE [The compiled backward runs outside Dynamo]; PyTorch's test_eager_sequence_nr)."""
    torch._dynamo.reset()  # (what Dynamo made of the runtime's frames in an earlier test hid the failure)
    torch.manual_seed(0)
    eager = _ConvBatchNorm()
    model = copy.deepcopy(eager)
    x = torch.rand(3, 4, 5, 5, requires_grad=True)
    want = _input_gradient_with_graph(eager, x)
    compiled = torch.compile(_input_gradient_with_graph, backend="aotcache", dynamic=dynamic,
                             options={"compiler": "nop"})
    got = compiled(model, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean)
    (second,) = torch.autograd.grad((got * got).sum(), x)
    (want_second,) = torch.autograd.grad((want * want).sum(), x)
    torch.testing.assert_close(second, want_second)


@pytest.mark.parametrize("critic", (_Critic, _BatchNormCritic))
@pytest.mark.parametrize("route", ("aot", "compile"))
def test_double_backward_after_a_fingerprint_warm_start(route, critic):
    """A second wrapper of the same model finds the entry by its fingerprint (no capture): it had no joint graph
    and raised DoubleBackwardError; it captures the call again at its first double backward. With BatchNorm, the
    call updates running statistics before the capture of its joint graph (NOTE [Replaying a graph that updated
    its inputs]): the statistics are eager's, not updated twice."""
    from aotcache.autograd_cache.cache import default_cache

    torch.manual_seed(0)
    eager = critic()
    x = torch.randn(3, 4)
    start = copy.deepcopy(eager)
    want_loss, want_grads = _gradient_penalty(eager, x)
    for attempt in ("cold", "warm"):
        model = copy.deepcopy(start)
        model.zero_grad(set_to_none=True)
        compiled = (aotcache.aot_module(model, "nop") if route == "aot" else aotcache.compile(model, compiler="nop"))
        loss, grads = _gradient_penalty(compiled, x)
        torch.testing.assert_close(loss, want_loss, msg=attempt)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, msg=attempt)
        torch.testing.assert_close(model.state_dict(), eager.state_dict(), msg=attempt)
    assert default_cache().counters.get("fingerprint_hit", 0) >= 1


# ---- NOTE [Retained gradients of outputs] ---------------------------------------------------------------

def _retains(x):
    h = x * 2
    h.retain_grad()
    return h, h.sum()


@pytest.mark.parametrize("route", ROUTES)
def test_retain_grad_inside_on_a_returned_tensor_fills_its_grad(route):
    """The compiled output did not retain its gradient: ``h.grad`` stayed None where eager fills it."""
    compiled = _routes(_retains)[route]()
    for _ in range(2):
        x = torch.ones(3, requires_grad=True)
        h, total = compiled(x)
        (total * 3).backward()
        assert h.grad is not None
        torch.testing.assert_close(h.grad, torch.full((3,), 3.0))
        torch.testing.assert_close(x.grad, torch.full((3,), 6.0))


# ---- NOTE [Capture errors the function catches] ---------------------------------------------------------

def _catches_item(x):
    try:
        s = float(x.sum())
    except Exception:  # noqa: BLE001 - the user's own fallback
        s = 0.0
    return x * s


def _catches_branch(x):
    try:
        if x.sum() > 0:
            return x * 2
        return x
    except Exception:  # noqa: BLE001
        return x * -1


@pytest.mark.parametrize("fn", [_catches_item, _catches_branch], ids=["item", "branch"])
@pytest.mark.parametrize("route", ("aot", "compile"))
def test_a_data_dependent_error_the_function_catches_is_not_traced_as_its_except_branch(fn, route):
    """The capture's data-dependent error took the function's except branch, and the graph returned that branch
    at every call (x * 0 where eager gives x * 3), silently."""
    compiled = _routes(fn)[route]()
    for call in range(3):
        x = torch.ones(3) * (call - 1 if fn is _catches_branch else call + 1)
        torch.testing.assert_close(compiled(x), fn(x))


def _catches_shape_error(x):
    try:
        return x.view(2, -1) * 2
    except RuntimeError:
        return x * 3


def test_a_shape_error_the_function_catches_is_still_captured_whole():
    compiled = aotcache.aot_function(_catches_shape_error, "nop", cache=False, on_capture_error="raise")
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 3.0))
    torch.testing.assert_close(compiled(torch.ones(4)), torch.full((2, 2), 2.0))


@pytest.mark.parametrize("route", ("compile", "dynamo"))
def test_a_jagged_nested_tensor_through_the_cached_dynamo_way_runs_as_eager(route):
    """Found by bench/odd_forwards.py: the cache checked a Dynamo graph's guards on hinted copies of its inputs,
    and a jagged tensor's ragged size (a nested int) has no hint: BackendCompilerFailed where eager runs."""
    fn = lambda nt: (nt * 2).sin()  # noqa: E731
    compiled = (aotcache.compile(fn, compiler="nop") if route == "compile"
                else torch.compile(fn, backend="aotcache", options={"compiler": "nop"}))
    for call in range(2):
        g = torch.Generator().manual_seed(call)
        nt = torch.nested.nested_tensor([torch.randn(2, 4, generator=g), torch.randn(3, 4, generator=g)],
                                        layout=torch.jagged)
        got, want = compiled(nt), fn(nt)
        for a, b in zip(got.unbind(), want.unbind()):
            torch.testing.assert_close(a, b)
