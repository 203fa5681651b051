"""The file form of disk cache entries: reading, writing and publishing one frame per file.

Low-level helpers of ``OnDiskCache`` (disk.py), which owns the layout and the locking; see its NOTE
[atomic publish, insert never overwrites]. Nothing here knows about keys beyond their digest.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets

from aotcache.store import frame
from aotcache.store.eviction import TEMP_PREFIX

__all__ = [
    "O_CLOEXEC",
    "HARDLINK_UNSUPPORTED",
    "file_exists",
    "create_temp",
    "read_value",
    "read_key_without_access",
    "write_all",
    "fsync_directory",
]

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOATIME = getattr(os, "O_NOATIME", 0)
#: errno values of os.link meaning "no hard links here": publishing falls back to a locked rename.
HARDLINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
# Entries at least this large are read in two parts, the payload straight into its own bytes object.
_SPLIT_READ_MIN_BYTES = 64 * 1024
_temp_counter = itertools.count()  # per-process sequence for temp-file names (itertools.count is thread-safe)


def file_exists(path: str) -> bool:
    """Whether ``path`` exists; False also when it cannot be checked (the write reports the real problem)."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def create_temp(subdir: str, digest: str) -> tuple[int, str]:
    """Create a new temp file for ``digest``'s entry in ``subdir`` (made if missing); (fd, path).

    :raises OSError: it cannot be created.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC
    temp_path = f"{subdir}/{TEMP_PREFIX}{os.getpid()}.{next(_temp_counter)}.{digest[:12]}"
    for _ in range(3):
        try:
            return os.open(temp_path, flags, 0o666), temp_path
        except FileNotFoundError:
            os.makedirs(subdir, exist_ok=True)
        except FileExistsError:  # left by a killed process that had our pid: pick a random name
            temp_path = f"{subdir}/{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(8)}.{digest[:12]}"
    return os.open(temp_path, flags, 0o666), temp_path


def read_value(fd: int, size: int, encoded_key: bytes, secret: str | bytes | None) -> object:
    """Read and check the entry open as ``fd`` (``size`` bytes by fstat); its value.

    Small entries are read in one call; larger ones as head (header, signature, key) then payload, so
    the payload is read straight into the bytes object that becomes the value (no second copy).

    :raises frame.FrameError: the entry is corrupt, foreign, of another version, or wrongly signed.
    :raises OSError: reading failed.
    """
    if size < _SPLIT_READ_MIN_BYTES:
        return frame.decode_value(_read_exactly(fd, size), secret=secret, expected_key=encoded_key)
    fixed = _read_exactly(fd, frame.HEADER_SIZE)
    header = frame.read_header(fixed)
    rest_of_head = _read_exactly(fd, header.body_offset + header.key_length - frame.HEADER_SIZE)
    payload = _read_exactly(fd, size - len(fixed) - len(rest_of_head))
    return frame.decode_split(fixed + rest_of_head, payload, secret=secret, expected_key=encoded_key).value


def read_key_without_access(path: str) -> tuple[os.stat_result, bytes]:
    """The stat and encoded key of the entry at ``path``, leaving its atime alone where the OS lets us.

    :raises OSError: cannot open or read it. :raises frame.FrameError: not a readable frame header.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC | _O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner: read normally (relatime may touch atime)
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    try:
        st = os.fstat(fd)
        header = frame.read_header(os.pread(fd, frame.HEADER_SIZE, 0))
        return st, os.pread(fd, header.key_length, header.body_offset)
    finally:
        os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    """Read ``size`` bytes (a file shorter than its stat size yields what there is: the frame check fails)."""
    blob = os.read(fd, size)
    if len(blob) == size or not blob:
        return blob
    chunks = [blob]
    remaining = size - len(blob)
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, parts: list[bytes], size: int) -> None:
    """Write ``parts`` in order with writev (no concatenation of large payloads), handling short writes."""
    written = os.writev(fd, parts)
    if written == size:
        return
    views = [memoryview(part) for part in parts]
    while True:
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if not views:
            return
        if written:
            views[0] = views[0][written:]
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(errno.EIO, "writev wrote nothing")


def fsync_directory(directory: str) -> None:
    """fsync a directory (makes a just-linked entry's name durable)."""
    fd = os.open(directory, os.O_RDONLY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
