"""Which graphs the compiled-graph cache may serve: ``check_node_safe`` / ``check_cacheable``.

A graph is *safe to cache* when everything that decides its compiled behaviour is captured by the key
(``aotcache.autograd_cache.key``). Anything else raises :class:`BypassAOTAutogradCache` with a short,
categorical reason ("unsafe call: my_module.helper") that the cache counts and ``aotcache stats`` shows;
a bypassed graph still compiles and runs, just uncached.

NOTE [What is safe]
- ATen / prims and other torch-internal operator namespaces: their behaviour is fixed by the torch version.
- ``torch.library.custom_op`` operators: every registered implementation (kernels, fake, autograd,
  vmap, autocast) is reachable from Python, and the key hashes their code (PyTorch issue 144344).
- Public torch Python functions, tensor methods, ``operator`` / ``math`` / ``builtins`` functions and
  torch C builtins, plus the grad-mode / autocast region markers Dynamo emits (their arguments are part
  of the graph text, hence of the key; PyTorch bypasses autocast regions, issue 191106).
- User functions only when marked with :func:`cacheable` (the key hashes their code).
- Higher-order ops whose operands are graph nodes, constants and traced subgraphs (no Python closures).
- Compiled autograd's ops for torch's own autograd nodes (NOTE [Compiled autograd's ops in the key]).
Anything whose behaviour lives outside what the key sees (an unknown Python callable, a low-level
``torch.library.Library`` op whose Python kernels are hidden in the dispatcher, a tensor subclass or an
opaque object) is a bypass.
"""

from __future__ import annotations

import operator
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx

from aotcache.autograd_cache.numpy_calls import numpy_call_token

__all__ = [
    "BypassAOTAutogradCache",
    "check_node_safe",
    "check_cacheable",
    "check_inputs_cacheable",
    "check_operator_safe",
    "cacheable",
    "is_marked_cacheable",
    "qualified_name",
    "custom_op_def",
    "custom_op_implementations",
    "is_torch_internal_namespace",
]


class BypassAOTAutogradCache(Exception):
    """The graph cannot be cached safely; ``reason`` is short and categorical so that it can be counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Operator namespaces whose kernels ship with torch itself (covered by the torch version in the key): those
# registered by `import torch` and by torch._inductor (Inductor's decomposition table reaches, e.g., sparse::).
# A torch.library.custom_op defined in one of them is still hashed by its registrations.
_TORCH_INTERNAL_NAMESPACES = frozenset({
    "aten", "prims", "rngprims", "quantized", "_quantized", "quantized_decomposed", "profiler", "inductor",
    "debugprims", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor",
    "mkldnn", "mkl", "onednn", "_nested_tensor", "fsdp", "streams", "_test", "_native", "sparse", "export",
    "inductor_prims", "mkldnn_prepacked", "quantization", "static_runtime", "symm_mem", "debug_mode_ops",
    "onnx", "onnx_symbolic", "flex_lib", "_inductor_test",
    "prepacked",  # XNNPACK's op contexts, in builds with XNNPACK (torch 2.11.0+cu130; Inductor's table reaches them)
})

# Private torch functions that Dynamo puts into graphs and whose arguments fully describe their effect.
_SAFE_PRIVATE_TORCH_FUNCTIONS = frozenset({
    "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast",
    "torch._C._set_grad_enabled",
    "torch._C._set_autocast_enabled",
    "torch._C._set_autocast_dtype",
    "torch._C._set_autocast_cache_enabled",
    "torch._functorch.vmap.lazy_load_decompositions",
    "torch._sym_sqrt",
    "torch._check",
    "torch._check_is_size",
    "torch._assert",
    "torch._assert_async",
    "torch._assert_scalar",
    "torch._utils._rebuild_tensor_v2",
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sum",
    "torch.sym_ite",
})

# torch's private modules whose functions a Dynamo graph calls and that are safe to cache: the pre-dispatch
# wrappers of functorch transforms (vmap / jvp in a graph: lazy_load_decompositions, _vmap_increment_nesting,
# _add_batch_dim, ...), thin Python wrappers of the torch._C._functorch builtins the older graphs called.
_SAFE_PRIVATE_TORCH_MODULES = frozenset({"torch._functorch.predispatch"})

# Builtin (C-implemented) callables are safe when they come from these modules.
_SAFE_BUILTIN_MODULE_PREFIXES = ("builtins", "_operator", "operator", "math", "torch", "_abc")
# ... except these, which reach outside the graph (code execution, I/O, interpreter state).
_UNSAFE_BUILTINS = frozenset({
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.print", "builtins.input",
    "builtins.__import__", "builtins.setattr", "builtins.delattr", "builtins.globals", "builtins.locals",
    "builtins.vars", "builtins.breakpoint", "builtins.id", "builtins.hash",
})

# Higher-order ops that only take graph nodes, constants and traced subgraphs (get_attr GraphModules).
_SAFE_HIGHER_ORDER_OPS = frozenset({
    "cond", "while_loop", "map_impl", "scan", "associative_scan", "invoke_subgraph", "wrap",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint", "auto_functionalized",
    "auto_functionalized_v2", "flex_attention", "flex_attention_backward", "autograd_function_apply",
    "run_and_save_rng_state", "run_with_rng_state", "with_effects", "out_dtype",
})

_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_PRIMITIVE_TYPES = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format, torch.Size, slice, type(Ellipsis))
_SYMBOLIC_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)

_MARK_ATTRIBUTE = "__aotcache_cacheable__"


def cacheable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a user function as safe to cache when it appears in a graph; its code is then hashed into the key.

    Use it for a helper that Dynamo keeps as a call (e.g. via ``torch.fx.wrap``) whose result depends only on
    its code, its arguments and the module-level constants/functions it references.
    """
    try:
        setattr(fn, _MARK_ATTRIBUTE, True)
    except (AttributeError, TypeError):
        raise TypeError(f"aotcache.cacheable: cannot mark {fn!r}; only Python functions can be marked") from None
    return fn


