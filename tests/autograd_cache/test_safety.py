"""Safety: what the compiled-graph cache may serve, and the categorical reason when it may not."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.autograd_cache.key import canonical_graph, compute_key
from aotcache.autograd_cache.safety import (
    BypassAOTAutogradCache,
    cacheable,
    check_cacheable,
    check_node_safe,
    qualified_name,
)

SETTINGS = dict(compiler_name="nop", partitioner_name="default_partition", decomposition_id="core_aten")


def unmarked_helper(t):
    return t * 2


@cacheable
def marked_helper(t):
    return t * 3


torch.fx.wrap("unmarked_helper")
torch.fx.wrap("marked_helper")


def bypass_reason(gm, example_inputs=None) -> str:
    with pytest.raises(BypassAOTAutogradCache) as info:
        check_cacheable(gm, example_inputs)
    reason = info.value.reason
    assert "\n" not in reason and len(reason) < 120, "reasons are short and categorical so that they can be counted"
    return reason


def graph_with_call(target, *extra_args, root=None, **kwargs) -> torch.fx.GraphModule:
    """A graph ``x -> target(x, *extra_args, **kwargs)``; arguments that fx cannot print are set after codegen."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    body = graph.get_attr("body") if root is not None and hasattr(root, "body") else None
    out = graph.call_function(target, (x,) if body is None else (body, x))
    graph.output(out)
    gm = torch.fx.GraphModule(root if root is not None else torch.nn.Module(), graph)
    out.args = (*out.args, *extra_args)
    out.kwargs = kwargs
    return gm


def test_aten_graph_with_symbolic_trace_is_safe():
    def fn(x, y):
        if x.shape[0] > 2:
            return torch.nn.functional.relu(x @ y).sum(0)
        return x

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(4, 3), torch.randn(3, 3))
    check_cacheable(gm, [torch.randn(4, 3), torch.randn(3, 3)])  # no exception
    for node in gm.graph.nodes:
        check_node_safe(node)


def test_public_torch_functions_methods_and_operators_are_safe():
    def model(x):
        y = torch.nn.functional.gelu(x).transpose(0, 1).contiguous()
        return operator.add(torch.sum(y, 0), y.mean())

    gm = torch.fx.symbolic_trace(model)
    check_cacheable(gm, [torch.randn(2, 3)])


def test_unknown_python_function_bypasses_with_its_name():
    gm = torch.fx.symbolic_trace(lambda x: unmarked_helper(x) + 1)
    assert bypass_reason(gm) == f"unsafe call: {__name__}.unmarked_helper"
    with pytest.raises(BypassAOTAutogradCache, match="unsafe call"):
        compute_key(gm, [torch.randn(2)], **SETTINGS)


def test_marked_user_function_is_safe():
    gm = torch.fx.symbolic_trace(lambda x: marked_helper(x) + 1)
    check_cacheable(gm)
    assert compute_key(gm, [torch.randn(2)], **SETTINGS).part("custom_code").detail


def test_private_torch_function_and_dangerous_builtins_bypass():
    assert bypass_reason(graph_with_call(torch._refs.abs)) == "unsafe call: torch._refs.abs"
    assert bypass_reason(graph_with_call(print)) == "unsafe call: builtins.print"
    assert bypass_reason(graph_with_call(eval)) == "unsafe call: builtins.eval"


