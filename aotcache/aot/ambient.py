"""Global torch state that changes what a traced or compiled graph computes (backend flags, default dtype).

NOTE [Numerics flags]
Flags such as ``torch.backends.cudnn.allow_tf32``, ``torch.backends.mkldnn.enabled``, the SDPA backend switches
or ``torch.set_default_dtype`` are read by ATen while tracing (which SDPA kernel is chosen, which dtype a factory
call gets, whether a convolution takes the oneDNN path) and baked into generated code. A graph traced under one
setting must not be reused under another: these flags are part of the per-call signature
(:func:`numerics_signature`, checked on every call, so it reads each flag through its C getter: ~1 us in all) and
of the cache key and call fingerprint (:func:`numerics_flags`, the same flags by name). Getters this torch build
lacks (torch 2.11-2.14 differ) are left out, never guessed.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["active_modes", "distributed_state", "numerics_flags", "numerics_signature"]

# Zero-argument getters of torch._C, by the name a user knows the flag under.
_C_GETTERS = (
    ("default_dtype", "get_default_dtype"),
    ("float32_matmul_precision", "_get_float32_matmul_precision"),
    ("deterministic", "_get_deterministic_algorithms"),
    ("deterministic_warn_only", "_get_deterministic_algorithms_warn_only"),
    ("deterministic_fill_uninitialized_memory", "_get_deterministic_fill_uninitialized_memory"),
    ("cudnn.enabled", "_get_cudnn_enabled"),
    ("cudnn.benchmark", "_get_cudnn_benchmark"),
    ("cudnn.deterministic", "_get_cudnn_deterministic"),
    ("cudnn.allow_tf32", "_get_cudnn_allow_tf32"),
    ("mkldnn.enabled", "_get_mkldnn_enabled"),
    ("mkldnn.deterministic", "_get_mkldnn_deterministic"),
    ("mkldnn.allow_tf32", "_get_onednn_allow_tf32"),
    ("nnpack.enabled", "_get_nnpack_enabled"),
    ("cuda.matmul.allow_tf32", "_get_cublas_allow_tf32"),
    ("cuda.matmul.allow_fp16_reduced_precision_reduction", "_get_cublas_allow_fp16_reduced_precision_reduction"),
    ("cuda.matmul.allow_bf16_reduced_precision_reduction", "_get_cublas_allow_bf16_reduced_precision_reduction"),
    ("cuda.matmul.allow_fp16_accumulation", "_get_cublas_allow_fp16_accumulation"),
    ("cpu.allow_fp16_reduced_precision_reduction", "_get_cpu_allow_fp16_reduced_precision_reduction"),
    ("cuda.flash_sdp", "_get_flash_sdp_enabled"),
    ("cuda.mem_efficient_sdp", "_get_mem_efficient_sdp_enabled"),
    ("cuda.math_sdp", "_get_math_sdp_enabled"),
    ("cuda.cudnn_sdp", "_get_cudnn_sdp_enabled"),
    ("cuda.fa3_sdp", "_get_fa3_sdp_enabled"),
    ("cuda.overrideable_sdp", "_get_overrideable_sdp_enabled"),
    ("cuda.math_sdp_allow_fp16_bf16_reduction", "_get_math_sdp_allow_fp16_bf16_reduction"),
    ("cuda.sdp_priority_order", "_get_sdp_priority_order"),
    ("cuda.preferred_blas_library", "_get_blas_preferred_backend"),
    ("cuda.preferred_linalg_library", "_get_linalg_preferred_backend"),
    ("cuda.preferred_rocm_fa_library", "_get_rocm_fa_preferred_backend"),
    ("quantized.engine", "_get_qengine"),
)
# (backend, op) pairs of the fp32-precision API (torch >= 2.9): torch.backends.<backend>.<op>.fp32_precision.
_FP32_PRECISION = (("generic", "all"), ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
                   ("mkldnn", "rnn"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"))


def _python_flags() -> list[tuple[str, Callable[[], Any]]]:
    """Flags kept as Python module globals (no C getter): opt-einsum and the MHA fast path."""
    getters: list[tuple[str, Callable[[], Any]]] = []
    einsum = getattr(sys.modules.get("torch.backends.opt_einsum"), "m", None)
    if einsum is not None and hasattr(einsum, "enabled"):
        getters.append(("opt_einsum.enabled", lambda: einsum.enabled))
        getters.append(("opt_einsum.strategy", lambda: einsum.strategy))
    mha = sys.modules.get("torch.backends.mha")
    if mha is not None and hasattr(mha, "get_fastpath_enabled"):
        getters.append(("mha.fastpath_enabled", mha.get_fastpath_enabled))
    return getters


@functools.lru_cache(maxsize=1)
def _getters() -> tuple[tuple[str, Callable[[], Any]], ...]:
    """The getters this torch build has, probed once (a probe that raises is left out)."""
    import torch.backends.mha  # noqa: F401 - registers the fast-path flag
    import torch.backends.opt_einsum  # noqa: F401

    found: list[tuple[str, Callable[[], Any]]] = []
    for name, attribute in _C_GETTERS:
        getter = getattr(torch, attribute, None) if attribute == "get_default_dtype" else getattr(torch._C, attribute,
                                                                                                   None)
        if getter is not None and _works(getter):
            found.append((name, getter))
    precision = getattr(torch._C, "_get_fp32_precision_getter", None)
    if precision is not None:
        for backend, op in _FP32_PRECISION:
            getter = functools.partial(precision, backend, op)
            if _works(getter):
                found.append((f"{backend}.{op}.fp32_precision", getter))
    found.extend(getter for getter in _python_flags() if _works(getter[1]))
    return tuple((name, _hashable(getter)) for name, getter in found)


def _hashable(getter: Callable[[], Any]) -> Callable[[], Any]:
    """``getter``, or a wrapper turning its list result into a tuple (signatures are dict keys)."""
    if isinstance(getter(), list):
        return lambda: tuple(getter())
    return getter


def _works(getter: Callable[[], Any]) -> bool:
    """Whether ``getter`` answers without raising or warning (a deprecated getter would warn on every call)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            getter()
        except (RuntimeError, TypeError, ValueError, AttributeError):
            return False
    return not caught


