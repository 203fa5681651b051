"""Random ops with the nop compiler draw eager's values under the same seed, and leave the global generator
in eager's state (the compiled graphs run ATen's random ops in eager's order and count); see docs/aot.md,
"Random ops", for what holds with Inductor / AOTInductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aotcache
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
