"""The ``inductor`` compiler: Inductor's Python-wrapper code generation on our already-traced graphs.

We call ``torch._inductor.compile_fx.compile_fx_inner`` directly: our graphs are already functionalized and
decomposed, so no second AOT pass runs (``compile_fx`` would run PyTorch's AOT Autograd again). Inductor's
own FX graph cache is switched off for the compile; we are the cache.

NOTE [inductor artifacts carry kernel binaries]
The artifact holds the generated Python wrapper source, the graph's constants (``torch.save``), and the
compiled C++ kernel libraries (``*.so``) that the wrapper's ``async_compile.cpp_pybinding(...)`` calls load.
Inductor finds a kernel library at a path derived from a hash of its source and compile command under its
cache dir (``TORCHINDUCTOR_CACHE_DIR``); ``load`` writes the carried libraries to the same relative paths
before importing the wrapper, so on a host with the same torch install the wrapper finds them and compiles
nothing. On a host whose command differs (another ISA, include path or compiler flags) the paths differ and
Inductor recompiles the kernels from the source in the wrapper -- slower, still correct. GPU (Triton)
kernels are carried too: NOTE [inductor artifacts carry Triton kernels] in ``triton_kernels.py``.

Loading imports ``torch._inductor`` (about 1.3 s here) and needs a working C++ compiler on PATH even when
nothing is compiled: Inductor runs it to build the command line that names the kernel libraries. The
``aoti`` compiler needs neither.

NOTE [warming the compile workers]
Inductor compiles a GPU graph's Triton kernels in a pool of worker processes, but only once that pool is up:
``async_compile.triton`` asks whether the pool is ready, does not wait, and compiles the kernel in the calling
process when it is not, one kernel after another. Starting the pool takes seconds (a sidecar process imports
torch, then starts its workers). torch.compile starts it before its graph reaches Inductor (``compile_fx``
wakes it for GPU inputs, the ``inductor`` backend warms it at its first call); we call ``compile_fx_inner``,
which does neither, so the first graph's kernels were compiled serially in the main process. :func:`warm_up`
starts the pool the way torch.compile does; the AOT pipeline calls it on a cache miss as soon as it knows it
will compile (before the capture with decompositions), so the pool starts while we capture, partition and
lower, and this compiler calls it too. Only for graphs with CUDA/XPU inputs (CPU kernels compile in a thread
pool that needs no warming) and never on a cache hit (loading starts no pool). A failure to start the pool is
logged once and ignored: Inductor then compiles in this process, as it would have.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx

from aotcache.compilers import aoti_lib, triton_kernels
from aotcache.compilers.base import Artifact, ArtifactError, pack_artifact
from aotcache.compilers.float_inputs import FloatInputs, tensorify_float_inputs
from aotcache.compilers.inductor_decomp import check_supported_ops, inductor_decompositions
from aotcache.compilers.input_layout import InputLayouts, copy_misaligned, expected_layouts
from aotcache.compilers.nop import random_generators
from aotcache.compilers.view_offsets import spell_storage_offsets
from aotcache.logs import log_once
from aotcache.fake_device_guard import keep_fake_cuda_guard_alive

__all__ = ["InductorCompiledGraph", "inductor_compiler", "decompositions", "load", "warm_up", "runs_on_gpu",
           "unlowered_random_node"]

COMPILER_NAME = "inductor"
_WRAPPER_BLOB = "wrapper.py"
_CONSTANTS_BLOB = "constants"
_KERNEL_PREFIX = "kernel:"


def decompositions() -> dict:
    """The table graphs for this compiler must be traced with: Inductor's plus matmul-level LSTM layers.

    See :mod:`aotcache.compilers.inductor_decomp`.
    """
    return inductor_decompositions()


def runs_on_gpu(example_inputs: Sequence[Any]) -> bool:
    """Whether any example input is a CUDA or XPU tensor (Inductor then generates Triton kernels)."""
    return any(isinstance(value, torch.Tensor) and value.device.type in ("cuda", "xpu") for value in example_inputs)


def warm_up(example_inputs: Sequence[Any]) -> bool:
    """Start Inductor's compile worker pool now if a graph with these inputs will compile Triton kernels;
    True if it was asked to start (see NOTE [warming the compile workers]). Repeated calls cost nothing."""
    if not runs_on_gpu(example_inputs):
        return False
    try:
        from torch._inductor import async_compile

        warm = getattr(async_compile, "maybe_warm_pool", None)  # honours TORCH_WARM_POOL=0, needs Triton
        if warm is not None:
            warm()
        else:  # older torch: the same two steps by hand
            async_compile.AsyncCompile.warm_pool()
            async_compile.AsyncCompile.wakeup()
    except Exception as exc:  # noqa: BLE001 - warming is an optimization; Inductor compiles in-process without it
        log_once(logging.INFO, "inductor:warm-pool", "aotcache: could not start Inductor's compile workers early "
                 "(%s: %s); Triton kernels may compile in this process", type(exc).__name__, exc)
        return False
    return True


class InductorCompiledGraph:
    """Runs an Inductor wrapper module's ``call``; ``compiled(*args)`` leaves the caller's arguments alone."""

    compiler_name = COMPILER_NAME
    grad_mode_independent = True  # NOTE [Forward under grad mode] in aotcache.aot.runtime

    def __init__(self, call: Callable[[list], Sequence[Any]], *, source: str, constants: dict[str, torch.Tensor],
                 kernels: dict[str, bytes], inputs_to_check: Sequence[int], identity: dict[str, Any],
                 input_layouts: Sequence[dict[str, list[int]] | None],
                 triton: triton_kernels.TritonKernels | None = None, floats: FloatInputs | None = None) -> None:
        self._call = call
        self._floats = floats  # NOTE [Float inputs for Inductor]: floats passed as 0-d float64 tensors
        self._triton = triton or triton_kernels.TritonKernels()  # GPU kernels carried in the artifact
        self.source = source
        self._constants = constants
        self._kernels = kernels
        self._inputs_to_check = list(inputs_to_check)
        self._identity = identity
        self._input_layouts = list(input_layouts)
        self._conform = InputLayouts(self._input_layouts).conform
        # strides of each output as compiled (None: unknown); set by a compile, not kept in the artifact
        self.output_strides: list[tuple[int, ...] | None] | None = None
        # (None,) where compiled with fallback_random and drawing from the default generators only: ATen's kernels
        # in the graph's order (NOTE [Double backward through random ops] in aotcache.aot.double_backward); kept
        self.eager_random_draws: tuple | None = None

    def __call__(self, *args: Any) -> Sequence[Any]:
        # NOTE [boxed calling convention]: Inductor's call(args) clears the list it is given (to free inputs
        # early), so it always gets a fresh list here (conform returns one).
        floats = self._floats
        boxed = self._conform(floats.arguments(args) if floats else args)  # NOTE [compiled code assumes input strides]
        if self._inputs_to_check:
            copy_misaligned(boxed, self._inputs_to_check)  # NOTE [Misaligned inputs]
        return floats.outputs(self._call(boxed), args) if floats else self._call(boxed)

    def run(self, args: Sequence[Any]) -> Sequence[Any]:
        """Call with the inputs as one sequence (the sequence is not modified)."""
        return self(*args)

    def artifact(self) -> bytes:
        """Wrapper source, constants and kernel libraries (see NOTE [inductor artifacts carry kernel binaries])."""
        blobs = {_WRAPPER_BLOB: self.source.encode("utf-8")}
        if self._constants:
            buffer = io.BytesIO()
            torch.save(self._constants, buffer)
            blobs[_CONSTANTS_BLOB] = buffer.getvalue()
        for relative_path, data in sorted(self._kernels.items()):
            blobs[_KERNEL_PREFIX + relative_path] = data
        meta = {"identity": self._identity, "inputs_to_check": self._inputs_to_check,
                "constants": sorted(self._constants), "kernels": sorted(self._kernels),
                "input_layouts": self._input_layouts}
        if self._floats:
            meta["float_inputs"] = self._floats.to_meta()
        if self.eager_random_draws == (None,):
            meta["eager_random"] = True
        if self._triton:
            meta["triton"], triton_blobs = triton_kernels.to_artifact(self._triton)
            blobs.update(triton_blobs)
        return pack_artifact(Artifact(COMPILER_NAME, meta, blobs))


# ----------------------------------------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------------------------------------


def _inductor_cache_dir() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # torch < 2.5 layout
        from torch._inductor.runtime.runtime_utils import cache_dir  # type: ignore[no-redef]
    return Path(cache_dir()).resolve()


def _kernel_libraries(call: Callable[..., Any]) -> dict[str, bytes]:
    """The kernel ``.so`` files the wrapper module of ``call`` loaded, keyed by path relative to the cache dir."""
    function = getattr(call, "__func__", call)
    module_globals = getattr(function, "__globals__", {})
    root = _inductor_cache_dir()
    found: dict[str, bytes] = {}
    for value in list(module_globals.values()):
        owner = getattr(value, "__self__", None)
        file = getattr(owner, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".so"):
            continue
        path = Path(file).resolve()
        with contextlib.suppress(ValueError):
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def _fake_inputs_and_mode(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list, Any]:
    """Fake example inputs for Inductor and their fake mode; graphs without fake values get them by propagation."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    values = [node.meta.get("val") for node in placeholders]
    with contextlib.suppress(AssertionError):
        fake_mode = detect_fake_mode([*example_inputs, *values])
        if fake_mode is not None and all(value is not None for value in values):
            return values, fake_mode
    keep_fake_cuda_guard_alive()  # NOTE [A fake CUDA guard owned by a finished thread]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    concrete = aoti_lib.materialize_example_inputs(example_inputs)
    fakes = [fake_mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value
             for value in concrete]
    FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*fakes)
    return fakes, fake_mode


