"""Random ops with the nop compiler draw eager's values under the same seed, and leave the global generator
in eager's state (the compiled graphs run ATen's random ops in eager's order and count); see docs/limitations.md,
"Random ops", for what holds with Inductor / AOTInductor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import aotcache
from aotcache.aot.generator_args import torch_traces_generators
from tests.aot.generator_tracing import needs_generator_tracing
from tests.aot.verify import verify

X = torch.rand(4, 5, 6)
CASES = {
    "bernoulli": (lambda p: torch.bernoulli(p) * p, [X]),
    "normal": (lambda m, s: torch.normal(m, s), [torch.randn(4, 5), torch.rand(4, 5) + 0.1]),
    "normal_float_std": (lambda m: torch.normal(m, 2.0), [torch.randn(4, 5)]),
    "rrelu": (lambda t: F.rrelu(t - 0.5, training=True), [X]),
    "feature_alpha_dropout": (lambda t: F.feature_alpha_dropout(t, 0.5, training=True), [X]),
    "alpha_dropout": (lambda t: F.alpha_dropout(t, 0.5, training=True), [X]),
    "dropout": (lambda t: F.dropout(t, 0.5, training=True), [X]),
    "dropout2d": (lambda t: F.dropout2d(t, 0.5, training=True), [X]),
    "randn_like": (lambda t: torch.randn_like(t) + t, [X]),
    "several_draws": (lambda t: F.dropout(t, 0.5) + torch.randn_like(t) * torch.bernoulli(t), [X]),
    "fractional_max_pool2d": (lambda t: F.fractional_max_pool2d(t.unsqueeze(0), 2, output_size=(2, 3)), [X]),
    "uniform_": (lambda t: t * torch.empty_like(t).uniform_(), [X]),
    "exponential_": (lambda t: t * torch.empty_like(t).exponential_(), [X]),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_random_op_matches_eager_under_the_same_seed_with_nop(name, train):
    fn, inputs = CASES[name]
    inputs = [value.clone().requires_grad_(train) for value in inputs]
    verify(fn, inputs, compiler="nop", train=train, steps=2, rng_seed=7)  # values and gradients


def test_compiled_graph_leaves_the_generator_where_eager_does():
    def fn(t):
        return F.dropout(t, 0.3) * torch.randn_like(t) + torch.rand(3)

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    x = torch.randn(2, 3, requires_grad=True)
    states = []
    for call in (fn, compiled, compiled):  # second compiled call: the reused graph
        torch.manual_seed(3)
        first = call(x)
        second = call(x)
        states.append((first.detach(), second.detach(), torch.get_rng_state()))
    for got in states[1:]:
        torch.testing.assert_close(got[0], states[0][0])
        torch.testing.assert_close(got[1], states[0][1])
        assert torch.equal(got[2], states[0][2])
    assert compiled.num_compiles == 1


def _dropout_noise(t):
    return F.dropout(t, 0.5) * torch.randn_like(t) + torch.bernoulli(t.sigmoid())


@pytest.mark.slow
def test_inductor_random_ops_match_eager_values_and_generator_state():
    """NOTE [Random ops run ATen's kernels] in compilers/inductor.py: without fallback_random Inductor fails
    to lower rand/randn outside compile_fx ("should have been handled in replace_random.py")."""
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(3)
    expected = _dropout_noise(x)
    expected_state = torch.get_rng_state()
    compiled = aotcache.aot_function(_dropout_noise, "inductor", cache=False)
    torch.manual_seed(3)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    assert torch.equal(torch.get_rng_state(), expected_state)
    got.sum().backward()  # the backward (masks saved from the forward) compiles and runs
    assert x.grad is not None


class _HostRandomMask(torch.nn.Module):
    """Draws its mask from numpy's or Python's global generator, as Wav2Vec2's ``_compute_mask_indices`` does."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.source = source

    def forward(self, x):
        import random

        import numpy as np

        if self.source == "numpy":
            mask = torch.tensor(np.random.rand(*x.shape) < 0.5)
        else:
            mask = torch.tensor([[random.random() < 0.5 for _ in range(x.shape[1])] for _ in range(x.shape[0])])
        return self.fc(x) * mask


@pytest.mark.parametrize("source", ["numpy", "python"])
@pytest.mark.parametrize("api", ["compile", "aot_module"])
def test_host_random_draws_are_made_at_every_call_as_in_eager(api, source):
    # NOTE [Host random numbers]: such a draw used to be baked into the graph: every call reused one mask
    import random

    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = _HostRandomMask(source)
    compiled = aotcache.compile(model, compiler="nop") if api == "compile" else aotcache.aot_module(model, "nop")
    x = torch.randn(3, 4)
    for seed in range(3):
        np.random.seed(seed), random.seed(seed)
        expected = model(x)
        after_eager = (np.random.get_state()[1].copy(), random.getstate())
        np.random.seed(seed), random.seed(seed)
        got = compiled(x)
        assert torch.equal(got, expected), seed  # numpy's own draws, not Dynamo's torch-stream stand-ins
        assert (np.random.get_state()[1] == after_eager[0]).all() and random.getstate() == after_eager[1]
    assert api != "compile" or compiled.route == "dynamo"


# ---- NOTE [Double backward through random ops] (aot/double_backward.py) -----------------------------------

class _DropoutCritic(torch.nn.Module):
    """A WGAN-GP critic with dropout in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 16)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, training=self.training) + 0.1 * torch.randn_like(x).sum())


def _penalty_steps(model, params, steps=2, draw_between=False):
    """Gradient-penalty steps from seed 0: per step the output, the loss, the parameter gradients and the
    generator's state after the step."""
    torch.manual_seed(0)
    results = []
    for step in range(steps):
        for p in params:
            p.grad = None
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step)).requires_grad_(True)
        out = model(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        if draw_between:  # the generator moves on between the forward and the double backward
            torch.rand(5)
        loss = out.mean() + ((g.norm(2, dim=1) - 1) ** 2).mean()
        loss.backward()
        results.append((out.detach(), loss.detach(), [p.grad.clone() for p in params], torch.get_rng_state()))
    return results


def _assert_same_steps(got, expected, exact=True):
    for (out, loss, grads, state), (e_out, e_loss, e_grads, e_state) in zip(got, expected):
        if exact:
            assert torch.equal(out, e_out)  # the forward's own draws
        else:  # (Inductor's kernels round otherwise)
            torch.testing.assert_close(out, e_out)
        torch.testing.assert_close(loss, e_loss)
        for grad, e_grad in zip(grads, e_grads):  # (another mask would differ by O(1), not by rounding)
            torch.testing.assert_close(grad, e_grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(state, e_state)  # the generator where eager leaves it


def _wrapped(api, model):
    if api == "aot_module":
        return aotcache.aot_module(model, "nop", cache=False)
    if api == "aot_function":
        params = dict(model.named_parameters())
        compiled = aotcache.aot_function(lambda p, x: torch.func.functional_call(model, p, (x,)), "nop", cache=False)
        return lambda x: compiled(params, x)
    if api == "backend":
        torch._dynamo.reset()
        return torch.compile(model, backend="aotcache", options={"compiler": "nop"})
    return aotcache.compile(model, compiler="nop", cache=False)


@pytest.mark.parametrize("draw_between", [False, True], ids=["", "draw_between"])
@pytest.mark.parametrize("api", ["aot_module", "aot_function", "compile", "backend"])
def test_a_gradient_penalty_through_dropout_matches_eager(api, draw_between):
    """It raised DoubleBackwardError: a replay of the forward drew other numbers. The replay now starts from the
    generator's state at the forward, and the generator is put back after it."""
    torch.manual_seed(1)
    model = _DropoutCritic()
    params = list(model.parameters())
    expected = _penalty_steps(model, params, draw_between=draw_between)
    got = _penalty_steps(_wrapped(api, model), params, draw_between=draw_between)
    _assert_same_steps(got, expected)


def test_a_gradient_penalty_through_dropout_after_a_fingerprint_warm_start_matches_eager():
    """A second wrapper loads the graph by its fingerprint (no capture) and captures the joint graph again at the
    first double backward; the forward saved the generator's state all the same."""
    from aotcache.autograd_cache.cache import default_cache

    torch.manual_seed(1)
    model = _DropoutCritic()
    params = list(model.parameters())
    expected = _penalty_steps(model, params)
    _assert_same_steps(_penalty_steps(aotcache.aot_module(model, "nop"), params), expected)
    _assert_same_steps(_penalty_steps(aotcache.aot_module(model, "nop"), params), expected)
    assert default_cache().counters.get("fingerprint_hit", 0) >= 1


def test_a_gradient_penalty_through_dropout_with_a_compiler_drawing_its_own_way_raises():
    """A compiled forward not known to draw as eager (here a user's compiler) cannot be replayed: the error says
    so and names the fix; the first-order backward still trains."""
    torch.manual_seed(1)
    model = _DropoutCritic()
    compiled = aotcache.aot_module(model, lambda gm, example_inputs: gm, cache=False)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(aotcache.aot.DoubleBackwardError, match="compiler='nop'"):
        torch.autograd.grad(compiled(x).sum(), x, create_graph=True)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- NOTE [Generator arguments] (aot/generator_args.py) ---------------------------------------------------

class _Noisy(torch.nn.Module):
    """Draws from the generator it is passed (a diffusion sampler's ``generator=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, generator=None):
        noise = torch.randn(x.shape, generator=generator)
        return self.lin(x + noise) * torch.bernoulli(torch.full_like(x, 0.5), generator=generator)


def _generator_calls(call, seeds, train):
    """Per seed: the output (and input gradient), and the passed generator's state after the call; the global
    generator's state at the end."""
    torch.manual_seed(0)
    results = []
    reused = torch.Generator().manual_seed(100)
    for seed in seeds:
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_(train)
        g = reused if seed % 2 else torch.Generator().manual_seed(seed)
        out = call(x, g)
        grad = torch.autograd.grad(out.sum(), x)[0] if train else None
        results.append((out.detach(), grad, g.get_state()))
    return results, torch.get_rng_state()


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("api", ["aot_function", "aot_module",
                                 pytest.param("compile", marks=needs_generator_tracing)])
def test_a_new_generator_at_every_call_reuses_one_graph_and_draws_as_eager(api, train):
    """A generator argument was keyed by identity: a graph per new generator (``generator_arg`` in
    bench/odd_forwards.py), each keeping its generator alive."""
    torch.manual_seed(0)
    model = _Noisy()
    if api == "aot_function":
        compiled = aotcache.aot_function(lambda x, g: model(x, generator=g), "nop", cache=False)
        counter = compiled
    elif api == "aot_module":
        compiled = aotcache.aot_module(model, "nop", cache=False)
        counter = compiled.compiled
    else:
        compiled = aotcache.compile(model, compiler="nop", cache=False)
        counter = compiled.compiled
    seeds = range(6)
    with torch.set_grad_enabled(train):
        expected, expected_state = _generator_calls(lambda x, g: model(x, generator=g), seeds, train)
        got, state = _generator_calls(lambda x, g: compiled(x, generator=g) if api != "aot_function"
                                      else compiled(x, g), seeds, train)
    for (out, grad, g_state), (e_out, e_grad, e_g_state) in zip(got, expected):
        assert torch.equal(out, e_out)
        assert grad is None and e_grad is None or torch.equal(grad, e_grad)
        assert torch.equal(g_state, e_g_state)  # the caller's generator moved as in eager
    assert torch.equal(state, expected_state)  # the global generator untouched, as in eager
    assert counter.num_compiles == 1
    assert api != "compile" or compiled.route == "aot"


def test_a_gradient_penalty_drawing_from_a_generator_argument_matches_eager():
    """The double backward replays the slot's draws from its state at the forward (NOTE [Double backward through
    random ops]); the caller's generator ends where eager leaves it."""
    torch.manual_seed(0)
    model = _Noisy()
    compiled = aotcache.aot_module(model, "nop", cache=False)
    results = []
    for run in (model, compiled, compiled):
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (grad,) = torch.autograd.grad(run(x, generator=g).sum(), x, create_graph=True)
        torch.randn(2, generator=g)  # the generator moves on before the double backward
        grad.pow(2).sum().backward()
        results.append((grad.detach(), model.lin.weight.grad.clone(), g.get_state()))
    for got in results[1:]:
        torch.testing.assert_close(got[0], results[0][0])
        torch.testing.assert_close(got[1], results[0][1], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[2], results[0][2])


class _DrawsFromItsOwnToo(torch.nn.Module):
    """Draws from the generator it is passed and from its own; a caller may pass its own one."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(3)

    def forward(self, x, generator):
        return x + torch.rand(x.shape, generator=generator) * torch.rand(x.shape, generator=self.gen)


def test_a_generator_passed_and_also_drawn_from_directly_is_not_substituted():
    """A slot in place of the module's own generator would split its draws in two streams; such a function keys
    its generators by identity again (one graph per generator, eager's draws)."""
    eager, mine = _DrawsFromItsOwnToo(), _DrawsFromItsOwnToo()
    compiled = aotcache.aot_module(mine, "nop", cache=False)
    x = torch.zeros(4)
    for step in range(3):
        for module, run in ((eager, eager), (mine, compiled)):
            module.out = run(x, module.gen if step != 1 else torch.Generator().manual_seed(step))
        assert torch.equal(mine.out, eager.out), step
        assert torch.equal(mine.gen.get_state(), eager.gen.get_state()), step


def test_one_generator_at_two_positions_draws_in_sequence_as_eager():
    def fn(x, a, b):
        return x + torch.rand(x.shape, generator=a) - torch.rand(x.shape, generator=b)

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    x = torch.zeros(4)
    for seed in range(3):
        ge, gc = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(compiled(x, gc, gc), fn(x, ge, ge))
        assert torch.equal(gc.get_state(), ge.get_state())
        other_e, other_c = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert torch.equal(compiled(x, gc, other_c), fn(x, ge, other_e))
        assert torch.equal(gc.get_state(), ge.get_state()) and torch.equal(other_c.get_state(), other_e.get_state())


def _seeds_its_generator(x, generator):
    generator.manual_seed(11)
    return x + torch.rand(x.shape, generator=generator)


@pytest.mark.parametrize("api", ["aot_function", "compile"])
def test_a_function_seeding_the_generator_it_is_passed_runs_the_seeding_at_every_call(api):
    """NOTE [Host random numbers]: seeding an argument generator inside is Python a graph cannot replay; the
    graph went on drawing from the caller's state where eager seeds anew. Such a capture is refused (the fallback
    seeds at every call), with the generator put back."""
    compiled = (aotcache.aot_function(_seeds_its_generator, "nop", cache=False) if api == "aot_function"
                else aotcache.compile(_seeds_its_generator, compiler="nop", cache=False))
    x = torch.zeros(4)
    for seed in range(3):
        ge, gc = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(compiled(x, gc), _seeds_its_generator(x, ge)), seed
        assert torch.equal(gc.get_state(), ge.get_state()) and gc.initial_seed() == ge.initial_seed() == 11


def test_threads_passing_their_own_generators_draw_as_eager():
    """The slots are shared by the function's calls: a lock holds each graph run with them."""
    import threading

    def fn(x, generator):
        return x + torch.rand(x.shape, generator=generator) * torch.randn(x.shape, generator=generator)

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    x = torch.zeros(64)
    compiled(x, torch.Generator())  # captured before the threads start
    results: dict = {}

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        results[seed] = [compiled(x, g) for _ in range(30)], g.get_state()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, (outs, state) in results.items():
        g = torch.Generator().manual_seed(seed)
        for out in outs:
            assert torch.equal(out, fn(x, g)), seed
        assert torch.equal(state, g.get_state())
    assert compiled.num_compiles == 1


@pytest.mark.slow
@pytest.mark.parametrize("fallback_random", [True, False], ids=["fallback_random", "inductors_own"])
def test_a_gradient_penalty_through_dropout_with_inductor(fallback_random):
    """With fallback_random Inductor's random ops run ATen's kernels in the graph's order: the double backward
    replays them (eager's gradients, also from the cache); with Inductor's own random numbers it raises, naming
    fallback_random."""
    torch.manual_seed(1)
    if not fallback_random:  # dropout alone: Inductor lowers it with its own random numbers
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(8, 1))
        compiled = aotcache.compile(model, compiler="inductor", cache=False)
        x = torch.randn(3, 4, requires_grad=True)
        with pytest.raises(aotcache.aot.DoubleBackwardError, match="fallback_random"):
            torch.autograd.grad(compiled(x).sum(), x, create_graph=True)
        compiled(x).sum().backward()  # the first-order backward trains
        assert all(p.grad is not None for p in model.parameters())
        return
    model = _DropoutCritic()
    params = list(model.parameters())
    options = {"fallback_random": True}
    expected = _penalty_steps(model, params)
    for _ in ("cold", "warm"):  # warm: a fingerprint warm start, whose artifact says its draws are ATen's
        _assert_same_steps(_penalty_steps(aotcache.compile(model, compiler="inductor", options=options), params),
                           expected, exact=False)
    from aotcache.autograd_cache.cache import default_cache

    assert default_cache().counters.get("fingerprint_hit", 0) >= 1


def test_a_replay_that_draws_otherwise_than_the_forward_raises():
    """A compiled forward claiming ATen's draws (``eager_random_draws``) that drew another count of numbers: the
    replay's generators end elsewhere than the forward's, and the double backward raises instead of returning
    gradients of other masks."""
    def draws_more(gm, example_inputs):  # draws once more than its graph
        def run(*args):
            torch.rand(3)
            return gm(*args)

        run.eager_random_draws = (None,)
        return run

    torch.manual_seed(1)
    model = _DropoutCritic()
    compiled = aotcache.aot_module(model, draws_more, cache=False)
    x = torch.randn(3, 4, requires_grad=True)
    out = compiled(x).sum()
    with pytest.raises(aotcache.aot.DoubleBackwardError, match="drew other numbers"):
        torch.autograd.grad(out, x, create_graph=True)  # (the replay runs here)


class _KeepsItsGenerator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, generator):
        self.last_generator = generator
        return self.lin(x) + torch.rand(x.shape, generator=generator)


def test_a_module_keeping_the_generator_it_is_passed_keeps_the_callers():
    """A slot left on the module by the capture would stand where eager keeps the caller's generator; such a
    module keys its generators by identity again."""
    torch.manual_seed(0)
    eager = _KeepsItsGenerator()
    mine = copy.deepcopy(eager)
    compiled = aotcache.aot_module(mine, "nop", cache=False)
    x = torch.randn(2, 4)
    for seed in range(3):
        ge, gc = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(compiled(x, gc), eager(x, ge))
        assert mine.last_generator is gc and torch.equal(gc.get_state(), ge.get_state())


def test_a_function_returning_the_generator_it_is_passed_returns_the_callers():
    """NOTE [Object outputs]: a returned generator came back as a copy at the capture's state (before slots too);
    the capture refuses it, and the fallback returns the caller's."""
    def fn(x, generator):
        return x + torch.rand(x.shape, generator=generator), {"generator": generator}

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    x = torch.zeros(3)
    for seed in range(3):
        ge, gc = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        (out, extra), (e_out, _) = compiled(x, gc), fn(x, ge)
        assert extra["generator"] is gc and torch.equal(out, e_out) and torch.equal(gc.get_state(), ge.get_state())


def _draws_unused(t):
    torch.rand(3)  # moves the generator; nothing reads it
    return F.dropout(torch.tanh(t), 0.5) * torch.randn_like(t)


@pytest.mark.parametrize("partition", ["default", "min_cut"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
def test_a_draw_nothing_uses_is_drawn_as_in_eager(train, partition):
    """NOTE [Random draws nothing uses] in partition.py: the training forward left out ``torch.rand(3)``, so the
    compiled call's dropout mask and noise, and the generator after it, differed from eager's."""
    compiled = aotcache.aot_function(_draws_unused, "nop", partition_fn=partition, cache=False)
    results = []
    for call in (_draws_unused, compiled, compiled):
        torch.manual_seed(4)
        x = torch.randn(3, 4, requires_grad=train)
        with torch.set_grad_enabled(train):
            out = call(x)
            if train:
                (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
                grad.pow(2).sum().backward()  # and the double backward's replay (NOTE [Double backward through
        results.append((out.detach(), x.grad, torch.get_rng_state()))  # random ops])
    for out, grad, state in results[1:]:
        assert torch.equal(out, results[0][0])
        assert grad is None and results[0][1] is None or torch.allclose(grad, results[0][1])
        assert torch.equal(state, results[0][2])


def _draws_from_its_argument_and_the_global_generator(x, generator):
    return x + torch.rand(x.shape, generator=generator) * torch.rand(x.shape)


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
def test_the_default_generator_passed_as_an_argument_draws_one_stream_as_eager(train):
    """A slot in place of ``torch.default_generator`` drew the argument's numbers again from a copy of the global
    state, then overwrote the global generator with the slot's: other values and global state than eager's."""
    fn = _draws_from_its_argument_and_the_global_generator
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    results = []
    for run in (fn, compiled):
        torch.manual_seed(4)
        steps = []
        for _ in range(3):
            x = torch.zeros(5, requires_grad=train)
            with torch.set_grad_enabled(train):
                out = run(x, torch.default_generator)
            steps.append((out.detach(), torch.get_rng_state()))
        results.append(steps)
    for (out, state), (e_out, e_state) in zip(results[1], results[0]):
        assert torch.equal(out, e_out)
        assert torch.equal(state, e_state)
    assert compiled.num_compiles == 1


def _noise_under_fork_rng(x):
    with torch.random.fork_rng():
        noise = torch.rand(x.shape)
    return x + noise + torch.rand(x.shape)


def _noise_with_the_state_set_back(x):
    state = torch.get_rng_state()
    noise = torch.rand(x.shape)
    torch.set_rng_state(state)
    return x + noise + torch.rand(x.shape)


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("fn", [_noise_under_fork_rng, _noise_with_the_state_set_back], ids=["fork_rng", "set_back"])
def test_a_draw_whose_generator_state_is_set_back_inside_is_not_drawn_for_good(fn, train):
    """Found: the capture compared the global generator's state before and after and saw no change, but the graph
    could not replay the Python putting the state back: each compiled call drew for good (other values, and the
    generator moved where eager's is put back). NOTE [Generator states set back inside the function]."""
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    results = []
    for call in (fn, compiled):
        torch.manual_seed(2)
        steps = []
        for _ in range(3):
            with torch.set_grad_enabled(train):
                out = call(torch.zeros(4, requires_grad=train))
            steps.append((out.detach(), torch.get_rng_state()))
        results.append(steps)
    for (out, state), (e_out, e_state) in zip(results[1], results[0]):
        assert torch.equal(out, e_out)
        assert torch.equal(state, e_state)
    assert torch.set_rng_state is torch.random.set_rng_state
    assert all(type(vars(torch._C.Generator)[name]).__name__ == "method_descriptor"  # torch's own methods are back
               for name in ("get_state", "set_state", "manual_seed", "seed", "initial_seed"))


def _branch_on_sign(x, w):
    h = x @ w
    return torch.cond(h.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (h,))


class _CondModule(torch.nn.Module):
    def forward(self, x):
        return (torch.cond(x.sum() > 4, lambda t: t.cos(), lambda t: t.sin(), [x]) + 3,)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_cond_is_captured_whole(dynamic, monkeypatch):
    """Found (torch's test_aotdispatch probe, test_aot_export_with_torch_cond): torch.cond compiles itself with
    Dynamo whenever it runs, and Dynamo sets the global generator's state back after compiling a frame; the refusal
    of NOTE [Generator states set back inside the function] took that for the function's own and refused every
    capture calling torch.cond (export raised)."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")  # a refusal raises instead of falling back
    compiled = aotcache.aot_function(_branch_on_sign, "nop", dynamic=dynamic, cache=False)
    for rows in (5, 7):
        x, w = torch.randn(rows, 3, requires_grad=True), torch.randn(3, 4, requires_grad=True)
        x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out, want = compiled(x, w), _branch_on_sign(x_ref, w_ref)
        torch.testing.assert_close(out, want)
        out.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(w.grad, w_ref.grad)
    inp = torch.randn(3, 4)
    gm, _ = aotcache.aot_export_module(_CondModule(), (inp,), trace_joint=False)
    torch.testing.assert_close(gm(inp)[0], _CondModule()(inp)[0])


def _noise_with_the_argument_generator_set_back(x, generator):
    state = generator.get_state()
    noise = torch.rand(x.shape, generator=generator)
    generator.set_state(state)
    return x + noise + torch.rand(x.shape, generator=generator)


def test_a_draw_whose_argument_generator_is_set_back_inside_is_not_drawn_for_good():
    fn = _noise_with_the_argument_generator_set_back
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    results = []
    for call in (fn, compiled):
        steps = []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            steps.append((call(torch.zeros(4), g), g.get_state()))
        results.append(steps)
    for (out, state), (e_out, e_state) in zip(results[1], results[0]):
        assert torch.equal(out, e_out)
        assert torch.equal(state, e_state)


def test_torch_traces_generators_agrees_with_make_fx():
    """NOTE [Generators in a traced graph, torch 2.11]: the feature test says what ``make_fx`` does with a
    generator constant in this torch (traced from 2.12 on; NotImplementedError on 2.11)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    generator = torch.Generator().manual_seed(0)
    try:
        gm = make_fx(lambda x: torch.rand_like(x, generator=generator))(torch.ones(2))
    except NotImplementedError as exc:
        assert "Generator" in str(exc)
        traced = False
    else:
        assert any(node.op == "get_attr" for node in gm.graph.nodes)  # the generator, held by the graph
        traced = True
    assert torch_traces_generators() is traced


def test_a_generator_argument_is_captured_or_its_fallback_names_the_torch(caplog):
    """A call passing ``generator=`` is captured whole where torch can trace a generator; elsewhere (2.11) it
    falls back with eager's numbers, and the warning names the torch and the cause, not only the trace error."""
    from aotcache.aot.fallback import fallback_counts

    def fn(x, g):
        return torch.rand(x.shape, generator=g) + x

    compiled = aotcache.aot_function(fn, "nop", cache=False)
    before = fallback_counts()
    with caplog.at_level("WARNING", logger="aotcache"):
        got = compiled(torch.ones(3, 2), torch.Generator().manual_seed(1))
    assert torch.equal(got, fn(torch.ones(3, 2), torch.Generator().manual_seed(1)))
    after = fallback_counts()
    new = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    if torch_traces_generators():
        assert new == {} and "Generator" not in caplog.text
    else:
        assert new == {"partial:trace_failed": 1}
        assert f"torch {torch.__version__} cannot put a torch.Generator into a traced graph" in caplog.text


# ---- NOTE [Generator states set back inside the function]: a generator's C methods ----------------------------

def _default_state_set_back(x):
    state = torch.default_generator.get_state()
    noise = torch.rand(x.shape)
    torch.default_generator.set_state(state)
    return x + noise - torch.rand(x.shape)


def _default_seeded(x):
    torch.default_generator.manual_seed(7)
    return x + torch.rand(x.shape)


def _default_initial_seed_read(x):
    return x + torch.default_generator.initial_seed() % 1000


def _global_state_read(x):
    return x + torch.get_rng_state()[:4].float()


def _torch_manual_seed(x):
    torch.manual_seed(5)
    return x + torch.rand(x.shape)


def _own_generator_seeded(x):
    generator = torch.Generator()
    generator.manual_seed(3)
    return x + torch.rand(x.shape, generator=generator)


def _own_generator_set_back(x):
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    noise = torch.rand(x.shape, generator=generator)
    generator.set_state(state)
    return x + noise - torch.rand(x.shape, generator=generator)


def _argument_state_set_back(x, generator):
    state = generator.get_state()
    noise = torch.rand(x.shape, generator=generator)
    generator.set_state(state)
    return x + noise - torch.rand(x.shape, generator=generator)


def _argument_seeded(x, generator):
    generator.manual_seed(11)
    return x + torch.rand(x.shape, generator=generator)


def _argument_initial_seed_read(x, generator):
    return x + generator.initial_seed() % 1000 + torch.rand(x.shape, generator=generator)


def _forked(x):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        noise = torch.rand(x.shape)
    return x + noise + torch.rand(x.shape)


_STATE_FUNCTIONS = [_default_state_set_back, _default_seeded, _default_initial_seed_read, _global_state_read,
                    _torch_manual_seed, _own_generator_seeded, _own_generator_set_back, _argument_state_set_back,
                    _argument_seeded, _argument_initial_seed_read, _forked]


class _Calls(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _compiled_on(route, fn):
    if route == "compile":
        return aotcache.compile(fn, compiler="nop", cache=False)
    if route == "aot_function":
        return aotcache.aot_function(fn, "nop", cache=False)
    return aotcache.aot_module(_Calls(fn), "nop", cache=False)


def _calls_with_states(call, fn, seeds):
    """Each call's output, the global generator's state and the argument generator's after it, under ``seeds``."""
    takes_generator = fn.__code__.co_argcount == 2
    steps = []
    for seed in seeds:
        torch.manual_seed(seed)
        torch.default_generator.manual_seed(seed)  # a reseed moves initial_seed as well
        generator = torch.Generator().manual_seed(seed + 100)
        args = (torch.zeros(4), generator) if takes_generator else (torch.zeros(4),)
        out = call(*args)
        steps.append((out, torch.get_rng_state(), generator.get_state()))
    return steps


@pytest.mark.parametrize("route", ["compile", "aot_function", "aot_module"])
@pytest.mark.parametrize("fn", _STATE_FUNCTIONS, ids=lambda fn: fn.__name__.strip("_"))
def test_a_function_reading_or_setting_a_generator_state_gives_eagers_numbers(fn, route):
    """Found running Dynamo's test_misc (test_torch_generator_set_state) through aotcache.compile: the capture
    watched torch.set_rng_state only, so ``torch.default_generator.get_state()`` ... ``.set_state(state)`` (a
    generator's C methods) slipped past and the graph drew both numbers for good; a state or seed read became a
    constant. Such captures are refused and the fallback runs the Python (NOTE [Generator states set back inside
    the function])."""
    compiled = _compiled_on(route, fn)  # (where torch cannot trace a generator argument, the fallback runs it)
    seeds = [0, 1, 1, 2]
    expected = _calls_with_states(fn, fn, seeds)
    got = _calls_with_states(compiled, fn, seeds)
    for step, ((out, state, gen_state), (e_out, e_state, e_gen_state)) in enumerate(zip(got, expected)):
        assert torch.equal(out, e_out), step
        assert torch.equal(state, e_state), step
        assert torch.equal(gen_state, e_gen_state), step
    if route == "compile":
        assert compiled.route == "dynamo"


def _reseeds_at_random(x):
    torch.default_generator.seed()
    return x + torch.rand(x.shape)


def _reseeds_its_own_at_random(x):
    generator = torch.Generator()
    generator.seed()
    return x + torch.rand(x.shape, generator=generator)


# Functions making or taking a torch.Generator: a torch that cannot trace one (2.11) fails the capture on the
# generator first, so strict mode raises that, not the refusal (the fallback runs eager's numbers either way).
_GENERATOR_FUNCTIONS = (_own_generator_seeded, _own_generator_set_back, _argument_state_set_back, _argument_seeded,
                        _argument_initial_seed_read, _reseeds_its_own_at_random)


@pytest.mark.parametrize("route", ["compile", "aot_function", "aot_module"])
@pytest.mark.parametrize("fn", [pytest.param(fn, id=fn.__name__.strip("_"), marks=[needs_generator_tracing]
                                              if fn in _GENERATOR_FUNCTIONS else [])
                                 for fn in _STATE_FUNCTIONS + [_reseeds_at_random, _reseeds_its_own_at_random]])
def test_a_function_reading_or_setting_a_generator_state_is_refused(fn, route, monkeypatch):
    """``seed()`` draws a seed from the system (no two eager calls agree), so the refusal is what is checked."""
    if route == "compile":
        monkeypatch.setenv("AOTCACHE_STRICT", "1")
        compiled = aotcache.compile(fn, compiler="nop", cache=False, fullgraph=True)
    else:
        monkeypatch.setenv("AOTCACHE_STRICT", "1")
        compiled = _compiled_on(route, fn)
    args = (torch.zeros(4), torch.Generator()) if fn.__code__.co_argcount == 2 else (torch.zeros(4),)
    with pytest.raises(Exception, match="random generator's state|seeds or sets"):
        compiled(*args)


def test_the_generator_state_methods_watched_are_torchs():
    """Every method the watch swaps exists on torch.Generator (a rename in torch would leave it unwatched), and
    torch's own methods are back once the capture ends."""
    from aotcache.aot.host_random import _STATE_METHODS

    assert set(_STATE_METHODS) <= set(vars(torch._C.Generator))
    aotcache.aot_function(_default_state_set_back, "nop", cache=False)(torch.zeros(4))
    assert all(type(vars(torch._C.Generator)[name]).__name__ == "method_descriptor" for name in _STATE_METHODS)


@pytest.mark.parametrize("route", ["compile", "aot_function", "aot_module"])
def test_a_function_that_only_draws_is_still_captured(route, monkeypatch):
    """Dropout and ``torch.randn`` without a generator are traced ops, not state reads: still captured whole."""
    monkeypatch.setenv("AOTCACHE_STRICT", "1")  # a refusal would raise

    def draws(x):
        return F.dropout(x, 0.5, training=True) + torch.randn(x.shape)

    compiled = _compiled_on(route, draws)
    x = torch.ones(8, 8)
    for seed in range(2):
        torch.manual_seed(seed)
        expected, e_state = draws(x), torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(compiled(x), expected)
        assert torch.equal(torch.get_rng_state(), e_state)
    if route == "compile":
        assert compiled.route == "aot"


def _draws_from_an_unseeded_generator_of_its_own(x):
    return x + torch.rand(x.shape, generator=torch.Generator())


@pytest.mark.xfail(torch_traces_generators(), strict=True,
                   reason="a generator made inside the function and never seeded calls no state method: the graph "
                          "keeps it and draws on from it, where eager starts each call at the default seed (NOTE "
                          "[Generator states set back inside the function], not seen)")
def test_an_unseeded_generator_made_inside_draws_as_eager():
    fn = _draws_from_an_unseeded_generator_of_its_own
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    x = torch.zeros(4)
    expected = fn(x)
    for _ in range(2):
        assert torch.equal(compiled(x), expected)


def _raises_keyboard_interrupt(x):
    torch.default_generator.get_state()
    raise KeyboardInterrupt


def _raises_value_error(x):
    torch.default_generator.initial_seed()
    raise ValueError("the function's own error")


@pytest.mark.parametrize("fn, error", [(_raises_keyboard_interrupt, KeyboardInterrupt),
                                       (_raises_value_error, ValueError)], ids=["keyboard_interrupt", "value_error"])
def test_generator_methods_are_put_back_after_a_capture_that_raises(fn, error):
    """A capture ended by the function's exception (a KeyboardInterrupt too, which no fallback catches) leaves
    torch's own state methods on torch.Generator, and a nested refused capture leaves them after the outer one."""
    from aotcache.aot.host_random import _STATE_METHODS

    with pytest.raises(error):
        aotcache.aot_function(fn, "nop", cache=False)(torch.zeros(4))
    assert all(type(vars(torch._C.Generator)[name]).__name__ == "method_descriptor" for name in _STATE_METHODS)
    inner = aotcache.aot_function(_default_state_set_back, "nop", cache=False)
    outer = aotcache.aot_function(lambda x: inner(x) * 2, "nop", cache=False)
    outer(torch.zeros(4))
    assert all(type(vars(torch._C.Generator)[name]).__name__ == "method_descriptor" for name in _STATE_METHODS)
