"""``aotcache export PATH`` / ``aotcache import PATH``: a portable bundle of compiled-graph entries.

A bundle is an uncompressed tar file (entries carry their own compression where it pays)::

    aotcache-bundle.json          the index: format, versions, and per entry its member file, key digest,
                                  slot, size and sha256, plus (with AOTCACHE_SECRET) an HMAC signature of
                                  the index
    entries/<digest>-<slot>.aote  one entry container per file (aotcache/autograd_cache/entry.py)
    aliases/<fingerprint>.json    the fingerprint alias records naming the exported entries' keys (the warm
                                  start's first lookup, aotcache/autograd_cache/fingerprint_cache.py), listed
                                  under "aliases" in the index with their size and sha256;
                                  ``<fingerprint>-<n>.json`` and ``"slot": n`` for a fingerprint's further
                                  slots (NOTE [Several graphs under one fingerprint])

Import never extracts files: members are read into memory and checked -- present, the recorded size and
sha256, a valid container whose blobs match their own sha256, a key record that produces its digest,
guards in the grammar, runtime metadata of this schema -- before anything is stored. A member that fails
any check is rejected with its reason; the others are imported. Entries built by another torch or Python
are imported (they live under other keys: this process never looks them up, a machine with that torch
does) and reported. Existing entries are never overwritten: an entry whose key already holds one with the
same guards is skipped.

NOTE [bundles are code]: a compiled entry holds code that runs when loaded (Python for ``nop``/``inductor``,
a shared library for ``aoti``), like the cache itself. Checksums catch corruption and truncation, not an
attacker who rewrites the index too: import bundles you trust, or set ``AOTCACHE_SECRET`` on both sides
(the index is then signed, and import refuses unsigned or wrongly signed bundles).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from aotcache import config
from aotcache.cli import output
from aotcache.cli.app import CliError, ConfigProblem, json_option, state
from aotcache.cli.graph_entries import (
    EntrySelectionError,
    GraphEntry,
    ManifestError,
    parse_manifest,
    read_alias_records,
    read_graph_entry,
    select_entries,
)
from aotcache.cli.graphs import graph_namespace_option, graph_tier_option, load_entries, selection_failure

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "INDEX_NAME", "BundleError", "BundleMember", "write_bundle",
           "read_bundle", "export_cmd", "import_cmd"]

BUNDLE_FORMAT = "aotcache-graph-bundle"
BUNDLE_VERSION = 1
INDEX_NAME = "aotcache-bundle.json"
_MAX_INDEX_BYTES = 64 * 1024 * 1024


class BundleError(ValueError):
    """A file that is not a readable bundle as a whole (not a tar, no index, bad signature)."""


@dataclass
class BundleMember:
    """One entry of a bundle as read back: its index record and bytes, or why it cannot be used."""

    record: dict[str, Any]
    blob: bytes | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        digest = str(self.record.get("digest", "?"))
        return f"{digest[:12]}/{self.record.get('slot', '?')}"


@dataclass
class ImportReport:
    """What ``import`` did, per entry."""

    imported: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    other_versions: list[dict[str, Any]] = field(default_factory=list)  # imported, built by another torch/Python
    present: set[str] = field(default_factory=set)  # key digests imported or already there (for the aliases)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _signature(index: dict[str, Any], secret: str) -> str:
    unsigned = {name: value for name, value in index.items() if name != "signature"}
    return hmac.new(secret.encode("utf-8"), _canonical(unsigned), hashlib.sha256).hexdigest()


def _add_member(archive: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_bundle(path: Path, namespace: str, members: list[tuple[GraphEntry, bytes]],
                 aliases: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Write ``members`` (entry, container bytes) and the alias records ``aliases`` (alias name -> record
    bytes; the name is ``<fingerprint>`` for slot 0, ``<fingerprint>/<slot>`` for the others) as a bundle at
    ``path`` (atomically); returns the index.

    :raises OSError: the file cannot be written.
    """
    import aotcache

    records = []
    for entry, blob in members:
        records.append({
            "file": f"entries/{entry.digest}-{entry.slot}.aote", "digest": entry.digest, "slot": entry.slot,
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "name": entry.name,
            "compilers": entry.manifest.get("compilers") or {}, "guards": entry.manifest.get("guards"),
            "versions": entry.manifest.get("versions") or {}})
    index: dict[str, Any] = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "namespace": namespace,
                             "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "aotcache": aotcache.__version__, "entries": records}
    alias_records, alias_blobs = [], []
    for name, blob in sorted((aliases or {}).items()):
        fingerprint, _, slot = name.partition("/")
        record = {"file": f"aliases/{fingerprint}{'-' + slot if slot else ''}.json", "fingerprint": fingerprint,
                  "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        if slot:
            record["slot"] = int(slot)
        alias_records.append(record)
        alias_blobs.append(blob)
    if alias_records:
        index["aliases"] = alias_records
    secret = config.get("secret")
    if secret:
        index["signature"] = _signature(index, secret)
    now = _dt.datetime.now().timestamp()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_member(tar, INDEX_NAME, json.dumps(index, indent=1, sort_keys=True).encode("utf-8"), now)
            for record, (_, blob) in zip(records, members):
                _add_member(tar, record["file"], blob, now)
            for record, blob in zip(alias_records, alias_blobs):
                _add_member(tar, record["file"], blob, now)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return index


_ENTRY_FIELDS = (("file", str), ("digest", str), ("slot", int), ("bytes", int), ("sha256", str))
_ALIAS_FIELDS = (("file", str), ("fingerprint", str), ("bytes", int), ("sha256", str))


def _check_record(record: Any, fields: tuple[tuple[str, type], ...] = _ENTRY_FIELDS) -> str | None:
    if not isinstance(record, dict):
        return "index record is not an object"
    for name, kind in fields:
        if not isinstance(record.get(name), kind):
            return f"index record has no valid {name!r}"
    return None


def read_bundle(path: Path) -> tuple[dict[str, Any], list[BundleMember], list[BundleMember]]:
    """The index, every entry member and every alias member of the bundle at ``path``, each checked against
    its index record (present, size, sha256) -- deeper checks are the importer's.

    :raises BundleError: unreadable file, not a tar, no or malformed index, signature refused.
    """
    try:
        archive = tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path} is not a readable aotcache bundle (not a tar file: {exc})") from None
    with archive:
        infos: dict[str, tarfile.TarInfo] = {}
        truncated = None
        try:
            for info in archive:  # lazily: the members before a truncation are kept
                if info.isfile():
                    infos[info.name] = info
        except (tarfile.TarError, OSError, EOFError) as exc:
            truncated = str(exc) or type(exc).__name__
        index = _read_index(archive, infos, path, truncated)
        members = [_read_member(archive, infos, record, truncated) for record in index["entries"]]
        aliases = index.get("aliases")
        alias_members = ([_read_member(archive, infos, record, truncated, _ALIAS_FIELDS) for record in aliases]
                         if isinstance(aliases, list) else [])
    return index, members, alias_members