def is_marked_cacheable(fn: Any) -> bool:
    """True when ``fn`` was marked with :func:`cacheable`."""
    return getattr(fn, _MARK_ATTRIBUTE, False) is True


def qualified_name(target: Any) -> str:
    """``module.qualname`` of a callable (operators by their ``ns.name.overload``); stable across processes."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    owner = getattr(target, "__objclass__", None)  # method descriptors such as torch.Tensor.add
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{target.__name__}"
    module = getattr(target, "__module__", None) or "builtins"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__qualname__
    return f"{module}.{name}"


def is_torch_internal_namespace(namespace: str) -> bool:
    """Operator namespaces whose kernels ship with torch (their behaviour is fixed by the torch version)."""
    return namespace in _TORCH_INTERNAL_NAMESPACES


def _op_namespace_and_qualname(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> tuple[str, str]:
    packet = op.overloadpacket if isinstance(op, torch._ops.OpOverload) else op
    qualname = packet._qualified_op_name  # "ns::name"
    return qualname.split("::", 1)[0], qualname


def custom_op_def(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> Any:
    """The ``torch.library.custom_op`` definition object (``CustomOpDef``) behind ``op``, or None."""
    from torch._library import custom_ops

    _, qualname = _op_namespace_and_qualname(op)
    return getattr(custom_ops, "OPDEFS", {}).get(qualname)


def custom_op_implementations(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> dict[str, Any] | None:
    """Everything registered for a ``torch.library.custom_op`` operator (by field name), or None if not one.

    The values are the user's functions and settings (kernels per device, fake impl, autograd backward and
    setup_context, vmap, autocast, torch_dispatch rules); the key hashes them.
    """
    opdef = custom_op_def(op)
    if opdef is None:
        return None
    # NOTE [CustomOpDef fields] read generically so that new registration kinds in later torch versions are
    # hashed too; only the back-references to the library and the operator itself are skipped.
    skip = {"_lib", "_opoverload", "_namespace", "_name"}
    return {field: value for field, value in sorted(vars(opdef).items()) if field not in skip}


def _has_hidden_python_registrations(qualname: str) -> bool:
    """True when Python code registered kernels for ``qualname`` through a low-level ``torch.library.Library``.

    Those kernels live in the C++ dispatcher where the key cannot read them. When torch's bookkeeping is not
    available (it is private), assume they might exist: bypassing is the safe answer.
    """
    import torch.library as torch_library

    defs = getattr(torch_library, "_defs", None)
    impls = getattr(torch_library, "_impls", None)
    if defs is None or impls is None:
        return True
    if qualname in defs:
        return True
    prefix = qualname + "/"
    return any(key == qualname or key.startswith(prefix) for key in impls)


def _installed_distribution_version(namespace: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(namespace)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_operator_safe(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> None:
    """ATen/torch-internal ops and ``torch.library.custom_op`` ops are safe; see the module NOTE for the rest.

    :raises BypassAOTAutogradCache: an operator whose implementation the key cannot see.
    """
    namespace, qualname = _op_namespace_and_qualname(op)
    if is_torch_internal_namespace(namespace):
        return
    if custom_op_implementations(op) is not None:
        return
    if _has_hidden_python_registrations(qualname):
        raise BypassAOTAutogradCache(f"opaque custom op: {qualname}")
    # A C++ operator from an installed extension package (torchvision::nms): its version goes into the key.
    if _installed_distribution_version(namespace) is None:
        raise BypassAOTAutogradCache(f"opaque custom op: {qualname}")


def _is_safe_torch_python_function(target: Any, name: str) -> bool:
    module = getattr(target, "__module__", None) or ""
    if not (module == "torch" or module.startswith("torch.")):
        return False
    if name in _SAFE_PRIVATE_TORCH_FUNCTIONS or module in _SAFE_PRIVATE_TORCH_MODULES:
        return True
    if module == "torch._tensor" and target.__qualname__.startswith("Tensor."):
        return True  # Python-level torch.Tensor methods
    short = getattr(target, "__name__", "")
    private = short.startswith("_") or any(part.startswith("_") for part in module.split(".")[1:])
    return not private


# NOTE [Compiled autograd's ops in the key]
# A backward graph that compiled autograd hands to the backend calls its ``ops`` (``torch._dynamo.compiled_autograd.
# ops.MulBackward0``, ``ops.AccumulateGrad``, ``ops.validate_outputs``): each wraps the C++ "functional" backward of
# one autograd node type, bound under the node's name the first time a process meets it. For torch's own nodes
# (the classes of ``torch._C._functions``) and ``validate_outputs`` the name fixes the C++ function, and the torch
# build is in the key; the saved values, sizes, output metadata and needs-grad masks they read are graph inputs or
# constants of the graph text, and the ops have no other state. So a graph of such ops is keyed by its text as
# any other, and stored: a warm process loads compiled autograd's backward graphs instead of capturing them.
# A custom C++ ``autograd::Function`` is bound as ``CppNode<name><n>``, numbered in the order a process meets such
# functions and bound to the extension's code, which the key cannot see: a bypass, as any other unknown callable.


def _is_torch_compiled_autograd_op(target: Any) -> bool:
    """True for compiled autograd's op of one of torch's own autograd nodes (NOTE [Compiled autograd's ops in
    the key])."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    op_type = getattr(compiled_autograd, "Op", None)
    if not isinstance(op_type, type) or not isinstance(target, op_type):
        return False
    name = getattr(target, "__name__", "")
    if getattr(target, "is_custom_function", True) or not isinstance(getattr(target, "fn", None),
                                                                        types.BuiltinFunctionType):
        return False
    if name != "validate_outputs" and not isinstance(getattr(torch._C._functions, name, None), type):
        return False
    return getattr(compiled_autograd.ops, name, None) is target


