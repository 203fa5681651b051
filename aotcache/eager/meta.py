"""Argument metadata of one eager op call: what a precompiled kernel was built for, and how a call is matched.

Each argument of an operator call (bound to the op's schema, defaults filled in) is described by a small
JSON-serializable dict carrying ``arg_order`` (its position in the schema). The persisted form follows
PyTorch's AOTI-eager cache (``sizes``, ``strides``, ``dtype`` strings, ``tensor_list``, ``scalar_value``, ...)
with three additions: lists of scalars (``scalar_list``), ``None`` (``is_none``) and memory formats.

Matching does not compare these dicts: :func:`signature_of_values` (per call, on live values) and
:func:`signature_of_meta` (once per entry, on the decoded JSON) build the same hashable tuple, so a call
is matched by one dict lookup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "UnsupportedArgumentError",
    "UnsupportedOperatorError",
    "OpBinder",
    "binder_for",
    "op_file_name",
    "check_op_supported",
    "extract_tensor_metadata",
    "extract_tensor_list_metadata",
    "extract_scalar_metadata",
    "extract_scalar_list_metadata",
    "extract_string_metadata",
    "extract_dtype_metadata",
    "extract_device_metadata",
    "extract_layout_metadata",
    "extract_memory_format_metadata",
    "extract_none_metadata",
    "extract_argument_metadata",
    "extract_call_metadata",
    "decode_meta_info",
    "signature_of_values",
    "signature_of_meta",
    "matching_meta",
    "flat_tensor_inputs",
    "current_default_dtype",
    "decode_dtype",
]


class UnsupportedArgumentError(NotImplementedError):
    """An argument the per-op kernel cache cannot describe or bake into a kernel (names the argument)."""


class UnsupportedOperatorError(NotImplementedError):
    """An operator whose eager semantics a precompiled kernel cannot reproduce (aliasing, RNG, ...)."""


# Labels the persisted metadata uses for Python scalars (kept from the AOTI-eager format; the value itself
# is stored exactly in ``scalar_value``, the label only tells int from float from bool).
_SCALAR_DTYPE_LABELS = {bool: "torch.bool", int: "torch.int32", float: "torch.float32"}


def _scalar_label(value: Any) -> str | None:
    # NOTE [bool before int]: bool is a subclass of int, and True == 1 hashes equal to 1; the label is what
    # keeps add(x, y, alpha=True) and add(x, y, alpha=1) apart, so test bool first.
    if isinstance(value, bool):
        return _SCALAR_DTYPE_LABELS[bool]
    if isinstance(value, int):
        return _SCALAR_DTYPE_LABELS[int]
    if isinstance(value, float):
        return _SCALAR_DTYPE_LABELS[float]
    return None


def _scalar_key(value: Any) -> Any:
    """A scalar as matched: itself, but ``-0.0`` apart from ``0.0``.

    NOTE [Signed zeros and NaNs as scalars]: a scalar is baked into the kernel, and ``0.0 == -0.0`` (equal
    hashes too), so a kernel built for ``mul(x, 0.0)`` matched ``mul(x, -0.0)`` and returned ``+0.0`` where the
    stock kernel gives ``-0.0`` (``1 / y``, ``signbit``, ``atan2`` tell them apart). A NaN never equals itself:
    its entry could never match, and a NaN's sign and payload do not survive the JSON index; NaN scalars are
    refused (precompile raises, a call takes the stock kernel).
    """
    if type(value) is float and not value:
        return "-0.0" if math.copysign(1.0, value) < 0 else value
    return value


def _check_not_nan(value: Any) -> None:
    if type(value) is float and value != value:
        raise UnsupportedArgumentError("NaN scalars are not supported by the per-op kernel cache (a NaN never "
                                       "matches itself, and its sign and payload are not recorded)")


def current_default_dtype() -> str:
    """``str(torch.get_default_dtype())``: recorded with each kernel (NOTE [Default dtype of a kernel])."""
    return str(torch.get_default_dtype())


def _device_index(device: torch.device) -> int:
    # CPU tensors report index None; the persisted format (like PyTorch's) uses -1.
    return -1 if device.type == "cpu" or device.index is None else device.index


# ----------------------------------------------------------------------------------------------------
# Extractors: one per argument kind, each returning a JSON-serializable dict (without arg_order).
# ----------------------------------------------------------------------------------------------------


def extract_tensor_metadata(dynamic: bool, tensor: torch.Tensor) -> dict[str, Any]:
    """Metadata of a dense strided tensor: device, dtype, sizes, strides, requires_grad, dispatch keys.

    :raises UnsupportedArgumentError: sparse / quantized / other non-strided layouts, tensor subclasses.
    """
    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedArgumentError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise UnsupportedArgumentError(
            f"tensors with layout {tensor.layout} are not supported by the per-op kernel cache; "
            "pass a dense tensor (e.g. .to_dense())")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedArgumentError(
            f"tensor subclass {type(tensor).__name__} is not supported by the per-op kernel cache; "
            "pass a plain torch.Tensor")
    return {
        "is_dynamic": bool(dynamic),
        "device_type": tensor.device.type,
        "device_index": _device_index(tensor.device),
        "dtype": str(tensor.dtype),
        "sizes": list(tensor.size()),
        "strides": list(tensor.stride()),
        "requires_grad": bool(tensor.requires_grad),
        "dispatch_key_set": torch._C._dispatch_keys(tensor).raw_repr(),
    }


def extract_tensor_list_metadata(dynamic: bool, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Metadata of a list of tensors (e.g. ``cat``'s input): one tensor dict per element."""
    if not all(isinstance(item, torch.Tensor) for item in tensors):
        raise UnsupportedArgumentError("a tensor list must hold only tensors")
    return {"tensor_list": [extract_tensor_metadata(dynamic, item) for item in tensors]}


