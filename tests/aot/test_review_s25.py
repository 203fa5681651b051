"""Session 25 review: stale in-process results around constants holding objects and lru_cache values.

- NOTE [Objects compared by identity inside a constant] (aot/exact_values.py): a frozen dataclass or frozenset
  argument holding a plain object changed in place, an ``attrs`` class compared by its own ``==``.
- NOTE [Cached values the capture made] (autograd_cache/program_guards.py): a mutable value a ``functools.cache``
  function first computed during the capture, changed in place afterwards.
- NOTE [Trace tensors an lru_cache keeps] (autograd_cache/program_restore.py): a cached tensor computed during
  the capture was left in the cache as a trace tensor (eager then raised).
- NOTE [Cached values a fingerprint vouches for] (autograd_cache/lru_cache_values.py): a value an eager call cached
  under another setting was loaded through the fingerprint of the new one.
- NOTE [Attribute getters as values] (autograd_cache/reachable.py): an iterator read through an
  ``operator.attrgetter`` made in ``__init__`` kept the capture's draw.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator

import pytest
import torch
from torch import nn

import aotcache
from tests.conftest import run_python

X = torch.ones(2, 4)

_FUNCTION_ROUTES = {
    "aot_function": lambda fn: aotcache.aot_function(fn, "nop", cache=False),
    "compile": lambda fn: aotcache.compile(fn, compiler="nop", cache=False),
}
_MODULE_ROUTES = {
    "aot_module": lambda model: aotcache.aot_module(model, "nop", cache=False),
    "compile": lambda model: aotcache.compile(model, compiler="nop", cache=False),
}


def _compiles(compiled) -> int:
    return getattr(compiled, "compiled", compiled).num_compiles


# -- constants holding objects ------------------------------------------------------------------------------


class Options:
    """A plain object, compared by identity."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


@dataclasses.dataclass(frozen=True)
class Config:
    options: Options


def scaled_by_config(x, config):
    return x * config.options.scale


def scaled_by_member(x, members):
    return x * next(iter(members)).scale


@pytest.mark.parametrize("route", list(_FUNCTION_ROUTES))
@pytest.mark.parametrize("fn, wrap", [(scaled_by_config, Config), (scaled_by_member, lambda o: frozenset({o}))])
def test_an_object_inside_a_constant_changed_in_place_gives_eagers_new_result(route, fn, wrap):
    options = Options(2.0)
    constant = wrap(options)
    compiled = _FUNCTION_ROUTES[route](fn)
    torch.testing.assert_close(compiled(X, constant), fn(X, constant))
    torch.testing.assert_close(compiled(X, constant), fn(X, constant))
    assert _compiles(compiled) == 1  # unchanged: the same graph
    options.scale = 3.0
    torch.testing.assert_close(compiled(X, constant), fn(X, constant))  # was the graph of 2.0


def test_an_attrs_class_is_compared_by_its_whole_state():
    attrs = pytest.importorskip("attrs")

    @attrs.frozen
    class Factor:
        k: object

    def scaled(x, factor):
        return x * factor.k

    ints = torch.ones(3, dtype=torch.int64)
    for route in _FUNCTION_ROUTES.values():
        compiled = route(scaled)
        assert compiled(ints, Factor(1)).dtype == torch.int64
        result, expected = compiled(ints, Factor(1.0)), scaled(ints, Factor(1.0))
        assert result.dtype == expected.dtype == torch.float32  # was the int graph (``Factor(1) == Factor(1.0)``)
        compiled(ints, Factor(1.0))
        assert _compiles(compiled) == 2


# -- lru_cache values -----------------------------------------------------------------------------------------

SETTINGS = {"scale": 2.0}


@functools.cache
def cached_table() -> list:
    return [SETTINGS["scale"], 1.0]


@functools.cache
def cached_positions(n: int) -> torch.Tensor:
    return torch.arange(float(n))


@functools.cache
def cached_scale() -> float:
    return SETTINGS["scale"]


@functools.lru_cache(maxsize=8)
def bounded_table() -> list:
    return [SETTINGS["scale"], 1.0]


class Reads(nn.Module):
    def __init__(self, read):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.read = read

    def forward(self, x):
        return self.read(self.lin(x))


def read_table(h):
    return h * cached_table()[0]


def read_positions(h):
    return h * cached_positions(4)


def read_scale(h):
    return h * cached_scale()


def read_bounded_table(h):
    return h * bounded_table()[0]


