"""AOTInductor multi-file artifacts (NOTE [files beside the library]): which build files are carried, their
content-addressed restore beside the library, and verification (corrupt / missing side file -> ArtifactError,
a miss in the cache, never a crash). GPU builds write real kernel binaries; on the CPU these tests use
synthetic side files, so CI guards the logic without a GPU."""

from __future__ import annotations

import hashlib

import pytest
import torch

from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.compilers import ArtifactError, aoti_lib, load_artifact, pack_artifact, unpack_artifact
from tests.compilers.graphs import REFERENCE_SOURCE, example_args, traced, with_constant
from tests.conftest import run_python

SIDE = {"c1a2b3.cubin": b"\x7fELF synthetic cubin " * 8, "graph.json": b'{"nodes": []}'}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_side_files_selects_what_the_library_reads(tmp_path):
    so = tmp_path / "graph.so"
    so.write_bytes(b"library naming c1a2b3.cubin")
    for name in ("c1a2b3.cubin", "d4e5.fatbin", "graph.json", "k.hsaco", "wrapper.cpp", "wrapper.o",
                 "graph_metadata.json", "c1a2b3.ptx", "graph_compile_flags.json"):
        (tmp_path / name).write_bytes(name.encode())
    assert sorted(aoti_lib.side_files(so, so.read_bytes(), embedded=False)) == [
        "c1a2b3.cubin", "d4e5.fatbin", "graph.json", "k.hsaco"]
    # embedded: only kernel binaries the library still names are carried
    assert sorted(aoti_lib.side_files(so, so.read_bytes(), embedded=True)) == ["c1a2b3.cubin", "graph.json"]


def test_library_with_files_is_restored_beside_it_and_reused(tmp_path):
    library = b"\x7fELF synthetic library"
    path = aoti_lib.library_path(library, tmp_path, files=SIDE)
    assert path.name == aoti_lib.LIBRARY_NAME and path.read_bytes() == library
    assert path.parent.name == aoti_lib.bundle_digest(library, {n: sha(d) for n, d in SIDE.items()})
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == {**SIDE, path.name: library}
    stamp = (path.parent / "c1a2b3.cubin").stat().st_mtime_ns
    assert aoti_lib.library_path(library, tmp_path, files=SIDE) == path
    assert (path.parent / "c1a2b3.cubin").stat().st_mtime_ns == stamp  # intact files are reused
    (path.parent / "c1a2b3.cubin").write_bytes(b"damaged")  # a damaged or deleted file is written again
    (path.parent / "graph.json").unlink()
    aoti_lib.library_path(library, tmp_path, files=SIDE)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == {**SIDE, path.name: library}
    other = aoti_lib.library_path(library, tmp_path, files={**SIDE, "c1a2b3.cubin": b"other kernel"})
    assert other.parent != path.parent  # other contents, other directory: never mixed


@pytest.mark.parametrize("name", ["../evil.cubin", "sub/k.cubin", ".hidden.cubin", "payload.py", ""])
def test_unsafe_side_file_names_are_refused(tmp_path, name):
    with pytest.raises(ArtifactError):
        aoti_lib.library_path(b"lib", tmp_path, files={name: b"x"})


def test_side_files_are_verified_against_their_digests():
    digests = {name: sha(data) for name, data in SIDE.items()}
    aoti_lib.verify_side_files(dict(SIDE), digests)
    with pytest.raises(ArtifactError, match="sha256"):
        aoti_lib.verify_side_files({**SIDE, "graph.json": b"{}"}, digests)
    with pytest.raises(ArtifactError, match="missing"):
        aoti_lib.verify_side_files({"graph.json": SIDE["graph.json"]}, digests)
    with pytest.raises(ArtifactError, match="unrecorded"):
        aoti_lib.verify_side_files({**SIDE, "x.cubin": b""}, digests)
    with pytest.raises(ArtifactError, match="malformed"):
        aoti_lib.verify_side_files(dict(SIDE), None)