def extract_scalar_metadata(device_type: str, value: bool | int | float) -> dict[str, Any]:
    """Metadata of a Python int / float / bool (baked into the kernel as a constant)."""
    label = _scalar_label(value)
    if label is None:
        raise UnsupportedArgumentError(f"expected an int, float or bool scalar, got {type(value).__name__}")
    _check_not_nan(value)
    return {
        "is_dynamic": False,
        "device_type": device_type,
        "device_index": -1 if device_type == "cpu" else 0,
        "dtype": label,
        "scalar_value": value if isinstance(value, bool) else (int(value) if isinstance(value, int)
                                                                else float(value)),
    }


def extract_scalar_list_metadata(values: Sequence[bool | int | float]) -> dict[str, Any]:
    """Metadata of a list of Python scalars (e.g. ``sum``'s ``dim``): each value with its type label."""
    labels = [_scalar_label(value) for value in values]
    if any(label is None for label in labels):
        raise UnsupportedArgumentError("a scalar list must hold only int, float or bool values")
    return {"scalar_list": [{"dtype": label, "scalar_value": extract_scalar_metadata("cpu", value)["scalar_value"]}
                            for label, value in zip(labels, values)]}


def extract_string_metadata(value: str) -> dict[str, Any]:
    """Metadata of a string argument (e.g. ``gelu``'s ``approximate``)."""
    if not isinstance(value, str):
        raise UnsupportedArgumentError(f"expected a str, got {type(value).__name__}")
    return {"string_value": value}


def extract_dtype_metadata(value: torch.dtype) -> dict[str, Any]:
    """Metadata of a ``torch.dtype`` argument."""
    if not isinstance(value, torch.dtype):
        raise UnsupportedArgumentError(f"expected a torch.dtype, got {type(value).__name__}")
    return {"dtype_value": str(value)}


def extract_device_metadata(value: torch.device) -> dict[str, Any]:
    """Metadata of a ``torch.device`` argument (index None when the device has none)."""
    if not isinstance(value, torch.device):
        raise UnsupportedArgumentError(f"expected a torch.device, got {type(value).__name__}")
    return {"device_type_value": value.type, "device_index_value": value.index}


def extract_layout_metadata(value: torch.layout) -> dict[str, Any]:
    """Metadata of a ``torch.layout`` argument."""
    if not isinstance(value, torch.layout):
        raise UnsupportedArgumentError(f"expected a torch.layout, got {type(value).__name__}")
    return {"layout_value": str(value)}


