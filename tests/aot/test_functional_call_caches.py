"""Modules run through ``torch.func.functional_call`` inside a compiled function, whose forward computes an attribute
from the swapped-in weights (NOTE [Caches a module rebuilds from its weights] in aot/rebuilt_caches.py): an RNN's
weight lists are captured whole, old-style weight-normed / spectrally normed / pruned layers fall back; eager's
results, no trace tensor left in the user's module, the passed weights read at every call."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.utils.prune  # (_normed builds pruned layers)
from torch import nn
from torch.func import functional_call

import aotcache
from aotcache.aot.errors import CaptureError

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections")


def _rnn(kind: str) -> nn.RNNBase:
    torch.manual_seed(0)
    if kind == "lstm":
        return nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3)
    if kind == "gru":
        return nn.GRU(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    return nn.RNN(4, 6, num_layers=2, bidirectional=True)  # (time-major)


def _weights(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """A weight dict of ``model``'s names, other values for each ``step`` (a meta-learning inner step's)."""
    return {name: (value.detach() + 0.1 * step).requires_grad_() for name, value in model.named_parameters()}


def _is_trace_tensor(value: object) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(value, torch.Tensor) and (is_fake(value) or torch._is_functional_tensor(value))


def _compiled(api: str, fn):
    """``fn`` compiled whole, or an error: a fallback would hide the refusal these tests are about."""
    if api == "aot_function":
        return aotcache.aot_function(fn, "nop", cache=False, on_capture_error="raise")
    return aotcache.compile(fn, compiler="nop", cache=False, fullgraph=True)


def _run(fn, weights, x):
    out = fn(weights, x)
    out.pow(2).sum().backward()
    grads = {name: value.grad for name, value in weights.items()}
    return out.detach(), grads


@pytest.mark.parametrize("api", ["aot_function", "compile"])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_an_rnn_under_functional_call_is_captured_whole_and_reads_the_passed_weights(kind, api):
    model = _rnn(kind)
    own = list(model._flat_weights)

    def step(weights, x):
        return functional_call(model, weights, (x,))[0]

    compiled = _compiled(api, step)
    x = torch.randn(2, 5, 4)
    results = []
    for n in range(3):  # other weights at each call: the graph reads the passed ones, never the first call's
        got_out, got_grads = _run(compiled, _weights(model, n), x)
        want_out, want_grads = _run(step, _weights(model, n), x)
        model._flat_weights = list(own)  # (the eager call left the passed ones: see the test below)
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
        results.append(got_out)
        assert not any(_is_trace_tensor(w) for w in model._flat_weights)
    assert not torch.allclose(results[0], results[1])
    if api == "aot_function":
        assert compiled.num_compiles == 1  # one graph, reused with the other weights
    else:
        assert compiled.route == "aot"
    assert all(w is p for w, p in zip(model._flat_weights, model.parameters()))  # the module's own, as found
    torch.testing.assert_close(model(x)[0], _rnn(kind)(x)[0])  # the module itself is unchanged


def test_eager_functional_call_leaves_the_passed_weights_in_the_list_and_a_compiled_call_leaves_the_modules():
    """What eager leaves (pinned here so that a change in torch is noticed) and what aotcache leaves instead: the
    list as before the call, holding no reference to the passed tensors (NOTE [Caches a module rebuilds from its
    weights])."""
    model = _rnn("lstm")
    x = torch.randn(2, 5, 4)

    def step(weights, x):
        return functional_call(model, weights, (x,))[0]

    passed = _weights(model, 1)
    step(passed, x)
    assert all(w is passed[name] for w, name in zip(model._flat_weights, model._flat_weights_names))
    model(x)  # the next forward rebuilds it from the module's own weights
    assert all(w is p for w, p in zip(model._flat_weights, model.parameters()))

    compiled = _compiled("aot_function", step)
    for n in range(2):  # the capture, then a call reusing the graph
        passed = _weights(model, n)
        compiled(passed, x).sum().backward()
        assert all(w is p for w, p in zip(model._flat_weights, model.parameters()))
        assert all(ref() is p for ref, p in zip(model._flat_weight_refs, model.parameters()))
    alive = weakref.ref(passed["weight_ih_l0"])
    del passed
    gc.collect()
    assert alive() is None


def test_eager_calls_between_compiled_calls_keep_the_graph():
    """An eager ``functional_call`` (or a plain forward) between compiled calls rebuilds the RNN's lists; the walk
    leaves them out, so the program guards hold and the graph is reused, with eager's results."""
    model = _rnn("gru")
    x = torch.randn(2, 5, 4)

    def step(weights, x):
        return functional_call(model, weights, (x,))[0]

    compiled = _compiled("aot_function", step)
    for n in range(4):
        want = step(_weights(model, n), x)  # leaves the passed tensors in the list
        torch.testing.assert_close(compiled(_weights(model, n), x), want)
        model(x)
    assert compiled.num_compiles == 1


