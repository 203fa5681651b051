"""Caches a module computes from its own weights before reading them (``nn.LSTM``'s ``_flat_weights``, an old-style
weight-normed ``weight``): put back after each run of the Python in a capture instead of refusing it (NOTE [Caches
a module rebuilds from its weights])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["SavedRebuiltCaches", "modules_among", "rebuilt_cache_names", "rebuilt_caches_kept", "walk_skips"]

# NOTE [Caches a module rebuilds from its weights]
# Some modules keep a tensor computed from their weights in a plain attribute and compute it anew before they read
# it, at every forward:
#
# * ``nn.RNNBase`` (RNN, GRU, LSTM) keeps its weights in a second place, the private ``_flat_weights`` list, with
#   weak references to them in ``_flat_weight_refs``. Its forward first compares those references with the weight
#   attributes and, when one differs, builds both lists anew from the attributes (``_update_flat_weights``;
#   ``__getstate__`` does the same), so the lists are read only right after that check.
# * the old-style forward pre-hooks of ``nn.utils.weight_norm`` and ``spectral_norm`` (``WeightNorm``,
#   ``SpectralNorm``, their own ``__call__``) set ``module.weight``, a plain attribute, from
#   ``weight_g`` / ``weight_v`` or ``weight_orig`` before each forward; only when no other pre-hook runs before
#   them is the forward that attribute's first reader in the call. Not ``prune``'s hooks: pruning a pruned layer
#   again (``l1_unstructured``, ``global_unstructured``) ranks ``module.weight`` itself, outside any forward, so
#   what the module holds there after a call changes the mask; they stay refused (their fallback is eager's).
#
# ``torch.func.functional_call`` swaps the passed tensors into ``_parameters`` / ``_buffers`` directly (not through
# the module's ``__setattr__``), so in eager the forward computes the cache from the passed tensors and the
# swap-back leaves it so: after an eager ``functional_call(lstm, weights, x)`` the list holds ``weights``' tensors
# (keeping them alive), and a weight-normed ``m.weight`` is the weight computed from the passed ``weight_g`` /
# ``weight_v`` (with their autograd history), until the module's next forward computes them from its own weights.
#
# In a capture the passed tensors are trace tensors, so the attribute was left holding the capture's trace tensors
# and NOTE [Tensors stored in program state] refused the capture: RNNs and old-style normed layers under
# ``functional_call`` in an ``aot_function`` / ``aotcache.compile`` all fell back. A graph cannot rebind an
# attribute at each call, and for these it need not: the forward computes the value before reading it. So after
# each run of the Python in a capture, the attributes are put back to what the module held when the capture
# started, the capture goes on, and no trace tensor is left in the user's module. The module then holds what a
# compiled call that reuses the graph (no Python) leaves too: the value as before the call. That differs from eager
# in one way, by design: eager leaves the value computed from the passed weights until the module's next forward;
# a compiled call leaves the module's earlier value and keeps no reference to the passed tensors. Results are
# eager's: the graph reads the passed weights (graph inputs), and the next forward computes the value again.
#
# The RNN's lists are private and read only after their check, so the walk leaves them out too (``walk_skips``):
# an eager ``functional_call`` between compiled calls rebuilds them and would otherwise fail the program guards
# and trace again at every call. ``module.weight`` is public: code may read it before the call (it stays walked and
# guarded by identity: an eager forward between compiled calls traces again, as any rebound attribute does), and
# after a plain forward of the module eager leaves it computed from the module's own, trained weights, which a
# graph reused without Python would not update. So the capture of an ``aot_module`` puts back only the private
# caches (``private_only``): an ``aot_module`` of a weight-normed or pruned layer is refused as before (NOTE
# [Tensors stored on modules]) and its fallback leaves eager's ``module.weight``; under ``functional_call`` eager's
# own value is the passed weights', which the module forgets at its next forward. Only what is listed here counts:
# tensors a forward keeps for its own later use (``self.prev = h``) are refused as before. Parametrizations
# (``nn.utils.parametrizations``, ``parametrize.cached()``), BatchNorm with its statistics passed as buffers and
# ``nn.MultiheadAttention`` keep no such attribute and were captured already (tests/aot/test_functional_call_caches.py).
_RNN_CACHES = ("_flat_weights", "_flat_weight_refs")
_MISSING = object()


def _hook_set_names(module: nn.Module) -> tuple[str, ...]:
    """The attributes that the old-style weight-norm, spectral-norm and pruning pre-hooks of ``module`` set, those
    that run before any other pre-hook."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    names = []
    for hook in module._forward_pre_hooks.values():
        for kind, attribute in ((WeightNorm, "name"), (SpectralNorm, "name")):  # (not prune: below)
            if isinstance(hook, kind) and type(hook).__call__ is kind.__call__:
                names.append(getattr(hook, attribute))
                break
        else:  # another hook runs before the rest: it could read the attribute before it is computed
            break
    return tuple(names)


