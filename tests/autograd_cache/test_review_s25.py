"""Session 25 review of NOTE [Names whose order the code can observe] (code_reading.py): three order-free reads
that call back into code which can see a set's order (NOTE [Order-free reads that call back]).

As in test_set_order_reads.py, ``{0, 8}`` and ``{8, 0}`` (colliding hashes: they iterate in the order added) stand
for two processes' orders of a set of str; each case runs eager on both and checks that the fingerprints differ
where eager does, and stay one where the read is order-free after all (the warm start kept).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.autograd_cache.test_fingerprint import module_fingerprint
from tests.autograd_cache.test_set_order_reads import Holder, _eight_first, _zero_first

X = torch.ones(2, 3)


class FirstMemberSet(set):
    """A set whose ``in`` looks at its first member only (it iterates itself)."""

    def __contains__(self, item):
        return next(iter(set.__iter__(self))) == item


class PlainSubset(set):
    """A subclass overriding no operator: its ``in`` is the set's own."""


def _first_is_eight(self, other):
    return next(iter(other)) == 8


class FirstMemberProbe:
    """Compares equal to a set whose first member is 8: its ``__eq__`` (under another name) iterates the set it is
    handed."""

    __hash__ = None
    __eq__ = _first_is_eight


@dataclasses.dataclass
class Scale:
    factor: float = 2.0


def read_in(self, x):
    return x + 1.0 if 8 in self.shifts else x


def read_compared(self, x):
    return x + 1.0 if self.probe == self.shifts else x


def read_sorted_first(self, x):
    return x * float(min(sorted(self.groups)[0]))


def read_sorted_numbers(self, x):
    return x * float(sorted(self.shifts)[0]) + 1.0 if {0, 8} == self.shifts else x


def read_sorted_with_a_dataclass(self, x):
    return x * self.scale.factor * float(sorted(self.shifts)[0] + 1)


def _colliding_groups(first_added):
    """Two frozensets neither a subset of the other (``sorted`` keeps their order) whose hashes collide."""
    one, other = frozenset({1}), frozenset({18})
    groups = set()
    for group in ((one, other) if first_added == 0 else (other, one)):
        groups.add(group)
    return groups


def _models(read, kind=set):
    models = []
    for order, shifts in enumerate((_zero_first(), _eight_first())):
        model = Holder(kind(shifts), read)
        torch.manual_seed(0)
        model.linear.reset_parameters()
        model.probe = FirstMemberProbe()
        model.groups = _colliding_groups(order)
        model.scale = Scale()
        models.append(model)
    return models


@pytest.mark.parametrize("read, kind", [(read_in, FirstMemberSet), (read_compared, set),
                                        (read_sorted_first, set)])
def test_an_order_free_read_that_calls_back_into_code_seeing_the_order_is_another_fingerprint(read, kind):
    first, second = _models(read, kind)
    assert list(first.shifts) != list(second.shifts) and list(first.groups) != list(second.groups)
    assert not torch.equal(first(X), second(X))  # eager sees the order
    prints = [module_fingerprint(model, X) for model in (first, second)]
    assert all(p.trusted for p in prints), [p.reason for p in prints]
    assert prints[0].digest != prints[1].digest  # was one fingerprint: a false hit under another hash seed


@pytest.mark.parametrize("read, kind", [(read_in, PlainSubset), (read_sorted_numbers, set),
                                        (read_sorted_with_a_dataclass, set)])
def test_an_order_free_read_of_plain_members_keeps_one_fingerprint(read, kind):
    first, second = _models(read, kind)
    del first.probe, second.probe  # no user comparison method reached (a dataclass's ``__eq__`` is one)
    if read is not read_sorted_with_a_dataclass:
        del first.scale, second.scale
    assert torch.equal(first(X), second(X))
    prints = [module_fingerprint(model, X) for model in (first, second)]
    assert all(p.trusted for p in prints), [p.reason for p in prints]
    assert prints[0].digest == prints[1].digest  # the warm start is kept
