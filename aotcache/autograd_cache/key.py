"""The compiled-graph cache key: a digest over *named parts*, each part's digest kept so a miss can be explained.

``compute_key(gm, example_inputs, ...)`` builds a :class:`CacheKey` from:

========== ==================================================================================================
graph      canonical text of the FX graph: node names normalized by position, targets by qualified name
inputs     per input: dtype, shape / symbol, stride, storage offset, device, layout, requires_grad, format
constants  tensor constants (``get_attr`` tensors that are not parameters or buffers), by content hash
custom_code digests of torch.library custom ops and ``@cacheable`` user functions in the graph
grad_mode  grad mode and inference mode
autocast   autocast state per device type
numerics   default dtype, float32 matmul precision, deterministic algorithms, torch.backends flags
           (cudnn, mkldnn, TF32 / reduced-precision matmul, SDPA backends, opt-einsum, fp32 precision)
compiler   compiler name and options (custom compilers and callables by :func:`callable_digest`)
partitioner, decompositions, config, extra   as given by the caller
system     aotcache version and source digest, torch / Python versions, CPU ISA, GPU arch, triton version
========== ==================================================================================================

NOTE [What never enters the key]
``id()``, ``hash()`` of objects, absolute paths, timestamps, node names and parameter values: all of them
differ between processes (or between training steps) without changing the compiled result, and would turn
every warm start into a miss. Parameters and buffers contribute their metadata only; they are runtime inputs.

NOTE [Code digests are sound or absent]
Every piece of code or object state that enters the key (custom compilers, partitioners, decomposition
tables, callable or object options, ``@cacheable`` functions, custom-op registrations) is written down by
the same walker as the call fingerprint, :class:`aotcache.autograd_cache.reachable.Reachable`: functions by
bytecode, closures, defaults and referenced globals; objects by class code and whole instance state; bound
methods with their ``__self__``. When something cannot be written down deterministically (an opaque C
object, a file handle, a limit exceeded) the key is not computed: :class:`BypassAOTAutogradCache` with
reason ``unhashable <what>: <why>``, counted by the cache. Never a type name in place of state: that is
how two compiler wrappers around different compilers once shared a key.
"""

from __future__ import annotations

import collections
import enum
import functools
import hashlib
import importlib.metadata
import json
import platform
import sys
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.fx

from aotcache.aot.ambient import numerics_flags
from aotcache.aot.exact_values import exact_repr
from aotcache.autograd_cache import guards, reachable, safety
from aotcache.autograd_cache.compiler_settings import UnreadableCompilerSettings, global_compiler_settings
from aotcache.autograd_cache.digests import Untrusted, canonical_json, tensor_content_digest
from aotcache.autograd_cache.reachable import custom_op_digest
from aotcache.autograd_cache.numpy_calls import numpy_call_token
from aotcache.autograd_cache.safety import BypassAOTAutogradCache
from aotcache.autograd_cache.value_kinds import is_core_library
from aotcache.compilers import aoti_lib

__all__ = [
    "KEY_SCHEMA_VERSION",
    "KeyPart",
    "CacheKey",
    "compute_key",
    "canonical_graph",
    "normalize_placeholder_names",
    "system_parts",
    "current_autocast_state",
    "explain_difference",
    "callable_digest",
    "custom_op_digest",
    "tensor_content_digest",
]

KEY_SCHEMA_VERSION = 1
_MAX_DETAIL_BYTES = 256 * 1024  # details larger than this are not recorded (the digest still is)


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# ----------------------------------------------------------------------------------------------------
# KeyPart / CacheKey
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPart:
    """One named ingredient of a key: its digest, and (when small) a JSON-ready detail to explain misses."""

    name: str
    digest: str
    detail: Any = None

    @classmethod
    def of(cls, name: str, value: Any, *, detail: Any = ...) -> KeyPart:
        """The part for a JSON-ready ``value``; ``detail`` defaults to the value itself when it is small."""
        text = canonical_json(value)
        if detail is ...:
            detail = value if len(text) <= _MAX_DETAIL_BYTES else None
        return cls(name, _sha256(text), detail)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "detail": self.detail}