def _ensure_tuple_output(gm: torch.fx.GraphModule) -> None:
    (output_node,) = [node for node in gm.graph.nodes if node.op == "output"]
    if not isinstance(output_node.args[0], (tuple, list)):
        output_node.args = ((output_node.args[0],),)
        gm.recompile()


def _keep_traced_output_strides(gm: torch.fx.GraphModule) -> None:
    """Make Inductor give every output the strides of its traced ``meta["val"]``, except layout-free ones.

    NOTE [outputs keep their traced strides]
    Inductor lays out an output as it likes (e.g. a convolution result channels-last) unless the output is
    "user-visible": ``compile_fx`` (PyTorch's entry, which we bypass) marks the module's own outputs so, via
    ``output_node.meta["user_visible_output_idxs"]``. We mark every output so, except those the AOT pipeline
    lists in ``gm.meta[LAYOUT_FREE_OUTPUTS]`` (saved activations whose backward is compiled afterwards for the
    strides we report, NOTE [saved activations take the compiler's layout] in ``aotcache.aot.layouts``).
    A graph compiled on its own (no such list) returns exactly its traced strides.
    """
    from aotcache.aot.layouts import LAYOUT_FREE_OUTPUTS

    (output_node,) = [node for node in gm.graph.nodes if node.op == "output"]
    outputs = output_node.args[0]
    free = set(gm.meta.get(LAYOUT_FREE_OUTPUTS) or ())
    output_node.meta["user_visible_output_idxs"] = [
        index for index, value in enumerate(outputs) if isinstance(value, torch.fx.Node) and index not in free]


