"""The store demo: ``python -m aotcache.demo --store`` (or ``python -m aotcache.demo_store``).

In a temporary cache directory (or ``--cache-dir``), it builds the memory -> disk (-> Redis, when a
``redis-server`` binary is installed: a private one on a free loopback port) tiers and shows, step by step:
misses then hits, a fresh process hitting from disk and backfilling its memory tier, a corrupted entry
detected and turned into a miss, eviction under a small size bound, and the counters of every tier.
It imports no torch and finishes in a few seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aotcache import config
from aotcache.cli import output
from aotcache.cli.stats import render_tier_table, tier_rows_from_journal
from aotcache.store.disk import OnDiskCache
from aotcache.store.factory import open_tiers
from aotcache.store.interface import key_digest
from aotcache.store.journal import StatsJournal, default_journal_path

__all__ = ["main", "ARTIFACTS", "NAMESPACE"]

#: Namespace of the demo's entries (``aotcache ls -n demo`` lists them).
NAMESPACE = "demo"
EVICTION_NAMESPACE = "demo-eviction"
EVICTION_BOUND = 256 * 1024


def _artifact(seed: int, size: int, *, compressible: bool) -> bytes:
    """Deterministic stand-in for a compiled artifact: random bytes, or repetitive text that zstd shrinks."""
    if compressible:
        line = f"def kernel_{seed}(in_ptr0, out_ptr0, xnumel): pass  # generated code\n".encode()
        return (line * (size // len(line) + 1))[:size]
    return random.Random(seed).randbytes(size)


#: (key, value) pairs of various sizes; the 2 MiB one is over compress_min_bytes (1 MiB) and gets zstd.
ARTIFACTS: list[tuple[str, bytes]] = [
    ("kernel/add_relu/f32", _artifact(1, 300, compressible=False)),
    ("graph/mlp_forward", _artifact(2, 48 * 1024, compressible=False)),
    ("graph/mlp_backward", _artifact(3, 200 * 1024, compressible=False)),
    ("module/transformer_block.so", _artifact(4, 2 * 1024 * 1024, compressible=True)),
]


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _micros(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


# ----------------------------------------------------------------------------------------------------
# A private redis-server
# ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def _private_redis(workdir: Path) -> Iterator[str | None]:
    """A redis-server on a free loopback port for the demo's duration; yields its URL, or None if unavailable."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("Redis tier: skipped (no redis-server binary on PATH)")
        yield None
        return
    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"Redis tier: skipped (redis-server did not start on port {port})")
                yield None
                return
            time.sleep(0.05)
        print(f"Redis tier: a private redis-server on 127.0.0.1:{port} (stopped at the end)")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------


def _show_lookups(cache: Any, keys: list[str], note: str = "") -> list[str]:
    """Look each key up, print one line per key (status, tier that answered, time); the statuses."""
    statuses = []
    for key in keys:
        started = time.perf_counter()
        result = cache.lookup(key)
        elapsed = time.perf_counter() - started
        where = f"from {result.tier}" if result.hit else (result.error or "")
        print(f"  {result.status.value:<5} {key:<30} {where:<12} {_micros(elapsed):>10}{note}")
        statuses.append(result.status.value)
    return statuses