@pytest.fixture(autouse=True)
def fresh_caches():
    SETTINGS["scale"] = 2.0
    for cached in (cached_table, cached_positions, cached_scale, bounded_table):
        cached.cache_clear()
    yield
    SETTINGS["scale"] = 2.0
    for cached in (cached_table, cached_positions, cached_scale, bounded_table):
        cached.cache_clear()


@pytest.mark.parametrize("route", list(_MODULE_ROUTES))
def test_a_mutable_value_the_capture_cached_changed_in_place_gives_eagers_new_result(route):
    model = Reads(read_table)
    compiled = _MODULE_ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))  # the capture filled the cache
    torch.testing.assert_close(compiled(X), model(X))
    cached_table()[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))  # was the graph of 2.0
    traces = _compiles(compiled)
    torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == traces  # the new state is guarded: no more traces


def test_a_mutable_value_of_a_bounded_cache_changed_in_place_gives_eagers_new_result():
    """NOTE [Values a bounded lru_cache holds] (session 26): the value is read from the cache's C link."""
    model = Reads(read_bounded_table)
    compiled = _MODULE_ROUTES["compile"](model)
    torch.testing.assert_close(compiled(X), model(X))
    bounded_table()[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))


@pytest.mark.parametrize("route", list(_MODULE_ROUTES))
def test_a_bounded_cache_value_unchanged_keeps_the_graph_changed_retraces(route):
    """Both ways (NOTE [Values a bounded lru_cache holds]): calls with the value as the capture cached it trace no
    more after the guards took it; a change in place gives eager's result, then is guarded."""
    model = Reads(read_bounded_table)
    compiled = _MODULE_ROUTES[route](model)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), model(X))
    traces = _compiles(compiled)
    for _ in range(3):
        torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == traces
    bounded_table()[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))
    traces = _compiles(compiled)
    torch.testing.assert_close(compiled(X), model(X))
    assert _compiles(compiled) == traces


def test_bounded_cache_values_are_read_from_their_links():
    from aotcache.autograd_cache import lru_cache_values

    @functools.lru_cache(maxsize=2)
    def square(n):
        return [n * n]

    for n in (1, 2, 1, 3):  # a hit moves 1 to the newest end, 3 evicts 2
        square(n)
    cache = lru_cache_values.lru_cache_dict(square)
    assert [(key, value) for key, value in lru_cache_values.lru_cache_entries(square, cache)] == [(1, [1]), (3, [9])]
    assert lru_cache_values.lru_cache_entries(cached_table, lru_cache_values.lru_cache_dict(cached_table)) == \
        list(lru_cache_values.lru_cache_dict(cached_table).items())  # an unbounded cache holds its values itself
    # a dict that is not this wrapper's: the links cannot be matched, they are returned as they are (never guessed)
    other = dict(cache)
    other[object()] = next(iter(cache.values()))
    assert [type(value).__name__ for _, value in lru_cache_values.lru_cache_entries(square, other)] == \
        ["_lru_list_elem"] * 3


@pytest.mark.parametrize("route", list(_MODULE_ROUTES))
def test_a_tensor_the_capture_cached_is_not_left_as_a_trace_tensor(route):
    model = Reads(read_positions)
    compiled = _MODULE_ROUTES[route](model)
    torch.testing.assert_close(compiled(X), model(X))  # eager raised: the cache held the capture's fake tensor
    assert type(cached_positions(4)) is torch.Tensor
    torch.testing.assert_close(compiled(X), model(X))
    cached_positions(4).add_(1.0)
    torch.testing.assert_close(compiled(X), model(X))
    assert getattr(compiled, "route", "aot") == "aot"  # captured (it was refused: the capture's next run read the fake tensor)


def test_a_value_cached_under_another_setting_is_not_loaded_by_the_fingerprint_of_the_new_one():
    model = Reads(read_scale)
    model(X)  # eager caches 2.0
    compiled = aotcache.compile(model, compiler="nop")  # the default cache: fingerprints and aliases
    torch.testing.assert_close(compiled(X), model(X))
    SETTINGS["scale"] = 5.0  # the cache still gives 2.0, as eager does: traced under the fingerprint of 5.0
    torch.testing.assert_close(compiled(X), model(X))
    cached_scale.cache_clear()
    expected = model(X)  # eager computes 5.0
    torch.testing.assert_close(compiled(X), expected)  # loaded the graph of 2.0 through the fingerprint of 5.0