def _check_callable_target(target: Any) -> None:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        check_operator_safe(target)
        return
    if _is_torch_compiled_autograd_op(target):
        return
    if numpy_call_token(target) is not None:  # NOTE [NumPy calls in a Dynamo graph]
        return
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() not in _SAFE_HIGHER_ORDER_OPS:
            raise BypassAOTAutogradCache(f"unsafe higher-order op: {target.name()}")
        return
    name = qualified_name(target)
    if isinstance(target, (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodDescriptorType,
                           types.WrapperDescriptorType, types.MethodWrapperType)):
        if name.split(".")[0] in _SAFE_BUILTIN_MODULE_PREFIXES and name not in _UNSAFE_BUILTINS:
            return
        raise BypassAOTAutogradCache(f"unsafe call: {name}")
    if isinstance(target, types.FunctionType):
        if _is_safe_torch_python_function(target, name) or is_marked_cacheable(target):
            return
        raise BypassAOTAutogradCache(f"unsafe call: {name}")
    if isinstance(target, type) and target.__module__.split(".")[0] in ("torch", "builtins"):
        return  # torch.Size, torch.Tensor, int, ... used as constructors
    if name in _SAFE_PRIVATE_TORCH_FUNCTIONS:
        return
    raise BypassAOTAutogradCache(f"unsafe call: {name}")


