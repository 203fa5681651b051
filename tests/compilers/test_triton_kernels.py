"""Triton kernels carried in inductor artifacts (NOTE [inductor artifacts carry Triton kernels]): record,
verification and restore into Triton's cache, with synthetic kernel files (CI has no GPU; the real thing is
in test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from aotcache.compilers import ArtifactError, load_artifact, pack_artifact, triton_kernels, unpack_artifact
from aotcache.compilers.triton_kernels import TritonKernels

HASH = "QWERTYUIOPASDFGHJKLZXCVBNM234567"


def synthetic() -> TritonKernels:
    return TritonKernels([(HASH, 0, {"triton_poi_fused_add_0.cubin": b"\x7fELF cubin",
                                     "triton_poi_fused_add_0.json": b'{"name": "x", "path": "[REPLACE]/k"}',
                                     "__grp__triton_poi_fused_add_0.json": b'{"child_paths": {}}'})])


def test_record_round_trip_and_verification():
    meta, blobs = triton_kernels.to_artifact(synthetic())
    assert meta[0]["hash"] == HASH and len(blobs) == 3
    assert triton_kernels.from_artifact(meta, blobs).kernels == synthetic().kernels
    assert not triton_kernels.from_artifact(None, {})
    corrupt = {**blobs, f"triton:{HASH}/triton_poi_fused_add_0.cubin": b"\x7fELF other"}
    with pytest.raises(ArtifactError, match="sha256"):
        triton_kernels.from_artifact(meta, corrupt)
    missing = {name: data for name, data in blobs.items() if not name.endswith(".cubin")}
    with pytest.raises(ArtifactError, match="missing"):
        triton_kernels.from_artifact(meta, missing)
    with pytest.raises(ArtifactError, match="malformed"):
        triton_kernels.from_artifact([{"hash": HASH}], blobs)
    with pytest.raises(ArtifactError, match="unsafe"):
        triton_kernels.from_artifact([{"hash": "..", "device": 0, "files": {"x.cubin": "0"}}], blobs)


def test_restore_writes_triton_cache_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert triton_kernels.restore(synthetic()) == 1
    directory = tmp_path / "triton" / HASH
    files = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert files["triton_poi_fused_add_0.cubin"] == b"\x7fELF cubin"
    assert str(directory).encode() in files["triton_poi_fused_add_0.json"]  # absolute paths restored
    (directory / "triton_poi_fused_add_0.cubin").write_bytes(b"kept")  # an existing directory is left alone
    triton_kernels.restore(synthetic())
    assert (directory / "triton_poi_fused_add_0.cubin").read_bytes() == b"kept"


def test_collecting_without_gpu_kernels_is_empty():
    with triton_kernels.collecting(enabled=True) as found:
        pass
    assert not found
    with triton_kernels.collecting(enabled=False) as found:
        pass
    assert not found


@pytest.mark.slow
def test_inductor_artifact_restores_its_triton_kernels_at_load(tmp_path, monkeypatch):
    """The load path: carried kernels are checked and written to Triton's cache before the wrapper loads;
    a corrupt one makes the artifact refused (a cache miss), not a crash."""
    from aotcache.compilers.inductor import decompositions, inductor_compiler
    from tests.compilers.graphs import example_args, traced, with_constant

    args = example_args()
    compiled = inductor_compiler(traced(with_constant, args, decompositions=decompositions()), args)
    artifact = unpack_artifact(compiled.artifact())
    assert "triton" not in artifact.meta  # a CPU graph has no Triton kernels
    artifact.meta["triton"], blobs = triton_kernels.to_artifact(synthetic())
    artifact.blobs.update(blobs)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    loaded = load_artifact(pack_artifact(artifact))
    for got, want in zip(loaded(*args), with_constant(*args)):
        torch.testing.assert_close(got, want)
    assert (tmp_path / "triton" / HASH / "triton_poi_fused_add_0.cubin").read_bytes() == b"\x7fELF cubin"
    assert unpack_artifact(loaded.artifact()).meta["triton"] == artifact.meta["triton"]  # carried on
    artifact.blobs[f"triton:{HASH}/triton_poi_fused_add_0.cubin"] = b"corrupt"
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(pack_artifact(artifact))


@pytest.mark.slow
def test_collecting_around_a_real_inductor_compile(monkeypatch):
    """The bundler's begin/collect around ``compile_fx_inner`` (forced on for a CPU graph: no Triton kernels)
    neither fails the compile nor leaves a bundle open; under torch's own bundling it stays out of the way."""
    from torch._inductor.triton_bundler import TritonBundler

    from aotcache.compilers import inductor
    from tests.compilers.graphs import example_args, traced, with_constant

    real = triton_kernels.collecting
    seen = []

    def forced(enabled=True):
        seen.append(enabled)
        return real(enabled=True)

    monkeypatch.setattr(triton_kernels, "collecting", forced)
    args = example_args()
    compiled = inductor.inductor_compiler(traced(with_constant, args, decompositions=inductor.decompositions()),
                                          args)
    assert seen == [False] and TritonBundler._entries is None
    assert "triton" not in unpack_artifact(compiled.artifact()).meta
    for got, want in zip(compiled(*args), with_constant(*args)):
        torch.testing.assert_close(got, want)
    from torch._functorch import config as functorch_config

    with functorch_config.patch(bundled_autograd_cache=True), real(enabled=True) as found:
        assert TritonBundler._entries is None  # Inductor's own bundle would begin here
    assert not found