def extract_memory_format_metadata(value: torch.memory_format) -> dict[str, Any]:
    """Metadata of a ``torch.memory_format`` argument."""
    if not isinstance(value, torch.memory_format):
        raise UnsupportedArgumentError(f"expected a torch.memory_format, got {type(value).__name__}")
    return {"memory_format_value": str(value)}


def extract_none_metadata() -> dict[str, Any]:
    """Metadata of an argument that is ``None`` (an optional argument left unset)."""
    return {"is_none": True}


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def extract_argument_metadata(value: Any, *, dynamic: bool, device_type: str, name: str = "argument"
                              ) -> dict[str, Any]:
    """Metadata of one argument value, by kind.

    :raises UnsupportedArgumentError: the value's type cannot be described (message names ``name``).
    """
    try:
        if isinstance(value, torch.Tensor):
            return extract_tensor_metadata(dynamic, value)
        if value is None:
            return extract_none_metadata()
        if _scalar_label(value) is not None:
            return extract_scalar_metadata(device_type, value)
        if isinstance(value, str):
            return extract_string_metadata(value)
        if isinstance(value, torch.dtype):
            return extract_dtype_metadata(value)
        if isinstance(value, torch.device):
            return extract_device_metadata(value)
        if isinstance(value, torch.layout):
            return extract_layout_metadata(value)
        if isinstance(value, torch.memory_format):
            return extract_memory_format_metadata(value)
        if isinstance(value, (list, tuple)):
            if value and all(isinstance(item, torch.Tensor) for item in value):
                return extract_tensor_list_metadata(dynamic, value)
            if all(_scalar_label(item) is not None for item in value):
                return extract_scalar_list_metadata(value)
            raise UnsupportedArgumentError(
                "lists must hold only tensors or only int/float/bool scalars (lists with None, nested lists "
                "or mixed lists are not supported)")
    except UnsupportedArgumentError as exc:
        raise UnsupportedArgumentError(f"{name} ({_describe(value)}): {exc}") from None
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        hint = "symbolic values only occur while tracing; call the op eagerly with concrete values"
    else:
        hint = ("supported are tensors, lists of tensors, int/float/bool, lists of those, str, torch.dtype, "
                "torch.device, torch.layout, torch.memory_format and None")
    raise UnsupportedArgumentError(f"{name} ({_describe(value)}) is not supported by the per-op kernel "
                                   f"cache: {hint}")


# ----------------------------------------------------------------------------------------------------
# Schema binding: a call's args / kwargs -> one value per schema argument, defaults filled in.
# ----------------------------------------------------------------------------------------------------

_MISSING = object()


def op_file_name(op: torch._ops.OpOverload) -> str:
    """``add.Tensor``, ``mm.default``: the op's name with overload, used for its index and library folder."""
    return f"{op._opname}.{op._overloadname}"


@dataclass(frozen=True)
class _ArgumentSpec:
    name: str
    kwarg_only: bool
    default: Any  # _MISSING when the argument is required


