"""The route record of :func:`aotcache.compile`: which way a call was compiled, kept in the store.

NOTE [Route records]
``aotcache.compile`` captures a whole call with AOT Autograd when it can, and otherwise hands the model to
``torch.compile(backend="aotcache")``. Finding out costs a capture attempt (seconds for a real model), so
when a capture fails the choice is written as a small JSON record ``aot/route/<call fingerprint>`` through
the compiled-graph cache's tiers (checksummed, signed with ``AOTCACHE_SECRET`` like every entry). A later
process with the same fingerprint reads it and goes to Dynamo without trying to capture. Only the Dynamo
choice is recorded: the AOT choice needs no record (its alias record ``aot/fp/<fingerprint>`` leads to the
entry). The fingerprint covers the code and the inputs' metadata, so a code change that removes the graph
break gives a new fingerprint and a fresh capture attempt. A record is a hint, never a result: a stale or
unreadable one costs speed (the Dynamo path is always correct), never correctness; a bad record is deleted.
"""

from __future__ import annotations

import json
from typing import Any

from aotcache.autograd_cache.fingerprint_cache import read_record

__all__ = ["ROUTE_PREFIX", "ROUTE_SCHEMA", "DYNAMO", "AOT", "EAGER", "route_store_key", "read_route", "record_route"]

ROUTE_PREFIX = "aot/route/"
ROUTE_SCHEMA = 1
AOT = "aot"
DYNAMO = "dynamo"
EAGER = "eager"  # neither way gives eager's results: the call runs eagerly


def route_store_key(digest: str) -> str:
    """The store key of the route record of a (trusted) call fingerprint digest."""
    return ROUTE_PREFIX + digest


def _parse_route(value: Any, digest: str) -> tuple[str, str]:
    """``(route, reason)`` of a route record (bytes of JSON). :raises ValueError: it does not parse or check."""
    try:
        record = json.loads(bytes(value).decode("utf-8"))
        if record.get("schema") != ROUTE_SCHEMA or record.get("fingerprint") != digest:
            raise ValueError("route record of another schema or fingerprint")
        if record["route"] not in (AOT, DYNAMO, EAGER):
            raise ValueError(f"unknown route {record['route']!r}")
        return str(record["route"]), str(record.get("reason", ""))
    except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed route record: {exc}") from exc


def read_route(cache: Any, digest: str) -> tuple[str, str] | None:
    """``(route, reason)`` recorded for the fingerprint ``digest``, or None (none, a store fault, a bad record).

    :raises aotcache.logs.CacheFault: a bad record, in strict mode only.
    """
    return read_record(cache, route_store_key(digest), lambda value: _parse_route(value, digest), "compile:route",
                       "route record")


def record_route(cache: Any, digest: str, route: str, reason: str) -> bool:
    """Record the route of the fingerprint ``digest`` (never overwrites); True if stored now."""
    record = {"schema": ROUTE_SCHEMA, "fingerprint": digest, "route": route, "reason": reason[:500]}
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return bool(cache.tiers.insert(route_store_key(digest), blob))
