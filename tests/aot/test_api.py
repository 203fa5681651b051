"""Public API: aot_function reuse/retrace, aot_module, aot_module_simplified (torch.compile), exports."""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import aotcache
from aotcache.aot import (
    AOTOptions,
    CaptureError,
    aot_export_joint_simple,
    aot_export_module,
    aot_function,
    aot_module,
    aot_module_simplified,
    compile_function,
    mutating_nodes,
)
from tests.conftest import run_python


def graph_compiler(gm, example_inputs):
    return gm


def mlp(x, w1, b1, w2):
    return (torch.tanh(x @ w1 + b1) @ w2).relu().sum()


def mlp_args():
    torch.manual_seed(0)
    return [torch.randn(6, 4), torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True),
            torch.randn(8, 3, requires_grad=True)]


def test_aot_function_matches_eager_with_default_compiler_and_partition():
    args = mlp_args()
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    compiled = aotcache.aot_function(mlp)  # nop compiler, default partition
    out = compiled(*args)
    ref = mlp(*ref_args)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(args[1:], ref_args[1:]):
        torch.testing.assert_close(got.grad, want.grad)


def test_signature_reuse_and_retrace():
    compiled = aot_function(lambda x: x * 2, graph_compiler)
    compiled(torch.randn(3))
    compiled(torch.randn(3))
    assert compiled.num_compiles == 1
    compiled(torch.randn(3, dtype=torch.float64))
    assert compiled.num_compiles == 2
    compiled(torch.randn(3, requires_grad=True))
    assert compiled.num_compiles == 3
    compiled(torch.randn(4))  # static shapes: a new size retraces
    assert compiled.num_compiles == 4
    compiled(torch.randn(4, 2).t()[0])  # same size, different stride
    assert compiled.num_compiles == 5
    with torch.no_grad():
        compiled(torch.randn(3, requires_grad=True))
    assert compiled.num_compiles == 6


def test_constant_arguments_are_part_of_the_signature():
    compiled = aot_function(lambda x, k: x * k, graph_compiler)
    torch.testing.assert_close(compiled(torch.ones(2), 2), torch.full((2,), 2.0))
    torch.testing.assert_close(compiled(torch.ones(2), 3), torch.full((2,), 3.0))
    assert compiled.num_compiles == 2


class MutableOptions:
    def __init__(self):
        self.scale = 2.0


def test_objects_compared_by_identity_are_refused_naming_the_argument():
    """NOTE [Constant arguments]: mutating such an object between calls used to reuse a stale graph. With
    on_capture_error="raise" the TypeError names the argument; by default the call takes the fallback (NOTE
    [Refused arguments take the fallback]), which sees the change."""
    compiled = aot_function(lambda x, opts: x * opts.scale, graph_compiler, cache=False, on_capture_error="raise")
    with pytest.raises(TypeError, match=r"argument args\[1\] is a .*MutableOptions object.*compared by identity"):
        compiled(torch.ones(2), MutableOptions())
    with pytest.raises(TypeError, match=r"argument kwargs\['opts'\] is a .*MutableOptions"):
        compiled(torch.ones(2), opts=MutableOptions())
    module = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear object"):
        aot_function(lambda x, m: m(x), graph_compiler, cache=False, on_capture_error="raise")(torch.ones(2), module)
    fallback = aot_function(lambda x, opts: x * opts.scale, graph_compiler, cache=False)
    opts = MutableOptions()
    torch.testing.assert_close(fallback(torch.ones(2), opts), torch.full((2,), float(opts.scale)))
    opts.scale = 5.0
    torch.testing.assert_close(fallback(torch.ones(2), opts), torch.full((2,), 5.0))


