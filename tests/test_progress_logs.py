"""Live compile progress on a terminal (a real pty) and the INFO / warning events of compiles, hits, bypasses,
fingerprint fallbacks and re-traces (NOTE [Compile progress], NOTE [Events at INFO])."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from aotcache import logs
from aotcache.aot import aot_module
from aotcache.autograd_cache.cache import AOTAutogradCache
from aotcache.store.memory import InMemoryCache
from aotcache.store.tiered import TieredCache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLOW_COMPILE = textwrap.dedent("""
    import time, torch
    from torch import nn
    from aotcache.aot import aot_module

    def slow_compiler(gm, example_inputs):
        time.sleep(1.8)  # a compile longer than the display threshold
        return gm

    class SlowNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu()

    with torch.no_grad():
        aot_module(SlowNet(), slow_compiler, cache=False)(torch.randn(2, 4))
    print("done")
""")


def run_slow_compile(tmp_path, *, tty: bool, **env_overrides: str) -> str:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_COMPILE)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "COLUMNS": "120", "TERM": "xterm", **env_overrides}
    if not tty:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_long_compile_shows_live_progress_on_a_terminal(tmp_path):
    shown = run_slow_compile(tmp_path, tty=True)
    assert "compiling SlowNet [compile forward]" in shown
    assert "SlowNet ready in" in shown


@pytest.mark.parametrize("tty, env", [(True, {"AOTCACHE_PROGRESS": "0"}), (False, {})])
def test_no_progress_when_turned_off_or_not_a_terminal(tmp_path, tty, env):
    shown = run_slow_compile(tmp_path, tty=tty, **env)
    assert "compiling SlowNet" not in shown and "SlowNet ready" not in shown


class Holder:
    """An output type pytree does not know: the graph is compiled but not cached."""

    def __init__(self, tensor):
        self.tensor = tensor


class ReturnsHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return Holder(self.fc(x))


@pytest.fixture
def info_logs(monkeypatch, caplog):
    monkeypatch.setenv("AOTCACHE_LOG_LEVEL", "info")
    monkeypatch.setattr(logs, "_seen", set())  # "once" is observable in this test
    caplog.set_level(logging.INFO, logger="aotcache")
    return caplog


def messages(caplog, level=None):
    return [record.getMessage() for record in caplog.records if level is None or record.levelno == level]


def test_compiles_hits_and_retraces_are_logged_at_info_with_their_reason(info_logs):
    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    wrapped = aot_module(model, cache=cache, dynamic=False)
    wrapped(torch.randn(3, 4))
    wrapped(torch.randn(5, 4))
    aot_module(model, cache=cache, dynamic=False)(torch.randn(3, 4))
    automatic = aot_module(model, cache=cache)  # dynamic=None: the changed size is compiled as dynamic
    automatic(torch.randn(3, 4))
    automatic(torch.randn(6, 4))
    text = "\n".join(messages(info_logs, logging.INFO))
    assert text.count("Sequential ready in") == 5 and text.count("compiled in") == 3
    assert "cache miss" in text and "stored" in text
    assert "re-tracing Sequential: flat argument 2: shape (3, 4) -> (5, 4) (only sizes changed: dynamic=True" in text
    assert "re-tracing Sequential: flat argument 2: dimensions made dynamic: shape (3, 4) -> (None, 4)" in text
    assert "cache hit" in text


def test_a_bypass_is_logged_and_warned_once_with_the_fix(info_logs):
    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    for _ in range(2):
        aot_module(ReturnsHolder(), cache=cache)(torch.randn(2, 4))
    warnings = [m for m in messages(info_logs, logging.WARNING) if "will not be cached" in m]
    assert len(warnings) == 1
    assert "object output" in warnings[0] and "register_pytree_node" in warnings[0]
    assert sum("not cached (object output" in m for m in messages(info_logs, logging.INFO)) == 2


def test_an_untrusted_fingerprint_warns_once_that_warm_starts_trace(info_logs):
    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    model = nn.Linear(4, 4)
    model.register_full_backward_hook(lambda *args: None)
    aot_module(model, cache=cache)(torch.randn(2, 4))
    warnings = [m for m in messages(info_logs, logging.WARNING) if "must trace it again" in m]
    assert len(warnings) == 1 and "module backward hooks" in warnings[0] and "read gradients from .grad" in warnings[0]
