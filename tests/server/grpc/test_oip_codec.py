"""ModelInfer's codec: its raw contents lifted out of the request as views
(``wire.parse_lifted(..., bytes_field=...)``) and its raw outputs written
once into the answer (``wire.serialize_with_tensors(..., raw=...)``) are
the messages protobuf itself parses and builds, property-tested by parsing
and building with protobuf."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossd import wire
from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
          "BOOL": np.bool_}


@st.composite
def requests(draw):
    request = pb.ModelInferRequest(model_name=draw(st.text(max_size=8)), id=draw(st.text(max_size=8)))
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=3, unique=True)):
        request.parameters[name].double_param = draw(st.floats(allow_nan=False))
    for index in range(draw(st.integers(0, 4))):
        request.inputs.add(name=f"t{index}", datatype="FP32", shape=[draw(st.integers(0, 9))])
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    request.outputs.add(name="loss")
    return request


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), min_bytes=st.sampled_from([0, 1, 200, 1 << 20]))
def test_lifted_raw_contents_are_the_requests_entries_in_order(request, min_bytes):
    raw = request.SerializeToString()
    message, contents = wire.parse_lifted(raw, pb.ModelInferRequest, bytes_field="raw_input_contents",
                                          min_bytes=min_bytes)
    if len(raw) < min_bytes:  # protobuf parsed it whole
        assert contents == {} and message == request
        return
    entries = contents["raw_input_contents"]
    assert all(isinstance(entry, memoryview) for entry in entries)  # views of the received bytes, not copies
    assert [bytes(entry) for entry in entries] == list(request.raw_input_contents)
    assert not message.raw_input_contents
    message.raw_input_contents.extend(bytes(entry) for entry in entries)
    assert message == request


def test_a_raw_entry_that_is_not_bytes_is_refused():
    raw = pb.ModelInferRequest(model_name="mse").SerializeToString() + b"\x38\x01"  # field 7 as a varint
    with pytest.raises(wire.WireError, match="raw_input_contents: an entry is not bytes"):
        wire.parse_lifted(raw, pb.ModelInferRequest, bytes_field="raw_input_contents", min_bytes=0)


@st.composite
def outputs(draw):
    arrays = []
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(DTYPES.values(), key=str)))
        array = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
        if draw(st.booleans()) and array.ndim > 1:
            array = np.asfortranarray(array)  # written row-major all the same
        arrays.append(array)
    return arrays


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=outputs(), non_finite=st.booleans())
def test_hand_written_raw_outputs_are_the_answer_protobuf_builds(arrays, non_finite):
    head = pb.ModelInferResponse(model_name="huber", model_version="1", id="q")
    head.parameters["non_finite"].bool_param = non_finite
    for index, array in enumerate(arrays):
        head.outputs.add(name=f"o{index}", datatype=wire.oip_datatype(wire.dtype_enum(array.dtype)),
                         shape=array.shape)
    built = pb.ModelInferResponse()
    built.CopyFrom(head)
    built.raw_output_contents.extend(np.ascontiguousarray(array).tobytes() for array in arrays)
    parsed = pb.ModelInferResponse.FromString(wire.serialize_with_tensors(head, raw={"raw_output_contents": arrays}))
    assert parsed == built
