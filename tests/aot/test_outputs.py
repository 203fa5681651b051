"""Output structure and autograd status of captured functions, and the errors for what cannot be captured.

Regression tests for the OpInfo sweep's bugs: structseq (``torch.return_types``) and namedtuple outputs,
``torch.Size`` outputs, gradients dropped through sparse tensors, non-strided inputs, ops that read tensor data in
C++, and effectful ops (``aten._linalg_check_errors`` behind the linalg ops).
"""

from __future__ import annotations

import collections
import json
import sys
from typing import NamedTuple

import pytest
import torch

from aotcache.aot import (CaptureError, CompiledRuntime, RuntimeMetadata, aot_export_module, aot_function,
                          aot_module, capture)
from aotcache.aot.metadata import OutputStructure
from aotcache.compilers import get_compiler
from tests.conftest import run_python

nop = get_compiler("nop")


class Pair(NamedTuple):
    """A module-level namedtuple: resolvable by name when a compiled function is loaded."""

    first: torch.Tensor
    second: torch.Tensor


def compile_fn(fn, **options):
    """``aot_function`` raising its CaptureError (these tests check the capture's messages; the default
    fallback is tested in test_fallback.py)."""
    return aot_function(fn, nop, cache=False, on_capture_error="raise", **options)


def only_runtime(compiled) -> CompiledRuntime:
    (runtime,) = [r for entries in compiled._entries.values() for r in entries]
    return runtime


# ----------------------------------------------------------------------------------------------------------
# structseq / namedtuple outputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "type_name"), [
    (lambda x: torch.sort(x), "sort"),
    (lambda x: torch.topk(x, 2), "topk"),
    (lambda x: torch.max(x, dim=0), "max"),
    (lambda x: torch.kthvalue(x, 2), "kthvalue"),
])
def test_structseq_outputs_keep_their_type_and_fields(fn, type_name):
    x = torch.randn(5)
    out = compile_fn(fn)(x)
    expected = fn(x)
    assert type(out) is getattr(torch.return_types, type_name) is type(expected)
    torch.testing.assert_close(out.values, expected.values)
    torch.testing.assert_close(out.indices, expected.indices)