WARM_SCRIPT = """
import functools, sys, torch
from torch import nn
import aotcache
from aotcache.autograd_cache.cache import default_cache

SETTINGS = {"scale": float(sys.argv[1])}


@functools.cache
def cached_scale():
    return SETTINGS["scale"]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * cached_scale()


model, x = Scaled(), torch.ones(2, 4)
if sys.argv[2] == "eager-first":
    model(x)
    SETTINGS["scale"] = 2.0  # the cache keeps the first value, as eager does
compiled = aotcache.compile(model, compiler="nop")
for _ in range(2):
    torch.testing.assert_close(compiled(x), model(x))
print(default_cache().stats()["compile"], min(default_cache().counters.get("fingerprint_hit", 0), 1))
"""


def test_a_value_an_eager_call_cached_is_not_served_by_another_process_graph(tmp_path):
    env = {"AOTCACHE_CACHE_DIR": str(tmp_path)}

    def run(*argv):
        code = f"import sys; sys.argv = ['warm', *{list(argv)!r}]\n" + WARM_SCRIPT
        return run_python(code, env=env).stdout.split()[-2:]

    assert run("2.0", "fresh") == ["1", "0"]  # cold: traced and compiled
    assert run("2.0", "fresh") == ["0", "1"]  # warm: loaded by its fingerprint (the capture's values vouched for)
    # the cache holds 9.0 from an eager call, the setting is 2.0 again: the fingerprint of 2.0 must not load the
    # graph of 2.0 (run_python asserts compiled == eager, which gives 9.0)
    assert run("9.0", "eager-first")[1] == "0"


# -- getters made outside the walked code ---------------------------------------------------------------------


class Source:
    def __init__(self) -> None:
        self._draws = itertools.count(1)


class DrawsThroughAGetter(nn.Module):
    """Reads ``source._draws`` through an ``operator.attrgetter`` made in ``__init__`` (no walked code names it)."""

    def __init__(self) -> None:
        super().__init__()
        self.source = Source()
        self.take = operator.attrgetter("_draws")

    def forward(self, x):
        return x * next(self.take(self.source))


@pytest.mark.parametrize("route", list(_MODULE_ROUTES))
def test_an_iterator_read_through_an_attrgetter_gives_eagers_draws(route):
    compiled = _MODULE_ROUTES[route](DrawsThroughAGetter())
    assert [float(compiled(X)[0, 0]) for _ in range(3)] == [1.0, 2.0, 3.0]  # was 2, 2, 2: drawn twice, baked


def test_a_getter_is_written_down_by_what_it_reads():
    from tests.autograd_cache.test_fingerprint import function_fingerprint

    def read_with(getter):
        return lambda x: x * getter(SETTINGS)

    first = function_fingerprint(read_with(operator.itemgetter("scale")), X)
    by_name = [function_fingerprint(read_with(operator.methodcaller("get", key)), X) for key in ("scale", "other")]
    assert by_name[0].trusted and by_name[1].trusted, by_name[0].reason  # was untrusted: an opaque object
    assert by_name[0].digest != by_name[1].digest
    other = function_fingerprint(read_with(operator.itemgetter("other")), X)
    # an itemgetter is written down by its items too (NOTE [Item getters as values], session 26)
    assert first.trusted and other.trusted and first.digest != other.digest


def test_a_mutable_value_the_capture_cached_changed_in_place_is_not_loaded_by_its_fingerprint():
    model = Reads(read_table)
    compiled = aotcache.compile(model, compiler="nop")  # the default cache: the retrace looks up the fingerprint
    torch.testing.assert_close(compiled(X), model(X))
    torch.testing.assert_close(compiled(X), model(X))
    cached_table()[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))  # was the graph of 2.0, through the vouched fingerprint


def test_a_bounded_cache_value_changed_in_place_is_not_loaded_through_the_fingerprint():
    """The default cache (fingerprints): after the guards see the change, the retrace must not load the graph of the
    old value through a fingerprint that vouched for the cache's C link by identity (NOTE [Values a bounded
    lru_cache holds], NOTE [Cached values a fingerprint vouches for])."""
    model = Reads(read_bounded_table)
    compiled = aotcache.compile(model, compiler="nop")
    for _ in range(2):
        torch.testing.assert_close(compiled(X), model(X))
    bounded_table()[0] = 7.0
    torch.testing.assert_close(compiled(X), model(X))
    torch.testing.assert_close(compiled(X), model(X))