@dataclass(frozen=True)
class CacheKey:
    """A key built from named parts; ``digest`` (sha256 hex) is what the store is indexed by."""

    parts: tuple[KeyPart, ...]
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        names = [part.name for part in self.parts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"CacheKey parts must have unique names; repeated: {', '.join(duplicates)}")
        ordered = tuple(sorted(self.parts, key=lambda part: part.name))
        object.__setattr__(self, "parts", ordered)
        body = canonical_json({"schema": KEY_SCHEMA_VERSION, "parts": [[p.name, p.digest] for p in ordered]})
        object.__setattr__(self, "digest", _sha256(body))

    def parts_digests(self) -> dict[str, str]:
        """``{part name: digest}``, to record with an entry."""
        return {part.name: part.digest for part in self.parts}

    def part(self, name: str) -> KeyPart:
        """The part called ``name``. :raises KeyError: naming the known parts."""
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"no key part {name!r}; parts: {', '.join(p.name for p in self.parts)}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready record (digest and every part with its detail), to store next to an entry."""
        return {"schema": KEY_SCHEMA_VERSION, "digest": self.digest,
                "parts": {part.name: part.to_json() for part in self.parts}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CacheKey:
        """Rebuild from :meth:`to_json`. :raises ValueError: the record is malformed or of another schema."""
        if not isinstance(data, Mapping) or data.get("schema") != KEY_SCHEMA_VERSION or "parts" not in data:
            raise ValueError(f"not a CacheKey record of schema {KEY_SCHEMA_VERSION}")
        parts = tuple(KeyPart(name, str(body["digest"]), body.get("detail")) for name, body in data["parts"].items())
        return cls(parts)


# ----------------------------------------------------------------------------------------------------
# Code digests (NOTE [Code digests are sound or absent])
# ----------------------------------------------------------------------------------------------------


def _unhashable(what: str, exc: Untrusted) -> BypassAOTAutogradCache:
    """The bypass for a ``what`` (e.g. "compiler") whose code or state the walker could not write down."""
    where = f" (in {exc.where})" if exc.where else ""
    return BypassAOTAutogradCache(f"unhashable {what}: {exc.reason}{where}")


def callable_digest(fn: Any, what: str = "callable") -> str:
    """Digest of a callable's implementation and state: code, closures, referenced user code, ``__self__``,
    ``functools.partial`` arguments, instance state of callable objects (see :func:`reachable.value_digest`).

    :raises BypassAOTAutogradCache: ``"unhashable <what>: <reason>"`` when part of it cannot be written down.
    """
    try:
        return reachable.value_digest(fn)
    except Untrusted as exc:
        raise _unhashable(what, exc) from None


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------------
# Graph canonicalization
# ----------------------------------------------------------------------------------------------------

_KEYED_NODE_META = ("recompute", "ac_graph_id", "partitioner_tag")

# NOTE [A checkpoint's context_fn in the key]
# Dynamo keeps a checkpointed region's ``context_fn`` (``create_selective_checkpoint_contexts(policy)``) on the
# region's body as ``meta["_checkpoint_context_fn"]``, not in any node: the graph text of a region is the same
# whatever its policy. The capture asks that policy what to save (NOTE [Checkpointed regions traced in line]), so
# a model whose policy changed (MUST_SAVE matmuls, then MUST_RECOMPUTE everything), or that gained one, was served
# the entry captured for the other policy: other saved values than asked (the memory checkpointing exists for),
# and a context_fn with its own dispatch modes could compute other values. Its digest (code, closure, partial
# arguments: the policy) is a custom_code part of the key; one that cannot be written down bypasses the cache.


def normalize_placeholder_names(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``{placeholder name: "arg<position>"}``: the names the canonical graph uses, so renaming inputs hits.

    Unlike PyTorch's context manager of the same purpose, this never mutates ``gm``.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return {node.name: f"arg{position}" for position, node in enumerate(placeholders)}


@dataclass
class CanonicalGraph:
    """The canonical text of a graph and what it references (filled by :func:`canonical_graph`)."""

    lines: list[str] = field(default_factory=list)
    op_counts: Counter = field(default_factory=Counter)
    constants: list[dict[str, Any]] = field(default_factory=list)
    custom_code: dict[str, str] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class _GraphCanonicalizer:
    def __init__(self, result: CanonicalGraph, lifted_attributes: Iterable[str] | None) -> None:
        self.result = result
        self.subgraph_count = 0
        self.lifted = None if lifted_attributes is None else frozenset(lifted_attributes)

    def run(self, gm: torch.fx.GraphModule, prefix: str) -> None:
        names: dict[torch.fx.Node, str] = {}
        placeholder_names = normalize_placeholder_names(gm)
        if self.lifted is not None and (not prefix or not self.lifted):
            # nothing lifted (aot_function: NOTE [Closed-over parameters in the key]): subgraphs' tensors are
            # constants as well
            state = set(self.lifted) if not prefix else set()
        else:
            state = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        for index, node in enumerate(gm.graph.nodes):
            names[node] = placeholder_names[node.name] if node.op == "placeholder" else f"%{index}"
            target = self.target_token(gm, node, state, prefix)
            args = self.value(node.args, names)
            kwargs = self.value(dict(node.kwargs), names)
            meta = {key: self.value(node.meta[key], names) for key in _KEYED_NODE_META if key in node.meta}
            line = f"{prefix}{names[node]} = {node.op} {target} {args} {kwargs}"
            self.result.lines.append(line + (f" meta={meta}" if meta else ""))
            if node.op == "call_module":
                self.result.op_counts["module:" + _type_name(type(gm.get_submodule(node.target)))] += 1
            elif node.op in ("call_function", "call_method"):
                self.result.op_counts[target] += 1

    def target_token(self, gm: torch.fx.GraphModule, node: torch.fx.Node, state: set[str], prefix: str) -> str:
        if node.op in ("placeholder", "output"):
            return ""
        if node.op == "call_method":
            return f".{node.target}"
        if node.op == "call_function":
            return self.callable_name(node.target)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            tensors = [f"{name}:{_tensor_meta_token(t)}" for name, t in
                       (*module.named_parameters(), *module.named_buffers())]
            return (f"module:{_type_name(type(module))}({module.extra_repr()}) training={module.training} "
                    f"state=[{', '.join(tensors)}]")
        if node.op == "get_attr":
            return self.attribute_token(gm, node.target, state, prefix)
        raise BypassAOTAutogradCache(f"unsupported node op: {node.op}")

    def callable_name(self, target: Any) -> str:
        numpy_token = numpy_call_token(target)  # NOTE [NumPy calls in a Dynamo graph]
        if numpy_token is not None:
            return numpy_token
        name = safety.qualified_name(target)
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            try:
                digest = custom_op_digest(target)
            except Untrusted as exc:
                raise _unhashable(f"custom op {name}", exc) from None
            if digest is not None:
                self.result.custom_code[f"op:{name}"] = digest
            return name
        if isinstance(target, types.FunctionType) and not is_core_library(target.__module__):
            # user code, or an installed package's function (its digest names the package version)
            self.result.custom_code[f"fn:{name}"] = callable_digest(target, f"function {name}")
        return name

    def attribute_token(self, gm: torch.fx.GraphModule, target: str, state: set[str], prefix: str) -> str:
        value: Any = gm
        for atom in target.split("."):
            value = getattr(value, atom)
        if isinstance(value, torch.fx.GraphModule):
            self.subgraph_count += 1
            sub_prefix = f"{prefix}sub{self.subgraph_count}/"
            context_fn = value.meta.get("_checkpoint_context_fn")  # NOTE [A checkpoint's context_fn in the key]
            if context_fn is not None:
                self.result.custom_code[f"checkpoint_context_fn:{sub_prefix}"] = callable_digest(
                    context_fn, f"activation checkpoint context_fn {getattr(context_fn, '__name__', context_fn)!r}")
            self.run(value, sub_prefix)
            return f"subgraph:{sub_prefix}"
        if isinstance(value, torch.Tensor):
            self.result.devices.add(value.device.type if value.device.index is None else str(value.device))
            if target in state:  # lifted to a runtime input (parameters by default): value never enters the key
                return f"state:{_tensor_meta_token(value)}"
            self.result.constants.append({"dtype": str(value.dtype).removeprefix("torch."),
                                          "shape": list(value.shape), "sha256": tensor_content_digest(value)})
            return f"const{len(self.result.constants) - 1}"
        if isinstance(value, (int, float, bool, str, type(None))):  # NOTE [NaNs written down by bits] in
            # aot/exact_values.py
            return f"value:{exact_repr(value)}"
        raise BypassAOTAutogradCache(f"opaque object: {type(value).__name__}")

    def value(self, value: Any, names: Mapping[torch.fx.Node, str]) -> str:
        """A deterministic token for a node argument (nodes by normalized name)."""
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, (bool, int, float, complex, str, type(None))):  # NOTE [NaNs written down by bits] in
            # aot/exact_values.py
            return exact_repr(value)
        if isinstance(value, torch.Size):
            return "Size(" + ", ".join(self.value(v, names) for v in value) + ")"
        if isinstance(value, tuple):
            return "(" + "".join(self.value(v, names) + ", " for v in value) + ")"
        if isinstance(value, list):
            return "[" + ", ".join(self.value(v, names) for v in value) + "]"
        if isinstance(value, dict):
            items = sorted((repr(k), self.value(v, names)) for k, v in value.items())
            return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
        if isinstance(value, slice):
            return f"slice({self.value(value.start, names)}, {self.value(value.stop, names)}, " \
                   f"{self.value(value.step, names)})"
        if value is Ellipsis:
            return "..."
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return str(value)
        if isinstance(value, torch.device):
            self.result.devices.add(value.type if value.index is None else str(value))
            return repr(value)
        if isinstance(value, enum.Enum):
            return f"{_type_name(type(value))}.{value.name}"
        if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            return self.callable_name(value)
        if isinstance(value, torch.Tensor):
            self.result.constants.append({"dtype": str(value.dtype).removeprefix("torch."),
                                          "shape": list(value.shape), "sha256": tensor_content_digest(value)})
            return f"const{len(self.result.constants) - 1}"
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) and safety.is_marked_cacheable(value):
            return self.callable_name(value)
        raise BypassAOTAutogradCache(f"unhashable argument: {type(value).__name__}")