def test_structseq_output_in_training_gives_eager_gradients():
    x = torch.randn(6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compile_fn(lambda t: torch.topk(t * 2, 3))(x)
    expected = torch.topk(x_ref * 2, 3)
    assert isinstance(out, torch.return_types.topk) and out.values.requires_grad
    out.values.sum().backward()
    expected.values.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_linalg_structseq_output_nested_in_a_dict():
    a = torch.randn(3, 3)
    a = a @ a.T + torch.eye(3)
    out = compile_fn(lambda m: {"eigh": torch.linalg.eigh(m), "n": 3})(a)
    assert type(out["eigh"]) is torch.return_types.linalg_eigh and out["n"] == 3
    torch.testing.assert_close(out["eigh"].eigenvalues, torch.linalg.eigh(a).eigenvalues)


def test_structseq_survives_the_json_metadata_round_trip():
    compiled = compile_fn(lambda t: torch.sort(t, descending=True))
    compiled(torch.randn(4))
    runtime = only_runtime(compiled)
    data = json.loads(json.dumps(runtime.metadata.to_json()))
    assert data["out_spec"]["type"] == "return_types"
    rebuilt = CompiledRuntime(RuntimeMetadata.from_json(data), runtime.forward)
    x = torch.tensor([1.0, 3.0, 2.0])
    out = rebuilt(x)
    assert type(out) is torch.return_types.sort
    assert out.values.tolist() == [3.0, 2.0, 1.0] and out.indices.tolist() == [1, 2, 0]


def test_structseq_output_loads_from_the_disk_cache_in_a_fresh_process():
    code = """
import json, torch
from aotcache.aot import aot_function
from aotcache.autograd_cache.cache import default_cache
def fn(x):
    return torch.sort(x * 2)
out = aot_function(fn, "nop")(torch.tensor([3.0, 1.0, 2.0]))
print(json.dumps({"type": type(out).__name__, "values": out.values.tolist(), **default_cache().stats()}))
"""
    first = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    second = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert first["saved"] == 1 and second["hit"] == 1
    assert second["type"] == "sort" and second["values"] == [2.0, 4.0, 6.0]


def test_module_level_namedtuple_output_keeps_its_type():
    x = torch.randn(3, requires_grad=True)
    out = compile_fn(lambda t: Pair(t * 2, t.sum()))(x)
    assert type(out) is Pair
    out.first.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_local_namedtuple_output_is_a_capture_error_naming_the_type():
    LocalPoint = collections.namedtuple("LocalPoint", ["x", "y"])
    with pytest.raises(CaptureError, match=r"LocalPoint.*(tuple or a dict)"):
        compile_fn(lambda t: LocalPoint(t, t + 1))(torch.randn(2))


def test_dict_output_with_a_non_json_key_is_a_capture_error():
    with pytest.raises(CaptureError, match="key of type tuple"):
        compile_fn(lambda t: {(1, 2): t * 2})(torch.randn(2))


def test_loading_never_imports_the_module_a_namedtuple_names(tmp_path, monkeypatch):
    canary = tmp_path / "imported.txt"
    (tmp_path / "aotcache_canary_module.py").write_text(
        f"import collections, pathlib\npathlib.Path({str(canary)!r}).write_text('imported')\n"
        "Point = collections.namedtuple('Point', ['x'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    structure = {"type": "namedtuple", "module": "aotcache_canary_module", "qualname": "Point", "fields": ["x"],
                 "children": [{"type": "leaf"}]}
    with pytest.raises(ValueError, match="never imported"):
        OutputStructure(structure)
    assert "aotcache_canary_module" not in sys.modules and not canary.exists()


@pytest.mark.parametrize("structure", [
    {"type": "namedtuple", "module": "os", "qualname": "system", "fields": [], "children": []},  # not a namedtuple
    {"type": "namedtuple", "module": __name__, "qualname": "Pair", "fields": ["a", "b"], "children": []},  # fields
    {"type": "return_types", "name": "__class__", "children": []},
    {"type": "registered", "name": "os.system", "context": None, "children": []},
    {"type": "pickle", "children": []},
])
def test_loading_refuses_types_it_cannot_resolve_safely(structure):
    with pytest.raises(ValueError):
        OutputStructure(structure)


def test_aot_export_module_out_spec_rebuilds_a_structseq():
    class Sorter(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x)

    _, signature = aot_export_module(Sorter(), [torch.randn(4)], trace_joint=False)
    rebuilt = OutputStructure(json.loads(signature.out_structure)).unflatten([torch.zeros(4), torch.zeros(4)])
    assert type(rebuilt) is torch.return_types.sort


@pytest.mark.parametrize("trace_joint", [False, True])
def test_aot_export_module_specs_are_pytree_specs_as_in_pytorch(trace_joint):
    """``in_spec`` / ``out_spec`` are TreeSpecs (PyTorch's GraphSignature), usable with tree_unflatten."""
    from torch.utils import _pytree as pytree

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x, scale):
            y = self.fc(x) * scale
            return {"loss": y.sum(), "parts": (y.detach(), y.detach() * 2)} if trace_joint else {"y": y, "n": y.sum()}

    x, scale = torch.randn(2, 3), torch.tensor(2.0)
    _, signature = aot_export_module(Net(), [x, scale], trace_joint=trace_joint,
                                     output_loss_index=0 if trace_joint else None)
    args, kwargs = pytree.tree_unflatten([x, scale], signature.in_spec)
    assert args[0] is x and args[1] is scale and kwargs == {}
    flat_user = list(range(signature.out_spec.num_leaves))
    rebuilt = pytree.tree_unflatten(flat_user, signature.out_spec)
    assert set(rebuilt) == ({"loss", "parts"} if trace_joint else {"y", "n"})
    assert json.loads(signature.out_structure)  # aotcache's own, storable form of the same structure


# ----------------------------------------------------------------------------------------------------------
# torch.Size outputs
# ----------------------------------------------------------------------------------------------------------