def test_constants_compared_by_value_and_code_arguments_are_accepted():
    import dataclasses
    import enum

    @dataclasses.dataclass(frozen=True)
    class Options:
        scale: float

    class Mode(enum.Enum):
        DOUBLE = 2
        TRIPLE = 3

    compiled = aot_function(lambda x, opts, mode, act, dtype: act(x * opts.scale * mode.value).to(dtype),
                            graph_compiler, cache=False)
    x = torch.ones(2)
    torch.testing.assert_close(compiled(x, Options(2.0), Mode.DOUBLE, torch.relu, torch.float64),
                               torch.full((2,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(compiled(x, Options(3.0), Mode.TRIPLE, torch.neg, None or torch.float32),
                               torch.full((2,), -9.0))
    torch.testing.assert_close(compiled(x, Options(2.0), Mode.DOUBLE, torch.relu, torch.float64),
                               torch.full((2,), 4.0, dtype=torch.float64))
    assert compiled.num_compiles == 2


def test_kwargs_and_nested_inputs():
    def fn(inputs, *, scale):
        return inputs["a"] * scale + inputs["b"][0]

    compiled = aot_function(fn, graph_compiler)
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(compiled({"a": a, "b": [b]}, scale=torch.tensor(2.0)), a * 2 + b)


def test_dynamic_reuses_one_graph_across_sizes():
    compiled = aot_function(lambda x: (x * 2).sin().sum(0), graph_compiler, dynamic=True)
    for rows in (3, 5, 9):
        x = torch.randn(rows, 4, requires_grad=True)
        compiled(x).sum().backward()
        torch.testing.assert_close(x.grad, 2 * (2 * x.detach()).cos())
    assert compiled.num_compiles == 1
    compiled(torch.randn(1, 4))  # size 1 is specialized by the symbolic tracer: the guards fail, retrace
    assert compiled.num_compiles == 2


def test_dynamic_retraces_on_new_dtype():
    compiled = aot_function(lambda x: x + 1, graph_compiler, dynamic=True)
    compiled(torch.randn(3))
    compiled(torch.randn(5))
    compiled(torch.randn(5, dtype=torch.float64))
    assert compiled.num_compiles == 2


def test_aot_module_sees_parameter_updates_and_populates_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    compiled = aot_module(model, graph_compiler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        inp = torch.randn(5, 4)
        out, ref = compiled(inp), reference(inp)
        torch.testing.assert_close(out, ref, msg=f"step {step}")
        out.square().mean().backward()
        ref.square().mean().backward()
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, p_ref.grad)
        optimizer.step()
        optimizer_ref.step()
        optimizer.zero_grad()
        optimizer_ref.zero_grad()
    assert compiled.compiled.num_compiles == 1


def test_aot_module_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        aot_module(lambda x: x)


def test_bad_compiler_is_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="compiler must be callable"):
        aot_function(lambda x: x * 2, fw_compiler=42)(torch.randn(2))


def test_compile_function_is_the_single_compile_step():
    runtime = compile_function(lambda x: x.cos(), [torch.randn(3, requires_grad=True)],
                               AOTOptions(fw_compiler=graph_compiler))
    x = torch.randn(3, requires_grad=True)
    runtime(x).sum().backward()
    torch.testing.assert_close(x.grad, -x.detach().sin())
    assert runtime.metadata.num_saved >= 1


def test_aot_module_simplified_as_a_torch_compile_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    reference = copy.deepcopy(model)
    graphs: list = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return gm

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, compiler)

    compiled = torch.compile(model, backend=backend)
    inp = torch.randn(8, 4)
    out, ref = compiled(inp), reference(inp)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    assert graphs and all(mutating_nodes(gm) == [] for gm in graphs)


def test_aot_module_simplified_with_parameters_on_the_graph_module():
    model = torch.nn.Linear(3, 2)
    example = [torch.randn(4, 3)]
    run = aot_module_simplified(model, example, graph_compiler)
    out = run(example[0])
    (out,) = out if isinstance(out, (tuple, list)) else (out,)
    out.sum().backward()
    torch.testing.assert_close(out, model(example[0]))
    assert model.weight.grad is not None



def test_aot_module_simplified_names_a_fake_tensor_read_from_a_closure():
    # PyTorch's test_aotdispatch (test_aot_module_simplified_fake_tensor_gm_raises): the fake constant was baked
    # into the graph and the first real call failed inside FakeTensorMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_z = mode.from_tensor(torch.randn(4))

    class ReadsFake(torch.nn.Module):
        def forward(self, x):
            return (x + fake_z,)

    with pytest.raises(CaptureError, match="reads a FakeTensor of shape \\(4,\\)"):
        aot_module_simplified(ReadsFake(), (mode.from_tensor(torch.randn(4, requires_grad=True)),), graph_compiler,
                              cache=False, on_capture_error="raise")


class _HookedIntermediate(torch.nn.Module):
    """PyTorch's test_hooks.py MyMod: hooks registered on an intermediate inside the module."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        y = x.mul(2)
        y.register_hook(lambda grad: self.calls.append(1) or grad + 3)
        return (y.mul(3),)


def test_aot_module_simplified_runs_a_module_it_cannot_capture_eagerly():
    # session 25 (PyTorch's test_hooks.py, test_intermediary_hooks_same_on_aot_eager): a hook registered inside the
    # module is refused by design; aot_module_simplified raised the CaptureError where torch's compiles, failing a
    # user's backend. Now the module runs as Python: eager's gradients, the hook at every backward, counted.
    from aotcache.aot.fallback import fallback_counts

    calls: list = []
    mod = _HookedIntermediate(calls)
    before = fallback_counts().get("eager:unsupported_construct", 0)
    run = aot_module_simplified(mod, (torch.ones(4, requires_grad=True),), graph_compiler, cache=False)
    assert fallback_counts().get("eager:unsupported_construct", 0) == before + 1
    for step in range(2):
        x = torch.ones(4, requires_grad=True)
        out = run(x)
        out[0].backward(torch.ones(4))
        assert torch.equal(x.grad, torch.full((4,), 12.0))  # (3 + 3) * 2, as eager
        assert len(calls) == step + 1


def test_aot_module_simplified_raises_what_it_cannot_capture_when_asked():
    from aotcache import config

    with pytest.raises(CaptureError, match="register_hook"):
        aot_module_simplified(_HookedIntermediate([]), (torch.ones(4, requires_grad=True),), graph_compiler,
                              cache=False, on_capture_error="raise")
    with config.patch(strict=True), pytest.raises(CaptureError, match="register_hook"):
        aot_module_simplified(_HookedIntermediate([]), (torch.ones(4, requires_grad=True),), graph_compiler,
                              cache=False)
    with pytest.raises(ValueError, match="on_capture_error"):
        aot_module_simplified(_HookedIntermediate([]), (torch.ones(4),), graph_compiler, on_capture_error="ignore")



class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        return ((self.linear(x) + y).relu(),)


def _graph_module_with_stack_traces() -> torch.fx.GraphModule:
    """A GraphModule whose nodes carry the source line (``stack_trace``), as Dynamo's do."""
    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True
    graph = tracer.trace(_Block())
    return torch.fx.GraphModule(tracer.root, graph)


def test_aot_module_simplified_keeps_the_source_line_of_every_node():
    # PyTorch's test_aotdispatch (test_aot_module_simplified_preserves_stack_trace): the forward and backward
    # graphs had no stack_trace, so Inductor's code and errors could not point at the user's line
    # (NOTE [Source stack traces] in aot/source_locations.py)
    gm = _graph_module_with_stack_traces()
    missing = []

    def compiler(graph_module, example_inputs):
        missing.extend(node.name for node in graph_module.graph.nodes if node.op not in ("placeholder", "output")
                       and "test_api.py" not in (node.stack_trace or ""))
        return graph_module

    x, y = torch.randn(2, 4, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    (out,) = aot_module_simplified(gm, [x, y], compiler, compiler, cache=False)(x, y)
    out.sum().backward()
    torch.testing.assert_close(out, gm(x, y)[0])
    assert x.grad is not None and missing == []


@pytest.mark.parametrize("extra", ["forward_hook", "forward_pre_hook", "instance_forward", "global_hook"])
def test_aot_module_simplified_with_source_lines_still_runs_the_hooks_of_the_graph_module(extra):
    """NOTE [Source stack traces]: a GraphModule with stack traces is run node by node (fx.Interpreter), which skips
    what its call adds to the graph (hooks, a replaced forward): the compiled graph computed without them."""
    gm = _graph_module_with_stack_traces()
    handle = None
    if extra == "forward_hook":
        gm.register_forward_hook(lambda module, args, out: (out[0] * 10,))
    elif extra == "forward_pre_hook":
        gm.register_forward_pre_hook(lambda module, args: (args[0] * 0, args[1]))
    elif extra == "instance_forward":
        graph_forward = gm.forward
        gm.forward = lambda x, y: (graph_forward(x, y)[0] - 5,)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: (out[0] + 3,) if module is gm else out)
    try:
        x, y = torch.randn(2, 4, requires_grad=True), torch.randn(2, 3)
        (out,) = aot_module_simplified(gm, [x, y], "nop", "nop", cache=False)(x, y)
        torch.testing.assert_close(out, gm(x, y)[0])
    finally:
        if handle is not None:
            handle.remove()


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.bn(self.lin(x))
        return y.sum(), y.detach()


def test_aot_export_module_joint_refuses_other_outputs_that_require_grad():
    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            y = self.lin(x)
            return y.sum(), y

    with pytest.raises(CaptureError, match="Found an output of the forward that requires gradients.*outputs \\[1\\]"):
        aot_export_module(TwoOutputs(), (torch.randn(4, 3),), trace_joint=True, output_loss_index=0)


def test_aot_export_module_joint_names_the_shape_of_a_loss_that_is_not_a_scalar():
    # found by exploration: the message said "(got FunctionalTensor)" for a (4, 2) output
    with pytest.raises(ValueError, match=r"output 0 \(output_loss_index\) must be a scalar.*shape \(4, 2\)"):
        aot_export_module(torch.nn.Linear(3, 2), (torch.randn(4, 3),), trace_joint=True, output_loss_index=0)


def test_aot_export_module_joint_signature():
    gm, sig = aot_export_module(SmallNet(), (torch.randn(4, 3),), trace_joint=True, output_loss_index=0)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert sig.parameters == ["lin.weight", "lin.bias", "bn.weight", "bn.bias"]
    assert sig.buffers == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert list(sig.inputs_to_parameters.values()) == sig.parameters
    assert list(sig.inputs_to_buffers.values()) == sig.buffers
    assert placeholders == [*sig.inputs_to_parameters, *sig.inputs_to_buffers, *sig.user_inputs]
    assert sorted(sig.buffers_to_mutate.values()) == sorted(sig.buffers)
    assert sig.loss_output == sig.user_outputs[0]
    assert sorted(sig.gradients_to_parameters.values()) == sorted(sig.parameters)
    output_names = [n.name for n in next(n for n in gm.graph.nodes if n.op == "output").args[0]]
    assert set(sig.gradients_to_parameters) <= set(output_names)
    assert mutating_nodes(gm) == []
    # PyTorch's GraphSignature shape: code written against aot_autograd's export reads these
    assert sig.backward_signature.loss_output == sig.loss_output
    assert sig.backward_signature.gradients_to_parameters == sig.gradients_to_parameters
    assert sig.parameters_to_mutate == {} and sig.input_tokens == [] and sig.output_tokens == []


def test_aot_export_module_forward_only():
    gm, sig = aot_export_module(SmallNet(), (torch.randn(4, 3),), trace_joint=False)
    assert sig.loss_output is None and sig.gradients_to_parameters == {} and sig.backward_signature is None
    assert len(sig.user_outputs) == 2
    with pytest.raises(ValueError, match="output_loss_index"):
        aot_export_module(SmallNet(), (torch.randn(4, 3),), trace_joint=True)


def test_aot_export_joint_simple_graphs_run_correctly():
    x, y = torch.randn(3, requires_grad=True), torch.randn(3)
    joint = aot_export_joint_simple(lambda a, b: (a * b).sin(), (x, y), trace_joint=True)
    names = [n.name for n in joint.graph.nodes if n.op == "placeholder"]
    assert names == ["primals_1", "primals_2", "tangents_1"]
    out, grad_x, grad_y = joint(x.detach(), y, torch.ones(3))
    torch.testing.assert_close(out, (x.detach() * y).sin())
    torch.testing.assert_close(grad_x, (x.detach() * y).cos() * y)
    assert grad_y is None
    forward = aot_export_joint_simple(lambda a: a.exp(), (x,), trace_joint=False)
    (result,) = forward(x.detach())
    torch.testing.assert_close(result, x.detach().exp())


@pytest.mark.parametrize(("fn", "match"), [
    (lambda a: a.add_(1), "mutates graph inputs"),
    (lambda a: a.view(-1), "alias"),
])
def test_aot_export_joint_simple_rejects_what_a_bare_graph_cannot_express(fn, match):
    with pytest.raises(CaptureError, match=match):
        aot_export_joint_simple(fn, (torch.randn(2, 2),), trace_joint=False)



def test_forward_exports_trace_under_no_grad_and_take_flat_arguments():
    # PyTorch's test_aotdispatch TestAOTExport: a forward export (trace_joint=False) is an inference graph, so it
    # may mutate a parameter or an input that requires grad (it raised "Found a graph input that requires
    # gradients"); aot_export_joint_simple takes its arguments flat and refuses a list argument up front
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            self.p.mul_(2)
            x.add_(1)
            return (self.p + x,)

    x = torch.randn(2, requires_grad=True)
    gm, sig = aot_export_module(mod=Scale(), args=[x], trace_joint=False)
    new_p, new_x, out = gm(torch.ones(2), x.detach())
    torch.testing.assert_close(new_p, torch.full((2,), 2.0))
    torch.testing.assert_close(out, new_p + x.detach() + 1)
    assert list(sig.user_inputs_to_mutate.values()) == sig.user_inputs
    assert list(sig.parameters_to_mutate.values()) == ["p"] and sig.buffers_to_mutate == {}
    with pytest.raises(CaptureError, match="does not support input mutations"):
        aot_export_joint_simple(lambda p, a: (p.mul_(2) + a,), [torch.nn.Parameter(torch.ones(2)), x],
                                trace_joint=False)
    with pytest.raises(CaptureError, match="not to be pytrees: argument 0 is a list"):
        aot_export_joint_simple(lambda pair: (pair[0] + pair[1],), [[x, x]], trace_joint=False)
    (result,) = aot_export_joint_simple(func=lambda a, b: (a * b,), args=[x, x], trace_joint=False)(x, x)
    torch.testing.assert_close(result, x * x)


# -- code written for PyTorch's AOT Autograd (NOTE [boxed compilers], NOTE [PyTorch-compatible arguments]) ---


def test_pytorch_boxed_compilers_run_forward_backward_and_inference():
    from functorch.compile import make_boxed_compiler, make_boxed_func
    from functorch.compile import nop as pytorch_nop

    calls = []

    def boxed_recording(gm, example_inputs):
        calls.append(len(example_inputs))
        return make_boxed_func(gm)

    for compiler in (pytorch_nop, make_boxed_compiler(graph_compiler), boxed_recording):
        args = mlp_args()
        ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        compiled = aot_function(mlp, compiler, cache=False)
        out = compiled(*args)
        out.backward()
        expected = mlp(*ref_args)
        expected.backward()
        torch.testing.assert_close(out, expected)
        for got, ref in zip(args[1:], ref_args[1:]):
            torch.testing.assert_close(got.grad, ref.grad)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), expected)
    assert len(calls) == 3, "forward, backward and inference graphs all went through the boxed compiler"