def _tensor_meta_token(tensor: torch.Tensor) -> str:
    stride = list(tensor.stride()) if tensor.layout == torch.strided else []
    return (f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}/{stride}@{tensor.device}"
            f"{'/grad' if tensor.requires_grad else ''}")


def canonical_graph(gm: torch.fx.GraphModule, lifted_attributes: Iterable[str] | None = None) -> CanonicalGraph:
    """The canonical text of ``gm`` (names normalized, targets qualified, nested subgraphs inlined).

    ``get_attr`` tensors named in ``lifted_attributes`` (default: ``gm``'s parameters) contribute metadata
    only; every other tensor attribute is a constant baked into the compiled code and is hashed by content.

    :raises BypassAOTAutogradCache: the graph holds something that cannot be written down deterministically.
    """
    result = CanonicalGraph()
    _GraphCanonicalizer(result, lifted_attributes).run(gm, "")
    return result


# ----------------------------------------------------------------------------------------------------
# Ambient state and system parts
# ----------------------------------------------------------------------------------------------------


def current_autocast_state(device_types: Iterable[str] = ()) -> dict[str, Any]:
    """Current autocast state for cpu, cuda and the given device types: enabled flag and dtype of each."""
    state: dict[str, Any] = {"cache_enabled": bool(torch.is_autocast_cache_enabled())}
    for device_type in sorted({"cpu", "cuda", *device_types} - {"meta"}):
        try:
            enabled = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type)
        except RuntimeError:  # a device type this torch build does not know
            continue
        state[device_type] = {"enabled": bool(enabled), "dtype": str(dtype).removeprefix("torch.")}
    return state