def test_torch_size_outputs_are_torch_size():
    out = compile_fn(lambda x: (x * 2, torch.broadcast_shapes((2, 1), (1, 3)), x.shape))(torch.randn(2))
    assert type(out[1]) is torch.Size and out[1] == torch.Size([2, 3])
    assert type(out[2]) is torch.Size and out[2] == torch.Size([2])


def test_symbolic_torch_size_output_follows_the_input():
    compiled = compile_fn(lambda x: (x + 1, x.shape), dynamic=True)
    compiled(torch.randn(4, 3))
    _, shape = compiled(torch.randn(6, 5))
    assert type(shape) is torch.Size and shape == torch.Size([6, 5])
    assert compiled.num_compiles == 1


# ----------------------------------------------------------------------------------------------------------
# requires_grad is never silently dropped
# ----------------------------------------------------------------------------------------------------------


def test_sparse_round_trip_is_a_capture_error_naming_the_op():
    x = torch.randn(5, 5, requires_grad=True)
    assert x.to_sparse().to_dense().requires_grad  # eager keeps the gradient: dropping it would be wrong
    with pytest.raises(CaptureError, match=r"torch\.Tensor\.to_sparse.*sparse_coo"):
        compile_fn(lambda t: t.to_sparse().to_dense())(x)


def test_output_requiring_grad_without_an_input_requiring_grad_is_a_capture_error():
    def fn(x):
        return torch.ones(3, requires_grad=True) * x

    assert fn(torch.randn(3)).requires_grad  # eager
    with pytest.raises(CaptureError, match="flat output 0 requires grad"):
        compile_fn(fn)(torch.randn(3))


@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view_of_leaf"])
@pytest.mark.parametrize("grad", ["input_requires_grad", "no_input_requires_grad", "no_grad"])
def test_a_new_leaf_returned_by_the_function_keeps_eager_autograd(grad, view):
    # found by exploration: ``x.detach().requires_grad_()`` was regenerated as a view of x, so gradients flowed
    # into x (eager: none); without an input requiring grad the runtime raised; under no_grad it lost requires_grad
    def fn(x, y):
        leaf = x.detach().requires_grad_()
        return (leaf[1:] if view else leaf), y * 2

    def run(f):
        x, y = torch.ones(3, requires_grad=grad == "input_requires_grad"), torch.ones(3, requires_grad=True)
        with torch.set_grad_enabled(grad != "no_grad"):
            leaf, other = f(x, y)
        assert leaf.requires_grad and leaf.is_leaf == (not view or grad == "no_grad")
        if grad != "no_grad":
            (leaf.sum() + other.sum()).backward()
        return x.grad, leaf.grad

    expected = run(fn)
    with pytest.raises(CaptureError, match="flat output 0 is a leaf tensor that requires grad created inside"):
        run(compile_fn(fn))
    if view and grad == "no_grad":
        return  # the fallback's Dynamo drops requires_grad of this view made under no_grad (torch's behaviour)
    got = run(aot_function(fn, nop, cache=False))  # the default fallback: eager's autograd
    assert [g is None for g in got] == [g is None for g in expected]
    assert got[0] is None  # never a gradient into x
    assert all(g is None or torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_a_view_of_an_input_made_a_leaf_requiring_grad_is_one(grad_mode):
    # PyTorch's test_aotdispatch (test_some_output_requires_grad_input_doesnt): the view was regenerated from
    # the input, which does not require grad, and the runtime's requires_grad check raised (NOTE [Leaf views
    # of inputs] in runtime.py)
    def fn(a, b):
        view = a.view(-1)
        view.requires_grad_(True)
        return view, b * 2

    def run(f):
        a, b = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True)
        with torch.set_grad_enabled(grad_mode):
            view, other = f(a, b)
        assert view.requires_grad and view.is_leaf and view._base is a
        a.add_(1)  # still a view of the real input
        assert torch.equal(view, a.view(-1))
        if grad_mode:
            (view.sum() + other.sum()).backward()
            assert torch.equal(view.grad, torch.ones(6)) and a.grad is None
        return view

    run(fn)
    compiled = compile_fn(fn)
    run(compiled)
    run(compiled)  # the second call, on the graph compiled by the first




