"""AOTInductor shared libraries: build one from an FX graph, and load one without Inductor or a C++ compiler.

Shared by the ``aoti`` graph compiler and the per-op eager kernel cache. The cold path
(:func:`compile_library`, :func:`build_identity`) imports ``torch._inductor``; the warm path
(:func:`load_library`, :func:`host_identity`, :func:`check_identity`) only touches ``torch._C`` so that a
warm start does not pay Inductor's import (~1.3 s here) and needs no toolchain.

NOTE [what a library takes and returns]
A library is called as ``runner.run([tensor, ...]) -> [tensor, ...]``: inputs are the graph's placeholders,
which must all be tensors (AOTInductor passes no Python ints; callers specialize int inputs first, see
``aotcache.compilers.aoti``), and outputs are the graph's flat outputs, which must all be tensors (a graph
returning a single tensor or a tuple both give a list). Tensor constants (``get_attr``) are embedded in the
``.so`` itself (``aot_inductor.package_constants_in_so``), so the bytes are the whole artifact. When the
placeholders carry symbolic fake values the library accepts other sizes for those dimensions; otherwise it
is specialized to the example shapes and does not check them: callers check (see ``aoti.py``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aotcache.compilers.base import ArtifactError
from aotcache.store import derived_files

__all__ = [
    "AOTIRunner",
    "LibraryBuild",
    "LIBRARY_NAME",
    "KERNEL_BINARY_SUFFIXES",
    "build_library",
    "side_files",
    "check_side_file_name",
    "verify_side_files",
    "bundle_digest",
    "compile_library",
    "load_library",
    "library_path",
    "host_identity",
    "build_identity",
    "check_identity",
    "materialize_example_inputs",
    "remove_library_dir",
    "int_hint",
    "copy_graph_module",
    "inductor_vec_isa",
    "cpu_extensions",
]

AOTIRunner = Any  # torch._C._aoti.AOTIModelContainerRunnerCpu / ...Cuda: ``run(list[Tensor]) -> list[Tensor]``

# Options that make the output a single self-contained .so (no package, no side files, no mmap'd weights).
_SELF_CONTAINED_OPTIONS = {
    "aot_inductor.package": False,
    "aot_inductor.package_constants_in_so": True,
    "aot_inductor.force_mmap_weights": False,
}
# Embeds GPU kernel binaries (cubins) in the .so instead of writing them next to it (torch >= 2.8).
_GPU_EMBED_OPTION = "aot_inductor.embed_kernel_binary"
# The library's file name in the build dir and beside its side files (AOTInductor's proxy-executor metadata
# is found as "<library stem>.json").
LIBRARY_NAME = "graph.so"
# Kernel binaries AOTInductor writes beside a library that does not embed them: CUDA cubins / fatbins, ROCm
# code objects, XPU SPIR-V.
KERNEL_BINARY_SUFFIXES = (".cubin", ".fatbin", ".hsaco", ".spv", ".bin")

# NOTE [files beside the library]
# For GPU graphs AOTInductor writes each Triton kernel's binary (``<hash>.cubin``) next to the library. A
# library built with ``aot_inductor.embed_kernel_binary`` (set where this torch has it) holds them itself and
# does not name the files; otherwise it loads each by file name from the directory its runner is given
# (``cubin_dir``; the absolute build path of the temp dir is gone by then). So an artifact carries every such
# file the library may read: kernel binaries (all of them unless embedding was on and the library does not
# name the file) and ``<library stem>.json`` (extern-kernel metadata its runner reads when present). Each is
# recorded with its sha256 and checked at load; the library and its files are written to one directory named
# by the digest of all their bytes, and the CUDA runner gets that directory as ``cubin_dir``.

# NOTE [vector ISA = level + extensions]
# Inductor names the ISA it builds for by a level and the extensions its compiler flags enable:
# "avx2", "avx512", "avx512 avx512_vnni", "avx512 avx512_vnni amx_tile"; on top of those, AVX512 builds add
# -mavx512bf16 (and AMX ones -mamx-fp16) when the build host has them. A library runs here when its level is
# at or below this host's CPU capability and this host has every extension it was built with; the host's
# extensions come from torch.cpu's CPUID probes (no Inductor import, no compiler). Unknown levels or
# extensions are refused: a wrong guess is an illegal instruction, not a slow kernel.
# x86 vector ISA levels, weakest first: a library built for one level runs on any host at that level or above.
_ISA_RANK = {"default": 0, "": 0, "avx2": 1, "avx512": 2}
# extension -> torch.cpu probe saying whether this host has it
_ISA_EXTENSION_PROBES = {
    "avx512_vnni": "_is_vnni_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}
# compiler flag -> the extension it makes a library require
_ISA_EXTENSION_FLAGS = {"-mavx512vnni": "avx512_vnni", "-mavx512bf16": "avx512_bf16", "-mamx-tile": "amx_tile",
                        "-mamx-fp16": "amx_fp16"}


# ----------------------------------------------------------------------------------------------------
# Identity of a build and of this host
# ----------------------------------------------------------------------------------------------------


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def host_identity(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a library must match to run here: torch build, machine, CPU ISA (and CUDA arch). No Inductor import."""
    identity: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_extensions": cpu_extensions(),
        "device": _device_type(device),
    }
    if identity["device"] == "cuda":
        index = torch.device(device).index
        major, minor = torch.cuda.get_device_capability(index)
        identity["cuda"] = torch.version.cuda
        identity["cuda_arch"] = f"sm_{major}{minor}"
    return identity


