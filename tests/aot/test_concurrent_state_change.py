"""A call whose key was read before another thread's call changed the module's state (found while reviewing
NOTE [Replaying a call's state change]; an in-process race of its own, with or without a cache)."""

from __future__ import annotations

import threading

import torch

import aotcache


class SetsModeOnce(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.mode = None

    def forward(self, x):
        if self.mode is None:
            self.mode = "x"
            return self.lin(x).sum() * 3.0
        return self.lin(x).sum()


def test_a_graph_traced_after_another_threads_change_is_not_kept_under_the_old_states_key():
    # found in review: the call's settings id was read before it took the compile lock; the graph traced after
    # another thread's change was kept under the old state's key, and a later call from the old state ran it
    # (no change made, the other branch). NOTE [A key read before another thread's change] in aot/api.py
    model, eager = SetsModeOnce(), SetsModeOnce()
    compiled = aotcache.aot_module(model, "nop", cache=False)
    function = compiled.compiled
    x = torch.ones(2, 4)
    waiting = threading.Event()
    watch = function._watch

    def spy(extra):
        waiting.set()  # this call's settings id is read (the state before), and it waits for the lock now
        return watch(extra)

    function._watch = spy
    results = []
    with function._lock:
        thread = threading.Thread(target=lambda: results.append(compiled(x)))
        thread.start()
        assert waiting.wait(60)
        model.mode = "x"  # as another thread's first call leaves it
    thread.join(60)
    function._watch = watch
    model.mode = eager.mode = None  # the state before again: eager makes the change and takes its branch
    assert torch.equal(compiled(x), eager(x)) and model.mode == eager.mode == "x"
