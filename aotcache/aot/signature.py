"""The reuse key of an ``aot_function``: which calls may run the same compiled graph (NOTE [Signature]).

In memory only, never persisted (the cache key is built elsewhere, from the captured graph). Kept apart from
:class:`~aotcache.aot.api.AOTFunction`, which looks runtimes up by it, because what must and must not be in
it (constants by value, floats by bits, storage offsets by alignment) is where a stale reuse would come from.

NOTE [Signature]
An ``aot_function`` traces once per *signature* of its flat arguments and reuses the compiled result:
per tensor its dtype, device, layout, requires_grad, leafness (when it requires grad), conj / neg bits (NOTE
[View bits]), and its sizes,
strides (only the rank with ``dynamic=True``, where symbolic-shape guards decide reuse; the storage offset is
not part of it: NOTE [Storage offsets are not part of the signature]); per non-tensor
argument its type and value (constants are baked into the graph); which tensor arguments share memory; plus
grad mode and autocast state. The pytree structure of (args, kwargs) is part of it too.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aotcache.aot.ambient import numerics_signature
from aotcache.aot.cache_objects import CacheInt
from aotcache.aot.dynamic_dims import DimSpec, masked_shape
from aotcache.aot.errors import RefusedArgumentError
from aotcache.aot.exact_values import EXACT_BY_EQUALITY, exact_value, float_bits
from aotcache.aot.hot_path import autocast_state, relative_offsets, storage_sharing
from aotcache.aot.unsupported_tensors import (dispatch_mode_error, functorch_transform_error,
                                              nested_tensor_error, unsupported_layout_error)
from aotcache.aot.tensor_subclasses import behaviour_overriding_class, overriding_subclass_error
from aotcache.code_origin import defining_module, is_library

__all__ = ["holds_order_free_argument", "self_holding_argument_error", "signature_of", "rank_signature_of",
           "argument_signature", "dict_key_types", "dict_context_keys", "call_context", "memory_sharing", "float_bits",
           "input_offsets", "offsets_hold"]


# NOTE [Constant arguments]
# A non-tensor argument is baked into the graph, and the reuse key holds it, so it must be compared by value:
# an object compared by identity (a config object, an nn.Module, transformers' DynamicCache) can change
# between calls without the key seeing it, and a stale graph would run. Such arguments are refused, except
# types that cannot change: immutable singletons, enum members and code (functions, classes, operators).
_IMMUTABLE_IDENTITY_TYPES = (type(None), type(...), type(NotImplemented), enum.Enum, torch.dtype, torch.layout,
                             torch.memory_format, torch.qscheme, torch.Generator, type, types.FunctionType,
                             types.BuiltinFunctionType, functools.partial, torch._ops.OpOverload,
                             torch._ops.OpOverloadPacket)


class _RefusedConstant(TypeError):
    """A non-tensor argument that cannot be part of the reuse key; see NOTE [Constant arguments]."""


# NOTE [Storage offsets are not part of the signature]
# A training loop that slices its batches from one tensor (``X[i:i + batch]``) calls with the same sizes and
# strides at a new storage offset every step. A compiled graph reads its inputs through their data pointers, so
# the offset changes nothing, and keying on it traced (and stored) a new graph at every step, where
# torch.compile compiles once. Neither the offset nor its alignment is part of the static signature (a 0-d
# timestep taken from ``scheduler.timesteps[i]`` is 16-byte aligned at every other step, and keying on the
# alignment made such a loop use two graphs where torch.compile uses one). Alignment is the compiled graph's
# own business, as in Inductor (NOTE [Misaligned inputs] in ``compilers/input_layout.py``): code that assumes
# aligned inputs copies a misaligned one first. A graph that may depend on the offset itself
# (``RuntimeMetadata.offsets_matter``: an output that is a view of an input, a replayed metadata mutation, an
# as_strided-like op, an offset read in Python) is reused only at the offsets it was traced with
# (``CompiledRuntime.input_offsets``, checked with its guards). Arguments that share memory keep their offsets
# in the signature (synthetic bases, NOTE [Synthetic bases], depend on them).
def input_offsets(flat_args: Sequence[Any], dynamic: bool | DimSpec) -> tuple:
    """Per flat argument, its storage offset; None for a non-tensor and for a tensor with dynamic dimensions
    (its guards check its offset)."""
    spec = dynamic if isinstance(dynamic, tuple) else (dynamic,) * len(flat_args)
    return tuple(arg.storage_offset() if isinstance(arg, torch.Tensor) and not dims else None
                 for arg, dims in zip(flat_args, spec))


def offsets_hold(expected: tuple, flat_args: Sequence[Any]) -> bool:
    """Whether the arguments have the storage offsets ``expected`` holds (None: any)."""
    return all(offset is None or arg.storage_offset() == offset for offset, arg in zip(expected, flat_args))


def _argument_signature(arg: Any, dynamic: bool | tuple[int, ...], offset: int | None = None) -> tuple:
    if isinstance(arg, torch.Tensor):
        geometry = ((arg.dim(),) if dynamic is True else (masked_shape(arg, dynamic),) if dynamic
                    else (tuple(arg.shape), arg.stride(), offset))  # NOTE [Dynamic dimensions]
        signature = ("tensor", arg.dtype, arg.device, arg.layout, arg.requires_grad,
                     arg.requires_grad and arg.is_leaf, geometry, (arg.is_conj(), arg.is_neg()))  # NOTE [View bits]
        attributes = python_attributes(arg)
        return (*signature, tensor_attributes_signature(attributes)) if attributes else signature
    if isinstance(arg, torch.SymInt):
        return ("symint",)
    if dynamic and type(arg) is CacheInt:  # NOTE [Cache integers]: a symbol; 0 and 1 are specialized
        return ("cacheint", arg if arg in (0, 1) else None)
    if dynamic and type(arg) is int:  # NOTE [Integer arguments]: the rank key (True) or marked in a spec
        return ("int",)
    if dynamic and type(arg) is float:  # NOTE [Float arguments]: likewise (NaN and inf are never marked)
        return ("float",)
    try:
        hash(arg)
    except TypeError:
        raise _RefusedConstant("is neither a tensor nor a hashable constant") from None
    if type(arg).__eq__ is object.__eq__ and not isinstance(arg, _IMMUTABLE_IDENTITY_TYPES):
        raise _RefusedConstant("is compared by identity, so changes to it between calls would not be seen")
    if isinstance(arg, _CODE_ARGUMENT_TYPES):  # NOTE [Code passed as an argument]
        return _code_argument_signature(arg)
    if isinstance(arg, (float, complex)):
        return ("constant", type(arg), float_bits(arg))  # NOTE [Floats by bits]
    if type(arg) in EXACT_BY_EQUALITY:  # the common constants, keyed as they are (the call hot path compares them)
        return ("constant", type(arg), arg)
    try:
        return ("constant", type(arg), _hashable(exact_value(arg, object_state=True)))  # NOTE [Sets and dataclasses compared exactly]
    except Exception as exc:  # noqa: BLE001 - NOTE [Dataclasses by their whole state] in exact_values.py: any
        # value that cannot be read or compared exactly is refused (the fallback runs it), never a failed call
        raise _RefusedConstant(f"cannot be compared exactly ({exc})") from None


# NOTE [Code passed as an argument]
# A class, a function or a ``functools.partial`` argument was keyed by identity (NOTE [Constant arguments]), but
# what it reads is not: a class attribute changed between calls (``@classmethod`` over ``@aotcache.compile``, whose
# ``cls`` is the first argument), a global or a closure cell a function argument reads, a partial's keywords changed
# in place, each kept the graph traced with the old value (found in session 27's review; the program guards watch the
# compiled function's own code, not code handed to it). So code from the user's program (outside torch, the
# standard library and installed packages: ``aotcache.code_origin``'s rule, which the fingerprint's walk follows too;
# a program does not edit library code between calls) is refused: the call takes
# the fallback, whose Dynamo guards what such code reads. A partial is keyed by its function and by the values of
# its arguments and keywords (plain constants only; a tensor or a user function in it is refused).
_CODE_ARGUMENT_TYPES = (type, types.FunctionType, functools.partial)
_CODE_REFUSAL = ("is code of the program (a class, function or partial) whose reads (class attributes, globals, "
                 "closure cells, a partial's keywords) are not guarded between calls; pass the values it reads as "
                 "arguments, or let the fallback (Dynamo) guard them")


def _is_library_code(code: type | types.FunctionType) -> bool:
    """Whether a class or function is library code, by the rule the fingerprint's walk uses (code_origin.py)."""
    return is_library(defining_module(code) if isinstance(code, types.FunctionType) else getattr(code, "__module__", None))


