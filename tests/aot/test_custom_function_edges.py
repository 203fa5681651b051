"""Custom ``autograd.Function`` edges, ``.data`` writes, aliased in-place arguments, generator arguments under
dynamic shapes and views made under no_grad: each compared with eager (outputs, gradients, inputs after the call,
autograd status, eager's error), through ``aot_function`` and ``aotcache.compile`` with the nop compiler. Each
case gave other results than eager (or fell back where it now captures) before session 12."""

from __future__ import annotations

import functools

import pytest
import torch

import aotcache
from aotcache.aot.fallback import fallback_counts
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.store.factory import open_tiers
from tests.aot.generator_tracing import needs_generator_tracing

W = torch.arange(1.0, 7.0).reshape(2, 3)
APIS = ["aot_function", "compile"]


def _compiled(fn, api, **options):
    if api == "aot_function":
        return aotcache.aot_function(fn, "nop", cache=False, **options)
    return aotcache.compile(fn, compiler="nop", cache=False, **options)


def _leaf():
    return torch.arange(1.0, 7.0).reshape(2, 3).clone().requires_grad_()


def _run(call, make_inputs, gradient=None):
    """Outputs, autograd status per output, input gradients, inputs after, the backward's gradient tensor after;
    or ``("error", type, message)`` where the call or its backward raises."""
    inputs = make_inputs()
    try:
        out = call(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        status = [(o.requires_grad, o.grad_fn is not None) for o in outs]
        differentiable = [o for o in outs if o.requires_grad]
        grads = [torch.full_like(o, 1.0) if gradient is None else gradient.clone() for o in differentiable]
        if differentiable:
            torch.autograd.backward(differentiable, [g.clone() if gradient is None else g for g in grads])
    except RuntimeError as exc:
        return ("error", type(exc), str(exc).splitlines()[0][:90])
    return ([o.detach().clone() for o in outs], status,
            [None if x.grad is None else x.grad.clone() for x in inputs if isinstance(x, torch.Tensor)],
            [x.detach().clone() for x in inputs if isinstance(x, torch.Tensor)], grads)


def _assert_same(got, expected):
    if expected[0] == "error":
        assert got[0] == "error", got
        assert got[1] is expected[1] and got[2] == expected[2]
        return
    assert got[0] != "error", got
    for part_got, part_expected in zip(got, expected):
        assert len(part_got) == len(part_expected)
        for a, b in zip(part_got, part_expected):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b)
            else:
                assert a == b


def _compare(fn, make_inputs, api, calls=2, gradient=None, **options):
    """Compare ``calls`` calls of ``fn`` compiled through ``api`` with eager's; returns the compiled callable."""
    expected = _run(fn, make_inputs, gradient)
    compiled = _compiled(fn, api, **options)
    for _ in range(calls):
        _assert_same(_run(compiled, make_inputs, gradient), expected)
    return compiled


def _counts_since(before):
    after = fallback_counts()
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


# --- 1. .data writes -------------------------------------------------------------------------------------


def _data_assigned(x):
    h = x * 2
    h.data = torch.ones_like(h)
    return h * x


def _data_assigned_after_save(x):
    h = x * 2
    h2 = h * h  # saves h: eager's backward reads the swapped data
    h.data = torch.zeros_like(h)
    return h2 * W


class _RouterMovedToItsOwnDtype(torch.nn.Module):
    """Switch Transformers' router: ``self.classifier = self.classifier.to(self.dtype)`` on every call, which
    ``Module._apply`` runs as ``param.data = param`` (nothing converts)."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(3, 4)

    def forward(self, x):
        self.classifier = self.classifier.to(torch.float32)
        return self.classifier(x).softmax(-1)


def _two_steps_beside_eager(eager, model, compiled):
    """Two forward and backward steps of ``compiled`` (over ``model``) beside ``eager``: equal outputs, weights and
    gradients."""
    for step in range(2):
        x = torch.arange(6.0).reshape(2, 3) / (step + 3)
        want, got = eager(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (want * torch.arange(8.0).reshape(2, 4)).sum().backward()
        (got * torch.arange(8.0).reshape(2, 4)).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def test_module_to_its_own_dtype_inside_forward_is_captured_whole():
    """``param.data = param`` is a no-op, not a ``.data`` swap: the model was refused and ran eagerly for good
    (route ``eager``); now captured whole, with eager's values and gradients (NOTE [A tensor's .data set to
    itself])."""
    eager = _RouterMovedToItsOwnDtype()
    model = _RouterMovedToItsOwnDtype()
    model.load_state_dict(eager.state_dict())
    weight = model.classifier.weight
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    before = fallback_counts()
    _two_steps_beside_eager(eager, model, compiled)
    assert compiled.route == "aot" and _counts_since(before) == {}
    assert model.classifier.weight is weight and weight.grad is not None


class _WeightDataSetToACopy(torch.nn.Module):
    """``.data`` set to another tensor of the same dtype (a real swap, unlike ``.to(own dtype)``)."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(3, 4)

    def forward(self, x):
        self.classifier.weight.data = self.classifier.weight.detach() * 0.5
        return self.classifier(x).softmax(-1)


