"""Metadata extraction, schema binding, signatures and op checks of the per-op kernel cache (no compiles)."""

from __future__ import annotations

import json

import pytest
import torch

from aotcache.eager import meta

aten = torch.ops.aten


def test_tensor_metadata_records_layout_and_keys():
    tensor = torch.randn(3, 4).t()
    data = meta.extract_tensor_metadata(False, tensor)
    assert data["sizes"] == [4, 3] and data["strides"] == [1, 4]
    assert data["dtype"] == "torch.float32" and data["device_type"] == "cpu" and data["device_index"] == -1
    assert data["requires_grad"] is False and data["is_dynamic"] is False
    assert data["dispatch_key_set"] == torch._C._dispatch_keys(tensor).raw_repr()
    assert meta.extract_tensor_metadata(True, torch.ones(2, requires_grad=True))["requires_grad"] is True


def test_tensor_list_metadata():
    data = meta.extract_tensor_list_metadata(False, [torch.ones(2), torch.ones(3, dtype=torch.int64)])
    assert [item["sizes"] for item in data["tensor_list"]] == [[2], [3]]
    assert data["tensor_list"][1]["dtype"] == "torch.int64"
    with pytest.raises(meta.UnsupportedArgumentError, match="only tensors"):
        meta.extract_tensor_list_metadata(False, [torch.ones(2), 3])


@pytest.mark.parametrize("value, label", [(True, "torch.bool"), (3, "torch.int32"), (2.5, "torch.float32")])
def test_scalar_metadata(value, label):
    data = meta.extract_scalar_metadata("cpu", value)
    assert data["dtype"] == label and data["scalar_value"] == value and type(data["scalar_value"]) is type(value)
    assert data["device_index"] == -1


def test_other_extractors():
    assert meta.extract_string_metadata("tanh") == {"string_value": "tanh"}
    assert meta.extract_dtype_metadata(torch.float64) == {"dtype_value": "torch.float64"}
    assert meta.extract_device_metadata(torch.device("cpu")) == {"device_type_value": "cpu",
                                                                  "device_index_value": None}
    assert meta.extract_layout_metadata(torch.strided) == {"layout_value": "torch.strided"}
    assert meta.extract_memory_format_metadata(torch.channels_last) == {
        "memory_format_value": "torch.channels_last"}
    assert meta.extract_scalar_list_metadata([1, 2.0, True])["scalar_list"] == [
        {"dtype": "torch.int32", "scalar_value": 1}, {"dtype": "torch.float32", "scalar_value": 2.0},
        {"dtype": "torch.bool", "scalar_value": True}]
    assert meta.extract_none_metadata() == {"is_none": True}


@pytest.mark.parametrize("value, fragment", [
    (object(), "not supported"),
    (1 + 2j, "not supported"),
    ([torch.ones(1), 2], "lists must hold only tensors or only"),
    ([torch.ones(1), None], "lists must hold only tensors or only"),
    ([[1], [2]], "lists must hold only"),
    ({"a": 1}, "not supported"),
    (torch.ones(2, 2).to_sparse(), "layout"),
])
def test_unsupported_arguments_name_the_argument(value, fragment):
    with pytest.raises(meta.UnsupportedArgumentError, match=fragment) as info:
        meta.extract_argument_metadata(value, dynamic=False, device_type="cpu", name="argument 'x' of op")
    assert "argument 'x' of op" in str(info.value)
    assert isinstance(info.value, NotImplementedError)


def test_binder_fills_defaults_and_normalizes_spellings():
    binder = meta.binder_for(aten.add.Tensor)
    x, y = torch.ones(2), torch.ones(2)
    assert binder.bind((x, y), {})[2] == 1
    assert binder.bind((x, y), {"alpha": 1}) == binder.bind((x, y), {})
    assert binder.split([x, y, 3]) == ((x, y), {"alpha": 3})
    with pytest.raises(TypeError, match="unexpected keyword"):
        binder.bind((x, y), {"beta": 1})
    with pytest.raises(TypeError, match="missing required argument 'other'"):
        binder.bind((x,), {})
    with pytest.raises(TypeError, match="at most 2 positional"):
        binder.bind((x, y, 1), {})


