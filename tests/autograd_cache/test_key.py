"""The compiled-graph cache key: every result-changing perturbation changes it, nothing else does."""

from __future__ import annotations

import concurrent.futures
import json
import textwrap

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from aotcache.autograd_cache.key import (
    CacheKey,
    KeyPart,
    callable_digest,
    canonical_graph,
    compute_key,
    explain_difference,
    normalize_placeholder_names,
    system_parts,
)
from aotcache.autograd_cache.safety import BypassAOTAutogradCache, cacheable
from tests.conftest import run_python

SETTINGS = dict(compiler_name="nop", partitioner_name="default_partition", decomposition_id="core_aten")


def key_of(fn, *inputs, **overrides) -> CacheKey:
    gm = make_fx(fn)(*inputs)
    return compute_key(gm, list(inputs), **{**SETTINGS, **overrides})


def body(x, y):
    return (x * 2).sin() + y


def inputs(**kwargs):
    return torch.randn(4, 3, **kwargs), torch.randn(4, 3)


# ----------------------------------------------------------------------------------------------------
# Stability
# ----------------------------------------------------------------------------------------------------


def test_same_graph_same_key_and_json_round_trip():
    x, y = inputs()
    first, second = key_of(body, x, y), key_of(body, x, y)
    assert first.digest == second.digest
    assert len(first.digest) == 64
    restored = CacheKey.from_json(json.loads(json.dumps(first.to_json())))
    assert restored.digest == first.digest
    assert restored.parts_digests() == first.parts_digests()
    assert set(first.parts_digests()) >= {"graph", "inputs", "constants", "custom_code", "grad_mode", "autocast",
                                          "compiler", "partitioner", "decompositions", "config", "extra", "system"}


def test_placeholder_names_do_not_matter():
    def renamed(alpha, beta):
        return (alpha * 2).sin() + beta

    x, y = inputs()
    gm_a, gm_b = make_fx(body)(x, y), make_fx(renamed)(x, y)
    assert [n.name for n in gm_a.graph.nodes][:2] != [n.name for n in gm_b.graph.nodes][:2]
    assert compute_key(gm_a, [x, y], **SETTINGS).digest == compute_key(gm_b, [x, y], **SETTINGS).digest
    assert list(normalize_placeholder_names(gm_b).values()) == ["arg0", "arg1"]


def test_input_values_and_parameter_values_do_not_matter():
    linear = torch.nn.Linear(3, 2)

    def step(weight, bias, x):
        return torch.nn.functional.linear(x, weight, bias).relu()

    x = torch.randn(5, 3)
    gm = make_fx(step)(linear.weight, linear.bias, x)
    before = compute_key(gm, [linear.weight, linear.bias, x], **SETTINGS)
    with torch.no_grad():
        linear.weight.mul_(3.0)
        linear.bias.add_(1.0)
    after = compute_key(gm, [linear.weight, linear.bias, torch.randn(5, 3)], **SETTINGS)
    assert before.digest == after.digest


class _ModuleWithStateAndConstant(torch.nn.Module):
    def __init__(self, constant: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 3))
        self.register_buffer("scale", torch.ones(3))
        self.constant = constant  # a plain tensor attribute: baked into the compiled graph

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.scale + self.constant


def test_get_attr_parameters_by_metadata_constants_by_content():
    module = _ModuleWithStateAndConstant(torch.zeros(3))
    gm = torch.fx.symbolic_trace(module)
    x = torch.randn(2, 3)
    base = compute_key(gm, [x], **SETTINGS)
    with torch.no_grad():
        gm.weight.mul_(5.0)
    assert compute_key(gm, [x], **SETTINGS).digest == base.digest, "parameter values must not enter the key"
    gm.constant = torch.ones(3)  # fx registered the plain tensor attribute as a buffer; it is baked by default
    changed = compute_key(gm, [x], **SETTINGS)
    _assert_differs(base, changed, "constants", "tensor constants differs: constant 1 sha256")