class OpBinder:
    """Binds a call of one op overload to its schema: ``bind(args, kwargs)`` -> values in schema order.

    NOTE [normalize before matching]: the dispatcher hands a Python kernel its arguments with trailing
    defaults dropped and keyword-only ones as kwargs, and users write ``add(x, y)`` or ``add(x, y, alpha=1)``;
    binding to the full schema makes every spelling of the same call match the same entry.
    """

    def __init__(self, op: torch._ops.OpOverload) -> None:
        self.op = op
        self.qualified_name = op.name()
        self.arguments = tuple(
            _ArgumentSpec(arg.name, arg.kwarg_only, arg.default_value if arg.has_default_value() else _MISSING)
            for arg in op._schema.arguments)
        self._positional = tuple(spec for spec in self.arguments if not spec.kwarg_only)
        self._names = frozenset(spec.name for spec in self.arguments)

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any] | None) -> list[Any]:
        """Values for every schema argument in order.

        :raises TypeError: too many positional arguments, an unknown or duplicate keyword, a missing one.
        """
        kwargs = kwargs or {}
        if len(args) > len(self._positional):
            raise TypeError(f"{self.qualified_name} takes at most {len(self._positional)} positional arguments "
                            f"({len(args)} given)")
        if kwargs:
            unknown = [name for name in kwargs if name not in self._names]
            if unknown:
                raise TypeError(f"{self.qualified_name} got unexpected keyword argument(s) {unknown}; "
                                f"its arguments are {[spec.name for spec in self.arguments]}")
        values = list(args)
        for spec in self.arguments[len(args):]:
            value = kwargs.get(spec.name, spec.default)
            if value is _MISSING:
                raise TypeError(f"{self.qualified_name} is missing required argument {spec.name!r}")
            values.append(value)
        for spec in self.arguments[:len(args)]:
            if spec.name in kwargs:
                raise TypeError(f"{self.qualified_name} got argument {spec.name!r} both positionally and by keyword")
        return values

    def split(self, values: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Bound values back to ``(args, kwargs)`` suitable for calling the op (keyword-only as kwargs)."""
        args = tuple(value for spec, value in zip(self.arguments, values) if not spec.kwarg_only)
        kwargs = {spec.name: value for spec, value in zip(self.arguments, values) if spec.kwarg_only}
        return args, kwargs


_BINDERS: dict[str, OpBinder] = {}  # NOTE: memo of immutable schema facts per op name (safe to share).


def binder_for(op: torch._ops.OpOverload) -> OpBinder:
    """The (memoized) :class:`OpBinder` of ``op``."""
    binder = _BINDERS.get(op.name())
    if binder is None:
        binder = _BINDERS[op.name()] = OpBinder(op)
    return binder


def check_op_supported(op: Any) -> torch._ops.OpOverload:
    """``op`` if a precompiled kernel can stand in for its CPU kernel, else a clear error.

    :raises TypeError: ``op`` is not an ``OpOverload`` (e.g. ``torch.ops.aten.add`` without ``.Tensor``).
    :raises UnsupportedOperatorError: the op mutates or aliases an input, draws random numbers, returns
        non-tensors, or has no CPU / CompositeExplicitAutograd kernel to stand in for.
    """
    if isinstance(op, torch._ops.OpOverloadPacket):
        raise TypeError(f"{op} is an overload packet; pass one overload, e.g. {op}.default or "
                        f"{op}.{op.overloads()[0]}")
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"expected a torch.ops OpOverload such as torch.ops.aten.add.Tensor, got {_describe(op)}")
    schema = op._schema
    name = op.name()
    if any(arg.alias_info is not None for arg in schema.arguments) or any(
            ret.alias_info is not None for ret in schema.returns):
        raise UnsupportedOperatorError(
            f"{name} mutates or aliases its inputs ({schema}); a precompiled kernel returns fresh tensors, so "
            "only functional ops are supported (use the out-of-place variant)")
    if torch.Tag.nondeterministic_seeded in op.tags:
        raise UnsupportedOperatorError(
            f"{name} draws random numbers; a precompiled kernel would not follow torch's RNG stream")
    if not schema.returns:
        raise UnsupportedOperatorError(f"{name} returns nothing; only ops returning tensors are supported")
    for ret in schema.returns:
        type_text = str(ret.type)
        if type_text not in ("Tensor", "List[Tensor]") or (type_text == "List[Tensor]" and len(schema.returns) > 1):
            raise UnsupportedOperatorError(
                f"{name} returns {type_text}; only ops returning Tensor, a tuple of Tensors or Tensor[] are "
                "supported")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    if not (has_kernel(name, "CPU") or has_kernel(name, "CompositeExplicitAutograd")):
        raise UnsupportedOperatorError(
            f"{name} has no CPU kernel (it is implemented by decomposition); overriding it would change its "
            "autograd behaviour. Precompile the ops it decomposes into instead")
    return op


# ----------------------------------------------------------------------------------------------------
# Whole-call metadata, decoding, and the matching signature
# ----------------------------------------------------------------------------------------------------


def extract_call_metadata(op: torch._ops.OpOverload, values: Sequence[Any], *, dynamic: bool, device_type: str
                          ) -> list[dict[str, Any]]:
    """``meta_info`` of a bound call: one dict per schema argument, each with ``arg_order``.

    :raises UnsupportedArgumentError: naming the first argument that cannot be described.
    """
    binder = binder_for(op)
    meta_info = []
    for order, (spec, value) in enumerate(zip(binder.arguments, values)):
        meta = extract_argument_metadata(value, dynamic=dynamic, device_type=device_type,
                                         name=f"argument {spec.name!r} of {binder.qualified_name}")
        meta["arg_order"] = order
        meta_info.append(meta)
    return meta_info


def _torch_attr(text: str, kind: type) -> Any:
    value = getattr(torch, text.split(".")[-1], None)
    if not isinstance(value, kind):
        raise ValueError(f"{text!r} is not a {kind.__name__}")
    return value


def decode_dtype(text: str) -> torch.dtype:
    """``"torch.float32"`` -> ``torch.float32``.

    :raises ValueError: the text names no dtype.
    """
    return _torch_attr(text, torch.dtype)


def decode_meta_info(meta_info: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of persisted ``meta_info`` with dtype / layout / memory-format strings as torch objects.

    :raises ValueError: an entry names an unknown dtype / layout / memory format, or is not a dict.
    """
    decoded = []
    for meta in meta_info:
        if not isinstance(meta, dict):
            raise ValueError(f"metadata item {meta!r} is not an object")
        item = dict(meta)
        if "tensor_list" in item:
            item["tensor_list"] = decode_meta_info(item["tensor_list"])
        if "dtype" in item:
            item["dtype"] = _torch_attr(item["dtype"], torch.dtype)
        if "dtype_value" in item:
            item["dtype_value"] = _torch_attr(item["dtype_value"], torch.dtype)
        if "layout_value" in item:
            item["layout_value"] = _torch_attr(item["layout_value"], torch.layout)
        if "memory_format_value" in item:
            item["memory_format_value"] = _torch_attr(item["memory_format_value"], torch.memory_format)
        if item.get("device_type") == "cpu":
            item["device_index"] = -1
        decoded.append(item)
    return decoded


# Signature element tags (private: only these two functions build signatures).
_T, _TL, _S, _SL, _STR, _DT, _DEV, _LAY, _MF, _NONE = "t", "tl", "s", "sl", "str", "dt", "dev", "lay", "mf", "none"


def _tensor_signature(tensor: torch.Tensor) -> tuple:
    # NOTE: no device here: entries live in one folder per device, and the dispatcher only ever sees
    # tensors of its key's device. torch.Size hashes and compares like the tuple of its sizes.
    return (_T, tensor.dtype, tensor.shape, tensor.stride())


def _scalar_signature(value: Any) -> tuple:
    if type(value) is float and (not value or value != value):  # NOTE [Signed zeros and NaNs as scalars]
        _check_not_nan(value)
        return (_S, _scalar_label(value), _scalar_key(value))
    return (_S, _scalar_label(value), value)


def signature_of_values(values: Sequence[Any], default_dtype: torch.dtype) -> tuple:
    """Hashable signature of a bound call (live values) made under ``default_dtype``
    (``torch.get_default_dtype()``); equals :func:`signature_of_meta` of its metadata.

    NOTE [Default dtype of a kernel]: the default dtype decides the result dtype of many calls: an integer
    tensor with a float scalar (``add(x_int, 2.5)``), true division and float functions of integer tensors
    (``div(x_int, y_int)``, ``sigmoid(x_int)``), factories with ``dtype=None``. A kernel bakes the one its
    precompile ran under, so it is part of the signature (the first element) and of the entry (format 2):
    a kernel built under float32 matched a call made under ``set_default_dtype(torch.float64)`` and returned
    float32 where the stock kernel returns float64. Other numerics flags (matmul precision, oneDNN / TF32)
    are not matched: AOTInductor's library calls ATen for matmuls and convolutions, which reads them at run
    time, and elsewhere they permit lower precision rather than define the result.

    NOTE [what matching ignores]: ``requires_grad`` and the dispatch key set are recorded but not matched:
    the override runs below autograd (the CPU key), where the kernel computes the same values either way,
    and inference-mode tensors carry other keys for the same data. The key-set bits that do change a CPU
    kernel's input (conjugate / negative / zero-tensor views) are rejected by the dispatcher before lookup.

    :raises UnsupportedArgumentError: a value no entry can describe.
    """
    signature: list[Any] = [default_dtype]
    for value in values:
        if isinstance(value, torch.Tensor):
            signature.append(_tensor_signature(value))
        elif value is None:
            signature.append((_NONE,))
        elif isinstance(value, (bool, int, float)):
            signature.append(_scalar_signature(value))
        elif isinstance(value, str):
            signature.append((_STR, value))
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(item, torch.Tensor) for item in value):
                signature.append((_TL, tuple(_tensor_signature(item) for item in value)))
            elif all(_scalar_label(item) is not None for item in value):
                signature.append((_SL, tuple(_scalar_signature(item) for item in value)))
            else:
                raise UnsupportedArgumentError(f"unsupported list argument {_describe(value)}")
        elif isinstance(value, torch.dtype):
            signature.append((_DT, value))
        elif isinstance(value, torch.device):
            signature.append((_DEV, value.type, value.index))
        elif isinstance(value, torch.layout):
            signature.append((_LAY, value))
        elif isinstance(value, torch.memory_format):
            signature.append((_MF, value))
        else:
            raise UnsupportedArgumentError(f"unsupported argument {_describe(value)}")
    return tuple(signature)