CALLS = [
    (aten.add.Tensor, (torch.randn(3, 4), torch.randn(4)), {"alpha": 2}),
    (aten.add.Tensor, (torch.randn(3, 4), torch.randn(4)), {"alpha": True}),
    (aten.gelu.default, (torch.randn(5),), {"approximate": "tanh"}),
    (aten.sum.dim_IntList, (torch.randn(2, 3), [1], True), {"dtype": torch.float64}),
    (aten.cat.default, ([torch.randn(2, 3), torch.randn(1, 3)], 0), {}),
    (aten.mm.default, (torch.randn(4, 3).t(), torch.randn(4, 2)), {}),
    (aten.ones.default, ([2, 3],), {"dtype": torch.float16, "layout": torch.strided,
                                    "device": torch.device("cpu"), "pin_memory": False}),
    (aten.clone.default, (torch.randn(2, 3, 4, 5),), {"memory_format": torch.channels_last}),
]


def _call_id(value) -> str:
    """A test id naming tensors by shape: their random values made the ids differ between xdist workers whose
    collection drew other numbers first ("Different tests were collected between gw0 and gw1")."""
    from torch.utils import _pytree as pytree

    return str(pytree.tree_map(lambda v: f"T{list(v.shape)}" if isinstance(v, torch.Tensor) else v, value))[:40]


@pytest.mark.parametrize("op, args, kwargs", CALLS, ids=_call_id)
def test_signature_of_values_equals_signature_of_persisted_meta(op, args, kwargs):
    values = meta.binder_for(op).bind(args, kwargs)
    meta_info = meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")
    assert [item["arg_order"] for item in meta_info] == list(range(len(values)))
    persisted = json.loads(json.dumps(meta_info))  # the JSON round trip of the index
    assert persisted == meta_info
    decoded = meta.decode_meta_info(persisted)
    assert meta.signature_of_meta(decoded, torch.float32) == meta.signature_of_values(values, torch.float32)
    hash(meta.signature_of_values(values, torch.float32))


def test_signatures_tell_close_calls_apart():
    x, y = torch.randn(3, 4), torch.randn(3, 4)

    def sig(values):
        return meta.signature_of_values(values, torch.float32)

    assert sig([x, y, 1]) != sig([x, y, True])  # bool is not int
    assert sig([x, y, 1]) != sig([x, y, 1.0])  # int is not float
    assert sig([x, y, 1]) != sig([x.t().contiguous().t(), y, 1])  # strides
    assert sig([x, y, 1]) != sig([x.double(), y, 1])  # dtype
    assert sig([x, y, 1]) == sig([x.clone().requires_grad_(), y, 1])  # requires_grad is not matched
    with torch.inference_mode():
        z = torch.randn(3, 4)
    assert sig([z, y, 1]) == sig([x, y, 1])  # nor the key set (inference tensors)


def persisted_signature(op, args, kwargs=None, default_dtype=torch.float32):
    values = meta.binder_for(op).bind(args, kwargs)
    meta_info = json.loads(json.dumps(meta.extract_call_metadata(op, values, dynamic=False, device_type="cpu")))
    return meta.signature_of_meta(meta.decode_meta_info(meta_info), default_dtype)