def test_lifted_buffers_by_metadata_only():
    """aot_module_simplified lifts parameters and buffers to inputs: their values must not change the key."""
    module = _ModuleWithStateAndConstant(torch.zeros(3))
    gm = torch.fx.symbolic_trace(module)
    lifted = [name for name, _ in (*gm.named_parameters(), *gm.named_buffers())]
    x = torch.randn(2, 3)
    base = compute_key(gm, [x], lifted_attributes=lifted, **SETTINGS)
    with torch.no_grad():
        gm.scale.add_(1.0)
        gm.constant.add_(1.0)
    assert compute_key(gm, [x], lifted_attributes=lifted, **SETTINGS).digest == base.digest
    gm.scale = torch.ones(3, dtype=torch.float64)  # metadata still counts
    _assert_differs(base, compute_key(gm, [x], lifted_attributes=lifted, **SETTINGS), "graph")


def test_closure_constant_of_traced_function_by_content():
    captured = torch.ones(3)
    x = torch.randn(3)
    gm = make_fx(lambda t: t + captured)(x)
    base = compute_key(gm, [x], **SETTINGS)
    gm._tensor_constant0 = torch.full((3,), 2.0)
    _assert_differs(base, compute_key(gm, [x], **SETTINGS), "constants")


def test_working_directory_does_not_matter(tmp_path, monkeypatch):
    x, y = inputs()
    before = key_of(body, x, y)
    monkeypatch.chdir(tmp_path)
    assert key_of(body, x, y).digest == before.digest


_FRESH_PROCESS_KEY = textwrap.dedent("""
    import torch
    import torch.fx
    from aotcache.autograd_cache.key import compute_key

    @torch.library.custom_op("aotk_fresh::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * BODY_FACTOR

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)
            self.offset = torch.arange(3.0)

        def forward(self, x):
            return torch.ops.aotk_fresh.scale.default(self.linear(x)).sum(0) + self.offset

    torch.manual_seed(int(__import__("os").environ["PYTHONHASHSEED"]))  # different weights per process
    gm = torch.fx.symbolic_trace(Model())
    x = torch.randn(4, 3)
    key = compute_key(gm, [x], compiler_name="inductor", partitioner_name="min_cut",
                      decomposition_id="inductor", compiler_options={"max_autotune": False, "threads": 2},
                      config_parts={"keep_inference_input_mutations": True})
    import sys
    assert "torch._inductor.codecache" not in sys.modules, "computing a key imported Inductor"
    print(key.digest)
""")


def test_fresh_processes_agree_and_custom_op_body_edit_changes_key():
    runs = [("2", "1"), ("2", "2"), ("3", "1")]  # (custom op body factor, hash seed and weight seed)
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        same_a, same_b, edited = pool.map(
            lambda run: run_python(_FRESH_PROCESS_KEY.replace("BODY_FACTOR", run[0]), env={"PYTHONHASHSEED": run[1]}),
            runs)
    digest_a, digest_b, digest_edited = (proc.stdout.strip().splitlines()[-1] for proc in (same_a, same_b, edited))
    assert len(digest_a) == 64
    assert digest_a == digest_b
    assert digest_edited != digest_a


# ----------------------------------------------------------------------------------------------------
# Every perturbation that changes the result changes the key
# ----------------------------------------------------------------------------------------------------


def _assert_differs(a: CacheKey, b: CacheKey, part: str, words: str | None = None) -> None:
    assert a.digest != b.digest
    explanation = explain_difference(a, b)
    changed = {name for name, digest in a.parts_digests().items() if b.parts_digests().get(name) != digest}
    assert changed == {part}, (changed, explanation)
    if words is not None:
        assert any(words in line for line in explanation), explanation


def test_dtype_changes_key_and_is_explained():
    x, y = inputs()
    base = key_of(body, x, y)
    half = key_of(body, x.half(), y.half())
    assert half.digest != base.digest
    assert "input metadata differs: arg 0 dtype float32 vs float16" in explain_difference(base, half)
    # The explanation survives a JSON round trip of the recorded parts.
    assert "input metadata differs: arg 0 dtype float32 vs float16" in explain_difference(
        json.loads(json.dumps(base.to_json())), json.loads(json.dumps(half.to_json())))


