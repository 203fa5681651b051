"""Values a program reads that changed without the walk seeing a change (found in session 21): an iterator each call
advances (NOTE [Iterators a program advances]), a ``bytearray`` / ``array.array`` changed in place (NOTE [Byte
buffers by content]), a numpy array's ``flags.writeable``, a NaN's sign (NOTE [NaNs written down by bits]), and a
module attribute read by ``getattr`` (NOTE [Module attributes read by getattr]). Each: eager's result after the
change, the graph kept while nothing changes, and the fingerprint across processes."""

from __future__ import annotations

import array
import collections
import io
import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import aotcache
from aotcache.aot.fallback import fallback_counts
from aotcache.autograd_cache.fingerprint import code_fingerprint
from tests.conftest import run_python

X = torch.ones(3)

_ROUTES = {
    "aot_module": lambda model: aotcache.aot_module(model, "nop", cache=False),
    "compile": lambda model: aotcache.compile(model, compiler="nop", cache=False),
}

# ----------------------------------------------------------------------------------------------------
# iterators
# ----------------------------------------------------------------------------------------------------

COUNTER = itertools.count()


def scaled_by_the_next_count(x):
    return x * next(COUNTER)


def test_a_global_counter_advances_once_per_call_as_in_eager(monkeypatch):
    monkeypatch.setitem(globals(), "COUNTER", itertools.count())
    compiled = aotcache.aot_function(scaled_by_the_next_count, "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]  # was 1, 1, 1: drawn twice, then baked
    assert next(COUNTER) == 3
    assert compiled.num_compiles == 1  # refused once, the fallback kept for the signature


class CountsItsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.steps = itertools.count(1)

    def forward(self, x):
        return self.fc(x) * next(self.steps)


@pytest.mark.parametrize("route", list(_ROUTES))
def test_a_counter_attribute_advances_once_per_call_as_in_eager(route):
    torch.manual_seed(0)
    model, twin = CountsItsCalls(), CountsItsCalls()
    twin.load_state_dict(model.state_dict())
    compiled = _ROUTES[route](model)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), twin(X))  # was the first draw at every call
    assert next(model.steps) == next(twin.steps) == 4


def test_a_generator_global_is_drawn_once_per_call(monkeypatch):
    monkeypatch.setitem(globals(), "SCALES", (float(k) for k in range(10)))

    def scaled_by_the_next_draw(x):
        return x * next(SCALES)

    compiled = aotcache.aot_function(scaled_by_the_next_draw, "nop", cache=False)
    assert [compiled(X)[0].item() for _ in range(3)] == [0.0, 1.0, 2.0]


def test_a_program_without_iterators_is_captured_and_a_counter_is_untrusted_across_processes():
    before = fallback_counts().get("partial:unsupported_construct", 0)
    offsets = [1.0, 2.0]
    log = io.StringIO()  # a file-like object held, not drawn from: no refusal

    def shifted(x):
        return x + offsets[0] if log is not None else x

    compiled = aotcache.aot_function(shifted, "nop", cache=False)
    compiled(X)
    compiled(X)
    assert compiled.num_compiles == 1
    assert fallback_counts().get("partial:unsupported_construct", 0) == before
    fingerprint = code_fingerprint(scaled_by_the_next_count)
    assert not fingerprint.trusted and "itertools.count" in fingerprint.reason, fingerprint.reason


# ----------------------------------------------------------------------------------------------------
# bytearray, array.array, numpy flags
# ----------------------------------------------------------------------------------------------------

TABLE = bytearray(b"\x02\x03")
WEIGHTS = array.array("d", [2.0, 3.0])


def scaled_by_a_byte(x):
    return x * TABLE[0]


def scaled_by_an_array_entry(x):
    return x * WEIGHTS[0]


