"""The three ways a test can compile a function with the nop compiler and no cache: ``aot_function``,
``aotcache.compile`` and ``torch.compile(backend="aotcache")``, for tests that assert the same behaviour on each."""

from __future__ import annotations

import torch

import aotcache

ROUTES = ("aot", "compile", "dynamo")


def compiled_by_route(fn, route):
    """``fn`` compiled the ``route`` way (one of :data:`ROUTES`), nop compiler, nothing stored."""
    if route == "aot":
        return aotcache.aot_function(fn, "nop", cache=False)
    if route == "compile":
        return aotcache.compile(fn, compiler="nop", cache=False)
    return torch.compile(fn, backend="aotcache", options={"compiler": "nop", "cache": False})
