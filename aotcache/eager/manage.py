"""Functions behind ``aotcache eager ls | precompile | clear``: list entries, precompile from a spec, clear.

A precompile spec is JSON (a dict, a list of dicts, JSON text, or the path of a JSON file)::

    [{"op": "aten::add.Tensor", "args": [{"tensor": [8, 8]}, {"tensor": [8, 8]}], "kwargs": {"alpha": 2}},
     {"op": "aten::sum.dim_IntList", "args": [{"tensor": [4, 5], "dtype": "float32"}, [1], true],
      "kwargs": {"dtype": {"dtype": "float64"}}}]

Argument values: ``{"tensor": sizes, "dtype"?: "float32", "strides"?: [...]}`` is a tensor (random data);
a list of such dicts is a tensor list; ``{"dtype": ...}``, ``{"device": ...}``, ``{"layout": ...}``,
``{"memory_format": ...}`` alone are those torch objects; numbers, booleans, strings, lists of numbers and
null are themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aotcache.eager.index import IndexStatus, iter_op_indexes
from aotcache.eager.versions import incompatibility

__all__ = ["list_entries", "precompile_from_spec", "clear", "format_signature", "parse_spec_value"]


def _format_tensor(meta: dict[str, Any]) -> str:
    dtype = str(meta.get("dtype", "?")).replace("torch.", "")
    sizes = meta.get("sizes", [])
    strides = meta.get("strides", [])
    contiguous = []
    expected = 1
    for size in reversed(sizes):
        contiguous.insert(0, expected)
        expected *= max(size, 1)
    layout = "" if list(strides) == contiguous else "{" + ",".join(map(str, strides)) + "}"
    return f"{dtype}[{','.join(map(str, sizes))}]{layout}"


def _format_value(meta: dict[str, Any]) -> str:
    if "tensor_list" in meta:
        return "[" + ", ".join(_format_tensor(item) for item in meta["tensor_list"]) + "]"
    if "sizes" in meta:
        return _format_tensor(meta)
    if "scalar_value" in meta:
        return repr(meta["scalar_value"])
    if "scalar_list" in meta:
        return repr([item.get("scalar_value") for item in meta["scalar_list"]])
    if meta.get("is_none"):
        return "None"
    if "string_value" in meta:
        return repr(meta["string_value"])
    for key in ("dtype_value", "layout_value", "memory_format_value"):
        if key in meta:
            return str(meta[key])
    if "device_type_value" in meta:
        index = meta.get("device_index_value")
        return meta["device_type_value"] + ("" if index is None else f":{index}")
    return "?"


def format_signature(meta_info: Sequence[dict[str, Any]], arg_names: Sequence[str] | None = None) -> str:
    """A one-line human form of an entry's arguments, e.g. ``self=float32[8,8], other=float32[8,8], alpha=2``."""
    parts = []
    for meta in sorted(meta_info, key=lambda item: item.get("arg_order", 0)):
        order = meta.get("arg_order", 0)
        name = arg_names[order] if arg_names is not None and order < len(arg_names) else f"arg{order}"
        parts.append(f"{name}={_format_value(meta)}")
    return ", ".join(parts)


def _arg_names(namespace: str, op_name: str) -> list[str] | None:
    name, _, overload = op_name.partition(".")
    packet = getattr(getattr(torch.ops, namespace, None), name, None) if hasattr(torch.ops, namespace) else None
    op = getattr(packet, overload, None) if packet is not None else None
    if not isinstance(op, torch._ops.OpOverload):
        return None  # a custom op whose library is not loaded in this process
    return [arg.name for arg in op._schema.arguments]


def list_entries(*, cache_dir: Path | str | None = None, namespace: str | None = None, op: str | None = None,
                 device: str | None = None) -> list[dict[str, Any]]:
    """Every entry of the per-op kernel cache, as dicts for ``aotcache eager ls`` (JSON-serializable).

    Keys: ``op`` (``aten::add.Tensor``), ``namespace``, ``device``, ``digest``, ``signature`` (human form),
    ``library`` (path), ``size`` (bytes, None when missing), ``usable`` (loadable by this process),
    ``problem`` (why not, or None), ``created`` (unix time), ``versions``, ``index_status``.
    """
    op_namespace, op_name = _split_op(op) if op is not None else (namespace, None)
    rows = []
    for index in iter_op_indexes(cache_dir, namespace=op_namespace, device=device):
        if op_name is not None and index.op_name != op_name:
            continue
        snapshot = index.read()
        arg_names = _arg_names(index.namespace, index.op_name)
        for entry in snapshot.entries:
            library = index.library_path(entry)
            size = library.stat().st_size if library.is_file() else None
            problem = incompatibility(entry.versions, index.device) if size is not None else "library missing"
            rows.append({
                "op": f"{index.namespace}::{index.op_name}",
                "namespace": index.namespace,
                "device": index.device,
                "digest": entry.digest,
                "signature": format_signature(entry.meta_info, arg_names),
                "library": str(library),
                "size": size,
                "usable": problem is None,
                "problem": problem,
                "created": entry.created,
                "versions": entry.versions,
                "index_status": snapshot.status.value,
            })
        if snapshot.status is IndexStatus.ABSENT and index.lib_dir.is_dir() and any(index.lib_dir.iterdir()):
            rows.append({"op": f"{index.namespace}::{index.op_name}", "namespace": index.namespace,
                         "device": index.device, "digest": None, "signature": None, "library": str(index.lib_dir),
                         "size": None, "usable": False, "index_status": snapshot.status.value,
                         "problem": "libraries without an index (run `aotcache eager precompile` again or clear)",
                         "created": None, "versions": None})
    return rows


