"""aotcache on a CUDA GPU: every compiler trains correctly, AOTInductor and Inductor entries load in a fresh
process with empty Inductor and Triton caches and compile nothing, a graph for cuda:0 never runs on cuda:1's
data, bf16 autocast training is cached and matches eager.

Skipped without a GPU (CI has none); ``bench/device_check.sh`` runs them on the GPU machine.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import aotcache
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.compilers import unpack_artifact
from tests.conftest import run_python

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")]



def block(x, w):
    return (torch.nn.functional.gelu(x @ w) * x.sum(dim=1, keepdim=True)).softmax(dim=-1)


GRAPH_SOURCE = "import torch\n" + inspect.getsource(block)  # the same function in fresh processes


def example(device="cuda"):
    torch.manual_seed(0)
    return [torch.randn(64, 128, device=device), torch.randn(128, 128, device=device)]


def traced_block(args, decompositions=None):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(block, tracing_mode="fake", decomposition_table=decompositions)(*args)


def fresh_process_load(tmp_path, artifact: bytes, args) -> dict:
    """Load ``artifact`` in a new process with empty Inductor and Triton caches; what it saw, as JSON."""
    (tmp_path / "artifact.bin").write_bytes(artifact)
    torch.save([a.cpu() for a in args], tmp_path / "args.pt")
    triton_dir = tmp_path / "fresh_triton"
    proc = run_python(GRAPH_SOURCE + f'''
import json, os, sys
from aotcache.compilers import load_artifact
args = [a.cuda() for a in torch.load({str(tmp_path / "args.pt")!r})]
loaded = load_artifact(open({str(tmp_path / "artifact.bin")!r}, "rb").read())
got = loaded(*args)
torch.testing.assert_close(got[0], block(*args), rtol=1e-4, atol=1e-4)
torch.cuda.synchronize()
triton = {str(triton_dir)!r}
print(json.dumps({{"inductor_imported": "torch._inductor" in sys.modules,
                   "triton_dirs": sorted(os.listdir(triton)) if os.path.isdir(triton) else []}}))
''', env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh_inductor"), "TRITON_CACHE_DIR": str(triton_dir),
          "AOTCACHE_CACHE_DIR": str(tmp_path / "fresh_aotcache")})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aoti_on_cuda_carries_its_kernels_and_loads_without_inductor(tmp_path):
    from aotcache.compilers.aoti import aoti_compiler

    args = example()
    compiled = aoti_compiler(traced_block(args), args)
    torch.testing.assert_close(compiled(*args)[0], block(*args), rtol=1e-4, atol=1e-4)
    artifact = compiled.artifact()
    meta = unpack_artifact(artifact).meta
    assert meta["device"].startswith("cuda:")
    seen = fresh_process_load(tmp_path, artifact, args)
    assert not seen["inductor_imported"]
    print("aoti side files:", sorted(meta.get("files", {})))


def test_inductor_on_cuda_warm_start_compiles_no_kernel(tmp_path):
    """Empty Inductor and Triton caches: the carried kernels are written back and nothing else is compiled
    (Triton's cache holds exactly the carried kernel directories after the first call)."""
    from aotcache.compilers.inductor import decompositions, inductor_compiler

    args = example()
    compiled = inductor_compiler(traced_block(args, decompositions()), args)
    artifact = compiled.artifact()
    carried = sorted(record["hash"] for record in unpack_artifact(artifact).meta.get("triton", []))
    assert carried, "the inductor artifact of a CUDA graph carries no Triton kernel"
    seen = fresh_process_load(tmp_path, artifact, args)
    assert seen["triton_dirs"] == carried


def test_a_cold_cuda_compile_starts_inductors_worker_pool_before_inductor_runs(tmp_path):
    """NOTE [warming the compile workers]: in a fresh process, the pool that compiles Triton kernels exists
    when Inductor's first compile starts (it used to be started by the first kernel, so the first graph's
    kernels compiled one by one in this process); the compiled training step still matches eager."""
    proc = run_python(GRAPH_SOURCE + '''
import json
import torch._inductor.compile_fx as compile_fx
from torch._inductor.async_compile import AsyncCompile
from torch._dynamo.utils import compilation_time_metrics
import aotcache

pools_at_compile = []
original = compile_fx.compile_fx_inner
def observed(*args, **kwargs):
    pools_at_compile.append(AsyncCompile.process_pool.cache_info().currsize)
    return original(*args, **kwargs)
compile_fx.compile_fx_inner = observed
x = torch.randn(64, 128, device="cuda", requires_grad=True)
w = torch.randn(128, 128, device="cuda", requires_grad=True)
compiled = aotcache.aot_function(block, "inductor")
compiled(x, w).sum().backward()
grads = [x.grad.clone(), w.grad.clone()]
x.grad = w.grad = None
block(x, w).sum().backward()
torch.testing.assert_close(grads, [x.grad, w.grad], rtol=1e-4, atol=1e-4)
print(json.dumps({"pools_at_compile": pools_at_compile,
                  "serial_triton_compiles": len(compilation_time_metrics.get("async_compile.precompile", []))}))
''', env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
          "AOTCACHE_CACHE_DIR": str(tmp_path / "aotcache")})
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    print("cold cuda compile:", seen)
    assert seen["pools_at_compile"] and seen["pools_at_compile"][0] == 1


@pytest.mark.parametrize("compiler", ["nop", "inductor", "aoti"])
def test_training_on_cuda_matches_eager_and_is_cached(compiler):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 8)).cuda()
    x = torch.randn(16, 32, device="cuda")
    want = model(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    for attempt in range(2):  # the second cache instance loads the entry from disk
        model.zero_grad()
        cache = AOTAutogradCache()
        got = aotcache.aot_module(model, fw_compiler=compiler, cache=cache)(x)
        got.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)
        assert cache.stats()["hit" if attempt else "saved"] == 1, cache.stats()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("compiler", ["inductor", "aoti"])
def test_graph_compiled_for_cuda0_runs_correctly_on_cuda1(compiler):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
    for device in ("cuda:0", "cuda:1"):
        moved = model.to(device)
        x = torch.randn(4, 16, device=device)
        got = aotcache.aot_module(moved, fw_compiler=compiler)(x)
        assert got.device == torch.device(device)
        torch.testing.assert_close(got, moved(x))
        torch.cuda.synchronize(device)


def test_bf16_autocast_training_on_cuda_is_cached_and_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).cuda()
    x = torch.randn(32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(x)
    want.float().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    for attempt in range(2):
        model.zero_grad()
        cache = AOTAutogradCache()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = aotcache.aot_module(model, fw_compiler="inductor", cache=cache)(x)
        got.float().sum().backward()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=2e-2)
        assert cache.stats()["hit" if attempt else "saved"] == 1, cache.stats()