def _meta_tensor_signature(meta: dict[str, Any]) -> tuple:
    return (_T, meta["dtype"], tuple(meta["sizes"]), tuple(meta["strides"]))


def _meta_scalar_signature(label: Any, value: Any) -> tuple:
    if type(value) is float and value != value:
        raise ValueError("a NaN scalar (never matched: NOTE [Signed zeros and NaNs as scalars])")
    return (_S, str(label), _scalar_key(value))


def signature_of_meta(decoded_meta_info: Sequence[dict[str, Any]], default_dtype: torch.dtype) -> tuple:
    """Hashable signature of decoded ``meta_info`` (see :func:`decode_meta_info`), in ``arg_order`` order, of
    a kernel built under ``default_dtype`` (NOTE [Default dtype of a kernel]).

    :raises ValueError: an item of unknown kind, or one missing a field.
    """
    signature: list[Any] = [default_dtype]
    for meta in sorted(decoded_meta_info, key=lambda item: item["arg_order"]):
        try:
            if "tensor_list" in meta:
                signature.append((_TL, tuple(_meta_tensor_signature(item) for item in meta["tensor_list"])))
            elif "sizes" in meta:
                signature.append(_meta_tensor_signature(meta))
            elif "scalar_value" in meta:
                signature.append(_meta_scalar_signature(meta["dtype"], meta["scalar_value"]))
            elif "scalar_list" in meta:
                signature.append((_SL, tuple(_meta_scalar_signature(item["dtype"], item["scalar_value"])
                                             for item in meta["scalar_list"])))
            elif meta.get("is_none"):
                signature.append((_NONE,))
            elif "string_value" in meta:
                signature.append((_STR, meta["string_value"]))
            elif "dtype_value" in meta:
                signature.append((_DT, meta["dtype_value"]))
            elif "device_type_value" in meta:
                signature.append((_DEV, meta["device_type_value"], meta["device_index_value"]))
            elif "layout_value" in meta:
                signature.append((_LAY, meta["layout_value"]))
            elif "memory_format_value" in meta:
                signature.append((_MF, meta["memory_format_value"]))
            else:
                raise ValueError(f"metadata item of unknown kind: {sorted(meta)}")
        except KeyError as exc:
            raise ValueError(f"metadata item {sorted(meta)} lacks field {exc}") from None
    return tuple(signature)


_UNMATCHED_FIELDS = ("requires_grad", "dispatch_key_set")


def matching_meta(meta_info: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``meta_info`` without the recorded-but-unmatched fields: what identifies a kernel (and its digest)."""
    def strip(meta: dict[str, Any]) -> dict[str, Any]:
        item = {key: value for key, value in meta.items() if key not in _UNMATCHED_FIELDS}
        if "tensor_list" in item:
            item["tensor_list"] = [strip(sub) for sub in item["tensor_list"]]
        return item

    return [strip(meta) for meta in meta_info]


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces) used for digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def flat_tensor_inputs(values: Sequence[Any]) -> list[torch.Tensor]:
    """The kernel's inputs: every tensor of a bound call in schema order, tensor lists flattened."""
    flat: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            flat.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            flat.extend(value)
    return flat