def test_collecting_keeps_every_config_when_some_were_marked_winners(tmp_path, monkeypatch):
    """NOTE [every autotuning config is carried]: a kernel marked as an autotuning winner during the compile
    (torch >= 2.13 bundles only winners then) does not drop the graph's other kernels from the entry."""
    from torch._inductor.triton_bundler import TritonBundler

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for kernel_hash in ("WINNER", "OTHER"):
        (tmp_path / kernel_hash).mkdir()
        (tmp_path / kernel_hash / "k.cubin").write_bytes(kernel_hash.encode())
    from torch._inductor import config as inductor_config

    # as inside our compile, which turns Inductor's own FX graph cache off (else Inductor bundles itself)
    with inductor_config.patch(fx_graph_cache=False), triton_kernels.collecting(enabled=True) as found:
        TritonBundler.put("WINNER", 0)
        TritonBundler.put("OTHER", 0)
        marked = getattr(TritonBundler, "put_winner", None)
        if marked is not None:
            marked("WINNER")
    assert sorted(kernel_hash for kernel_hash, _, _ in found.kernels) == ["OTHER", "WINNER"]
    assert dict(found.kernels[0][2]) in ({"k.cubin": b"WINNER"}, {"k.cubin": b"OTHER"})
    assert TritonBundler._entries is None


def test_collecting_steps_aside_for_inductors_fx_graph_cache(monkeypatch):
    """A user's ``fx_graph_cache=True`` makes ``compile_fx_inner`` open its own bundle on a cache miss: ours
    stays closed (no assertion, no fallback), and the kernels come from the compiled graph's own bundle."""
    from torch._inductor import config as inductor_config
    from torch._inductor.triton_bundler import TritonBundler

    from aotcache.compilers import inductor
    from tests.compilers.graphs import example_args, traced, with_constant

    real = triton_kernels.collecting
    monkeypatch.setattr(triton_kernels, "collecting", lambda enabled=True: real(enabled=True))
    args = example_args()
    gm = traced(with_constant, args, decompositions=inductor.decompositions())
    compiled = inductor.inductor_compiler(gm, args, options={"fx_graph_cache": True})
    assert type(compiled).__name__ == "InductorCompiledGraph"  # compiled by Inductor, not a nop fallback
    assert TritonBundler._entries is None
    for got, want in zip(compiled(*args), with_constant(*args)):
        torch.testing.assert_close(got, want)
    with inductor_config.patch(fx_graph_cache=True, force_disable_caches=False), real(enabled=True) as found:
        assert TritonBundler._entries is None
    assert not found


def test_kernels_inductor_bundled_itself_are_taken_from_the_compiled_graph():
    from torch._inductor.triton_bundler import TritonBundle, TritonKernelArtifact, TritonKernelArtifacts

    bundle = TritonBundle([TritonKernelArtifacts(HASH, 0, [TritonKernelArtifact("k.cubin", b"bin")])], [])

    class Compiled:
        _triton_bundle = bundle

    assert triton_kernels.from_compiled(Compiled()).kernels == [(HASH, 0, {"k.cubin": b"bin"})]
    assert not triton_kernels.from_compiled(object())