def test_a_weight_not_passed_is_read_from_the_module_and_its_rebinding_is_seen():
    """The other direction: with a partial weight dict (``strict=False``) the forward reads the module's own
    (frozen) tensor for the rest; rebinding that parameter between calls (which ``__setattr__`` also writes into
    the RNN's list) must give the new result, not the graph of the old one."""
    model = _rnn("gru")
    model.weight_hh_l0.requires_grad_(False)
    x = torch.randn(2, 5, 4)

    def step(weights, x):
        return functional_call(model, weights, (x,), strict=False)[0]

    compiled = _compiled("aot_function", step)
    partial = {name: value for name, value in _weights(model, 1).items() if name != "weight_hh_l0"}
    torch.testing.assert_close(compiled(partial, x), step(partial, x))
    with torch.no_grad():
        model.weight_hh_l0 = nn.Parameter(model.weight_hh_l0 * 2, requires_grad=False)
    want = step(partial, x)
    torch.testing.assert_close(compiled(partial, x), want)
    with torch.no_grad():
        model.weight_hh_l0.mul_(0.5)  # in place: a new value of the same tensor
    torch.testing.assert_close(compiled(partial, x), step(partial, x))
    assert not torch.allclose(want, step(partial, x))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 4)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(torch.tanh(self.embed(x)))[0][:, -1])