def _split_op(text: str) -> tuple[str, str]:
    """``"aten::add.Tensor"`` / ``"aten.add.Tensor"`` / ``"aten::mm"`` -> (``"aten"``, ``"add.Tensor"``)."""
    namespace, sep, rest = text.strip().partition("::")
    if not sep:
        namespace, _, rest = text.strip().partition(".")
    if not namespace or not rest:
        raise ValueError(f"{text!r} is not an op name; write it as 'namespace::name.overload', e.g. "
                         "'aten::add.Tensor'")
    return namespace, rest if "." in rest else f"{rest}.default"


def clear(*, cache_dir: Path | str | None = None, namespace: str | None = None, op: str | None = None,
          device: str | None = None) -> int:
    """Delete entries (index, libraries, sidecars) of one op, one namespace, one device, or all; returns
    how many indexed entries were removed."""
    op_namespace, op_name = _split_op(op) if op is not None else (namespace, None)
    removed = 0
    for index in list(iter_op_indexes(cache_dir, namespace=op_namespace, device=device)):
        if op_name is None or index.op_name == op_name:
            # Lock files stay: deleting one another process holds would let a third take a second lock.
            removed += index.remove()
    return removed


# ----------------------------------------------------------------------------------------------------
# Precompile specs
# ----------------------------------------------------------------------------------------------------


def _torch_object(kind: type, text: Any, what: str) -> Any:
    value = getattr(torch, str(text).replace("torch.", ""), None)
    if not isinstance(value, kind):
        raise ValueError(f"{what}: {text!r} is not a torch {kind.__name__} name (e.g. float32, strided, "
                         "contiguous_format)")
    return value


def parse_spec_value(value: Any, what: str = "value") -> Any:
    """One argument of a precompile spec as a Python / torch value (see the module docstring).

    :raises ValueError: naming ``what`` and the expected forms.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [parse_spec_value(item, f"{what}[{position}]") for position, item in enumerate(value)]
    if isinstance(value, dict):
        if "tensor" in value:
            unknown = set(value) - {"tensor", "dtype", "strides"}
            if unknown:
                raise ValueError(f"{what}: unknown tensor field(s) {sorted(unknown)}; use tensor, dtype, strides")
            sizes = value["tensor"]
            if not isinstance(sizes, list) or not all(isinstance(size, int) and size >= 0 for size in sizes):
                raise ValueError(f"{what}: 'tensor' must be a list of sizes, e.g. [8, 8]")
            dtype = _torch_object(torch.dtype, value.get("dtype", "float32"), what)
            strides = value.get("strides")
            if strides is None:
                data = torch.empty(sizes, dtype=dtype)
            else:
                data = torch.empty_strided(sizes, strides, dtype=dtype)
            if dtype.is_floating_point or dtype.is_complex:
                return data.normal_()
            return data.fill_(1) if dtype == torch.bool else data.random_(0, 8)
        if len(value) == 1:
            (key, text), = value.items()
            if key == "dtype":
                return _torch_object(torch.dtype, text, what)
            if key == "layout":
                return _torch_object(torch.layout, text, what)
            if key == "memory_format":
                return _torch_object(torch.memory_format, text, what)
            if key == "device":
                return torch.device(text)
    raise ValueError(f"{what}: {value!r} is not a spec value; use a number, bool, string, null, a list, "
                     "{\"tensor\": [sizes], \"dtype\": ..., \"strides\": ...}, {\"dtype\": ...}, {\"device\": ...}, "
                     "{\"layout\": ...} or {\"memory_format\": ...}")


def _load_spec(spec: Any) -> list[dict[str, Any]]:
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        path = Path(text)
        if not text.lstrip().startswith(("{", "[")):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read precompile spec file {path}: {exc}") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"precompile spec is not valid JSON: {exc}") from None
    items = [spec] if isinstance(spec, dict) else spec
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("a precompile spec is an object {\"op\": ..., \"args\": [...], \"kwargs\": {...}} or a "
                         "list of them")
    return items


def precompile_from_spec(spec: Any, *, device: str = "cpu") -> list[Any]:
    """Precompile every item of a spec (see the module docstring); returns the ``PrecompileResult`` list.

    :raises ValueError: a malformed spec (naming the item); compile errors as :func:`aotcache.eager.precompile`.
    """
    from aotcache.eager.dispatch import precompile, resolve_op

    items = _load_spec(spec)
    calls = []
    for position, item in enumerate(items):
        unknown = set(item) - {"op", "args", "kwargs"}
        if "op" not in item or unknown:
            raise ValueError(f"precompile spec item {position} must have 'op' and optionally 'args', 'kwargs' "
                             f"(unknown: {sorted(unknown)})")
        op = resolve_op(item["op"])
        args = parse_spec_value(list(item.get("args", [])), f"item {position} args")
        kwargs_spec = item.get("kwargs", {})
        if not isinstance(kwargs_spec, dict):
            raise ValueError(f"precompile spec item {position}: 'kwargs' must be an object")
        kwargs = {name: parse_spec_value(value, f"item {position} kwarg {name!r}")
                  for name, value in kwargs_spec.items()}
        calls.append((op, args, kwargs))
    return [precompile(op, args, kwargs, device=device) for op, args, kwargs in calls]