def test_custom_op_from_custom_op_api_is_safe_but_low_level_library_op_is_opaque():
    @torch.library.custom_op("aots_test::visible", mutates_args=())
    def visible(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    check_cacheable(graph_with_call(torch.ops.aots_test.visible.default))

    library = torch.library.Library("aots_hidden", "DEF")  # noqa: TOR901 - the point of the test
    library.define("hidden(Tensor x) -> Tensor")
    library.impl("hidden", lambda x: x * 5, "CPU")
    assert bypass_reason(graph_with_call(torch.ops.aots_hidden.hidden.default)) == (
        "opaque custom op: aots_hidden::hidden")


class _ShadowTensor(torch.Tensor):
    """A tensor subclass: its behaviour (torch_function overrides) is outside the key."""


def test_tensor_subclass_input_bypasses():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    subclass_input = torch.randn(3).as_subclass(_ShadowTensor)
    assert bypass_reason(gm, [subclass_input]) == "tensor input subclass: _ShadowTensor"
    with pytest.raises(BypassAOTAutogradCache, match="tensor input subclass"):
        compute_key(gm, [subclass_input], **SETTINGS)
    check_cacheable(gm, [torch.nn.Parameter(torch.randn(3))])  # parameters are plain tensors


def test_opaque_input_and_opaque_attribute_bypass():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert bypass_reason(gm, [torch.Generator()]) == "opaque input: Generator"

    class Settings:
        scale = 2

    root = torch.nn.Module()
    root.settings = Settings()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    settings = graph.get_attr("settings")
    graph.output(graph.call_function(operator.mul, (x, settings)))
    assert bypass_reason(torch.fx.GraphModule(root, graph)) == "opaque object: Settings"


def test_opaque_argument_bypasses():
    class Knob:
        pass

    assert bypass_reason(graph_with_call(torch.add, Knob())) == "opaque argument: Knob"


def test_user_module_bypasses_but_torch_nn_module_is_safe():
    class Custom(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.custom = Custom()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.custom(self.linear(x))

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return True  # keep both as call_module nodes

    model = Model()
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    reason = bypass_reason(gm)
    assert reason.startswith("unsafe module: ") and reason.endswith("Custom")

    safe_model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    safe_gm = torch.fx.GraphModule(safe_model, Tracer().trace(safe_model))
    check_cacheable(safe_gm)
    assert compute_key(safe_gm, [torch.randn(1, 2)], **SETTINGS).digest


def test_higher_order_op_with_closure_bypasses():
    root = torch.nn.Module()
    root.body = torch.fx.symbolic_trace(lambda x: x.sin())
    checkpoint = torch.ops.higher_order.tag_activation_checkpoint
    with_closure = graph_with_call(checkpoint, root=root, context_fn=lambda: None)
    assert bypass_reason(with_closure) == "higher-order op with closure: tag_activation_checkpoint"

    safe = graph_with_call(checkpoint, root=root)
    check_cacheable(safe)
    assert any(line.startswith("sub1/") for line in canonical_graph(safe).lines), "subgraphs are part of the key"


def test_unlisted_higher_order_op_bypasses():
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

    gm = graph_with_call(triton_kernel_wrapper_mutation)
    assert bypass_reason(gm) == "unsafe higher-order op: triton_kernel_wrapper_mutation"


def test_dynamo_autocast_and_grad_mode_regions_are_safe():
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    def fn(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x @ w
        with torch.no_grad():
            z = x * 2
        return y.float().sum() + z.sum()

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=capture)(torch.randn(2, 3), torch.randn(3, 3))
    finally:
        torch._dynamo.reset()
    gm, example_inputs = captured[0]
    targets = {qualified_name(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert {"torch.amp.autocast_mode._enter_autocast", "torch._C._set_grad_enabled"} <= targets
    check_cacheable(gm, example_inputs)  # PyTorch bypasses these (issue 191106); we key them instead
    assert compute_key(gm, example_inputs, **SETTINGS).digest


def test_cacheable_rejects_non_functions_clearly():
    with pytest.raises(TypeError, match="cannot mark"):
        cacheable(3)
    with pytest.raises(BypassAOTAutogradCache, match="not a GraphModule"):
        check_cacheable(torch.nn.Linear(2, 2))


def test_every_operator_namespace_torch_and_inductor_register_is_torch_internal():
    """Ops registered by ``import torch`` and Inductor's decompositions ship with torch (its version is in the key);
    one missing from the list made Inductor's whole table unhashable (``prepacked::`` on torch 2.11.0+cu130)."""
    from tests.conftest import run_python

    code = ("import json, torch, torch._inductor.decomposition\n"
            "from aotcache.autograd_cache import safety\n"
            "names = {name.split('::')[0] for name in torch._C._dispatch_get_all_op_names()}\n"
            "print(json.dumps(sorted(n for n in names if not safety.is_torch_internal_namespace(n))))\n")
    assert json.loads(run_python(code).stdout.strip().splitlines()[-1]) == []
