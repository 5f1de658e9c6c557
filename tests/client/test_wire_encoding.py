"""The hand-written tensor encoding (``wire.serialize_with_tensors``) is the
message protobuf builds: property-tested over dtypes, shapes (scalars,
empty, non-contiguous, big-endian), optional fields and map entries, by
parsing its bytes with protobuf itself."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossd import _requests, wire
from lossd.v1 import loss_service_pb2

DTYPES = [np.dtype(name) for name in wire.SUPPORTED_DTYPES if name != "bfloat16"]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    array = draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=False)))
    layout = draw(st.sampled_from(["c", "fortran", "strided", "big-endian"]))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        array = np.repeat(array, 2, axis=0)[::2]
    elif layout == "big-endian" and array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    return array


RESERVED = ("y_true", "y_pred", "sample_weight")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(y_true=arrays(), y_pred=arrays(), sample_weight=st.none() | arrays(),
       # Extra tensors are named anything but the request's own fields (the server refuses those names).
       extra=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda n: n not in RESERVED), arrays(),
                             max_size=3),
       reduction=st.sampled_from(sorted(wire.REDUCTIONS)), gradient=st.booleans(),
       loss=st.sampled_from(["mse", {"name": "huber", "params": {"delta": 2.5}},
                             {"expression": "mean(abs(y_true - y_pred))"}]))
def test_the_hand_encoding_parses_to_the_message_protobuf_builds(y_true, y_pred, sample_weight, extra, reduction,
                                                                 gradient, loss):
    arrays_ = {"y_true": y_true, "y_pred": y_pred, **({} if sample_weight is None else
                                                        {"sample_weight": sample_weight}), **extra}
    spec = wire.spec_from_dict(loss)
    built = _requests.evaluate_request(spec, arrays_, reduction, gradient)
    parsed = loss_service_pb2.EvaluateRequest.FromString(  # min_bytes=0: by hand however small
        _requests.evaluate_request_bytes(spec, arrays_, reduction, gradient, min_bytes=0))
    assert parsed == built
    for name, array in arrays_.items():
        tensor = parsed.tensors[name] if name in extra else getattr(parsed, name)
        np.testing.assert_array_equal(wire.to_numpy(tensor, allow_empty=True), array)


def test_bfloat16_and_lengths_of_several_varint_bytes_encode_too():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    # 600,000 bytes of content: a length of three varint bytes; 300 a shape entry of two.
    y = np.linspace(-3, 3, 300_000, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(1000, 300)
    head = loss_service_pb2.EvaluateRequest(gradient=True)
    parsed = loss_service_pb2.EvaluateRequest.FromString(wire.serialize_with_tensors(head, {"y_pred": y}))
    assert parsed.gradient and parsed.y_pred == wire.from_numpy(y)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(y_true=arrays(), y_pred=arrays(), sample_weight=st.none() | arrays(),
       extra=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda n: n not in RESERVED), arrays(),
                             max_size=3),
       gradient=st.booleans(), min_bytes=st.sampled_from([0, 1, 64]), hand=st.booleans())
def test_a_lifted_parse_is_the_message_with_its_contents_beside_it(y_true, y_pred, sample_weight, extra, gradient,
                                                                   min_bytes, hand):
    arrays_ = {"y_true": y_true, "y_pred": y_pred, **({} if sample_weight is None else
                                                        {"sample_weight": sample_weight}), **extra}
    spec = wire.spec_from_dict("mse")
    built = _requests.evaluate_request(spec, arrays_, "sum", gradient)
    raw = (_requests.evaluate_request_bytes(spec, arrays_, "sum", gradient, min_bytes=0) if hand
           else built.SerializeToString())
    message, contents = wire.parse_lifted(raw, loss_service_pb2.EvaluateRequest,
                                          ("y_true", "y_pred", "sample_weight"), "tensors", min_bytes=min_bytes)
    assert all(len(view) >= min_bytes for view in contents.values())
    for name, array in arrays_.items():
        field = f"tensors[{name}]" if name in extra else name
        tensor = message.tensors[name] if name in extra else getattr(message, name)
        decoded = wire.to_numpy(tensor, allow_empty=True, content=contents.get(field))
        np.testing.assert_array_equal(decoded, array)
        if field in contents:
            tensor.content = bytes(contents[field])  # put back: the message protobuf parses
    assert message == built


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_bytes_that_are_no_message_are_a_wire_error_not_a_crash(raw):
    try:
        wire.parse_lifted(raw, loss_service_pb2.EvaluateRequest, ("y_true", "y_pred"), "tensors", min_bytes=0)
    except wire.WireError as exc:
        assert exc.reason == "BAD_MESSAGE"


def test_a_tensor_field_sent_twice_is_refused():
    one = _requests.evaluate_request_bytes(wire.spec_from_dict("mse"), {"y_true": np.ones(3), "y_pred": np.ones(3)},
                                           "sum", False)
    twice = one + wire.serialize_with_tensors(loss_service_pb2.EvaluateRequest(), {"y_pred": np.ones(3)})
    with pytest.raises(wire.WireError, match="y_pred appears twice"):
        wire.parse_lifted(twice, loss_service_pb2.EvaluateRequest, ("y_true", "y_pred"), "tensors", min_bytes=0)


def _shape_answer(shape, max_elements):
    """What ``wire.check_shape`` must answer, from its documented rules over
    each dimension as a Python int: the count, or the refusal's reason."""
    if len(shape) > wire.MAX_RANK:
        return "BAD_TENSOR"
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        return "BAD_TENSOR"
    count = 1
    for d in dims:
        count *= d
    return "TENSOR_TOO_LARGE" if max_elements is not None and count > max_elements else count


_DIMS = st.integers(-3, 2**62) | st.integers(0, 9) | st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=500, deadline=None)
@given(dims=st.lists(_DIMS, max_size=wire.MAX_RANK + 2),
       form=st.sampled_from(["list", "tuple", "protobuf", "int_shape", "numpy int64", "mixed"]),
       max_elements=st.none() | st.integers(0, 2**40))
def test_check_shape_counts_and_refuses_by_its_rules(dims, form, max_elements):
    """The fast path for a shape ``int_shape`` read (Python ints) and the
    general path (numpy integers, whose product would overflow) give one
    answer: the count, or a WireError with the rule's reason, however the
    shape is held; and the array ``from_bytes`` decodes has that shape."""
    if form == "protobuf":
        shape = wire.tensor_pb2.Tensor(shape=dims).shape
    elif form == "int_shape":
        shape = wire.int_shape(wire.tensor_pb2.Tensor(shape=dims).shape)
    elif form == "tuple":
        shape = tuple(dims)
    elif form == "numpy int64":
        shape = [np.int64(d) for d in dims]
    elif form == "mixed":
        shape = [np.int64(d) if i % 2 else d for i, d in enumerate(dims)]
    else:
        shape = list(dims)
    want = _shape_answer(dims, max_elements)
    try:
        got = wire.check_shape(shape, field="t", max_elements=max_elements)
    except wire.WireError as exc:
        got = exc.reason
    assert got == want and type(got) is type(want)
    if type(want) is int and 0 < want <= 64:
        array = wire.from_bytes(bytes(want), wire.DataType.DATA_TYPE_UINT8, shape, field="t")
        assert array.shape == tuple(int(d) for d in dims)
