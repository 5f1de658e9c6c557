"""Evaluate's own encoding: an answer's two forms are one response (the
bytes Evaluate sends, serialized by hand with each tensor copied once, parse
to the message an EvaluateStream item carries, with and without a gradient,
terms, and a gradient written to shared memory), and bytes that are no
EvaluateRequest are INVALID_ARGUMENT, not INTERNAL."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossd import _requests, wire
from lossd.v1 import loss_service_pb2, tensor_pb2
from lossd_server.grpc.loss_servicer import Answer

FLOATS = st.sampled_from([np.float16, np.float32, np.float64])


def answer(loss, gradient, terms, non_finite, shm) -> Answer:
    head = loss_service_pb2.EvaluateResponse(non_finite=non_finite)
    for label, value, weight in terms:
        head.terms.add(label=label, value=wire.from_numpy(value), weight=weight)
    made = Answer(head, {"loss": loss})
    if gradient is not None:
        if shm:
            head.gradient.CopyFrom(tensor_pb2.Tensor(dtype=wire.dtype_enum(gradient.dtype), shape=gradient.shape,
                                                     shared_memory=tensor_pb2.SharedMemoryRef(
                                                         region="lossd_x", offset=64, byte_size=gradient.nbytes)))
        else:
            made.tensors["gradient"] = gradient
    return made


@settings(max_examples=100, deadline=None)
@given(dtype=FLOATS, data=st.data(), with_gradient=st.booleans(), shm=st.booleans(), non_finite=st.booleans(),
       labels=st.lists(st.text(max_size=6), max_size=3), min_bytes=st.sampled_from([0, 64]))
def test_the_bytes_evaluate_sends_parse_to_the_stream_items_message(dtype, data, with_gradient, shm, non_finite,
                                                                    labels, min_bytes):
    loss = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=1, max_side=5)))
    gradient = data.draw(hnp.arrays(dtype, hnp.array_shapes(max_dims=3, max_side=5))) if with_gradient else None
    terms = [(label, np.asarray(i, dtype), 0.5 * i) for i, label in enumerate(labels)]
    raw = answer(loss, gradient, terms, non_finite, shm).serialized(min_bytes)  # 0: by hand however small
    sent = loss_service_pb2.EvaluateResponse.FromString(raw)
    assert sent == answer(loss, gradient, terms, non_finite, shm).message()
    np.testing.assert_array_equal(wire.to_numpy(sent.loss, allow_empty=True), loss)
    # The client reads the same result from the bytes in place as from the parsed message.
    if not shm:
        in_place, parsed = _requests.parse_response_bytes(raw), _requests.parse_response(sent)
        np.testing.assert_array_equal(in_place.loss, parsed.loss)
        assert (in_place.gradient is None) == (parsed.gradient is None)
        if parsed.gradient is not None:
            np.testing.assert_array_equal(in_place.gradient, parsed.gradient)
            assert in_place.gradient.dtype == parsed.gradient.dtype
        assert in_place.non_finite == parsed.non_finite and in_place.terms.keys() == parsed.terms.keys()


def test_bytes_that_are_no_evaluate_request_are_invalid_argument_not_internal(address):
    import grpc
    import pytest

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=None,
                                   response_deserializer=None)
        for garbage in (b"\x12\xff\xff\xff\xff\x0f", b"\x0f", b"\x1a\x05\x08\x01"):  # truncated, bad wire type, short
            with pytest.raises(grpc.RpcError) as err:
                call(garbage, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, err.value)
            assert "Malformed message" in err.value.details()
