"""``aotcache eager ls | precompile | clear``: the per-op precompiled kernel cache (docs/eager.md).

These import torch (``aotcache.eager`` is built on it: op schemas name the arguments in listings, and
compatibility checks need the torch build); the other subcommands of ``aotcache`` do not.
"""

from __future__ import annotations

from typing import Any

import click

from aotcache.cli import output
from aotcache.cli.app import CliError, ConfigProblem, confirm_or_refuse, json_option, state

__all__ = ["eager", "eager_ls", "eager_precompile", "eager_clear"]


@click.group()
def eager() -> None:
    """The per-op precompiled kernel cache (AOTInductor eager kernels): ls, precompile, clear."""


def _filters(function):
    function = click.option("--device", default=None, metavar="DEVICE",
                            help="Only this device (e.g. cpu).")(function)
    function = click.option("--namespace", "op_namespace", default=None, metavar="NS",
                            help="Only ops of this namespace (e.g. aten).")(function)
    return click.option("--op", default=None, metavar="OP",
                        help="Only this op overload, e.g. aten::add.Tensor.")(function)


def _list(op: str | None, op_namespace: str | None, device: str | None) -> list[dict[str, Any]]:
    from aotcache.eager import list_entries

    try:
        return list_entries(namespace=op_namespace, op=op, device=device)
    except ValueError as exc:
        raise ConfigProblem(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the per-op kernel cache: {exc}") from None


def _scope(op: str | None, op_namespace: str | None, device: str | None) -> str:
    parts = [f"op {op}" if op else (f"namespace {op_namespace}" if op_namespace else "every op")]
    if device:
        parts.append(f"device {device}")
    return ", ".join(parts)


@eager.command("ls")
@_filters
@json_option
def eager_ls(op: str | None, op_namespace: str | None, device: str | None) -> None:
    """List precompiled kernels: op, call signature, device, size, age, and whether this process can load them."""
    rows = _list(op, op_namespace, device)
    data = {"entries": rows, "total_entries": sum(1 for row in rows if row["digest"] is not None),
            "total_bytes": sum(row["size"] or 0 for row in rows)}

    def render(_: Any) -> None:
        if not rows:
            click.echo(f"No precompiled kernels ({_scope(op, op_namespace, device)}).")
            return
        problems: dict[str, int] = {}
        for row in rows:
            if not row["usable"]:
                problems[row["problem"]] = problems.get(row["problem"], 0) + 1
        table_rows = [(row["op"], row["signature"] or "-", row["device"], output.format_bytes(row["size"]),
                       output.format_age(row["created"]), "yes" if row["usable"] else "no") for row in rows]
        output.print_table(f"{data['total_entries']} precompiled kernels, {output.format_bytes(data['total_bytes'])}",
                           ("op", "signature", "device", "size", "created", "usable"), table_rows,
                           numeric=("size",))
        for problem, count in problems.items():
            click.echo(f"not usable here ({count}): {problem}")

    output.emit(data, render, as_json=state().as_json)


@eager.command("precompile")
@click.argument("spec")
@click.option("--device", default="cpu", show_default=True, help="Device to compile for.")
@json_option
def eager_precompile(spec: str, device: str) -> None:
    """Precompile the op signatures of SPEC (a JSON file, or JSON text) into the per-op kernel cache.

    SPEC: {"op": "aten::add.Tensor", "args": [{"tensor": [8, 8]}, {"tensor": [8, 8]}], "kwargs": {}}
    or a list of such objects (see docs/eager.md).
    """
    from aotcache.eager import precompile_from_spec
    from aotcache.eager.compile import EagerCompileError

    try:
        results = precompile_from_spec(spec, device=device)
    except (ValueError, TypeError, NotImplementedError) as exc:  # bad spec / arguments / unsupported op
        raise ConfigProblem(f"precompile spec: {exc}") from None
    except EagerCompileError as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise CliError(f"{exc}{cause}") from None
    except OSError as exc:
        raise CliError(f"cannot write the per-op kernel cache: {exc}") from None
    rows = [{"op": f"{result.entry.namespace}::{result.entry.op_name}", "status": result.status,
             "digest": result.entry.digest, "device": result.entry.device, "library": str(result.library_path),
             "seconds": round(result.seconds, 3)} for result in results]
    data = {"results": rows, "compiled": sum(row["status"] == "compiled" for row in rows),
            "existing": sum(row["status"] == "exists" for row in rows)}

    def render(_: Any) -> None:
        output.print_table(f"Precompiled {data['compiled']} kernels ({data['existing']} already cached)",
                           ("op", "status", "digest", "seconds"),
                           [(row["op"], row["status"], row["digest"][:12], f"{row['seconds']:.1f}") for row in rows],
                           numeric=("seconds",))

    output.emit(data, render, as_json=state().as_json)


@eager.command("clear")
@_filters
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when not interactive).")
@json_option
def eager_clear(op: str | None, op_namespace: str | None, device: str | None, yes: bool) -> None:
    """Remove precompiled kernels (index, libraries) of every op, or those selected. Asks first unless --yes."""
    from aotcache.eager import clear

    rows = _list(op, op_namespace, device)
    scope = _scope(op, op_namespace, device)
    if not rows:
        output.emit({"removed": 0}, lambda _: click.echo(f"Nothing to clear ({scope})."), as_json=state().as_json)
        return
    kernels = sum(1 for row in rows if row["digest"] is not None)
    confirm_or_refuse(f"Remove {kernels} precompiled kernels ({scope})?", f"clear {kernels} precompiled kernels",
                      yes=yes)
    try:
        removed = clear(namespace=op_namespace, op=op, device=device)
    except ValueError as exc:
        raise ConfigProblem(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot clear the per-op kernel cache: {exc}") from None
    output.emit({"removed": removed}, lambda _: click.echo(f"Removed {removed} precompiled kernels ({scope})."),
                as_json=state().as_json)
