"""A forward that rebinds, registers or deletes one of its module's parameters or buffers (NOTE [Buffers and
parameters rebound by forward] in aot/module_state.py): every route gives eager's results and leaves the module's
tensors as eager does, at every call and in a fresh process; a forward that writes in place is still one graph."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.errors import CaptureError
from aotcache.aot.fallback import fallback_counts
from aotcache.aot.module_state import holds_trace_tensor
from tests.conftest import run_python


class _Rebinds(nn.Module):
    """``self.buf = self.buf + 1``: eager returns 1, 2, 3, ... and the buffer counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.buf = self.buf + 1
        return self.lin(x) + self.buf


class _RebindsWithGrad(nn.Module):
    """The new buffer value carries a gradient to a parameter (detached from the last call's)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.buf = self.buf.detach() * 0.5 + self.lin.bias
        return self.lin(x) * self.buf


class _RegistersAgain(nn.Module):
    """``self.register_buffer(name, new)`` inside forward (transformers' dynamic RoPE does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.register_buffer("scale", self.scale * 2, persistent=False)
        return self.lin(x) * self.scale


class _RegistersNew(nn.Module):
    """The first call registers a buffer the later calls update in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.ones(3))
        else:
            self.seen.add_(1)
        return self.lin(x) * self.seen


class _Deletes(nn.Module):
    """``del self.buf`` in the first call; the later calls take the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("buf", torch.full((3,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "buf" in self._buffers:
            out = self.lin(x) * self.buf
            del self.buf
            return out
        return self.lin(x)


class _NewParameter(nn.Module):
    """``self.w = nn.Parameter(...)`` in forward (rare: an optimizer holding the old one no longer updates it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.w
        self.w = nn.Parameter(self.w.detach() * 2)
        return out


class _GrowsBuffer(nn.Module):
    """The rebound buffer changes shape at every call (a history)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("history", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.history = torch.cat([self.history, x.detach().sum().reshape(1)])
        return x * self.history.sum()


class _ChangesDtype(nn.Module):
    """The rebound buffer becomes float64 at the first call (a new signature at the second)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.buf = (self.buf + 1).to(torch.float64)
        return x * self.buf


class _WritesInPlace(nn.Module):
    """The supported way: the buffer keeps its tensor (an input mutation of the graph, written back)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.buf.add_(1)
        return self.lin(x) + self.buf


def _wrap(route: str, module: nn.Module) -> nn.Module:
    if route == "compile":
        return aotcache.compile(module, compiler="nop")
    if route == "aot_module":
        return aotcache.aot_module(module, "nop")
    if route == "aot_module_dynamic":
        return aotcache.aot_module(module, "nop", dynamic=True)
    if route == "backend":
        return torch.compile(module, backend="aotcache")
    assert route == "aot_function"
    return aotcache.aot_function(lambda x: module(x), "nop")


def _registered(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _check_as_eager(cls: type, route: str, train: bool, calls: int = 4) -> nn.Module:
    """Run ``cls`` eagerly and through ``route`` side by side; outputs, input gradients and the module's registered
    tensors (names, types, values) must be eager's after every call. Returns the compiled model's module."""
    torch.manual_seed(0)
    eager = cls().train(train)
    module = copy.deepcopy(eager)
    compiled = _wrap(route, module)
    for step in range(calls):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(step), requires_grad=train)
        x2 = x.detach().clone().requires_grad_(train)
        want, got = eager(x), compiled(x2)
        assert torch.allclose(want, got, atol=1e-6), (route, step, want, got)
        if train:
            want.sum().backward()
            got.sum().backward()
            assert torch.allclose(x.grad, x2.grad, atol=1e-6), (route, step)
            for (name, want_param), (_, got_param) in zip(eager.named_parameters(), module.named_parameters()):
                assert (want_param.grad is None) == (got_param.grad is None), (route, step, name)
                if want_param.grad is not None:
                    assert torch.allclose(want_param.grad, got_param.grad, atol=1e-6), (route, step, name)
        expected, found = _registered(eager), _registered(module)
        assert list(expected) == list(found), (route, step)
        for name, tensor in found.items():
            assert type(tensor) is type(expected[name]), (route, step, name, type(tensor))  # no trace tensor left
            assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape, (route, step, name)
            assert torch.allclose(tensor, expected[name], atol=1e-6), (route, step, name)
        assert "buf" not in vars(module) or "buf" in vars(eager)  # a deleted buffer is not back as an attribute
    return module


@pytest.mark.parametrize("route", ["compile", "aot_module", "aot_module_dynamic", "backend", "aot_function"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_rebound_buffer_gives_eager_results_at_every_call(route, train):
    # before NOTE [Buffers and parameters rebound by forward]: aot_module / aotcache.compile returned 1, 1, 1 and the
    # buffer stayed 0 (the graph read the tensor the capture had swapped back), silently
    _check_as_eager(_Rebinds, route, train)


@pytest.mark.parametrize("cls", [_RegistersAgain, _RegistersNew, _Deletes, _NewParameter, _GrowsBuffer, _ChangesDtype])
@pytest.mark.parametrize("route", ["compile", "aot_module"])
def test_registering_deleting_and_replacing_tensors_in_forward_as_eager(cls, route):
    _check_as_eager(cls, route, train=True)


@pytest.mark.parametrize("cls", [_RegistersNew, _Deletes])
def test_a_name_registered_or_deleted_by_the_first_call_only_lets_the_next_call_be_captured(cls):
    """``first_call_only``: ``aotcache.compile`` runs the first call eagerly, then captures the model whole."""
    torch.manual_seed(0)
    eager = cls()
    model = copy.deepcopy(eager)
    compiled = aotcache.compile(model, compiler="nop")
    for step in range(3):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(step))
        assert torch.allclose(compiled(x), eager(x), atol=1e-6), step
    assert compiled.route == "aot" and compiled.compiled.num_compiles == 2  # the refused first call, then one
    assert list(_registered(model)) == list(_registered(eager))


@pytest.mark.parametrize("route", ["compile", "aot_module", "aot_module_dynamic", "backend"])
def test_a_rebound_buffer_with_a_gradient_as_eager(route):
    # the second backward failed ("backward through the graph a second time") on the Dynamo way: the buffer fed to
    # the next call's graph carried the last call's history (NOTE [Inputs the backward does not reach])
    _check_as_eager(_RebindsWithGrad, route, train=False, calls=2)
    module = _check_as_eager(_RebindsWithGrad, route, train=True)
    assert module.buf.requires_grad  # the new value's history is eager's


def test_an_input_the_function_detaches_keeps_autograd_from_the_last_calls_graph():
    """``aot_function`` of a step that feeds its own output back in, detached: the next backward ran the last
    call's backward node again (NOTE [Inputs the backward does not reach])."""
    def step(state, weight, x):
        new_state = state.detach() * 0.5 + weight.sum(0)
        return (x * new_state).sum(), new_state

    weight = torch.randn(3, 3, requires_grad=True)
    eager_weight = weight.detach().clone().requires_grad_(True)
    compiled = aotcache.aot_function(step, "nop")
    state = eager_state = torch.zeros(3)
    for call in range(3):
        x = torch.randn(3, generator=torch.Generator().manual_seed(call))
        loss, state = compiled(state, weight, x)
        eager_loss, eager_state = step(eager_state, eager_weight, x)
        loss.backward()
        eager_loss.backward()
        assert torch.allclose(loss, eager_loss) and torch.allclose(weight.grad, eager_weight.grad), call
        assert state.requires_grad


class _WritesThenRebinds(nn.Module):
    """An in-place write into the buffer, then a rebinding: the old tensor keeps the write, the new one the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.ones(3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.buf.mul_(2)
        self.buf = self.buf + x.sum(0)
        self.steps = self.steps + 1
        return x * self.buf


@pytest.mark.parametrize("route", ["compile", "aot_module", "aot_module_dynamic"])
def test_a_rebound_buffer_is_one_graph_that_binds_a_new_tensor_at_every_call(route):
    """NOTE [Buffers and parameters rebound by forward]: the graph returns the new value and the wrapper binds it;
    as in eager, each call leaves a new tensor and a reference to an old one keeps its value."""
    before = fallback_counts()
    eager = _WritesThenRebinds()
    module = copy.deepcopy(eager)
    compiled = _wrap(route, module)
    seen = []
    for n in (2, 2, 3, 2) if route.endswith("dynamic") else (2, 2, 2, 2):
        x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n + len(seen)))
        old, eager_old = module.buf, eager.buf
        old_value = old.clone()
        assert torch.allclose(compiled(x), eager(x), atol=1e-6)
        assert torch.allclose(module.buf, eager.buf, atol=1e-6) and torch.equal(module.steps, eager.steps)
        assert module.buf is not old and module.buf.dtype == eager.buf.dtype
        assert torch.allclose(old, eager_old) and torch.allclose(old, old_value * 2)  # the in-place write, kept
        seen.append(module.buf)
    assert len({id(t) for t in seen}) == len(seen)
    assert compiled.compiled.num_compiles == 1 and fallback_counts() == before


def test_the_refusal_names_the_tensor_and_puts_the_registries_back_as_found():
    module = _Deletes()
    module.register_buffer("rebound", torch.zeros(1))
    buffers, params, attributes = dict(module._buffers), dict(module._parameters), set(vars(module))
    compiled = aotcache.aot_module(module, "nop", cache=False, on_capture_error="raise")
    with pytest.raises(CaptureError, match=r"deletes a parameter or buffer of the model \(buf\)") as caught:
        compiled(torch.ones(2, 3))
    assert caught.value.reason == "unsupported_construct"
    assert caught.value.first_call_only  # a name deleted, no tensor replaced: the next call may be captured
    assert module._buffers.keys() == buffers.keys() and all(module._buffers[k] is v for k, v in buffers.items())
    assert module._parameters.keys() == params.keys() and all(module._parameters[k] is v for k, v in params.items())
    assert set(vars(module)) == attributes  # the swap-back of the deleted buffer left no plain attribute
    assert torch.equal(module.buf, torch.full((3,), 3.0))
    rebinds = _NewParameter()  # a parameter is not rebound by the graph: refused
    parameter = rebinds.w
    with pytest.raises(CaptureError, match=r"rebinds a parameter or buffer of the model \(w\)") as caught:
        aotcache.aot_module(rebinds, "nop", cache=False, on_capture_error="raise")(torch.ones(2, 3))
    assert not caught.value.first_call_only and rebinds.w is parameter
    assert set(vars(rebinds)) == set(vars(_NewParameter()))


def test_a_forward_writing_its_buffer_in_place_is_still_one_graph_and_hits():
    before = fallback_counts()
    eager = _WritesInPlace()
    module = copy.deepcopy(eager)
    compiled = aotcache.aot_module(module, "nop")
    buffer = module.buf
    for step in range(3):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(step))
        assert torch.allclose(compiled(x), eager(x), atol=1e-6)
    assert module.buf is buffer and torch.equal(module.buf, eager.buf)  # written back into the same tensor
    assert compiled.compiled.num_compiles == 1 and fallback_counts() == before


_WARM_START = """
import json, sys, torch, aotcache
from aotcache.autograd_cache.cache import resolve_cache
from tests.test_buffer_rebinding import _Rebinds, _WritesInPlace
results = {}
for name, cls in (("rebinds", _Rebinds), ("in_place", _WritesInPlace)):
    torch.manual_seed(0)
    module = cls()
    compiled = aotcache.compile(module, compiler="nop")
    x = torch.ones(2, 3)
    outs = [compiled(x) for _ in range(3)]
    results[name] = {"route": compiled.route, "traces": compiled.compiled.traces.traces(module),
                     "steps": [(out - outs[0]).mean().item() for out in outs], "buf": module.buf.tolist()}
print(json.dumps({**results, **{k: v for k, v in resolve_cache(True).counters.items() if isinstance(v, int)}}))
"""


def test_a_warm_start_in_a_fresh_process_gives_eager_results_and_still_hits_the_plain_model():
    cold = json.loads(run_python(_WARM_START).stdout.strip().splitlines()[-1])
    warm = json.loads(run_python(_WARM_START).stdout.strip().splitlines()[-1])
    for run in (cold, warm):
        assert run["rebinds"]["route"] == "aot"  # the graph returns the new buffer, bound after each call
        assert run["rebinds"]["steps"] == [0.0, 1.0, 2.0] and run["rebinds"]["buf"] == [3.0] * 3
        assert run["in_place"]["route"] == "aot"
        assert run["in_place"]["steps"] == [0.0, 1.0, 2.0] and run["in_place"]["buf"] == [3.0] * 3
    assert cold["rebinds"]["traces"] == cold["in_place"]["traces"] == 1
    assert warm["rebinds"]["traces"] == warm["in_place"]["traces"] == 0  # both load their graph
    assert warm["fingerprint_hit"] == 2 and warm.get("compile", 0) == 0


class _RebindsPastALimit(nn.Module):
    """Rebinds only for inputs longer than ``limit`` (a shape decides it: the graphs of short inputs stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(1))
        self.limit = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.buf = self.buf + 1
        return x * 2 + self.buf


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_rebinding_decided_by_the_shape_never_reuses_the_graph_of_a_short_input(dynamic):
    eager, module = _RebindsPastALimit(), _RebindsPastALimit()
    compiled = aotcache.aot_module(module, "nop", dynamic=dynamic)
    for n in (2, 3, 6, 2, 7, 3, 8, 2, 6):
        x = torch.ones(n, 1)
        assert torch.equal(compiled(x), eager(x)), n
        assert torch.equal(module.buf, eager.buf), n
    assert module.buf.item() == 4.0


def _dynamic_rope_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("route", ["compile", "aot_module"])
def test_dynamic_rope_growing_and_shrinking_past_max_positions_as_eager(route):
    # its rotary embedding registers a new inv_freq when the sequence grows past the cached length, and the
    # original again when it comes back under max_position_embeddings
    eager = _dynamic_rope_llama()
    model = copy.deepcopy(eager)
    compiled = _wrap(route, model)
    for step, length in enumerate((4, 12, 5, 16, 6, 12, 4)):
        ids = torch.randint(3, 64, (1, length), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            want, got = eager(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits
        assert torch.allclose(want, got, atol=1e-5), length
        assert torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq), length
        assert type(model.model.rotary_emb.inv_freq) is torch.Tensor


def test_aot_export_module_refuses_a_rebinding_and_still_exports_an_in_place_write():
    # the export used to list no buffer mutation for ``self.buf = self.buf + 1``: a graph without the update, silently
    from aotcache.aot.api import aot_export_module

    module = _Rebinds()
    buffer = module.buf
    for trace_joint in (False, True):
        with pytest.raises(CaptureError, match=r"rebinds a parameter or buffer of the model \(buf\)"):
            aot_export_module(module, [torch.ones(2, 3)], trace_joint=trace_joint,
                              output_loss_index=0 if trace_joint else None)
        assert module.buf is buffer and list(module._buffers) == ["buf"]
    _, signature = aot_export_module(_WritesInPlace(), [torch.ones(2, 3)], trace_joint=False)
    assert list(signature.buffers_to_mutate.values()) == ["buf"]


class _RebindsTiedBuffer(nn.Module):
    """``b.buf`` is ``a.buf`` (one tensor, two names); forward rebinds the second name only: eager unties them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Module(), nn.Module()
        self.a.register_buffer("buf", torch.zeros(3))
        self.b.register_buffer("buf", self.a.buf)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.b.buf = self.b.buf + 1
        return self.lin(x) + self.b.buf + self.a.buf


class _RebindsTiedParameter(nn.Module):
    """A tied weight (``head.weight`` is ``embed.weight``) rebound under its second name: refused, eager's results."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.embed(x))
        self.head.weight = nn.Parameter(self.head.weight.detach() * 2)
        return out


@pytest.mark.parametrize("cls", [_RebindsTiedBuffer, _RebindsTiedParameter])
@pytest.mark.parametrize("route", ["compile", "aot_module"])
def test_a_tensor_tied_under_two_names_rebound_under_the_second_as_eager(cls, route):
    # NOTE [Tied tensors rebound by forward]: functional_call writes back only the deduplicated name and swaps the
    # original back under both, so the rebinding of b.buf was lost: b.buf stayed 0 and every call returned the
    # first call's result, silently
    module = _check_as_eager(cls, route, train=True)
    names = dict(module.named_buffers(remove_duplicate=False)) if cls is _RebindsTiedBuffer else {}
    if names:
        assert names["b.buf"] is not names["a.buf"] and torch.equal(names["a.buf"], torch.zeros(3))


def test_a_tied_buffer_rebound_under_the_second_name_is_returned_by_the_graph():
    module = _RebindsTiedBuffer()
    compiled = aotcache.aot_module(module, "nop", cache=False, on_capture_error="raise")
    for call in range(1, 4):
        compiled(torch.ones(2, 3))
        assert torch.equal(module.b.buf, torch.full((3,), float(call))) and torch.equal(module.a.buf, torch.zeros(3))


class _SharesSubmodule(nn.Module):
    """One submodule under two paths (``a`` is ``b``): one slot per tensor, not a tie."""

    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = _WritesInPlace()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_submodule_shared_under_two_paths_is_still_one_graph_without_fallback():
    # the names of a shared submodule are one slot: adding them as ties (NOTE [Tied tensors rebound by forward])
    # made functional_call's swap-back write the original into the second name, which read as a rebinding
    before = fallback_counts()
    module = _check_as_eager(_SharesSubmodule, "aot_module", train=True, calls=3)
    assert fallback_counts() == before
    assert all(type(tensor) is not torch.Tensor or not holds_trace_tensor(tensor) for tensor in module.buffers())


class _TiesIntoASharedSubmodule(nn.Module):
    """A weight tied into a submodule shared under two paths (``y1`` is ``y2``): three names, two slots."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Linear(3, 3)
        self.y1 = self.y2 = nn.Linear(3, 3)
        self.y1.weight = self.x.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y2(self.y1(self.x(x)))


def test_a_weight_tied_into_a_shared_submodule_is_still_one_graph_without_fallback():
    # functional_call needs all or none of a tie's names: adding y1.weight but not y2.weight (the same slot) failed
    # the capture with KeyError 'y2.weight' (a fallback, found in review)
    before = fallback_counts()
    _check_as_eager(_TiesIntoASharedSubmodule, "aot_module", train=True, calls=3)
    assert fallback_counts() == before


class _NoGradForY(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):  # noqa: ANN001, ANN205
        return x * 2 + y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * 2, None


def _zero_then_use(x, y):
    x.zero_()
    return x + y


def _copy_into(x, y):
    x.copy_(y * 3)
    return y * 2


def _scale_in_place(x, y):
    x.mul_(2)
    return y * 2


def _mutate_detached_return_view(x, y):
    x.detach().add_(1)
    return x[:2] * 1, y * 2


_NO_GRADIENT_CASES = {
    "zero_but_connected": lambda x, y: x * 0 + y,
    "detached": lambda x, y: x.detach() * 2 + y,
    "unused": lambda x, y: y * 2,
    "zeroed_in_place": _zero_then_use,
    "copied_into": _copy_into,  # the caller's loss reads x after the call
    "scaled_in_place": _scale_in_place,
    "view_of_input": lambda x, y: (x.view(-1)[:2], y * 2),
    "input_itself": lambda x, y: (x, y * 2),
    "detached_mutation_and_view": _mutate_detached_return_view,
    "custom_function_none": lambda x, y: _NoGradForY.apply(x, y),
    "non_differentiable_output": lambda x, y: ((x > 0).sum(), y * 2),
}


@pytest.mark.parametrize("case", sorted(_NO_GRADIENT_CASES))
def test_inputs_without_gradient_as_eager(case):
    """NOTE [Inputs the backward does not reach]: the inputs passed detached are exactly those eager's backward does
    not reach (review): gradients, grad_fn of outputs aliasing an input, and torch.autograd.grad's "not used in
    the graph" error without allow_unused, are eager's."""
    fn = _NO_GRADIENT_CASES[case]
    compiled = aotcache.aot_function(fn, "nop")
    seen = {}
    for way, function in (("eager", fn), ("compiled", compiled)):
        leaves = [torch.randn(3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
        args = [leaf * 1 for leaf in leaves]
        outs = function(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum(out.sum() for out in outs if out.requires_grad) + args[0].sum()
        try:
            unused = [g is None for g in torch.autograd.grad(loss, args, retain_graph=True)]
        except RuntimeError as error:
            assert "not have been used in the graph" in str(error)
            unused = "error"
        loss.backward()
        seen[way] = ([None if leaf.grad is None else leaf.grad.tolist() for leaf in leaves],
                     [out.grad_fn is not None for out in outs], unused)
    assert seen["compiled"] == seen["eager"]


class _RebindsInABlock(nn.Module):
    """Rebinding in nested submodules (paths ``block.0.buf``, ``block.1.buf``), the second called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(_Rebinds(), _Rebinds())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block[1](self.block(x))


class _ReturnsItsBuffer(nn.Module):
    """The new buffer value is also the output: eager returns the buffer's tensor itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.buf = self.buf + x.detach().sum(0)
        return x * self.w, self.buf


@pytest.mark.parametrize("route", ["compile", "aot_module"])
def test_nested_rebinding_and_a_rebound_buffer_returned_as_output_as_eager(route):
    module = _check_as_eager(_RebindsInABlock, route, train=True)
    assert torch.equal(module.block[1].buf, torch.full((3,), 8.0)) and torch.equal(module.block[0].buf,
                                                                                 torch.full((3,), 4.0))
    assert list(module.state_dict()) == list(_RebindsInABlock().state_dict())
    model = _ReturnsItsBuffer()
    compiled = _wrap(route, model)
    for call in range(3):
        out, buf = compiled(torch.ones(2, 3, requires_grad=True))
        assert buf is model.buf and torch.equal(buf, torch.full((3,), 2.0 * (call + 1)))  # the same tensor, as eager
        out.sum().backward()