def _read_member(archive: tarfile.TarFile, infos: dict[str, tarfile.TarInfo], record: Any,
                 truncated: str | None, fields: tuple[tuple[str, type], ...] = _ENTRY_FIELDS) -> BundleMember:
    """One member named by an index record, checked against it (present, size, sha256)."""
    problem = _check_record(record, fields)
    member = BundleMember(record if isinstance(record, dict) else {"record": record})
    if problem:
        member.problem = problem
        return member
    info = infos.get(record["file"])
    if info is None:
        member.problem = (f"member {record['file']} is missing (truncated bundle?)" if truncated is None
                          else f"member {record['file']} is missing: the bundle is truncated ({truncated})")
        return member
    if info.size != record["bytes"]:
        member.problem = f"member {record['file']} is {info.size} bytes, the index says {record['bytes']}"
        return member
    try:
        handle = archive.extractfile(info)
        data = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        member.problem = f"member {record['file']} cannot be read (truncated bundle?): {exc}"
        return member
    if len(data) != record["bytes"]:
        member.problem = f"member {record['file']} is cut short ({len(data)} of {record['bytes']} bytes)"
    elif hashlib.sha256(data).hexdigest() != record["sha256"]:
        member.problem = f"member {record['file']} does not match its sha256 (corrupt or tampered)"
    else:
        member.blob = data
    return member