def _numerics_state() -> dict[str, Any]:
    """Every global flag that changes what a graph computes (NOTE [Numerics flags] in aotcache/aot/ambient.py)."""
    return numerics_flags()


# Subtrees of the package whose code decides what a compiled entry contains.
_RESULT_DEFINING_SOURCES = ("aot", "compilers", "autograd_cache", "backend.py")


@functools.lru_cache(maxsize=1)
def _aotcache_source_digest() -> str:
    """Digest of the aotcache sources that produce compiled entries (relative paths and bytes).

    NOTE [Source digest memo] computed once per process (a documented memo of files that do not change
    under a running program): a development checkout then never serves entries built by older code.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _RESULT_DEFINING_SOURCES:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else ([path] if path.is_file() else [])
        for file in files:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def system_parts(devices: Iterable[str] = ()) -> dict[str, Any]:
    """Versions and hardware that decide compiled code: aotcache, torch, Python, CPU ISA, GPU arch, triton.

    ``devices`` are the device strings the graph uses ("cpu", "cuda:0"); GPU facts are read only for them.
    Torch's Inductor is not imported here (it costs over a second on a warm start).
    """
    import aotcache

    parts: dict[str, Any] = {
        "aotcache": aotcache.__version__,
        "aotcache_source": _aotcache_source_digest(),
        "torch": str(torch.__version__),
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "python": f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}",
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # VNNI, AVX512-BF16, AMX: Inductor builds for them when present (NOTE [vector ISA = level + extensions])
        "cpu_extensions": aoti_lib.cpu_extensions(),
    }
    device_types = {device.split(":")[0] for device in devices}
    if "cuda" in device_types and torch.cuda.is_available():
        indices = sorted({int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
                          for device in devices if device.startswith("cuda")})
        if torch.version.hip:
            parts["gpu_arch"] = [torch.cuda.get_device_properties(index).gcnArchName for index in indices]
            parts["hip"] = str(torch.version.hip)
        else:
            parts["gpu_arch"] = ["sm_%d%d" % torch.cuda.get_device_capability(index) for index in indices]
            parts["cuda"] = str(torch.version.cuda)
        parts["triton"] = _distribution_version("triton", "pytorch-triton", "pytorch-triton-rocm")
    for other in sorted(device_types - {"cpu", "cuda", "meta"}):
        parts[f"device:{other}"] = True
    return parts


# ----------------------------------------------------------------------------------------------------
# compute_key
# ----------------------------------------------------------------------------------------------------


def _json_value(value: Any, where: str) -> Any:
    """A JSON-ready form of a caller-supplied option value; callables and objects by :func:`callable_digest`
    (code and state), never by address or type name."""
    if isinstance(value, float):
        return {"float": exact_repr(value)}  # NOTE [NaNs written down by bits] in aot/exact_values.py
    if isinstance(value, (bool, int, str, type(None))):
        return value
    if isinstance(value, PurePath):
        raise ValueError(f"{where} is a path ({value}); paths must not enter the cache key (they differ between "
                         "machines without changing the result): leave output locations out of the options")
    if isinstance(value, enum.Enum):
        return f"{_type_name(type(value))}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, Mapping) and type(value) in (dict, collections.OrderedDict):
        result = {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
        if len(result) != len(value):  # {1: a, "1": b}: two entries would collapse into one
            raise BypassAOTAutogradCache(f"unhashable option: {where}: keys that print alike")
        return result
    if type(value) in (list, tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) in (set, frozenset):
        return sorted((_json_value(v, where) for v in value), key=canonical_json)
    if type(value) is object:  # a bare sentinel: only its identity, which no process shares, tells it apart
        raise BypassAOTAutogradCache(f"unhashable option: {where}: a bare object() has no state to key by")
    digest = callable_digest(value, f"option: {where}")
    if callable(value):
        return {"callable": safety.qualified_name(value), "code": digest}
    return {"object": _type_name(type(value)), "state": digest}


_MAX_NODE_DIGESTS = 20_000


def _graph_detail(graph: CanonicalGraph) -> dict[str, Any]:
    """Operator counts and a short digest per node line: enough to say which node changed, small to store."""
    detail: dict[str, Any] = {"nodes": len(graph.lines), "ops": dict(graph.op_counts)}
    if len(graph.lines) <= _MAX_NODE_DIGESTS:
        detail["node_digests"] = [_sha256(line)[:8] for line in graph.lines]
    return detail


def _extra_hashes(extra_hashes: Iterable[str | bytes]) -> list[str]:
    result = []
    for item in extra_hashes:
        if isinstance(item, bytes):
            result.append(_sha256(item))
        elif isinstance(item, str):
            result.append(item)
        else:
            raise TypeError(f"extra_hashes items must be str or bytes, got {type(item).__name__}: pass a digest "
                            "string (e.g. hashlib.sha256(...).hexdigest()) or raw bytes")
    return result


# NOTE [Inductor settings and the nop compiler]
# The nop compiler runs the traced graph as it is (no Inductor decompositions, no code generation), so Inductor's
# settings cannot change what it produces. Writing them into its key made a warm process that only differed in
# ``TORCHINDUCTOR_COMPILE_THREADS=1`` or ``TORCHINDUCTOR_FX_GRAPH_CACHE=0`` miss and compile again (found in the
# session 16 review of the key change). Only ``TORCHINDUCTOR_*`` variables and ``torch._inductor.config`` are
# left out, and only when every compiler of the call is the nop compiler; Dynamo's and the compile variables stay.
_INDUCTOR_VARIABLE_PREFIX = "TORCHINDUCTOR_"


def _only_nop_compilers(compiler_name: Any, compiler_options: Mapping[str, Any] | None) -> bool:
    """Whether the forward, backward and inference compilers are all aotcache's nop compiler."""
    if compiler_name != "nop":
        return False
    options = dict(compiler_options or {})
    return all(options.get(which, "nop") == "nop" for which in ("forward", "backward", "inference"))