def build_identity(device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`host_identity` plus the toolchain and the vector ISA Inductor compiles for (imports Inductor)."""
    identity = host_identity(device)
    identity["vec_isa"] = inductor_vec_isa()
    identity["compiler"] = _compiler_version()
    return identity


def cpu_extensions() -> list[str]:
    """The vector ISA extensions this host's CPU has, of those Inductor builds for (CPUID; no Inductor)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    found = []
    for extension, probe_name in _ISA_EXTENSION_PROBES.items():
        probe = getattr(torch.cpu, probe_name, None)
        if probe is not None and probe():
            found.append(extension)
    return found


def inductor_vec_isa() -> str:
    """The vector ISA Inductor generates CPU code for here: its level, then every extension its flags enable
    (``avx2``, ``avx512 avx512_bf16 avx512_vnni``; NOTE [vector ISA = level + extensions]). Imports Inductor."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    tokens = str(isa).lower().split()
    if not tokens:
        return "default"
    flags = str(isa.build_arch_flags()).split() if isa else []
    extensions = set(tokens[1:]) | {_ISA_EXTENSION_FLAGS[flag] for flag in flags if flag in _ISA_EXTENSION_FLAGS}
    return " ".join([tokens[0], *sorted(extensions)])


def _compiler_version() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
        proc = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    first_line = (proc.stdout or proc.stderr).strip().splitlines()
    return first_line[0] if first_line else compiler


def check_identity(identity: dict[str, Any], device: str | torch.device = "cpu") -> None:
    """Refuse a library built for another torch build, machine, ISA or GPU arch than this host's.

    :raises ArtifactError: naming the mismatching part and the fix (rebuild on a matching host).
    """
    here = host_identity(device)
    problems = []
    for part in ("torch", "torch_git", "system", "machine", "device", "cuda", "cuda_arch"):
        if part in identity or part in here:
            if identity.get(part) != here.get(part):
                problems.append(f"{part}: built for {identity.get(part)!r}, this host has {here.get(part)!r}")
    if here.get("machine", "").lower() in ("x86_64", "amd64"):
        host_rank = _ISA_RANK.get(str(here["cpu_capability"]).lower())
        host_extensions = set(here["cpu_extensions"])
        for part in ("cpu_capability", "vec_isa"):
            built = str(identity.get(part, "default")).lower()
            level, *extensions = built.split() or ["default"]
            built_rank = _ISA_RANK.get(level)
            if built_rank is None or host_rank is None or built_rank > host_rank:
                problems.append(f"{part}: built for {built!r}, this host supports {here['cpu_capability']!r}")
            missing = [name for name in extensions if name not in host_extensions]
            if missing:
                problems.append(f"{part}: built for {built!r}, this host lacks {' '.join(missing)}")
    elif str(identity.get("cpu_capability")) != str(here["cpu_capability"]):
        problems.append(f"cpu_capability: built for {identity.get('cpu_capability')!r}, "
                        f"this host has {here['cpu_capability']!r}")
    if problems:
        raise ArtifactError("AOTInductor library was built for another host (" + "; ".join(problems)
                            + "); recompile it here (it will be cached under this host's key)")


# ----------------------------------------------------------------------------------------------------
# Build (cold path: imports torch._inductor, needs a C++ compiler)
# ----------------------------------------------------------------------------------------------------


def int_hint(value: int | torch.SymInt) -> int:
    """The concrete example value behind a SymInt (its trace-time hint); ints pass through.

    :raises ValueError: an unbacked SymInt (data-dependent size) that has no example value.
    """
    if not isinstance(value, torch.SymInt):
        return int(value)
    node = value.node
    hint = getattr(node, "hint", None)
    if hint is None and getattr(node, "shape_env", None) is not None:
        with contextlib.suppress(RuntimeError, TypeError, ValueError, AttributeError):
            hint = node.shape_env.size_hint(node.expr)
    if hint is None:
        raise ValueError(f"symbolic size {value} has no example value (data-dependent); cannot specialize it")
    return int(hint)


def materialize_example_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Real tensors / Python ints standing in for (possibly fake or symbolic) example inputs, for compiling."""
    def concrete(value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            return int_hint(value)
        if isinstance(value, torch.Tensor):
            from torch._subclasses.fake_tensor import is_fake

            if not is_fake(value):
                return value
            sizes = [int_hint(size) for size in value.shape]
            strides = [int_hint(stride) for stride in value.stride()]
            return torch.empty_strided(sizes, strides, dtype=value.dtype, device=value.device).zero_()
        return value

    return [concrete(value) for value in example_inputs]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy sharing the attributes (constants) but not the graph: Inductor's AOT path mutates its input."""
    graph = copy.deepcopy(gm.graph)  # node.meta is copied shallowly: fake values are shared, not cloned
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta.update(getattr(gm, "meta", {}))
    return copied


@contextlib.contextmanager
def _fake_mode_accepting_constants(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Prepare ``gm``'s fake values for Inductor's re-trace.

    NOTE [fake values and constants]
    Inductor traces the graph again under the fake mode found on the placeholders' ``meta["val"]``. Two
    things break that: placeholders whose fake values come from different fake modes (graphs traced with
    real tensors), and tensor constants (``get_attr``) that are real tensors. In the first case we drop the
    fake values so Inductor fakifies the (concrete) example inputs itself; in the second we let the single
    fake mode accept real tensors for the duration of the build.
    """
    from torch._guards import detect_fake_mode

    placeholder_values = [node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"]
    try:
        fake_mode = detect_fake_mode(placeholder_values)
    except AssertionError:  # fake values from several fake modes
        fake_mode = None
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
    has_constants = any(node.op == "get_attr" for node in gm.graph.nodes)
    if fake_mode is None or not has_constants:
        yield
        return
    previous = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        yield
    finally:
        fake_mode.allow_non_fake_inputs = previous


def _check_graph_io(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"compile_library: the graph has {len(placeholders)} inputs but {len(example_inputs)} "
                         "example inputs were given; pass one example per placeholder")
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"compile_library: graph input {node.name!r} is {type(value).__name__}, but an "
                             "AOTInductor library takes only tensors; specialize int inputs into the graph first")
    (output_node,) = [node for node in gm.graph.nodes if node.op == "output"]
    outputs = output_node.args[0]
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    for index, value in enumerate(flat):
        known_value = value.meta.get("val") if isinstance(value, torch.fx.Node) else value
        if not isinstance(value, torch.fx.Node) or (known_value is not None
                                                     and not isinstance(known_value, torch.Tensor)):
            raise ValueError(f"compile_library: graph output {index} is {value!r}, not a tensor; an AOTInductor "
                             "library returns only tensors (return None/ints from Python around it)")


@dataclass(frozen=True)
class LibraryBuild:
    """What AOTInductor built for one graph: the library and the files it reads beside it at run time.

    ``files`` maps a file name (no directory) to its bytes; see NOTE [files beside the library].
    """

    library: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    library_name: str = LIBRARY_NAME


def build_library(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                  options: dict[str, Any] | None = None) -> LibraryBuild:
    """Compile ``gm`` (ATen graph, tensor inputs and outputs) with AOTInductor: the library plus the files it
    loads beside it (GPU kernel binaries AOTInductor did not embed; NOTE [files beside the library]).

    ``options`` are ``torch._inductor.config`` overrides. Constants are embedded in the library; GPU kernel
    binaries too where this torch can (``aot_inductor.embed_kernel_binary``).

    :raises ValueError: a non-tensor graph input or output.
    :raises RuntimeError: Inductor did not produce a shared library.
    """
    import torch._inductor
    from torch._inductor import config as inductor_config

    _check_graph_io(gm, example_inputs)
    device_types = {value.device.type for value in example_inputs if isinstance(value, torch.Tensor)}
    build_options = dict(options or {})
    build_options.update(_SELF_CONTAINED_OPTIONS)
    embedded = bool(device_types - {"cpu"}) and _has_inductor_option(inductor_config, _GPU_EMBED_OPTION)
    if embedded:
        build_options.setdefault(_GPU_EMBED_OPTION, True)
        embedded = bool(build_options[_GPU_EMBED_OPTION])
    graph_module = copy_graph_module(gm)
    with tempfile.TemporaryDirectory(prefix="aotcache-aoti-") as workdir:
        build_options["aot_inductor.output_path"] = os.path.join(workdir, LIBRARY_NAME)
        with _fake_mode_accepting_constants(graph_module):
            placeholders_have_values = any("val" in node.meta for node in graph_module.graph.nodes
                                           if node.op == "placeholder")
            inputs = tuple(example_inputs) if placeholders_have_values else \
                tuple(materialize_example_inputs(example_inputs))
            result = torch._inductor.aot_compile(graph_module, inputs, options=build_options)
        if not isinstance(result, (str, os.PathLike)):
            raise RuntimeError(f"torch._inductor.aot_compile returned {type(result).__name__}, expected the path "
                               "of one shared library (is aot_inductor.package forced on?)")
        so_path = Path(result)
        library = so_path.read_bytes()
        return LibraryBuild(library, side_files(so_path, library, embedded=embedded), so_path.name)


def side_files(so_path: Path, library: bytes, *, embedded: bool) -> dict[str, bytes]:
    """The files beside ``so_path`` that the library reads at run time (NOTE [files beside the library]).

    ``embedded``: the build asked AOTInductor to embed kernel binaries; those it did embed are left out.
    """
    found: dict[str, bytes] = {}
    for path in sorted(so_path.parent.iterdir()):
        if not path.is_file() or path == so_path:
            continue
        if path.suffix in KERNEL_BINARY_SUFFIXES:
            if embedded and path.name.encode() not in library:
                continue  # embedded: the library does not name the file, it holds its bytes
        elif path.name != so_path.stem + ".json":
            continue
        found[path.name] = path.read_bytes()
    return found


def compile_library(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                    options: dict[str, Any] | None = None) -> bytes:
    """Compile ``gm`` into one self-contained AOTInductor ``.so`` and return its bytes (the per-op kernel
    cache's form, which stores single files); :func:`build_library` also returns the files beside it.

    :raises ValueError: a non-tensor graph input or output.
    :raises RuntimeError: Inductor did not produce a single self-contained library.
    """
    build = build_library(gm, example_inputs, options=options)
    if build.files:
        raise RuntimeError(f"AOTInductor wrote files the library reads beside it ({sorted(build.files)[:3]}); "
                           "this caller stores single libraries only (use build_library)")
    return build.library


def _has_inductor_option(inductor_config: Any, dotted: str) -> bool:
    node = inductor_config
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


# ----------------------------------------------------------------------------------------------------
# Load (warm path: torch._C only)
# ----------------------------------------------------------------------------------------------------


def _write_verified(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Make ``path`` hold exactly ``data``: kept when it does, else written to a temp file and renamed in place
    (NOTE [content-addressed libraries])."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def check_side_file_name(name: str) -> None:
    """:raises ArtifactError: ``name`` is not a plain file name of a kind a library reads beside it."""
    if not name or name != Path(name).name or name in (".", "..") or "/" in name or "\\" in name \
            or name.startswith("."):
        raise ArtifactError(f"AOTInductor side file name {name!r} is not a plain file name")
    if Path(name).suffix not in KERNEL_BINARY_SUFFIXES and Path(name).suffix != ".json":
        raise ArtifactError(f"AOTInductor side file {name!r} is not a kernel binary or library metadata")


def bundle_digest(so_bytes: bytes, files: dict[str, str], library_name: str = LIBRARY_NAME) -> str:
    """The content address of a library and its side files (``files``: name -> sha256 of the bytes)."""
    record = json.dumps({"library": hashlib.sha256(so_bytes).hexdigest(), "name": library_name, "files": files},
                        sort_keys=True).encode()
    return hashlib.sha256(record).hexdigest()


def library_path(so_bytes: bytes, cache_dir: str | os.PathLike | None = None, *,
                 files: dict[str, bytes] | None = None, library_name: str = LIBRARY_NAME) -> Path:
    """The content-addressed path of a library, written if absent: ``<cache_dir>/aoti_libs/<sha256>.so``, or
    with side ``files`` ``<cache_dir>/aoti_libs/<bundle digest>/<library_name>`` with the files beside it.

    NOTE [content-addressed libraries]
    dlopen needs a file. The name is the bytes' sha256 (:func:`aotcache.store.derived_files.materialize`):
    an existing file with these bytes is reused, a new one appears atomically. The files are derived data,
    counted in the disk bound and pruned by ``aotcache prune`` (NOTE [derived files in the bound]). A library
    with side files gets a directory named by the digest of all their contents, so each file keeps the name the
    library looks for (NOTE [files beside the library]); every file is checked and rewritten the same way, and
    the directory is one derived entry for the bound and ``prune``.

    :raises ArtifactError: a side file name that is not a plain kernel-binary or metadata file name.
    """
    directory = derived_files.library_dir(cache_dir)
    if not files:
        return derived_files.materialize(so_bytes, directory, ".so")
    if library_name != Path(library_name).name or not library_name.endswith(".so") or library_name.startswith("."):
        raise ArtifactError(f"AOTInductor library name {library_name!r} is not a plain .so file name")
    for name in files:
        check_side_file_name(name)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    bundle = directory / bundle_digest(so_bytes, digests, library_name)
    for name, data in sorted(files.items()):
        _write_verified(bundle / name, data)
    path = bundle / library_name
    _write_verified(path, so_bytes, 0o755)
    derived_files.touch(path)
    return path


def verify_side_files(files: dict[str, bytes], digests: Any) -> None:
    """Check side files against the sha256 recorded at build time (``digests``: name -> hex digest).

    :raises ArtifactError: a file missing, extra, or not matching its digest (a corrupt or partial artifact).
    """
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ArtifactError("AOTInductor artifact has malformed side-file digests")
    missing = sorted(set(digests) - set(files))
    extra = sorted(set(files) - set(digests))
    if missing or extra:
        raise ArtifactError(f"AOTInductor artifact side files do not match its record (missing {missing}, "
                            f"unrecorded {extra})")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != digests[name]:
            raise ArtifactError(f"AOTInductor side file {name!r} does not match its sha256 (corrupt artifact)")


def load_library(so_bytes: bytes, *, device: str | torch.device = "cpu",
                 cache_dir: str | os.PathLike | None = None,
                 identity: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
                 library_name: str = LIBRARY_NAME) -> AOTIRunner:
    """Load library bytes with torch's AOTI runner (no Inductor import, no compiler); ``runner.run(list)``.

    ``identity``: the :func:`build_identity` stored with the bytes; when given it is checked first.
    ``files``: side files restored beside the library (NOTE [files beside the library]); a CUDA runner is
    told to look for kernel binaries in that directory.

    :raises ArtifactError: ``identity`` does not match this host, or the runner cannot load the library.
    """
    if identity is not None:
        check_identity(identity, device)
    path = library_path(so_bytes, cache_dir, files=files, library_name=library_name)
    target = torch.device(device)
    try:
        if target.type == "cpu":
            return torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        if target.type == "cuda":
            if files:
                return torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(target), str(path.parent))
            return torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(target))
    except (RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"cannot load AOTInductor library {path.name}: {exc}") from exc
    raise ArtifactError(f"no AOTInductor runner for device {str(target)!r}; supported: cpu, cuda")


def remove_library_dir(cache_dir: str | os.PathLike | None = None) -> None:
    """Delete every materialized library file (they are re-written from artifacts on the next load)."""
    shutil.rmtree(derived_files.library_dir(cache_dir), ignore_errors=True)