def test_a_maml_inner_step_over_a_model_holding_an_lstm_matches_eager():
    """First-order MAML: the adapted weights of an inner step passed back through ``functional_call``; the LSTM is
    a submodule of the module the closure holds."""
    model = _Encoder()
    x, y = torch.randn(3, 6, 4), torch.randn(3, 2)

    def adapted_loss(weights, x, y):
        loss = nn.functional.mse_loss(functional_call(model, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=False)
        fast = {name: w - 0.1 * g for (name, w), g in zip(weights.items(), grads)}
        return nn.functional.mse_loss(functional_call(model, fast, (x,)), y)

    compiled = _compiled("aot_function", adapted_loss)
    for n in range(2):
        weights = _weights(model, n)
        want = adapted_loss(weights, x, y)
        want_grads = torch.autograd.grad(want, list(weights.values()))
        weights = _weights(model, n)
        got = compiled(weights, x, y)
        got_grads = torch.autograd.grad(got, list(weights.values()))
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled.num_compiles == 1
    assert not any(_is_trace_tensor(w) for w in model.rnn._flat_weights)  # (the eager calls left theirs)


class _KeepsOutput(nn.GRU):
    """An RNN whose forward also keeps its output: that attribute is no cache and is still refused."""

    def forward(self, x, hx=None):
        out = super().forward(x, hx)
        self.last = out[0]
        return out


def test_a_tensor_the_forward_keeps_beside_the_rebuilt_list_is_still_refused():
    model = _KeepsOutput(4, 5, batch_first=True)
    x = torch.randn(2, 3, 4)

    def step(weights, x):
        return functional_call(model, weights, (x,))[0]

    with pytest.raises(CaptureError, match="last"):
        aotcache.aot_function(step, "nop", cache=False, on_capture_error="raise")(_weights(model, 0), x)
    assert not hasattr(model, "last") and not any(_is_trace_tensor(w) for w in model._flat_weights)
    fallback = aotcache.aot_function(step, "nop", cache=False)  # the fallback: eager's result and tensors
    weights = _weights(model, 1)
    torch.testing.assert_close(fallback(weights, x), step(weights, x))
    assert type(model.last) is torch.Tensor


def _normed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    if kind == "weight_norm":
        return nn.utils.weight_norm(linear)
    if kind == "spectral_norm_train":
        return nn.utils.spectral_norm(linear)
    if kind == "pruned":
        return nn.utils.prune.l1_unstructured(linear, "weight", amount=0.5)
    return nn.utils.spectral_norm(linear).eval()


def _fallback(api: str, fn):
    """``fn`` compiled with the default settings: a refused capture falls back."""
    if api == "aot_function":
        return aotcache.aot_function(fn, "nop", cache=False)
    return aotcache.compile(fn, compiler="nop", cache=False)


@pytest.mark.parametrize("api", ["aot_function", "compile"])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm_train", "spectral_norm_eval", "pruned"])
def test_an_old_style_normed_layer_under_functional_call_falls_back_with_eagers_results(kind, api):
    """The old-style pre-hook sets the public ``module.weight`` from the passed ``weight_g`` / ``weight_v``
    (``weight_orig`` and the power-iteration buffers, updated in place in training; ``weight_orig`` and the
    pruning mask), which eager leaves there after the call. Not a cache put back (NOTE [Caches a module rebuilds
    from its weights]): refused, and the fallback gives eager's results, gradients, buffers and public weight, with
    no trace tensor left."""
    model, reference = _normed(kind), _normed(kind)

    def step_of(module):
        return lambda weights, buffers, x: functional_call(module, (weights, buffers), (x,))

    x = torch.randn(2, 4)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(CaptureError, match="weight"):
        aotcache.aot_function(step_of(model), "nop", cache=False, on_capture_error="raise")(
            _weights(model, 0), buffers, x)
    assert not _is_trace_tensor(model.weight)
    compiled = _fallback(api, step_of(model))
    for n in range(3):
        weights, want_weights = _weights(model, n), _weights(model, n)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        want_buffers = {k: v.clone() for k, v in buffers.items()}
        want = step_of(reference)(want_weights, want_buffers, x)
        want_grads = torch.autograd.grad(want.pow(2).sum(), list(want_weights.values()))
        got = compiled(weights, buffers, x)
        got_grads = torch.autograd.grad(got.pow(2).sum(), list(weights.values()))
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b)
        for name in buffers:  # the power iteration's in-place updates of the passed buffers
            torch.testing.assert_close(buffers[name], want_buffers[name])
        assert not _is_trace_tensor(model.weight)
        torch.testing.assert_close(model.weight, reference.weight)  # computed from the passed tensors, as eager
    if api == "compile":
        assert compiled.route != "aot"


def _hooked_then_normed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    # runs before the norm hook: reads the weight the previous forward computed (eager: the previous call's)
    model.register_forward_pre_hook(lambda module, args: (args[0] + module.weight.sum(),))
    return nn.utils.weight_norm(model)


def test_a_hook_reading_the_weight_before_the_weight_norm_hook_gets_eagers_weight_call_after_call():
    """A pre-hook that runs first reads ``module.weight`` before the norm hook sets it: in eager, the weight the
    previous call computed from its passed tensors. The capture is refused, and the fallback leaves that weight as
    eager does, so each next call gives eager's result."""
    x = torch.randn(2, 4)

    def calls(model, fn):
        return [fn(_weights(model, n), x) for n in range(3)]

    def step_of(model):
        return lambda weights, x: functional_call(model, weights, (x,))

    model = _hooked_then_normed()
    with pytest.raises(CaptureError, match=r"program state \(weight"):
        aotcache.aot_function(step_of(model), "nop", cache=False, on_capture_error="raise")(_weights(model, 0), x)
    assert not _is_trace_tensor(model.weight)
    reference = _hooked_then_normed()
    want = calls(reference, step_of(reference))
    got = calls(model, aotcache.aot_function(step_of(model), "nop", cache=False))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(want[2], step_of(_hooked_then_normed())(_weights(model, 2), x))  # (it is stateful)


