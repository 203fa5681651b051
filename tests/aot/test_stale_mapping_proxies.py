"""A read-only mapping proxy (``types.MappingProxyType``, ``vars(cls)``) whose dict is written between calls (found in
session 23): eager's result, another graph; an equal value written back keeps the graph. NOTE [Mapping proxies
guarded as the mapping they show] in autograd_cache/reachable.py. Also a ``collections.ChainMap`` (NOTE [ChainMaps
by their maps]) and a ``memoryview`` (NOTE [memoryviews by content]).
"""

from __future__ import annotations

import collections
import struct
import types

import pytest
import torch
from torch import nn

import aotcache
from aotcache.autograd_cache.fingerprint import code_fingerprint

X = torch.ones(3)
SETTINGS = {"scale": 2.0}
SETTINGS_VIEW = types.MappingProxyType(SETTINGS)


def scaled_through_the_view(x):
    return x * SETTINGS_VIEW["scale"]


def test_a_write_behind_a_global_proxy_retraces_and_an_equal_value_keeps_the_graph():
    compiled = aotcache.aot_function(scaled_through_the_view, "nop", cache=False)
    try:
        assert torch.equal(compiled(X), X * 2.0)
        SETTINGS["scale"] = float("2.0")  # an equal value: the same program
        assert torch.equal(compiled(X), X * 2.0)
        assert compiled.num_compiles == 1
        SETTINGS["scale"] = 3.0
        assert torch.equal(compiled(X), X * 3.0)  # was the graph of 2.0
        assert compiled.num_compiles == 2
    finally:
        SETTINGS["scale"] = 2.0


class Scales:
    FACTOR = 2.0


CLASS_VIEW = vars(Scales)


def scaled_through_the_class_view(x):
    return x * CLASS_VIEW["FACTOR"]


def test_a_class_attribute_read_through_vars_of_the_class_retraces():
    compiled = aotcache.aot_function(scaled_through_the_class_view, "nop", cache=False)
    try:
        assert torch.equal(compiled(X), X * 2.0)
        Scales.FACTOR = 4.0
        assert torch.equal(compiled(X), X * 4.0)  # was the graph of 2.0
    finally:
        Scales.FACTOR = 2.0


class ViewedModel(nn.Module):
    def __init__(self, settings: dict):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.settings = types.MappingProxyType(settings)

    def forward(self, x):
        return self.linear(x) * self.settings["scale"]


def test_a_write_behind_a_module_attribute_proxy_retraces():
    settings = {"scale": 2.0}
    model = ViewedModel(settings)
    compiled = aotcache.compile(model, compiler="nop", cache=False)
    inputs = torch.ones(2, 3)
    assert torch.equal(compiled(inputs), model(inputs))
    compiled(inputs)
    assert compiled.compiled.num_compiles == 1
    settings["scale"] = 5.0
    assert torch.equal(compiled(inputs), model(inputs))  # was the graph of 2.0
    assert compiled.compiled.num_compiles == 2


DEFAULTS = {"scale": 2.0}
OVERRIDES: dict = {}
LAYERED = collections.ChainMap(OVERRIDES, DEFAULTS)


def scaled_through_the_layers(x):
    return x * LAYERED["scale"]


def test_a_key_set_in_a_chainmaps_first_layer_retraces_and_removed_finds_the_first_graph():
    """NOTE [ChainMaps by their maps]: a ChainMap was an opaque object, its dicts unguarded."""
    compiled = aotcache.aot_function(scaled_through_the_layers, "nop", cache=False)
    try:
        assert torch.equal(compiled(X), X * 2.0)
        OVERRIDES["scale"] = 3.0
        assert torch.equal(compiled(X), X * 3.0)  # was the graph of 2.0
        assert compiled.num_compiles == 2
        del OVERRIDES["scale"]
        assert torch.equal(compiled(X), X * 2.0)
        assert compiled.num_compiles == 2  # the first program again: its graph
    finally:
        OVERRIDES.clear()


def test_a_chainmaps_fingerprint_follows_its_layers():
    first = code_fingerprint(scaled_through_the_layers)
    OVERRIDES["scale"] = 3.0
    changed = code_fingerprint(scaled_through_the_layers)
    OVERRIDES.clear()
    again = code_fingerprint(scaled_through_the_layers)
    assert first.trusted, first.reason  # was untrusted: "opaque object: collections.ChainMap"
    assert first.digest == again.digest != changed.digest


BUFFER = bytearray(struct.pack("<d", 2.0))
BUFFER_VIEW = memoryview(BUFFER)


def scaled_through_the_memoryview(x):
    return x * struct.unpack("<d", BUFFER_VIEW)[0]


def test_a_write_to_the_buffer_behind_a_memoryview_retraces_and_an_equal_write_keeps_the_graph():
    """NOTE [memoryviews by content] in autograd_cache/byte_buffers.py (a strict xfail until session 27)."""
    compiled = aotcache.aot_function(scaled_through_the_memoryview, "nop", cache=False)
    try:
        assert torch.equal(compiled(X), X * 2.0)
        BUFFER[:] = struct.pack("<d", 2.0)  # the same bytes written again: the same program
        assert torch.equal(compiled(X), X * 2.0)
        assert compiled.num_compiles == 1
        BUFFER[:] = struct.pack("<d", 4.0)
        assert torch.equal(compiled(X), X * 4.0)  # was the graph of 2.0
        assert compiled.num_compiles == 2
        BUFFER[:] = struct.pack("<d", 2.0)
        assert torch.equal(compiled(X), X * 2.0)
        assert compiled.num_compiles == 2  # the first bytes' graph again
    finally:
        BUFFER[:] = struct.pack("<d", 2.0)


def test_a_memoryviews_fingerprint_follows_its_bytes_and_a_released_view_is_opaque():
    first = code_fingerprint(scaled_through_the_memoryview)
    assert first.trusted, first.reason  # was untrusted: "opaque object: memoryview"
    try:
        BUFFER[:] = struct.pack("<d", 4.0)
        assert code_fingerprint(scaled_through_the_memoryview).digest != first.digest
    finally:
        BUFFER[:] = struct.pack("<d", 2.0)
    assert code_fingerprint(scaled_through_the_memoryview).digest == first.digest
    global BUFFER_VIEW
    kept, BUFFER_VIEW = BUFFER_VIEW, memoryview(bytearray(8))
    try:
        BUFFER_VIEW.release()
        assert not code_fingerprint(scaled_through_the_memoryview).trusted
    finally:
        BUFFER_VIEW = kept


def test_a_memoryview_released_after_the_call_is_a_changed_program_not_an_error():
    global BUFFER_VIEW
    kept, BUFFER_VIEW = BUFFER_VIEW, memoryview(bytearray(struct.pack("<d", 3.0)))
    try:
        compiled = aotcache.aot_function(lambda x: scaled_through_the_memoryview(x), "nop", cache=False)
        assert torch.equal(compiled(X), X * 3.0)
        BUFFER_VIEW.release()
        with pytest.raises(ValueError, match="released"):  # eager's own error, as eager raises it
            compiled(X)
    finally:
        BUFFER_VIEW = kept
