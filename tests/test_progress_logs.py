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


def run_script(tmp_path, source: str, *, tty: bool, **env_overrides: str) -> tuple[str, str]:
    """Run ``source`` in a fresh process, its stderr a real terminal (a pty) or a pipe: (stderr, stdout)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "COLUMNS": "120", "TERM": "xterm", **env_overrides}
    if not tty:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr, proc.stdout
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
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=300) == 0, stdout
    return b"".join(chunks).decode("utf-8", "replace"), stdout


def run_slow_compile(tmp_path, *, tty: bool, **env_overrides: str) -> str:
    return run_script(tmp_path, SLOW_COMPILE, tty=tty, **env_overrides)[0]


def test_a_long_compile_shows_live_progress_on_a_terminal(tmp_path):
    shown = run_slow_compile(tmp_path, tty=True)
    assert "compiling SlowNet [compile forward]" in shown
    assert "SlowNet ready in" in shown


SLOW_CAPTURE = textwrap.dedent("""
    import random, sys, time, torch
    from torch import nn
    from aotcache.aot import aot_module

    class SlowCapture(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            time.sleep(1.6)  # Python run once while capturing: the display starts inside the capture
            return self.fc(x).relu()

    random.seed(0)
    expected = random.random()
    random.seed(0)
    compiled = aot_module(SlowCapture(), "nop", cache=False)
    with torch.no_grad():
        compiled(torch.randn(2, 4))
    assert "rich.style" in sys.modules, "the display never ran: the test no longer checks anything"
    print("random", random.random() == expected)
""")


def test_the_display_starting_inside_a_capture_neither_refuses_it_nor_moves_pythons_random(tmp_path):
    # rich draws from Python's random when imported; imported by the display thread a second into a capture,
    # the draw was taken for the function's own and the capture refused (NOTE [Importing rich moves Python's random])
    shown, out = run_script(tmp_path, SLOW_CAPTURE, tty=True)
    assert "cannot be captured whole" not in shown
    assert "compiling SlowCapture [capture]" in shown and "SlowCapture ready in" in shown
    assert "random True" in out


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


def test_stage_times_are_collected_per_compile_and_logged(info_logs):
    """NOTE [Stage times]: a cold miss reports capture, key, lookup, partition, compile and store times that
    add up to no more than the compile's total; a hit reports no compile stages."""
    from aotcache.progress import collecting_stages

    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(3, 4, requires_grad=True)
    with collecting_stages() as cold:
        aot_module(model, cache=cache)(x).sum().backward()
    with collecting_stages() as warm:
        aot_module(model, cache=cache)(x).sum().backward()
    assert len(cold) == 1 and len(warm) == 1
    stages = cold[0]
    for name in ("capture", "key", "lookup", "partition", "compile forward", "compile backward", "store"):
        assert stages[name] >= 0.0, name
    assert sum(seconds for name, seconds in stages.items() if name != "total") <= stages["total"]
    assert "compile forward" not in warm[0] and "store" not in warm[0]
    text = "\n".join(messages(info_logs, logging.INFO))
    assert "compile forward" in text and "partition" in text  # the breakdown in the compile's INFO event


def test_a_miss_warms_the_compilers_up_and_a_hit_does_not(monkeypatch):
    """NOTE [warming the compile workers]: the pipeline lets a named compiler start its background work once a
    miss is known, with the call's arguments; a hit compiles nothing and warms nothing."""
    from aotcache.compilers import nop

    calls = []
    monkeypatch.setattr(nop.nop_compiler, "warm_up", lambda example_inputs: calls.append(list(example_inputs)),
                        raising=False)
    cache = AOTAutogradCache(TieredCache([InMemoryCache()]), journal=False)
    model = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    aot_module(model, "nop", cache=cache)(x)
    assert calls and any(value is x for value in calls[0])
    calls.clear()
    aot_module(model, "nop", cache=cache)(x)
    assert calls == []
    aot_module(model, "nop", cache=False)(x)  # uncached: compile_function warms too
    assert calls


class SequentialScan(nn.Module):
    """A Python loop over the sequence length (Mamba's scan without a cache): each length is its own graph."""

    def __init__(self) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(x.shape[0], x.shape[2])
        outputs = []
        for step in range(x.shape[1]):
            state = state * self.decay + x[:, step]
            outputs.append(state)
        return torch.stack(outputs, dim=1)


def test_a_retrace_whose_signature_was_seen_says_its_shape_guards_failed(info_logs):
    # Mamba's no-cache generate traced once per token and logged "re-tracing MambaForCausalLM: a new signature"
    model = SequentialScan()
    wrapped = aot_module(model, cache=False)  # dynamic=None: the length becomes dynamic, but the loop pins it
    for length in (3, 4, 5, 6):
        x = torch.randn(2, length, 4)
        torch.testing.assert_close(wrapped(x), model(x))
    retraces = [m for m in messages(info_logs, logging.INFO) if "re-tracing SequentialScan" in m]
    assert len(retraces) == 3, retraces
    assert "dimensions made dynamic" in retraces[0]
    assert all("shape guards of every graph of this signature failed" in m for m in retraces[1:]), retraces
