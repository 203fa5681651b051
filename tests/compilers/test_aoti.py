"""The aoti compiler and aoti_lib: real AOTInductor builds (slow), loads in fresh processes without Inductor
or a C++ compiler, identity checks, Python-side input checks."""

from __future__ import annotations

import os

import pytest
import torch

from aotcache import config
from aotcache.compilers import ArtifactError, load_artifact, pack_artifact, unpack_artifact
from aotcache.compilers import aoti_lib
from aotcache.compilers.aoti import aoti_compiler
from tests.compilers.graphs import REFERENCE_SOURCE, example_args, traced, with_constant, with_int_input
from tests.conftest import run_python

pytestmark = pytest.mark.slow


def dynamic_fn(x, y):
    return (torch.nn.functional.silu(x) * y.cos(),)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three real builds shared by the module: static with a constant, int-specialized, dynamic."""
    with config.patch(cache_dir=tmp_path_factory.mktemp("aoti_cache")):
        args = example_args()
        static = aoti_compiler(traced(with_constant, args), args)
        int_args = [torch.randn(3, 2), 4]
        specialized = aoti_compiler(traced(with_int_input, int_args, "symbolic"),
                                    [int_args[0], int_args[1]])
        dyn_args = [torch.randn(5, 3), torch.randn(5, 3)]
        gm = traced(dynamic_fn, dyn_args, "symbolic")
        fake_inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        dynamic = aoti_compiler(gm, fake_inputs)
    return {"static": (static, args), "specialized": (specialized, int_args), "dynamic": dynamic}


def test_static_graph_matches_eager(built):
    compiled, args = built["static"]
    for got, want in zip(compiled(*args), with_constant(*args)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="shape"):
        compiled(torch.randn(5, 8), args[1])


def test_arguments_with_other_strides_are_restrided(built):
    """The library reads its inputs with the example strides and checks none: others are copied first."""
    compiled, args = built["static"]
    transposed = args[0].t().contiguous().t()
    for got, want in zip(compiled(transposed, args[1]), with_constant(*args)):
        torch.testing.assert_close(got, want)
    x, y = torch.randn(3, 7).t(), torch.randn(7, 3)  # dynamic build: strides follow from the call's sizes
    torch.testing.assert_close(built["dynamic"](x, y)[0], dynamic_fn(x, y)[0])


def test_misaligned_arguments_give_eagers_result(built):
    """NOTE [Misaligned inputs]: the signature no longer keys on alignment, so a library built on aligned
    examples gets arguments at any offset (on the CPU read as they are; a GPU library's are copied first)."""
    compiled, args = built["static"]
    for offset in (1, 2, 3):
        moved = [torch.cat([torch.zeros(offset), arg.flatten()])[offset:].view(arg.shape) for arg in args]
        assert all(arg.data_ptr() % 16 for arg in moved)
        for got, want in zip(compiled(*moved), with_constant(*args)):
            torch.testing.assert_close(got, want)
    x, y = torch.randn(16)[1:16].view(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(built["dynamic"](x, y)[0], dynamic_fn(x, y)[0])


def test_int_inputs_are_specialized_and_checked(built):
    compiled, (x, n) = built["specialized"]
    got = compiled(x, n)
    want = with_int_input(x, n)
    torch.testing.assert_close(got[0], want[0])
    assert got[1] is None and got[2] == want[2]
    with pytest.raises(ValueError, match="specialized"):
        compiled(x, n + 1)


def test_dynamic_graph_accepts_other_sizes(built):
    compiled = built["dynamic"]
    for rows in (2, 9):
        x, y = torch.randn(rows, 3), torch.randn(rows, 3)
        torch.testing.assert_close(compiled(x, y)[0], dynamic_fn(x, y)[0])
    assert unpack_artifact(compiled.artifact()).meta["static"] is False


def test_fresh_process_load_needs_no_inductor_and_no_compiler(built, tmp_path):
    compiled, args = built["static"]
    artifact_path = tmp_path / "aoti.bin"
    artifact_path.write_bytes(compiled.artifact())
    torch.save(args, tmp_path / "args.pt")
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    proc = run_python(REFERENCE_SOURCE + f'''
import sys
from aotcache.compilers import load_artifact
args = torch.load({str(tmp_path / "args.pt")!r})
loaded = load_artifact(open({str(artifact_path)!r}, "rb").read())
got = loaded(*args)
for g, w in zip(got, with_constant(*args)):
    torch.testing.assert_close(g, w)
assert "torch._inductor" not in sys.modules, "loading imported torch._inductor"
print("inductor-free ok")
''', env={"PATH": str(empty_bin), "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
          "AOTCACHE_CACHE_DIR": str(tmp_path / "fresh_cache")})
    assert "inductor-free ok" in proc.stdout


def test_library_file_is_content_addressed_and_reused(built, tmp_path):
    compiled, args = built["static"]
    so_bytes = unpack_artifact(compiled.artifact()).blobs["library.so"]
    first = aoti_lib.library_path(so_bytes, tmp_path)
    assert first.parent == tmp_path / "aoti_libs" and first.stem == __import__("hashlib").sha256(so_bytes).hexdigest()
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    assert aoti_lib.library_path(so_bytes, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp - 10**9  # reused, not rewritten
    first.write_bytes(b"truncated")  # a damaged file is replaced
    assert aoti_lib.library_path(so_bytes, tmp_path).read_bytes() == so_bytes
    runner = aoti_lib.load_library(so_bytes, cache_dir=tmp_path)
    torch.testing.assert_close(runner.run(list(args))[1], with_constant(*args)[1])


@pytest.mark.parametrize("part, value", [("torch", "1.0.0"), ("cpu_capability", "unknown_isa"),
                                         ("vec_isa", "unknown_isa"), ("machine", "sparc")])
def test_library_for_another_host_is_refused(built, part, value):
    compiled, _ = built["static"]
    artifact = unpack_artifact(compiled.artifact())
    artifact.meta["identity"][part] = value
    with pytest.raises(ArtifactError, match=part):
        load_artifact(pack_artifact(artifact))


@pytest.mark.parametrize("built, host_extensions, refused", [
    ("avx512 avx512_vnni", ["avx512_vnni"], None),
    ("avx512 avx512_vnni", [], "lacks avx512_vnni"),
    ("avx512 avx512_bf16 avx512_vnni", ["avx512_vnni"], "lacks avx512_bf16"),
    ("avx512 avx512_vnni amx_tile", ["avx512_vnni", "amx_tile"], None),
    ("avx512 some_future_ext", ["avx512_vnni"], "lacks some_future_ext"),
    ("avx2", [], None),
    ("avx512", [], None),
])
def test_vector_isa_is_a_level_plus_extensions(monkeypatch, built, host_extensions, refused):
    """NOTE [vector ISA = level + extensions]: Inductor's ISA strings carry extensions a host must have."""
    monkeypatch.setattr(aoti_lib.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(aoti_lib, "cpu_extensions", lambda: list(host_extensions))
    identity = {**aoti_lib.host_identity(), "vec_isa": built}
    if refused is None:
        aoti_lib.check_identity(identity)
    else:
        with pytest.raises(ArtifactError, match=refused):
            aoti_lib.check_identity(identity)


def test_avx512_library_is_refused_on_an_avx2_host(monkeypatch):
    monkeypatch.setattr(aoti_lib.platform, "machine", lambda: "x86_64")
    identity = {**aoti_lib.host_identity(), "cpu_capability": "AVX512", "vec_isa": "avx512"}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(ArtifactError, match="this host supports 'AVX2'"):
        aoti_lib.check_identity(identity)


def test_identity_of_this_host_is_accepted():
    identity = aoti_lib.host_identity()
    aoti_lib.check_identity(identity)
    assert identity["torch"] == torch.__version__ and identity["cpu_capability"]


def test_compile_library_rejects_non_tensor_io():
    gm = traced(with_int_input, [torch.randn(3, 2), 4])
    with pytest.raises(ValueError, match="only tensors"):
        aoti_lib.compile_library(gm, [torch.randn(3, 2), 4])


def test_size_inputs_of_a_dynamic_graph_are_read_from_tensor_sizes(tmp_path):
    # found with GPT-2 generating under torch.compile's route (gradient checkpointing on): Dynamo passes a
    # sequence length as a SymInt graph input; the library was specialized to its first value and the next decode
    # step raised ValueError where eager runs. A size input equal to a tensor input's size is now read from that
    # tensor (a dynamic build), so other sizes run.
    def fn(x):
        return (x * torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1)).sum(0) + x.shape[0]

    with config.patch(cache_dir=tmp_path, strict=True):  # strict: a fallback to another compiler raises
        compiled = torch.compile(fn, backend="aotcache", options={"compiler": "aoti"}, dynamic=True)
        for rows in (4, 5, 7):
            x = torch.randn(rows, 3)
            torch.testing.assert_close(compiled(x), fn(x))
