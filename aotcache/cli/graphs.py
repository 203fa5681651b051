"""``aotcache graphs``, ``show`` and ``explain``: the compiled-graph cache's entries, one entry, and why a key missed.

``aotcache ls`` lists raw store entries of every namespace (compiled graphs appear there as
``aot/<digest>/<slot>``); ``aotcache graphs`` lists the compiled-graph entries with what their manifests
say (function name, kind, compiler, creation, last use). Listing and ``show`` import no torch (see
:mod:`aotcache.cli.graph_entries`). ``explain`` words the differences with
``aotcache.autograd_cache.key.explain_difference``, which imports torch (about 1.3 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from aotcache.cli import output
from aotcache.cli.app import CliError, ConfigProblem, json_option, state
from aotcache.cli.graph_entries import (
    DEFAULT_NAMESPACE,
    EntrySelectionError,
    GraphEntry,
    differing_parts,
    installed_torch_version,
    list_graph_entries,
    nearest_entry,
    suggest_fix,
    read_last_miss,
    select_entries,
)

__all__ = ["graphs", "show", "explain", "load_entries", "graph_tier_option", "graph_namespace_option",
           "selection_failure", "entry_row"]

graph_namespace_option = click.option(
    "--namespace", "-n", default=DEFAULT_NAMESPACE, show_default=True, metavar="NAME",
    help="Namespace of the compiled-graph cache (AOTAutogradCache(namespace=...)).")


def graph_tier_option(function):
    """``--tier disk|redis|all`` for the compiled-graph commands (default: the local disk tier, like ``ls``)."""
    return click.option("--tier", type=click.Choice(["disk", "redis", "all"]), default="disk", show_default=True,
                        help="Which persistent tier to read.")(function)


def load_entries(namespace: str, tier: str) -> list[GraphEntry]:
    """:func:`list_graph_entries` with store errors turned into one-line CLI errors."""
    from aotcache.store.interface import CacheError

    try:
        return list_graph_entries(namespace, tier)
    except CacheError as exc:
        raise CliError(str(exc)) from None


def selection_failure(exc: EntrySelectionError) -> CliError:
    """The CLI error for a key reference: exit 2 when malformed or ambiguous, 1 when nothing matches."""
    return ConfigProblem(str(exc)) if exc.bad_input else CliError(str(exc))


def _select(entries: Sequence[GraphEntry], ref: str) -> list[GraphEntry]:
    try:
        return select_entries(entries, ref)
    except EntrySelectionError as exc:
        raise selection_failure(exc) from None


def entry_row(entry: GraphEntry) -> dict[str, Any]:
    """The JSON row of one entry in listings (everything but the key parts and runtime metadata)."""
    summary = entry.manifest.get("summary") or {}
    return {"digest": entry.digest, "slot": entry.slot, "ref": entry.ref, "name": entry.name,
            "kind": summary.get("kind"), "source": summary.get("source"), "compiler": entry.compiler,
            "compilers": entry.manifest.get("compilers") or {}, "size": entry.size, "tiers": entry.tiers,
            "created": output.format_timestamp(entry.created),
            "last_used": None if entry.never_used else output.format_timestamp(entry.last_access),
            "compile_seconds": entry.manifest.get("compile_seconds"), "guards": entry.manifest.get("guards"),
            "torch": entry.torch_version}


# ----------------------------------------------------------------------------------------------------
# aotcache graphs
# ----------------------------------------------------------------------------------------------------

_SORT_KEYS = {
    "recent": (lambda entry: entry.last_access, True),
    "oldest": (lambda entry: entry.last_access, False),
    "created": (lambda entry: entry.created, True),
    "size": (lambda entry: entry.size, True),
    "name": (lambda entry: (entry.name, entry.digest, entry.slot), False),
    "key": (lambda entry: (entry.digest, entry.slot), False),
}


@click.command()
@graph_tier_option
@graph_namespace_option
@click.option("--sort", "sort_by", type=click.Choice(sorted(_SORT_KEYS)), default="recent", show_default=True,
              help="Order of the listing.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Show at most this many entries (0 = all).")
@json_option
def graphs(tier: str, namespace: str, sort_by: str, limit: int) -> None:
    """List compiled-graph entries: key, function name, kind, compiler, size, created, last used."""
    entries = load_entries(namespace, tier)
    key, descending = _SORT_KEYS[sort_by]
    entries.sort(key=key, reverse=descending)
    shown = entries[:limit] if limit else entries
    here = installed_torch_version()
    total_bytes = sum(entry.size for entry in entries)
    data = {"namespace": namespace, "entries": [entry_row(entry) for entry in shown],
            "total_entries": len(entries), "total_bytes": total_bytes}

    def render(_: Any) -> None:
        if not shown:
            click.echo(f"No compiled-graph entries in namespace {namespace!r} ({tier} tier"
                       f"{'s' if tier == 'all' else ''}).")
            return
        rows = []
        for entry in shown:
            torch_note = "" if here is None or entry.torch_version == here else f" (torch {entry.torch_version})"
            rows.append((f"{entry.digest[:12]}/{entry.slot}", entry.name + torch_note,
                         (entry.manifest.get("summary") or {}).get("kind") or "-", entry.compiler,
                         output.format_bytes(entry.size), output.format_age(entry.created),
                         "never" if entry.never_used else output.format_age(entry.last_access)))
        title = f"{len(entries)} compiled-graph entries, {output.format_bytes(total_bytes)} (namespace {namespace})"
        if len(shown) < len(entries):
            title += f" (showing {len(shown)})"
        output.print_table(title, ("key", "name", "kind", "compiler", "size", "created", "last used"), rows,
                           numeric=("size",))

    output.emit(data, render, as_json=state().as_json)


# ----------------------------------------------------------------------------------------------------
# aotcache show KEY
# ----------------------------------------------------------------------------------------------------


def _tensor_text(item: dict[str, Any]) -> str:
    shape = ",".join(map(str, item.get("shape", [])))
    text = f"{item.get('dtype', '?')}[{shape}]"
    if item.get("device") not in (None, "cpu"):
        text += f"@{item['device']}"
    if item.get("requires_grad"):
        text += " grad"
    return text


def summarize_part(name: str, detail: Any) -> str:
    """A short human form of one key part's recorded detail."""
    if detail is None:
        return "(detail not recorded; digest only)"
    if name == "inputs" and isinstance(detail, list):
        items = [_tensor_text(item) if isinstance(item, dict) and item.get("kind") == "tensor"
                 else output.short_json(item, 40) for item in detail]
        return ", ".join(items) if items else "(none)"
    if name == "graph" and isinstance(detail, dict):
        ops = detail.get("ops") or {}
        return f"{detail.get('nodes')} nodes, {len(ops)} distinct ops"
    if name == "custom_code" and isinstance(detail, dict):
        return ", ".join(sorted(detail)) or "(none)"
    if name == "system" and isinstance(detail, dict):
        return ", ".join(f"{key} {value}" for key, value in sorted(detail.items()) if key != "aotcache_source")
    return output.short_json(detail, 100)


