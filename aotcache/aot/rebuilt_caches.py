"""The weight lists ``nn.RNNBase`` (RNN, GRU, LSTM) rebuilds from its weights before reading them: put back after each
run of the Python in a capture instead of refusing it (NOTE [Caches a module rebuilds from its weights])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["SavedRebuiltCaches", "modules_among", "rebuilt_cache_names", "rebuilt_caches_kept"]

# NOTE [Caches a module rebuilds from its weights]
# ``nn.RNNBase`` (RNN, GRU, LSTM) keeps its weights in a second place, the private ``_flat_weights`` list, with weak
# references to them in ``_flat_weight_refs``. Its forward first compares those references with the weight
# attributes and, when one differs, builds both lists anew from the attributes (``_update_flat_weights``;
# ``__getstate__`` does the same), so the lists are read only right after that check.
#
# ``torch.func.functional_call`` swaps the passed tensors into ``_parameters`` directly (not through the module's
# ``__setattr__``), so in eager the forward rebuilds the lists from the passed tensors and the swap-back leaves them
# so: after an eager ``functional_call(lstm, weights, x)`` the list holds ``weights``' tensors (keeping them alive)
# until the module's next forward rebuilds it from its own weights.
#
# In a capture the passed tensors are trace tensors, so the lists were left holding the capture's trace tensors and
# NOTE [Tensors stored in program state] refused the capture: RNNs under ``functional_call`` in an ``aot_function``
# / ``aotcache.compile`` all fell back. A graph cannot rebind an attribute at each call, and for these lists it need
# not: the forward rebuilds them before reading them. So after each run of the Python in a capture (and around an
# ``aot_module``'s swap) the lists are put back to what the module held when the capture started, the capture goes
# on, and no trace tensor is left in the user's module. The module then holds what a compiled call that reuses the
# graph (no Python) leaves too: the lists as before the call. That differs from eager in one way, by design: eager
# leaves the passed weights in the list until the module's next forward; a compiled call leaves the module's own and
# keeps no reference to the passed tensors. Results are eager's: the graph reads the passed weights (graph inputs),
# and the next forward rebuilds the lists. The lists are private and read only after their check, so the walk
# leaves them out too: an eager ``functional_call`` between compiled calls rebuilds them and would otherwise fail
# the program guards and trace again at every call.
#
# Only these lists count. The old-style ``nn.utils.weight_norm`` / ``spectral_norm`` / ``prune`` pre-hooks also set
# an attribute from the weights before each forward, but ``module.weight`` is public: code reads it outside the
# forward (before the call, ``prune`` ranking it again), eager leaves it computed from the module's current weights
# (or the passed ones) after each call, and the hook objects' settings (``WeightNorm.dim``, the power iteration's)
# are not guarded. Put back, it would be stale, so such layers stay refused (NOTE [Tensors stored in program
# state], NOTE [Tensors stored on modules]) and fall back with eager's results; ``nn.utils.parametrizations``, their
# replacement, compute the weight at each read, keep no attribute and are captured whole. So are tensors a forward
# keeps for its own later use (``self.prev = h``): refused. BatchNorm with its statistics passed as buffers and
# ``nn.MultiheadAttention`` keep no such attribute either (tests/aot/test_functional_call_caches.py).
_RNN_CACHES = ("_flat_weights", "_flat_weight_refs")
_MISSING = object()


def rebuilt_cache_names(module: Any) -> tuple[str, ...]:
    """The attributes of ``module`` that are caches only its own code reads, after rebuilding them from its weights
    (an RNN's weight lists): put back after a capture's run and left out of the walk (NOTE [Caches a module rebuilds
    from its weights])."""
    return _RNN_CACHES if isinstance(module, nn.RNNBase) else ()


def modules_among(values: Iterable[Any]) -> list[nn.Module]:
    """The modules among ``values`` and among the items of the lists, tuples and dicts in them (one level deep),
    once each: the modules whose caches a run of the Python may rebuild."""
    found: dict[int, nn.Module] = {}
    for value in values:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in tuple(items):  # one step: another thread may change the container meanwhile
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
