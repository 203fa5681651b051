"""The private PyTorch names aotcache uses (docs/compat.md): each resolves in the installed torch, and each
optional one, when missing, degrades to its documented fallback instead of failing the job.

The presence checks take a few seconds (they import Inductor), so they are worth running first on a machine
with another torch (the GPU machine has 2.11): ``pytest -q tests/test_torch_compat.py``. A missing optional
name is reported as a skip naming its fallback (``-rs``), a missing required one fails.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

# (module, attribute path) that aotcache cannot work without (the compile or capture path needs them).
REQUIRED = [
    ("torch._inductor.compile_fx", "compile_fx_inner"),
    ("torch._inductor.virtualized", "V.set_fake_mode"),
    ("torch._inductor.codecache", "PyCodeCache.write"),
    ("torch._inductor.codecache", "PyCodeCache.load_by_key_path"),
    ("torch._inductor.async_compile", "AsyncCompile.warm_pool"),
    ("torch._inductor.async_compile", "AsyncCompile.wakeup"),
    ("torch._inductor.async_compile", "AsyncCompile.process_pool"),
    ("torch._inductor.decomposition", "select_decomp_table"),
    ("torch._inductor.cpu_vec_isa", "pick_vec_isa"),
    ("torch._inductor.cpp_builder", "get_cpp_compiler"),
    ("torch._inductor", "aot_compile"),
    ("torch._inductor.lowering", ""),
    ("torch._guards", "TracingContext.report_output_strides"),
    ("torch._guards", "tracing"),
    ("torch._guards", "detect_fake_mode"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode.from_tensor"),
    ("torch._subclasses.fake_tensor", "FakeTensor"),
    ("torch._subclasses.fake_tensor", "is_fake"),
    ("torch._subclasses.fake_tensor", "DataDependentOutputException"),
    ("torch._subclasses.fake_tensor", "DynamicOutputShapeException"),
    ("torch._subclasses.functional_tensor", "FunctionalTensor.to_functional"),
    ("torch._subclasses.functional_tensor", "FunctionalTensorMode"),
    ("torch._dynamo.source", "ConstantSource"),
    ("torch._dynamo.exc", "TorchDynamoException"),
    ("torch._dynamo", "is_dynamo_supported"),
    ("torch._dynamo", "optimize"),
    ("torch._prims_common", "suggest_memory_format"),
    ("torch._dispatch.python", "enable_python_dispatcher"),
    ("torch._library", "custom_ops"),
    ("torch._ops", "OpOverload"),
    ("torch._ops", "OpOverloadPacket"),
    ("torch._ops", "HigherOrderOperator"),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.produce_guards_expression"),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression"),
    ("torch.fx.experimental.symbolic_shapes", "DimDynamic.DYNAMIC"),
    ("torch.fx.experimental.symbolic_shapes", "StatelessSymbolicContext"),
    ("torch.fx.experimental.symbolic_shapes", "statically_known_true"),
    ("torch.fx.experimental.symbolic_shapes", "GuardOnDataDependentSymNode"),
    ("torch.fx.experimental.proxy_tensor", "make_fx"),
    ("torch.fx.experimental.proxy_tensor", "get_proxy_mode"),
    ("torch.fx.passes.fake_tensor_prop", "FakeTensorProp.propagate_dont_convert_inputs"),
    ("torch.utils._pytree", "treespec_dumps"),
    ("torch.utils._pytree", "tree_flatten_with_path"),
    ("torch.utils._pytree", "register_pytree_node"),
    ("torch.utils._pytree", "SUPPORTED_SERIALIZED_TYPES"),
    ("torch", "_sync"),
    ("torch", "_from_functional_tensor"),
    ("torch", "_functionalize_has_data_mutation"),
    ("torch", "_functionalize_has_metadata_mutation"),
    ("torch._C", "_ExcludeDispatchKeyGuard"),
    ("torch._C", "_dispatch_keys"),
    ("torch._C", "_dispatch_has_kernel_for_dispatch_key"),
    ("torch._C", "_functorch.is_functorch_wrapped_tensor"),
    ("torch._C", "_aoti.AOTIModelContainerRunnerCpu"),
    ("torch._C", "_aoti.AOTIModelContainerRunnerCuda"),
    ("torch._C", "_push_on_torch_function_stack"),
    ("torch._C", "_pop_torch_function_stack"),
    ("torch._C", "_get_function_stack_at"),
    ("torch._C", "_autograd._get_creation_meta"),
    ("torch._C", "_autograd.CreationMeta.NO_GRAD_MODE"),
    ("torch.autograd.function", "BackwardCFunction"),
]

# (module, attribute path, what aotcache does without it): each use is feature-detected.
OPTIONAL = [
    ("torch._inductor.triton_bundler", "TritonBundler.read_and_emit", "inductor entries carry no Triton kernels"),
    ("torch._inductor.async_compile", "maybe_warm_pool", "AsyncCompile.warm_pool() + wakeup() by hand"),
    ("torch._inductor.runtime.cache_dir_utils", "cache_dir", "torch._inductor.runtime.runtime_utils.cache_dir"),
    ("torch.fx.experimental.proxy_tensor", "maybe_enable_thunkify", "size arithmetic recorded eagerly"),
    ("torch._subclasses.fake_tensor", "disable_fake_tensor_cache", "symbolic traces keep the fake-tensor cache"),
    ("torch._dynamo.symbolic_convert", "TensorifyState.specialize", "the capture refuses .item() (fallback)"),
    ("torch._dynamo.exc", "TensorifyScalarRestartAnalysis", "the capture refuses .item() (fallback)"),
    ("torch._library.effects", "EffectType", "torch._higher_order_ops.effects._EffectType, else no tokens"),
    ("torch._library.custom_ops", "CustomOpDef", "custom ops are not hashed by definition"),
    ("torch.compiler", "_is_compiling_flag", "is_compiling() stays False during capture"),
    ("torch.fx._symbolic_trace", "_is_fx_tracing_flag", "is_fx_tracing() answers as torch's tracer set it"),
    ("torch._dynamo.eval_frame", "_stance.stance", "aotcache.compile ignores torch.compiler.set_stance"),
    ("torch._dynamo.eval_frame", "_callback_from_stance",
     "a torch.compile-d callable inside a capture is compiled by Dynamo on the capture's fake tensors"),
    ("torch._higher_order_ops.utils", "_in_hop_compile",
     "a torch.compile-d callable inside a capture is compiled by Dynamo on the capture's fake tensors"),
    ("torch._dynamo.eval_frame", "set_fullgraph_compiled_frame_count",
     "nothing to excuse: Dynamo's fullgraph wrapper does not count frames"),
    ("torch.library", "_defs", "ops of low-level Libraries bypass the cache"),
    ("torch._C", "_dynamo.guards.dict_version", "the exact module-state comparison on every call"),
    ("torch._C", "_dynamo.guards.TensorGuards", "the hot paths compare tensor metadata in Python"),
    ("torch._C", "_len_torch_function_stack", "fingerprint warm starts are declined (Untrusted)"),
    ("torch._C", "_DisableAutocast", "contextlib.nullcontext"),
    ("torch._C", "_get_fp32_precision_getter", "fp32-precision flags left out of the numerics signature"),
    ("torch._C", "_dispatch_get_computed_kernel_for_dispatch_key", "eager dispatch refuses with a clear error"),
    ("torch", "_functionalize_was_storage_changed", "storage replacement detected by storage identity"),
    ("torch._higher_order_ops.effects", "has_effects", "symbolic captures always trace with functionalization"),
    ("torch._higher_order_ops.wrap", "TagActivationCheckpoint.divide_kwargs",
     "checkpointed regions go through torch's implementation (regions writing in place run eagerly)"),
    ("torch.fx.experimental.symbolic_shapes", "guard_scalar",
     "dynamic=True: a float read in a checkpointed region stays refused as data-dependent (its graph runs eagerly)"),
    ("torch.utils.checkpoint", "_CachingTorchDispatchMode",
     "selective-checkpoint regions go through torch's implementation (regions writing in place run eagerly)"),
    ("torch.utils._python_dispatch", "TorchDispatchMode.supports_higher_order_operators",
     "symbolic captures always trace with functionalization"),
    ("torch._C._functionalization", "get_view_meta_sequence",
     "a view of an input the function mutates is refused (the call runs eagerly)"),
    ("torch._C._functionalization", "apply_view_meta_sequence",
     "a view of an input the function mutates is refused (the call runs eagerly)"),
    ("torch.utils._python_dispatch", "TorchDispatchMode.is_infra_mode",
     "Dynamo may skip torch.cond's wrapper met by a symbolic capture (the capture then falls back)"),
    ("torch._dynamo.compiled_autograd", "Op", "compiled autograd's backward graphs bypass the cache"),
    ("torch._dynamo.compiled_autograd", "ops", "compiled autograd's backward graphs bypass the cache"),
    ("torch._C", "_functions.AccumulateGrad", "compiled autograd's backward graphs bypass the cache"),
    ("torch._C", "_get_dispatch_stack_at", "an interrupted capture leaves torch's modes as torch left them"),
    ("torch._C", "_pop_torch_dispatch_stack", "an interrupted capture leaves torch's modes as torch left them"),
    ("torch.utils._python_dispatch", "_is_in_torch_dispatch_mode", "an interrupted capture leaves the flag as is"),
    ("torch.utils._python_dispatch", "_is_in_non_infra_torch_dispatch_mode",
     "an interrupted capture leaves the flag as is"),
    ("torch.utils._python_dispatch", "_is_in_any_mode_without_ignore_compile_internals",
     "an interrupted capture leaves the flag as is"),
    ("torch._C", "_ensureCUDADeviceGuardSet", "nothing installed early (FakeTensorMode would not call it either)"),
    ("torch._functorch._aot_autograd.runtime_wrappers", "mark_dynamo_propagated_dynamic_indices",
     "dynamic outputs stamped with _dynamo_weak_dynamic_indices, as torch 2.11's own runtime does"),
]

# torch._inductor.config keys aotcache sets or reads (patch() raises on an unknown key).
INDUCTOR_CONFIG = ["fx_graph_cache", "fx_graph_remote_cache", "fallback_random", "compile_threads",
                   "bundle_triton_into_fx_graph_cache", "force_disable_caches", "cpp.vec_isa_ok", "max_autotune",
                   "coordinate_descent_tuning", "triton.cudagraphs", "aot_inductor.package",
                   "aot_inductor.package_constants_in_so", "aot_inductor.force_mmap_weights",
                   "aot_inductor.output_path", "aot_inductor.metadata"]
OPTIONAL_INDUCTOR_CONFIG = {"aot_inductor.embed_kernel_binary": "GPU kernel binaries carried as side files"}


def _resolve(module: str, path: str) -> object:
    value: object = importlib.import_module(module)
    for part in path.split(".") if path else []:
        value = getattr(value, part)
    return value


_NO_CUDA_RUNNER = pytest.mark.skipif(torch.version.cuda is None,
                                     reason=f"a CPU build of torch ({torch.__version__}) has no CUDA runner")


@pytest.mark.parametrize(("module", "path"), [
    pytest.param(m, p, id=f"{m}:{p}", marks=[_NO_CUDA_RUNNER] if p.endswith("Cuda") else []) for m, p in REQUIRED])
def test_required_private_name_exists(module, path):
    _resolve(module, path)


@pytest.mark.parametrize(("module", "path", "fallback"), OPTIONAL, ids=[f"{m}:{p}" for m, p, _ in OPTIONAL])
def test_optional_private_name(module, path, fallback):
    try:
        _resolve(module, path)
    except (ImportError, AttributeError):
        pytest.skip(f"torch {torch.__version__} lacks {module}.{path}: {fallback}")


def test_inductor_config_keys():
    from torch._inductor import config as inductor_config

    from aotcache.compilers.aoti_lib import _has_inductor_option

    missing = [key for key in INDUCTOR_CONFIG if not _has_inductor_option(inductor_config, key)]
    assert not missing, f"torch {torch.__version__} lacks Inductor options {missing} (see docs/compat.md)"
    for key, fallback in OPTIONAL_INDUCTOR_CONFIG.items():
        if not _has_inductor_option(inductor_config, key):
            pytest.skip(f"torch {torch.__version__} lacks Inductor option {key}: {fallback}")


def test_functorch_bundled_autograd_cache_is_off():
    """Inductor begins its own Triton bundle under it; our collection steps aside then (triton_kernels.py)."""
    from torch._functorch import config as functorch_config

    assert getattr(functorch_config, "bundled_autograd_cache", False) is False


# ----------------------------------------------------------------------------------------------------------
# Faults: an optional name missing degrades (the monkeypatch removes the name, as an older or newer torch would)
# ----------------------------------------------------------------------------------------------------------


def _dynamic_fn(x, w):
    return (x @ w).relu().sum(dim=0) * x.shape[0]


def _check_captured(compiled, *args):
    expected = _dynamic_fn(*args)
    torch.testing.assert_close(compiled(*args), expected)


def test_capture_without_thunkify(monkeypatch):
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    import aotcache

    monkeypatch.delattr(proxy_tensor, "maybe_enable_thunkify")
    compiled = aotcache.aot_function(_dynamic_fn, "nop", dynamic=True, cache=False, on_capture_error="raise")
    _check_captured(compiled, torch.randn(4, 3), torch.randn(3, 5))
    _check_captured(compiled, torch.randn(6, 3), torch.randn(3, 5))  # the symbolic graph, reused


def test_capture_without_disable_fake_tensor_cache(monkeypatch):
    import torch._subclasses.fake_tensor as fake_tensor

    import aotcache

    monkeypatch.delattr(fake_tensor, "disable_fake_tensor_cache")
    compiled = aotcache.aot_function(_dynamic_fn, "nop", dynamic=True, cache=False, on_capture_error="raise")
    _check_captured(compiled, torch.randn(4, 3), torch.randn(3, 5))
    _check_captured(compiled, torch.randn(6, 3), torch.randn(3, 5))  # the symbolic graph, reused
    assert compiled.num_compiles == 1


def test_capture_without_is_compiling_flag(monkeypatch):
    import aotcache

    monkeypatch.delattr(torch.compiler, "_is_compiling_flag")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)  # a torch that keeps the state elsewhere
    seen = []

    def fn(x):
        seen.append(torch.compiler.is_compiling())
        return x.sin() + 1

    compiled = aotcache.aot_function(fn, "nop", cache=False, on_capture_error="raise")
    x = torch.randn(3)
    torch.testing.assert_close(compiled(x), x.sin() + 1)
    assert seen and not any(seen)  # nothing to set: the capture still ran, is_compiling() stayed False


def test_no_fx_tracing_flag_sets_nothing_aside(monkeypatch):
    # torch's own tracer reads the module global, so a capture cannot run with it deleted: the guard is checked alone
    import torch.fx._symbolic_trace as symbolic_trace

    from aotcache.aot.trace_environment import fx_tracing_flag_off

    monkeypatch.delattr(symbolic_trace, "_is_fx_tracing_flag")
    with fx_tracing_flag_off():
        assert not hasattr(symbolic_trace, "_is_fx_tracing_flag")
    assert not hasattr(symbolic_trace, "_is_fx_tracing_flag")


def test_no_effect_types(monkeypatch):
    import torch._higher_order_ops.effects as hop_effects
    import torch._library.effects as library_effects

    from aotcache.aot.functional_trace import all_effect_types

    assert all_effect_types()  # this torch has them
    monkeypatch.delattr(library_effects, "EffectType")
    assert all_effect_types() == list(hop_effects._EffectType)  # the older home
    monkeypatch.delattr(hop_effects, "_EffectType")
    assert all_effect_types() == []


def test_no_dict_version(monkeypatch):
    from torch._C._dynamo import guards

    from aotcache.aot import hot_path

    assert hot_path._probe_dict_version() is not None
    monkeypatch.delattr(guards, "dict_version")
    assert hot_path._probe_dict_version() is None  # every call compares exactly instead


def test_no_tensor_guards(monkeypatch):
    from torch._C._dynamo import guards

    from aotcache.aot import tensor_metadata
    from aotcache.aot.hot_path import HotSignature

    tensor_metadata._c_tensor_guards.cache_clear()
    try:
        assert tensor_metadata._c_tensor_guards() is not None
        monkeypatch.delattr(guards, "TensorGuards")
        tensor_metadata._c_tensor_guards.cache_clear()
        assert tensor_metadata._c_tensor_guards() is None
        hot = HotSignature([torch.randn(2, 3)], dynamic=False, runtime=None)
        assert hot._metadata is None  # the Python comparison: the same fields
        assert hot.matches([torch.randn(2, 3)]) and not hot.matches([torch.randn(3, 2)])
    finally:
        tensor_metadata._c_tensor_guards.cache_clear()


def test_no_mode_stack_lengths_declines_fingerprint(monkeypatch):
    from aotcache.autograd_cache import fingerprint
    from aotcache.autograd_cache.digests import Untrusted

    fingerprint._check_no_active_modes()
    monkeypatch.delattr(torch._C, "_len_torch_function_stack")
    with pytest.raises(Untrusted, match="cannot inspect torch modes"):
        fingerprint._check_no_active_modes()


def test_no_tensorify_state_refuses_instead(monkeypatch):
    import torch._dynamo.symbolic_convert as symbolic_convert
    import torch._subclasses.fake_tensor as fake_tensor
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from aotcache.aot import dynamo_graph

    class StandInSymFloat:  # Dynamo's unspecialized float: a SymFloat memo with a symbol name
        node = types.SimpleNamespace(_expr=types.SimpleNamespace(name="zf_aotcache_compat_test"))

    class StandInFake:
        item_memo = StandInSymFloat()

    monkeypatch.setattr(torch, "SymFloat", StandInSymFloat)
    monkeypatch.setattr(fake_tensor, "FakeTensor", StandInFake)
    graph = torch.fx.Graph()
    graph.placeholder("eps").meta["example_value"] = StandInFake()
    gm = types.SimpleNamespace(graph=graph)
    state = symbolic_convert.TensorifyState
    try:
        with pytest.raises(TensorifyScalarRestartAnalysis):  # with the API: Dynamo is asked to restart
            dynamo_graph._specialize_unspecialized_floats(gm)
    finally:
        state.force_specializations.discard("zf_aotcache_compat_test")
    monkeypatch.delattr(symbolic_convert, "TensorifyState")
    dynamo_graph._specialize_unspecialized_floats(gm)  # without it: returns, and the capture refuses the .item()


def test_warm_up_without_maybe_warm_pool(monkeypatch):
    from torch._inductor import async_compile

    from aotcache.compilers import inductor

    calls = []
    monkeypatch.setattr(inductor, "runs_on_gpu", lambda inputs: True)
    monkeypatch.delattr(async_compile, "maybe_warm_pool")
    monkeypatch.setattr(async_compile.AsyncCompile, "warm_pool", staticmethod(lambda: calls.append("warm_pool")))
    monkeypatch.setattr(async_compile.AsyncCompile, "wakeup", staticmethod(lambda: calls.append("wakeup")))
    assert inductor.warm_up([]) is True
    assert calls == ["warm_pool", "wakeup"]

    def broken() -> None:
        raise RuntimeError("no pool here")

    monkeypatch.setattr(async_compile.AsyncCompile, "warm_pool", staticmethod(broken))
    assert inductor.warm_up([]) is False  # logged once; Inductor compiles in-process


def test_no_embed_option_means_side_files():
    from aotcache.compilers.aoti_lib import _GPU_EMBED_OPTION, _has_inductor_option

    older = types.SimpleNamespace(aot_inductor=types.SimpleNamespace(package=False))
    assert not _has_inductor_option(older, _GPU_EMBED_OPTION)
    newer = types.SimpleNamespace(aot_inductor=types.SimpleNamespace(embed_kernel_binary=None))
    assert _has_inductor_option(newer, _GPU_EMBED_OPTION)


def test_no_computed_kernel_getter_is_a_clear_error(monkeypatch):
    from aotcache.eager import dispatch

    monkeypatch.delattr(torch._C, "_dispatch_get_computed_kernel_for_dispatch_key")
    with pytest.raises(RuntimeError, match="_dispatch_get_computed_kernel_for_dispatch_key"):
        dispatch._original_kernel(torch.ops.aten.add.Tensor)


def test_cache_dir_falls_back_to_runtime_utils(monkeypatch):
    import torch._inductor.runtime.cache_dir_utils  # noqa: F401
    from torch._inductor.runtime import runtime_utils

    from aotcache.compilers import inductor

    expected = inductor._inductor_cache_dir()
    monkeypatch.setitem(sys.modules, "torch._inductor.runtime.cache_dir_utils", None)  # import raises
    with pytest.raises(ImportError):
        importlib.import_module("torch._inductor.runtime.cache_dir_utils")
    assert callable(runtime_utils.cache_dir)
    assert inductor._inductor_cache_dir() == expected


def test_no_triton_bundler(monkeypatch):
    from aotcache.compilers import ArtifactError, triton_kernels

    monkeypatch.setitem(sys.modules, "torch._inductor.triton_bundler", None)  # import raises
    with triton_kernels.collecting(enabled=True) as found:
        pass
    assert not found  # nothing collected: loading compiles the kernels as before
    carried = triton_kernels.TritonKernels([("H" * 32, 0, {"k.cubin": b"\x7fELF"})])
    with pytest.raises(ArtifactError, match="no TritonBundler"):  # the artifact is refused (a miss), no crash
        triton_kernels.restore(carried)
