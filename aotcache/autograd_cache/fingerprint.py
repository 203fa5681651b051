"""A cheap, conservative fingerprint of an ``aot_module`` / ``aot_function`` call, so warm starts skip capture.

The full cache key (:func:`aotcache.autograd_cache.key.compute_key`) is computed from the captured ATen
graph, and capturing costs ~0.15 s for a TransformerEncoderLayer forward (more with backward). The
fingerprint computes, without tracing anything, a digest of everything that decides what capture would
produce; the cache maps it to the full key recorded by the cold run (a two-level lookup), so a warm start
goes fingerprint -> entry -> load -> run.

========== ==================================================================================================
code       every user function, class, module tree and object reachable from the call, serialized
           canonically (see NOTE [Reachable code]); torch's own code by qualified name (the torch version);
           environment variables the code reads by constant name, with their values (NOTE [Process state])
inputs     per flat argument: tensor dtype, device, layout, requires_grad, leafness, sizes / strides /
           storage offset (only the rank when dynamic), memory sharing; constants by type and value; the
           pytree structure of (args, kwargs)
ambient    grad mode, inference mode, autocast, default dtype, matmul precision, deterministic algorithms,
           backend flags (mkldnn, cudnn, tf32, SDPA backends, MHA fast path), non-default Inductor config and
           ``TORCHINDUCTOR_*`` environment variables, the default process group's rank and world size
options    compilers, partitioner, decompositions (user code hashed), dynamic
system     :func:`aotcache.autograd_cache.key.system_parts` (versions, aotcache source, CPU ISA, GPU arch)
========== ==================================================================================================

NOTE [Correctness over hit rate]
A false hit (same fingerprint, different graph) would run a stale compiled graph: the worst bug a cache can
have. Whenever the fingerprint cannot see something that could change the graph (an opaque object, a
C-extension callable not from torch, an active torch function / dispatch mode, a tensor subclass, a
torch.compile-d submodule, backward hooks, a module overriding ``__call__``, an import that has not run yet,
a read of process state that cannot be pinned: the command line, files, the clock, random numbers)
it returns an *untrusted* result with a short categorical reason, and the caller takes the full capture path
(counted as ``fingerprint_fallback:<reason>``). docs/warmstart.md lists what it can and cannot see.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from aotcache.aot.ambient import distributed_state, numerics_flags
from aotcache.aot.cache_objects import CacheInt
from aotcache.aot.exact_values import exact_repr, float_bits
from aotcache.aot.signature import python_attributes
from aotcache.autograd_cache import key as cache_key
from aotcache.autograd_cache.compiler_settings import UnreadableCompilerSettings, global_compiler_settings
from aotcache.autograd_cache.digests import Untrusted, check_plain_tensor, sha256_text
from aotcache.autograd_cache.reachable import Reachable

__all__ = [
    "FINGERPRINT_SCHEMA_VERSION",
    "Fingerprint",
    "fingerprint_call",
    "fingerprint_module_call",
    "code_fingerprint",
]

FINGERPRINT_SCHEMA_VERSION = 1
_GLOBAL_MODULE_HOOKS = ("_global_backward_pre_hooks", "_global_backward_hooks", "_global_forward_pre_hooks",
                        "_global_forward_hooks", "_global_forward_hooks_always_called",
                        "_global_forward_hooks_with_kwargs")
# Fields of AOTOptions that do not change the compiled result (where results are stored, not what they are).
_OPTIONS_NOT_IN_RESULT = frozenset({"cache"})


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The fingerprint of one call: ``digest`` (sha256 hex) when trusted, else ``reason`` (why not).

    ``parts`` maps each part name to its digest so that two fingerprints can be compared part by part.
    """

    digest: str | None
    parts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    where: str = ""  # for an untrusted result: the function, class or object that held the reason
    # the lru_cache dicts the walk reached, whose entries a capture under this fingerprint vouches for (NOTE [Cached
    # values a fingerprint vouches for] in lru_cache_values.py); not part of the fingerprint
    lru_caches: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def trusted(self) -> bool:
        return self.digest is not None

    @classmethod
    def untrusted(cls, reason: str, where: str = "") -> Fingerprint:
        return cls(None, {}, reason, where)


# ----------------------------------------------------------------------------------------------------
# Inputs, ambient state, options
# ----------------------------------------------------------------------------------------------------