def _global_compiler_part(reads_inductor: bool = True) -> dict[str, Any]:
    """The process-wide compiler settings (NOTE [Global compiler settings in the key]); nothing when all are at
    their defaults, so such keys are what they were. Without Inductor's own settings when no compiler of the
    call reads them (NOTE [Inductor settings and the nop compiler])."""
    try:
        variables, inductor = global_compiler_settings()
    except UnreadableCompilerSettings as exc:
        raise BypassAOTAutogradCache(exc.reason) from None
    if not reads_inductor:
        variables = [item for item in variables if not item.startswith(_INDUCTOR_VARIABLE_PREFIX)]
        inductor = {}
    part: dict[str, Any] = {}
    if variables:
        part["environment"] = variables
    if inductor:
        try:
            part["inductor_config"] = _json_value(inductor, "inductor_config")
        except ValueError as exc:  # a path: set by the process, not by this compile's options
            raise BypassAOTAutogradCache(f"unhashable option: inductor_config: {exc}") from None
    return part


def compute_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                compiler_name: str | BypassAOTAutogradCache,
                partitioner_name: str | BypassAOTAutogradCache,
                decomposition_id: str | BypassAOTAutogradCache,
                compiler_options: Mapping[str, Any] | None = None,
                config_parts: Mapping[str, Any] | None = None,
                extra_hashes: Iterable[str | bytes] = (),
                grad_enabled: bool | None = None,
                autocast_state: Mapping[str, Any] | None = None,
                lifted_attributes: Iterable[str] | None = None,
                check_safety: bool = True) -> CacheKey:
    """The cache key of compiling ``gm`` for ``example_inputs`` with the given compiler and AOT settings.

    ``example_inputs`` are one per placeholder (real or fake); a placeholder's symbolic fake value in its
    meta is preferred, so dynamic dimensions enter as position-normalized symbols. Grad mode and autocast
    default to the current state. ``lifted_attributes`` names the ``gm`` attributes (parameters, buffers)
    that the runtime passes as inputs, as ``aot_module_simplified`` does: their values never enter the key.
    By default only parameters are treated so; other tensor attributes are hashed by content.
    ``compiler_name`` / ``partitioner_name`` / ``decomposition_id`` may be the :class:`BypassAOTAutogradCache`
    the caller got while identifying that part: it is raised here, where the caller counts bypasses.

    :raises BypassAOTAutogradCache: the graph is not safe to cache (see ``safety``) or holds something
        the key cannot describe (``"unhashable option: compiler_options.forward: opaque object: ..."``).
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"compute_key needs a torch.fx.GraphModule, got {type(gm).__name__}")
    inputs = guards.symbolic_inputs(gm, example_inputs)
    for identity in (compiler_name, partitioner_name, decomposition_id):
        if isinstance(identity, BypassAOTAutogradCache):
            raise identity  # the caller could not identify a part (see pipeline.decomposition_identity)
    if check_safety:
        safety.check_cacheable(gm, inputs)
    graph = canonical_graph(gm, lifted_attributes)
    described_inputs = guards.describe_inputs(inputs)
    devices = set(graph.devices)
    devices |= {d["device"] for d in described_inputs if d.get("kind") == "tensor"}
    device_types = {device.split(":")[0] for device in devices}
    ambient_autocast = (_json_value(autocast_state, "autocast_state") if autocast_state is not None
                        else current_autocast_state(device_types))
    parts = [
        KeyPart.of("graph", graph.text, detail=_graph_detail(graph)),
        KeyPart.of("inputs", described_inputs),
        KeyPart.of("constants", graph.constants),
        KeyPart.of("custom_code", graph.custom_code),
        KeyPart.of("grad_mode", {"grad_enabled": torch.is_grad_enabled() if grad_enabled is None else bool(grad_enabled),
                                 "inference_mode": bool(torch.is_inference_mode_enabled())}),
        KeyPart.of("autocast", ambient_autocast),
        KeyPart.of("numerics", _numerics_state()),
        KeyPart.of("compiler", {"name": compiler_name,
                                "options": _json_value(dict(compiler_options or {}), "compiler_options"),
                                **_global_compiler_part(not _only_nop_compilers(compiler_name, compiler_options))}),
        KeyPart.of("partitioner", partitioner_name),
        KeyPart.of("decompositions", decomposition_id),
        KeyPart.of("config", _json_value(dict(config_parts or {}), "config_parts")),
        KeyPart.of("extra", _extra_hashes(extra_hashes)),
        KeyPart.of("system", system_parts(sorted(devices))),
    ]
    return CacheKey(tuple(parts))


# ----------------------------------------------------------------------------------------------------
# Explaining a miss
# ----------------------------------------------------------------------------------------------------

_PART_LABELS = {
    "graph": "graph", "inputs": "input metadata", "constants": "tensor constants", "custom_code": "custom code",
    "grad_mode": "grad mode", "autocast": "autocast state", "numerics": "numerics settings",
    "compiler": "compiler", "partitioner": "partitioner", "decompositions": "decompositions",
    "config": "config", "extra": "extra hashes", "system": "system",
}
_MAX_EXPLANATIONS_PER_PART = 8


def _as_part_records(parts: Any) -> dict[str, tuple[str, Any]]:
    if isinstance(parts, CacheKey):
        return {part.name: (part.digest, part.detail) for part in parts.parts}
    if isinstance(parts, Mapping):
        body = parts.get("parts", parts) if isinstance(parts.get("parts"), Mapping) else parts
        records = {}
        for name, value in body.items():
            if isinstance(value, Mapping):
                records[name] = (str(value.get("digest")), value.get("detail"))
            else:
                records[name] = (str(value), None)
        return records
    if isinstance(parts, Iterable):
        return {part.name: (part.digest, part.detail) for part in parts}
    raise TypeError(f"explain_difference needs a CacheKey, its to_json() or parts_digests(), got {type(parts)}")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12]  # a digest: the prefix is enough to tell two apart
    return text if len(text) <= 80 else text[:77] + "..."


def _diff_values(path: str, a: Any, b: Any, out: list[str]) -> None:
    if a == b:
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path} {key}".strip()
            if key not in a:
                out.append(f"{sub} absent vs {_short(b[key])}")
            elif key not in b:
                out.append(f"{sub} {_short(a[key])} vs absent")
            else:
                _diff_values(sub, a[key], b[key], out)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and path.endswith(("shape", "stride")):
        out.append(f"{path} {_short(a)} vs {_short(b)}")
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path} has {len(a)} items vs {len(b)}".strip())
        for index, (item_a, item_b) in enumerate(zip(a, b)):
            _diff_values(f"{path}[{index}]" if path else f"item {index}", item_a, item_b, out)
        return
    out.append(f"{path} {_short(a)} vs {_short(b)}".strip())


def _explain_part(name: str, detail_a: Any, detail_b: Any) -> list[str]:
    label = _PART_LABELS.get(name, name)
    out: list[str] = []
    if name in ("inputs", "constants") and isinstance(detail_a, list) and isinstance(detail_b, list):
        noun, item = ("inputs", "arg") if name == "inputs" else ("constants", "constant")
        if len(detail_a) != len(detail_b):
            out.append(f"{len(detail_a)} {noun} vs {len(detail_b)}")
        for index, (a, b) in enumerate(zip(detail_a, detail_b)):
            _diff_values(f"{item} {index}", a, b, out)
    elif name == "graph" and isinstance(detail_a, Mapping) and isinstance(detail_b, Mapping):
        if detail_a.get("nodes") != detail_b.get("nodes"):
            out.append(f"{detail_a.get('nodes')} nodes vs {detail_b.get('nodes')}")
        ops_a, ops_b = detail_a.get("ops", {}), detail_b.get("ops", {})
        for op in sorted(set(ops_a) | set(ops_b)):
            if ops_a.get(op, 0) != ops_b.get(op, 0):
                out.append(f"{op} used {ops_a.get(op, 0)} time(s) vs {ops_b.get(op, 0)}")
        digests_a, digests_b = detail_a.get("node_digests"), detail_b.get("node_digests")
        if isinstance(digests_a, list) and isinstance(digests_b, list):
            differing = [i for i, (a, b) in enumerate(zip(digests_a, digests_b)) if a != b]
            if differing:
                out.append(f"{len(differing)} node(s) differ, first at node {differing[0]}")
        if not out:
            out.append("same operators, different structure or arguments")
    elif name == "custom_code" and isinstance(detail_a, Mapping) and isinstance(detail_b, Mapping):
        for code_name in sorted(set(detail_a) | set(detail_b)):
            if code_name not in detail_a or code_name not in detail_b:
                out.append(f"{code_name} {'only in the second key' if code_name not in detail_a else 'only in the first key'}")
            elif detail_a[code_name] != detail_b[code_name]:
                out.append(f"{code_name} implementation changed")
    else:
        _diff_values("", detail_a, detail_b, out)
    if not out:
        out.append("details equal but digests differ (recorded by a different aotcache version?)")
    shown = out[:_MAX_EXPLANATIONS_PER_PART]
    if len(out) > len(shown):
        shown.append(f"... and {len(out) - len(shown)} more")
    return [f"{label} differs: {line}" for line in shown]


def explain_difference(parts_a: Any, parts_b: Any) -> list[str]:
    """Why two keys differ, in words, one line per difference (empty when the keys are equal).

    Accepts a :class:`CacheKey`, its ``to_json()``, its ``parts_digests()`` or a sequence of :class:`KeyPart`.
    With details on both sides the line names the field ("input metadata differs: arg 0 dtype float32 vs
    float16"); with digests only, the part.
    """
    records_a, records_b = _as_part_records(parts_a), _as_part_records(parts_b)
    lines = []
    for name in sorted(set(records_a) | set(records_b)):
        label = _PART_LABELS.get(name, name)
        if name not in records_b:
            lines.append(f"{label}: only in the first key")
        elif name not in records_a:
            lines.append(f"{label}: only in the second key")
        else:
            (digest_a, detail_a), (digest_b, detail_b) = records_a[name], records_b[name]
            if digest_a == digest_b:
                continue
            if detail_a is None or detail_b is None:
                lines.append(f"{label} differs ({digest_a[:12]} vs {digest_b[:12]})")
            else:
                lines.extend(_explain_part(name, detail_a, detail_b))
    return lines