@pytest.mark.parametrize("fn, name, make, change", [
    (scaled_by_a_byte, "TABLE", lambda: bytearray(b"\x02\x03"), lambda t: t.__setitem__(0, 5)),
    (scaled_by_an_array_entry, "WEIGHTS", lambda: array.array("d", [2.0, 3.0]), lambda t: t.__setitem__(0, 5.0)),
], ids=["bytearray", "array"])
def test_a_byte_buffer_changed_in_place_retraces_and_an_unchanged_one_keeps_the_graph(fn, name, make, change,
                                                                                      monkeypatch):
    monkeypatch.setitem(globals(), name, make())
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    compiled(X)
    walks = compiled.num_program_walks
    compiled(X)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == walks  # steady: the guards only
    change(globals()[name])
    torch.testing.assert_close(compiled(X), X * 5)  # was X * 2: the graph of the old content
    assert compiled.num_compiles == 2
    monkeypatch.setitem(globals(), name, make())  # rebound to an equal one: a walk, the first graph again
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 2


class ReadsByteBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask = bytearray(b"\x01\x02")
        self.gains = array.array("f", [2.0])

    def forward(self, x):
        return x * self.mask[1] * self.gains[0]


@pytest.mark.parametrize("route", list(_ROUTES))
def test_byte_buffer_attributes_changed_in_place_give_eagers_result(route):
    model = ReadsByteBuffers()
    compiled = _ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))
    model.mask[1] = 3
    torch.testing.assert_close(compiled(X), model(X))
    model.gains[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))
    traces = compiled.compiled.num_compiles
    compiled(X)
    assert compiled.compiled.num_compiles == traces == 3


FLAGGED = np.array([1.0, 2.0])


def scaled_by_writeability(x):
    return x * (2 if FLAGGED.flags.writeable else 3)