def _tensor_attributes(attributes: dict) -> list:
    """A tensor input's Python attributes, by value (NOTE [Python attributes of tensor arguments] in
    aot/signature.py); any other value than None, a bool, int, float or str makes the fingerprint untrusted."""
    described = []
    for name, value in sorted(attributes.items()):
        if value is not None and type(value) not in (bool, int, float, str):
            raise Untrusted(f"tensor input attribute {name!r} of type {type(value).__name__}")
        described.append([name, type(value).__name__, float_bits(value).hex() if type(value) is float else value])
    return described


def _inputs_part(flat_args: Sequence[Any], in_spec: Any, dynamic: bool | tuple) -> dict[str, Any]:
    from torch.utils import _pytree as pytree

    described = []
    first_by_storage: dict[int, int] = {}
    for position, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor):
            check_plain_tensor(arg, "tensor input")
            if arg.layout != torch.strided:
                raise Untrusted(f"tensor input layout: {arg.layout}")
            pointer = arg.untyped_storage().data_ptr()
            sharing = first_by_storage.setdefault(pointer, position) if pointer else position
            dims = dynamic[position] if isinstance(dynamic, tuple) else dynamic  # NOTE [Dynamic dimensions]
            geometry = ([arg.dim()] if dims is True else
                        [[None if dim in dims else size for dim, size in enumerate(arg.shape)]] if dims else
                        [list(arg.shape), list(arg.stride()), arg.storage_offset()])
            attributes = python_attributes(arg)  # NOTE [Python attributes of tensor arguments]
            described.append(["tensor", str(arg.dtype), str(arg.device), arg.requires_grad,
                              arg.requires_grad and arg.is_leaf, arg.is_contiguous(), sharing, geometry,
                              *([_tensor_attributes(attributes)] if attributes else [])])
        elif isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise Untrusted("symbolic input")
        elif type(arg) is CacheInt and (dynamic[position] if isinstance(dynamic, tuple) else dynamic):
            described.append(["cacheint", int(arg) if arg in (0, 1) else None])  # NOTE [Cache integers]
        elif type(arg) is int and isinstance(dynamic, tuple) and dynamic[position]:  # NOTE [Integer arguments]
            described.append(["int"])
        elif type(arg) is float and isinstance(dynamic, tuple) and dynamic[position]:  # NOTE [Float arguments]
            described.append(["float"])
        elif arg is None or isinstance(arg, (bool, int, float, str)):
            described.append(["constant", type(arg).__name__, exact_repr(arg)])  # NOTE [NaNs written down by bits]
        elif isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            described.append(["constant", type(arg).__name__, str(arg)])
        else:
            raise Untrusted(f"opaque input: {type(arg).__name__}")
    try:
        spec = pytree.treespec_dumps(in_spec)
    except (TypeError, ValueError, NotImplementedError):
        raise Untrusted("unserializable input structure") from None
    return {"spec": spec, "args": described}


def _check_no_active_modes() -> None:
    function_stack = getattr(torch._C, "_len_torch_function_stack", None)
    dispatch_stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if function_stack is None or dispatch_stack is None:
        raise Untrusted("cannot inspect torch modes")
    if function_stack() or dispatch_stack():
        raise Untrusted("active torch function or dispatch mode")
    module_hooks = sys.modules["torch.nn.modules.module"]
    if any(getattr(module_hooks, name, None) for name in _GLOBAL_MODULE_HOOKS):
        raise Untrusted("global module hooks")


def _inductor_config_part(reachable: Reachable) -> dict[str, Any]:
    """Non-default ``torch._inductor.config`` values (when Inductor is loaded) and TORCHINDUCTOR_* variables,
    as the key's ``compiler`` part reads them (NOTE [Global compiler settings in the key]).

    Only non-default values count, so a process that never imported Inductor and one that did agree.
    """
    try:
        variables, inductor = global_compiler_settings()
    except UnreadableCompilerSettings as exc:
        raise Untrusted(exc.reason) from None
    part: dict[str, Any] = {"env": variables}
    if inductor:
        part["inductor"] = {name: reachable.ref(value) for name, value in inductor.items()}
    return part


