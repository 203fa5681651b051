"""An op writing ``out=`` into a tensor argument of another shape resizes it in eager; a capture recorded the
write as a same-shape data mutation and the compiled call raised (NOTE [out= arguments an op resizes] in
``aot/input_mutations.py``; found running PyTorch's test_misc.py through ``aotcache.compile``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import aotcache


def _cosh_into(x, out):
    return torch.cosh(x, out=out) + 1


def _mv_into(out, a, b):
    torch.mv(a, b, out=out)
    return out


def _compile(fn, entry):
    return aotcache.compile(fn, compiler="nop") if entry == "compile" else aotcache.aot_function(fn, "nop")


@pytest.mark.parametrize("entry", ("aot_function", "compile"))
def test_an_out_argument_of_another_shape_is_resized_as_in_eager(entry):
    compiled = _compile(_cosh_into, entry)
    x = torch.rand(2, 3)
    for _ in range(2):
        want_out, got_out = torch.rand(4), torch.rand(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of resizing a non-empty out=
            want = _cosh_into(x, want_out)
            got = compiled(x, got_out)
        torch.testing.assert_close(got, want)
        assert got_out.shape == (2, 3)
        torch.testing.assert_close(got_out, want_out)


@pytest.mark.parametrize("entry", ("aot_function", "compile"))
def test_an_empty_out_argument_is_filled_as_in_eager(entry):
    compiled = _compile(_mv_into, entry)
    a, b = torch.randn(3, 3), torch.randn(3)
    out = compiled(torch.empty(0), a, b)
    torch.testing.assert_close(out, torch.mv(a, b))


def test_an_out_argument_of_the_right_shape_is_still_captured_whole():
    """The other direction: ``out=`` of the op's own shape is a data mutation the graph writes back."""
    compiled = aotcache.compile(_cosh_into, compiler="nop")
    x, out = torch.rand(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(compiled(x, out), torch.cosh(x) + 1)
    torch.testing.assert_close(out, torch.cosh(x))
    assert compiled.route == "aot"


def _dynamic(fn, entry):
    return (aotcache.compile(fn, compiler="nop", dynamic=True) if entry == "compile"
            else aotcache.aot_function(fn, "nop", dynamic=True))


@pytest.mark.parametrize("entry", ("aot_function", "compile"))
def test_a_dynamic_graph_captured_with_an_out_argument_of_the_ops_shape_is_not_reused_when_it_would_resize(entry):
    """The analysis ran on static probes whose sizes were equal, and the symbolic trace kept no guard that they
    stay so: a call with an ``out=`` of another length reused the graph and raised where eager resizes. The
    equality is now a guard (a miss, then the refusal), in this process and from the store in a new one."""
    compiled = _dynamic(_cosh_into, entry)
    x, out = torch.rand(3), torch.rand(3)
    torch.testing.assert_close(compiled(x, out), torch.cosh(x) + 1)  # sizes equal: captured whole
    for fn in (compiled, _dynamic(_cosh_into, entry)):  # this process; a fresh function on the stored graph
        x, got_out, want_out = torch.rand(4), torch.rand(3), torch.rand(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of resizing a non-empty out=
            want = _cosh_into(x, want_out)
            got = fn(x, got_out)
        torch.testing.assert_close(got, want)
        assert got_out.shape == (4,)
        torch.testing.assert_close(got_out, want_out)
    x, out = torch.rand(5), torch.rand(5)  # equal sizes again: still the captured graph
    torch.testing.assert_close(compiled(x, out), torch.cosh(x) + 1)
    torch.testing.assert_close(out, torch.cosh(x))