def _example_value(node: torch.fx.Node) -> Any:
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def _check_argument(value: Any, node: torch.fx.Node) -> None:
    """Arguments must be graph values or plain constants; a Python closure or opaque object is a bypass."""
    if isinstance(value, (torch.fx.Node, *_PRIMITIVE_TYPES, *_SYMBOLIC_TYPES)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_argument(item, node)
        return
    if isinstance(value, dict):
        for item in value.values():
            _check_argument(item, node)
        return
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        check_operator_safe(value)
        return
    if isinstance(value, torch.Tensor):
        _check_tensor_type(value, "tensor constant")
        return
    if callable(value):
        where = f"higher-order op with closure: {node.target.name()}" if isinstance(
            node.target, torch._ops.HigherOrderOperator) else f"callable argument: {qualified_name(value)}"
        raise BypassAOTAutogradCache(where)
    raise BypassAOTAutogradCache(f"opaque argument: {type(value).__name__}")


def _check_tensor_type(value: torch.Tensor, what: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    if type(value) in _TENSOR_TYPES or isinstance(value, FakeTensor):
        return
    # nn.Buffer (torch >= 2.5) is a plain-tensor marker, not a subclass with its own behaviour.
    buffer_type = getattr(torch.nn, "Buffer", None)
    if buffer_type is not None and type(value) is buffer_type:
        return
    raise BypassAOTAutogradCache(f"{what} subclass: {type(value).__name__}")


def check_node_safe(node: torch.fx.Node) -> None:
    """Raise :class:`BypassAOTAutogradCache` if the key cannot capture this node's behaviour.

    :raises BypassAOTAutogradCache: with a categorical reason, e.g. ``"unsafe call: my_module.helper"``.
    """
    if node.op == "call_function":
        if isinstance(node.target, str):
            raise BypassAOTAutogradCache(f"malformed node: call_function with string target {node.target}")
        _check_callable_target(node.target)
    elif node.op == "call_method":
        if not isinstance(node.target, str) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            raise BypassAOTAutogradCache(f"unsafe method call: {node.target}")
        receiver = _example_value(node.args[0])
        if receiver is not None and not isinstance(receiver, (torch.Tensor, *_SYMBOLIC_TYPES, *_PRIMITIVE_TYPES)):
            raise BypassAOTAutogradCache(f"method call on opaque object: {type(receiver).__name__}")
    elif node.op in ("placeholder", "output", "get_attr", "call_module"):
        pass  # inputs, constants and submodules are checked by check_cacheable, which has the module
    else:
        raise BypassAOTAutogradCache(f"unsupported node op: {node.op}")
    for value in (*node.args, *node.kwargs.values()):
        _check_argument(value, node)
    example = _example_value(node) if node.op == "placeholder" else None
    if isinstance(example, torch.Tensor):
        _check_tensor_type(example, "tensor input")


def _check_attribute(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    try:
        value = operator.attrgetter(node.target)(gm)
    except AttributeError:
        raise BypassAOTAutogradCache(f"missing attribute: {node.target}") from None
    if isinstance(value, torch.fx.GraphModule):
        check_cacheable(value)
    elif isinstance(value, torch.Tensor):
        _check_tensor_type(value, "tensor constant")
    elif not isinstance(value, _PRIMITIVE_TYPES):
        raise BypassAOTAutogradCache(f"opaque object: {type(value).__name__}")


def _check_submodule(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        raise BypassAOTAutogradCache(f"missing submodule: {node.target}") from None
    module_name = type(module).__module__
    if not module_name.startswith("torch.nn."):
        raise BypassAOTAutogradCache(f"unsafe module: {type(module).__module__}.{type(module).__qualname__}")


def check_inputs_cacheable(example_inputs: Iterable[Any]) -> None:
    """Inputs must be plain tensors, symbolic/plain numbers or simple constants (no subclasses, no objects).

    :raises BypassAOTAutogradCache: ``"tensor input subclass: DTensor"``, ``"opaque input: Generator"``.
    """
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            _check_tensor_type(value, "tensor input")
        elif not isinstance(value, (*_PRIMITIVE_TYPES, *_SYMBOLIC_TYPES)):
            raise BypassAOTAutogradCache(f"opaque input: {type(value).__name__}")


def check_cacheable(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> None:
    """Check every node (and nested subgraph) of ``gm`` and, when given, the example inputs.

    :raises BypassAOTAutogradCache: the first reason found.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise BypassAOTAutogradCache(f"not a GraphModule: {type(gm).__name__}")
    if example_inputs is not None:
        check_inputs_cacheable(example_inputs)
    for node in gm.graph.nodes:
        check_node_safe(node)
        if node.op == "get_attr":
            _check_attribute(gm, node)
        elif node.op == "call_module":
            _check_submodule(gm, node)
