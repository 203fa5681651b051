"""``aotcache ls``, ``prune`` and ``clear``: list and remove entries of the persistent tiers.

They work on every namespace unless ``--namespace`` is given. Redis is shared by every machine that uses it,
so ``clear`` touches it only when asked (``--tier redis`` or ``--tier all``).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from aotcache import config
from aotcache.cli import output, stores
from aotcache.cli.app import CliError, ConfigProblem, json_option, state

__all__ = ["ls", "prune", "clear"]

_SORT_KEYS = {
    "recent": (lambda info: info.last_access, True),
    "oldest": (lambda info: info.last_access, False),
    "size": (lambda info: info.size, True),
    "created": (lambda info: info.created, True),
    "key": (lambda info: info.key, False),
}


def _open(tier: str, namespaces: tuple[str, ...], *, max_bytes: int | None = None) -> list[stores.TierHandle]:
    """The disk and/or Redis handles named by ``--tier`` and ``--namespace`` (all namespaces when none).

    :raises CliError: ``--tier redis`` without a Redis URL, or Redis unreachable.
    """
    from aotcache.store.interface import CacheError

    selected = namespaces or None
    handles: list[stores.TierHandle] = []
    try:
        if tier in ("disk", "all"):
            if selected is None:
                handles += stores.open_disk_tiers(max_bytes=max_bytes)
            else:  # only namespaces that exist: never create directories while listing or removing
                existing = set(stores.disk_namespaces())
                handles += stores.open_disk_tiers([name for name in selected if name in existing],
                                                  max_bytes=max_bytes)
        if tier in ("redis", "all"):
            if not config.get("redis_url"):
                if tier == "redis":
                    raise CliError("no Redis tier is configured: set AOTCACHE_REDIS_URL or pass --redis-url")
            else:
                handles += stores.open_redis_tiers(selected)
    except CacheError as exc:
        raise CliError(str(exc)) from None
    return handles


def _tier_option(default: str):
    return click.option("--tier", type=click.Choice(["disk", "redis", "all"]), default=default, show_default=True,
                        help="Which persistent tier to work on.")


_namespace_option = click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NAME",
                                 help="Only this namespace (repeatable); default: every namespace.")


def _entry_row(handle: stores.TierHandle, info: Any) -> dict[str, Any]:
    return {"tier": handle.tier, "namespace": handle.namespace, "digest": info.digest, "key": info.key,
            "size": info.size, "created": output.format_timestamp(info.created),
            "last_access": output.format_timestamp(info.last_access),
            "_last_access": info.last_access}


@click.command()
@_tier_option("disk")
@_namespace_option
@click.option("--sort", "sort_by", type=click.Choice(sorted(_SORT_KEYS)), default="recent", show_default=True,
              help="Order of the listing.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Show at most this many entries (0 = all).")
@json_option
def ls(tier: str, namespaces: tuple[str, ...], sort_by: str, limit: int) -> None:
    """List stored entries: key, size, age, last use."""
    from aotcache.store.interface import CacheError

    handles = _open(tier, namespaces)
    try:
        listed = list(stores.iter_entries(handles))
    except CacheError as exc:
        raise CliError(str(exc)) from None
    finally:
        stores.close_all(handles)
    key, descending = _SORT_KEYS[sort_by]
    listed.sort(key=lambda pair: key(pair[1]), reverse=descending)
    total = len(listed)
    total_bytes = sum(info.size for _, info in listed)
    shown = listed[:limit] if limit else listed
    rows = [_entry_row(handle, info) for handle, info in shown]
    data = {"entries": [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
            "total_entries": total, "total_bytes": total_bytes}

    def render(_: Any) -> None:
        if not rows:
            click.echo(f"No entries in the {tier} tier{'s' if tier == 'all' else ''}.")
            return
        table_rows = [(f"{row['tier']}/{row['namespace']}", row["key"], row["digest"][:12],
                       output.format_bytes(row["size"]), output.format_age(row["_last_access"])) for row in rows]
        title = f"{total} entries, {output.format_bytes(total_bytes)}"
        if len(rows) < total:
            title += f" (showing {len(rows)})"
        output.print_table(title, ("tier", "key", "digest", "size", "last used"), table_rows, numeric=("size",))

    output.emit(data, render, as_json=state().as_json)


def _parse_size(text: str) -> int:
    try:
        return config.parse_bytes(text)
    except ValueError as exc:
        raise ConfigProblem(f"--max-bytes {text!r} is not valid: expected {exc}") from None


@click.command()
@click.option("--max-bytes", "max_bytes_text", metavar="SIZE",
              help="Bound to prune to, e.g. 500MB or 2GiB (default: the configured max_bytes).")
@_namespace_option
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
def prune(max_bytes_text: str | None, namespaces: tuple[str, ...], dry_run: bool) -> None:
    """Remove least recently used disk entries until the disk tier is at most --max-bytes.

    The bound covers all the selected namespaces together (files and small-entry rows alike) and, without
    --namespace, the AOTInductor libraries materialized in aoti_libs/ (re-written from their entries when
    needed); the most recently used are kept.
    """
    max_bytes = config.get("max_bytes") if max_bytes_text is None else _parse_size(max_bytes_text)
    if max_bytes <= 0:
        raise CliError("a bound of 0 bytes would remove everything (0 means 'unbounded' in the configuration); "
                       "use `aotcache clear` to empty the cache")
    # max_bytes=0 on the handles: a handle must not also evict on its own (down to 90 % of the configured
    # bound) when it flushes its usage counter; OnDiskCache.prune applies the bound asked for, exactly.
    from aotcache.cli.graph_entries import alias_recency, remove_orphan_aliases

    handles = _open("disk", namespaces, max_bytes=0)
    orphans = 0
    try:
        # fingerprint records go with the entries they name, never before them (and never left behind)
        recency = {handle.namespace: alias_recency(handle.cache, list(handle.cache.entries())) for handle in handles}
        result = stores.prune_disk(handles, max_bytes, dry_run=dry_run, libraries=not namespaces,
                                   recency=recency)
        if not dry_run and result.removed:
            orphans = sum(remove_orphan_aliases(handle.cache) for handle in handles)
    except OSError as exc:
        raise CliError(f"cannot prune the disk tier: {exc}") from None
    finally:
        stores.close_all(handles)
    data = {"max_bytes": result.max_bytes, "dry_run": dry_run, "entries_before": result.entries_before,
            "bytes_before": result.bytes_before, "removed_entries": len(result.removed),
            "removed_bytes": result.removed_bytes, "bytes_after": result.bytes_after,
            "orphan_fingerprint_records_removed": orphans,
            "removed": [{"digest": info.digest, "key": info.key, "size": info.size} for info in result.removed]}

    def render(_: Any) -> None:
        verb = "Would remove" if dry_run else "Removed"
        click.echo(f"{verb} {len(result.removed)} of {result.entries_before} entries "
                   f"({output.format_bytes(data['removed_bytes'])}); disk tier: "
                   f"{output.format_bytes(result.bytes_before)} -> {output.format_bytes(result.bytes_after)} "
                   f"(bound {output.format_bytes(max_bytes)}).")

    output.emit(data, render, as_json=state().as_json)


def _interactive() -> bool:
    stdin = sys.stdin
    return stdin is not None and hasattr(stdin, "isatty") and stdin.isatty()


@click.command()
@_tier_option("disk")
@_namespace_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when not interactive).")
@json_option
def clear(tier: str, namespaces: tuple[str, ...], yes: bool) -> None:
    """Remove every entry of the disk tier (or Redis with --tier redis / all). Asks first unless --yes."""
    from aotcache.store.interface import CacheError

    handles = _open(tier, namespaces)
    try:
        if not handles:
            data = {"removed": 0, "tiers": []}
            output.emit(data, lambda _: click.echo("Nothing to clear."), as_json=state().as_json)
            return
        labels = ", ".join(handle.label for handle in handles)
        if not yes:
            if not _interactive():
                raise CliError(f"refusing to clear {labels} without confirmation: stdin is not interactive; "
                               "pass --yes to clear anyway")
            if not click.confirm(f"Remove every entry of {labels}?", default=False, err=True):
                raise CliError("nothing removed")
        removed = {}
        for handle in handles:
            try:
                removed[handle.label] = handle.cache.clear()
            except (CacheError, OSError) as exc:
                raise CliError(f"cannot clear {handle.label}: {exc}") from None
    finally:
        stores.close_all(handles)
    data = {"removed": sum(removed.values()), "tiers": [{"tier": label, "removed": count}
                                                       for label, count in removed.items()]}

    def render(_: Any) -> None:
        for label, count in removed.items():
            click.echo(f"Cleared {label}: {count} entries removed.")

    output.emit(data, render, as_json=state().as_json)