def test_pytorch_argument_order_and_compatibility_flags():
    args = mlp_args()
    compiled = aot_function(mlp, graph_compiler, graph_compiler, None, None, 3, True, graph_compiler)
    torch.testing.assert_close(compiled(*args), mlp(*args))
    module = aot_module(SmallNet(), graph_compiler, num_params_buffers=7, keep_inference_input_mutations=True,
                        cache=False)
    module(torch.randn(4, 3))
    with pytest.raises(TypeError, match="num_params_buffers must be an int >= 0"):
        aot_function(mlp, graph_compiler, num_params_buffers=-1)
    with pytest.raises(TypeError, match="keep_inference_input_mutations must be a bool"):
        aot_module(SmallNet(), graph_compiler, keep_inference_input_mutations="yes")
    with pytest.raises(TypeError, match="num_params_buffers must be an int >= 0"):
        aot_export_joint_simple(lambda x: x.sin(), (torch.randn(2),), trace_joint=False, num_params_buffers=1.5)



def test_every_keyword_of_pytorchs_entry_points_is_accepted():
    # PyTorch's test_aotdispatch passes disable_functionalization= (and Dynamo's backends ignore_shape_env=,
    # compile_region_name=, ...); a keyword we did not know was a TypeError before anything ran
    import inspect

    import torch._functorch.aot_autograd as pytorch_aot

    for name in ("aot_function", "aot_module_simplified", "aot_export_module", "aot_export_joint_simple"):
        theirs = inspect.signature(getattr(pytorch_aot, name)).parameters
        ours = inspect.signature(getattr(aotcache, name)).parameters
        assert [p for p in theirs if p not in ours] == [], name  # names too: aot_export_module(mod=..., args=...)
    ours = inspect.signature(aotcache.aot_module).parameters  # PyTorch's is aot_module(mod, *args, **kwargs)
    assert "mod" in ours
    assert [p for p in inspect.signature(pytorch_aot.aot_function).parameters if p not in ours] == ["fn"]