@pytest.mark.parametrize("split", ["unbind", "split", "chunk"])
def test_views_of_an_input_from_a_multi_output_op_refuse_what_eager_refuses(split, tmp_path):
    # PyTorch's test_aotdispatch (test_output_aliases_input_multi_output_view_should_raise_autograd_error): the
    # views were regenerated with as_strided, single-output views, so an in-place change eager refuses ran
    def fn(a):
        if split == "unbind":
            return list(a.unbind(0))
        return list(getattr(a, split)(1, 0))

    def refused(f, change):
        a = torch.ones(3, 3, requires_grad=True).clone()
        outs = f(a)
        try:
            change(a, outs)
        except RuntimeError as exc:
            return "multiple views" in str(exc)
        return False

    def in_place_on_view(a, outs):
        outs[0].mul_(2)

    def base_changed_then_view_used(a, outs):
        a.mul_(2)
        outs[0].grad_fn

    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.disk import OnDiskCache
    from aotcache.store.tiered import TieredCache

    def disk_cache():  # a new cache object each time: the second one loads the entry from disk
        return AOTAutogradCache(TieredCache([OnDiskCache(base_dir=tmp_path)]), journal=False)

    for change in (in_place_on_view, base_changed_then_view_used):
        assert refused(fn, change)
        compiled = compile_fn(fn)
        assert refused(compiled, change) and refused(compiled, change)
        stored = disk_cache()
        assert refused(aot_function(fn, nop, cache=stored), change)
        loading = disk_cache()
        assert refused(aot_function(fn, nop, cache=loading), change)  # the flag survives the entry
        assert loading.counters["hit"] >= 1

    def allowed(f):  # the other direction: a single-output view of the input stays changeable, as in eager
        a = torch.ones(3, 3, requires_grad=True).clone()
        out = f(a)
        out.mul_(2)
        out.sum().backward()
        return a

    single = lambda a: a.select(0, 0)
    assert torch.equal(allowed(single), allowed(compile_fn(single)))
    with torch.no_grad():  # without autograd nothing is refused, in eager or compiled
        a = torch.ones(3, 3)
        compile_fn(fn)(a)[0].mul_(2)
        assert a[0].eq(2).all()

def test_a_view_made_under_no_grad_is_returned_as_a_leaf_requiring_grad():
    # PyTorch's test_aotdispatch (test_output_aliases_intermediate_no_grad_view): the view requires grad but
    # has no history, and the joint trace asked autograd for its gradient: "element 1 of tensors does not
    # require grad" escaped the capture (NOTE [Views made under no_grad] in capture.py)
    def fn(a):
        out = a * 3
        with torch.no_grad():
            view = out.view(-1)
        return out.sum(), view

    def run(f):
        a = torch.ones(3, 3, requires_grad=True)
        loss, view = f(a)
        assert view.requires_grad and view.is_leaf and view.grad_fn is None
        assert torch.equal(view, torch.full((9,), 3.0))
        loss.backward()
        return a.grad

    expected = run(fn)
    compiled = compile_fn(fn)
    assert torch.equal(run(compiled), expected)
    assert torch.equal(run(compiled), expected)



def test_under_no_grad_outputs_keep_eager_requires_grad():
    # PyTorch's test_aotdispatch (TestAOTDispatch test_aot_dispatch_output_requires_grad_in_no_grad{,_views}):
    # under no_grad, an output made inside torch.enable_grad() came back without grad (its gradient silently
    # lost), and a view of a non-leaf input lost requires_grad (the analysis probe was cloned under no_grad)
    def grad_inside(x):
        out = x.sin()
        with torch.enable_grad():
            return out, x.cos()

    with pytest.raises(CaptureError, match="flat output 1 requires grad although the call runs under torch.no_grad"):
        with torch.no_grad():
            compile_fn(grad_inside)(torch.ones(3, requires_grad=True))
    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        plain, tracked = aot_function(grad_inside, nop, cache=False)(x)  # the default fallback: eager's
    assert not plain.requires_grad and tracked.requires_grad
    tracked.sum().backward()
    assert torch.equal(x.grad, -torch.sin(torch.ones(3)))

    def views(x):
        return x.view(-1), x.sin()

    base = torch.ones(2, 3, requires_grad=True)
    expected, got_input = base.clone(), base.clone()
    with torch.no_grad():
        want = [t.requires_grad for t in views(expected)]
        got = [t.requires_grad for t in compile_fn(views)(got_input)]
    assert got == want == [True, False]



