"""``torch.func.functional_call`` (and ``nn.utils.stateless``, ``stack_module_state`` + ``vmap``) over compiled
wrappers: the passed tensors are used, eager's results and gradients, the module untouched (NOTE [Tensors swapped
in through the wrapper] in aot/module.py, NOTE [Transform tensors on the hot path] in aot/hot_path.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot import aot_module

functional_call = torch.func.functional_call


class CountingCompiler:
    """Returns the graph itself; counts the graphs compiled."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm


class TopLevelTensors(nn.Module):
    """A parameter and a buffer at the top (the names that reached the wrapper's setattr), a submodule, and a
    weight tied between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("scale", torch.ones(4))
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc2.weight = self.fc.weight

    def forward(self, x):
        return self.fc2(self.fc(x @ self.w) * self.scale).tanh()


def wrap(api: str, model: nn.Module, compiler=None) -> nn.Module:
    compiler = compiler or CountingCompiler()
    if api == "aot_module":
        return aot_module(model, fw_compiler=compiler, cache=False)
    return aotcache.compile(model, compiler=compiler, cache=False)


def random_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {name: torch.randn_like(p).requires_grad_() for name, p in model.named_parameters()}
    state["scale"] = torch.rand(4)
    return state


APIS = pytest.mark.parametrize("api", ["aot_module", "compile"])


@APIS
def test_a_linear_takes_the_passed_weights(api):
    """The reported case: nn.Linear's own ``weight`` (a top-level name) raised a TypeError."""
    torch.manual_seed(0)
    model = nn.Linear(4, 5)
    wrapped = wrap(api, model)
    x = torch.randn(2, 4)
    params = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(wrapped, params, (x,)), functional_call(model, params, (x,)))
    assert isinstance(model.weight, nn.Parameter)


@APIS
def test_each_dict_gives_eagers_results_and_gradients_with_one_graph(api):
    torch.manual_seed(0)
    model = TopLevelTensors()
    compiler = CountingCompiler()
    wrapped = wrap(api, model, compiler)
    x = torch.randn(3, 4)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    own = wrapped(x)
    compiles = None
    outputs = []
    for _ in range(3):
        state = random_state(model)
        out = functional_call(wrapped, state, (x,))
        expected = functional_call(model, state, (x,))
        torch.testing.assert_close(out, expected)
        leaves = [state["w"], state["fc.weight"], state["fc.bias"]]
        for got, want in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
            torch.testing.assert_close(got, want)
        outputs.append(out.detach())
        if compiles is None:
            compiles = compiler.compiles
        assert compiler.compiles == compiles  # the same graph for every dict of the same shapes
    assert compiler.compiles > 0  # a compiled graph ran, not the eager forward
    assert not torch.allclose(outputs[0], outputs[1])  # the passed tensors, not the module's own
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(isinstance(p, nn.Parameter) for p in model.parameters()) and model.fc2.weight is model.fc.weight
    torch.testing.assert_close(wrapped(x), own)  # the module's own tensors again: no stale swapped tensor


