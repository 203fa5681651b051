"""Content-addressed files derived from cache entries (AOTInductor libraries): written on load, bounded, pruned.

A loader that needs a file (dlopen needs a path) materializes an entry's bytes as ``<directory>/<sha256><suffix>``
(:func:`materialize`). Such files are derived data: removing one only costs re-writing it from its entry on
the next load, and a process that has it mapped keeps its mapping. Entries that were replaced or evicted
leave their files behind, so they count in the disk bound and ``aotcache prune`` removes them in the same
least-recently-used order as entries (NOTE [derived files in the bound]).

NOTE [derived files in the bound]
A reuse refreshes the file's mtime (at most once a minute), so the mtime is its last use; the files of
replaced entries are never loaded again and become the oldest. ``aotcache prune`` lists them with the
entries (:func:`entries`, namespace ``aoti_libs``) and removes the least recently used of both until the
total fits; a file is removed only if it is still the one listed (same inode and mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from aotcache import config
from aotcache.store.interface import EntryInfo

__all__ = ["LIBRARY_DIR", "library_dir", "materialize", "touch", "entries", "remove", "total_bytes"]

#: Sub-directory of the cache dir holding AOTInductor libraries materialized from entries.
LIBRARY_DIR = "aoti_libs"
#: A reuse refreshes the file's mtime only when it is older than this (one syscall, skipped on hot loops).
_RECENCY_RESOLUTION_S = 60.0


def library_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/aoti_libs`` (the configured cache dir when None)."""
    return (Path(cache_dir) if cache_dir is not None else Path(config.get("cache_dir"))) / LIBRARY_DIR


def materialize(data: bytes, directory: Path, suffix: str) -> Path:
    """The content-addressed path of ``data`` in ``directory`` (``<sha256><suffix>``), written if absent.

    A file that exists and holds exactly these bytes is reused (compared byte for byte: cheaper than hashing
    it again on the warm path) and its mtime refreshed; a new one is written to a temp file and renamed into
    place, so readers never see a partial file and a concurrent writer only replaces it with equal bytes. No
    fsync: the file is derived data, and one damaged by a crash fails the comparison and is written again.

    :raises OSError: the directory cannot be created or written.
    """
    digest = hashlib.sha256(data).hexdigest()
    path = directory / f"{digest}{suffix}"
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_size == len(data) and path.read_bytes() == data:
            touch(path, st.st_mtime)
            return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path


def touch(path: Path, mtime: float | None = None) -> None:
    """Record a reuse of ``path`` (its mtime), at most once per resolution interval."""
    with contextlib.suppress(OSError):  # not the owner of a shared dir: recency just not recorded
        if time.time() - (path.stat().st_mtime if mtime is None else mtime) > _RECENCY_RESOLUTION_S:
            os.utime(path)


def _bundle_stat(directory: Path) -> tuple[int, float]:
    """(total bytes, newest mtime) of a library directory with side files (NOTE [files beside the library])."""
    size, newest = 0, 0.0
    for item in os.scandir(directory):
        st = item.stat(follow_symlinks=False)
        size += st.st_size
        newest = max(newest, st.st_mtime)
    return size, newest


def entries(directory: Path | None = None) -> list[EntryInfo]:
    """The materialized files (temp files of writers in progress excluded), as entries of ``aoti_libs``."""
    directory = library_dir() if directory is None else directory
    found = []
    try:
        scan = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for item in scan:
        if item.name.startswith("."):
            continue
        with contextlib.suppress(OSError):  # removed meanwhile
            st = item.stat(follow_symlinks=False)
            size, last_use = st.st_size, st.st_mtime
            if item.is_dir(follow_symlinks=False):  # a library with its side files: one entry
                size, last_use = _bundle_stat(Path(item.path))
            found.append(EntryInfo(digest=item.name.split(".", 1)[0], key=f"{LIBRARY_DIR}/{item.name}",
                                   size=size, created=st.st_ctime, last_access=last_use, tier="disk"))
    return found


def total_bytes(directory: Path | None = None) -> int:
    """Bytes held by the materialized files."""
    return sum(info.size for info in entries(directory))


def remove(info: EntryInfo, directory: Path | None = None) -> bool:
    """Remove the file listed as ``info`` unless it was used since (mtime changed); True if removed."""
    directory = library_dir() if directory is None else directory
    path = directory / info.key.split("/", 1)[1]
    try:
        if path.is_dir():
            if _bundle_stat(path)[1] != info.last_access:
                return False
            shutil.rmtree(path)
            return True
        if path.stat().st_mtime != info.last_access:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True
