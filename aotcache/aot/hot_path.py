"""The per-call fast path: check the last signatures in place instead of rebuilding and hashing one.

NOTE [Hot path]
Every call of an ``aot_function`` must find the compiled runtime of its signature (NOTE [Signature] in
``api.py``). Building that signature (a tuple per argument, a pytree spec, a storage-sharing map) and hashing
it costs ~100 us for a module with 20 tensors, about a tenth of a small training step. The hot path keeps,
per argument structure, the signatures already seen as :class:`HotSignature` records and compares the
arguments with them field by field: the same fields as the signature, so a match selects exactly the runtime
the slow path would select. Anything unusual (kwargs, containers, non-tensor arguments) takes the slow path.

:class:`ModuleState` serves ``aot_module``: the module's parameters and buffers by name, re-read only when
the module tree changed. ``named_parameters()`` walks every submodule (~30 us); checking that each
``_parameters`` / ``_buffers`` / ``_modules`` dict still holds the same objects is a few microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["HotSignature", "ModuleState", "simple_structure", "autocast_state", "storage_sharing"]

_MAX_HOT_PER_STRUCTURE = 8


def autocast_state() -> tuple:
    """Autocast enabled flag and dtype per device type this build knows (part of every signature)."""
    state = []
    for device_type in ("cpu", "cuda"):
        try:
            state.append((torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError, AttributeError):  # device type unknown to this build
            state.append(None)
    return tuple(state)


def storage_sharing(tensors: Sequence[torch.Tensor]) -> tuple:
    """For each (strided, non-meta) tensor, the index of the first one sharing its storage (0-pointers never share)."""
    first: dict[int, int] = {}
    sharing = []
    for index, tensor in enumerate(tensors):
        pointer = tensor.untyped_storage().data_ptr()
        sharing.append(first.setdefault(pointer, index) if pointer else index)
    return tuple(sharing)


def simple_structure(args: tuple, kwargs: dict) -> int | None:
    """``len(args)`` when the call is plain positional tensors (flat args are ``args`` itself), else None."""
    if kwargs:
        return None
    for arg in args:
        if type(arg) is not torch.Tensor and type(arg) is not nn.Parameter:
            return None
    return len(args)


class HotSignature:
    """One seen signature of plain tensor arguments and the runtime it selected (NOTE [Hot path])."""

    __slots__ = ("grad_enabled", "autocast", "fields", "sharing", "dynamic", "runtime")

    def __init__(self, flat_args: Sequence[torch.Tensor], dynamic: bool, runtime: Any) -> None:
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast = autocast_state()
        self.dynamic = dynamic
        self.fields = [self._fields(arg) for arg in flat_args]
        self.sharing = storage_sharing(flat_args)
        self.runtime = runtime

    def _fields(self, arg: torch.Tensor) -> tuple:
        geometry = (arg.dim(), None, None) if self.dynamic else (arg.shape, arg.stride(), arg.storage_offset())
        return (arg.dtype, arg.device, arg.requires_grad, arg.requires_grad and arg.is_leaf, *geometry)

    @staticmethod
    def eligible(flat_args: Sequence[Any]) -> bool:
        """Only plain strided, non-meta tensors (the other cases need the full signature's checks)."""
        return all(isinstance(arg, torch.Tensor) and arg.layout == torch.strided and not arg.is_meta
                   for arg in flat_args)

    def matches(self, flat_args: Sequence[torch.Tensor]) -> bool:
        """Whether ``flat_args`` have this signature (the caller checked they are plain tensors)."""
        if torch.is_grad_enabled() is not self.grad_enabled or len(flat_args) != len(self.fields):
            return False
        dynamic = self.dynamic
        for arg, (dtype, device, requires_grad, leaf, shape, stride, offset) in zip(flat_args, self.fields):
            if arg.dtype is not dtype or arg.requires_grad is not requires_grad or arg.device != device:
                return False
            if requires_grad and arg.is_leaf is not leaf:
                return False
            if dynamic:
                if arg.dim() != shape:
                    return False
            elif arg.shape != shape or arg.stride() != stride or arg.storage_offset() != offset:
                return False
        return autocast_state() == self.autocast and storage_sharing(flat_args) == self.sharing


class HotSignatures:
    """Per argument structure, the signatures seen most recently (at most a few each)."""

    def __init__(self) -> None:
        self._by_structure: dict[Any, list[HotSignature]] = {}

    def find(self, structure: Any, flat_args: Sequence[torch.Tensor]) -> HotSignature | None:
        for hot in self._by_structure.get(structure, ()):
            if hot.matches(flat_args):
                return hot
        return None

    def remember(self, structure: Any, flat_args: Sequence[torch.Tensor], dynamic: bool, runtime: Any) -> None:
        seen = [hot for hot in self._by_structure.get(structure, ()) if not hot.matches(flat_args)]
        seen.insert(0, HotSignature(flat_args, dynamic, runtime))
        self._by_structure[structure] = seen[:_MAX_HOT_PER_STRUCTURE]  # one assignment: readers need no lock


def _overrides(module: nn.Module, names: Sequence[str]) -> bool:
    cls = type(module)
    return any(getattr(cls, name, None) is not getattr(nn.Module, name) for name in names)


class ModuleState:
    """``dict(module.named_parameters())`` and ``dict(module.named_buffers())``, cached while the tree is unchanged.

    The snapshot records, per submodule reached, its type and the exact contents (by identity) of its
    ``_parameters``, ``_buffers`` and ``_modules`` dicts: everything ``named_parameters``/``named_buffers``
    read. Any change there (a parameter replaced, ``.to()`` swapping tensors, a submodule added) rebuilds it.
    Modules overriding the traversal methods are never cached.
    """

    _TRAVERSAL = ("named_parameters", "named_buffers", "named_modules", "_named_members", "parameters", "buffers")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._snapshot: list[tuple[nn.Module, type, tuple, tuple, tuple]] | None = None
        self._values: tuple[dict, dict, tuple] | None = None

    def current(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple]:
        """``(params, buffers, names)``; ``names`` is the same object as long as the names are unchanged."""
        if self._values is not None and self._unchanged():
            return self._values
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        names = (tuple(params), tuple(buffers))
        if self._values is not None and self._values[2] == names:
            names = self._values[2]
        self._values = (params, buffers, names)
        self._snapshot = self._take_snapshot()
        return self._values

    def _take_snapshot(self) -> list[tuple[nn.Module, type, tuple, tuple, tuple]] | None:
        snapshot = []
        for submodule in self.module.modules():
            if _overrides(submodule, self._TRAVERSAL):
                return None
            snapshot.append((submodule, type(submodule), tuple(submodule._parameters.items()),
                             tuple(submodule._buffers.items()), tuple(submodule._modules.items())))
        return snapshot

    def _unchanged(self) -> bool:
        snapshot = self._snapshot
        if snapshot is None:
            return False
        for submodule, cls, params, buffers, children in snapshot:
            if type(submodule) is not cls:
                return False
            for current, recorded in ((submodule._parameters, params), (submodule._buffers, buffers),
                                      (submodule._modules, children)):
                if len(current) != len(recorded):
                    return False
                for name, value in recorded:
                    if current.get(name, _MISSING) is not value:
                        return False
        return True


_MISSING = object()