def _show_data(entry: GraphEntry) -> dict[str, Any]:
    return {**entry_row(entry), "manifest": entry.manifest}


def _render_entry(entry: GraphEntry) -> None:
    manifest = entry.manifest
    summary = manifest.get("summary") or {}
    versions = manifest.get("versions") or {}
    facts = [
        ("key digest", entry.digest), ("slot", entry.slot), ("name", entry.name),
        ("kind", summary.get("kind") or "-"), ("captured by", summary.get("source") or "-"),
        ("tiers", ", ".join(entry.tiers)), ("size", output.format_bytes(entry.size)),
        ("created", f"{output.format_timestamp(entry.created)} ({output.format_age(entry.created)})"),
        ("last used", "never" if entry.never_used else output.format_age(entry.last_access)),
        ("compile time", f"{float(manifest.get('compile_seconds') or 0.0):.3f} s"),
        ("guards", manifest.get("guards") or "none (valid for every input of the keyed metadata)"),
        ("built with", ", ".join(f"{name} {value}" for name, value in sorted(versions.items())
                                 if name != "torch_git") or "-"),
    ]
    output.print_table(f"Compiled-graph entry {entry.digest[:12]}/{entry.slot}", ("field", "value"), facts)
    parts = (manifest.get("key") or {}).get("parts") or {}
    part_rows = [(name, str(body.get("digest", ""))[:12], summarize_part(name, body.get("detail")))
                 for name, body in sorted(parts.items()) if isinstance(body, dict)]
    output.print_table("Key parts", ("part", "digest", "detail"), part_rows)
    ops = summary.get("ops") or {}
    if ops:
        graph_title = f"Graph: {summary.get('nodes', '?')} nodes, {summary.get('inputs', '?')} inputs"
        op_rows = sorted(ops.items(), key=lambda item: (-item[1], item[0]))
        output.print_table(graph_title, ("op", "count"), op_rows, numeric=("count",))
    compilers = manifest.get("compilers") or {}
    blobs = {str(blob[0]): blob for blob in manifest.get("blobs") or [] if isinstance(blob, list) and len(blob) == 3}
    artifact_rows = [(role, compilers.get(role, "-"), output.format_bytes(size),
                      str(blobs.get(role, [None, None, "-"])[2])[:16])
                     for role, size in (manifest.get("artifact_bytes") or {}).items()]
    output.print_table("Artifacts", ("role", "compiler", "size", "sha256"), artifact_rows, numeric=("size",))


