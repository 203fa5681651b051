"""How :class:`~aotcache.autograd_cache.reachable.Reachable` writes down state: modules, objects and classes.

An ``nn.Module`` is its class and its ``__dict__`` (parameters, buffers, submodules, forward hooks); a plain
object its class and its ``__dict__`` / slots; a class its bases and the members reachable code may name or
call, ``torch.Tensor``'s own included (NOTE [Reachable code] in reachable.py, NOTE [Tensor methods patched]).
:class:`ObjectWalk` is one part of :class:`Reachable` (a mixin over its state and its ``ref`` dispatch), not a
walker of its own.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aotcache.aot.hot_path import generate_memos, is_method_router, setting_by_value
from aotcache.aot.rebuilt_caches import rebuilt_cache_names
from aotcache.autograd_cache.digests import Untrusted
from aotcache.autograd_cache.live_containers import entries_of, members_of
from aotcache.autograd_cache.value_kinds import (
    VOLATILE_ATTRIBUTES,
    is_user_code,
    library_callable_name,
    slot_names,
    type_name,
)
from aotcache.code_origin import defining_module, is_library, library_version

__all__ = ["ObjectWalk"]

# Class-dict entries that describe the class rather than behave (never read by tracing).
_CLASS_METADATA = frozenset({
    "__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__", "__annotate__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__type_params__",
    "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__abstractmethods__", "__slots__",
    "__slotnames__", "_abc_impl", "__protocol_attrs__", "__non_callable_proto_members__", "__init__", "__new__",
    "__repr__", "__str__", "__format__", "__dir__", "__sizeof__", "__del__", "__reduce__", "__reduce_ex__",
    "__getstate__", "__setstate__", "__copy__", "__deepcopy__", "__init_subclass__", "__class_getitem__",
    "__subclasshook__", "__getnewargs__", "__getnewargs_ex__", "__rich_repr__", "__post_init__",
})
# Class-dict entries that run when the class is called (constructed): included for classes that reachable
# code can call, i.e. classes referenced as values rather than only as the type of an existing instance.
_CONSTRUCTORS = frozenset({"__init__", "__new__", "__post_init__"})
# Module-dict entries that hold hooks: forward hooks are hashed, backward hooks make the result untrusted,
# state-dict hooks do not run during a forward.
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_BACKWARD_HOOK_DICTS = ("_backward_hooks", "_backward_pre_hooks")
_IGNORED_MODULE_ENTRIES = frozenset({"_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                     "_load_state_dict_post_hooks", "_is_full_backward_hook"})
# Methods of a torch.autograd.Function that autograd itself calls by name (user code names only ``apply``)
_AUTOGRAD_FUNCTION_METHODS = frozenset({"forward", "backward", "setup_context", "jvp", "vjp", "vmap"})
_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _is_method_like(value: Any) -> bool:
    """A class member code may call (NOTE [Tensor methods patched]): a function, builtin or class, also wrapped in
    ``staticmethod`` / ``classmethod`` / ``property``."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return is_user_code(value) or library_callable_name(value) is not None


class ObjectWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that writes down state: ``nn.Module``
    trees, plain objects, classes and ``torch.Tensor``'s members (it uses the walker's state and ``ref``)."""

    # -- modules and objects ------------------------------------------------------------------------------

    # NOTE [Compiled wrappers in a walked program]
    # A compiled wrapper (aotcache's AOTModule) inside a walked model runs its wrapped module inline while the
    # enclosing call is captured (NOTE [Nested compiled functions] in aot/module.py), so what it contributes to
    # the graph is that module (in its ``_modules``), its hooks and its class's code. Its compile machinery (the
    # AOTFunction and its compiled graphs, locks, counters) is not program: the class names those attributes in
    # ``fingerprint_skips`` and the walk leaves them out, instead of calling the whole program untrusted. A
    # compiled function (AOTFunction, aotcache.compile's) likewise runs its function inline: its class's
    # ``fingerprint_program(obj)`` returns that function, which the walk sees in its place.
    def _module_token(self, module: nn.Module) -> str:
        cls = type(module)
        if type_name(cls).startswith("torch._dynamo"):
            raise Untrusted("torch.compile-d submodule")
        if isinstance(module, torch.jit.ScriptModule):  # TorchScript: C++ code and C++-backed registries
            raise Untrusted("torch.jit.script-ed submodule")
        call = cls.__call__
        if call is not nn.Module.__call__ and not (isinstance(call, types.FunctionType)
                                                   and is_library(defining_module(call))):
            # NOTE [Library __call__ overrides]: a user's __call__ is code the walk does not read; one defined
            # by torch or an installed library is pinned by its version in the key, as library forwards are
            # (torch's ParameterDict / ParameterList define a raising __call__, and peft's LoRA layers hold them)
            self._note(f"module overrides __call__: {type_name(cls)}")
        entries = []
        guards = self._guards
        managed = id(module) in self._managed  # its attributes and entries: ModuleState checks them per call
        if guards is not None and not managed:
            guards.attributes(module, ("__class__",))
            guards.length(module.__dict__)
        machinery = getattr(cls, "fingerprint_skips", ())  # NOTE [Compiled wrappers in a walked program]
        machinery = (*machinery, *rebuilt_cache_names(module))  # NOTE [Caches a module rebuilds from its weights]
        memos = generate_memos(cls)  # NOTE [Generate memos] in aot/hot_path.py: only generate reads them
        for name, value in entries_of(module.__dict__):  # NOTE [Containers another thread changes]
            if name in _IGNORED_MODULE_ENTRIES or name in machinery or name in memos or is_method_router(name, value):
                continue
            if guards is not None:
                self._module_attribute_guard(module.__dict__, name, value, managed)
            if name in _BACKWARD_HOOK_DICTS:
                if value:
                    self._note("module backward hooks")
                    if guards is not None:
                        guards.contents(value)
                    entries.append(f"{name}=[{','.join(self.ref(hook) for hook in members_of(value.values()))}]")
                continue
            if name in _FORWARD_HOOK_DICTS:
                if guards is not None and (value or not managed):
                    guards.contents(value)  # hooks by identity (ModuleState counts them)
                entries.append(f"{name}=[{','.join(self.ref(hook) for hook in members_of(value.values()))}]")
            elif name in _MODULE_CONTAINERS:
                # a managed module's children by identity too: ModuleState's settings may not tell a child
                # swapped for another of the same type and settings (whose lists or hooks differ)
                if guards is not None and (not managed or name == "_modules"):
                    guards.contents(value)
                entries.append(f"{name}=[{','.join(f'{k}:{self.ref(v)}' for k, v in entries_of(value))}]")
            elif name == "_non_persistent_buffers_set":  # names state_dict leaves out: never read by forward
                entries.append(f"{name}={self._bookkeeping_token(value)}")
            else:
                entries.append(f"{name}={self._named_ref(name, value)}")  # NOTE [Sets in their iteration order]
        entries.sort()
        return f"module {self.type_ref(cls)} " + " ".join(entries)

    def _module_attribute_guard(self, attributes: dict, name: str, value: Any, managed: bool) -> None:
        """Guard ``attributes[name]`` of a walked module (NOTE [Rebound list attributes] in program_guards.py)."""
        if name in _MODULE_CONTAINERS or name in _FORWARD_HOOK_DICTS or name in _BACKWARD_HOOK_DICTS:
            if not managed:
                self._guards.slot(attributes, name, value)
        elif isinstance(value, (list, set)) or (isinstance(value, tuple) and not (managed and setting_by_value(value))):
            self._guards.slot_members(attributes, name, value)  # rebuilt by some modules: read again, by members
        elif not managed or isinstance(value, dict):
            self._guards.slot(attributes, name, value)  # ModuleState counts a managed module's dicts only

    def _bookkeeping_token(self, value: Any) -> str:
        """torch's bookkeeping no forward reads: not guarded, a set by its sorted members (NOTE [Sets in their
        iteration order] in set_orders.py)."""
        guards, self._guards, self._sets_sorted = self._guards, None, True
        try:
            return self.ref(value)
        finally:
            self._guards, self._sets_sorted = guards, False

    def _object_token(self, value: Any) -> str:
        state = value.__dict__ if hasattr(value, "__dict__") else {}
        entries = entries_of(state)  # NOTE [Containers another thread changes]
        slots = [(name, getattr(value, name)) for name in slot_names(type(value)) if hasattr(value, name)]
        if self._guards is not None:
            # NOTE [An object's __dict__ replaced]: its entries are read from the dict the walk saw, so that dict is
            # guarded by identity too (``obj.__dict__ = {...}`` rebinds every attribute and writes no recorded dict)
            dict_attribute = ("__dict__",) if hasattr(value, "__dict__") else ()
            self._guards.attributes(value, ("__class__", *dict_attribute, *(name for name, _ in slots)))
            if hasattr(value, "__dict__"):
                self._guards.length(state)
                for name, item in entries:
                    if name not in VOLATILE_ATTRIBUTES:
                        self._guards.slot(state, name, item)
        items = sorted(f"{k}={self._named_ref(k, v)}" for k, v in (*entries, *slots) if k not in VOLATILE_ATTRIBUTES)
        return f"object {self.type_ref(type(value))} " + " ".join(items)

    # -- classes ------------------------------------------------------------------------------------------

    def _add_names(self, names: Iterable[str]) -> None:
        self._names.update(names)

    def _member_included(self, index: int, cls: type, name: str, value: Any) -> bool:
        if name in _CONSTRUCTORS and index in self._constructible and not is_library(cls.__module__):
            return True
        if name in _CLASS_METADATA:
            return False
        if is_library(cls.__module__):
            return is_user_code(value)  # torch's own members: only when monkeypatched with user code
        if name in _AUTOGRAD_FUNCTION_METHODS and issubclass(cls, torch.autograd.Function):
            return True  # autograd calls them by name: backward runs though no user code names it
        if name.startswith("__") and name.endswith("__"):
            return True
        return name in self._names

    def _include_new_class_members(self) -> bool:
        """Add class members newly reachable by name; True when something new must be processed."""
        added = False
        for index, included in list(self._classes.items()):
            cls = self._objects[index]
            self._walking, self._walking_index = cls, index  # NOTE [Iterators a program advances] in reachable.py
            self._entry_name = None
            if not included:  # first visit: the class's bases and metaclass
                included.add("")
                for base in cls.__bases__:
                    if base is not object:
                        self.type_ref(base)
                if type(cls) is not type:
                    self.type_ref(type(cls))
                added = True
            if index in self._constructible:  # super().__init__() reaches the bases' constructors
                for base in cls.__mro__[1:]:
                    base_index = self._index.get(id(base))
                    if base_index in self._classes and base_index not in self._constructible:
                        self._constructible.add(base_index)
                        added = True
            for name, value in list(vars(cls).items()):
                if name not in included and self._member_included(index, cls, name, value):
                    included.add(name)
                    try:
                        self._named_ref(name, value)
                    except Untrusted as exc:
                        exc.where = exc.where or f"{type_name(cls)}.{name}"
                        raise
                    added = True
        return added or bool(self._queue)

    def _class_token(self, index: int) -> str:
        cls = self._objects[index]
        self._walking, self._walking_index = cls, index  # NOTE [Iterators a program advances] in reachable.py
        bases = ",".join(self.type_ref(base) for base in cls.__bases__)
        members = sorted(name for name in self._classes[index] if name)
        self._entry_name = None
        body = ";".join(f"{name}={self._named_ref(name, vars(cls)[name])}" for name in members)
        if self._guards is not None:
            namespace = vars(cls)
            self._guards.owner(namespace, cls)  # a read-only view: written back through the class
            if not is_library(cls.__module__):
                self._guards.length(namespace)  # an attribute added here may shadow one of a base class
            for name in self._names.intersection(namespace).union(members):
                self._guards.slot(namespace, name, namespace[name])
        return (f"class {type_name(cls)}{library_version(cls.__module__)} bases=({bases}) "
                f"meta={self.type_ref(type(cls))} members={{{body}}}")

    # -- torch.Tensor's members ---------------------------------------------------------------------------

    # NOTE [Tensor methods patched]
    # ``y.sigmoid()`` on a tensor reaches ``torch.Tensor``'s members through no object the walk sees (the type of
    # ``y`` is known only when the code runs), so ``torch.Tensor.sigmoid = my_sigmoid`` (or ``= torch.Tensor.tanh``)
    # changed neither the digest nor the guards: the graph traced with the old method kept running in-process
    # and a warm process with the patch loaded it through the same fingerprint (found in session 16). Every name
    # reachable code uses that ``torch.Tensor``'s own namespace holds, and every method there (``y * 2`` names no
    # ``__mul__``: ``torch.Tensor.__mul__ = f`` shadows TensorBase's; ``F.normalize`` calls ``Tensor.norm`` from
    # torch's code, which the walk does not read: found in the session 16 review), is written down: user code by its code,
    # library code by where it is defined (the torch version fixes the unpatched ones). The guards hold the
    # whole namespace (a method set on ``torch.Tensor`` shadows ``TensorBase``'s C method, which cannot be
    # patched itself; NOTE [Whole namespaces in the guards] in program_guards.py). Only methods count: torch adds
    # ``__slotnames__`` (a list) to the class on the first deepcopy, which must not change a digest.
    def _include_tensor_members(self) -> bool:
        """Write down the ``torch.Tensor`` members reachable code may name; True when that queued new nodes."""
        namespace = vars(torch.Tensor)
        if self._guards is not None and not self._tensor_members:
            self._guards.owner(namespace, torch.Tensor)
            self._guards.namespace(namespace)  # NOTE [Whole namespaces in the guards] in program_guards.py
        methods = [name for name, value in namespace.items() if _is_method_like(value)]
        for name in sorted(self._names.intersection(namespace).union(methods).difference(self._tensor_members)):
            value = namespace[name]
            if is_user_code(value) or not is_library(getattr(value, "__module__", None) or "torch"):
                self._tensor_members[name] = self.ref(value)
            else:
                self._tensor_members[name] = self._library_member_token(value) or self.ref(value)
        return bool(self._queue)