@pytest.fixture
def synthetic_side_files(monkeypatch):
    """AOTInductor builds (real, CPU) report SIDE as files written beside the library."""
    real = aoti_lib.side_files
    monkeypatch.setattr(aoti_lib, "side_files", lambda so_path, library, *, embedded: {
        **real(so_path, library, embedded=embedded), **SIDE})


@pytest.mark.slow
def test_multi_file_artifact_round_trip_fresh_process(synthetic_side_files, tmp_path):
    from aotcache.compilers.aoti import aoti_compiler

    args = example_args()
    compiled = aoti_compiler(traced(with_constant, args), args)
    artifact = unpack_artifact(compiled.artifact())
    assert artifact.meta["files"] == {name: sha(data) for name, data in SIDE.items()}
    assert {name: artifact.blobs["file:" + name] for name in SIDE} == SIDE

    # a fresh process without Inductor or a compiler restores the files beside the library and runs it
    (tmp_path / "aoti.bin").write_bytes(compiled.artifact())
    torch.save(args, tmp_path / "args.pt")
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    proc = run_python(REFERENCE_SOURCE + f'''
import sys, json
from pathlib import Path
from aotcache.compilers import load_artifact, aoti_lib
args = torch.load({str(tmp_path / "args.pt")!r})
loaded = load_artifact(open({str(tmp_path / "aoti.bin")!r}, "rb").read())
for g, w in zip(loaded(*args), with_constant(*args)):
    torch.testing.assert_close(g, w)
assert "torch._inductor" not in sys.modules, "loading imported torch._inductor"
(bundle,) = [p for p in (Path({str(tmp_path / "fresh")!r}) / "aoti_libs").iterdir() if p.is_dir()]
print(json.dumps(sorted(p.name for p in bundle.iterdir())))
''', env={"PATH": str(empty_bin), "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
          "AOTCACHE_CACHE_DIR": str(tmp_path / "fresh")})
    assert proc.stdout.strip().splitlines()[-1] == '["c1a2b3.cubin", "graph.json", "graph.so"]'

    # a corrupt or missing side file is refused at load (the cache turns that into a miss)
    corrupt = unpack_artifact(compiled.artifact())
    corrupt.blobs["file:c1a2b3.cubin"] = b"flipped" + corrupt.blobs["file:c1a2b3.cubin"][7:]
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(pack_artifact(corrupt))
    missing = unpack_artifact(compiled.artifact())
    del missing.blobs["file:graph.json"]
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(pack_artifact(missing))


@pytest.mark.slow
def test_cache_entry_with_a_corrupt_side_file_is_a_miss(synthetic_side_files, monkeypatch):
    """An entry whose side file does not match its record (bytes the store's frame checksum accepts) is a
    load error and a miss: deleted, recompiled, and the job's result is right."""
    import aotcache
    from aotcache.compilers.aoti import AOTICompiledGraph

    def fn(x, w):
        return torch.relu(x @ w) + 1

    args = example_args()
    real_artifact = AOTICompiledGraph.artifact

    def corrupt_artifact(self):
        artifact = unpack_artifact(real_artifact(self))
        artifact.blobs["file:c1a2b3.cubin"] = b"X" * len(artifact.blobs["file:c1a2b3.cubin"])
        return pack_artifact(artifact)

    monkeypatch.setattr(AOTICompiledGraph, "artifact", corrupt_artifact)
    with torch.no_grad():
        first = AOTAutogradCache()
        torch.testing.assert_close(aotcache.aot_function(fn, fw_compiler="aoti", cache=first)(*args), fn(*args))
        assert first.stats()["saved"] == 1
        monkeypatch.setattr(AOTICompiledGraph, "artifact", real_artifact)
        second = AOTAutogradCache()  # a new process's view: the entry comes from disk
        got = aotcache.aot_function(fn, fw_compiler="aoti", cache=second)(*args)
    torch.testing.assert_close(got, fn(*args))
    stats = second.stats()
    assert stats["load_error"] == 1 and stats["hit"] == 0 and stats["saved"] == 1, stats