def test_a_tensor_subclass_argument_runs_eagerly_with_subclass_gradients():
    # PyTorch's test_aotdispatch (TestAOTDispatch, TwoTensor arguments): the capture traced the subclass as a
    # plain tensor and the gradients came back plain where eager gives TwoTensors (NOTE [Tensor subclass
    # arguments] in unsupported_tensors.py)
    from torch.testing._internal.two_tensor import TwoTensor

    def fn(a, b):
        return a * 6 + b / 2

    def run(f):
        a = TwoTensor(torch.ones(2, 2, requires_grad=True), torch.ones(2, 2, requires_grad=True))
        b = torch.ones(2, 2, requires_grad=True)
        f(a, b).sum().backward()
        return a.grad, b.grad

    with pytest.raises(CaptureError, match="flat argument 0 is a TwoTensor, a tensor subclass"):
        run(compile_fn(fn))
    expected = run(fn)
    got = run(aot_function(fn, nop, cache=False))  # the default fallback
    assert [type(g) for g in got] == [type(e) for e in expected] == [TwoTensor, TwoTensor]
    assert all(torch.equal(g.a, e.a) and torch.equal(g.b, e.b) for g, e in zip(got, expected))



def test_a_backward_that_mutates_a_forward_input_runs_eagerly():
    # PyTorch's test_aotdispatch (test_backward_mutation_forward_inputs): a custom op's backward zeroes an input
    # saved on ctx; the compiled backward dropped that write (NOTE [Backward mutations of inputs] in output_checks.py)
    @torch.library.custom_op("aotcache_test::clone_then_zero_in_backward", mutates_args=())
    def clone_op(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        return x.clone()

    clone_op.register_fake(lambda x, scratch: torch.empty_like(x))

    def backward(ctx, grad):
        with torch.no_grad():
            ctx.scratch.zero_()
        return grad * 2, None

    def setup_context(ctx, inputs, output):
        ctx.scratch = inputs[1]

    clone_op.register_autograd(backward, setup_context=setup_context)

    def fn(x, scratch):
        return torch.ops.aotcache_test.clone_then_zero_in_backward(x, scratch) * 3

    def run(f):
        x, scratch = torch.ones(3, requires_grad=True), torch.ones(3)
        f(x, scratch).sum().backward()
        return x.grad, scratch

    with pytest.raises(CaptureError, match="the backward mutates graph input 1"):
        run(compile_fn(fn))
    grad, scratch = run(aot_function(fn, nop, cache=False))  # the default fallback: eager autograd
    assert torch.equal(grad, torch.full((3,), 6.0)) and torch.equal(scratch, torch.zeros(3))


def test_runtime_refuses_an_output_that_lost_requires_grad():
    # fault injection: metadata that says the output requires grad, a forward that returns a plain tensor
    captured = capture(lambda x: x * 2, [torch.randn(3)])
    captured.metadata.outputs[0].requires_grad = True
    runtime = CompiledRuntime(captured.metadata, nop(captured.graph, captured.primals))
    with pytest.raises(RuntimeError, match="without grad"):
        runtime(torch.randn(3))
    with torch.no_grad():  # no gradients expected there: nothing to check
        assert runtime(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


def test_trace_that_loses_requires_grad_is_a_capture_error():
    from aotcache.aot.output_checks import check_traced_outputs_require_grad

    check_traced_outputs_require_grad([torch.zeros(2, requires_grad=True), torch.zeros(1)], [0])
    with pytest.raises(CaptureError, match="forward output 1 requires grad"):
        check_traced_outputs_require_grad([torch.zeros(2, requires_grad=True), torch.zeros(1)], [0, 1])


# ----------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------


def test_sparse_csr_input_is_a_capture_error_naming_argument_and_layout():
    csr = torch.eye(3).to_sparse_csr()
    with pytest.raises(CaptureError, match=r"flat argument 1 .*torch\.sparse_csr"):
        compile_fn(lambda x, s: x + s.to_dense())(torch.randn(3, 3), csr)
    with pytest.raises(CaptureError, match=r"flat argument 0 .*torch\.sparse_csr"):
        capture(lambda s: s * 2, [csr])


def test_tensor_split_with_tensor_indices_is_a_data_dependent_capture_error():
    with pytest.raises(CaptureError, match=r"torch\.tensor_split.*data-dependent"):
        compile_fn(lambda x, i: torch.tensor_split(x, i))(torch.randn(6), torch.tensor([1, 3]))
    pieces = compile_fn(lambda x: torch.tensor_split(x, [1, 3]))(torch.arange(6.0))  # ints are fine
    assert [p.tolist() for p in pieces] == [[0.0], [1.0, 2.0], [3.0, 4.0, 5.0]]


def test_resize_of_a_symbolic_intermediate_is_a_capture_error_with_dynamic():
    def fn(x):
        y = x.clone()
        y.resize_(2)
        return y + 1

    assert compile_fn(fn)(torch.ones(4)).tolist() == [2.0, 2.0]  # static shapes: supported
    with pytest.raises(CaptureError, match=r"resize_\(\).*dynamic=True"):
        compile_fn(fn, dynamic=True)(torch.ones(4))


# ----------------------------------------------------------------------------------------------------------
# Effectful ops (NOTE [Effect tokens])
# ----------------------------------------------------------------------------------------------------------


def test_linalg_inv_matches_eager_values_and_gradients():
    a = torch.randn(3, 3) + 3 * torch.eye(3)
    x, x_ref = a.clone().requires_grad_(), a.clone().requires_grad_()
    out = compile_fn(torch.linalg.inv)(x)
    expected = torch.linalg.inv(x_ref)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_linalg_errors_of_eager_are_kept(requires_grad):
    compiled = compile_fn(torch.linalg.inv)
    compiled(torch.eye(3, requires_grad=requires_grad))
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        compiled(torch.zeros(3, 3, requires_grad=requires_grad))
    cholesky = compile_fn(torch.linalg.cholesky)
    cholesky(torch.eye(2, requires_grad=requires_grad))
    with pytest.raises(torch.linalg.LinAlgError, match="positive-definite"):
        cholesky((-torch.eye(2)).requires_grad_(requires_grad))
    assert compiled.num_compiles == 1 and cholesky.num_compiles == 1


def test_effect_token_is_an_extra_forward_output():
    captured = capture(torch.linalg.inv, [torch.eye(3)])
    targets = [node.target for node in captured.graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.higher_order.with_effects in targets
    assert captured.metadata.num_extra_outputs == 1


def test_linalg_check_survives_the_inductor_compiler():
    compiled = aot_function(lambda m: torch.linalg.inv(m) * 2, "inductor", cache=False)
    torch.testing.assert_close(compiled(2 * torch.eye(2)), torch.eye(2))
    with pytest.raises(torch.linalg.LinAlgError):
        compiled(torch.zeros(2, 2))


def test_linalg_check_is_side_effectful_after_a_capture_and_torch_compile_still_raises():
    """NOTE [Linalg checks on torch 2.11]: torch 2.11 does not register the check as side-effectful; the first
    capture does (later torch already has it), and torch's own compile keeps working, raising eager's error."""
    from torch._higher_order_ops.effects import _get_effect
    capture(torch.linalg.inv, [torch.eye(3)])
    assert _get_effect(torch.ops.aten._linalg_check_errors.default) is not None
    torch._dynamo.reset()
    compiled = torch.compile(torch.linalg.inv, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(2 * torch.eye(2)), torch.eye(2) / 2)
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        compiled(torch.zeros(2, 2))
    torch._dynamo.reset()


# -- object outputs (NOTE [Object outputs]) -----------------------------------------------------------------


class Holder:
    """A plain user class holding tensors, a view of an input, one tensor twice, and non-tensor state."""

    def __init__(self, x: torch.Tensor) -> None:
        hidden = x.sin() * 2
        self.items = [hidden, x.cos()]
        self.again = hidden  # the same tensor twice: one tensor after the rebuild as well
        self.row = x[0]  # a view of the input
        self.meta = {"rows": x.shape[0], "name": "holder"}


def test_object_output_is_rebuilt_per_call_with_its_tensors_and_state():
    compiled = compile_fn(lambda x: (Holder(x), x.sum()))
    x = torch.randn(3, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    got, total = compiled(x)
    expected, expected_total = Holder(x_ref), x_ref.sum()
    assert type(got) is Holder and got.meta == expected.meta
    torch.testing.assert_close(got.items, expected.items)
    torch.testing.assert_close(total, expected_total)
    assert got.again is got.items[0], "one tensor held twice stays one tensor"
    assert got.row._base is x and got.row.data_ptr() == x.data_ptr(), "a view of the input stays a view"
    (got.items[0].sum() + got.items[1].sum() + got.row.sum()).backward()
    (expected.items[0].sum() + expected.items[1].sum() + expected.row.sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    second, _ = compiled(x)
    assert second is not got and second.items[0] is not got.items[0], "every call returns a fresh object"
    assert compiled.num_compiles == 1


class HoldsModule:
    def __init__(self, module: torch.nn.Module, value: torch.Tensor) -> None:
        self.module = module
        self.value = value


class HoldsLambda:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.callback = lambda: value


def test_object_outputs_that_cannot_be_templated_are_capture_errors_naming_the_fix():
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(CaptureError, match="references an nn.Module"):
        compile_fn(lambda x: HoldsModule(linear, x * 2))(torch.randn(2))
    with pytest.raises(CaptureError, match="HoldsLambda.*register_pytree_node"):
        compile_fn(lambda x: HoldsLambda(x * 2))(torch.randn(2))


def test_transformers_decoder_key_value_cache_output_matches_eager():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    reference = transformers.GPT2LMHeadModel(config)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 8))
    got = aot_module(model, nop, cache=False)(input_ids=ids, labels=ids)  # use_cache defaults to True
    expected = reference(input_ids=ids, labels=ids)
    assert type(got.past_key_values) is type(expected.past_key_values)
    for layer, layer_ref in zip(got.past_key_values.layers, expected.past_key_values.layers, strict=True):
        torch.testing.assert_close(layer.keys, layer_ref.keys)
        torch.testing.assert_close(layer.values, layer_ref.values)
    torch.testing.assert_close(got.logits, expected.logits)
    got.loss.backward()
    expected.loss.backward()
    for (name, param), param_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, param_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_exports_refuse_object_outputs_naming_the_type():
    class Wrap(torch.nn.Module):
        def forward(self, x):
            return Holder(x)

    with pytest.raises(CaptureError, match="aot_export_module: the outputs hold .*Holder"):
        aot_export_module(Wrap(), (torch.randn(2, 3),), trace_joint=False)
    from aotcache.aot import aot_export_joint_simple

    with pytest.raises(CaptureError, match="aot_export_joint_simple: the outputs hold .*Holder"):
        aot_export_joint_simple(lambda x: Holder(x), (torch.randn(2, 3),), trace_joint=False)


@pytest.mark.parametrize("fn", [lambda x: x.conj(), lambda x: x._neg_view(), lambda x: x[1:].conj()],
                         ids=["conj", "neg_view", "conj_of_a_slice"])
@pytest.mark.parametrize("input_conj", [False, True])
def test_a_conjugate_view_of_an_input_keeps_its_values(fn, input_conj):
    # found by exploration: x.conj() was regenerated as an as_strided view of x without the conj bit: the
    # compiled function returned x itself, unconjugated
    x = torch.randn(3, dtype=torch.cfloat)
    x = x.conj() if input_conj else x
    got, expected = compile_fn(fn)(x), fn(x)
    assert torch.equal(got.resolve_conj().resolve_neg(), expected.resolve_conj().resolve_neg())
    leaf = torch.randn(3, dtype=torch.cfloat, requires_grad=True)
    weights = torch.arange(3.0) + 1
    (compile_fn(fn)(leaf).abs() * weights[:len(fn(leaf))]).sum().backward()
    grad, leaf.grad = leaf.grad, None
    (fn(leaf).abs() * weights[:len(fn(leaf))]).sum().backward()
    torch.testing.assert_close(grad, leaf.grad)