def test_pytorch_only_flags_give_eager_results():
    def bump(x, y):
        x.mul_(2)  # an input mutation, which disable_functionalization=True would keep in PyTorch's graph
        return x + y

    compiled = aot_function(bump, graph_compiler, enable_log=False, disable_functionalization=True,
                            _disable_torch_fn_metadata_mode=True, cache=False)
    x, x_ref, y = torch.ones(3), torch.ones(3), torch.randn(3)
    torch.testing.assert_close(compiled(x, y), bump(x_ref, y))
    torch.testing.assert_close(x, x_ref)
    for flag in ("enable_log", "disable_functionalization"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            aot_function(bump, graph_compiler, **{flag: "no"})
    with pytest.raises(TypeError, match="ignore_shape_env must be a bool"):
        aot_module_simplified(torch.nn.Linear(2, 2), [torch.randn(2)], graph_compiler, ignore_shape_env=1)


def test_aot_module_simplified_runs_pre_grad_passes_on_the_graph_module():
    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    seen = []

    def mul_to_add(graph_module, example_inputs):
        seen.append(len(example_inputs))
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target is operator.mul:
                node.target = operator.add
        graph_module.recompile()
        return graph_module

    x = torch.randn(3)
    run = aot_module_simplified(gm, [x], graph_compiler, graph_compiler, None, None, False, None, None, False,
                                False, mul_to_add, "region", cache=False)
    (out,) = run(x) if isinstance(run(x), (tuple, list)) else (run(x),)
    torch.testing.assert_close(out, x + 2)  # the pass ran before the capture
    assert seen == [1]
    with pytest.raises(TypeError, match="pre_grad_passes must be callable"):
        aot_module_simplified(gm, [x], graph_compiler, pre_grad_passes="fuse")


def test_custom_backend_calling_aot_module_simplified_like_pytorch():
    from functorch.compile import nop as pytorch_nop

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, pytorch_nop, pytorch_nop, None, None, True, cache=False)

    torch._dynamo.reset()
    model = SmallNet()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3)
    got = torch.compile(model, backend=backend)(x)
    expected = reference(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)