def _int_strides(reported: Any) -> list[tuple[int, ...] | None] | None:
    """Inductor's reported output strides as int tuples (``None`` entries where it reported none)."""
    if not isinstance(reported, list):
        return None
    strides: list[tuple[int, ...] | None] = []
    for item in reported:
        # a symbolic stride is unknown for other sizes; int() of it would specialize the ShapeEnv to this
        # size, and the backward compiled next would then assert this size's shapes on every later call
        if item is None or any(isinstance(stride, torch.SymInt) for stride in item):
            strides.append(None)
            continue
        try:
            strides.append(tuple(int(stride) for stride in item))
        except (TypeError, ValueError):  # other symbolic forms (sympy expressions)
            strides.append(None)
    return strides


# ops whose Inductor lowering raises unless config.fallback_random ("should have been handled in
# replace_random.py"): compile_fx's replace_random pass, which we bypass, rewrites them first
_UNLOWERED_RANDOM_OPS = ("aten.rand.default", "aten.randn.default", "aten.native_dropout.default")


def unlowered_random_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """A used node that Inductor cannot lower here without ``fallback_random`` (NOTE [Random ops run ATen's
    kernels]), or None. Random ops with an explicit generator lower without it."""
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.users and str(node.target) in _UNLOWERED_RANDOM_OPS
                and node.kwargs.get("generator") is None):
            return node
    return None


def _compile_fx(graph_module: torch.fx.GraphModule, fake_inputs: list, fake_mode: Any, patches: dict[str, Any],
                on_gpu: bool) -> tuple[Any, Any, Any]:
    """Inductor's ``compile_fx_inner`` under ``patches``: (compiled graph, reported output strides, Triton kernels)."""
    from torch._guards import TracingContext, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.virtualized import V

    with inductor_config.patch(patches), V.set_fake_mode(fake_mode), tracing(TracingContext(fake_mode)), \
            TracingContext.report_output_strides() as reported_strides, \
            triton_kernels.collecting(enabled=on_gpu) as triton:
        compiled = compile_fx_inner(graph_module, fake_inputs)
    if on_gpu and not triton:  # Inductor bundled the kernels itself (its FX graph cache on, ...)
        triton = triton_kernels.from_compiled(compiled)
    return compiled, reported_strides, triton


