"""What changed when an ``aot_function`` traces again: the new signature against the closest one it has.

Used for the INFO log of every re-trace (NOTE [Events at INFO] in docs/logging.md). Signatures are the
in-memory reuse keys of NOTE [Signature] in ``signature.py``: ``(extra, program digest, (in_spec, grad mode,
autocast, numerics flags, memory sharing, per-argument tuples))``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["describe_new_signature"]

_MAX_LISTED = 3


def _tensor_change(old: tuple, new: tuple) -> list[str]:
    names = ("kind", "dtype", "device", "layout", "requires_grad", "leaf", "geometry", "(conj, neg) bits")
    changes = []
    for name, before, after in zip(names, old, new):
        if before == after:
            continue
        if name == "geometry":
            if len(after) == 1 and isinstance(after[0], tuple):  # NOTE [Dynamic dimensions]: sizes masked
                changes.append(f"dimensions made dynamic: shape {tuple(before[0])} -> {after[0]}")
            elif len(before) == 3 and len(after) == 3 and before[0] != after[0]:
                changes.append(f"shape {tuple(before[0])} -> {tuple(after[0])}")
            elif len(before) == 3 and len(after) == 3:
                changes.append("strides or storage offset")
            else:
                changes.append(f"rank {before[0]} -> {after[0]}")
        else:
            changes.append(f"{name} {before} -> {after}")
    return changes


def _constant(record: tuple) -> object:
    """A constant argument's value (floats and complex numbers are kept as their bits: NOTE [Floats by bits])."""
    kind, value = record[1], record[2]
    if kind in (float, complex) and isinstance(value, bytes):
        parts = struct.unpack("<dd" if kind is complex else "<d", value)
        return complex(*parts) if kind is complex else parts[0]
    return value


def _argument_changes(old: Sequence[tuple], new: Sequence[tuple]) -> list[tuple[int, list[str]]]:
    found = []
    for index, (before, after) in enumerate(zip(old, new)):
        if before == after:
            continue
        if before[0] == after[0] == "tensor":
            found.append((index, _tensor_change(before, after)))
        elif before[0] == after[0] == "constant":
            found.append((index, [f"value {_constant(before)!r} -> {_constant(after)!r}"]))
        else:
            found.append((index, [f"{before[0]} -> {after[0]}"]))
    return found


def _differences(old: tuple, new: tuple) -> list[str]:
    (old_extra, old_program, (old_spec, old_grad, old_autocast, old_numerics, old_sharing, old_args)) = old
    (new_extra, new_program, (new_spec, new_grad, new_autocast, new_numerics, new_sharing, new_args)) = new
    found = []
    if old_extra != new_extra:
        found.append("module settings changed (train()/eval(), an attribute, a hook or a config value)")
    if old_program != new_program:
        found.append("the program changed (a global, class attribute, closure, hook or config the code reads)")
    if old_numerics != new_numerics:
        found.append("numerics flags changed (default dtype, torch.backends flags, matmul precision)")
    if old_spec != new_spec or len(old_args) != len(new_args):
        found.append("argument structure changed (other arguments, keyword names or containers)")
        return found
    if old_grad != new_grad:
        found.append(f"grad mode {old_grad} -> {new_grad}")
    if old_autocast != new_autocast:
        found.append("autocast state changed")
    if old_sharing != new_sharing:
        found.append("which arguments share memory changed")
    changes = _argument_changes(old_args, new_args)
    for index, what in changes[:_MAX_LISTED]:
        found.append(f"flat argument {index}: {'; '.join(what)}")
    if len(changes) > _MAX_LISTED:
        found.append(f"{len(changes) - _MAX_LISTED} more arguments")
    return found


def _only_sizes(found: list[str]) -> bool:
    """Whether every difference is a tensor argument's shape (nothing else)."""
    for item in found:
        head, _, what = item.partition(": ")
        if not head.startswith("flat argument") or not all(part.startswith("shape ") for part in what.split("; ")):
            return False
    return True


def describe_new_signature(seen: Sequence[tuple], new: tuple) -> str:
    """Why ``new`` is a new signature: its differences from the closest of ``seen`` (fewest differences),
    with a hint when only sizes changed; or, where ``new`` was seen already, that its graphs' guards failed."""
    if new in seen:  # the same signature: every graph traced for it has guards these arguments fail
        return ("the shape guards of every graph of this signature failed (the program specializes a dynamic size: "
                "a Python loop over a dimension, a size in a condition); each such size is a graph of its own")
    best: list[str] | None = None
    for old in seen:
        try:
            found = _differences(old, new)
        except (TypeError, ValueError):  # a key of another shape (defensive: keys are built in one place)
            continue
        if best is None or len(found) < len(best):
            best = found
    if not best:
        return "a new signature"
    text = "; ".join(best)
    if _only_sizes(best):
        text += " (only sizes changed: dynamic=True traces once for all sizes)"
    return text
