"""numpy arrays, ``bytearray``, ``array.array`` and ``memoryview`` values, written down and guarded by their bytes.

They change in place and keep no version counter, so :class:`ByteBufferWalk` writes each down by its layout and
a digest of its content, and the program guards compare :func:`byte_buffer_state` at every call (NOTE [numpy
arrays by content], NOTE [Byte buffers by content]); a larger one, or an array of Python objects, stays opaque.
It is one part of :class:`~aotcache.autograd_cache.reachable.Reachable` (a mixin over its state), as
:class:`~aotcache.autograd_cache.code_walk.CodeWalk` is.
"""

from __future__ import annotations

import array
from typing import Any

from aotcache.autograd_cache.digests import Untrusted, sha256_text
from aotcache.autograd_cache.value_kinds import type_name

__all__ = ["ByteBufferWalk", "byte_buffer_state", "is_numpy_array"]

_MAX_GUARDED_ARRAY_BYTES = 1 << 16  # NOTE [numpy arrays by content]: compared at every call up to this size


def is_numpy_array(value: Any) -> bool:
    """Whether ``value`` is a ``numpy.ndarray`` (by its type's name: numpy is not imported here)."""
    cls = type(value)
    return cls.__name__ == "ndarray" and cls.__module__ == "numpy"


def byte_buffer_state(value: Any) -> tuple:
    """What the program guards compare of a numpy array, ``bytearray``, ``array.array`` or ``memoryview`` at every
    call, its bytes last (NOTE [numpy arrays by content], NOTE [Byte buffers by content])."""
    if type(value) is bytearray:
        return (bytes(value),)
    if type(value) is memoryview:  # NOTE [memoryviews by content]
        return (value.format, value.shape, value.readonly, value.tobytes())
    if isinstance(value, array.array):
        return (value.typecode, value.tobytes())
    return (value.dtype, value.shape, value.flags.writeable, value.tobytes())


class ByteBufferWalk:
    """The part of :class:`~aotcache.autograd_cache.reachable.Reachable` that writes down numpy arrays and byte
    buffers by content (it uses the walker's guards)."""

    # NOTE [numpy arrays by content]
    # A numpy array a program reads (``float(ANCHORS[0])``, ``torch.from_numpy(MEAN)``, a module's ``self.scales``)
    # was an opaque object: named by its id in-process, so ``ANCHORS[0] = 7.0`` kept the graph traced with the
    # old value (a stale result, found in session 20), and never trusted across processes. numpy keeps no version
    # counter, so an array is written down by dtype, shape and content digest, and the guards compare its bytes
    # at every call (a copy of its bytes: cheap for the small arrays programs keep as settings). An array of
    # Python objects, or larger than _MAX_GUARDED_ARRAY_BYTES, stays untrusted and is guarded by identity only.
    # Its ``flags.writeable`` is part of it (a program may branch on it; found in session 21: a flag cleared kept
    # the graph of the writeable array).
    def _numpy_array_token(self, value: Any) -> str:
        if value.dtype.hasobject or value.nbytes > _MAX_GUARDED_ARRAY_BYTES:
            raise Untrusted(f"opaque object: {type_name(type(value))}")
        state = byte_buffer_state(value)
        if self._guards is not None:
            self._guards.array(value, state)
        # ``dtype.str`` names a structured dtype by its item size alone (``|V8``): its fields (names, types,
        # offsets) are the descr, so two layouts of the same bytes get two tokens
        dtype = value.dtype.str if value.dtype.fields is None else f"{value.dtype.str}{value.dtype.descr!r}"
        writeable = "" if value.flags.writeable else ":read-only"
        return f"ndarray:{dtype}{tuple(value.shape)!r}{writeable}:{sha256_text(state[-1].hex())}"

    # NOTE [Byte buffers by content]
    # A ``bytearray`` or an ``array.array`` (a lookup table, a mask of flags) changes in place like a numpy array
    # and keeps no version either: it was an opaque object, guarded by identity, so ``TABLE[0] = 5`` kept the graph
    # traced with the old entry (a stale result, found in session 21), and never trusted across processes. Both are
    # written down and guarded as numpy arrays are (NOTE [numpy arrays by content]): an ``array.array`` with its
    # type code, each compared by its bytes at every call up to the same size; a larger one stays opaque.
    def _byte_buffer_token(self, value: Any) -> str:
        if type(value) not in (bytearray, array.array) or \
                len(value) * getattr(value, "itemsize", 1) > _MAX_GUARDED_ARRAY_BYTES:  # (a subclass: attributes)
            raise Untrusted(f"opaque object: {type_name(type(value))}")
        state = byte_buffer_state(value)
        if self._guards is not None:
            self._guards.array(value, state)
        kind = "bytearray" if type(value) is bytearray else f"array:{value.typecode}"
        return f"{kind}:{sha256_text(state[-1].hex())}"

    # NOTE [memoryviews by content]
    # A ``memoryview`` (``struct.unpack`` of a view over a shared buffer, a view a config reads) shows memory another
    # object owns, so a write to that buffer changed what the traced code read while the view stayed the same
    # object: it was opaque, guarded by identity (a stale result; a strict xfail since session 23). A plain view is
    # written down and guarded as a byte buffer is (NOTE [Byte buffers by content]): its format, shape, read-only
    # flag and bytes, compared at every call up to the same size; a released view, a subclass or a larger one stays
    # opaque.
    def _memoryview_token(self, value: memoryview) -> str:
        try:
            too_large = type(value) is not memoryview or value.nbytes > _MAX_GUARDED_ARRAY_BYTES
            state = None if too_large else byte_buffer_state(value)
        except ValueError:  # released
            state = None
        if state is None:
            raise Untrusted(f"opaque object: {type_name(type(value))}")
        if self._guards is not None:
            self._guards.array(value, state)
        readonly = ":read-only" if state[2] else ""
        return f"memoryview:{state[0]}{state[1]!r}{readonly}:{sha256_text(state[-1].hex())}"