@click.command()
@click.argument("key")
@graph_tier_option
@graph_namespace_option
@json_option
def show(key: str, tier: str, namespace: str) -> None:
    """Show one compiled-graph entry: key parts, graph summary, artifacts. KEY: a unique digest prefix[/SLOT]."""
    selected = _select(load_entries(namespace, tier), key)
    data = {"entries": [_show_data(entry) for entry in selected]}

    def render(_: Any) -> None:
        for entry in selected:
            _render_entry(entry)

    output.emit(data, render, as_json=state().as_json)


# ----------------------------------------------------------------------------------------------------
# aotcache explain [KEY1 [KEY2]]
# ----------------------------------------------------------------------------------------------------


def _explain_lines(key_a: dict[str, Any], key_b: dict[str, Any]) -> list[str]:
    from aotcache.autograd_cache.key import explain_difference  # imports torch: only here

    try:
        return explain_difference(key_a, key_b)
    except (TypeError, ValueError) as exc:
        raise CliError(f"cannot compare the key records: {exc}") from None


def _key_of(entry: GraphEntry) -> dict[str, Any]:
    key = entry.manifest.get("key")
    if not isinstance(key, dict):
        raise CliError(f"entry {entry.ref} records no key parts (written by another aotcache version?)")
    return key


def _explain_last_miss(tier: str) -> dict[str, Any]:
    try:
        record = read_last_miss()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    missed = record["key"]
    namespace = record.get("namespace") if isinstance(record.get("namespace"), str) else DEFAULT_NAMESPACE
    name = record.get("name") if isinstance(record.get("name"), str) else None  # None: an older record
    entries = load_entries(namespace, tier)  # the namespace of the cache that missed
    nearest = nearest_entry(missed, entries, name=name)
    data: dict[str, Any] = {"mode": "last_miss", "missed": missed.get("digest"), "name": name,
                            "missed_at": output.format_timestamp(record.get("time")),
                            "namespace": record.get("namespace"), "saved_since": any(
                                entry.digest == missed.get("digest") for entry in entries), "suggestion": None}
    if nearest is None:
        note = (f"there is no earlier entry for {name}: this was its first compile in this cache"
                if name is not None else "the cache holds no other entry to compare with")
        data.update(nearest=None, differing_parts=[], differences=[], note=note)
        return data
    data.update(nearest=nearest.ref, nearest_name=nearest.name,
                differing_parts=differing_parts(_key_of(nearest), missed),
                differences=_explain_lines(_key_of(nearest), missed),
                suggestion=suggest_fix(_key_of(nearest), missed))
    return data