def test_signatures_tell_signed_zero_scalars_apart():
    """NOTE [Signed zeros and NaNs as scalars]: 0.0 == -0.0, but mul(x, -0.0) gives -0.0 where mul(x, 0.0)
    gives 0.0; before, both calls had one signature (the -0.0 call ran the 0.0 kernel)."""
    x = torch.randn(3, 4)
    negative, positive = [x, -0.0], [x, 0.0]
    assert meta.signature_of_values(negative, torch.float32) != meta.signature_of_values(positive, torch.float32)
    assert persisted_signature(aten.mul.Tensor, (x, -0.0)) == meta.signature_of_values(negative, torch.float32)
    assert persisted_signature(aten.mul.Tensor, (x, 0.0)) == meta.signature_of_values(positive, torch.float32)
    assert persisted_signature(aten.mul.Tensor, (x, -0.0)) != persisted_signature(aten.mul.Tensor, (x, 0.0))
    # in a scalar list too; and an equal value spelled otherwise still matches (a harmless change hits)
    assert (meta.signature_of_values([x, [1.0, -0.0]], torch.float32)
            != meta.signature_of_values([x, [1.0, 0.0]], torch.float32))
    assert meta.signature_of_values([x, 0.5], torch.float32) == meta.signature_of_values([x, 1 / 2], torch.float32)


def test_nan_scalars_are_refused():
    x = torch.randn(3)
    with pytest.raises(meta.UnsupportedArgumentError, match="NaN"):
        meta.signature_of_values([x, float("nan")], torch.float32)
    with pytest.raises(meta.UnsupportedArgumentError, match="NaN"):
        meta.extract_call_metadata(aten.mul.Tensor, [x, float("nan")], dynamic=False, device_type="cpu")
    with pytest.raises(ValueError, match="NaN"):
        meta.signature_of_meta([{"arg_order": 0, "dtype": "torch.float32", "scalar_value": float("nan")}],
                               torch.float32)


def test_signatures_tell_default_dtypes_apart():
    """NOTE [Default dtype of a kernel]: div(x_int, y_int) is float32 under the default dtype float32 and float64
    under float64; the default dtype is part of both signatures."""
    x, y = torch.arange(4), torch.arange(1, 5)
    assert meta.signature_of_values([x, y], torch.float32) != meta.signature_of_values([x, y], torch.float64)
    assert (persisted_signature(aten.div.Tensor, (x, y), default_dtype=torch.float64)
            == meta.signature_of_values([x, y], torch.float64))
    assert (persisted_signature(aten.div.Tensor, (x, y), default_dtype=torch.float64)
            != meta.signature_of_values([x, y], torch.float32))


def test_decode_meta_info_turns_strings_into_torch_objects():
    decoded = meta.decode_meta_info([{"dtype": "torch.float16", "device_type": "cpu", "device_index": 3,
                                      "sizes": [1], "strides": [1], "arg_order": 0},
                                     {"layout_value": "torch.strided", "arg_order": 1},
                                     {"memory_format_value": "torch.channels_last", "arg_order": 2},
                                     {"dtype_value": "torch.int8", "arg_order": 3}])
    assert decoded[0]["dtype"] is torch.float16 and decoded[0]["device_index"] == -1
    assert decoded[1]["layout_value"] is torch.strided
    assert decoded[2]["memory_format_value"] is torch.channels_last
    assert decoded[3]["dtype_value"] is torch.int8
    with pytest.raises(ValueError, match="not a dtype"):
        meta.decode_meta_info([{"dtype": "torch.nonsense"}])


@pytest.mark.parametrize("op, error, fragment", [
    (aten.add_.Tensor, meta.UnsupportedOperatorError, "mutates or aliases"),
    (aten.view.default, meta.UnsupportedOperatorError, "mutates or aliases"),
    (aten.bernoulli.default, meta.UnsupportedOperatorError, "random"),
    (aten.linear.default, meta.UnsupportedOperatorError, "no CPU kernel"),
    (aten.add, TypeError, "overload packet"),
    (torch.add, TypeError, "OpOverload"),
    (aten.sym_size.int, meta.UnsupportedOperatorError, "returns"),
])
def test_unsupported_operators_are_refused_clearly(op, error, fragment):
    with pytest.raises(error, match=fragment):
        meta.check_op_supported(op)


def test_supported_operators():
    for op in (aten.add.Tensor, aten.mm.default, aten.gelu.default, aten.max.dim, aten.cat.default):
        assert meta.check_op_supported(op) is op
    assert meta.op_file_name(aten.mm.default) == "mm.default"
