"""numpy arrays a program reads, changed in place or rebound between calls (NOTE [numpy arrays by content] in
aotcache/autograd_cache/byte_buffers.py; found in session 20): eager's result, and an unchanged or equal array
keeps the graph. Across processes the fingerprint holds the array's content."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import aotcache
from aotcache.autograd_cache.fingerprint import code_fingerprint

X = torch.ones(3)
SCALES = np.array([2.0, 3.0])
LARGE = np.zeros(1 << 15)  # 256 KiB: beyond what the guards compare at every call


def scaled_by_a_global_array(x):
    return x * float(SCALES[0])


def test_global_array_changed_in_place_retraces_and_an_equal_content_keeps_the_graph(monkeypatch):
    monkeypatch.setitem(globals(), "SCALES", np.array([2.0, 3.0]))
    compiled = aotcache.aot_function(scaled_by_a_global_array, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    SCALES[0] = 7.0
    torch.testing.assert_close(compiled(X), X * 7)  # was X * 2: the graph of the old content
    assert compiled.num_compiles == 2
    compiled(X)
    walks = compiled.num_program_walks
    compiled(X)
    assert compiled.num_compiles == 2 and compiled.num_program_walks == walks  # steady: the guards only
    SCALES[1] = 9.0  # changes the bytes, not what the program computes: a walk, another content, a trace
    torch.testing.assert_close(compiled(X), X * 7)
    SCALES[:] = [2.0, 3.0]  # the first content again: its graph, no trace
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 3


class ScalesFromAnArray(nn.Module):
    def __init__(self):
        super().__init__()
        self.scales = np.array([2.0, 3.0], dtype=np.float32)

    def forward(self, x):
        return x * torch.from_numpy(self.scales)[0]


def test_module_array_attribute_changed_in_place_or_rebound_gives_eagers_result():
    model = ScalesFromAnArray()
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    torch.testing.assert_close(compiled(X), model(X))
    model.scales[0] = 5.0
    torch.testing.assert_close(compiled(X), model(X))
    model.scales = np.array([4.0, 3.0], dtype=np.float32)
    torch.testing.assert_close(compiled(X), model(X))
    traces = compiled.compiled.num_compiles
    compiled(X)
    assert compiled.compiled.num_compiles == traces == 3  # unchanged: no trace


def test_the_fingerprint_holds_an_arrays_content(monkeypatch):
    monkeypatch.setitem(globals(), "SCALES", np.array([2.0, 3.0]))
    first = code_fingerprint(scaled_by_a_global_array)
    monkeypatch.setitem(globals(), "SCALES", np.array([2.0, 3.0]))
    equal = code_fingerprint(scaled_by_a_global_array)
    monkeypatch.setitem(globals(), "SCALES", np.array([2.0, 4.0]))
    other = code_fingerprint(scaled_by_a_global_array)
    monkeypatch.setitem(globals(), "SCALES", np.array([2.0, 3.0], dtype=np.float32))
    other_dtype = code_fingerprint(scaled_by_a_global_array)
    assert first.trusted and equal.trusted and other.trusted, first.reason
    assert first.digest == equal.digest
    assert len({first.digest, other.digest, other_dtype.digest}) == 3


def test_an_array_of_objects_or_a_large_array_leaves_the_fingerprint_untrusted():
    holder = {"objects": np.array([1, "a"], dtype=object)}
    assert not code_fingerprint(lambda x: x * len(holder["objects"])).trusted
    assert not code_fingerprint(lambda x: x * float(LARGE[0])).trusted