def _read_index(archive: tarfile.TarFile, infos: dict[str, tarfile.TarInfo], path: Path,
                truncated: str | None) -> dict[str, Any]:
    info = infos.get(INDEX_NAME)
    if info is None:
        detail = f"the tar is truncated ({truncated})" if truncated else f"it has no {INDEX_NAME}"
        raise BundleError(f"{path} is not a readable aotcache bundle: {detail}")
    if info.size > _MAX_INDEX_BYTES:
        raise BundleError(f"{path}: the bundle index is implausibly large ({info.size} bytes)")
    try:
        handle = archive.extractfile(info)
        index = json.loads(handle.read() if handle is not None else b"")
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: the bundle index is unreadable ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT or not isinstance(index.get("entries"), list):
        raise BundleError(f"{path}: {INDEX_NAME} is not an aotcache bundle index")
    if index.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {index.get('version')!r}; this aotcache reads {BUNDLE_VERSION} "
                          "(export it again with this aotcache)")
    secret = config.get("secret")
    if secret:
        signature = index.get("signature")
        if not isinstance(signature, str):
            raise BundleError(f"{path}: the bundle is not signed, and AOTCACHE_SECRET is set: only signed bundles "
                              "are imported (export it with the same AOTCACHE_SECRET)")
        if not hmac.compare_digest(signature, _signature(index, secret)):
            raise BundleError(f"{path}: the bundle's signature does not match AOTCACHE_SECRET (tampered, or "
                              "signed with another secret)")
    return index


# ----------------------------------------------------------------------------------------------------
# aotcache export
# ----------------------------------------------------------------------------------------------------


def _selected(entries: list[GraphEntry], prefixes: tuple[str, ...]) -> list[GraphEntry]:
    if not prefixes:
        return entries
    chosen: dict[str, GraphEntry] = {}
    for prefix in prefixes:
        try:
            for entry in select_entries(entries, prefix, unique_key=False):
                chosen[entry.ref] = entry
        except EntrySelectionError as exc:
            raise selection_failure(exc) from None
    return [entry for entry in entries if entry.ref in chosen]


@click.command("export")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "prefixes", multiple=True, metavar="PREFIX",
              help="Only entries whose key digest starts with PREFIX (repeatable; PREFIX/SLOT for one slot). "
                   "Default: every entry.")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@graph_tier_option
@graph_namespace_option
@json_option
def export_cmd(path: Path, prefixes: tuple[str, ...], force: bool, tier: str, namespace: str) -> None:
    """Write compiled-graph entries to a portable bundle at PATH (a tar file with a checksummed index)."""
    from aotcache.store.interface import CacheError

    if path.exists() and not force:
        raise CliError(f"{path} exists; pass --force to replace it")
    selected = _selected(load_entries(namespace, tier), prefixes)
    if not selected:
        raise CliError(f"no compiled-graph entries to export in namespace {namespace!r} ({tier} tier)")
    members = []
    try:
        for entry in selected:
            blob = read_graph_entry(namespace, tier, entry.digest, entry.slot)
            if blob is not None:  # None: evicted since it was listed
                members.append((entry, blob))
    except CacheError as exc:
        raise CliError(str(exc)) from None
    try:
        aliases = read_alias_records(namespace, tier, {entry.digest for entry, _ in members})
    except CacheError as exc:
        raise CliError(str(exc)) from None
    try:
        index = write_bundle(path, namespace, members, aliases)
    except OSError as exc:
        raise CliError(f"cannot write bundle {path}: {exc}") from None
    data = {"path": str(path), "entries": len(members), "aliases": len(aliases), "bytes": path.stat().st_size,
            "signed": "signature" in index, "exported": [record["digest"] + f"/{record['slot']}"
                                                       for record in index["entries"]]}

    def render(_: Any) -> None:
        signed = "signed with AOTCACHE_SECRET" if data["signed"] else "unsigned"
        click.echo(f"Exported {len(members)} compiled-graph entries and {len(aliases)} fingerprint records to "
                   f"{path} ({output.format_bytes(data['bytes'])}, {signed}).")

    output.emit(data, render, as_json=state().as_json)