class _AddTwice(torch.nn.Module):
    def forward(self, x, y):
        return (x * 2 + y,)


def test_aot_module_simplified_compiles_again_when_a_call_breaks_its_assumptions():
    """NOTE [Call contract of aot_module_simplified]: duplicated inputs and requires_grad are checked per call."""
    x = torch.randn(3, 3)
    run = aot_module_simplified(_AddTwice(), (x, x), graph_compiler, cache=False)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    torch.testing.assert_close(run(a, b)[0], a * 2 + b)  # compiled for (x, x): one value in the graph
    torch.testing.assert_close(run(a, a)[0], a * 3)
    run = aot_module_simplified(_AddTwice(), (torch.randn(3, 3, requires_grad=True), torch.randn(3, 3)),
                                graph_compiler, cache=False)
    y = torch.randn(3, 3, requires_grad=True)
    run(torch.randn(3, 3, requires_grad=True), y)[0].sum().backward()
    torch.testing.assert_close(y.grad, torch.ones(3, 3))  # y did not require grad when compiled


def test_exports_refuse_in_place_metadata_changes_and_pre_dispatch():
    def transpose_in_place(x):
        x.t_()
        return x * 2

    with pytest.raises(CaptureError, match="changes the sizes or strides of graph inputs"):
        aot_export_joint_simple(transpose_in_place, [torch.randn(2, 3)], trace_joint=False)

    class TransposeInPlace(torch.nn.Module):
        def forward(self, x):
            return transpose_in_place(x)

    with pytest.raises(CaptureError, match="changes the sizes or strides of graph inputs"):
        aot_export_module(TransposeInPlace(), [torch.randn(2, 3)], trace_joint=False)
    with pytest.raises(NotImplementedError, match="pre_dispatch=True"):
        aot_export_module(TransposeInPlace(), [torch.randn(2, 3)], trace_joint=False, pre_dispatch=True)
    gm, _ = aot_export_module(torch.nn.Linear(3, 2), [torch.randn(2, 3)], trace_joint=False, pre_dispatch=False)
    assert any(node.op == "call_function" for node in gm.graph.nodes)