def test_shape_stride_requires_grad_change_key():
    x, y = inputs()
    base = key_of(body, x, y)
    _assert_differs(base, key_of(body, torch.randn(5, 3), torch.randn(5, 3)), "inputs", "arg 0 shape [4, 3] vs [5, 3]")
    transposed = torch.randn(3, 4).t()
    _assert_differs(base, key_of(body, transposed, y), "inputs", "arg 0 stride [3, 1] vs [1, 4]")
    _assert_differs(base, key_of(body, torch.randn(4, 3, requires_grad=True), y), "inputs",
                    "arg 0 requires_grad false vs true")


def test_op_changes_key():
    def other(x, y):
        return (x * 2).cos() + y

    x, y = inputs()
    base, changed = key_of(body, x, y), key_of(other, x, y)
    _assert_differs(base, changed, "graph", "aten.sin.default used 1 time(s) vs 0")


def test_argument_change_is_located_at_its_node():
    def other(x, y):
        return (x * 3).sin() + y

    x, y = inputs()
    explanation = explain_difference(key_of(body, x, y), key_of(other, x, y))
    assert explanation == ["graph differs: 1 node(s) differ, first at node 2"]


def test_grad_mode_and_autocast_change_key():
    x, y = inputs()
    gm = make_fx(body)(x, y)
    base = compute_key(gm, [x, y], **SETTINGS)
    with torch.no_grad():
        _assert_differs(base, compute_key(gm, [x, y], **SETTINGS), "grad_mode", "grad_enabled true vs false")
    _assert_differs(base, compute_key(gm, [x, y], grad_enabled=False, **SETTINGS), "grad_mode")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_differs(base, compute_key(gm, [x, y], **SETTINGS), "autocast", "cpu enabled false vs true")
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = compute_key(gm, [x, y], **SETTINGS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_differs(fp16, compute_key(gm, [x, y], **SETTINGS), "autocast", "cpu dtype float16 vs bfloat16")


def test_compiler_partitioner_decomposition_config_extra_change_key():
    x, y = inputs()
    gm = make_fx(body)(x, y)
    base = compute_key(gm, [x, y], compiler_options={"max_autotune": False}, **SETTINGS)
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": True}, **SETTINGS), "compiler",
                    "compiler differs: options max_autotune false vs true")
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": False},
                                      **{**SETTINGS, "compiler_name": "inductor"}), "compiler")
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": False},
                                      **{**SETTINGS, "partitioner_name": "min_cut"}), "partitioner")
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": False},
                                      **{**SETTINGS, "decomposition_id": "none"}), "decompositions")
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": False},
                                      config_parts={"keep_input_mutations": True}, **SETTINGS), "config")
    _assert_differs(base, compute_key(gm, [x, y], compiler_options={"max_autotune": False},
                                      extra_hashes=["user-salt"], **SETTINGS), "extra")
    assert compute_key(gm, [x, y], compiler_options={"max_autotune": False}, extra_hashes=[b"\x01"],
                       **SETTINGS).part("extra").detail != compute_key(
        gm, [x, y], compiler_options={"max_autotune": False}, extra_hashes=[b"\x02"], **SETTINGS).part("extra").detail


def test_torch_version_is_in_key(monkeypatch):
    x, y = inputs()
    base = key_of(body, x, y)
    monkeypatch.setattr(torch, "__version__", "9.9.9+future")
    _assert_differs(base, key_of(body, x, y), "system", "torch 2")


def test_cpu_capability_is_in_key(monkeypatch):
    x, y = inputs()
    base = key_of(body, x, y)
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    _assert_differs(base, key_of(body, x, y), "system", "cpu_capability")


def test_cpu_isa_extensions_are_in_key(monkeypatch):
    x, y = inputs()
    base = key_of(body, x, y)
    vnni = torch.cpu._is_vnni_supported()
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: not vnni)
    _assert_differs(base, key_of(body, x, y), "system", "cpu_extensions")