def _backend_steps(model_class, cache):
    """Two training steps of ``model_class`` under ``torch.compile(backend=aotcache)`` beside eager's: the outputs,
    gradients and how far each one's weight versions moved, and the eager regions the backend ran."""
    from aotcache.backend import aotcache_backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, model = model_class(), model_class()
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend=functools.partial(aotcache_backend, compiler="nop", cache=cache))
    before = fallback_counts()
    versions = [[p._version for p in m.parameters()] for m in (eager, model)]
    _two_steps_beside_eager(eager, model, compiled)
    moved = [[p._version - v for p, v in zip(m.parameters(), seen)] for m, seen in zip((eager, model), versions)]
    return moved, _counts_since(before)


def test_module_to_its_own_dtype_under_the_backend_is_captured_and_cached():
    """Dynamo's graph of ``param.data = param`` (``set_`` of the tensor to itself plus Dynamo's version helper) was
    refused: the region ran eagerly in every process, and was never stored ("unsafe call" on the helper). Now the
    pair is removed: captured, stored, loaded after a reset, eager's values, gradients and version counters (NOTE
    [A tensor's .data set to itself])."""
    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
    (eager_versions, versions), regions = _backend_steps(_RouterMovedToItsOwnDtype, cache)
    assert regions == {} and versions == eager_versions
    # as many graphs as aot_eager gets (torch 2.13's Dynamo: two, it compiles again once the weights have gradients,
    # as ``_apply`` then sets each gradient's ``.data`` to itself too; torch 2.11's Dynamo: one, with no ``set_``)
    graphs = _dynamo_graphs_of_two_steps(_RouterMovedToItsOwnDtype)
    assert cache.stats()["bypass"] == 0 and cache.stats()["compile"] == graphs
    _backend_steps(_RouterMovedToItsOwnDtype, cache)
    assert cache.stats()["hit"] == graphs and cache.stats()["compile"] == graphs


def _dynamo_graphs_of_two_steps(model_class):
    """How many graphs Dynamo hands ``aot_eager`` over the two training steps of :func:`_backend_steps`."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, model = model_class(), model_class()
    model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    _two_steps_beside_eager(eager, model, torch.compile(model, backend=counter))
    torch._dynamo.reset()
    return counter.frame_count


def test_data_set_to_another_tensor_under_the_backend_still_runs_eagerly():
    """The other direction: ``.data`` set to another tensor keeps Dynamo's ``set_`` and is refused as before (the
    region runs eagerly, with eager's values)."""
    cache = AOTAutogradCache(open_tiers("disk", namespace="aot"), journal=False)
    _, regions = _backend_steps(_WeightDataSetToACopy, cache)
    assert regions and cache.stats()["compile"] == 0