def test_an_aot_module_of_a_weight_normed_layer_keeps_eagers_public_weight():
    """Without ``functional_call``: eager leaves ``module.weight`` computed from the module's own weights after each
    forward, which a reused graph would not update; the capture is refused and the fallback leaves eager's weight
    after a training step."""
    model, reference = _normed("weight_norm"), _normed("weight_norm")
    with pytest.raises(CaptureError, match=r"on the model \(weight = "):
        aotcache.aot_module(_normed("weight_norm"), "nop", cache=False, on_capture_error="raise")(torch.randn(2, 4))
    compiled = aotcache.aot_module(model, "nop", cache=False)
    x = torch.randn(2, 4)
    for module, run in ((reference, reference), (model, compiled)):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(2):
            run(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert type(model.weight) is torch.Tensor and not _is_trace_tensor(model.weight)
    torch.testing.assert_close(model.weight, reference.weight)


@pytest.mark.parametrize("kind", ["parametrized_weight_norm", "parametrized_spectral_norm", "batch_norm",
                                  "multihead_attention"])
def test_modules_without_such_a_cache_were_and_are_captured_whole(kind):
    """Parametrizations compute the weight at each read (no attribute kept), BatchNorm's statistics passed as
    buffers are written in place, MultiheadAttention keeps nothing: captured whole, eager's results and buffers."""
    torch.manual_seed(0)
    model = {"parametrized_weight_norm": lambda: nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),
             "parametrized_spectral_norm": lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)),
             "batch_norm": lambda: nn.BatchNorm1d(4),
             "multihead_attention": lambda: nn.MultiheadAttention(4, 2, batch_first=True)}[kind]()
    x = torch.randn(3, 4) if kind != "multihead_attention" else torch.randn(2, 3, 4)
    args = (x, x, x) if kind == "multihead_attention" else (x,)

    def step(weights, buffers, *args):
        out = functional_call(model, (weights, buffers), args)
        return out[0] if isinstance(out, tuple) else out

    compiled = _compiled("aot_function", step)
    for n in range(2):
        weights, buffers = _weights(model, n), {k: v.clone() for k, v in model.named_buffers()}
        want_buffers = {k: v.clone() for k, v in buffers.items()}
        want = step(weights, want_buffers, *args)
        torch.testing.assert_close(compiled(weights, buffers, *args), want)
        for name in buffers:
            torch.testing.assert_close(buffers[name], want_buffers[name])
    assert compiled.num_compiles == 1


