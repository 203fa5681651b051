"""The class of each module wrapper: a subclass of :class:`~aotcache.aot.module.AOTModule` made once per wrapped
class, named and signed as that class (NOTE [The wrapper's class]).

Code that inspects a model's class (transformers' Trainer, peft) reads the wrapped model's name, ``forward``
signature and, for a transformers or peft model, ``isinstance``; the wrapper's own behaviour stays on the class it
stands on (:func:`static_class`), which copies, pickles and ``type(wrapped)(module, ...)`` build from.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

__all__ = ["class_standing_for", "static_class"]

# NOTE [The wrapper's class]
# Code that inspects a model's *class* rather than the instance sees the wrapper's: transformers' Trainer finds
# the label arguments with ``inspect.signature(type(model).forward)`` and the model kind by
# ``type(model).__name__``, so with ``AOTModule.forward(*args, **kwargs)`` it found no labels and ``evaluate()``
# reported no ``eval_loss``. Each wrapper is therefore an instance of a subclass made once per (wrapper class,
# wrapped class): its name is the wrapped class's, its ``forward`` carries the wrapped class's ``forward`` as
# ``__wrapped__`` (so its signature) and runs the wrapper's. ``isinstance(wrapped, AOTModule)`` holds; a copy, a
# pickle and ``type(wrapped)(module, ...)`` build from the wrapper class itself (``static_class``).
# A transformers ``PreTrainedModel`` is also identified by ``isinstance``: the Trainer saved a checkpoint of a
# wrapper as a bare state dict, without ``config.json`` (``from_pretrained`` of it then failed). For such a model
# the signed class's ``__class__`` is the wrapped model's class, which ``isinstance`` consults after the type, so
# ``isinstance(wrapped, PreTrainedModel)`` holds and the Trainer calls ``wrapped.save_pretrained`` (the wrapped
# model's). The same for a peft ``PeftModel``: the Trainer reads the dataset columns from the *base* model's
# ``forward`` when ``isinstance(model, PeftModel)`` (a ``PeftModel``'s own is ``forward(*args, **kwargs)``), so for a
# wrapper it kept no column and raised "The batch received was empty" where eager trains; it also saves and loads
# adapters by that test. Only for these: for a torch building block (``isinstance(m, nn.Linear)`` in an init
# function run by ``model.apply``) it would make the wrapper count twice.
_CLASSES: dict[tuple[type, type], type] = {}
_CLASSES_LOCK = threading.Lock()


def static_class(cls: type) -> type:
    """The wrapper class a signed class of NOTE [The wrapper's class] stands on (``cls`` itself otherwise)."""
    return cls.__dict__.get("_aotcache_wrapper_class", cls)


def class_standing_for(cls: type, module_cls: type) -> type:
    """The subclass of wrapper class ``cls`` named and signed as ``module_cls`` (NOTE [The wrapper's class])."""
    static = static_class(cls)
    key = (static, module_cls)
    found = _CLASSES.get(key)
    if found is not None:
        return found
    run = static.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return run(self, *args, **kwargs)

    with contextlib.suppress(AttributeError, TypeError):
        functools.update_wrapper(forward, module_cls.forward)
    namespace = {"forward": forward, "_aotcache_wrapper_class": static, "__module__": static.__module__,
                 "__qualname__": f"{static.__qualname__}[{module_cls.__qualname__}]", "__doc__": static.__doc__}
    if _is_model_class(module_cls):  # NOTE [The wrapper's class]: isinstance(wrapped, PreTrainedModel)
        namespace["__class__"] = property(lambda self: type(self.orig_module))
    signed = type(module_cls.__name__, (static,), namespace)
    with _CLASSES_LOCK:
        return _CLASSES.setdefault(key, signed)


_MODEL_CLASSES = frozenset({"transformers.modeling_utils.PreTrainedModel", "peft.peft_model.PeftModel",
                            "peft.mixed_model.PeftMixedModel"})


def _is_model_class(cls: type) -> bool:
    """Whether ``cls`` is a transformers ``PreTrainedModel`` or a peft ``PeftModel`` / ``PeftMixedModel`` (by name:
    neither library is imported here)."""
    return any(f"{base.__module__}.{base.__qualname__}" in _MODEL_CLASSES for base in cls.__mro__)