def _code_argument_signature(arg: Any) -> tuple:
    """The signature of a class / function / partial argument (NOTE [Code passed as an argument])."""
    if not isinstance(arg, functools.partial):
        if isinstance(arg, enum.EnumMeta) or _is_library_code(arg):
            return ("constant", type(arg), arg)
        raise _RefusedConstant(_CODE_REFUSAL)
    if type(arg) is not functools.partial or arg.__dict__:
        raise _RefusedConstant(_CODE_REFUSAL)
    parts = (arg.func, *arg.args, *arg.keywords.values())
    if any(isinstance(part, torch.Tensor) for part in parts):
        raise _RefusedConstant(_CODE_REFUSAL)
    return ("partial", _argument_signature(arg.func, False, None),
            tuple(_argument_signature(value, False, None) for value in arg.args),
            tuple((name, _argument_signature(value, False, None)) for name, value in arg.keywords.items()))


def _hashable(key: tuple) -> tuple:
    """``key``, checked hashable (a member compared by ``==`` may not be: a numpy array in a dataclass field)."""
    hash(key)
    return key


# NOTE [View bits]
# A conj or neg view (``z.conj()``, ``z.conj().imag``) has a plain tensor's dtype, sizes and strides; only its
# conjugate / negative bit tells it apart, and a graph traced for one does not serve the other: ``x.imag`` of a conj
# view traced for plain inputs raised at the next plain call (the graph's view_as_real refuses an unresolved conj
# tensor), and ``x.is_conj()`` read in Python is baked into the graph. The bits are part of the signature (the
# persistent key has them too: ``conj`` / ``neg`` in autograd_cache/guards.py); the hot paths never record such a
# view, so it always takes this full path (NOTE [Hot path]).