@pytest.mark.parametrize("trace_joint", [False, True], ids=["forward", "joint"])
def test_aot_export_module_with_dynamic_shapes_runs_for_other_sizes(trace_joint):
    # PyTorch's test_aotdispatch passes dynamic_shapes=True (test_aot_export_unbacked_arg): it was refused
    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())

        def forward(self, x):
            out = self.net(x)
            return (out.sum(),) if trace_joint else (out,)

    torch.manual_seed(0)
    mod = Loss()
    params = list(mod.parameters())
    for dynamic in (True, False):
        gm, _ = aot_export_module(mod, [torch.randn(2, 4)], trace_joint=trace_joint,
                                  output_loss_index=0 if trace_joint else None, dynamic_shapes=dynamic)
        symbolic = [isinstance(size, torch.SymInt) for node in gm.graph.nodes if node.op == "placeholder"
                    for size in node.meta["val"].shape]
        assert all(symbolic) if dynamic else not any(symbolic)
        if not dynamic:
            continue
        for batch in (2, 5):
            x = torch.randn(batch, 4)
            outs = gm(*params, x)
            assert torch.allclose(outs[0], mod(x)[0])
            if trace_joint:
                grads = torch.autograd.grad(mod(x)[0], params)
                assert all(torch.allclose(g, e) for g, e in zip(outs[1:], grads))

    class ItemSize(torch.nn.Module):
        def forward(self):
            return (torch.full((int(torch.full((), 11).item()),), 0),)

    with pytest.raises(CaptureError, match="depends on tensor data"):
        aot_export_module(ItemSize(), [], trace_joint=False, dynamic_shapes=True)