def _read(getter: Callable[[], Any]) -> Any:
    """A flag's value, or a stable description of why it cannot be read.

    Some getters raise in states the user can reach: torch refuses to report cuBLAS TF32 after both its legacy
    and its new API set it. Such a state still has to compare equal to itself, and never break the call.
    """
    try:
        return getter()
    except RuntimeError as exc:
        return f"unreadable: {str(exc)[:80]}"


def numerics_signature() -> tuple:
    """The current value of every flag, in a fixed order, then the active torch modes (:func:`active_modes`):
    cheap enough for every call's signature."""
    getters = _getters()
    try:
        flags = [getter() for _, getter in getters]
    except RuntimeError:
        flags = [_read(getter) for _, getter in getters]
    flags.append(active_modes())
    return tuple(flags)


# NOTE [Active torch modes]
# A torch function mode or dispatch mode the user enters around a call changes what every op does:
# ``torch.set_default_device`` / ``with torch.device(...)`` (a function mode: factory calls go to that device), a
# mode of the user's own that rewrites ops. A capture runs under the modes active at that call, so its graph holds
# their effect. The signature did not see them: a graph traced under a mode ran after the mode was left, and one
# traced without it ran inside it (eager's result differed both ways). The active modes are part of the per-call
# signature: a device context by its device (entering ``torch.device("cuda")`` again is the same graph), any other
# mode by identity (another mode object is another graph; a mode's own state changed in place is not seen, as for
# any opaque object). The call fingerprint refuses active modes altogether ("active torch function or dispatch
# mode"), so no graph is loaded by it across processes.
_function_stack_length = getattr(torch._C, "_len_torch_function_stack", None)
_dispatch_stack_length = getattr(torch._C, "_len_torch_dispatch_stack", None)


class _ByIdentity:
    """A mode in a signature: equal only to itself (kept alive, so its ``id`` is never another mode's)."""

    __slots__ = ("mode",)

    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.mode is self.mode

    def __hash__(self) -> int:
        return id(self.mode)


def _mode_token(mode: Any) -> Any:
    device = getattr(mode, "device", None) if type(mode).__name__ == "DeviceContext" else None
    return ("device", str(device)) if device is not None else _ByIdentity(mode)


def active_modes() -> tuple:
    """NOTE [Active torch modes]: the torch function and dispatch modes active now, innermost last; ``()`` when
    none (two C calls: the usual case)."""
    if _function_stack_length is None or _dispatch_stack_length is None:
        return ()
    functions, dispatches = _function_stack_length(), _dispatch_stack_length()
    if not functions and not dispatches:
        return ()
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return (tuple(_mode_token(mode) for mode in _get_current_function_mode_stack()),
            tuple(_mode_token(mode) for mode in _get_current_dispatch_mode_stack()))


def numerics_flags() -> dict[str, Any]:
    """The same flags by name, as JSON-able values (for the cache key, the fingerprint and ``explain``)."""
    flags: dict[str, Any] = {}
    for name, getter in _getters():
        value = _read(getter)
        flags[name] = value if isinstance(value, (bool, int, str, type(None))) else str(value)
    return flags


# NOTE [The process group in the fingerprint]
# A forward may read its place in a distributed job: ``x * dist.get_rank()``, a slice by rank, a collective whose
# output size is the world size, a DTensor mesh coordinate. The capture bakes those ints into the graph, so each
# rank's full key differs, but the call fingerprint (no trace) saw only the code, equal on every rank: a warm rank
# 1 loaded the alias rank 0 had recorded and ran rank 0's graph (wrong values, no error; found with 2 gloo ranks
# sharing a cache dir). The default group's rank and world size are part of the fingerprint's ambient state:
# each rank records and finds its own alias, while the full keys, computed from the graphs, still let every rank
# of a job load the one compile of a rank-independent graph (one compile per job).
def distributed_state() -> dict[str, int] | None:
    """The default process group's rank and world size, or None outside a distributed job (NOTE [The process
    group in the fingerprint])."""
    distributed = sys.modules.get("torch.distributed")  # not imported: no group can exist
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    return {"rank": distributed.get_rank(), "world_size": distributed.get_world_size()}
