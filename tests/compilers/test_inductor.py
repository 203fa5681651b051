"""The inductor compiler: a real Inductor compile (slow), the boxed-call convention, and a fresh-process load
that reuses the carried kernel libraries instead of compiling them."""

from __future__ import annotations

import pytest
import torch

from aotcache.compilers import get_compiler, unpack_artifact
from aotcache.compilers.inductor import decompositions, inductor_compiler
from tests.compilers.graphs import REFERENCE_SOURCE, example_args, traced, with_constant
from tests.conftest import run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_and_args():
    args = example_args()
    gm = traced(with_constant, args, decompositions=decompositions())
    return inductor_compiler(gm, args, options={"max_autotune": False}), args


def test_matches_eager_and_leaves_arguments_alone(compiled_and_args):
    compiled, args = compiled_and_args
    boxed = list(args)
    got = compiled.run(boxed)
    assert len(boxed) == 2 and boxed[0] is args[0]
    for g, w in zip(got, with_constant(*args)):
        torch.testing.assert_close(g, w)
    for g, w in zip(compiled(*args), with_constant(*args)):
        torch.testing.assert_close(g, w)


def test_arguments_with_other_strides_are_restrided(compiled_and_args):
    """The wrapper asserts the example strides; an argument laid out otherwise is copied, not rejected."""
    compiled, args = compiled_and_args
    transposed = args[0].t().contiguous().t()  # same values and shape, strides (1, 4)
    assert transposed.stride() != args[0].stride()
    for g, w in zip(compiled(transposed, args[1]), with_constant(*args)):
        torch.testing.assert_close(g, w)
    assert unpack_artifact(compiled.artifact()).meta["input_layouts"] == [{"stride": [8, 1]}, {"stride": [8, 1]}]


def test_artifact_carries_wrapper_and_kernels(compiled_and_args):
    compiled, _ = compiled_and_args
    artifact = unpack_artifact(compiled.artifact())
    assert "def call(" in artifact.blobs["wrapper.py"].decode()
    assert artifact.meta["kernels"] and all(name.endswith(".so") for name in artifact.meta["kernels"])
    assert artifact.meta["constants"]  # the bias tensor
    assert get_compiler("inductor") is inductor_compiler


def test_decompositions_are_inductors():
    table = decompositions()
    assert torch.ops.aten.addmm.default not in table or callable(table[torch.ops.aten.addmm.default])
    assert len(table) > 100


def test_fresh_process_load_compiles_no_kernel(compiled_and_args, tmp_path):
    compiled, args = compiled_and_args
    artifact_path = tmp_path / "inductor.bin"
    artifact_path.write_bytes(compiled.artifact())
    torch.save(args, tmp_path / "args.pt")
    inductor_dir = tmp_path / "inductor_cache"
    proc = run_python(REFERENCE_SOURCE + f'''
import pathlib
from aotcache.compilers import load_artifact, unpack_artifact
blob = open({str(artifact_path)!r}, "rb").read()
args = torch.load({str(tmp_path / "args.pt")!r})
got = load_artifact(blob)(*args)
for g, w in zip(got, with_constant(*args)):
    torch.testing.assert_close(g, w)
def isa_probe(library):  # Inductor's own vector-ISA probes (avx512_vnni, avx512_bf16 hosts compile them)
    return any("_chk_kernel" in source.read_text() for source in library.parent.glob("*.cpp"))
libraries = sorted(p.relative_to({str(inductor_dir)!r}).as_posix()
                   for p in pathlib.Path({str(inductor_dir)!r}).rglob("*.so") if not isa_probe(p))
assert libraries == sorted(unpack_artifact(blob).meta["kernels"]), libraries
print("no kernel compiled")
''', env={"TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)})
    assert "no kernel compiled" in proc.stdout


def test_graph_without_compute_falls_back_to_the_nop_artifact():
    """Inductor hands back the graph itself when there is nothing to generate (a view of the input)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import aotcache
    from aotcache.compilers import load_artifact

    compiled = aotcache.aot_function(lambda t: t.view(-1), fw_compiler="inductor", cache=False)
    x = torch.randn(3, 4, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, x.view(-1))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 4))
    graph = inductor_compiler(make_fx(lambda t: t)(torch.randn(3, 4)), [torch.randn(3, 4)])
    assert unpack_artifact(graph.artifact()).compiler == "nop"
    torch.testing.assert_close(load_artifact(graph.artifact())(torch.ones(3, 4))[0], torch.ones(3, 4))


def test_graphs_with_unlowerable_random_ops_are_compiled_once_with_fallback_random():
    """NOTE [Random ops run ATen's kernels]: a graph holding rand/randn (Inductor's table makes them of
    randn_like and bernoulli) is compiled with fallback_random at once: one Inductor compile, not a failed
    lowering and a second compile; dropout on the CPU (bernoulli.p, which Inductor lowers) keeps Inductor's."""
    import torch.nn.functional as F
    from torch._dynamo.utils import compilation_time_metrics

    from aotcache.compilers.inductor import unlowered_random_node

    x = torch.randn(4, 8)
    noisy = traced(lambda t: t * torch.randn_like(t), [x], decompositions=decompositions())
    assert str(unlowered_random_node(noisy).target) == "aten.randn.default"
    dropout = traced(lambda t: F.dropout(t, 0.5, training=True), [x], decompositions=decompositions())
    assert unlowered_random_node(dropout) is None
    before = len(compilation_time_metrics.get("compile_fx_inner", []))
    compiled = inductor_compiler(noisy, [x])
    assert len(compilation_time_metrics.get("compile_fx_inner", [])) - before == 1
    torch.manual_seed(5)
    expected = x * torch.randn_like(x)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x)[0], expected)  # ATen's kernels: eager's values


def test_warm_up_starts_no_worker_pool_for_cpu_graphs():
    """NOTE [warming the compile workers]: only graphs with GPU inputs warm Inductor's worker pool (CPU kernels
    compile in threads); fake CUDA inputs are recognized without a GPU."""
    from torch._inductor.async_compile import AsyncCompile
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aotcache.compilers.inductor import runs_on_gpu, warm_up

    pools_before = AsyncCompile.process_pool.cache_info().currsize
    assert warm_up([torch.randn(2), 3]) is False
    assert AsyncCompile.process_pool.cache_info().currsize == pools_before
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = torch.empty(2, device="cuda")
    assert runs_on_gpu([torch.randn(2), on_gpu]) and not runs_on_gpu([torch.randn(2)])


@pytest.mark.parametrize("damage", [b"garbage" * 10, b"x"])
def test_damaged_constants_blob_is_an_artifact_error(damage):
    """A constants blob that is not a checkpoint (torch.load raises UnpicklingError) is a load error the cache
    counts as a miss, not an escaping exception."""
    from aotcache.compilers import ArtifactError, aoti_lib
    from aotcache.compilers.base import Artifact
    from aotcache.compilers.inductor import _CONSTANTS_BLOB, load

    meta = {"identity": aoti_lib.host_identity("cpu"), "constants": True, "kernels": []}
    artifact = Artifact("inductor", meta=meta, blobs={"wrapper.py": b"", _CONSTANTS_BLOB: damage})
    with pytest.raises(ArtifactError, match="incomplete"):
        load(artifact)