def argument_signature(arg: Any, dynamic: bool | tuple[int, ...]) -> tuple:
    """The signature part of one flat argument (NOTE [Signature]) under its dimension spec ``dynamic``, as
    :func:`signature_of` builds it for arguments that share no memory (the call hot path compares its constants by
    it: NOTE [Call hot path] in call_hot_path.py).

    :raises TypeError: an argument that cannot be part of a signature (NOTE [Constant arguments]).
    """
    return _argument_signature(arg, dynamic)


def python_attributes(tensor: torch.Tensor) -> dict:
    """The Python attributes a program may have put on ``tensor`` (its ``__dict__``), without torch.compile's own
    bookkeeping (``_dynamo_static_input_type`` stamped on the parameters Dynamo saw; what ``mark_dynamic`` /
    ``mark_static`` / ``mark_unbacked`` leave: ``_dynamo_dynamic_indices``, ``_specialize_on``,
    ``_has_dynamo_dim_marking``), which a forward does not read: a fallback running through Dynamo must not make
    the next call another graph, and a marked tensor is an ordinary argument (its ``_specialize_on`` dict made
    ``aotcache.compile`` refuse it as "neither a tensor nor a hashable constant", found in session 20)."""
    attributes = tensor.__dict__
    if attributes and any(_is_compile_bookkeeping(name) for name in attributes):
        return {name: value for name, value in attributes.items() if not _is_compile_bookkeeping(name)}
    return attributes


_DIM_MARKING_ATTRIBUTES = frozenset({"_specialize_on", "_has_dynamo_dim_marking"})


def _is_compile_bookkeeping(name: str) -> bool:
    """Whether a tensor attribute named ``name`` is torch.compile's (Dynamo's stamps, the dimension marks)."""
    return name.startswith("_dynamo") or name in _DIM_MARKING_ATTRIBUTES


