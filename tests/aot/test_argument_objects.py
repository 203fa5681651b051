"""NOTE [Argument objects changed in place]: a function that assigns to an argument object of a registered pytree
class (a ``register_pytree_node`` class, a registered dataclass, a deque) leaves the caller's object as eager
leaves it, through every entry point; objects only read are still captured whole."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.utils import _pytree as pytree

import aotcache
from tests.aot.routes import ROUTES, compiled_by_route
from aotcache.aot import CaptureError
from aotcache.aot.fallback import fallback_counts


class _Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y


pytree.register_pytree_node(_Point, lambda p: ((p.x, p.y), None), lambda xy, _: _Point(*xy),
                            serialized_type_name=f"{__name__}._Point")


@dataclasses.dataclass
class _Scaled:
    t: torch.Tensor
    scale: float  # a context entry, not a child


pytree.register_pytree_node(_Scaled, lambda s: ((s.t,), s.scale), lambda ts, scale: _Scaled(ts[0], scale),
                            serialized_type_name=f"{__name__}._Scaled")


def _moves_point(p):
    p.x = p.x + 1
    p.y = p.y * 2
    return p.x * p.y


def _bumps_scale(s):
    s.scale = s.scale + 1.0
    return s.t * s.scale


def _pushes(queue, x):
    queue.append(x * 2)
    return x + len(queue)


def _reads_point(p):
    return p.x * p.y + 1


@pytest.mark.parametrize("route", ROUTES)
def test_attributes_assigned_on_a_pytree_argument_reach_the_callers_object(route):
    compiled = compiled_by_route(_moves_point, route)
    for call in range(3):
        mine = _Point(torch.full((3,), float(call)), torch.ones(1))
        theirs = _Point(torch.full((3,), float(call)), torch.ones(1))
        torch.testing.assert_close(compiled(mine), _moves_point(theirs))
        torch.testing.assert_close(mine.x, theirs.x)
        torch.testing.assert_close(mine.y, theirs.y)


@pytest.mark.parametrize("route", ROUTES)
def test_a_context_attribute_changed_on_a_pytree_argument_reaches_the_callers_object(route):
    compiled = compiled_by_route(_bumps_scale, route)
    for call in range(3):
        mine, theirs = _Scaled(torch.ones(2), float(call)), _Scaled(torch.ones(2), float(call))
        torch.testing.assert_close(compiled(mine), _bumps_scale(theirs))
        assert mine.scale == theirs.scale == call + 1.0


@pytest.mark.parametrize("route", ROUTES)
def test_a_deque_argument_appended_to_as_in_eager(route):
    compiled = compiled_by_route(_pushes, route)
    for call in range(3):
        x = torch.full((2,), float(call))
        mine, theirs = collections.deque([torch.zeros(2)]), collections.deque([torch.zeros(2)])
        torch.testing.assert_close(compiled(mine, x), _pushes(theirs, x))
        assert len(mine) == len(theirs) == 2
        torch.testing.assert_close(mine[1], theirs[1])


def test_a_changed_pytree_argument_is_refused_by_the_capture():
    before = sum(fallback_counts().values())
    compiled = aotcache.aot_function(_moves_point, "nop", cache=False)
    compiled(_Point(torch.ones(3), torch.ones(1)))
    assert sum(fallback_counts().values()) > before
    with pytest.raises(CaptureError, match="changes a _Point it was passed"):
        aotcache.aot_function(_moves_point, "nop", cache=False, on_capture_error="raise")(
            _Point(torch.ones(3), torch.ones(1)))


def test_a_pytree_argument_only_read_is_captured_whole():
    compiled = aotcache.aot_function(_reads_point, "nop", cache=False, on_capture_error="raise")
    p = _Point(torch.full((3,), 2.0), torch.full((1,), 3.0))
    x, y = p.x, p.y
    torch.testing.assert_close(compiled(p), torch.full((3,), 7.0))
    assert p.x is x and p.y is y
