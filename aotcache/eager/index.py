"""The persistent per-op index of precompiled kernels: ``<cache dir>/aoti_eager/<namespace>/<device>/<op>.json``.

Layout of one device folder::

    add.Tensor.json              the index: a JSON list of entries {"meta_info", "kernel_path", "digest", ...}
    add.Tensor.lock              the op's lock file (filelock); every read and write of the index holds it
    lib/add.Tensor/<digest>.so   one AOTInductor library per entry
    lib/add.Tensor/<digest>.json its sidecar: the entry itself, so that a lost index can be rebuilt

NOTE [index writes]: the index is only ever written whole, to a temporary file in the same folder that then
replaces it (``os.replace``), while holding the op's lock. A crash leaves the old index or the new one, never
a truncated file; a reader that cannot take the lock (read-only cache) still sees a complete file. A corrupt
index (hand-edited, disk fault) is logged and rebuilt from the sidecars of the libraries present.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from aotcache import config
from aotcache.eager.meta import canonical_json, current_default_dtype, matching_meta
from aotcache.logs import handle_fault, logger

__all__ = [
    "KernelEntry",
    "IndexStatus",
    "IndexSnapshot",
    "IndexCorruptError",
    "OpIndex",
    "eager_root",
    "entry_digest",
    "iter_op_indexes",
]

INDEX_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
LIBRARY_SUFFIX = ".so"
SIDECAR_SUFFIX = ".json"


class IndexCorruptError(ValueError):
    """An index file or sidecar that is not what this module writes (bad JSON, wrong shape, missing field)."""


def eager_root(cache_dir: Path | str | None = None) -> Path:
    """``<cache dir>/aoti_eager``: the root of the per-op kernel cache (``cache_dir`` option by default)."""
    return Path(cache_dir if cache_dir is not None else config.get("cache_dir")) / "aoti_eager"


def entry_digest(namespace: str, op_name: str, device: str, meta_info: list[dict[str, Any]],
                 versions: dict[str, Any], default_dtype: str | None = None) -> str:
    """Stable name of an entry: sha256 over the op, the matched metadata, the default dtype it was built under
    and every recorded version."""
    payload = canonical_json({"namespace": namespace, "op": op_name, "device": device,
                              "meta_info": matching_meta(meta_info), "versions": versions,
                              "default_dtype": default_dtype})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class KernelEntry:
    """One precompiled kernel of an op overload: the call metadata it was built for, where it lives, versions."""

    namespace: str
    op_name: str  # "add.Tensor"
    device: str
    meta_info: list[dict[str, Any]]  # persisted (JSON) form, see aotcache.eager.meta
    kernel_path: str  # relative to the device folder, posix separators
    digest: str
    versions: dict[str, Any]
    num_outputs: int
    created: float = field(default=0.0, compare=False)
    # torch.get_default_dtype() while it was built ("torch.float32"); None in entries of format 1, which did not
    # record it (NOTE [Default dtype of a kernel] in aotcache/eager/meta.py).
    default_dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in the index list (and in its sidecar)."""
        return {"meta_info": self.meta_info, "kernel_path": self.kernel_path, "digest": self.digest,
                "versions": self.versions, "num_outputs": self.num_outputs, "created": self.created,
                "default_dtype": self.default_dtype}

    @classmethod
    def from_json(cls, item: Any, *, namespace: str, op_name: str, device: str) -> KernelEntry:
        """Parse one index item.

        :raises IndexCorruptError: not an object, or a field missing / of the wrong type.
        """
        if not isinstance(item, dict):
            raise IndexCorruptError(f"index item is a {type(item).__name__}, not an object")
        try:
            meta_info, kernel_path = item["meta_info"], item["kernel_path"]
            digest, versions, num_outputs = item["digest"], item["versions"], item["num_outputs"]
        except KeyError as exc:
            raise IndexCorruptError(f"index item lacks field {exc}") from None
        if (not isinstance(meta_info, list) or not isinstance(kernel_path, str) or not isinstance(digest, str)
                or not isinstance(versions, dict) or not isinstance(num_outputs, int)):
            raise IndexCorruptError("index item has a field of the wrong type")
        if Path(kernel_path).is_absolute() or ".." in Path(kernel_path).parts:
            raise IndexCorruptError(f"kernel_path {kernel_path!r} must be relative and inside the cache folder")
        default_dtype = item.get("default_dtype")
        if default_dtype is not None and not isinstance(default_dtype, str):
            raise IndexCorruptError("index item has a field of the wrong type")
        return cls(namespace, op_name, device, meta_info, kernel_path, digest, versions, num_outputs,
                   float(item.get("created", 0.0)), default_dtype)


class IndexStatus(enum.Enum):
    ABSENT = "absent"  # no index file: nothing precompiled for this op
    OK = "ok"
    REBUILT = "rebuilt"  # the index was corrupt and has been rebuilt from the sidecars