def tensor_attributes_signature(attributes: dict) -> tuple:
    """NOTE [Python attributes of tensor arguments]
    A tensor argument may carry Python attributes its forward reads (``x.scale = 3.0``, read as
    ``getattr(x, "scale", 1.0)``). The capture gives the trace's tensors the real argument's attributes
    (``carry_tensor_attributes``), the value read is traced into the graph, and so the attributes are part of the
    call's signature: a value compared by value (a tensor by identity: one read by the forward is refused by the
    capture, as a closed-over tensor is), and an added or changed one selects another graph. The hot path takes
    no call whose arguments carry attributes; the fingerprint describes them (an object it cannot describe
    makes it untrusted, so the full key, computed from the graph, decides)."""
    return tuple(sorted((name, ("tensor", id(value)) if isinstance(value, torch.Tensor)
                         else _argument_signature(value, False)) for name, value in attributes.items()))


def carry_tensor_attributes(values: Sequence[Any], originals: Sequence[Any], start: int = 0) -> None:
    """Give each trace tensor in ``values`` (from position ``start``) the Python attributes of the real argument at
    its position (NOTE [Python attributes of tensor arguments]); an attribute it has itself is kept."""
    for value, original in zip(values[start:], originals[start:]):
        if (isinstance(original, torch.Tensor) and original.__dict__ and value is not original
                and isinstance(value, torch.Tensor)):
            target = value.__dict__
            for name, attribute in python_attributes(original).items():
                target.setdefault(name, attribute)


def user_arguments_carry_attributes(flat_args: Sequence[Any], start: int) -> bool:
    """Whether a tensor argument from position ``start`` carries Python attributes (not for the hot path)."""
    for index in range(start, len(flat_args)):  # (a loop: cheaper than any() over a slice, on every call)
        arg = flat_args[index]
        if isinstance(arg, torch.Tensor) and arg.__dict__ and python_attributes(arg):
            return True
    return False


def _refused_argument_error(flat_args: Sequence[Any], in_spec: Any, index: int, why: str) -> RefusedArgumentError:
    arg = flat_args[index]
    where = f"flat argument {index}"
    with contextlib.suppress(Exception):  # a path such as args[1] or kwargs['past_key_values']
        (args, kwargs) = pytree.tree_unflatten(list(flat_args), in_spec)
        path = [key for key, _ in pytree.tree_flatten_with_path((args, kwargs))[0]][index]
        where = "argument " + ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
    error = RefusedArgumentError(
        f"aotcache: {where} is a {type(arg).__module__}.{type(arg).__qualname__} object, which {why}. A compiled "
        f"function takes tensors, values compared by value (int, float, str, enums, frozen dataclasses, ...) "
        f"and pytree containers of them. Pass the tensors and values it holds as arguments, make its type "
        f"compare by value, or register it with torch.utils._pytree.register_pytree_node.")
    # any argument of the call, not only the refused one (a set after a refused module went to Dynamo), and a set
    # held inside the refused object
    error.dynamo_safe = not holds_order_free_argument(flat_args, {})
    return error


# NOTE [Arguments that hold themselves]
# A list that holds itself (``items = [x]; items.append(items)``) is an argument eager PyTorch and torch.compile run
# (Dynamo guards what the function reads of it), but torch's pytree flattens it without end: every entry point of
# aotcache flattens its call's arguments, and raised a RecursionError (found in session 26's review). Flattening such
# a call (or one nested deeper than Python's recursion limit) is refused, ``dynamo_safe=False``: ``aot_function``
# runs the call eagerly (counted ``eager:refused_argument``, warned once; strict mode and
# ``on_capture_error="raise"`` raise), ``aotcache.compile`` runs that call alone eagerly (NOTE [One call's set
# argument] in compile_api.py). The RecursionError is caught around the flattening only where the hot paths have
# already missed, so a plain call pays nothing; :func:`holds_order_free_argument` opens each container once.
def self_holding_argument_error() -> RefusedArgumentError:
    """The refusal of a call whose arguments pytree cannot flatten: one holds itself, or is nested deeper than the
    recursion limit (NOTE [Arguments that hold themselves])."""
    error = RefusedArgumentError(
        "aotcache: an argument holds itself (a list appended to itself?) or is nested deeper than Python's recursion "
        "limit, which torch's pytree cannot flatten. The call runs eagerly; pass the values the function reads "
        "instead.")
    error.dynamo_safe = False
    return error


