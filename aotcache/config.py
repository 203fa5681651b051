"""Options registry: every knob has a name, type, default, ``AOTCACHE_*`` env var and help text.

Values are read at use (``config.get("max_bytes")``), never at import, so an env var set after import
and a ``config.patch(...)`` scope both take effect. Parsing is strict: a bad value raises
:class:`ConfigError` naming the variable and the expected form.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "Option",
    "options",
    "get",
    "patch",
    "describe",
    "source",
    "parse_bool",
    "parse_bytes",
    "parse_redis_url",
]


class ConfigError(ValueError):
    """A configuration value (env var or override) that does not parse, or an unknown option name."""


# ----------------------------------------------------------------------------------------------------
# Parsers: each takes the raw string and returns the typed value or raises ValueError with the form.
# ----------------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off/""`` -> False (case-insensitive); else an error."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("a boolean: one of 1, true, yes, on, 0, false, no, off")


_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size such as ``1048576``, ``500MB``, ``2GiB`` or ``1.5G``; 0 means unbounded."""
    match = _BYTES_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError("a byte count: an integer, optionally with a unit (e.g. 1048576, 500MB, 2GiB)")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("an integer (e.g. 3600)") from None


def _parse_count(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("a whole number >= 0 (e.g. 8)") from None
    if value < 0:
        raise ValueError("a whole number >= 0 (e.g. 8)")
    return value


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("a number of seconds (e.g. 0.25)") from None
    if value < 0:
        raise ValueError("a non-negative number of seconds (e.g. 0.25)")
    return value


def _parse_wait_seconds(text: str) -> float:
    """A finite, non-negative number of seconds (a wait that must end: no ``inf``, no ``nan``)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("a number of seconds (e.g. 60)") from None
    if not (0 <= value < float("inf")):  # (nan compares false)
        raise ValueError("a finite, non-negative number of seconds (e.g. 60; 0: never wait)")
    return value


def _parse_optional_str(text: str) -> str | None:
    text = text.strip()
    return text or None


JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


def _parse_job_id(text: str) -> str | None:
    text = text.strip()
    if text and not JOB_ID_PATTERN.match(text):
        raise ValueError("1-128 letters, digits or . _ : @ + -, starting with a letter or digit (e.g. train-42)")
    return text or None


#: Redis URL schemes accepted, each with whether it names a host (``unix://`` names a socket path instead).
#: NOTE [Redis URL schemes]: one row per scheme; a scheme's connection is made in aotcache/store/redis.py
#: (the ``+cluster`` forms select a Redis Cluster: NOTE [cluster URLs] there).
REDIS_URL_SCHEMES: dict[str, bool] = {"redis": True, "rediss": True, "unix": False, "redis+cluster": True,
                                       "rediss+cluster": True}
_REDIS_URL_FORM = ("a Redis URL of the form redis://host:port/db (e.g. redis://localhost:6379/0), or "
                   "redis+cluster://host:port for a Redis Cluster")


def parse_redis_url(text: str) -> str | None:
    """A Redis URL, checked for its form without connecting (``redis://host:port/db``); empty -> None."""
    from urllib.parse import urlsplit

    text = text.strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(_REDIS_URL_FORM) from None
    scheme = parts.scheme.lower()
    if scheme not in REDIS_URL_SCHEMES:
        schemes = ", ".join(f"{name}://" for name in REDIS_URL_SCHEMES)
        raise ValueError(f"{_REDIS_URL_FORM}; the scheme must be one of {schemes}")
    if REDIS_URL_SCHEMES[scheme]:
        if not parts.hostname:
            raise ValueError(f"{_REDIS_URL_FORM}; the host is missing")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{_REDIS_URL_FORM}; the database after the port must be a number, got {db!r}")
        del port
    elif not parts.path:
        raise ValueError("a Unix socket URL of the form unix:///path/to/redis.sock")
    return text


def _parse_path(text: str) -> Path:
    text = text.strip()
    if not text:
        raise ValueError("a directory path (e.g. ~/.cache/aotcache)")
    return Path(text).expanduser()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return lowered

    return parse


def _parse_tiers(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    bad = [name for name in names if name not in ("memory", "disk", "redis")]
    if bad or not names:
        raise ValueError("a comma-separated list of tiers from memory, disk, redis (e.g. memory,disk)")
    return names


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "aotcache"


# ----------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One configuration option. ``default`` may be a zero-argument callable, evaluated at use."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    form: str  # human description of the accepted form, for --help and docs

    @property
    def env_var(self) -> str:
        return "AOTCACHE_" + self.name.upper()

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


_OPTIONS: dict[str, Option] = {}


def _register(name: str, parse: Callable[[str], Any], default: Any, help: str, form: str) -> None:
    _OPTIONS[name] = Option(name, parse, default, help, form)


_register("cache_dir", _parse_path, _default_cache_dir,
          "Root directory of the local cache (disk tier, locks, stats).", "a directory path")
_register("max_bytes", parse_bytes, 10 * 1024**3,
          "Size bound of the disk tier; least recently used entries are evicted past it. 0 = unbounded.",
          "a byte count such as 10GiB")
_register("redis_url", parse_redis_url, None,
          "URL of the shared Redis tier (e.g. redis://host:6379/0, or redis+cluster://host:6379 for a Redis "
          "Cluster); unset = no Redis tier.", "redis://host:port/db or redis+cluster://host:port")
_register("redis_timeout", _parse_float, 0.25,
          "Connect and command timeout for Redis, in seconds.", "seconds, e.g. 0.25")
_register("redis_ttl", _parse_int, 0,
          "Expiry of entries written to Redis, in seconds; 0 = never expire.", "an integer number of seconds")
_register("secret", _parse_optional_str, None,
          "Secret for HMAC-SHA256 entry signatures. When set, unsigned or wrongly signed entries are rejected "
          "before any byte is deserialized.", "any string")
_register("strict", parse_bool, False,
          "Turn cache faults (corrupt entry, Redis down, lock timeout) into errors instead of misses. For CI.",
          "a boolean")
_register("log_level", _choice("debug", "info", "warning", "error"), "warning",
          "Log level of the aotcache logger.", "debug, info, warning or error")
_register("tiers", _parse_tiers, ("memory", "disk", "redis"),
          "Tiers to use, fastest first; redis is skipped when no redis_url is set.", "e.g. memory,disk,redis")
_register("compress_min_bytes", parse_bytes, 1024 * 1024,
          "Values at least this large are zstd-compressed in disk and Redis entries. 0 = never compress.",
          "a byte count")
_register("lock_timeout", _parse_float, 600.0,
          "How long a process waits for one live holder compiling the same key before compiling itself.",
          "seconds, e.g. 600")
_register("lock_lease", _parse_float, 5.0,
          "Lease of the cross-machine (Redis) compile lock, in seconds: a holder renews it while it compiles, "
          "so a holder that dies is replaced within this time.", "seconds, e.g. 5")
_register("redis_chunk_bytes", parse_bytes, 4 * 1024 * 1024,
          "Redis entries larger than this are stored in chunks of this size under a manifest written last.",
          "a byte count such as 4MiB")
_register("job_id", _parse_job_id, None,
          "Id of the job this process belongs to, for per-job counters in `aotcache stats`; unset = "
          "TORCHELASTIC_RUN_ID (set by torchrun), else none.", "a name such as train-42")
_register("progress", parse_bool, True,
          "Show live progress (graph, stage, elapsed) of compiles longer than a second on stderr, when it is a "
          "terminal.", "a boolean")
_register("recompile_limit", _parse_count, 8,
          "New traces one compiled function (aot_function, aot_module, aotcache.compile) may make per grad mode in "
          "a process; past it, a call that would trace runs eagerly (counted as eager:recompile_limit, warned "
          "once), as torch.compile does past its recompile_limit; on_capture_error=\"raise\", "
          "aotcache.compile(fullgraph=True) and AOTCACHE_STRICT=1 raise RecompileLimitReached instead. Loads from "
          "the cache do not count; aotcache.reset() starts the counts over. 0 = no limit.",
          "a whole number >= 0")
_register("trace_wait_s", _parse_wait_seconds, 60.0,
          "How long a call that is to capture waits for another thread's capture (captures run one at a time in "
          "a process) before it runs eagerly instead, this once (counted as eager:swap_busy; a later call "
          "captures). A large model's capture can take minutes on CPU: raise it to wait for such captures, "
          "lower it (0: never wait) for quicker first answers from the other threads.",
          "seconds, e.g. 60")
_register("enabled", parse_bool, True,
          "Master switch: when false, nothing is read from or written to the cache.", "a boolean")


def options() -> dict[str, Option]:
    """All registered options by name (a copy)."""
    return dict(_OPTIONS)


# ----------------------------------------------------------------------------------------------------
# Overrides: a process-wide stack (visible from every thread, like torch's own config.patch).
# ----------------------------------------------------------------------------------------------------

_override_lock = threading.Lock()
_override_stack: list[dict[str, Any]] = []


def _option(name: str) -> Option:
    try:
        return _OPTIONS[name]
    except KeyError:
        known = ", ".join(sorted(_OPTIONS))
        raise ConfigError(f"unknown aotcache option {name!r}; known options: {known}") from None


def _coerce(option: Option, value: Any) -> Any:
    """Overrides may be given as strings (parsed like env vars) or already-typed values."""
    if isinstance(value, str) and option.parse is not _parse_optional_str:
        try:
            return option.parse(value)
        except ValueError as exc:
            raise ConfigError(f"aotcache option {option.name!r}: {value!r} is not {exc}") from None
    if option.parse is _parse_path and value is not None:
        return Path(value).expanduser()
    if option.parse is _parse_wait_seconds:  # a typed wait is checked as its text is: inf would overflow the lock's
        # wait (a capture failure), nan never give up, None fail the deadline's sum
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"aotcache option {option.name!r}: {value!r} is not a number of seconds (e.g. 60)")
        try:
            return _parse_wait_seconds(repr(float(value)))
        except ValueError as exc:
            raise ConfigError(f"aotcache option {option.name!r}: {value!r} is not {exc}") from None
    return value


def get(name: str) -> Any:
    """Current value of option ``name``: innermost ``patch``, else its env var, else the default.

    :raises ConfigError: unknown name, or the env var holds a value that does not parse.
    """
    option = _option(name)
    with _override_lock:
        for layer in reversed(_override_stack):
            if name in layer:
                return layer[name]
    raw = os.environ.get(option.env_var)
    if raw is None:
        return option.default_value()
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{option.env_var}={raw!r} is not valid: expected {exc}") from None


class patch(contextlib.ContextDecorator):
    """Scoped override: ``with config.patch(max_bytes=10_000, strict=True): ...`` (also a decorator)."""

    def __init__(self, mapping: dict[str, Any] | None = None, **kwargs: Any) -> None:
        merged = dict(mapping or {}, **kwargs)
        self._layer = {name: _coerce(_option(name), value) for name, value in merged.items()}

    def __enter__(self) -> patch:
        with _override_lock:
            _override_stack.append(self._layer)
        return self

    def __exit__(self, *exc: object) -> None:
        with _override_lock:
            # Remove this exact layer (not just the top) so that overlapping scopes from threads unwind safely.
            for index in range(len(_override_stack) - 1, -1, -1):
                if _override_stack[index] is self._layer:
                    del _override_stack[index]
                    break


def source(name: str) -> str:
    """Where option ``name``'s value comes from: ``"override"`` (a ``patch``), ``"env"`` or ``"default"``."""
    option = _option(name)
    with _override_lock:
        if any(name in layer for layer in _override_stack):
            return "override"
    return "env" if option.env_var in os.environ else "default"


def describe() -> list[dict[str, Any]]:
    """Every option with its value in effect and where it came from (for ``aotcache info``)."""
    rows = []
    for name, option in sorted(_OPTIONS.items()):
        origin = source(name)
        value = get(name)
        if name == "secret" and value:
            value = "<set>"
        rows.append({"name": name, "value": value, "source": origin, "env_var": option.env_var,
                     "form": option.form, "help": option.help})
    return rows


@functools.cache
def _env_names() -> frozenset[str]:
    return frozenset(option.env_var for option in _OPTIONS.values())


def validate_environment() -> None:
    """Parse every ``AOTCACHE_*`` variable now; unknown ones are reported too.

    :raises ConfigError: listing each bad or unknown variable.
    """
    problems = []
    for option in _OPTIONS.values():
        try:
            get(option.name)
        except ConfigError as exc:
            problems.append(str(exc))
    problems.extend(unknown_env_vars())
    if problems:
        raise ConfigError("; ".join(problems))


def unknown_env_vars() -> list[str]:
    """One message per set ``AOTCACHE_*`` variable that is no option (a guess such as ``AOTCACHE_DIR`` would
    otherwise be ignored silently), naming the closest option's variable."""
    unknown = [var for var in sorted(os.environ) if var.startswith("AOTCACHE_") and var not in _env_names()]
    if not unknown:  # the usual case, on every first call of a process: no difflib import
        return []
    import difflib

    names = {name.removeprefix("AOTCACHE_"): name for name in sorted(_env_names())}
    problems = []
    for var in unknown:
        word = var.removeprefix("AOTCACHE_")  # AOTCACHE_DIR -> AOTCACHE_CACHE_DIR: a word of a name first
        close = ([name for short, name in names.items() if word in short.split("_")]
                 or [names[short] for short in difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)])
        hint = (f"did you mean {' or '.join(close)}?" if close
                else f"known: {', '.join(sorted(_env_names()))}")
        problems.append(f"{var} is not an aotcache option ({hint})")
    return problems


def iter_env_vars() -> Iterator[str]:
    yield from sorted(_env_names())