def test_a_numpy_arrays_writeable_flag_cleared_retraces(monkeypatch):
    monkeypatch.setitem(globals(), "FLAGGED", np.array([1.0, 2.0]))
    compiled = aotcache.aot_function(scaled_by_writeability, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    FLAGGED.flags.writeable = False
    torch.testing.assert_close(compiled(X), X * 3)  # was X * 2
    assert compiled.num_compiles == 2
    compiled(X)
    assert compiled.num_compiles == 2


def test_the_fingerprint_holds_byte_buffers_and_numpy_flags_by_content(monkeypatch):
    digests = []
    for value in (bytearray(b"\x02\x03"), bytearray(b"\x02\x03"), bytearray(b"\x02\x04")):
        monkeypatch.setitem(globals(), "TABLE", value)
        fingerprint = code_fingerprint(scaled_by_a_byte)
        assert fingerprint.trusted, fingerprint.reason
        digests.append(fingerprint.digest)
    for value in (array.array("d", [2.0, 3.0]), array.array("f", [2.0, 3.0])):
        monkeypatch.setitem(globals(), "WEIGHTS", value)
        digests.append(code_fingerprint(scaled_by_an_array_entry).digest)
    flagged = np.array([1.0, 2.0])
    monkeypatch.setitem(globals(), "FLAGGED", flagged)
    digests.append(code_fingerprint(scaled_by_writeability).digest)
    flagged.flags.writeable = False
    digests.append(code_fingerprint(scaled_by_writeability).digest)
    assert digests[0] == digests[1] and len(set(digests)) == len(digests) - 1
    monkeypatch.setitem(globals(), "TABLE", bytearray(1 << 17))  # beyond what the guards compare at every call
    assert not code_fingerprint(scaled_by_a_byte).trusted


BYTE_TABLE_SCRIPT = """
import json, sys, torch
import aotcache
from aotcache.autograd_cache.cache import default_cache

TABLE = bytearray([int(sys.argv[1]), 1])

def scaled_by_a_byte(x):
    return x * TABLE[0]

x = torch.ones(3)
out = aotcache.aot_function(scaled_by_a_byte, "nop")(x)
print(json.dumps({"same": torch.equal(out, scaled_by_a_byte(x)), **default_cache().counters}))
"""


def test_processes_with_other_byte_tables_each_get_their_eager_result():
    def run(value):
        code = f"import sys; sys.argv = ['table', {value!r}]; exec({BYTE_TABLE_SCRIPT!r})"
        return json.loads(run_python(code).stdout.strip().splitlines()[-1])

    first, other, again = run("2"), run("5"), run("2")
    assert first["same"] and other["same"] and again["same"]
    assert other.get("fingerprint_hit", 0) == 0 and again.get("fingerprint_hit", 0) == 1


# ----------------------------------------------------------------------------------------------------
# NaN signs
# ----------------------------------------------------------------------------------------------------

NAN = float("nan")


def signed_like_the_nan(x):
    return x * math.copysign(1.0, NAN)


def test_a_global_nan_rebound_to_the_negative_nan_retraces(monkeypatch):
    monkeypatch.setitem(globals(), "NAN", float("nan"))
    compiled = aotcache.aot_function(signed_like_the_nan, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X)
    monkeypatch.setitem(globals(), "NAN", -float("nan"))
    torch.testing.assert_close(compiled(X), -X)  # was X: repr() writes both NaNs as 'nan'
    monkeypatch.setitem(globals(), "NAN", float("nan"))  # another NaN object with the first's bits: its graph
    torch.testing.assert_close(compiled(X), X)
    assert compiled.num_compiles == 2


def test_the_fingerprint_and_the_key_tell_the_nans_apart(monkeypatch):
    from torch.utils import _pytree as pytree

    from aotcache.aot.api import AOTOptions
    from aotcache.autograd_cache.fingerprint import fingerprint_call
    from aotcache.autograd_cache.key import canonical_graph

    monkeypatch.setitem(globals(), "NAN", float("nan"))
    positive = code_fingerprint(signed_like_the_nan).digest
    monkeypatch.setitem(globals(), "NAN", -float("nan"))
    assert code_fingerprint(signed_like_the_nan).digest != positive

    def signed_like(x, value):
        return x * math.copysign(1.0, value)

    def call_digest(value):
        flat, spec = pytree.tree_flatten(((X, value), {}))
        return fingerprint_call(signed_like, flat, spec, AOTOptions()).digest

    assert call_digest(float("nan")) == call_digest(float("nan")) != call_digest(-float("nan"))

    def graph_adding(value):
        gm = torch.fx.symbolic_trace(lambda x: torch.add(x, value))
        return canonical_graph(gm)

    assert graph_adding(float("nan")) == graph_adding(float("nan")) != graph_adding(-float("nan"))


NAN_ARGUMENT_SCRIPT = """
import json, math, sys, torch
import aotcache

def signed_like(x, value):
    return x * math.copysign(1.0, value)

x = torch.ones(3)
value = -float("nan") if sys.argv[1] == "negative" else float("nan")
out = aotcache.aot_function(signed_like, "nop")(x, value)
print(json.dumps({"same": torch.equal(out, signed_like(x, value))}))
"""


def test_a_warm_process_with_the_other_nan_argument_gives_eagers_result():
    def run(sign):
        code = f"import sys; sys.argv = ['nan', {sign!r}]; exec({NAN_ARGUMENT_SCRIPT!r})"
        return json.loads(run_python(code).stdout.strip().splitlines()[-1])["same"]

    assert run("positive") and run("negative") and run("positive")


# ----------------------------------------------------------------------------------------------------
# module attributes read by getattr
# ----------------------------------------------------------------------------------------------------

K = 2.0
ATTRIBUTE = "K"


def by_a_constant_name(x):
    return x * getattr(sys.modules[__name__], "K")


def by_a_computed_name(x):
    return x * getattr(sys.modules[__name__], ATTRIBUTE)


@pytest.mark.parametrize("fn", [by_a_constant_name, by_a_computed_name], ids=lambda fn: fn.__name__)
def test_a_module_attribute_read_by_getattr_changed_retraces(fn, monkeypatch):
    compiled = aotcache.aot_function(fn, "nop", cache=False)
    torch.testing.assert_close(compiled(X), X * 2)
    compiled(X)
    walks = compiled.num_program_walks
    compiled(X)
    assert compiled.num_compiles == 1 and compiled.num_program_walks == walks  # steady: the guards only
    monkeypatch.setitem(globals(), "K", 5.0)
    torch.testing.assert_close(compiled(X), X * 5)  # was X * 2
    monkeypatch.setitem(globals(), "K", 2.0)
    torch.testing.assert_close(compiled(X), X * 2)
    assert compiled.num_compiles == 2 or fn is by_a_computed_name  # (a computed name: globals by identity)


def test_the_fingerprint_of_getattr_on_a_module(monkeypatch):
    first = code_fingerprint(by_a_constant_name)
    monkeypatch.setitem(globals(), "K", 5.0)
    second = code_fingerprint(by_a_constant_name)
    assert first.trusted and second.trusted and first.digest != second.digest, first.reason
    computed = code_fingerprint(by_a_computed_name)
    assert not computed.trusted and "computed name" in computed.reason, computed.reason

    class Layers:
        layer0 = 1.0

    def by_a_computed_attribute_of_an_object(x):  # no module read by getattr: still trusted
        return x * getattr(Layers, f"layer{0}")

    assert code_fingerprint(by_a_computed_attribute_of_an_object).trusted


# ----------------------------------------------------------------------------------------------------
# dict subclasses (NOTE [Attributes of container subclasses])
# ----------------------------------------------------------------------------------------------------


class Config(dict):
    """A config dict that also keeps a setting as an attribute."""

    def __init__(self, **entries) -> None:
        super().__init__(**entries)
        self.mode = "double"


class AttrDict(dict):
    """Entries read as attributes: its own ``__dict__``."""

    def __init__(self, **entries) -> None:
        super().__init__(**entries)
        self.__dict__ = self


class ReadsDictConfigs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ordered = collections.OrderedDict(scale=2.0)
        self.counts = collections.defaultdict(float, bias=1.0)
        self.config = Config(shift=0.5)
        self.attrs = AttrDict(gain=3.0)

    def forward(self, x):
        scale = self.ordered["scale"] * (2 if self.config.mode == "double" else 3)
        return x * scale + self.counts["bias"] + self.config["shift"] + self.attrs.gain


@pytest.mark.parametrize("route", list(_ROUTES))
def test_dict_subclass_configs_changed_in_place_give_eagers_result_and_unchanged_keep_the_graph(route):
    model = ReadsDictConfigs()
    compiled = _ROUTES[route](model)
    changes = [lambda: model.ordered.__setitem__("scale", 5.0), lambda: model.counts.__setitem__("bias", 2.0),
               lambda: model.config.__setitem__("shift", 1.5), lambda: setattr(model.config, "mode", "triple"),
               lambda: setattr(model.attrs, "gain", 4.0)]
    torch.testing.assert_close(compiled(X), model(X))
    for change in changes:
        change()
        torch.testing.assert_close(compiled(X), model(X))  # the config attribute: was the "double" graph
    traces = compiled.compiled.num_compiles
    compiled(X)
    compiled(X)
    assert compiled.compiled.num_compiles == traces == 1 + len(changes)


def test_the_fingerprint_holds_a_dict_subclass_attributes_and_default_factory():
    config = Config(shift=0.5)
    counts = collections.defaultdict(float)

    def reads(x):
        return x * (2 if config.mode == "double" else 3) + counts["missing"]

    first = code_fingerprint(reads)
    config.mode = "triple"
    second = code_fingerprint(reads)
    config.mode = "double"
    counts.default_factory = int
    third = code_fingerprint(reads)
    counts.default_factory = float
    again = code_fingerprint(reads)
    assert first.trusted, first.reason
    assert len({first.digest, second.digest, third.digest}) == 3 and again.digest == first.digest


FROZEN_SCRIPT = """
from diffusers.configuration_utils import FrozenDict
from aotcache.autograd_cache.fingerprint import code_fingerprint

config = FrozenDict(scale=2.0, _use_default_values=list({"a", "b", "c", "d", "e"}))

def scaled(x):
    return x * config["scale"]

fingerprint = code_fingerprint(scaled)
print(fingerprint.trusted, fingerprint.digest)
"""


def test_a_frozen_dicts_mirrored_attributes_keep_the_fingerprint_the_same_in_every_process():
    """diffusers' FrozenDict mirrors each entry as an attribute, ``_use_default_values`` (a list made from a set)
    included: written down as the entries are (NOTE [Set-ordered library metadata])."""
    pytest.importorskip("diffusers")
    outputs = {run_python(FROZEN_SCRIPT, env={"PYTHONHASHSEED": seed}).stdout.strip().splitlines()[-1]
               for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and outputs.pop().startswith("True "), outputs
