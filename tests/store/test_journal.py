"""StatsJournal: counters summed in memory, merged into one JSON file across real processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from aotcache import config
from aotcache.logs import CacheFault
from aotcache.store.interface import CacheError
from aotcache.store.journal import StatsJournal, default_journal, default_journal_path
from tests.conftest import REPO_ROOT, run_python


@pytest.fixture
def journal(tmp_path):
    return StatsJournal(tmp_path / "journal" / "stats.json")


def test_add_accumulates_and_flush_merges_into_the_file(journal):
    journal.add("tier:disk", {"hits": 2, "get_seconds": 0.5})
    journal.add("tier:disk", {"hits": 3, "misses": 1})
    assert journal.read(include_pending=False) == {}
    assert journal.read() == {"tier:disk": {"hits": 5, "misses": 1, "get_seconds": 0.5}}
    assert journal.flush() is True
    assert journal.pending() == {}
    journal.add("tier:disk", {"hits": 1})
    journal.add("cli", {"runs": 1})
    journal.flush()
    journal.flush()  # nothing pending: no double counting
    on_disk = json.loads(journal.path.read_text())
    assert on_disk["format"] == "aotcache-stats"
    assert on_disk["sections"] == {"tier:disk": {"hits": 6, "misses": 1, "get_seconds": 0.5}, "cli": {"runs": 1}}


def test_a_second_journal_object_sees_the_first_ones_totals(journal):
    journal.add("s", {"n": 4})
    journal.flush()
    other = StatsJournal(journal.path)
    other.add("s", {"n": 1})
    assert other.read() == {"s": {"n": 5}}
    other.flush()
    assert journal.read() == {"s": {"n": 5}}


def test_reset_forgets_file_and_pending(journal):
    journal.add("s", {"n": 1})
    journal.flush()
    journal.add("s", {"n": 2})
    journal.reset()
    assert journal.read() == {} and not journal.path.exists()
    StatsJournal(journal.path.parent / "missing-dir" / "stats.json").reset()  # no directory: a no-op


def test_collectors_are_polled_at_flush(journal):
    calls = []

    def collector():
        calls.append(1)
        return {"tier:memory": {"hits": 1}}

    journal.add_collector(collector)
    journal.flush()
    journal.flush()
    assert journal.read(include_pending=False) == {"tier:memory": {"hits": 2}}
    assert len(calls) == 2


def test_corrupt_journal_is_treated_as_empty_and_logged_once(journal, caplog):
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        assert journal.read() == {}
        assert journal.read() == {}
        journal.add("s", {"n": 1})
        assert journal.flush() is True
    assert sum("unreadable" in record.getMessage() for record in caplog.records) == 1
    assert journal.read() == {"s": {"n": 1}}


@pytest.mark.parametrize("content", ['{"format": "other", "sections": {}}', '{"format": "aotcache-stats", '
                                     '"sections": {"s": {"n": "three"}}}', "[1, 2]"])
def test_malformed_journal_is_treated_as_empty(journal, content):
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text(content)
    assert journal.read() == {}


def test_bad_counts_are_clear_errors(journal):
    with pytest.raises(CacheError, match="section"):
        journal.add("", {"n": 1})
    with pytest.raises(CacheError, match="s/n"):
        journal.add("s", {"n": "1"})
    with pytest.raises(CacheError, match="finite"):
        journal.add("s", {"n": float("nan")})


def test_unwritable_journal_keeps_counts_pending(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    journal = StatsJournal(blocker / "stats.json")  # its directory is a regular file
    journal.add("s", {"n": 1})
    with caplog.at_level(logging.WARNING, logger="aotcache"):
        assert journal.flush() is False
    assert journal.pending() == {"s": {"n": 1}}
    assert any("could not write the stats journal" in record.getMessage() for record in caplog.records)
    with config.patch(strict=True), pytest.raises(CacheFault):
        journal.flush()
    assert journal.pending() == {"s": {"n": 1}}


def test_default_journal_lives_in_cache_dir(isolated_cache_dir):
    assert default_journal_path() == isolated_cache_dir / "stats.json"
    assert default_journal() is default_journal()
    assert default_journal().path == isolated_cache_dir / "stats.json"


def test_journal_across_two_processes(tmp_path):
    path = tmp_path / "stats.json"
    # First process: counts flushed only by the at-exit hook.
    run_python(
        "from aotcache.store.journal import StatsJournal\n"
        f"journal = StatsJournal({str(path)!r})\n"
        "journal.register_at_exit()\n"
        "journal.add('tier:disk', {'hits': 3, 'misses': 1})\n"
    )
    # Second process: the tiered cache feeds it; explicit flush.
    run_python(
        "from aotcache.store.journal import StatsJournal\n"
        "from aotcache.store.memory import InMemoryCache\n"
        "from aotcache.store.tiered import TieredCache\n"
        f"journal = StatsJournal({str(path)!r})\n"
        "cache = TieredCache([InMemoryCache()])\n"
        "cache.attach_journal(journal)\n"
        "cache.insert('k', b'v'); cache.get('k'); cache.get('k')\n"
        "assert journal.flush()\n"
    )
    totals = StatsJournal(path).read()
    assert totals["tier:disk"] == {"hits": 3, "misses": 1}
    assert totals["tier:memory"]["hits"] == 2 and totals["tier:memory"]["inserts"] == 1


_CONCURRENT_FLUSHER = """
import sys
from aotcache.store.journal import StatsJournal
journal = StatsJournal(sys.argv[1])
for _ in range(40):
    journal.add("race", {"n": 1, "half": 0.5})
    assert journal.flush()
"""


def test_concurrent_flushes_from_two_processes_lose_nothing(tmp_path):
    path = tmp_path / "stats.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_FLUSHER, str(path)], env=env) for _ in range(2)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    assert StatsJournal(path).read() == {"race": {"n": 80, "half": 40.0}}
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


FORK_CHILD = """
import os, sys
from aotcache.store.journal import StatsJournal
journal = StatsJournal(sys.argv[1])
journal.add("s", {"n": 1})
pid = os.fork()
if pid == 0:  # child
    code = 1
    try:
        journal.add("s", {"n": 10})
        code = 0 if journal.flush() else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
journal.flush()
print(journal.read())
"""


def test_forked_child_does_not_flush_the_parents_pending_counts(journal):
    # forked from a fresh process: a fork of the test worker inherits its other threads' locks (a tqdm monitor,
    # execnet's receiver) and once hung in the child, a hazard of fork itself, not of the journal
    code = f"import sys; sys.argv = ['fork', {str(journal.path)!r}]; exec(compile({FORK_CHILD!r}, 'fork', 'exec'))"
    run_python(code, timeout=120)
    assert journal.read() == {"s": {"n": 11}}