def inductor_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                      options: dict[str, Any] | None = None) -> InductorCompiledGraph | Any:
    """Compile ``gm`` with Inductor (Python wrapper); ``options`` are ``torch._inductor.config`` overrides.

    ``gm`` must have been traced with :func:`decompositions` (Inductor lowers only what its table leaves;
    other ops fail with "both a fallback and a decomp"). ``example_inputs`` may be real or fake tensors and
    ints/SymInts; a graph returning a single value is compiled as returning a 1-tuple.
    """
    check_supported_ops(gm, COMPILER_NAME)
    graph_module = aoti_lib.copy_graph_module(gm)  # Inductor's passes mutate the graph
    _ensure_tuple_output(graph_module)
    spell_storage_offsets(graph_module)  # NOTE [Storage offsets of input views under Inductor]
    fake_inputs, fake_mode = _fake_inputs_and_mode(graph_module, example_inputs)
    floats = tensorify_float_inputs(graph_module, fake_mode, runs_on_gpu(fake_inputs))  # NOTE [Float inputs for
    if floats is not None:  # Inductor]: float placeholders become 0-d float64 tensors
        fake_inputs = [node.meta["val"] for node in graph_module.graph.nodes if node.op == "placeholder"]
    _keep_traced_output_strides(graph_module)
    # NOTE [Random ops run ATen's kernels]: Inductor lowers rand/randn only after its own replace_random pass
    # (part of compile_fx's joint-graph passes, which we bypass), else it fails ("should have been handled in
    # replace_random.py"). Such a graph is compiled again with fallback_random, which makes random ops call
    # ATen's kernels on the global generator: eager's values and generator state under the same seed. It is not
    # the default: Inductor's own dropout is faster (TransformerEncoderLayer's training step: ~5%). Pass
    # options={"fallback_random": True} for eager's random values in every graph.
    # Graphs known to fail that way (rand/randn nodes: Inductor's table turns randn_like, rand_like and
    # bernoulli into them) get fallback_random at once instead of after a failed lowering (compiling twice);
    # the retry below stays for any other graph whose lowering fails so.
    patches = {"fx_graph_cache": False, "fx_graph_remote_cache": False, **(options or {})}
    if "fallback_random" not in patches and unlowered_random_node(graph_module) is not None:
        patches["fallback_random"] = True
    on_gpu = runs_on_gpu(fake_inputs)
    warm_up(fake_inputs)  # NOTE [warming the compile workers]; at once if the AOT pipeline did it already
    fallback_random = bool(patches.get("fallback_random"))
    try:
        compiled, reported_strides, triton = _compile_fx(graph_module, fake_inputs, fake_mode, patches, on_gpu)
    except Exception as exc:  # noqa: BLE001 - only the unlowered-random failure is retried, anything else re-raised
        if "replace_random" not in str(exc) or "fallback_random" in patches:
            raise
        fallback_random = True
        graph_module = aoti_lib.copy_graph_module(gm)
        _ensure_tuple_output(graph_module)
        spell_storage_offsets(graph_module)
        tensorify_float_inputs(graph_module, fake_mode, on_gpu)
        _keep_traced_output_strides(graph_module)
        compiled, reported_strides, triton = _compile_fx(graph_module, fake_inputs, fake_mode,
                                                         {**patches, "fallback_random": True}, on_gpu)
    source = getattr(compiled, "source_code", None)
    call = getattr(compiled, "current_callable", None)
    if not isinstance(source, str) or call is None:
        # Inductor generates no code for a graph without compute (only views, or returning its inputs) and
        # hands back the graph itself: that graph, run as it is, is exactly the nop compiler's artifact.
        from aotcache.compilers.nop import nop_compiler

        return nop_compiler(gm, example_inputs)  # type: ignore[return-value]
    constants = {name: value for name, value in (getattr(compiled, "constants", None) or {}).items()
                 if isinstance(value, torch.Tensor)}
    identity = aoti_lib.host_identity("cpu")
    identity["vec_isa"] = aoti_lib.inductor_vec_isa()
    result = InductorCompiledGraph(call, source=source, constants=constants, kernels=_kernel_libraries(call),
                                   inputs_to_check=list(getattr(compiled, "inputs_to_check", ()) or ()),
                                   identity=identity, input_layouts=expected_layouts(fake_inputs), triton=triton,
                                   floats=floats)
    result.output_strides = _int_strides(reported_strides)
    if fallback_random and random_generators(gm) == (None,):  # NOTE [Double backward through random ops]
        result.eager_random_draws = (None,)
    if floats is not None and result.output_strides is not None:
        for out, _ in floats.passthrough:  # the caller's float, not the tensor Inductor returned
            if out < len(result.output_strides):
                result.output_strides[out] = None
    return result