@APIS
def test_partial_dicts_ties_and_strict_keys_behave_as_eager(api):
    torch.manual_seed(0)
    model = TopLevelTensors()
    wrapped = wrap(api, model)
    x = torch.randn(3, 4)
    for partial in ({"w": torch.randn(4, 4)}, {"scale": torch.rand(4)}, {"fc.bias": torch.randn(4)}):
        torch.testing.assert_close(functional_call(wrapped, partial, (x,)), functional_call(model, partial, (x,)))
    tied = {"fc.weight": torch.randn(4, 4)}
    for tie_weights in (True, False):
        torch.testing.assert_close(functional_call(wrapped, tied, (x,), tie_weights=tie_weights),
                                   functional_call(model, tied, (x,), tie_weights=tie_weights))
    full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    torch.testing.assert_close(functional_call(wrapped, full, (x,), strict=True), model(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        functional_call(wrapped, {"w": torch.randn(4, 4)}, (x,), strict=True)
    with pytest.raises(ValueError, match="tied"):
        functional_call(wrapped, {"fc.weight": torch.randn(4, 4), "fc2.weight": torch.randn(4, 4)}, (x,))
    torch.testing.assert_close(wrapped(x), model(x))


@APIS
def test_names_through_the_wrapped_module_and_the_stateless_api(api):
    torch.manual_seed(0)
    model = TopLevelTensors()
    wrapped = wrap(api, model)
    x = torch.randn(3, 4)
    w = torch.randn(4, 4)
    expected = functional_call(model, {"w": w}, (x,))
    torch.testing.assert_close(functional_call(wrapped, {"orig_module.w": w}, (x,)), expected)
    torch.testing.assert_close(functional_call(wrapped, {"_orig_mod.w": w}, (x,)), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated API
        torch.testing.assert_close(torch.nn.utils.stateless.functional_call(wrapped, {"w": w}, (x,)), expected)


@APIS
@pytest.mark.parametrize("make_model", [TopLevelTensors, lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh())],
                         ids=["top_level", "nested_names"])
def test_grad_and_vmap_over_functional_call_give_eagers_gradients(api, make_model):
    """Under torch.func.grad the swapped-in parameters are transform tensors: the call runs eagerly. Once a
    functional_call with plain tensors had been compiled, they matched its hot signature's types and fields and
    raised NotImplementedError from its storage check (also with nested names only, which swapped right)."""
    torch.manual_seed(0)
    model = make_model()
    wrapped = wrap(api, model)
    x = torch.randn(3, 4)
    wrapped(x)
    plain = {name: torch.randn_like(p).requires_grad_() for name, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(wrapped, plain, (x,)), functional_call(model, plain, (x,)))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, inputs, module):
        return functional_call(module, p, (inputs,)).sum()

    got = torch.func.grad(loss)(params, x, wrapped)
    want = torch.func.grad(loss)(params, x, model)
    for name in want:
        torch.testing.assert_close(got[name], want[name])

    def per_sample(p, row, module):
        return loss(p, row[None], module)

    got = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, None))(params, x, wrapped)
    want = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, None))(params, x, model)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    torch.testing.assert_close(wrapped(x), model(x))


@APIS
def test_stack_module_state_ensembles_over_compiled_modules(api):
    torch.manual_seed(0)
    models = [TopLevelTensors() for _ in range(3)]
    wrapped = [wrap(api, model) for model in models]
    x = torch.randn(3, 4)
    params, buffers = torch.func.stack_module_state(wrapped)
    eager_params, eager_buffers = torch.func.stack_module_state(models)
    assert list(params) == list(eager_params) and list(buffers) == list(eager_buffers)

    def ensemble(module):
        return torch.func.vmap(lambda p, b: functional_call(module, (p, b), (x,)))(params, buffers)

    torch.testing.assert_close(ensemble(wrapped[0]), ensemble(models[0]))
    torch.testing.assert_close(ensemble(wrapped[0])[1], models[1](x))


@APIS
def test_a_plain_tensor_set_on_the_wrapper_is_used_by_the_next_call(api):
    """The wrapper cannot tell functional_call's swap from ``compiled.w = tensor``: both put the tensor in the
    wrapped module's parameter slot (eager's setattr refuses the plain tensor), and the next call uses it."""
    torch.manual_seed(0)
    model = TopLevelTensors()
    wrapped = wrap(api, model)
    x = torch.randn(3, 4)
    wrapped(x)
    original = model.w
    replacement = torch.randn(4, 4)
    wrapped.w = replacement
    assert model._parameters["w"] is replacement and "w" not in wrapped.__dict__
    torch.testing.assert_close(wrapped(x), functional_call(model, {"w": replacement}, (x,)))
    wrapped.w = original
    assert model.w is original
    torch.testing.assert_close(wrapped(x), model(x))
    with pytest.raises(TypeError):  # a non-tensor still gets eager's error
        wrapped.w = 3.0


@APIS
def test_a_wrapper_inside_an_eager_model_takes_the_passed_tensors(api):
    """``functional_call(parent, {"head.weight": w})`` reaches the wrapper by its path and swaps ``weight`` on it."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    parent = nn.Sequential(eager[0], eager[1], wrap(api, eager[2]))
    x = torch.randn(3, 4)
    for _ in range(2):
        state = {"2.weight": torch.randn(2, 4, requires_grad=True), "2.bias": torch.randn(2)}
        out = functional_call(parent, state, (x,))
        expected = functional_call(eager, state, (x,))
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), state["2.weight"])[0],
                                   torch.autograd.grad(expected.sum(), state["2.weight"])[0])
    assert isinstance(eager[2].weight, nn.Parameter)
    torch.testing.assert_close(parent(x), eager(x))
