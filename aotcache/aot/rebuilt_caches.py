"""Caches a module keeps of its own weights and rebuilds itself when they change (``nn.LSTM``'s ``_flat_weights``):
put back after each run of the Python in a capture instead of refusing it (NOTE [Caches a module rebuilds from
its weights])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["SavedRebuiltCaches", "modules_among", "rebuilt_cache_names", "rebuilt_caches_kept"]

# NOTE [Caches a module rebuilds from its weights]
# ``nn.RNNBase`` (RNN, GRU, LSTM) keeps its weights in a second place: the ``_flat_weights`` list, with weak
# references to them in ``_flat_weight_refs``. Its forward first compares those references with the module's
# weight attributes and, when one differs, builds both lists anew from the attributes
# (``_update_flat_weights``; ``__getstate__`` does the same), so the list is only read right after that check.
# ``torch.func.functional_call`` swaps the passed tensors into ``_parameters`` directly, not through the RNN's
# ``__setattr__``, so in eager the forward rebuilds the lists from the passed tensors and the swap-back leaves them
# there: after an eager ``functional_call(lstm, weights, x)`` the list holds ``weights``' tensors (keeping them
# alive) until the module's next forward rebuilds it from its own parameters.
#
# In a capture the passed tensors are trace tensors, so the list was left holding the capture's FunctionalTensors:
# inside an ``aot_module`` (an untrusted fingerprint at every later call, found earlier) and, under ``functional_call``
# in an ``aot_function`` / ``aotcache.compile``, in the program state the guards watch, which NOTE [Tensors stored
# in program state] then refused (every RNN under ``functional_call`` fell back). A graph cannot rebind an
# attribute at each call, and it need not: the lists are a cache only the module's own forward reads, after
# rebuilding it whenever its references do not match the weights. So after each run of the Python in a capture,
# the two attributes are put back to the lists the module held when the capture started, the capture goes on, and
# no trace tensor is left in the user's module. The module then holds what a compiled call that reuses the graph
# leaves too (it runs no Python): its lists as before the call, those of its own parameters when it was last run
# on them. That differs from eager in one way only, by design: eager keeps the passed tensors in the private list
# until the next forward; a compiled call keeps no reference to them. Every result is the same: the graph reads
# the passed weights (graph inputs), and the next eager forward, ``functional_call`` or ``state_dict`` /
# ``all_weights`` read the weights, not the list (tests/aot/test_functional_call_caches.py).
#
# Only attributes listed here count, by class: a cache is listed when the module's own code rebuilds it from its
# weights before every read. Tensors a forward keeps for its own later use (``self.prev = h``) are still refused
# (NOTE [Tensors stored on modules]); the old-style ``weight_norm`` / ``spectral_norm`` hooks' ``module.weight``,
# set by a forward pre-hook at every call, is such a refused case (NOTE [Weights set by forward pre-hooks]).
_REBUILT_BY_CLASS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.RNNBase, ("_flat_weights", "_flat_weight_refs")),
)
_MISSING = object()


def rebuilt_cache_names(module: Any) -> tuple[str, ...]:
    """The attributes of ``module`` that are caches its own code rebuilds from its weights before reading them."""
    for cls, names in _REBUILT_BY_CLASS:
        if isinstance(module, cls):
            return names
    return ()


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

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._saved: list[tuple[nn.Module, tuple[tuple[str, Any, list | None], ...]]] = []
        seen: set[int] = set()
        for root in modules:
            for module in root.modules():
                names = rebuilt_cache_names(module)
                if names and id(module) not in seen:
                    seen.add(id(module))
                    values = [(name, module.__dict__.get(name, _MISSING)) for name in names]
                    self._saved.append((module, tuple((name, value, list(value) if isinstance(value, list) else None)
                                                      for name, value in values)))

    def __bool__(self) -> bool:
        return bool(self._saved)

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
def rebuilt_caches_kept(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put the rebuilt caches of ``modules`` (and their submodules) back after the body, however it ends."""
    saved = SavedRebuiltCaches(modules)
    try:
        yield
    finally:
        saved.put_back()
