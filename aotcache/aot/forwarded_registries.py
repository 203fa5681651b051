"""The registries (``_modules``, ``_parameters``, ``_buffers``) of the module wrapper
(:class:`~aotcache.aot.module.AOTModule`), which write through to the wrapped module's.

Library code edits a module's registries directly (quantization swaps children, pruning moves parameters); given
the wrapper, those writes must land where the wrapped forward reads them (NOTE [Registries written through the
wrapper]). Kept apart from the wrapper itself: a dict with its own protocol; the name of the wrapper's one child
(:data:`ORIG_MODULE`) is defined here, where the registries tell it from the names they forward.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ForwardedRegistry", "ORIG_MODULE"]

ORIG_MODULE = "orig_module"  # the wrapper's one child: the wrapped module


# NOTE [Registries written through the wrapper]
# Library code edits a module's registries directly: torch.ao.quantization's ``quantize_dynamic`` / ``prepare_qat`` walk
# ``named_children()`` and write each swapped child with ``module._modules[name] = new``; ``prune``, ``weight_norm`` and
# ``spectral_norm`` move a parameter with ``del module._parameters[name]``. Given the wrapper, whose children are the
# wrapped module's (NOTE [Children of the wrapper] in module.py), the writes landed in the wrapper's own dicts, which no
# forward reads: ``quantize_dynamic(aotcache.compile(model), inplace=True)`` left every Linear in float and later calls
# gave the float model's results, silently, and a write of ``compiled._parameters["bias"]`` was dropped; the deletes
# raised ``KeyError`` where eager runs (session 25). The wrapper's ``_modules``, ``_parameters`` and ``_buffers`` are
# :class:`ForwardedRegistry` dicts: an item written or deleted under any name but ``orig_module`` is written to (deleted
# from) the wrapped module's registry, and a name read with ``[]`` that the wrapper does not hold is read there.
# Membership (``in``, ``get``, iteration) stays the wrapper's own, so nn.Module's lookups and a parent's ``state_dict``
# walk see what they saw before. Plain tensors set on the wrapper go to the wrapped module as submodules and parameters
# do (``prune`` sets ``module.weight = weight_orig * mask`` from a forward pre-hook: the wrapped forward reads it).
class ForwardedRegistry(dict):
    """One of the wrapper's registries (``_modules``, ``_parameters``, ``_buffers``), whose writes, deletes and
    missing reads go to the wrapped module's registry of that name (NOTE [Registries written through the
    wrapper])."""

    __slots__ = ("children", "attribute")

    def __init__(self, attribute: str, children: dict | None = None) -> None:
        super().__init__()
        self.attribute = attribute
        self.children = self if children is None else children  # the wrapper's ``_modules``, holding the wrapped

    def _target(self, name: str) -> dict | None:
        """The wrapped module's registry for ``name``, or None where ``name`` is the wrapper's own."""
        wrapped = dict.get(self.children, ORIG_MODULE)
        if wrapped is None or name == ORIG_MODULE or dict.__contains__(self, name):
            return None
        return getattr(wrapped, self.attribute)

    def __setitem__(self, name: str, value: Any) -> None:
        target = self._target(name)
        if target is None:
            dict.__setitem__(self, name, value)
        else:
            target[name] = value

    def __delitem__(self, name: str) -> None:
        target = self._target(name)
        if target is None:
            dict.__delitem__(self, name)
        else:
            del target[name]

    def __missing__(self, name: str) -> Any:
        target = self._target(name)
        if target is None:
            raise KeyError(name)
        return target[name]

    def pop(self, name: str, *default: Any) -> Any:
        target = self._target(name)
        return dict.pop(self, name, *default) if target is None else target.pop(name, *default)
