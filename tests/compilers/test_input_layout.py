"""Input-stride expectations of compiled graphs and the restriding safety net (no compile needed)."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._subclasses.fake_tensor import FakeTensorMode

from aotcache.compilers.input_layout import ALIGNMENT, copy_misaligned, conform_inputs, dense_strides, expected_layout, expected_layouts


def test_static_expectation_is_the_example_strides() -> None:
    example = torch.randn(3, 4).t()
    assert expected_layout(example) == {"stride": [1, 4]}
    assert expected_layouts([example, 2, None]) == [{"stride": [1, 4]}, None, None]


def test_matching_arguments_are_passed_through_and_others_copied_to_the_expected_strides() -> None:
    contiguous = torch.randn(4, 3)
    transposed = torch.randn(3, 4).t()  # same shape, strides (1, 4)
    layouts = expected_layouts([contiguous, 7])
    kept = conform_inputs([contiguous, 7], layouts)
    assert kept[0] is contiguous and kept[1] == 7
    args = [transposed, 7]
    conformed = conform_inputs(args, layouts)
    assert conformed[0].stride() == (3, 1) and torch.equal(conformed[0], transposed)
    assert args[0] is transposed  # the caller's list is left alone


def test_strides_of_size_one_dimensions_are_not_a_mismatch() -> None:
    example = torch.randn(1, 5)
    odd = torch.empty_strided((1, 5), (1, 1)).copy_(example)
    assert conform_inputs([odd], expected_layouts([example]))[0] is odd


def test_symbolic_dense_inputs_expect_strides_from_their_sizes() -> None:
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    fake = fake_mode.from_tensor(channels_last)  # symbolic sizes, channels-last strides
    assert any(isinstance(size, torch.SymInt) for size in fake.shape)
    layout = expected_layout(fake)
    assert layout == {"order": [0, 2, 3, 1]}
    other_sizes = torch.randn(3, 3, 6, 2)  # contiguous: must become channels-last for these sizes
    (conformed,) = conform_inputs([other_sizes], [layout])
    assert conformed.stride() == dense_strides((3, 3, 6, 2), [0, 2, 3, 1]) == (36, 1, 6, 3)
    assert torch.equal(conformed, other_sizes)


def test_symbolic_inputs_that_are_not_dense_are_unchecked() -> None:
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    sliced = fake_mode.from_tensor(torch.randn(6, 4)[:, ::2])
    assert expected_layout(sliced) is None
    value = torch.randn(3, 2)
    assert conform_inputs([value], [None])[0] is value


def test_prepared_layouts_conform_as_conform_inputs_does() -> None:
    """InputLayouts compares all static strides at once; any difference takes conform_inputs' per-input path."""
    from aotcache.compilers.input_layout import InputLayouts

    example = torch.randn(4, 3)
    prepared = InputLayouts(expected_layouts([example, 7]))
    contiguous, transposed = torch.randn(4, 3), torch.randn(3, 4).t()
    kept = prepared.conform([contiguous, 7])
    assert kept[0] is contiguous and kept[1] == 7
    conformed = prepared.conform([transposed, 7])
    assert conformed[0].stride() == (3, 1) and torch.equal(conformed[0], transposed)
    odd = torch.empty_strided((1, 5), (1, 1)).copy_(torch.randn(1, 5))  # a size-1 dimension's stride never counts
    single = InputLayouts(expected_layouts([torch.randn(1, 5)]))
    assert single.conform([odd])[0] is odd
    assert prepared.conform([3, 7]) == [3, 7]  # not a tensor: passed on for the graph to name


def test_misaligned_inputs_are_copied_to_aligned_memory_with_their_strides() -> None:
    """NOTE [Misaligned inputs]: only the listed, misaligned tensors are copied; values, sizes and strides are
    kept (an expanded input keeps its zero stride), and the copy is aligned."""
    data = torch.arange(100.0)
    misaligned = data[1:33].view(4, 8)[:, ::2]  # offset 4 bytes, strided
    expanded = data[3:7].view(4, 1).expand(4, 5)
    aligned = data[4:12]
    args = [misaligned, expanded, aligned, 7, data[1:3]]
    copy_misaligned(args, [0, 1, 2, 3])
    for got, want in zip(args[:3], (misaligned, expanded, aligned)):
        assert torch.equal(got, want) and got.stride() == want.stride()
        assert got.data_ptr() % ALIGNMENT == 0
    assert args[0] is not misaligned and args[1] is not expanded
    assert args[2] is aligned and args[3] == 7 and args[4].data_ptr() == data[1:3].data_ptr()  # unlisted