# NOTE [Arguments Dynamo guards without their order]
# A refused argument takes the fallback, torch.compile, whose guards check it (NOTE [Refused arguments take the
# fallback] in fallback.py). For a plain ``set`` and a ``dict_keys`` view torch 2.13's Dynamo guards the members but
# not their iteration order, while the traced code bakes the order in: ``for i, k in enumerate(s)`` over
# ``{0, 8}`` filled in the other order (equal sets, another iteration order), or over ``{2: .., 1: ..}.keys()``
# after ``{1: .., 2: ..}.keys()``, reused the first call's graph, a wrong value where eager and torch's own
# ``aot_function`` (which raises for such an argument) do not give one (found in session 26 probing PyTorch's
# test_sets.py; ``torch.compile(backend="aot_eager")`` gives the same wrong value). A call with such an argument runs
# eagerly (``dynamo_safe=False``: ``aot_function``'s fallback an eager runtime, ``aotcache.compile`` that call
# alone: NOTE [One call's set argument] in compile_api.py), whichever argument the refusal names (a set after a
# refused module counts too). A ``frozenset`` is keyed the AOT way, members in iteration order (NOTE [Sets and
# dataclasses compared exactly]); a set subclass and ``dict_items`` / ``dict_values`` are guarded in order by
# Dynamo. A set held inside a refused plain object (a mutable dataclass's field) counts too (NOTE [Sets inside plain
# objects]).
_GUARDED_WITHOUT_ORDER = (set, type({}.keys()))


def holds_order_free_argument(args: Sequence[Any], kwargs: dict) -> bool:
    """Whether a call's arguments hold a plain ``set`` or ``dict_keys``, among their pytree leaves or inside a plain
    object's fields (NOTE [Arguments Dynamo guards without their order]), for the Dynamo way of ``aotcache.compile``
    (NOTE [One call's set argument] in compile_api.py) and a refusal's ``dynamo_safe``. Each container's values are
    sorted by their types at C speed: tensors and exact constants alone end the search there."""
    pending: list = []
    if _found_or_queued(args, pending) or (kwargs and _found_or_queued(kwargs.values(), pending)):
        return True
    opened: set[int] = set()  # a container or object holding itself is opened once (eager runs such a call)
    while pending:
        arg = pending.pop()
        kind = type(arg)
        if kind in _NOT_CONTAINERS:
            continue
        if issubclass(kind, tuple):  # a namedtuple or structseq too (immutable: holds itself only through a list)
            children = arg
        elif id(arg) in opened:
            continue
        else:
            opened.add(id(arg))
            if kind is list:
                children = arg
            elif kind is dict:
                children = arg.values()
            elif kind in pytree.SUPPORTED_NODES:  # one level (an OrderedDict may hold itself too)
                children = pytree.SUPPORTED_NODES[kind].flatten_fn(arg)[0]
            else:
                children = _plain_object_fields(arg)
        if children and _found_or_queued(children, pending):
            return True
    return False


# (floats and the other immutable scalars too: a plain object's list of 100k floats was opened value by value, 30 ms on
# every call of the Dynamo way)
_NOT_CONTAINERS = frozenset({torch.Tensor, torch.nn.Parameter, *EXACT_BY_EQUALITY, float, complex, torch.dtype,
                             torch.device, torch.layout, torch.memory_format})


def _found_or_queued(values: Any, pending: list) -> bool:
    """Whether ``values`` hold a set or dict_keys themselves; else those that may hold one are queued."""
    kinds = set(map(type, values))
    if kinds <= _NOT_CONTAINERS:
        return False
    if not kinds.isdisjoint(_GUARDED_WITHOUT_ORDER):
        return True
    pending.extend(values)
    return False


# NOTE [Sets inside plain objects]
# A refused plain object (a mutable dataclass, a namespace) goes to Dynamo with whatever it holds, and Dynamo guards a
# set field's members, not their order (NOTE [Arguments Dynamo guards without their order]): ``Holder({0, 8})``
# filled in the other order reused the first graph, a wrong value (session 27). So the fields of such an object are
# looked into, recursively (each object once). A module, an optimizer, a class, a Python module or a function is not
# opened: their state is large and guarded by Dynamo by identity and by what the code reads (a set attribute of an
# ``nn.Module`` argument is not covered).
_NOT_OPENED = (torch.nn.Module, torch.optim.Optimizer, type, types.ModuleType, types.FunctionType,
               types.BuiltinFunctionType, types.MethodType, functools.partial)