@dataclass(frozen=True)
class IndexSnapshot:
    """What a read of an op's index found: its entries, and whether the index had to be rebuilt (and why)."""

    status: IndexStatus
    entries: tuple[KernelEntry, ...] = ()
    problem: str | None = None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


class OpIndex:
    """The index, lock and libraries of one op overload on one device, under one cache root."""

    def __init__(self, namespace: str, op_name: str, device: str, *, cache_dir: Path | str | None = None) -> None:
        for label, part in (("namespace", namespace), ("op name", op_name), ("device", device)):
            if not part or "/" in part or "\\" in part or part in (".", ".."):
                raise ValueError(f"invalid {label} {part!r} for the per-op kernel cache")
        self.namespace = namespace
        self.op_name = op_name
        self.device = device
        self.device_dir = eager_root(cache_dir) / namespace / device
        self.index_path = self.device_dir / (op_name + INDEX_SUFFIX)
        self.lock_path = self.device_dir / (op_name + LOCK_SUFFIX)
        self.lib_dir = self.device_dir / "lib" / op_name

    def __repr__(self) -> str:
        return f"OpIndex({self.namespace}::{self.op_name} on {self.device} at {self.device_dir})"

    # -- paths ---------------------------------------------------------------------------------------

    def library_path(self, entry: KernelEntry) -> Path:
        """Absolute path of ``entry``'s shared library."""
        return self.device_dir / entry.kernel_path

    def _relative_library_path(self, digest: str) -> str:
        return f"lib/{self.op_name}/{digest}{LIBRARY_SUFFIX}"

    def _sidecar_path(self, digest: str) -> Path:
        return self.lib_dir / (digest + SIDECAR_SUFFIX)

    # -- locking -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, *, for_write: bool) -> Iterator[None]:
        """Hold the op's lock. A reader that cannot create the lock file (read-only cache) goes on without it.

        :raises filelock.Timeout: another process held the lock longer than the ``lock_timeout`` option.
        """
        lock = filelock.FileLock(str(self.lock_path), timeout=config.get("lock_timeout"))
        try:
            lock.acquire()
        except filelock.Timeout:
            raise
        except OSError as exc:
            if for_write:
                raise
            logger.debug("aotcache: reading %s without its lock (%s)", self.index_path, exc)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    # -- reading -------------------------------------------------------------------------------------

    def _parse(self, text: str) -> list[KernelEntry]:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IndexCorruptError(f"not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise IndexCorruptError(f"top level is a {type(items).__name__}, not a list")
        return [KernelEntry.from_json(item, namespace=self.namespace, op_name=self.op_name, device=self.device)
                for item in items]

    def _read_unlocked(self) -> IndexSnapshot:
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return IndexSnapshot(IndexStatus.ABSENT)
        except UnicodeDecodeError as exc:
            return self._rebuild_unlocked(f"not UTF-8 text ({exc})")
        try:
            return IndexSnapshot(IndexStatus.OK, tuple(self._parse(text)))
        except IndexCorruptError as exc:
            return self._rebuild_unlocked(str(exc))

    def read(self) -> IndexSnapshot:
        """The index's entries, read under the op's lock; a corrupt index is rebuilt (status REBUILT).

        :raises filelock.Timeout: the lock was held by another process for longer than ``lock_timeout``.
        :raises aotcache.logs.CacheFault: in strict mode, when the index was corrupt (after rebuilding it).
        """
        if not self.index_path.exists():
            return IndexSnapshot(IndexStatus.ABSENT)
        with self._lock(for_write=False):
            snapshot = self._read_unlocked()
        self._report(snapshot)
        return snapshot

    def _report(self, snapshot: IndexSnapshot) -> None:
        if snapshot.status is IndexStatus.REBUILT:
            handle_fault(f"eager-index-corrupt:{self.index_path}",
                         f"corrupt per-op kernel index {self.index_path} ({snapshot.problem}); rebuilt it with "
                         f"{len(snapshot.entries)} entries from the libraries present")

    # -- rebuilding ----------------------------------------------------------------------------------

    def entries_from_sidecars(self) -> list[KernelEntry]:
        """Entries described by the sidecars whose library is present (unreadable sidecars are skipped)."""
        entries = []
        if not self.lib_dir.is_dir():
            return entries
        for sidecar in sorted(self.lib_dir.glob("*" + SIDECAR_SUFFIX)):
            try:
                entry = KernelEntry.from_json(json.loads(sidecar.read_text(encoding="utf-8")),
                                              namespace=self.namespace, op_name=self.op_name, device=self.device)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexCorruptError) as exc:
                logger.warning("aotcache: skipping unreadable sidecar %s while rebuilding %s: %s", sidecar,
                               self.index_path, exc)
                continue
            if self.library_path(entry).is_file():
                entries.append(entry)
        entries.sort(key=lambda entry: (entry.created, entry.digest))
        return entries

    def _rebuild_unlocked(self, problem: str) -> IndexSnapshot:
        entries = self.entries_from_sidecars()
        try:
            self._write_unlocked(entries)
        except OSError as exc:  # read-only cache: use the rebuilt entries without persisting them
            problem = f"{problem}; could not rewrite it: {exc}"
        return IndexSnapshot(IndexStatus.REBUILT, tuple(entries), problem)

    def rebuild(self) -> IndexSnapshot:
        """Rewrite the index from the sidecars present (``aotcache eager`` repair; also used on corruption)."""
        self.device_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(for_write=True):
            entries = self.entries_from_sidecars()
            self._write_unlocked(entries)
        return IndexSnapshot(IndexStatus.OK, tuple(entries))

    # -- writing -------------------------------------------------------------------------------------

    def _write_unlocked(self, entries: list[KernelEntry]) -> None:
        data = json.dumps([entry.to_json() for entry in entries], indent=2, sort_keys=True).encode("utf-8")
        _atomic_write(self.index_path, data)

    def new_entry(self, meta_info: list[dict[str, Any]], versions: dict[str, Any], num_outputs: int, *,
                  default_dtype: str | None = None) -> KernelEntry:
        """An entry (not yet stored) for a kernel built for ``meta_info`` under ``versions`` and
        ``default_dtype`` (None: this process's current ``torch.get_default_dtype()``)."""
        if default_dtype is None:
            default_dtype = current_default_dtype()
        digest = entry_digest(self.namespace, self.op_name, self.device, meta_info, versions, default_dtype)
        return KernelEntry(self.namespace, self.op_name, self.device, list(meta_info),
                           self._relative_library_path(digest), digest, dict(versions), num_outputs, time.time(),
                           default_dtype)

    def store_library(self, entry: KernelEntry, library: bytes) -> None:
        """Write ``entry``'s library and sidecar (atomically; an existing library of that digest is kept)."""
        self.lib_dir.mkdir(parents=True, exist_ok=True)
        library_path = self.library_path(entry)
        if not library_path.is_file():
            _atomic_write(library_path, library)
        _atomic_write(self._sidecar_path(entry.digest),
                      json.dumps({"namespace": self.namespace, "op": self.op_name, "device": self.device,
                                  **entry.to_json()}, indent=2, sort_keys=True).encode("utf-8"))

    def append(self, entry: KernelEntry) -> bool:
        """Add ``entry`` to the index under the lock unless an entry with its digest is there; True if added.

        A corrupt index is rebuilt first (logged; raises in strict mode after the repair).
        """
        self.device_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(for_write=True):
            snapshot = self._read_unlocked()
            entries = list(snapshot.entries)
            added = all(existing.digest != entry.digest for existing in entries)
            if added:
                entries.append(entry)
                self._write_unlocked(entries)
        self._report(snapshot)
        return added

    def add(self, entry: KernelEntry, library: bytes) -> bool:
        """Store ``entry``'s library and sidecar, then append it to the index; True if the index changed."""
        self.store_library(entry, library)
        return self.append(entry)

    def remove(self, digests: set[str] | None = None) -> int:
        """Remove the entries with these digests (all when None) with their libraries; returns how many."""
        if not self.device_dir.is_dir():
            return 0
        with self._lock(for_write=True):
            snapshot = self._read_unlocked() if self.index_path.exists() else IndexSnapshot(IndexStatus.ABSENT)
            keep, drop = [], []
            for entry in snapshot.entries:
                (drop if digests is None or entry.digest in digests else keep).append(entry)
            if digests is None and self.lib_dir.is_dir():
                # Also orphans (a library whose index append never happened).
                doomed = list(self.lib_dir.iterdir())
            else:
                doomed = [path for entry in drop
                          for path in (self.library_path(entry), self._sidecar_path(entry.digest))]
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if keep:
                self._write_unlocked(keep)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.index_path.unlink()
                with contextlib.suppress(OSError):  # not empty: another process is adding right now
                    self.lib_dir.rmdir()
        return len(drop)


def iter_op_indexes(cache_dir: Path | str | None = None, *, namespace: str | None = None,
                    device: str | None = None) -> Iterator[OpIndex]:
    """Every op index (or op library folder) present under the cache root, optionally filtered."""
    root = eager_root(cache_dir)
    if not root.is_dir():
        return
    for ns_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        if namespace is not None and ns_dir.name != namespace:
            continue
        for device_dir in sorted(path for path in ns_dir.iterdir() if path.is_dir()):
            if device is not None and device_dir.name != device:
                continue
            names = {path.name[:-len(INDEX_SUFFIX)] for path in device_dir.glob("*" + INDEX_SUFFIX)}
            lib_root = device_dir / "lib"
            if lib_root.is_dir():
                names.update(path.name for path in lib_root.iterdir() if path.is_dir())
            for op_name in sorted(names):
                yield OpIndex(ns_dir.name, op_name, device_dir.name, cache_dir=cache_dir)