def rebuilt_cache_names(module: Any, private_only: bool = False) -> tuple[str, ...]:
    """The attributes of ``module`` that are caches its own code computes from its weights before reading them;
    with ``private_only``, those only the module's code reads (NOTE [Caches a module rebuilds from its weights])."""
    if not isinstance(module, nn.Module):
        return ()
    names = _RNN_CACHES if isinstance(module, nn.RNNBase) else ()
    if private_only or not module._forward_pre_hooks:
        return names
    return (*names, *_hook_set_names(module))


def walk_skips(module: Any) -> tuple[str, ...]:
    """The rebuilt caches of ``module`` that only its own code reads, after computing them: left out of the walk."""
    return rebuilt_cache_names(module, private_only=True)


def modules_among(values: Iterable[Any]) -> list[nn.Module]:
    """The modules among ``values`` and among the items of the lists, tuples and dicts in them (one level deep),
    once each: the modules whose caches a run of the Python may rebuild."""
    found: dict[int, nn.Module] = {}
    for value in values:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, nn.Module):
                found.setdefault(id(item), item)
    return list(found.values())


class SavedRebuiltCaches:
    """The rebuilt caches of ``modules`` and of their submodules, as they are now (NOTE [Caches a module rebuilds
    from its weights])."""

    def __init__(self, modules: Iterable[nn.Module], private_only: bool = False) -> None:
        self._saved: list[tuple[nn.Module, tuple[tuple[str, Any, list | None], ...]]] = []
        seen: set[int] = set()
        for root in modules:
            for module in root.modules():
                names = rebuilt_cache_names(module, private_only)
                if names and id(module) not in seen:
                    seen.add(id(module))
                    values = [(name, module.__dict__.get(name, _MISSING)) for name in names]
                    self._saved.append((module, tuple((name, value, list(value) if isinstance(value, list) else None)
                                                      for name, value in values)))

        # NOTE [A public cache computed from the module's own weights]
        # Put back, ``module.weight`` holds what the capture found, which is eager's only when the hook computed it
        # from tensors ``functional_call`` swapped in (eager forgets those at the module's next forward). A hook
        # that ran on the module's own weights leaves eager's current weight there, which a graph reused without
        # Python would not update (stale once those weights change in place; read stale by code that reads it before
        # the forward). So while the Python runs, a global pre-hook notes a normed module called with its own
        # tensors, and such a capture is refused (``computed_from_own``).
        self._own: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
        if not private_only:
            for module, entries in self._saved:
                if any(name not in _RNN_CACHES for name, _, _ in entries):
                    self._own[id(module)] = (module, {**module._parameters, **module._buffers})
        self._from_own: list[str] = []

    def __bool__(self) -> bool:
        return bool(self._saved)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While the body runs, note each module with a public cache that is called with its own tensors."""
        if not self._own:
            yield
            return

        def called(module: nn.Module, args: Any) -> None:
            entry = self._own.get(id(module))
            if entry is not None and entry[0] is module:
                current = {**module._parameters, **module._buffers}
                if current.keys() == entry[1].keys() and all(current[k] is v for k, v in entry[1].items()):
                    self._from_own.append(type(module).__name__)

        handle = nn.modules.module.register_module_forward_pre_hook(called)
        try:
            yield
        finally:
            handle.remove()

    def computed_from_own(self) -> list[str]:
        """The modules (by type) whose public cache a run computed from their own weights: refused."""
        return list(dict.fromkeys(self._from_own))

    def put_back(self) -> None:
        """Bind each cache attribute to the object it held when saved, with the items it held (the forward
        rebuilds the lists as new ones; the RNN's ``__setattr__`` of a weight writes into the list in place)."""
        for module, entries in self._saved:
            attributes = module.__dict__
            for name, value, items in entries:
                if value is _MISSING:
                    attributes.pop(name, None)
                    continue
                if attributes.get(name, _MISSING) is not value:  # (a write costs the guards' dict tags)
                    attributes[name] = value
                if items is not None and (len(value) != len(items) or any(a is not b for a, b in zip(value, items))):
                    value[:] = items


@contextlib.contextmanager
def rebuilt_caches_kept(modules: Iterable[nn.Module], private_only: bool = False) -> Iterator[None]:
    """Put the rebuilt caches of ``modules`` (and their submodules) back after the body, however it ends."""
    saved = SavedRebuiltCaches(modules, private_only)
    try:
        yield
    finally:
        saved.put_back()
