"""``AOTModule``: the drop-in ``nn.Module`` wrapper that :func:`~aotcache.api.aot_module` returns.

The wrapper's forward runs the wrapped module through an :class:`~aotcache.aot.api.AOTFunction`; everything
else behaves as the wrapped module does, so ``aot_module(model)`` can replace ``model`` in a real job:

* attributes and methods the wrapper lacks are the wrapped module's (``config``, ``generate``, ``device``,
  custom methods); assigning an attribute the wrapped module has sets it there;
* ``state_dict`` / ``load_state_dict`` / ``named_parameters`` / ``parameters`` / ``named_buffers`` /
  ``named_modules`` use the wrapped module's names (no ``orig_module.`` prefix), also when the wrapper is a
  submodule of a larger model, so checkpoints move both ways between the eager and the wrapped model;
* ``train()``, ``eval()``, ``to()``, ``zero_grad()`` reach the wrapped module (it is the wrapper's child), and
  the compiled call sees the change (its settings and tensors are read at every call).

This module is the wrapper's ``nn.Module`` face: its forward, attributes, names, state dicts, methods routed
through the compiled forward, copies and pickles. What the compiled call runs (the wrapped module called with its
tensors swapped in) is :mod:`~aotcache.aot.module_call`; the class each wrapper takes on is
:mod:`~aotcache.aot.wrapper_class`; its registries that write through to the wrapped module's are
:mod:`~aotcache.aot.forwarded_registries`.

NOTE [Methods run the compiled forward]
A method of the wrapped module, such as transformers' ``generate``, calls ``self(...)`` or ``self.forward``
with ``self`` the *wrapped* module, and inspects ``self.forward``'s signature, ``type(self)`` and
``self.__class__.__name__``. Binding the method to the wrapper instead would break those, so it stays bound
to the wrapped module, and for the duration of the call the wrapped module's instance attribute ``forward``
is a router: it runs the wrapper's compiled forward, and within that call, in that thread, it hands the
compiled call's own runs of the module (capture, fallback) to the module's forward. The module settings and
the program walks leave the router out, so the compiled call sees the module exactly as a direct call does
(same settings, same fingerprint, same compiled graph). It used to remove itself for the duration, and a
method called meanwhile from another thread ran the module eagerly, beside a capture that had swapped its
tensors. The router carries the original forward as ``__wrapped__``, so ``inspect.signature(self.forward)``
is unchanged. Forward hooks registered on the wrapped
module itself would run twice (once around the router, once inside the captured graph), so with such hooks,
or when the module already has an instance ``forward``, the method runs eagerly (logged once).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx._symbolic_trace as _symbolic_trace
from torch import nn

from aotcache.aot.api import AOTFunction
from aotcache.aot.cache_objects import (
    find_cache_arguments,
    register_caches_for,
    register_transformers_caches,
    write_back_caches,
)
from aotcache.aot.capture_threads import swap_gate, tracing_in_this_thread
from aotcache.aot.compile_step import AOTOptions
from aotcache.aot.fallback import has_uninitialized_parameters
from aotcache.aot.forwarded_registries import ORIG_MODULE, ForwardedRegistry
from aotcache.aot.hot_path import ModuleState, simple_structure
from aotcache.aot.module_call import ReboundBuffers, functional_module_call
from aotcache.aot.module_state import bind_rebound_buffers
from aotcache.aot.services import CompileServices
from aotcache.aot.wrapper_class import class_standing_for, static_class
from aotcache.logs import log_once

__all__ = ["AOTModule"]

_PREFIX = ORIG_MODULE + "."


def _fx_symbolic_trace_running() -> bool:
    """Whether a user's ``torch.fx.symbolic_trace`` runs: FX's tracing flag is process-wide and make_fx (another
    thread's capture) sets it too, so a make_fx trace in progress is not one (NOTE [Calls under FX's symbolic
    trace])."""
    if not _symbolic_trace._is_fx_tracing_flag:
        return False
    proxy_tensor = sys.modules.get("torch.fx.experimental.proxy_tensor")
    return getattr(proxy_tensor, "_CURRENT_MAKE_FX_TRACER", None) is None


def _registered_on_wrapped(name: str) -> Callable:
    """The wrapper's ``nn.Module`` hook registration ``name``, registering on the wrapped module once the wrapper
    has one (NOTE [State-dict hooks registered on the wrapper])."""
    own = getattr(nn.Module, name)

    def register(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        wrapped = self.__dict__.get("_modules", {}).get(ORIG_MODULE)
        return own(self, *args, **kwargs) if wrapped is None else getattr(wrapped, name)(*args, **kwargs)

    register.__name__ = register.__qualname__ = name
    register.__doc__ = own.__doc__
    return register


class AOTModule(nn.Module):
    """An ``nn.Module`` whose forward runs ``module`` through an :class:`~aotcache.aot.api.AOTFunction`, and
    which otherwise stands in for ``module`` (see the module docstring).

    Parameters and buffers are graph inputs (read from ``orig_module`` on every call), so compiled graphs do
    not depend on weight values, later updates are seen, and gradients land in the parameters' ``.grad``.
    """

    wraps_orig_module = True  # NOTE [Wrappers inside a captured module] in module_call.py: via orig_module
    # compile machinery, not program: left out of fingerprints (NOTE [Compiled wrappers in a walked program])
    fingerprint_skips = frozenset({"compiled", "_state", "_gate", "_lazy", "_routing_lock", "_routing_count", "forward",
                                   "router", "_backend"})

    def __init__(self, module: nn.Module, options: AOTOptions, *, services: CompileServices, cache: Any = True,
                 on_capture_error: str = "fallback") -> None:
        super().__init__()
        # NOTE [Registries written through the wrapper] in forwarded_registries.py
        children = ForwardedRegistry("_modules")
        self.__dict__.update(_modules=children, _parameters=ForwardedRegistry("_parameters", children),
                             _buffers=ForwardedRegistry("_buffers", children))
        # own attributes first: once orig_module is set, attributes it has are assigned to it (__setattr__)
        self.compiled = AOTFunction(functional_module_call(module), options, services=services, cache=cache,
                                    on_capture_error=on_capture_error)
        self.compiled.fingerprint_module = module  # its parameters/buffers are inputs: see fingerprint_cache
        self.compiled.name = type(module).__qualname__
        self._state = ModuleState(module)  # NOTE [Hot path]
        self.compiled.current_settings = self._state.current  # NOTE [A key read before another thread's change]
        self._gate = swap_gate(module)  # NOTE [Calls during a capture's swap]
        # NOTE [Lazy modules]: uninitialized parameters (nn.LazyLinear, ...) have no shape to trace; the first
        # calls run eagerly (which materializes them), then the module is captured as any other
        self._lazy = has_uninitialized_parameters(module)
        self._routing_lock = threading.RLock()  # NOTE [Methods run the compiled forward]
        self._routing_count = 0
        self.orig_module = module
        nn.Module._register_load_state_dict_pre_hook(self, _add_prefix, with_module=True)  # the wrapper's own
        self.training = module.training
        register_transformers_caches()  # NOTE [Cache objects as pytree nodes]
        # NOTE [The wrapper's class] in wrapper_class.py
        self.__class__ = class_standing_for(type(self), type(module))
        self.__dict__["forward"] = self._signed_forward(module)

    def _signed_forward(self, module: nn.Module) -> Callable:
        """The wrapper's forward with the wrapped module's signature (``inspect.signature(wrapped.forward)``, as
        transformers' Trainer reads it to choose dataset columns); it calls the class's ``forward``."""

        run = static_class(type(self)).forward  # NOTE [The wrapper's class]: not the signed class's

        def forward(*args: Any, **kwargs: Any) -> Any:
            return run(self, *args, **kwargs)

        with contextlib.suppress(AttributeError, TypeError):
            functools.update_wrapper(forward, module.forward)
        return forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # NOTE [Nested compiled functions]: called while an enclosing function is captured (aotcache's capture or
        # Dynamo's trace: torch.compiler.is_compiling()), a compiled module or function is inlined, as
        # torch.compile inlines a compiled region: its own signature, guards and cache would meet trace tensors
        if torch.compiler.is_compiling() and tracing_in_this_thread():
            return self.orig_module(*args, **kwargs)
        if torch._C._get_tracing_state() is not None:  # NOTE [Calls under torch.jit.trace]
            return self.orig_module(*args, **kwargs)
        if _fx_symbolic_trace_running():  # NOTE [Calls under FX's symbolic trace]: the wrapper is FX's root
            return self.orig_module.forward(*args, **kwargs)
        if self._lazy:
            if has_uninitialized_parameters(self.orig_module):
                with self._gate.running():  # NOTE [Eager runs beside a capture]
                    return self.orig_module(*args, **kwargs)
            self._lazy = False
        # NOTE [module settings]: the signature includes an id of the module tree's settings (training flags,
        # hyperparameters, hooks), so model.eval() after a training call traces again instead of reusing it
        gate = self._gate  # NOTE [Calls during a capture's swap]
        swaps = gate.swaps
        params, buffers, names, settings = self._state.current()
        if gate.owner is not None or gate.swaps != swaps:  # another thread's capture swapped the tensors meanwhile
            params, buffers, names, settings = gate.read(self._state.current)
        count = simple_structure(args, kwargs)
        compiled = self.compiled
        compiled.num_state = len(params) + len(buffers)
        compiled.num_params = len(params)  # static; buffers are automatic (NOTE [Buffers that change size])
        compiled.buffer_names = names[1]
        if count is None:  # NOTE [Cache objects as pytree nodes]: a cache argument is a pytree node
            register_caches_for(args, kwargs)
            passed = find_cache_arguments(args, kwargs)
            result = self.compiled.call_structured(None, (), (params, buffers, *args), kwargs, extra=settings)
            if type(result) is ReboundBuffers:  # NOTE [Buffers and parameters rebound by forward]
                result = self._bind(result)
            return write_back_caches(passed, result) if passed else result
        structure = (names, count, settings)
        flat = [*params.values(), *buffers.values(), *args]
        result = self.compiled.call_structured(structure, flat, (params, buffers, *args), kwargs, extra=settings)
        return self._bind(result) if type(result) is ReboundBuffers else result

    # NOTE [Calls under torch.jit.trace]
    # ``torch.jit.trace`` of a module holding a compiled module (or of the wrapper itself) records the ATen ops
    # eager runs. It failed with ``IndexError: unordered_map::at`` where eager's trace succeeds (session 25): the
    # tracer names modules by walking ``named_children``, which lists the wrapped module's children (NOTE
    # [Children of the wrapper]), not the wrapper's own, so the module the traced graph called was unknown to it;
    # and a compiled call would have been one autograd.Function (or, after a capture fallback, Dynamo) that the
    # tracer cannot record. While the tracer builds its module map, ``named_children`` is the wrapper's own; a call
    # under the tracer runs the wrapped module (``aot_module``), the function (``aot_function``) or the eager call
    # (``aotcache.compile``'s router) as written, like a call under a capture (NOTE [Nested compiled functions]):
    # nothing is captured, decided or counted, and a later plain call runs its compiled graph as before.

    # NOTE [Calls under FX's symbolic trace]
    # ``torch.fx.symbolic_trace`` of a model holding a wrapper raised "module is not installed as a submodule": the
    # tracer patches ``nn.Module.__call__`` and first looks the called module up in the root's ``named_modules()``,
    # which lists the wrapped module under the wrapper's name, not the wrapper (its names are the model's). Traced
    # as the root itself (torchvision's ``create_feature_extractor``), the forward met proxies, and the capture
    # fallback's Dynamo refused FX ("symbolically trace a dynamo-optimized function"), where eager's trace succeeds
    # (session 25). The wrapper's class keeps nn.Module's own ``__call__`` (so FX's patch does not see the
    # wrapper); under the tracer the call goes to the wrapped module through that patch, found under the wrapper's
    # name, and the root's forward traces the wrapped module's forward: the graph is eager's.
    __call__ = nn.Module.__call__

    # NOTE [Global module hooks and the wrapper]
    # A global module hook (``register_module_forward_hook`` / ``_pre_hook``) runs at every module call. Eager
    # runs it around the wrapped module and its submodules, and so does the captured graph (the capture traces
    # them, and the program guards hold the hooks by identity). Run around the wrapper too, it ran once more:
    # ``o * 3`` gave 9x the module's output where eager gives 3x. So the wrapper's call runs its forward alone
    # unless the wrapper has hooks of its own (then nn.Module's call runs them, and the global hooks with them)
    # or TorchScript traces it. Global backward hooks send the module to the fallback (module_refusals.py).
    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        if _fx_symbolic_trace_running() and not torch.compiler.is_compiling():
            return self.orig_module(*args, **kwargs)  # NOTE [Calls under FX's symbolic trace]
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or torch._C._get_tracing_state()):
            return nn.Module._call_impl(self, *args, **kwargs)
        return self.forward(*args, **kwargs)

    def _bind(self, result: ReboundBuffers) -> Any:
        """The forward's output, after binding the buffers the compiled call rebound (NOTE [Buffers and parameters
        rebound by forward])."""
        bind_rebound_buffers(self.orig_module, result.buffers)
        return result.output

    # -- attributes ---------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            orig = None if modules is None else modules.get(ORIG_MODULE)
            if orig is None:  # during construction or unpickling
                raise
        value = getattr(orig, name)  # AttributeError names the wrapped module's type
        if isinstance(value, types.MethodType) and value.__self__ is orig:
            return self._routed(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # NOTE [Registries written through the wrapper] in forwarded_registries.py: a plain tensor too (``prune``'s
        # ``module.weight = ...``)
        orig = self._wrapped_owner_of(name, registers=isinstance(value, (nn.Module, torch.Tensor)))
        if (orig is not None and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                and name in orig._parameters):  # NOTE [Tensors swapped in through the wrapper]
            orig._parameters[name] = value
            return
        if orig is not None and value is not self:
            # e.g. wrapped.generation_config = ...: the wrapped module's attribute; also a submodule
            # (NOTE [Submodules set through the wrapper])
            setattr(orig, name, value)
            return
        super().__setattr__(name, value)
        if name == "training":  # ``wrapped.training = False`` sets the wrapped module's own flag too, as it does
            wrapped = self.__dict__.get("_modules", {}).get(ORIG_MODULE)  # on the eager model (its forward reads it);
            if wrapped is not None:  # train() / eval() set both anyway, through the children
                wrapped.training = value

    def __delattr__(self, name: str) -> None:
        orig = self._wrapped_owner_of(name)
        if orig is not None and name not in self._parameters and name not in self._buffers:
            delattr(orig, name)  # ``del wrapped.dropout``: the wrapped module's, as eager
            return
        super().__delattr__(name)

    # NOTE [Tensors swapped in through the wrapper]
    # ``torch.func.functional_call(compiled, {"weight": w}, x)`` (also ``nn.utils.stateless``, ``torch.export``'s
    # reparametrization) swaps a tensor in by name on the module it is given: into ``_parameters`` when the name
    # is there, else by ``setattr``. The wrapper's own ``_parameters`` is empty, so a top-level parameter of the
    # wrapped module came here and ``setattr(orig, "weight", w)`` refused the plain tensor with a TypeError
    # (names below the top, ``0.weight``, reach the submodule and were swapped right). A plain tensor set under
    # the name of one of the wrapped module's parameters goes into its parameter slot, as the swap does on an
    # eager module; the compiled forward reads the slots at every call, so it uses the swapped tensors. The
    # wrapper cannot tell the swap from a direct ``compiled.weight = tensor``, which eager refuses: that is
    # accepted too (the one place the wrapper is more permissive than the module).

    # NOTE [Submodules set through the wrapper]
    # ``model = aotcache.compile(model); model.act = nn.Identity()`` registered the new submodule on the
    # wrapper, beside the wrapped module's own ``act``: the wrapped module (what is captured) kept its GELU and
    # every later call gave the old program's result, and ``model.parameters()`` listed a replaced layer's new
    # weights twice over. An attribute the wrapped module has is the wrapped module's, whatever its value; so is
    # a new submodule or parameter (the wrapper lists the wrapped module's tree: one registered on the wrapper
    # was missing from ``model.parameters()``, so from the optimizer).

    def _wrapped_owner_of(self, name: str, registers: bool = False) -> nn.Module | None:
        """The wrapped module when attribute ``name`` set on (or deleted from) the wrapper is its attribute: the
        wrapper does not have it (as its own attribute, submodule or class member) and the wrapped module has
        it, or the value ``registers`` (a submodule or parameter, NOTE [Submodules set through the wrapper])."""
        modules = self.__dict__.get("_modules")
        orig = None if modules is None else modules.get(ORIG_MODULE)
        if (orig is None or name == ORIG_MODULE or name in self.__dict__ or name in modules or hasattr(type(self), name)
                or not (registers or hasattr(orig, name))):
            return None
        return orig

    # Registration methods register on the wrapped module (NOTE [Submodules set through the wrapper]): a buffer
    # registered on the wrapper was invisible to the wrapped module's forward and to ``named_buffers()``.

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        orig = self.__dict__.get("_modules", {}).get(ORIG_MODULE)
        if orig is None:
            return super().register_buffer(name, tensor, persistent)
        return orig.register_buffer(name, tensor, persistent)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        orig = self.__dict__.get("_modules", {}).get(ORIG_MODULE)
        if orig is None:
            return super().register_parameter(name, param)
        return orig.register_parameter(name, param)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        orig = self.__dict__.get("_modules", {}).get(ORIG_MODULE)
        if orig is None or name == ORIG_MODULE:
            return super().add_module(name, module)
        return orig.add_module(name, module)

    def register_module(self, name: str, module: nn.Module | None) -> None:
        self.add_module(name, module)

    def __deepcopy__(self, memo: dict) -> AOTModule:
        """A wrapper of a deep copy of the wrapped module (``copy.deepcopy(model)`` for an EMA or a frozen
        reference model), with the same options and cache. Nothing compiled is copied: the copy's first call
        finds the graphs in the cache (or compiles them), since its parameters are graph inputs."""
        clone = static_class(type(self))(copy.deepcopy(self.orig_module, memo), **self._wrapper_arguments())
        clone.training = self.training
        memo[id(self)] = clone
        return clone

    def __reduce__(self) -> tuple:
        """Pickled (``torch.save(wrapper)``) as the wrapped module and the options; loading wraps it again."""
        arguments = self._wrapper_arguments()
        if not isinstance(self.compiled.cache, bool):  # an AOTAutogradCache: locks, open tiers
            raise TypeError(f"cannot pickle this {type(self).__name__}: it was built with cache=<an "
                            f"AOTAutogradCache instance>; save model.state_dict() (or the wrapped module, "
                            f".orig_module) and wrap it again after loading")
        return (_unpickle_wrapper, (static_class(type(self)), self.orig_module, arguments, self.training))

    def _wrapper_arguments(self) -> dict[str, Any]:
        """The constructor's arguments after the module, by name (subclasses with more arguments extend it)."""
        compiled = self.compiled
        return {"options": compiled.options, "services": compiled.services, "cache": compiled.cache,
                "on_capture_error": compiled.on_capture_error}

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.orig_module)))

    @property
    def _orig_mod(self) -> nn.Module:
        """The wrapped module under the name torch.compile's ``OptimizedModule`` gives it: code written for
        torch.compile unwraps with ``model._orig_mod`` (transformers' tests read gradients through it, and
        ``getattr(model, "_orig_mod", model)`` is the common unwrap before saving); it raised AttributeError."""
        return self.orig_module

    # NOTE [Container protocol] Python looks special methods up on the type, not through ``__getattr__``, so a
    # wrapped nn.Sequential / ModuleList needs these to index, slice, iterate and measure as the module does.
    # They hand out the wrapped module's own submodules (not compiled: as ``model[0]`` of the eager model).
    # ``__bool__`` keeps truth as the wrapped module's (a module without ``__len__`` is always true).

    def __len__(self) -> int:
        return len(self.orig_module)  # TypeError for a module that has no length, as eager

    def __getitem__(self, index: Any) -> Any:
        return self.orig_module[index]

    def __iter__(self) -> Iterator:
        return iter(self.orig_module)

    def __contains__(self, item: Any) -> bool:
        return item in self.orig_module

    def __bool__(self) -> bool:
        return bool(self.orig_module)

    # -- names: those of the wrapped module -------------------------------------------------------------------

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Iterator:
        """The wrapped module's tree under the wrapper's prefix (so parameter and buffer names carry no
        ``orig_module.``); the wrapper itself is not listed."""
        return self.orig_module.named_modules(memo, prefix, remove_duplicate)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        """The wrapped module's parameters, also with ``recurse=False`` (its own: the wrapper's registry is empty,
        and ``compiled.parameters(recurse=False)`` of a wrapped ``Linear`` listed none; session 25)."""
        return self.orig_module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        """The wrapped module's buffers, also with ``recurse=False`` (as :meth:`named_parameters`)."""
        return self.orig_module.named_buffers(prefix, recurse, remove_duplicate)

    def named_children(self) -> Iterator:
        """The wrapped module's children (NOTE [Children of the wrapper]); the wrapper's own while
        ``torch.jit.trace`` maps modules to names (NOTE [Calls under torch.jit.trace])."""
        if getattr(torch.jit._trace, "_trace_module_map", None) is not None:
            return super().named_children()
        return self.orig_module.named_children()

    # NOTE [Children of the wrapper]
    # ``list(model.children())`` of a compiled model gave ``[orig_module]``, so the common feature extractor
    # ``nn.Sequential(*list(model.children())[:-1])`` was an empty Sequential (an identity: no error, other
    # results). Children are the wrapped module's; what nn.Module walks through children (``_apply`` for
    # ``to`` / ``half`` / ``cuda``, ``apply``) goes to the wrapped module itself, so its own parameters and
    # buffers are converted and ``fn`` sees it; ``train()`` reaches its flag through ``training`` (__setattr__).

    def _apply(self, fn: Callable, recurse: bool = True) -> AOTModule:
        self.orig_module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> AOTModule:
        """The wrapped module's ``train(mode)`` (its own override included: a model that keeps its BatchNorm
        frozen in ``train()``), and the wrapper's flag."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.orig_module.train(mode)
        self.__dict__["training"] = mode
        return self

    def apply(self, fn: Callable[[nn.Module], None]) -> AOTModule:
        self.orig_module.apply(fn)
        fn(self)
        return self

    # NOTE [State-dict hooks registered on the wrapper]
    # ``state_dict`` and ``load_state_dict`` are the wrapped module's (below), so hooks registered on the wrapper
    # (``register_state_dict_pre_hook``, ``_register_state_dict_hook``, ``register_load_state_dict_pre_hook`` /
    # ``_post_hook``, ...) never ran: a hook adding or renaming keys was skipped silently, and a load pre-hook
    # that drops a stale key left ``load_state_dict`` raising where eager loads (session 25). They register on the
    # wrapped module, which runs them (a hook's ``module`` argument is the wrapped module), and the handle removes
    # them there. The wrapper's own key-mapping hook (``_add_prefix``) is registered with nn.Module's method, on
    # the wrapper.
    register_state_dict_pre_hook = _registered_on_wrapped("register_state_dict_pre_hook")
    register_state_dict_post_hook = _registered_on_wrapped("register_state_dict_post_hook")
    _register_state_dict_hook = _registered_on_wrapped("_register_state_dict_hook")
    register_load_state_dict_pre_hook = _registered_on_wrapped("register_load_state_dict_pre_hook")
    _register_load_state_dict_pre_hook = _registered_on_wrapped("_register_load_state_dict_pre_hook")
    register_load_state_dict_post_hook = _registered_on_wrapped("register_load_state_dict_post_hook")

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The wrapped module's ``state_dict`` (same keys, also when the wrapper is a submodule)."""
        return self.orig_module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """The wrapped module's ``load_state_dict``: takes the keys of an eager model's ``state_dict``."""
        return self.orig_module.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- methods of the wrapped module -----------------------------------------------------------------------

    def _routed(self, method: types.MethodType) -> Callable:
        """``method`` (bound to the wrapped module), calling the compiled forward while it runs."""

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            # the method's own code runs eagerly: held beside captures (NOTE [Eager runs beside a capture])
            with self._forward_routed(), self._gate.running():
                return method(*args, **kwargs)

        return call

    @contextlib.contextmanager
    def _forward_routed(self) -> Iterator[None]:
        """Install the router of NOTE [Methods run the compiled forward] while any method call runs (counted
        across threads and nested calls; the last one to finish removes it)."""
        orig = self.orig_module
        with self._routing_lock:
            installed = orig.__dict__.get("forward")
            if self._routing_count == 0:
                hooked = bool(orig._forward_hooks or orig._forward_pre_hooks)
                if hooked or installed is not None:
                    why = "forward hooks registered on it" if hooked else "its own instance attribute 'forward'"
                    log_once(logging.WARNING, f"aot-module-route:{id(self)}",
                             "aotcache: methods of the wrapped %s run its forward eagerly, because it has %s; "
                             "register the hooks on the aot_module wrapper instead", type(orig).__qualname__, why)
                    routed = False
                else:
                    orig.__dict__["forward"] = self._make_router()
                    routed = True
            else:
                routed = True
            if routed:
                self._routing_count += 1
        try:
            yield
        finally:
            if routed:
                with self._routing_lock:
                    self._routing_count -= 1
                    if self._routing_count == 0 and getattr(orig.__dict__.get("forward"), "_aotcache_router", False):
                        del orig.__dict__["forward"]

    def _make_router(self) -> Callable:
        orig = self.orig_module
        original = type(orig).forward.__get__(orig)
        inside = threading.local()  # .depth: this thread is running the compiled call the router started

        @functools.wraps(original)
        def router(*args: Any, **kwargs: Any) -> Any:
            # the compiled call's own runs of the module (its capture, its fallback) reach the module's forward;
            # the router stays installed, so another thread's method call meanwhile is routed too, never run
            # eagerly beside a capture that has the module's tensors swapped (NOTE [Calls during a capture's swap])
            if getattr(inside, "depth", 0):
                return original(*args, **kwargs)
            inside.depth = 1
            try:
                with self._gate.paused():  # the compiled call may capture: NOTE [Eager runs beside a capture]
                    return self.forward(*args, **kwargs)
            finally:
                inside.depth = 0

        router._aotcache_router = True  # type: ignore[attr-defined]
        return router




def _unpickle_wrapper(cls: type, module: nn.Module, arguments: dict, training: bool) -> AOTModule:
    """Rebuild a pickled wrapper (see ``AOTModule.__reduce__``)."""
    wrapper = cls(module, **arguments)
    wrapper.training = training
    return wrapper


def _add_prefix(module: AOTModule, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook for a wrapper inside a larger model: the parent's loader walks ``_modules`` and
    expects ``<prefix>orig_module.<name>``; a checkpoint has ``<prefix><name>`` (what ``state_dict`` gives)."""
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)
