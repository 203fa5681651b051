"""Containers the walk reads while another thread of the program may change them.

NOTE [Containers another thread changes]: the walk of a program (:mod:`aotcache.autograd_cache.reachable`) runs
in the calling thread, between the user's calls, and reads every dict, list, set and ``__dict__`` the program
reaches, running Python code (the token of each member) between two members. Another thread of the program may
add to one of those containers meanwhile (found on torch 2.11: pytest's import hook records each import in a
dict that a test's forward hook reached, and another thread's capture imported a module during the walk); a
loop over the live container then raised ``RuntimeError: dictionary changed size during iteration`` out of the
user's call, where eager runs. The walk reads each container's members in one step instead (a plain dict, list
or set is copied in C, under the GIL), and tokenizes the copy. Safe: the guards record the container itself,
so a change after the copy fails them at the next call, which walks again. A container that keeps changing
while it is copied (a Python-level mapping, say) makes the program untrusted (no warm start), never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from aotcache.autograd_cache.digests import Untrusted

__all__ = ["entries_of", "members_of"]

_COPY_TRIES = 8  # a copy fails only if the container changes inside it: a few tries, then untrusted

_Copy = TypeVar("_Copy")


def entries_of(mapping: Mapping) -> list[tuple[Any, Any]]:
    """``mapping``'s (key, value) pairs, read in one step (NOTE [Containers another thread changes])."""
    return _copied(lambda: list(mapping.items()))


def members_of(container: Iterable) -> tuple:
    """``container``'s members in its order, read in one step (NOTE [Containers another thread changes])."""
    return _copied(lambda: tuple(container))


def _copied(copy: Callable[[], _Copy]) -> _Copy:
    for _ in range(_COPY_TRIES):
        try:
            return copy()
        except RuntimeError:  # changed while copied: a container whose iteration runs Python code
            continue
    raise Untrusted("a container kept changing while the walk read it (another thread)")
