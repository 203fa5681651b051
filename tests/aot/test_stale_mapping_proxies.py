"""A read-only mapping proxy (``types.MappingProxyType``, ``vars(cls)``) whose dict is written between calls (found in
session 23): eager's result, another graph; an equal value written back keeps the graph. NOTE [Mapping proxies
guarded as the mapping they show] in autograd_cache/reachable.py.
"""

from __future__ import annotations

import types

import torch
from torch import nn

import aotcache

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
