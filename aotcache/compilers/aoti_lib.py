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
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from aotcache.compilers.base import ArtifactError
from aotcache.store import derived_files

__all__ = [
    "AOTIRunner",
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


def compile_library(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                    options: dict[str, Any] | None = None) -> bytes:
    """Compile ``gm`` (ATen graph, tensor inputs and outputs) into one AOTInductor ``.so``; return its bytes.

    ``options`` are ``torch._inductor.config`` overrides. Constants are embedded in the library.

    :raises ValueError: a non-tensor graph input or output.
    :raises RuntimeError: Inductor did not produce a single shared library.
    """
    import torch._inductor
    from torch._inductor import config as inductor_config

    _check_graph_io(gm, example_inputs)
    device_types = {value.device.type for value in example_inputs if isinstance(value, torch.Tensor)}
    build_options = dict(options or {})
    build_options.update(_SELF_CONTAINED_OPTIONS)
    if device_types - {"cpu"} and _has_inductor_option(inductor_config, _GPU_EMBED_OPTION):
        build_options[_GPU_EMBED_OPTION] = True
    graph_module = copy_graph_module(gm)
    with tempfile.TemporaryDirectory(prefix="aotcache-aoti-") as workdir:
        build_options["aot_inductor.output_path"] = os.path.join(workdir, "graph.so")
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
        side_files = [path.name for path in so_path.parent.iterdir()
                      if path.suffix in (".cubin", ".hsaco", ".spv", ".bin") and path.is_file()]
        if side_files:
            raise RuntimeError(f"AOTInductor wrote kernel binaries next to the library ({side_files[:3]}); "
                               f"this torch cannot embed them ({_GPU_EMBED_OPTION}), so the .so is not portable")
        return so_path.read_bytes()


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


def library_path(so_bytes: bytes, cache_dir: str | os.PathLike | None = None) -> Path:
    """The content-addressed path of a library: ``<cache_dir>/aoti_libs/<sha256>.so``, written if absent.

    NOTE [content-addressed libraries]
    dlopen needs a file. The name is the bytes' sha256 (:func:`aotcache.store.derived_files.materialize`):
    an existing file with these bytes is reused, a new one appears atomically. The files are derived data,
    counted in the disk bound and pruned by ``aotcache prune`` (NOTE [derived files in the bound]).
    """
    return derived_files.materialize(so_bytes, derived_files.library_dir(cache_dir), ".so")


def load_library(so_bytes: bytes, *, device: str | torch.device = "cpu",
                 cache_dir: str | os.PathLike | None = None,
                 identity: dict[str, Any] | None = None) -> AOTIRunner:
    """Load library bytes with torch's AOTI runner (no Inductor import, no compiler); ``runner.run(list)``.

    ``identity``: the :func:`build_identity` stored with the bytes; when given it is checked first.

    :raises ArtifactError: ``identity`` does not match this host, or the runner cannot load the library.
    """
    if identity is not None:
        check_identity(identity, device)
    path = library_path(so_bytes, cache_dir)
    target = torch.device(device)
    try:
        if target.type == "cpu":
            return torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        if target.type == "cuda":
            return torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(target))
    except (RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"cannot load AOTInductor library {path.name}: {exc}") from exc
    raise ArtifactError(f"no AOTInductor runner for device {str(target)!r}; supported: cpu, cuda")


def remove_library_dir(cache_dir: str | os.PathLike | None = None) -> None:
    """Delete every materialized library file (they are re-written from artifacts on the next load)."""
    shutil.rmtree(derived_files.library_dir(cache_dir), ignore_errors=True)