# An object of a standard-library class (a ``logging.Logger``, a lock, a file) is not opened either, except the two
# namespaces: a logger reaches every logger of the process, and one of torch's log formatters holds a set, so a
# plain object holding a logger ran every call eagerly (found in session 27's review; 90 us per call to find it).
_OPENED_STDLIB_CLASSES = frozenset({("types", "SimpleNamespace"), ("argparse", "Namespace")})


def _is_stdlib_class(kind: type) -> bool:
    module = getattr(kind, "__module__", None) or ""
    return (module.partition(".")[0] in sys.stdlib_module_names
            and (module, kind.__qualname__) not in _OPENED_STDLIB_CLASSES)


def _plain_object_fields(value: Any) -> Sequence[Any] | None:
    """The field values of a plain object (NOTE [Sets inside plain objects]), else None."""
    kind = type(value)
    if issubclass(kind, _NOT_OPENED) or _is_stdlib_class(kind):  # (the real class: no attribute is read)
        return None
    try:
        fields = getattr(value, "__dict__", None)
        if type(fields) is dict:
            return list(fields.values())
        slots = getattr(type(value), "__dataclass_fields__", None)  # a dataclass with slots=True
        return [getattr(value, name, None) for name in slots] if slots else None
    except Exception:  # an object whose attribute reads raise: not opened (its call goes on as before)
        return None


def memory_sharing(flat_args: Sequence[Any]) -> tuple:
    """Which tensor arguments share storage (:func:`~aotcache.aot.hot_path.storage_sharing` of the tensors).

    :raises CaptureError: a sparse or mkldnn argument (no storage to compare), or a tensor of a torch.func
        transform (vmap, grad, jvp) the compiled function is called under.
    """
    tensors = []
    for index, arg in enumerate(flat_args):
        if isinstance(arg, torch.Tensor):
            if arg.is_nested:
                raise nested_tensor_error(f"flat argument {index}")
            if arg.layout != torch.strided or arg.is_quantized:
                raise unsupported_layout_error(f"flat argument {index}", "quantized" if arg.is_quantized else arg.layout)
            if torch._C._functorch.is_functorch_wrapped_tensor(arg):
                raise functorch_transform_error(f"flat argument {index}")
            if type(arg) is not torch.Tensor and behaviour_overriding_class(arg) is not None:
                raise overriding_subclass_error(f"flat argument {index}", arg)
            if not arg.is_meta:
                tensors.append(arg)
    return storage_sharing(tensors)


def call_context(flat_args: Sequence[Any]) -> tuple:
    """What every signature of one call shares (NOTE [One context per call]): grad mode, autocast state, numerics
    flags and which arguments share memory (:func:`memory_sharing`, first: it names unsupported layouts clearly).

    :raises CaptureError: as :func:`memory_sharing`.
    """
    sharing = memory_sharing(flat_args)
    numerics = numerics_signature()
    if numerics[-1] and numerics[-1][1]:  # NOTE [Active torch modes]: a dispatch mode is active
        raise dispatch_mode_error(numerics[-1][1])
    return (torch.is_grad_enabled(), autocast_state(), numerics, sharing)


def signature_of(flat_args: Sequence[Any], in_spec: Any, dynamic: bool | DimSpec, context: tuple | None = None
                 ) -> tuple:
    """The reuse key of NOTE [Signature] (in-memory only; never persisted); ``dynamic`` a flag or a spec;
    ``context`` the call's :func:`call_context` where the caller has it already."""
    grad_enabled, autocast, numerics, sharing = call_context(flat_args) if context is None else context
    offsets = _shared_memory_offsets(flat_args, sharing)  # NOTE [Storage offsets are not part of the signature]
    arguments = []
    for index, arg in enumerate(flat_args):
        try:
            arguments.append(_argument_signature(arg, dynamic[index] if isinstance(dynamic, tuple) else dynamic,
                                                 offsets.get(index)))
        except _RefusedConstant as exc:
            raise _refused_argument_error(flat_args, in_spec, index, str(exc)) from None
    key_types = dict_key_types(in_spec)  # NOTE [Dict keys equal across types]
    return (in_spec if not key_types else (in_spec, key_types), grad_enabled, autocast, numerics, sharing,
            tuple(arguments))


