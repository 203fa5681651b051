"""Process-wide compiler settings outside a compile's own options, as the key and the call fingerprint see them.

NOTE [Global compiler settings in the key]
A compiler reads ``torch._inductor.config`` as the process set it (``torch._inductor.config.fallback_random =
True``, a ``cpp`` or ``triton`` setting) and the ``TORCHINDUCTOR_*`` variables, besides the ``options`` a compile
passes. The call fingerprint counted the non-default values, the full key did not: a warm process with another
setting missed its fingerprint, traced, and then loaded the graph compiled under the old setting through the
same key (found in session 16; the key is all the backend route ever consults). Both now read them here, the
same way: only values that differ from the default (NOTE [Inductor config left set to its default]), without
importing Inductor (a process that never loaded it has every default), and the variables minus those that only
say where files go.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["ENV_PREFIXES", "UnreadableCompilerSettings", "global_compiler_settings"]

ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCH_COMPILE_", "TORCHDYNAMO_")
_LOCATION_SUFFIXES = ("_DIR", "_DIRECTORY", "_PATH", "_LOGS", "_LOG_DIR")


class UnreadableCompilerSettings(Exception):
    """Inductor's config could not be read; ``reason`` says how (the caller bypasses or distrusts)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def global_compiler_settings() -> tuple[list[str], dict[str, Any]]:
    """``(variables, inductor)``: ``NAME=value`` of the compile variables set (sorted) and the non-default
    ``torch._inductor.config`` values by option name (empty while Inductor is not loaded).

    :raises UnreadableCompilerSettings: the config module is not what this torch version's looks like.
    """
    variables = sorted(f"{name}={value}" for name, value in os.environ.items()
                       if name.startswith(ENV_PREFIXES) and not name.endswith(_LOCATION_SUFFIXES))
    config_module = sys.modules.get("torch._inductor.config")
    if config_module is None:
        return variables, {}
    try:
        names = [name for name in config_module._config if not config_module._is_default(name)
                 and not _equals_default(config_module, name)]
        return variables, {name: getattr(config_module, name) for name in sorted(names)}
    except (AttributeError, TypeError) as exc:
        raise UnreadableCompilerSettings(f"unreadable inductor config: {type(exc).__name__}") from None


def _equals_default(config_module: Any, name: str) -> bool:
    """NOTE [Inductor config left set to its default]
    ``_is_default`` is False for an option that was ever set, even back to its default value (what
    ``config.patch`` does on exit), and AOTInductor fills ``aot_inductor.metadata`` in place with facts about
    this machine (``AOTI_*`` keys: platform, CPU ISA, which the ``system`` part already covers). Either made a
    process that had compiled once fingerprint differently from a fresh one, so a warm start after an aoti
    compile in the same process (the demo's decoding steps) never found its alias. Only a value that differs
    from the default counts; an option whose comparison fails counts as changed."""
    value = getattr(config_module, name)
    if name == "aot_inductor.metadata" and isinstance(value, dict):
        value = {key: item for key, item in value.items() if not str(key).startswith("AOTI_")}
    try:
        return bool(value == config_module._config[name].default)
    except (TypeError, ValueError, RuntimeError):  # a value whose comparison raises: conservatively a change
        return False
