"""The fallback chain of the named compilers: a graph that ``aoti`` cannot compile is compiled by ``inductor``,
one that ``inductor`` cannot compile runs under ``nop``. A compiler failure never fails the user's job.

NOTE [compiler fallback]
Compiling can fail for reasons that are not the user's: AOTInductor cannot package a graph, an Inductor
lowering raises, the machine has no C++ or CUDA toolchain. :class:`FallbackCompiler` (what a compiler given
by name resolves to, see ``aotcache.aot.api``) then tries the next compiler of :data:`FALLBACK_CHAIN`; the
graph was traced with Inductor's decompositions, which every later compiler of the chain runs as well. Each
fallback is counted in the stats journal (section ``autograd``, counter ``compiler_fallback``; per reason in
``autograd:compiler_fallback``, shown by ``aotcache stats``) and logged once per reason; ``AOTCACHE_STRICT=1``
raises the compiler's error instead. A failure of ``nop``, the last compiler, is raised: it runs the graph as
traced, so its failure is not a toolchain's.

A result that fell back carries ``fallback_from`` (the compiler asked for) and ``fallback_reason``. The
compiled-graph cache does not store such a result (bypass ``compiler fallback: <from>-><to>``): its key names
the compiler asked for, and an entry holding another compiler's artifact would be reused by every later
process, including those where the asked-for compiler works. Each process that cannot use it compiles again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aotcache import config
from aotcache.compilers.base import COMPILER_NAMES, CompiledGraph, get_compiler
from aotcache.compilers.float_inputs import FloatInputsUnsupported, retried_by_caller
from aotcache.logs import log_once

__all__ = ["FALLBACK_CHAIN", "COUNTER_SECTION", "REASON_SECTION", "FallbackCompiler", "check_inductor_options",
           "fallback_reason", "fell_back"]

FALLBACK_CHAIN = ("aoti", "inductor", "nop")  # each compiler falls back to the ones after it
COUNTER_SECTION = "autograd"  # stats journal section of the total (the compiled-graph cache's counters)
REASON_SECTION = "autograd:compiler_fallback"  # one counter per "<from>-><to>: <error type>"
_MESSAGE_LIMIT = 300


def fallback_reason(failed: str, used: str, exc: BaseException) -> str:
    """The counter name of a fallback: ``"aoti->inductor: RuntimeError"`` (bounded: the error's type only)."""
    return f"{failed}->{used}: {type(exc).__name__}"


def fell_back(compiled: Any) -> str | None:
    """``"<asked>-><used>"`` when ``compiled`` came from a fallback (NOTE [compiler fallback]), else None."""
    asked = getattr(compiled, "fallback_from", None)
    if not isinstance(asked, str):
        return None
    return f"{asked}->{getattr(compiled, 'compiler_name', type(compiled).__name__)}"


def _record(failed: str, used: str, exc: BaseException) -> str:
    from aotcache.store.journal import default_journal

    reason = fallback_reason(failed, used, exc)
    journal = default_journal()
    journal.add(COUNTER_SECTION, {"compiler_fallback": 1})
    journal.add(REASON_SECTION, {reason: 1})
    message = " ".join(str(exc).split())[:_MESSAGE_LIMIT]
    log_once(logging.WARNING, f"compiler-fallback:{reason}",
             "aotcache: the %s compiler failed (%s: %s); compiling with %s instead (further such fallbacks are "
             "counted in `aotcache stats`, not logged; AOTCACHE_STRICT=1 raises)", failed, type(exc).__name__,
             message, used)
    return reason


def check_inductor_options(options: Mapping[str, Any]) -> None:
    """Refuse option names ``torch._inductor.config`` does not have (dotted names reach its sub-configs).

    Checked when a graph is compiled, where Inductor is imported anyway; importing its config to check at
    ``aotcache.compile`` would cost every warm start about a second.

    :raises ValueError: naming the unknown options.
    """
    from torch._inductor import config as inductor_config

    unknown = []
    for name in options:
        target: Any = inductor_config
        try:
            for part in str(name).split("."):
                target = getattr(target, part)
        except AttributeError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"aotcache: unknown Inductor option(s) {sorted(map(str, unknown))} in the compiler "
                         f"options (options= of aotcache.compile / the backend, compiler_options=); the names are "
                         f"those of torch._inductor.config, e.g. 'max_autotune' or 'triton.cudagraphs'")


class FallbackCompiler:
    """``compiler(gm, example_inputs)``: the compiler ``name``, then the rest of :data:`FALLBACK_CHAIN` on failure.

    ``options`` (``torch._inductor.config`` overrides) go to every compiler of the chain that takes them.
    The chain's compilers are looked up at each call, so a patched module attribute is seen (fault injection).

    :raises ValueError: ``name`` is not a named compiler.
    """

    def __init__(self, name: str, options: Mapping[str, Any] | None = None) -> None:
        if name not in COMPILER_NAMES:
            raise ValueError(f"unknown compiler {name!r}; choose one of {', '.join(COMPILER_NAMES)}")
        self.name = name
        self.options = dict(options) if options else None
        self.chain = FALLBACK_CHAIN[FALLBACK_CHAIN.index(name):] if name in FALLBACK_CHAIN else (name,)

    def __repr__(self) -> str:
        return f"FallbackCompiler({' -> '.join(self.chain)})"

    def decompositions(self) -> dict | None:
        """The asked-for compiler's table: the graph is traced for it (the later compilers run it too)."""
        provider = getattr(get_compiler(self.name), "decompositions", None)
        return provider() if callable(provider) else None

    def warm_up(self, example_inputs: Sequence[Any]) -> None:
        """Let the asked-for compiler start background work its compile will need (NOTE [warming the compile
        workers] in inductor.py); a compiler without a ``warm_up`` needs none."""
        hook = getattr(get_compiler(self.name), "warm_up", None)
        if callable(hook):
            hook(example_inputs)

    def __call__(self, gm: Any, example_inputs: Sequence[Any]) -> CompiledGraph:
        """Compile with the first compiler of the chain that succeeds.

        :raises ValueError: ``options`` names a setting Inductor does not have (the user's error, not a
            toolchain's: never a fallback).
        :raises Exception: the last compiler's error; in strict mode (``AOTCACHE_STRICT=1``) the first one.
        """
        if self.options and self.name in ("inductor", "aoti"):
            check_inductor_options(self.options)
        reason = None
        for index, current in enumerate(self.chain):
            compiler = get_compiler(current)
            try:
                compiled = compiler(gm, example_inputs, **({"options": self.options} if self.options else {}))
            except Exception as exc:  # NOTE [compiler fallback]: any compiler error falls back, counted and logged
                if isinstance(exc, FloatInputsUnsupported) and retried_by_caller():  # the caller compiles the float
                    raise  # as a constant instead (NOTE [Float inputs for Inductor]): no toolchain failure
                if index + 1 == len(self.chain) or config.get("strict"):
                    raise
                reason = _record(current, self.chain[index + 1], exc)
                continue
            if index:
                compiled.fallback_from = self.name  # type: ignore[attr-defined]
                compiled.fallback_reason = reason  # type: ignore[attr-defined]
            return compiled
        raise AssertionError("unreachable: the chain is never empty")