def test_only_dynamos_data_assignment_of_a_tensor_to_itself_is_removed():
    """Dynamo's ``set_`` pairs: removed where the source is the target (``.to`` of its own dtype), kept for another
    tensor; a ``set_`` of a tensor to itself with no version helper after it (one the program wrote, which moves
    the version counter) is kept."""
    from aotcache.aot.aliased_writes import drop_dynamo_data_self_assignments

    def set_calls(gm):
        return sum(node.target is torch.Tensor.set_ for node in gm.graph.nodes)

    seen = []

    def count(gm, example_inputs):
        before = set_calls(gm)
        seen.append((before, drop_dynamo_data_self_assignments(gm), set_calls(gm)))
        return gm

    for module in (_RouterMovedToItsOwnDtype(), _WeightDataSetToACopy()):
        torch._dynamo.reset()
        torch.compile(module, backend=count)(torch.ones(2, 3))
    graph = torch.fx.Graph()
    weight = graph.placeholder("w")
    weight.meta["example_value"] = torch.ones(3)
    graph.output(graph.call_function(torch.Tensor.set_, (weight, weight)))
    written = torch.fx.GraphModule(torch.nn.Module(), graph)
    seen.append((set_calls(written), drop_dynamo_data_self_assignments(written), set_calls(written)))
    # torch 2.13's Dynamo writes ``.to(own dtype)`` as two ``set_`` pairs, all removed; torch 2.11's writes none
    router = seen[0]
    assert router[0] in (0, 2) and router == (router[0], router[0], 0), seen
    assert seen[1:] == [(1, 0, 1), (1, 0, 1)], seen


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fn", [_data_assigned, _data_assigned_after_save], ids=["forward", "saved"])
def test_data_assigned_to_an_intermediate_gives_eager_values_and_gradients(fn, api):
    """The trace went on reading the old value (``2x * x`` where eager gives ``1 * x``): NOTE [.data assignments
    in a trace]."""
    _compare(fn, lambda: (_leaf(),), api)