# --------------------------------------------------------------------------------------------------------
# Issue 13 item 9: partition_fn by name, and a wrong input shape reported without fake-tensor log noise
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["min_cut", "default"])
def test_partition_fn_by_name_in_aot_function_and_aot_module(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)
    compiled = aot_module(model, "nop", partition_fn=name, cache=False)
    compiled(x).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, want in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, want)
    w = torch.randn(3, 2, requires_grad=True)
    aot_function(lambda a, b: (a @ b).sin().sum(), "nop", partition_fn=name, cache=False)(x, w).backward()
    torch.testing.assert_close(w.grad, torch.autograd.grad((x @ w).sin().sum(), w)[0])


def test_unknown_partition_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown partition_fn 'mincut'; use one of 'default', 'min_cut'"):
        aot_function(lambda x: x, partition_fn="mincut")
    with pytest.raises(ValueError, match=r"aot_module: unknown partition_fn"):
        aot_module(torch.nn.Linear(2, 2), partition_fn="minimum")
    with pytest.raises(TypeError, match=r"partition_fn must be a partition function"):
        aot_function(lambda x: x, partition_fn=3)


def test_wrong_input_shape_raises_the_real_error_without_fake_tensor_logs():
    code = """
import torch
from aotcache.aot import aot_module
m = aot_module(torch.nn.Linear(3, 2), "nop", cache=False)
try:
    m(torch.randn(4, 5))
except RuntimeError as exc:
    print("raised:", exc)
"""
    proc = run_python(code)
    # the capture's failure makes the call run eagerly, which raises eager's own error (NOTE [Captures that fail
    # where eager may run]); the fake trace's message was "a and b must have same reduction dim"
    assert "raised: mat1 and mat2 shapes cannot be multiplied" in proc.stdout, proc.stdout
    assert "fake_tensor" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _scaled_sine(x, w):
    return (x.sin() * w).sum(dim=0)


def test_pytorchs_nop_compiler_is_stored_as_aotcaches_nop():
    # NOTE [PyTorch's nop compiler by name]: functorch.compile.nop's graphs were compiled, never stored
    from functorch.compile import nop

    from aotcache.autograd_cache.cache import default_cache

    cache = default_cache()
    before = cache.stats()
    x = torch.randn(4, 3)
    w = torch.randn(3, requires_grad=True)
    expected = _scaled_sine(x, w)
    (expected_grad,) = torch.autograd.grad(expected.sum(), w)
    for _ in range(2):  # the second wrapper finds the first one's entry
        out = aotcache.aot_function(_scaled_sine, nop)(x, w)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), w)[0], expected_grad)
    after = cache.stats()
    assert after["saved"] > before["saved"] and after["hit"] > before["hit"]
    assert after["bypass"] == before["bypass"]