def _options_part(options: Any, reachable: Reachable) -> dict[str, Any]:
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"fingerprint options must be an AOTOptions dataclass, got {type(options).__name__}")
    part: dict[str, Any] = {}
    for field in dataclasses.fields(options):
        if field.name in _OPTIONS_NOT_IN_RESULT:
            continue
        value = getattr(options, field.name)
        if field.name == "dynamic" and value is None:
            value = False  # automatic, not yet resolved: its first compile is static (NOTE [Dynamic dimensions])
        if field.name == "decompositions" and isinstance(value, Mapping):
            value = {str(op): fn for op, fn in value.items()}  # ops by name; user functions by code
        part[field.name] = reachable.ref(value)
    return part


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def _fingerprint(roots: Sequence[Any], module: nn.Module | None, flat_args: Sequence[Any], in_spec: Any,
                 options: Any, devices: Iterable[str]) -> Fingerprint:
    try:
        _check_no_active_modes()
        reachable = Reachable(state_positions(module), process_state=True)
        root_tokens = [reachable.add_root(root) for root in roots]
        reachable.process_state = False  # compilers may read the clock: the full key treats them alike
        options_part = _options_part(options, reachable)
        inductor_part = _inductor_config_part(reachable)
        code = {"roots": root_tokens, "graph": reachable.digest()}
        dynamic = getattr(options, "dynamic", False)
        inputs = _inputs_part(flat_args, in_spec, dynamic if isinstance(dynamic, tuple) else bool(dynamic))
    except Untrusted as exc:
        return Fingerprint.untrusted(exc.reason, exc.where)
    ambient = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": cache_key.current_autocast_state(),
        "numerics": cache_key._numerics_state(),
        "backends": numerics_flags(),
        "compile_config": inductor_part,
    }
    distributed = distributed_state()
    if distributed is not None:  # only then: fingerprints outside a distributed job stay what they were
        ambient["distributed"] = distributed  # NOTE [The process group in the fingerprint]
    tensor_devices = {str(arg.device) for arg in flat_args if isinstance(arg, torch.Tensor)}
    parts = {
        "code": cache_key.canonical_json(code),
        "inputs": cache_key.canonical_json(inputs),
        "ambient": cache_key.canonical_json(ambient),
        "options": cache_key.canonical_json(options_part),
        "system": cache_key.canonical_json(cache_key.system_parts(sorted(tensor_devices | set(devices)))),
    }
    digests = {name: sha256_text(text) for name, text in parts.items()}
    body = cache_key.canonical_json({"schema": FINGERPRINT_SCHEMA_VERSION, "parts": sorted(digests.items())})
    return Fingerprint(sha256_text(body), digests, lru_caches=tuple(reachable.lru_caches))


def fingerprint_module_call(module: nn.Module, flat_args: Sequence[Any], in_spec: Any, options: Any) -> Fingerprint:
    """Fingerprint of an ``aot_module`` call: ``flat_args`` / ``in_spec`` are what its AOTFunction sees
    (parameters, buffers, then the user's arguments, flattened); ``options`` its AOTOptions.

    The module's parameters and buffers are runtime inputs: their metadata counts (through ``flat_args``
    and their place in the tree), never their values. Returns an untrusted Fingerprint (with the reason)
    whenever the cheap form cannot see everything that decides the graph.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fingerprint_module_call needs an nn.Module, got {type(module).__name__}")
    return _fingerprint([module], module, flat_args, in_spec, options, ())


def fingerprint_call(fn: Callable[..., Any], flat_args: Sequence[Any], in_spec: Any, options: Any) -> Fingerprint:
    """Fingerprint of an ``aot_function`` call of ``fn`` with the flattened ``flat_args`` / ``in_spec``.

    Tensors ``fn`` reaches through closures or globals (including parameters of modules it calls) are
    constants of the graph and are hashed by content.
    """
    if not callable(fn):
        raise TypeError(f"fingerprint_call needs a callable, got {type(fn).__name__}")
    return _fingerprint([fn], None, flat_args, in_spec, options, ())


def code_fingerprint(value: Any) -> Fingerprint:
    """The ``code`` part alone for a function, class or module (diagnostics: did my code change?)."""
    try:
        reachable = Reachable(state_positions(value if isinstance(value, nn.Module) else None), process_state=True)
        roots = reachable.add_root(value)
        digest = sha256_text(cache_key.canonical_json({"roots": [roots], "graph": reachable.digest()}))
    except Untrusted as exc:
        return Fingerprint.untrusted(exc.reason, exc.where)
    return Fingerprint(digest, {"code": digest})


def state_positions(module: nn.Module | None) -> dict[int, int]:
    """id(parameter or buffer) -> its position among the module's (deduplicated) parameters then buffers."""
    if module is None:
        return {}
    positions: dict[int, int] = {}
    for _, tensor in (*module.named_parameters(), *module.named_buffers()):
        positions.setdefault(id(tensor), len(positions))
    return positions