inductor_compiler.decompositions = decompositions  # type: ignore[attr-defined]
inductor_compiler.warm_up = warm_up  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


def _seed_kernel(root: Path, relative_path: str, data: bytes) -> None:
    parts = Path(relative_path).parts
    if Path(relative_path).is_absolute() or ".." in parts or not relative_path.endswith(".so"):
        raise ArtifactError(f"inductor artifact names an unsafe kernel path {relative_path!r}")
    target = root / relative_path
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def _layouts_from_meta(meta: dict[str, Any]) -> list[dict[str, list[int]] | None]:
    layouts = meta.get("input_layouts", [])
    if not isinstance(layouts, list) or not all(layout is None or isinstance(layout, dict) for layout in layouts):
        raise ArtifactError("inductor artifact has malformed input_layouts")
    return layouts


def load(artifact: Artifact) -> InductorCompiledGraph:
    """Rebuild from an unpacked artifact (imports Inductor). :raises ArtifactError: malformed or other torch."""
    meta, blobs = artifact.meta, artifact.blobs
    identity = dict(meta.get("identity") or {})
    here = aoti_lib.host_identity("cpu")
    for part in ("torch", "torch_git"):
        if identity.get(part) != here.get(part):
            raise ArtifactError(f"inductor artifact was built with {part} {identity.get(part)!r}, this process "
                                f"has {here.get(part)!r}; recompile with this torch")
    try:
        source = blobs[_WRAPPER_BLOB].decode("utf-8")
        kernel_names = [str(name) for name in meta.get("kernels", [])]
        kernels = {name: blobs[_KERNEL_PREFIX + name] for name in kernel_names}
        constants: dict[str, torch.Tensor] = {}
        if meta.get("constants"):
            constants = torch.load(io.BytesIO(blobs[_CONSTANTS_BLOB]), weights_only=True)
    except (KeyError, UnicodeDecodeError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"inductor artifact is incomplete: {exc}") from exc
    triton = triton_kernels.from_artifact(meta.get("triton"), blobs)  # checked before anything is written
    try:
        floats = FloatInputs.from_meta(meta.get("float_inputs"))  # NOTE [Float inputs for Inductor]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"inductor artifact has malformed float inputs: {exc}") from exc
    from torch._inductor.codecache import PyCodeCache

    root = _inductor_cache_dir()
    for name, data in kernels.items():
        _seed_kernel(root, name, data)
    from torch._inductor import config as inductor_config

    # NOTE [skipping the ISA probe]: picking the vector ISA normally compiles and runs a probe program (~5 s).
    # When this host reports the CPU capability the kernels were built on, the probe cannot tell us more.
    # Inductor still compiles its small extension probes (avx512_bf16, avx512_vnni) once per cache dir on
    # hosts that have them, so a first load there needs a C++ compiler.
    same_cpu = identity.get("cpu_capability") == here.get("cpu_capability") and \
        identity.get("machine") == here.get("machine")
    patches: dict[str, Any] = {"cpp.vec_isa_ok": True} if same_cpu else {}
    if triton_kernels.restore(triton):
        patches["compile_threads"] = 1  # cache hits in this process: no compile worker pool to start
    with inductor_config.patch(patches):
        key, path = PyCodeCache.write(source)
        module = PyCodeCache.load_by_key_path(key, path, attrs=dict(constants))
    sys.modules.setdefault(module.__name__, module)
    loaded = InductorCompiledGraph(module.call, source=source, constants=constants, kernels=kernels,
                                   inputs_to_check=[int(i) for i in meta.get("inputs_to_check", [])],
                                   identity=identity, input_layouts=_layouts_from_meta(meta), triton=triton,
                                   floats=floats)
    loaded.eager_random_draws = (None,) if meta.get("eager_random") is True else None
    return loaded