# ----------------------------------------------------------------------------------------------------
# aotcache import
# ----------------------------------------------------------------------------------------------------


def _import_cache(namespace: str):
    """An AOTAutogradCache over the configured persistent tiers (no memory tier, no stats journal)."""
    from aotcache.autograd_cache.cache import AOTAutogradCache
    from aotcache.store.factory import open_tiers, resolve_tier_names
    from aotcache.store.interface import CacheError

    try:
        names = [name for name in resolve_tier_names() if name != "memory"]
        if not names or not config.get("enabled"):
            raise CliError("no persistent tier to import into: the configured tiers are "
                           f"{','.join(resolve_tier_names())} (AOTCACHE_TIERS) and enabled={config.get('enabled')}")
        tiers = open_tiers(names, namespace=namespace)
    except CacheError as exc:
        raise ConfigProblem(str(exc)) from None
    return AOTAutogradCache(tiers, namespace=namespace, journal=False)


def _existing_guards(cache: Any, digest: str) -> list[Any]:
    """Guards of the entries already stored under ``digest`` (one per occupied slot)."""
    from aotcache.autograd_cache.cache import entry_store_key

    found = []
    for slot in range(cache.max_slots):
        lookup = cache.tiers.lookup(entry_store_key(digest, slot))
        if not lookup.hit:
            break
        try:
            found.append(parse_manifest(lookup.value).get("guards"))
        except (ManifestError, TypeError):
            continue
    return found


def _deep_check(blob: bytes, record: dict[str, Any]) -> tuple[Any, bool]:
    """The checked entry and whether it was built by this torch / Python.

    :raises ValueError: (EntryError, GuardExpressionError, ...) naming what is wrong.
    """
    from aotcache.aot.metadata import RuntimeMetadata
    from aotcache.autograd_cache.entry import current_versions, unpack_entry
    from aotcache.autograd_cache.guards import validate_guards_expression
    from aotcache.autograd_cache.key import CacheKey

    entry = unpack_entry(blob, check_versions=False)
    if entry.digest != record["digest"]:
        raise ValueError(f"the entry belongs to key {entry.digest[:16]}, the index says {record['digest'][:16]}")
    if CacheKey.from_json(entry.key).digest != entry.digest:
        raise ValueError("the recorded key parts do not produce the recorded digest")
    if entry.guards is not None:
        validate_guards_expression(entry.guards)
    RuntimeMetadata.from_json(entry.metadata)
    here = current_versions()
    same = all(entry.versions.get(name) == here[name] for name in ("torch", "torch_git", "python"))
    return entry, same


def _store(cache: Any, entry: Any, blob: bytes, same_versions: bool) -> str | None:
    """Store ``blob`` in the first free slot of its key; the store key, or None when no tier took it."""
    if same_versions:
        return cache.import_entry(blob)
    # NOTE [importing other torch versions]: AOTAutogradCache.import_entry refuses entries of another torch
    # (its loader would). Such an entry lives under another key (versions are a key part): it is stored as is
    # for the machines that have that torch, in the first free slot, never over an existing entry.
    from aotcache.autograd_cache.cache import entry_store_key

    for slot in range(cache.max_slots):
        key = entry_store_key(entry.digest, slot)
        if cache.tiers.lookup(key).hit:
            continue
        if cache.tiers.insert(key, blob):
            return key
    return None


def import_aliases(cache: Any, alias_members: list[BundleMember], present: set[str]) -> tuple[int, list[dict]]:
    """Store the bundle's fingerprint alias records whose key has an entry in the cache now (``present``
    digests), never over an existing record; the number stored and the rejected ones with their reason."""
    from aotcache.autograd_cache.fingerprint_cache import ALIAS_PREFIX, parse_alias_record, parse_alias_store_key

    stored, rejected = 0, []
    for member in alias_members:
        fingerprint = str(member.record.get("fingerprint", "?"))
        if member.problem is not None or member.blob is None:
            rejected.append({"fingerprint": fingerprint, "reason": member.problem or "no data"})
            continue
        slot = member.record.get("slot", 0)  # NOTE [Several graphs under one fingerprint]
        store_key = ALIAS_PREFIX + fingerprint + (f"/{slot}" if slot else "")
        try:
            if isinstance(slot, bool) or not isinstance(slot, int) or parse_alias_store_key(store_key) != (
                    fingerprint, slot):
                raise ValueError("the fingerprint is not a hex digest, or the slot is out of range")
            key = parse_alias_record(member.blob, fingerprint)
        except ValueError as exc:
            rejected.append({"fingerprint": fingerprint, "reason": str(exc)})
            continue
        if key.digest not in present:
            continue  # its entry was rejected: an alias to nothing would only cost a lookup
        stored += bool(cache.tiers.insert(store_key, member.blob))
    return stored, rejected


