"""The function the module wrapper's :class:`~aotcache.aot.api.AOTFunction` captures and runs: the wrapped module
called with its parameters and buffers swapped in (``torch.func.functional_call``).

Each call refuses what a capture cannot hold (backward hooks, data-parallel wrappers, TorchScript submodules,
tensors stored on modules or rebound by ``forward``: aot/module_refusals.py, aot/module_state.py), holds other
threads off the module while its tensors are swapped (NOTE [Calls during a capture's swap]), maps tensor names
through nested wrappers (NOTE [Wrappers inside a captured module]), gives trace tensors the Python attributes of
the tensors they stand for (NOTE [Python attributes of parameters]), and returns the buffers ``forward`` rebound
beside its output (:class:`ReboundBuffers`). Split from aot/module.py, which holds the wrapper's ``nn.Module``
face.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from aotcache.aot.capture_threads import swap_gate
from aotcache.aot.module_refusals import (refuse_data_parallel_wrappers, refuse_module_backward_hooks,
                                          refuse_script_modules)
from aotcache.aot.module_state import (
    module_put_back,
    refuse_rebound_module_tensors,
    refuse_tensors_stored_on_modules,
)
from aotcache.aot.rebuilt_caches import rebuilt_caches_kept

__all__ = ["functional_module_call", "ReboundBuffers"]


def functional_module_call(module: nn.Module) -> Callable:
    """``call(params, buffers, *args, **kwargs)``: the module run with the given tensors swapped in."""
    paths: dict[tuple, dict[str, str] | None] = {}
    gate = swap_gate(module)

    def call(params: dict, buffers: dict, *args: Any, **kwargs: Any) -> Any:
        tensors = {**params, **buffers}
        names = tuple(tensors)
        if names not in paths:
            paths[names] = _paths_through_wrappers(module, names)
        renamed = paths[names]
        buffer_names = frozenset(buffers)
        if renamed is not None:  # NOTE [Wrappers inside a captured module]
            tensors = {renamed[name]: value for name, value in tensors.items()}
            buffer_names = frozenset(renamed[name] for name in buffers)
        refuse_module_backward_hooks(module)
        refuse_data_parallel_wrappers(module)  # NOTE [Data-parallel wrappers]
        refuse_script_modules(module)  # NOTE [TorchScript submodules]
        # NOTE [Calls during a capture's swap]: other threads wait while the module holds trace tensors
        _carry_python_attributes(module, tensors)  # NOTE [Python attributes of parameters]
        rebound: dict[str, torch.Tensor] = {}  # NOTE [Buffers and parameters rebound by forward]
        # NOTE [A child forked while another thread captures the same model]: how to put it back, in such a child
        with gate.swapping(lambda: module_put_back(module)), refuse_tensors_stored_on_modules(module), \
                rebuilt_caches_kept([module]), \
                refuse_rebound_module_tensors(module, tensors, rebound, buffer_names, (args, kwargs)):
            result = torch.func.functional_call(module, tensors, args, kwargs, tie_weights=True, strict=False)
        return ReboundBuffers(result, rebound) if rebound else result

    return call


class ReboundBuffers(NamedTuple):
    """What a captured module call returns when its forward rebound buffers (``self.buf = self.buf + 1``): the
    forward's output and the buffers' new values by path, which ``AOTModule.forward`` binds after each call (NOTE
    [Buffers and parameters rebound by forward]). A module-level namedtuple, so a cached graph's output structure
    names it and a warm start rebuilds it."""

    output: Any
    buffers: dict


def _carry_python_attributes(module: nn.Module, tensors: dict[str, Any]) -> None:
    """NOTE [Python attributes of parameters]
    Code may keep Python attributes on a parameter or buffer and read them in ``forward``: a quantization scale
    (``getattr(self.weight, "quant_scale", 1.0)``), a flag a library set (transformers marks its buffers
    ``_is_buffer``). The capture swaps trace tensors in for the module's tensors, and those had no such
    attributes: ``getattr`` with a default silently traced the default (a wrong result from the first call on),
    and a plain read raised and sent the model to the Dynamo way. Each trace tensor gets the attributes of the
    tensor it stands for (one it has itself is kept); the call fingerprint and the in-process guards see them
    (``_tensor_token`` in reachable.py), so a changed or added attribute is another graph."""
    for path, value in tensors.items():
        original = _original_tensor(module, path)
        if original is None or original is value or not isinstance(value, torch.Tensor):
            continue
        attributes = original.__dict__
        if attributes:
            target = value.__dict__
            for name, attribute in attributes.items():
                target.setdefault(name, attribute)


def _original_tensor(module: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter or buffer of ``module`` at ``path`` (``layer.0.weight``), or None."""
    *parents, leaf = path.split(".")
    owner: Any = module
    for part in parents:
        owner = getattr(owner, part, None)
        if not isinstance(owner, nn.Module):
            return None
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers.get(leaf)


def _paths_through_wrappers(module: nn.Module, names: Sequence[str]) -> dict[str, str] | None:
    """NOTE [Wrappers inside a captured module]
    A compiled wrapper (``AOTModule``: ``aot_module`` / ``aotcache.compile``) used as a submodule names its
    tensors as the wrapped module does (``inner.weight``, no ``orig_module.``), but ``functional_call`` swaps
    tensors on the module it reaches by that path: the wrapper, which holds no ``weight`` of its own. The swap
    then failed, or wrote beside the real parameter. So each name is mapped to the path that reaches the tensor's
    owner (``inner.orig_module.weight``); None when no name passes through a wrapper (the usual case).
    """
    renamed: dict[str, str] = {}
    changed = False
    for name in names:
        parts, owner, real = name.split("."), module, []
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
            real.append(part)
            while getattr(type(owner), "wraps_orig_module", False):
                owner = owner.orig_module
                real.append("orig_module")
                changed = True
        renamed[name] = ".".join([*real, parts[-1]])
    return renamed if changed else None