def test_system_parts_hold_no_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = system_parts(["cpu"])
    text = json.dumps(parts)
    assert str(tmp_path) not in text and "/" not in text, text
    assert parts["torch"] == torch.__version__ and parts["cpu_capability"]
    assert set(parts) >= {"aotcache", "aotcache_source", "torch", "python", "cpu_capability"}


def test_custom_op_implementations_change_key():
    @torch.library.custom_op("aotk_test::warp", mutates_args=())
    def warp(x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    @warp.register_fake
    def _(x):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward_v1(ctx, grad):
        return grad * ctx.saved_tensors[0].cos()

    def backward_v2(ctx, grad):  # the stale-result bug of PyTorch issue 144344: a changed backward
        return grad * ctx.saved_tensors[0].cos() * 2

    x = torch.randn(3, requires_grad=True)
    warp.register_autograd(backward_v1, setup_context=setup_context)
    gm = make_fx(lambda t: warp(t) + 1)(x)
    base = compute_key(gm, [x], **SETTINGS)
    assert "op:aotk_test.warp.default" in base.part("custom_code").detail

    warp.register_autograd(backward_v2, setup_context=setup_context)
    _assert_differs(base, compute_key(gm, [x], **SETTINGS), "custom_code",
                    "op:aotk_test.warp.default implementation changed")
    warp.register_autograd(backward_v1, setup_context=setup_context)
    assert compute_key(gm, [x], **SETTINGS).digest == base.digest

    @warp.register_kernel("cpu")
    def _(x):
        return x.cos()

    _assert_differs(base, compute_key(gm, [x], **SETTINGS), "custom_code")

    @warp.register_fake
    def _(x):
        return x.new_empty(x.shape)

    assert compute_key(gm, [x], **SETTINGS).part("custom_code").digest != base.part("custom_code").digest


# A module-level constant and helper referenced by a marked user function: editing either must invalidate.
SCALE = 2.0


def _helper(t):
    return t * SCALE


@cacheable
def user_fn(t):
    return _helper(t) + 1


torch.fx.wrap("user_fn")  # symbolic_trace keeps it as a call_function node

def test_marked_user_function_code_and_globals_change_key(monkeypatch):
    def model(x):
        return user_fn(x).relu()

    gm = torch.fx.symbolic_trace(model)
    assert any(node.target is user_fn for node in gm.graph.nodes)
    x = torch.randn(3)
    base = compute_key(gm, [x], **SETTINGS)
    assert any(name.endswith("user_fn") for name in base.part("custom_code").detail)
    monkeypatch.setattr(f"{__name__}.SCALE", 3.0)
    _assert_differs(base, compute_key(gm, [x], **SETTINGS), "custom_code", "implementation changed")
    monkeypatch.undo()
    assert compute_key(gm, [x], **SETTINGS).digest == base.digest
    monkeypatch.setattr(f"{__name__}._helper", lambda t: t * 4)
    assert compute_key(gm, [x], **SETTINGS).digest != base.digest


def test_callable_digest_ignores_location_but_sees_code():
    namespace_a: dict = {}
    namespace_b: dict = {}
    exec(compile("def f(x):\n    return x + 1\n", "/some/where/a.py", "exec"), namespace_a)
    exec(compile("\n\n\ndef f(x):\n    return x + 1\n", "/else/where/b.py", "exec"), namespace_b)
    assert callable_digest(namespace_a["f"]) == callable_digest(namespace_b["f"])
    exec(compile("def f(x):\n    return x + 2\n", "/some/where/a.py", "exec"), namespace_b)
    assert callable_digest(namespace_a["f"]) != callable_digest(namespace_b["f"])


def test_dynamic_trace_key_uses_symbols_not_sizes():
    def fn(x, y):
        if x.shape[0] > 4:
            return (x * 2).sum(0) + y[: x.shape[0] // 2].sum()
        return x + 1

    keys = []
    for rows, length in ((8, 10), (12, 9)):
        x, y = torch.randn(rows, 3), torch.randn(length)
        gm = make_fx(fn, tracing_mode="symbolic")(x, y)
        keys.append(compute_key(gm, [x, y], **SETTINGS))
    assert keys[0].digest == keys[1].digest
    described = keys[0].part("inputs").detail
    assert described[0]["shape"][0] == "L['t0'].size()[0]"
    assert described[1]["shape"] == ["L['t1'].size()[0]"]


def test_dynamo_graph_with_autocast_region_is_keyed_by_its_arguments():
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    linear = torch.nn.Linear(3, 4)

    def make(dtype):
        def fn(x):
            with torch.autocast("cpu", dtype=dtype):
                out = linear(x)
            with torch.no_grad():
                extra = x * 2
            return out.float().sum() + extra.sum()
        return fn

    for dtype in (torch.bfloat16, torch.float16):
        torch._dynamo.reset()
        torch.compile(make(dtype), backend=capture)(torch.randn(2, 3))
    torch._dynamo.reset()
    (gm_bf16, inputs_bf16), (gm_fp16, inputs_fp16) = captured
    key_bf16 = compute_key(gm_bf16, inputs_bf16, **SETTINGS)
    assert key_bf16.digest == compute_key(gm_bf16, inputs_bf16, **SETTINGS).digest
    key_fp16 = compute_key(gm_fp16, inputs_fp16, **SETTINGS)
    _assert_differs(key_bf16, key_fp16, "graph", "1 node(s) differ")
    assert "torch.bfloat16" in canonical_graph(gm_bf16).text and "torch.float16" in canonical_graph(gm_fp16).text


# ----------------------------------------------------------------------------------------------------
# Parts, explanations and bad input
# ----------------------------------------------------------------------------------------------------


def test_explain_difference_with_digests_only_and_missing_parts():
    a = CacheKey((KeyPart.of("graph", "g1"), KeyPart.of("inputs", [1])))
    b = CacheKey((KeyPart.of("graph", "g2"), KeyPart.of("inputs", [1]), KeyPart.of("extra", ["x"])))
    lines = explain_difference(a.parts_digests(), b.parts_digests())
    assert lines[0] == "extra hashes: only in the second key"
    assert lines[1].startswith("graph differs (")
    assert explain_difference(a, a) == []


def test_key_parts_must_be_unique():
    with pytest.raises(ValueError, match="unique names; repeated: graph"):
        CacheKey((KeyPart.of("graph", "a"), KeyPart.of("graph", "b")))


def test_bad_options_are_rejected_clearly(tmp_path):
    x, y = inputs()
    gm = make_fx(body)(x, y)
    with pytest.raises(ValueError, match="paths must not enter the cache key"):
        compute_key(gm, [x, y], compiler_options={"output_dir": tmp_path}, **SETTINGS)
    with pytest.raises(BypassAOTAutogradCache, match="unhashable option: compiler_options.thing"):
        compute_key(gm, [x, y], compiler_options={"thing": object()}, **SETTINGS)
    with pytest.raises(TypeError, match="extra_hashes items must be str or bytes"):
        compute_key(gm, [x, y], extra_hashes=[123], **SETTINGS)
    with pytest.raises(ValueError, match="2 placeholders but 1 example inputs"):
        compute_key(gm, [x], **SETTINGS)


def test_callable_compiler_options_keyed_by_code_not_address():
    x, y = inputs()
    gm = make_fx(body)(x, y)

    def make_pass(factor):
        def graph_pass(graph):
            return factor
        return graph_pass

    first = compute_key(gm, [x, y], compiler_options={"post_grad_pass": make_pass(1)}, **SETTINGS)
    again = compute_key(gm, [x, y], compiler_options={"post_grad_pass": make_pass(1)}, **SETTINGS)
    other = compute_key(gm, [x, y], compiler_options={"post_grad_pass": make_pass(2)}, **SETTINGS)
    assert first.digest == again.digest
    assert first.digest != other.digest