def _explain_pair(entry_a: GraphEntry, entry_b: GraphEntry) -> dict[str, Any]:
    key_a, key_b = _key_of(entry_a), _key_of(entry_b)
    differences = _explain_lines(key_a, key_b)
    data: dict[str, Any] = {"mode": "pair", "first": entry_a.ref, "second": entry_b.ref,
                            "differing_parts": differing_parts(key_a, key_b), "differences": differences,
                            "suggestion": suggest_fix(key_a, key_b) if entry_a.name == entry_b.name else None}
    if entry_a.digest == entry_b.digest:
        guards_a, guards_b = entry_a.manifest.get("guards"), entry_b.manifest.get("guards")
        data["differences"] = ([] if guards_a == guards_b else
                               [f"same key, different guards: {guards_a or 'none'} vs {guards_b or 'none'}"])
    return data


def _one_entry(entries: list[GraphEntry], ref: str) -> GraphEntry:
    selected = _select(entries, ref)
    if len(selected) > 1:
        raise ConfigProblem(f"{ref!r} names {len(selected)} slots of one key; add /SLOT, e.g. {selected[0].ref}")
    return selected[0]


@click.command()
@click.argument("keys", nargs=-1, metavar="[KEY1 [KEY2]]")
@graph_tier_option
@graph_namespace_option
@json_option
def explain(keys: tuple[str, ...], tier: str, namespace: str) -> None:
    """Explain a miss: which named key parts differ, in words.

    No KEY: the last miss recorded by any process under this cache dir, against the nearest stored entry of
    the namespace that missed.
    One KEY: that entry against the nearest other entry. Two KEYs: the two entries against each other.
    """
    if len(keys) > 2:
        raise ConfigProblem(f"explain takes at most two keys, got {len(keys)}")
    if not keys:
        output.emit(_explain_last_miss(tier), _render_explanation, as_json=state().as_json)
        return
    entries = load_entries(namespace, tier)
    if len(keys) == 1:
        entry = _one_entry(entries, keys[0])
        name = entry.name if entry.name != "-" else None
        nearest = nearest_entry(_key_of(entry), entries, name=name)
        if nearest is None:
            data = {"mode": "nearest", "first": entry.ref, "second": None, "differing_parts": [],
                    "differences": [], "suggestion": None,
                    "note": (f"there is no other entry for {name}" if name is not None
                             else "the cache holds no other entry to compare with")}
        else:
            data = {**_explain_pair(nearest, entry), "mode": "nearest"}
    else:
        data = _explain_pair(_one_entry(entries, keys[0]), _one_entry(entries, keys[1]))
    output.emit(data, _render_explanation, as_json=state().as_json)


def _render_explanation(data: dict[str, Any]) -> None:
    if data["mode"] == "last_miss":
        when = data.get("missed_at") or "?"
        of = f" of {data['name']}" if data.get("name") else ""
        click.echo(f"Last miss{of}: key {str(data['missed'])[:16]} at {when} (namespace {data.get('namespace')})"
                   + (", compiled and saved since" if data.get("saved_since") else ""))
        if data.get("nearest") is None:
            click.echo(f"Nothing to compare: {data['note']}.")
            return
        click.echo(f"Nearest stored entry: {_short_ref(data['nearest'])} ({data.get('nearest_name')})")
    else:
        if data.get("second") is None:
            click.echo(f"Nothing to compare {_short_ref(data['first'])} with: {data['note']}.")
            return
        click.echo(f"Comparing {_short_ref(data['first'])} with {_short_ref(data['second'])}")
    if not data["differences"]:
        click.echo("No difference: the keys are equal.")
        return
    if data["differing_parts"]:
        click.echo(f"Differing key parts: {', '.join(data['differing_parts'])}")
    for line in data["differences"]:
        click.echo(f"  - {line}")
    if data.get("suggestion"):
        click.echo(f"Suggestion: {data['suggestion']}.")



def _short_ref(ref: str) -> str:
    digest, _, slot = ref.partition("/")
    return f"{digest[:12]}/{slot}"