def _run_child(tiers: str, env: dict[str, str]) -> None:
    """Run the lookups of step 3 in a fresh interpreter (nothing in memory) and echo its output."""
    command = [sys.executable, "-m", "aotcache.demo_store", "--child-lookups", tiers]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    for line in proc.stdout.splitlines():
        print(f"  | {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"the child process failed ({proc.returncode}):\n{proc.stderr}")


def _child_lookups(tiers: str) -> int:
    """The child process of step 3: look every artifact up twice and record the counters in the journal."""
    from aotcache.store.journal import default_journal

    cache = open_tiers(tiers, namespace=NAMESPACE, journal=default_journal())
    keys = [key for key, _ in ARTIFACTS]
    print(f"pid {os.getpid()}, tiers {','.join(cache.labels)}; first lookups (memory is empty):")
    _show_lookups(cache, keys)
    print("again (backfilled into memory):")
    _show_lookups(cache, keys)
    cache.close()
    return 0


def _corrupt_one_entry(key: str) -> Path:
    """Flip one byte in the middle of ``key``'s disk entry (a bit rot / torn write stand-in)."""
    # The entry path follows the layout documented in aotcache/store/disk.py: <root>/<digest[:2]>/<digest>.
    digest = key_digest(key)
    path = OnDiskCache(NAMESPACE).root / digest[:2] / digest
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    return path


def _eviction_step() -> None:
    bound = EVICTION_BOUND
    disk = OnDiskCache(EVICTION_NAMESPACE, max_bytes=bound)
    entry = 48 * 1024
    print(f"A disk tier bounded to {output.format_bytes(bound)}; entries of {output.format_bytes(entry)} each.")
    for index in range(5):
        disk.insert(f"eviction/entry-{index:02d}", _artifact(100 + index, entry, compressible=False))
    print("  inserted entries 00-04; waiting 1 s, then reading entry 00 (a read refreshes an entry's recency "
          "at most once a second)")
    time.sleep(1.1)
    hot = "eviction/entry-00"
    disk.get(hot)
    for index in range(5, 8):
        disk.insert(f"eviction/entry-{index:02d}", _artifact(100 + index, entry, compressible=False))
    print("  inserted entries 05-07: the bound is crossed twice; each time the least recently used entries "
          "go, down to 90 % of the bound")
    disk.close()
    kept = sorted(info.key.rsplit("-", 1)[-1] for info in disk.entries())
    total = disk.total_bytes()
    print(f"  on disk now: {len(kept)} entries ({', '.join(kept)}), {output.format_bytes(total)}, "
          f"{'within' if total <= bound else 'OVER'} the bound; evictions: {disk.stats.evictions}")
    print(f"  the recently read entry 00 {'survived' if '00' in kept else 'was EVICTED'}")


def _stats_step(cache: Any, journal: StatsJournal) -> None:
    render_tier_table("This process, per tier (TieredCache.stats_by_tier())", cache.stats_by_tier())
    journal.flush()
    totals = tier_rows_from_journal({name.split(":", 1)[1]: counts for name, counts
                                     in journal.read(include_pending=False).items() if name.startswith("tier:")})
    render_tier_table("All processes of this demo (stats journal, as `aotcache stats` shows it)", totals)


def _run_demo(cache_dir: Path, use_redis: bool, *, kept: bool) -> None:
    started = time.perf_counter()
    print(f"aotcache store demo; cache directory: {cache_dir}")
    with _private_redis(cache_dir.parent / f"{cache_dir.name}-redis") if use_redis else _no_redis() as redis_url:
        overrides: dict[str, Any] = {"cache_dir": cache_dir, "redis_url": redis_url,
                                     "tiers": ("memory", "disk", "redis") if redis_url else ("memory", "disk")}
        with config.patch(overrides):
            for namespace in (NAMESPACE, EVICTION_NAMESPACE):  # a kept --cache-dir: start from empty demo tiers
                OnDiskCache(namespace, max_bytes=0).clear()
            journal = StatsJournal(default_journal_path())
            cache = open_tiers(namespace=NAMESPACE, journal=journal)
            keys = [key for key, _ in ARTIFACTS]

            _section("1. Tiers")
            for label, tier in zip(cache.labels, cache.tiers):
                where = getattr(tier, "directory", None) or getattr(tier, "where", None) or "this process"
                print(f"  {label:<7} {where}")

            _section("2. Misses, then hits")
            print("First lookups: nothing is cached yet.")
            _show_lookups(cache, keys)
            print("Insert the artifacts (written through to every tier):")
            for key, value in ARTIFACTS:
                began = time.perf_counter()
                cache.insert(key, value)
                elapsed = _micros(time.perf_counter() - began)
                print(f"  stored {key:<30} {output.format_bytes(len(value)):>10} {elapsed:>10}")
            print("Lookups again: hits from memory.")
            _show_lookups(cache, keys)
            journal.flush()  # so that the child's totals add to ours

            _section("3. A fresh process: hits from disk, backfilled into memory")
            env = dict(os.environ, AOTCACHE_CACHE_DIR=str(cache_dir))
            env.pop("AOTCACHE_REDIS_URL", None)
            _run_child("memory,disk", env)
            if redis_url:
                print("Another machine (no local disk here: tiers memory,redis), hitting from Redis:")
                _run_child("memory,redis", dict(env, AOTCACHE_REDIS_URL=redis_url))

            _section("4. A corrupted entry is detected and becomes a miss")
            victim = keys[1]
            path = _corrupt_one_entry(victim)
            print(f"Flipped one byte of the disk entry of {victim} ({path.name[:12]}...); a fresh TieredCache "
                  "(empty memory) looks it up. The fault is logged once on stderr:")
            fresh = open_tiers(namespace=NAMESPACE, journal=journal)
            _show_lookups(fresh, [victim])
            disk_row = fresh.stats_by_tier()["disk"]
            print(f"  the disk tier counted it (errors={disk_row['errors']:g}, corrupt={disk_row['corrupt']:g}): "
                  "the checksum caught it and the entry was removed; callers never see wrong bytes.")
            if "redis" not in fresh.labels:
                print("  no other tier has it: a miss; the job recompiles and inserts it again")
                fresh.insert(victim, dict(ARTIFACTS)[victim])
            else:
                print("  Redis had a good copy: the value was backfilled into memory and disk")
            repaired = OnDiskCache(NAMESPACE).get(victim) == dict(ARTIFACTS)[victim]
            print(f"  the disk entry of {victim} is {'valid again' if repaired else 'still missing'}")
            fresh.close()

            _section("5. Eviction under a small max_bytes")
            _eviction_step()

            _section("6. Stats per tier")
            _stats_step(cache, journal)
            cache.close()
            if kept:
                print(f"\nInspect it with: aotcache --cache-dir {cache_dir} stats   (or: info, ls, prune, clear)")
            else:
                print("\nThe cache directory was temporary; keep one with --cache-dir DIR, then inspect it with "
                      "`aotcache --cache-dir DIR stats` (or: info, ls, prune, clear).")
    print(f"Demo finished in {time.perf_counter() - started:.1f} s.")


@contextmanager
def _no_redis() -> Iterator[None]:
    print("Redis tier: skipped (--no-redis)")
    yield None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m aotcache.demo --store", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Use this cache directory (kept afterwards) instead of a temporary one.")
    parser.add_argument("--no-redis", action="store_true", help="Do not start a private redis-server.")
    parser.add_argument("--child-lookups", metavar="TIERS", help=argparse.SUPPRESS)  # step 3's fresh process
    args = parser.parse_args(argv)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # keep stdout and the fault warnings on stderr in order when piped
        reconfigure(line_buffering=True)
    try:
        config.validate_environment()
    except config.ConfigError as exc:
        print(f"aotcache demo: error: {exc}", file=sys.stderr)
        return 2
    if args.child_lookups:
        return _child_lookups(args.child_lookups)
    if args.cache_dir is not None:
        cache_dir = args.cache_dir.expanduser().resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
        _run_demo(cache_dir, not args.no_redis, kept=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="aotcache-demo-") as temp:
        _run_demo(Path(temp) / "cache", not args.no_redis, kept=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