def import_members(cache: Any, members: list[BundleMember]) -> ImportReport:
    """Check and store every member; never overwrites (see the module docstring)."""
    report = ImportReport()
    for member in members:
        row = {"entry": member.label, "name": member.record.get("name")}
        if member.problem is not None or member.blob is None:
            report.rejected.append({**row, "reason": member.problem or "no data"})
            continue
        try:
            entry, same_versions = _deep_check(member.blob, member.record)
        except (ValueError, TypeError, KeyError) as exc:
            report.rejected.append({**row, "reason": f"not a valid entry: {exc}"})
            continue
        if entry.guards in _existing_guards(cache, entry.digest):
            report.skipped.append({**row, "reason": "already in the cache"})
            report.present.add(entry.digest)
            continue
        try:
            stored = _store(cache, entry, member.blob, same_versions)
        except (ValueError, TypeError) as exc:
            report.rejected.append({**row, "reason": f"not a valid entry: {exc}"})
            continue
        if stored is None:
            report.rejected.append({**row, "reason": "not stored: every slot of its key is taken, or no tier "
                                                     "accepted the write (see warnings)"})
            continue
        report.imported.append({**row, "store_key": stored})
        report.present.add(entry.digest)
        if not same_versions:
            versions = entry.versions
            report.other_versions.append({**row, "torch": versions.get("torch"), "python": versions.get("python")})
    return report


@click.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@graph_namespace_option
@json_option
def import_cmd(path: Path, namespace: str) -> None:
    """Import the entries of a bundle written by `aotcache export` into the configured persistent tiers.

    Every member is checked first; bad ones are rejected with their reason (exit status 1), existing entries
    are never overwritten (skipped), entries of another torch are imported and reported.
    """
    try:
        index, members, alias_members = read_bundle(path)
    except BundleError as exc:
        raise CliError(str(exc)) from None
    cache = _import_cache(namespace)
    try:
        report = import_members(cache, members)
        aliases_stored, aliases_rejected = import_aliases(cache, alias_members, report.present)
    finally:
        cache.tiers.close()
    data = {"path": str(path), "bundle_namespace": index.get("namespace"), "namespace": namespace,
            "imported": len(report.imported), "skipped": len(report.skipped), "rejected": len(report.rejected),
            "other_versions": len(report.other_versions), "aliases": aliases_stored,
            "aliases_rejected": aliases_rejected, "entries": {
                "imported": report.imported, "skipped": report.skipped, "rejected": report.rejected,
                "other_versions": report.other_versions}}

    def render(_: Any) -> None:
        click.echo(f"Imported {data['imported']}, skipped {data['skipped']} (already present), rejected "
                   f"{data['rejected']} of {len(members)} entries from {path}.")
        if alias_members:
            click.echo(f"Fingerprint records: {aliases_stored} imported (the first run starts warm without "
                       f"tracing), {len(aliases_rejected)} rejected.")
        for row in report.rejected:
            click.echo(f"  rejected {row['entry']}: {row['reason']}")
        for row in aliases_rejected:
            click.echo(f"  rejected fingerprint record {row['fingerprint'][:12]}: {row['reason']}")
        for row in report.other_versions:
            click.echo(f"  note: {row['entry']} ({row['name']}) was built with torch {row['torch']} / "
                       f"{row['python']}; it is used only where that torch runs")

    output.emit(data, render, as_json=state().as_json)
    if report.rejected:
        raise CliError(f"{len(report.rejected)} of {len(members)} bundle entries rejected (see above)")