# NOTE [Dict keys equal across types]
# A ``TreeSpec`` keeps a dict's keys as its context and compares contexts with ``==``, and ``1 == True == 1.0``
# (with equal hashes): a call with ``{True: x}`` or ``{1.0: x}`` had the signature of one with ``{1: x}`` and ran its
# graph, whose trace had rebuilt the dict with the key ``1`` (a forward branching on the key's type, or formatting
# it, gave another result than eager). A spec's dict nodes with a key that is not a ``str`` add the types of their
# keys to the signature; specs of ``str`` keys only (keyword arguments, most dicts) are keyed as before.
_DICT_NODES = (dict, collections.OrderedDict, collections.defaultdict)


def dict_context_keys(node_type: Any, context: Any) -> list | None:
    """The keys of a dict-like pytree node (its context; a defaultdict's holds its factory first), else None."""
    if node_type is dict or node_type is collections.OrderedDict:
        return context
    if node_type is collections.defaultdict:
        return context[1]
    return None


def dict_key_types(spec: pytree.TreeSpec) -> tuple:
    """Per dict node of ``spec`` (in pre-order) with a key that is not a ``str``, its position and its keys' types
    (NOTE [Dict keys equal across types]); ``()`` where every key is a ``str``."""
    found = []
    stack = [spec]
    position = 0
    while stack:
        node = stack.pop()
        if not node.num_children:
            continue
        position += 1
        keys = dict_context_keys(node.type, node.context)
        if keys and any(type(key) is not str for key in keys):
            found.append((position, tuple(map(type, keys))))
        stack.extend(reversed(node.children()))
    return tuple(found)


# NOTE [Offsets of arguments that share memory]
# Tensor arguments that share a storage keep their storage offsets in the signature (synthetic bases and the
# overlap check of mutated inputs depend on their geometry), but relative to the lowest offset of their group,
# in bytes (views of one storage as dtypes of other sizes count elements in other units): what decides how they
# overlap. Found (bench/odd_inputs.py): a language-model loop passing an input window and
# its target window of one token tensor (``data[i:i + n]``, ``data[i + 1:i + n + 1]``) traced a new graph at
# every step (absolute offsets keyed) until the recompile limit sent the calls to eager, where torch.compile
# compiles once. A graph whose result depends on absolute offsets is still reused only at the offsets it was
# traced with (``CompiledRuntime.input_offsets``), and a synthetic base is placed at each call's offsets.
def _shared_memory_offsets(flat_args: Sequence[Any], sharing: tuple) -> dict[int, int]:
    """Flat position -> storage offset relative to its sharing group's lowest, for tensors that share memory
    (empty when none do); ``sharing`` as :func:`memory_sharing` gives it."""
    if sharing == tuple(range(len(sharing))):
        return {}
    positions = [index for index, arg in enumerate(flat_args) if isinstance(arg, torch.Tensor) and not arg.is_meta]
    relative = relative_offsets([flat_args[index] for index in positions], sharing)
    return {index: offset for index, offset, group, own in zip(positions, relative, sharing, range(len(sharing)))
            if group != own or sharing.count(own) > 1}


def rank_signature_of(flat_args: Sequence[Any], in_spec: Any, context: tuple | None = None) -> tuple:
    """The signature up to sizes that automatic dynamic shapes key their first sizes by (NOTE [Dynamic
    dimensions]): tensors by rank, and cache integers without their value, not even 0 or 1.

    NOTE [Cache integers compared like sizes]
    ``signature_of(..., True)`` keeps a cache integer's 0 or 1 (torch specializes them, so they are separate
    graphs). As the key of the sizes first seen, that made a batch of 1 (a static cache's ``batch_size`` 1) and
    a batch of 2 two unrelated calls: the second call compiled statically, as a first call, and only the third
    batch size became dynamic (static-cache ``generate`` with batches 1, 2, 3: one graph more than
    torch.compile, which compares the integer like a size). A tensor dimension of size 1 never was in that key.
    """
    signature = signature_of(flat_args, in_spec, True, context)
    return (*signature[:5], tuple(("cacheint",) if argument[0] == "cacheint" else argument
                                  for argument in signature[5]))
