"""What a capture refuses in a module tree before it runs: module backward hooks (in a training capture), data-parallel
wrappers (DDP, FSDP, DataParallel) and TorchScript submodules, each with a ``CaptureError`` that names the fix
(such a module runs through the fallback). Checked by ``AOTModule`` and ``aotcache.compile``.
"""

from __future__ import annotations

import torch

from aotcache.aot.errors import CaptureError

__all__ = ["refuse_module_backward_hooks", "data_parallel_wrapper", "refuse_data_parallel_wrappers",
           "refuse_script_modules"]


def refuse_module_backward_hooks(module: torch.nn.Module) -> None:
    """Refuse a training capture of a module tree with module backward hooks (NOTE [Module backward hooks]).

    NOTE [Module backward hooks]
    ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` hooks (on a submodule, or global) are
    Python run at every eager backward. A capture runs them once, on traced tensors: what they compute on the
    gradients is in the graph, but their side effects (a log, a counter, a list of gradient norms) happen only
    then, and a value they keep is a trace tensor. Such a module goes to the fallback (torch.compile runs the
    hooks at every backward). Under no_grad no backward runs, so nothing is refused there.
    """
    if not torch.is_grad_enabled():
        return
    from torch.nn.modules import module as module_mod

    hooked = [name or type(module).__name__ for name, sub in module.named_modules()
              if sub._backward_hooks or sub._backward_pre_hooks]
    if module_mod._global_backward_hooks or module_mod._global_backward_pre_hooks:
        hooked.append("(global module hooks)")
    if hooked:
        raise CaptureError(
            f"aotcache: module backward hooks on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''} run "
            f"Python at every backward, which a compiled backward would run only while capturing (a hook's "
            f"log or counter would miss every later backward). To capture the module whole, remove the hooks "
            f"(read gradients from the parameters' .grad after backward instead).")


# NOTE [Data-parallel wrappers]
# DistributedDataParallel's forward is Python that must run at every call: it broadcasts rank 0's buffers
# (BatchNorm statistics), and under grad mode it prepares its reducer for the backward that all-reduces the
# gradients. A capture of DDP(model) ran that Python once, on fake tensors: later calls ran the graph alone, and
# the ranks trained apart (no error; each rank's own gradients). FSDP and DataParallel are the same kind of
# wrapper. A module tree holding one is refused, so it goes to the fallback (aotcache.compile: torch.compile
# with the aotcache backend, whose Dynamo handles DDP); DDP(aotcache.compile(model)) is captured and correct.
_DATA_PARALLEL_CLASSES = frozenset({"torch.nn.parallel.distributed.DistributedDataParallel",
                                    "torch.nn.parallel.data_parallel.DataParallel",
                                    "torch.distributed.fsdp.fully_sharded_data_parallel.FullyShardedDataParallel",
                                    "torch.distributed.fsdp.FSDPModule",
                                    "torch.distributed.fsdp._fully_shard._fully_shard.FSDPModule"})


def data_parallel_wrapper(module: torch.nn.Module) -> tuple[str, str] | None:
    """``(path, class name)`` of the first data-parallel wrapper in the module tree (NOTE [Data-parallel
    wrappers]; path ``"the module"`` for the root), or None."""
    for name, sub in module.named_modules():
        for cls in type(sub).__mro__:
            if f"{cls.__module__}.{cls.__qualname__}" in _DATA_PARALLEL_CLASSES:
                return name or "the module", cls.__name__
    return None


def refuse_data_parallel_wrappers(module: torch.nn.Module) -> None:
    """Refuse a capture of a module tree holding a data-parallel wrapper (NOTE [Data-parallel wrappers])."""
    found = data_parallel_wrapper(module)
    if found is not None:
        name, kind = found
        raise CaptureError(
            f"aotcache: {name} is a {kind}, whose forward runs Python at every call (buffer broadcast, gradient "
            f"all-reduce setup) that a captured graph would run only once. Compile the model inside it instead: "
            f"{kind}(aotcache.compile(model)), or torch.compile({kind}(model), backend='aotcache').",
            reason="unsupported_construct")


# NOTE [TorchScript submodules]
# A ``torch.jit.script``-ed (or traced) submodule runs TorchScript: its code and its parameters live in a C++
# module, which ``functional_call`` cannot swap for trace tensors, and its registries are C++-backed wrappers that
# the walk and the module snapshot cannot iterate as dicts (a call of such a model failed with "contains():
# incompatible function arguments" or ``KeyError: 0`` where eager runs). A module tree holding one is refused, so
# it takes the fallback (Dynamo runs the scripted part eagerly between compiled regions).
def refuse_script_modules(module: torch.nn.Module) -> None:
    """Refuse a capture of a module tree holding a TorchScript module (NOTE [TorchScript submodules])."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            raise CaptureError(
                f"aotcache: {name or 'the module'} is a TorchScript module ({type(sub).__name__}), whose code and "
                f"parameters live in C++ where a capture cannot swap them; compile the Python module instead of "
                f"its torch.jit.script / torch.jit.trace result.", reason="unsupported_construct")
