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


# EvaluateStream's items use Evaluate's codec: the request's tensors lifted
# out of the item, the answer written into the item with each tensor copied once.


@settings(max_examples=100, deadline=None)
@given(dtype=FLOATS, data=st.data(), with_gradient=st.booleans(), request_id=st.text(max_size=8),
       min_bytes=st.sampled_from([0, 64, 1 << 20]))
def test_a_stream_item_written_by_hand_parses_to_the_item_protobuf_builds(dtype, data, with_gradient, request_id,
                                                                          min_bytes):
    loss = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=1, max_side=5)))
    gradient = data.draw(hnp.arrays(dtype, hnp.array_shapes(max_dims=3, max_side=5))) if with_gradient else None
    outer = loss_service_pb2.EvaluateStreamResponse(request_id=request_id)
    raw = answer(loss, gradient, [("a", np.asarray(1, dtype), 0.5)], False, False).serialized(
        min_bytes, within=(outer, "response"))
    built = loss_service_pb2.EvaluateStreamResponse(request_id=request_id)
    built.response.CopyFrom(answer(loss, gradient, [("a", np.asarray(1, dtype), 0.5)], False, False).message())
    assert loss_service_pb2.EvaluateStreamResponse.FromString(raw) == built


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(0, 40), columns=st.integers(1, 300), request_id=st.text(max_size=8),
       with_weight=st.booleans(), min_bytes=st.sampled_from([0, 64, 1 << 16]))
def test_a_stream_item_parsed_in_place_is_the_item_with_its_contents_beside_it(rows, columns, request_id,
                                                                               with_weight, min_bytes):
    from lossd_server.grpc.loss_servicer import receive_stream_item

    y = np.arange(rows * columns, dtype=np.float32).reshape(rows, columns)
    arrays = {"y_true": y, "y_pred": y + 1, **({"sample_weight": np.ones(rows, np.float32)} if with_weight else {})}
    built = loss_service_pb2.EvaluateStreamRequest(
        request=_requests.evaluate_request(wire.spec_from_dict("mse"), arrays, "sum", True), request_id=request_id)
    received = receive_stream_item(built.SerializeToString()) if min_bytes == 1 << 16 else None
    outer, message, contents = wire.parse_lifted_within(
        built.SerializeToString(), loss_service_pb2.EvaluateStreamRequest, "request",
        loss_service_pb2.EvaluateRequest, ("y_true", "y_pred", "sample_weight"), "tensors", min_bytes=min_bytes)
    assert outer.request_id == request_id and not outer.HasField("request")
    for name, array in arrays.items():
        tensor = getattr(message, name)
        np.testing.assert_array_equal(wire.to_numpy(tensor, allow_empty=True, content=contents.get(name)), array)
        if name in contents:
            assert len(contents[name]) >= min_bytes
            tensor.content = bytes(contents[name])  # put back: the message protobuf parses
    assert message == built.request
    if received is not None:  # the server's deserializer lifts the same
        assert received.error is None and received.outer.request_id == request_id
        assert received.contents.keys() == contents.keys()


def _evaluate_both_ways(address, requests: list[loss_service_pb2.EvaluateRequest]):
    """Each request sent by Evaluate and, all on one stream, by EvaluateStream:
    (what Evaluate answered or its status, the stream's item) pairs."""
    import grpc

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                 ("grpc.max_send_message_length", 64 << 20)]) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate",
                                       request_serializer=loss_service_pb2.EvaluateRequest.SerializeToString,
                                       response_deserializer=loss_service_pb2.EvaluateResponse.FromString)
        one_by_one = []
        for request in requests:
            try:
                one_by_one.append(evaluate(request, timeout=60))
            except grpc.RpcError as exc:
                one_by_one.append(exc)
        stream = channel.stream_stream(
            "/lossd.v1.LossService/EvaluateStream",
            request_serializer=loss_service_pb2.EvaluateStreamRequest.SerializeToString,
            response_deserializer=loss_service_pb2.EvaluateStreamResponse.FromString)
        items = list(stream(iter([loss_service_pb2.EvaluateStreamRequest(request=r, request_id=f"r{i}")
                                  for i, r in enumerate(requests)]), timeout=120))
    assert [item.request_id for item in items] == [f"r{i}" for i in range(len(requests))]
    return list(zip(one_by_one, items))


def test_the_streams_answers_are_evaluates_answers(address):
    """Small and large (lifted) tensors, with and without the gradient, per
    sample and reduced, and a refused request: each stream item carries what
    Evaluate answers for the same request, field for field."""
    import grpc

    rng = np.random.default_rng(7)
    requests = []
    for rows, columns in ((4, 3), (300, 100), (2000, 64)):  # 48 B, 117 KiB, 500 KiB per tensor
        y_true = rng.normal(size=(rows, columns)).astype(np.float32)
        y_pred = rng.normal(size=(rows, columns)).astype(np.float32)
        for loss, reduction, gradient in (("mse", "sum_over_batch_size", False), ("huber", "none", True),
                                          ({"name": "huber", "params": {"delta": 0.5}}, "sum", True)):
            requests.append(_requests.evaluate_request(wire.spec_from_dict(loss), {"y_true": y_true, "y_pred": y_pred},
                                                       reduction, gradient))
    requests.append(_requests.evaluate_request(wire.spec_from_dict("no_such_loss"),
                                               {"y_true": np.ones(3, np.float32), "y_pred": np.ones(3, np.float32)},
                                               "sum", False))
    for alone, item in _evaluate_both_ways(address, requests):
        if isinstance(alone, loss_service_pb2.EvaluateResponse):
            assert not item.HasField("error"), item.error
            assert item.response == alone
            np.testing.assert_array_equal(wire.to_numpy(item.response.loss, allow_empty=True),
                                          wire.to_numpy(alone.loss, allow_empty=True))
        else:
            assert isinstance(alone, grpc.RpcError)
            assert item.HasField("error") and item.error.code == alone.code().value[0]
            assert alone.details() == item.error.message