def test_a_double_backward_after_a_fingerprint_warm_start_leaves_the_rnns_list_as_found():
    """A runtime loaded by its fingerprint captures the joint graph again at its first double backward (NOTE
    [Double backward through the joint graph]); that run of the Python left the RNN's list holding its
    FunctionalTensors."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store import InMemoryCache, TieredCache

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    torch.manual_seed(0)
    model = nn.RNN(4, 5, batch_first=True)

    def energy(weights, x):
        return functional_call(model, weights, (x,))[0].pow(2).sum()

    def penalty(fn, weights, x):
        (grad,) = torch.autograd.grad(fn(weights, x), x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), weights["weight_ih_l0"])[0]

    x = torch.randn(2, 3, 4, requires_grad=True)
    weights = _weights(model, 1)
    aotcache.aot_function(energy, "nop", cache=cache, on_capture_error="raise")(weights, x)
    warm = aotcache.aot_function(energy, "nop", cache=cache, on_capture_error="raise")
    got = penalty(warm, weights, x)
    assert cache.counters["fingerprint_hit"] == 1
    assert not any(_is_trace_tensor(w) for w in model._flat_weights)
    torch.testing.assert_close(got, penalty(energy, weights, x))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm_train", "pruned"])
def test_a_normed_layer_called_directly_in_a_compiled_function_keeps_eagers_public_weight(kind):
    """Without ``functional_call``: the pre-hook computes ``module.weight`` from the module's own weights, which
    eager leaves there after each call (the power iteration's too); a graph reused without Python would leave the
    weight the capture found, stale once those weights change, and code reading it before the forward (here the
    function itself) would get the stale value. Refused: the fallback is eager's."""
    model, reference, refused = _normed(kind), _normed(kind), _normed(kind)
    with pytest.raises(CaptureError, match="weight"), torch.no_grad():
        aotcache.aot_function(refused, "nop", cache=False, on_capture_error="raise")(torch.randn(2, 4))

    def reads_the_weight_first(module):
        return lambda x: module.weight.sum() + module(x)

    compiled = aotcache.aot_function(reads_the_weight_first(model), "nop", cache=False)
    eager = reads_the_weight_first(reference)
    x = torch.randn(2, 4)
    with torch.no_grad():  # (inference: no closure tensor that requires grad is read)
        for n in range(4):
            torch.testing.assert_close(compiled(x), eager(x))
            assert not _is_trace_tensor(model.weight)
            torch.testing.assert_close(model.weight, reference.weight)
            if n == 0:
                for module in (model, reference):  # the module's own weights, changed in place
                    getattr(module, "weight_g" if kind == "weight_norm" else "weight_orig").mul_(2)


def test_pruning_again_after_a_compiled_functional_call_ranks_the_weights_eager_does():
    """``prune.l1_unstructured`` (and ``global_unstructured``) on an already pruned layer ranks ``module.weight``
    itself, outside any forward: after ``functional_call`` eager leaves there the weight computed from the passed
    ``weight_orig``, so a capture that put back the weight it found would prune by other weights than eager."""
    model, reference = _normed("pruned"), _normed("pruned")

    def step_of(module):
        return lambda weights, x: functional_call(module, weights, (x,))

    compiled = aotcache.aot_function(step_of(model), "nop", cache=False)
    x = torch.randn(2, 4)
    weights = {name: value.detach().flip(-1).requires_grad_() for name, value in model.named_parameters()}
    torch.testing.assert_close(compiled(weights, x), step_of(reference)(weights, x))
    assert not _is_trace_tensor(model.weight)  # refused: eager's fallback
    for module in (model, reference):
        torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.75)
    torch.testing.assert_close(model.weight_mask, reference.weight_mask)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm_train"])
def test_a_norm_hooks_setting_changed_after_compiling_gives_eagers_result(kind):
    """The hook objects' settings (``WeightNorm.dim``, ``SpectralNorm.n_power_iterations``) are not in the program
    guards (hooks by identity only); such a layer is refused and falls back, so a changed setting gives eager's
    result, never the old graph's."""
    model, reference = _normed(kind), _normed(kind)
    # (``dim=-1``: one norm over the whole weight. ``dim=1`` would not do: ``weight_g`` keeps its dim-0 shape and
    # eager's fused kernel then reads past it, a different garbage result per process.)
    setting, value = ("dim", -1) if kind == "weight_norm" else ("n_power_iterations", 5)

    def step_of(module):
        return lambda weights, x: functional_call(module, weights, (x,))

    def state(module):  # (the power iteration's buffers passed too, as fresh copies: the same result per call)
        return {**_weights(module, 1), **{name: value.clone() for name, value in module.named_buffers()}}

    compiled = aotcache.aot_function(step_of(model), "nop", cache=False)
    x = torch.randn(2, 4)
    before = step_of(reference)(state(reference), x)
    torch.testing.assert_close(compiled(state(model), x), before)
    for module in (model, reference):
        setattr(next(iter(module._forward_pre_hooks.values())), setting, value)
    want = step_of(reference)(state(reference), x)
    torch.testing.assert_close(compiled(state(model), x), want)
    assert not torch.allclose(want, before)