class _AssignsGradData(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        grad.data = grad * 2
        return grad * 3


@pytest.mark.parametrize("api", APIS)
def test_data_assigned_in_a_custom_backward_gives_eager_gradients(api):
    _compare(lambda x: _AssignsGradData.apply(x) * W, lambda: (_leaf(),), api)


class _DoublesItsGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        grad.data.mul_(2)
        return grad * 3


@pytest.mark.parametrize("api", APIS)
def test_a_backward_writing_into_the_callers_gradient_writes_it_as_eager(api):
    """``out.backward(g)`` with ``out`` the Function's output as it is: eager's backward doubles ``g`` itself;
    the compiled backward left it as it was (NOTE [Backward writes into its gradients])."""
    _compare(lambda x: _DoublesItsGradient.apply(x), lambda: (_leaf(),), api, gradient=torch.ones(2, 3))


class _AddsToSavedData(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x.data.add_(1)
        return grad * 2 * x


@pytest.mark.parametrize("api", APIS)
def test_data_writes_in_a_custom_backward_on_intermediates_stay_captured(api):
    """``grad.data.mul_(2)`` on a gradient nothing else sees and ``saved.data.add_(1)`` on a saved intermediate
    are traced as eager computes them: captured, without a fallback."""
    before = fallback_counts()
    _compare(lambda x: _DoublesItsGradient.apply(x) * W, lambda: (_leaf(),), api)
    _compare(lambda x: _AddsToSavedData.apply(x * 1) * W, lambda: (_leaf(),), api)
    assert _counts_since(before) == {}


# --- 2. in-place ops reading their own target ------------------------------------------------------------

_MASK = torch.tensor([[True, False, True], [False, True, True]])
_INDEX = torch.tensor([1, 0])


def _custom_backward_doing(op):
    class _InPlaceOnItself(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, grad):
            t = grad * W
            op(t)
            return t

    return lambda x: _InPlaceOnItself.apply(x) * W


_REFUSED = {
    "masked_scatter_": lambda t: t.masked_scatter_(_MASK, t),  # eager reads what it wrote: other gradients
    "index_copy_": lambda t: t.index_copy_(0, _INDEX, t),  # eager raises
    "shifted_copy_": lambda t: t[:, 1:].copy_(t[:, :-1]),  # partial overlap: eager raises
}
_CAPTURED = {
    "copy_": lambda t: t.copy_(t),
    "add_": lambda t: t.add_(t),
    "mul_view": lambda t: t.mul_(t.view_as(t)),
    "disjoint_copy_": lambda t: t[0].copy_(t[1]),
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", list(_REFUSED))
def test_an_in_place_op_reading_its_target_in_a_custom_backward_gives_eager_results(name, api):
    """NOTE [In-place ops reading their target]: the functional form read the old values (masked_scatter_: other
    gradients) or computed where eager raises (index_copy_, a partial overlap)."""
    _compare(_custom_backward_doing(_REFUSED[name]), lambda: (_leaf(),), api)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", list(_CAPTURED))
def test_an_in_place_op_on_itself_that_reads_only_its_own_elements_is_captured(name, api):
    before = fallback_counts()
    compiled = _compare(_custom_backward_doing(_CAPTURED[name]), lambda: (_leaf(),), api)
    assert _counts_since(before) == {}
    assert (compiled.num_compiles if api == "aot_function" else compiled.route == "aot")


def _scatters_into_itself(x):
    t = x * 2
    t.masked_scatter_(_MASK, t)
    return t


@pytest.mark.parametrize("api", APIS)
def test_an_in_place_op_reading_its_target_in_the_forward_gives_eager_values(api):
    _compare(_scatters_into_itself, lambda: (_leaf(),), api)


# --- 3. a saved tensor written in place afterwards ------------------------------------------------------


class _SavesItsOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.exp()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out


def _writes_saved_output(x):
    y = _SavesItsOutput.apply(x)
    y.add_(1)
    return y * 2


def _writes_saved_result(x):
    y = x.exp()
    y.add_(1)
    return y * 2


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fn", [_writes_saved_output, _writes_saved_result], ids=["custom", "exp"])
def test_a_saved_tensor_written_in_place_raises_eagers_error_at_backward(fn, api):
    """Eager's backward raises autograd's version-counter error; the fallback through torch.compile computed
    gradients silently (NOTE [Saved tensors modified in place])."""
    expected = _run(fn, lambda: (_leaf(),))
    assert expected[0] == "error" and "needed for gradient computation has been modified" in expected[2]
    compiled = _compare(fn, lambda: (_leaf(),), api)
    if api == "compile":
        assert compiled.route == "eager"
    x = _leaf()
    out = compiled(x)  # the forward runs, as in eager; the error comes at backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --- 4. a generator argument under dynamic shapes -------------------------------------------------------

_DRAWS = {
    "rand": lambda x, g: x + torch.rand(x.shape, generator=g),
    "rand_sizes": lambda x, g: x * torch.rand(x.shape[0], 2, generator=g),
    "randn": lambda x, g: x + torch.randn(x.shape, generator=g, dtype=torch.float64).float(),
    "randint": lambda x, g: x + torch.randint(10, x.shape, generator=g),
    "randint_low": lambda x, g: x + torch.randint(3, 10, size=x.shape, generator=g),
}


@needs_generator_tracing
@pytest.mark.parametrize("train", [False, True], ids=["no_grad", "train"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", list(_DRAWS))
def test_a_generator_argument_with_dynamic_shapes_is_captured_with_eagers_draws(name, api, train):
    """It failed ("SymIntArrayRef expected to contain only concrete integers") and fell back (NOTE [Generator
    draws with symbolic sizes])."""
    fn = _DRAWS[name]
    before = fallback_counts()
    compiled = _compiled(fn, api, dynamic=True)
    global_state = torch.get_rng_state()
    for rows in (3, 5, 7):
        results = []
        for call in (fn, compiled):
            x = torch.ones(rows, 2, requires_grad=train)
            g = torch.Generator().manual_seed(rows)
            out = call(x, g)
            grad = torch.autograd.grad(out.sum(), x)[0] if train else None
            results.append((out.detach(), grad, g.get_state()))
        (got, got_grad, got_state), (expected, expected_grad, expected_state) = results[1], results[0]
        assert torch.equal(got, expected)
        assert (got_grad is None) == (expected_grad is None)
        assert got_grad is None or torch.equal(got_grad, expected_grad)
        assert torch.equal(got_state, expected_state)  # the caller's generator moved as in eager
    assert torch.equal(torch.get_rng_state(), global_state)
    assert _counts_since(before) == {}
    if api == "aot_function":
        assert compiled.num_compiles == 1  # one graph for every size
    else:
        assert compiled.route == "aot" and compiled.compiled.num_compiles == 1


# --- 5. views made under no_grad ------------------------------------------------------------------------


def _view_under_no_grad(x):
    with torch.no_grad():
        return x.view(-1)


def _view_under_no_grad_and_result(x):
    with torch.no_grad():
        y = x[1:]
    return y, x * 2


def _view_of_intermediate_under_no_grad(x):
    h = x * 3
    with torch.no_grad():
        y = h.view(-1)
    return y, h


def _product_under_no_grad(x):
    with torch.no_grad():
        y = x * 2
    return y, x + 1


def _detached(x):
    return x.detach(), x * 2


def _detached_view(x):
    return x.detach()[0], x * 2


def _detached_view_under_no_grad(x):
    with torch.no_grad():
        y = x.detach()[0]
    return y, x * 2


_INPUTS = {
    "leaf": lambda: torch.ones(2, 3, requires_grad=True),
    "view_leaf": lambda: torch.arange(1.0, 7.0).reshape(2, 3).requires_grad_(),  # a leaf viewing a grad-free base
    "non_leaf": lambda: torch.ones(2, 3, requires_grad=True) * 1,
}


def _status(outs):
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [(o.requires_grad, o.grad_fn is not None, o.is_leaf) for o in outs]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("inputs", list(_INPUTS))
@pytest.mark.parametrize("fn", [_view_under_no_grad, _view_under_no_grad_and_result,
                                _view_of_intermediate_under_no_grad, _product_under_no_grad, _detached,
                                _detached_view, _detached_view_under_no_grad],
                         ids=["view", "view_and_result", "view_of_intermediate", "product", "detach", "detach_view",
                              "detach_view_under_no_grad"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "call_under_no_grad"])
def test_outputs_made_under_no_grad_have_eagers_autograd_status(grad_mode, fn, inputs, api):
    """A view made under no_grad was regenerated with grad: an AsStridedBackward node, and gradients into the
    input where eager has none (NOTE [Views of inputs made under no_grad])."""
    compiled = _compiled(fn, api)
    for _ in range(2):
        x_eager, x_compiled = _INPUTS[inputs](), _INPUTS[inputs]()
        with torch.set_grad_enabled(grad_mode):
            expected, got = fn(x_eager), compiled(x_compiled)
        assert _status(got) == _status(expected)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        differentiable = [(a, b) for a, b in zip(got, expected) if b.grad_fn is not None]
        if differentiable:
            torch.autograd.backward([b.sum() for _, b in differentiable])
            torch.autograd.backward([a.sum() for a, _ in differentiable])
        leaf_eager = x_eager if x_eager.is_leaf else None
        leaf_compiled = x_compiled if x_compiled.is_leaf else None
        if leaf_eager is not None:
            assert (leaf_compiled.grad is None) == (leaf_eager.grad is None)
            assert leaf_eager.grad is None or torch.equal(leaf_compiled.grad, leaf_eager.grad)


def _view_with_grad_of_a_no_grad_view(x):
    with torch.no_grad():
        y = x[1:]
    return y.view(-1), x * 2


@pytest.mark.parametrize("api", APIS)
def test_a_view_with_grad_of_a_view_made_under_no_grad_runs_eagerly(api):
    compiled = _compiled(_view_with_grad_of_a_no_grad_view, api)
    x_eager, x_compiled = torch.ones(2, 3, requires_grad=True) * 1, torch.ones(2, 3, requires_grad=True) * 1
    assert _status(compiled(x_compiled)) == _status(_view_with_grad_of_a_no_grad_view(x_eager))


@needs_generator_tracing
@pytest.mark.parametrize("name", ["rand", "randn", "randint"])
def test_a_generator_draw_with_dynamic_shapes_is_captured_under_inductors_decompositions(name):
    """Inductor's table turns ``rand_like(t, generator=g)`` back into ``rand(t.shape, generator=g)``, which failed
    the symbolic trace the same way (aotcache.compile(compiler="inductor") fell back to torch.compile); the graph
    runs with the nop compiler here, traced with Inductor's decompositions."""
    from aotcache.compilers.inductor_decomp import inductor_decompositions

    fn = _DRAWS[name]
    before = fallback_counts()
    compiled = aotcache.aot_function(fn, "nop", cache=False, dynamic=True, decompositions=inductor_decompositions())
    for rows in (3, 5):
        x = torch.ones(rows, 2)
        g_eager, g_compiled = torch.Generator().manual_seed(rows), torch.Generator().manual_seed(rows)
        assert torch.equal(compiled(x, g_compiled), fn(x, g_eager))
        assert torch.equal(g_compiled.get_state(), g_eager.get_state())
    assert _counts_since(before) == {} and compiled.num_compiles == 1


# --- 6. in-place calls on disjoint blocks of one tensor (review of session 12) ----------------------------


def _halves_subtracted(x):
    t = torch.cat([x, x * 2], -1)
    t[..., :3].sub_(t[..., 3:])  # a fused tensor's halves: interleaved rows, no common element
    return t


def _column_copied(x):
    t = x * 1
    t[:, :1].copy_(t[:, 2:3])
    return t


def _even_from_odd(x):
    t = torch.cat([x, x], -1)
    t[:, 0::2].copy_(t[:, 1::2])
    return t


def _filled_with_own_element(x):
    t = x * 1
    t.masked_fill_(t > 3, t[0, 0])  # the 0-dim value aliases the target: written with itself at most
    return t


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", [_halves_subtracted, _column_copied, _even_from_odd, _filled_with_own_element],
                         ids=["halves", "column", "even_odd", "fill_value"])
def test_an_in_place_call_on_a_disjoint_block_of_its_target_stays_captured(fn, dynamic):
    """The first check took any two blocks of one tensor whose byte ranges met for an overlap, and refused
    ``t[..., :k].sub_(t[..., k:])`` (eager computes it: no element is shared) and a fill whose 0-dim value is an
    element of the target; both ran through torch.compile where main captured them."""
    before = fallback_counts()
    compiled = aotcache.compile(fn, compiler="nop", cache=False, dynamic=dynamic)
    for rows in (2, 5):
        x_eager = torch.arange(1.0, 3 * rows + 1).reshape(rows, 3).requires_grad_()
        x_compiled = x_eager.detach().clone().requires_grad_()
        expected, got = fn(x_eager), compiled(x_compiled)
        assert torch.equal(got, expected)
        expected.sum().backward()
        got.sum().backward()
        assert torch.equal(x_compiled.grad, x_eager.grad)
    assert compiled.route == "aot" and _counts_since(before) == {}


def test_blocks_of_one_storage_are_told_apart_exactly():
    """Blocks that share no byte are disjoint; blocks that share one (shifted by less than a row) are not."""
    from aotcache.aot.aliased_writes import _disjoint

    t = torch.zeros(4, 6)
    assert _disjoint(t[:, :3], t[:, 3:]) and _disjoint(t[:, 0::2], t[:, 1::2]) and _disjoint(t[0], t[1])
    assert not _disjoint(t[:, 1:], t[:, :-1]) and not _disjoint(t[:, :4], t[:, 3:])
    assert not _disjoint(t[:, 0::2], t[:, 2::2]) and not _disjoint(t.t(), t)
    assert _disjoint(t.view(torch.int16)[:, 1::2], t.view(torch.int16)[:, 0::2])  # other element sizes


_DRAW_KINDS = {
    "rand_half": lambda x, g: torch.rand(x.shape, generator=g, dtype=torch.float16),
    "rand_bfloat16": lambda x, g: torch.rand(x.shape, generator=g, dtype=torch.bfloat16),
    "randn_complex64": lambda x, g: torch.randn(x.shape, generator=g, dtype=torch.complex64),
    "randn_size_keyword": lambda x, g: torch.randn(size=x.shape, generator=g, dtype=torch.float64),
    "randint_keywords": lambda x, g: torch.randint(low=-5, high=5, size=x.shape, generator=g),
    "randint_int8": lambda x, g: torch.randint(-3, 3, x.shape, generator=g, dtype=torch.int8),
    "randint_wide": lambda x, g: torch.randint(0, 2**40, x.shape, generator=g),  # 64-bit draws
    "device_layout": lambda x, g: torch.rand(x.shape, generator=g, device="cpu", layout=torch.strided),
}


@needs_generator_tracing
@pytest.mark.parametrize("name", list(_DRAW_KINDS))
def test_a_symbolic_draw_of_each_dtype_and_bound_gives_eagers_numbers(name):
    """The ``*_like`` draw of an empty tensor (NOTE [Generator draws with symbolic sizes]) against eager's factory
    for other dtypes (half, bfloat16, complex: ``randn`` draws each part), keyword bounds and 64-bit ranges."""
    fn = _DRAW_KINDS[name]
    before = fallback_counts()
    compiled = aotcache.aot_function(fn, "nop", cache=False, dynamic=True)
    for rows in (3, 5):
        x = torch.ones(rows, 2)
        g_eager, g_compiled = torch.Generator().manual_seed(rows), torch.Generator().manual_seed(rows)
        expected, got = fn(x, g_eager), compiled(x, g_compiled)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        assert torch.equal(g_compiled.get_state(), g_eager.get_state())
    assert _counts_since(before) == {} and compiled.num_compiles == 1


class _RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("the backward fails")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", ["refused", "raises"])
def test_a_custom_backward_refused_or_raising_leaves_no_mode_behind(case, api):
    """NOTE [Checks inside custom backwards]: the mode a node's pre-hook pushes is gone after a refusal raised
    inside the custom backward (masked_scatter_ on its target) and after the backward's own exception; the next
    capture of the thread is checked and captured as usual."""
    depth = torch._C._len_torch_function_stack()
    if case == "refused":
        _compare(_custom_backward_doing(_REFUSED["masked_scatter_"]), lambda: (_leaf(),), api)
    else:
        compiled = _compiled(lambda x: _RaisesInBackward.apply(x).sum(), api)
        with pytest.raises(ValueError, match="the backward fails"):
            compiled(_leaf()).backward()
    assert torch._C._len_torch_function_stack() == depth
    before = fallback_counts()
    _compare(_halves_subtracted, lambda: (_leaf(),), api)
    _compare(_custom_backward_doing(_CAPTURED["add_"]), lambda: (_leaf(),), api)
    assert _counts_since(before) == {} and torch._C._len_torch_function_stack() == depth


# --- 7. augmented and indexed assignments reading their target (review of session 12) --------------------


def _rows_shifted_by_setitem(x):
    t = x * 2
    t[:, 1:] = t[:, :-1]  # eager's copy reads what it has written: [[2, 2, 2], [8, 8, 8]]
    return t


def _rows_shifted_by_iadd(x):
    t = x * 2
    t[:, 1:] += t[:, :-1]  # eager's add_ reads what it has written
    return t


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fn", [_rows_shifted_by_setitem, _rows_shifted_by_iadd], ids=["setitem", "iadd"])
def test_an_indexed_or_augmented_assignment_reading_its_target_gives_eagers_values(fn, api):
    """NOTE [Augmented and indexed assignments]: ``t[:, 1:] = t[:, :-1]`` and ``t[:, 1:] += t[:, :-1]`` were
    captured with the functional form's values (``[[2, 2, 4], [8, 8, 10]]`` for the first), silently."""
    _compare(fn, lambda: (_leaf(),), api)


def _assignments_eager_computes_as_the_graph(x):
    t = torch.cat([x, x * 2], 1)
    t[:, :3] = t[:, 3:]  # halves
    t[:, 3:] += t[:, :3]
    t[1] = t[1]  # itself
    t[..., 0] = t[:, 0]
    t[-1, -2:] = t[0, :2]  # other rows
    t[None, 0, 1:] = t[1, :5]
    t[:, 1:] = t[0, 0]  # a 0-dim value: written with itself at most
    t[:, :2] = t[:, :2] * 2  # a new tensor
    t += t
    return t * 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_assignments_of_disjoint_or_own_elements_stay_captured(dynamic):
    before = fallback_counts()
    compiled = aotcache.compile(_assignments_eager_computes_as_the_graph, compiler="nop", cache=False,
                                dynamic=dynamic)
    for rows in (2, 4):
        x = torch.arange(1.0, 3 * rows + 1).reshape(rows, 3)
        assert torch.equal(compiled(x), _assignments_eager_computes_as_the_graph(x))
    assert compiled.route == "aot" and _counts_since(before) == {}


@pytest.mark.parametrize("index", [(slice(1, None), 0), (Ellipsis, 1), (None, -1, slice(None, None, 2)),
                                   (slice(-7, 7), slice(2, 1)), 1, (0, Ellipsis, None, slice(1, -1))],
                         ids=["slice_int", "ellipsis", "newaxis_step", "clamped_empty", "int", "mixed"])
def test_the_region_of_a_basic_index_is_the_view_torch_makes(index):
    from aotcache.aot.aliased_writes import _basic_index_region, _geometry

    t = torch.zeros(4, 5, 3).transpose(0, 1)
    view, region = t[index], _basic_index_region(t, index)
    assert tuple(region.shape) == tuple(view.shape)
    assert view.numel() == 0 or _geometry(region) == _geometry(view)
    assert _basic_index_region(t, torch.tensor([0, 1])) is None and _basic_index_region(t, (True,)) is None


def _indexed_by_tensors(x):
    t = x * 2
    t[:, :torch.tensor(2)] = t[:, 1:3] * 1  # a slice bound given as a tensor: not read as a number
    t[torch.tensor(0)] = t[1] * 1  # an advanced index
    return t


@pytest.mark.parametrize("api", APIS)
def test_an_assignment_indexed_by_tensors_is_captured_without_reading_them(api):
    """The region check reads only int / SymInt bounds: a tensor bound would have been a data-dependent read of a
    fake tensor (a capture failure)."""
    before = fallback_counts()
    _compare(_indexed_by_tensors, lambda: (_leaf(),), api)
    assert _counts_since(before) == {}


def _rows_swapped_by_advanced_index(x):
    t = x * 2
    t[[1, 0]] = t[0:2]  # eager: "some elements ... refer to a single memory location"; the graph swapped the rows
    return t


def _masked_assignment_of_own_elements(x):
    t = (x * 2).flatten()
    t[t > 4] = t[:4]
    return t


def _out_partially_overlapping_an_input(x):
    t = (x * 2).flatten()
    torch.add(t[:3], 1, out=t[1:4])  # eager raises; the graph lost the write
    return t


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fn", [_rows_swapped_by_advanced_index, _masked_assignment_of_own_elements,
                                _out_partially_overlapping_an_input], ids=["advanced_index", "mask", "out"])
def test_an_advanced_index_or_out_write_overlapping_its_value_gives_eagers_error(fn, api):
    """NOTE [Augmented and indexed assignments], NOTE [out= arguments reading their target]: eager raises where the
    graph computed a value (or dropped the write) silently; inputs without grad (with grad, ``out=`` raises for
    autograd's sake anyway)."""
    _compare(fn, lambda: (_leaf().detach(),), api)


def _writes_eager_computes_as_the_graph(x):
    t = torch.cat([x, x * 2], 1)  # (2, 6)
    torch.addmm(t[:, :2], t[:, :2], torch.ones(2, 2), out=t[:, :2])  # output laid out as an input
    torch.mul(t[:, 2:4], 2, out=t[:, 4:])  # disjoint
    torch.add(t[0], 1, out=t[0])
    t[torch.tensor([1])] = t[0] * 1  # a new tensor
    t[t > 20] = t[0, 0]  # a 0-dim element: written with itself at most
    t[torch.tensor([0])] = x[:, :1].sum(0) * 0 + 7  # another tensor
    return t * 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_out_and_advanced_index_writes_eager_computes_as_the_graph_stay_captured(dynamic):
    before = fallback_counts()
    compiled = aotcache.compile(_writes_eager_computes_as_the_graph, compiler="nop", cache=False, dynamic=dynamic)
    for scale in (1.0, 3.0):
        x = torch.arange(1.0, 7.0).reshape(2, 3) * scale
        assert torch.equal(compiled(x), _writes_eager_computes_as_the_graph(x))
    assert compiled.route == "aot" and _counts_since(before) == {}


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_aliased_write_check_is_entered_only_where_the_analysis_saw_an_in_place_call(dynamic, monkeypatch):
    """An active torch-function mode costs a dynamic capture even where it checks nothing (~8% of a BERT training
    step's), so a symbolic trace enters :class:`RefuseAliasedWrites` only where the analysis saw a call that looks
    in place; where it did, the check still refuses what it must."""
    import sys

    from aotcache.aot import aot_function
    from aotcache.aot.aliased_writes import RefuseAliasedWrites
    from aotcache.aot.errors import CaptureError

    entered = []

    class Counting(RefuseAliasedWrites):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(sys.modules["aotcache.aot.capture"], "RefuseAliasedWrites", Counting)

    def plain(x, w):
        return (x @ w).relu().sum(0)

    def shifts(x, w):
        t = x @ w
        t[:, 1:] = t[:, :-1]
        return t

    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    compiled = aot_function(plain, "nop", cache=False, dynamic=dynamic)
    torch.testing.assert_close(compiled(x, w), plain(x, w))
    assert entered == [] if dynamic else entered  # static captures do not spot in-place calls: always checked
    entered.clear()
    strict = aot_function(shifts, "nop", cache=False, dynamic=dynamic, on_capture_error="raise")
    with pytest.raises(CaptureError, match="reads"):
        strict(x.detach(), w.detach())
    assert entered
