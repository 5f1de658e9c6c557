"""The Open Inference Protocol over gRPC, through lossd's own port.

A real server (the session's ``server`` fixture), called with stubs of the
protocol's service: health and metadata, and ModelInfer compared with Keras
itself and with lossd.v1 Evaluate (the same request, bit for bit), errors
with their reasons and the codes the protocol's clients expect.
tests/server/grpc/test_oip_clients.py drives the same server with tritonclient,
installed as published.
"""

from __future__ import annotations

import json

import grpc
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossd
from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb
from lossd_server.grpc.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.oip_requests import error_of, infer_request, outputs


@pytest.fixture(scope="module")
def stub(address):
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def client(address):
    with lossd.Client(address) as c:
        yield c


def test_server_live_ready_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "lossd" and meta.version == lossd.__version__
    assert stub.ModelReady(pb.ModelReadyRequest(name="huber")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="mse", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no_such_loss")).ready


def test_model_metadata_lists_tensors(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="sparse_categorical_crossentropy"))
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {"y_true": ("INT64", [-1]), "y_pred": ("FP32", [-1, -1]), "sample_weight": ("FP32", [-1])}
    assert [t.name for t in meta.outputs] == ["loss", "gradient"]
    assert meta.versions == ["1"] and meta.platform == "lossd"
    # An alias names the same model, under its canonical name.
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="mse")).name == "mean_squared_error"


def test_unknown_model_is_not_found(stub):
    for call in (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="hubber")),
                 lambda: stub.ModelInfer(infer_request("hubber", {"y_true": np.zeros((2, 2), np.float32),
                                                                  "y_pred": np.zeros((2, 2), np.float32)}))):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert error_of(caught.value) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL")
        assert "huber" in caught.value.details()  # the suggestion


def keras_huber(y_true, y_pred, delta, reduction):
    loss = keras.losses.Huber(delta=delta, reduction=reduction)
    return np.asarray(loss(y_true, y_pred))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 12), cols=st.integers(1, 5), delta=st.floats(0.1, 5.0),
       reduction=st.sampled_from(["none", "sum", "sum_over_batch_size", "mean"]), raw=st.booleans(),
       big=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_model_infer_equals_keras_and_evaluate(stub, client, rows, cols, delta, reduction, raw, big, seed):
    """ModelInfer answers Keras's Huber, and exactly what lossd.v1 Evaluate
    answers for the same tensors and spec (one evaluation service under both).
    ``big``: the raw contents are past wire.LIFT_MIN_BYTES, so they are read
    as views of the received bytes and the gradient written into the answer
    by hand (typed contents that big take protobuf's path all the same)."""
    if big:
        rows += 16_384  # 64 KiB of gradient at one column
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=(rows, cols)).astype(np.float32)
    y_pred = rng.normal(size=(rows, cols)).astype(np.float32)
    response = stub.ModelInfer(infer_request("huber", {"y_true": y_true, "y_pred": y_pred},
                                             {"delta": delta, "reduction": reduction, "gradient": True}, raw=raw))
    got = outputs(response)
    assert response.model_name == "huber" and response.id == "r1"
    np.testing.assert_allclose(got["loss"], keras_huber(y_true, y_pred, delta, reduction), rtol=1e-6, atol=1e-7)
    v1 = client.evaluate({"name": "huber", "params": {"delta": delta}}, y_true, y_pred, reduction=reduction,
                         gradient=True)
    assert got["loss"].tobytes() == np.asarray(v1.loss, np.float32).tobytes()
    assert got["gradient"].tobytes() == np.asarray(v1.gradient, np.float32).tobytes()
    assert response.parameters["non_finite"].bool_param is False


def test_requested_outputs_and_sample_weight(stub):
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 6).astype(np.int64)
    y_pred = rng.uniform(0.1, 1.0, (6, 4)).astype(np.float32)
    weights = rng.uniform(0, 2, 6).astype(np.float32)
    response = stub.ModelInfer(infer_request("sparse_categorical_crossentropy",
                                             {"y_true": y_true, "y_pred": y_pred, "sample_weight": weights},
                                             outputs=["loss"]))
    got = outputs(response)
    assert list(got) == ["loss"]  # the gradient was not asked for
    want = keras.losses.SparseCategoricalCrossentropy()(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(got["loss"], np.asarray(want), rtol=1e-6)


def test_spec_model_evaluates_a_composite(stub, client):
    rng = np.random.default_rng(2)
    y_true, y_pred = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    spec = {"terms": [{"loss": {"name": "mse"}, "weight": 0.5},
                      {"loss": {"expression": "mean(abs(y_true - y_pred), axis=-1)"}, "weight": 2.0}]}
    response = stub.ModelInfer(infer_request("lossd", {"y_true": y_true, "y_pred": y_pred},
                                             {"loss_spec": json.dumps(spec)}))
    v1 = client.evaluate(spec, y_true, y_pred)
    assert outputs(response)["loss"].tobytes() == np.asarray(v1.loss).tobytes()
    want = 0.5 * np.mean((y_true - y_pred) ** 2) + 2.0 * np.mean(np.abs(y_true - y_pred))
    np.testing.assert_allclose(outputs(response)["loss"], want, rtol=1e-12)


@pytest.mark.parametrize("model, tensors, parameters, reason", [
    ("huber", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {"delta": -1.0}, "PARAMETER_OUT_OF_RANGE"),
    ("huber", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {"delta": "two"}, "BAD_PARAMETER"),
    ("huber", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {"deltaa": 1.0}, "UNKNOWN_PARAMETER"),
    ("huber", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {"reduction": "avg"}, "BAD_REDUCTION"),
    ("huber", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 3), np.float32)},
     {}, "SHAPE_MISMATCH"),
    ("huber", {"y_pred": np.zeros((2, 2), np.float32)}, {}, "BAD_TENSOR"),
    ("lossd", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {"loss_spec": "{not json"}, "BAD_LOSS_SPEC"),
    ("lossd", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
     {}, "BAD_LOSS_SPEC"),
])
def test_bad_requests_are_invalid_argument(stub, model, tensors, parameters, reason):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer_request(model, tensors, parameters))
    assert error_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason), caught.value.details()


def test_malformed_tensors_are_invalid_argument(stub):
    request = infer_request("mse", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)})
    request.raw_input_contents[1] = b"\0" * 15  # 16 bytes declared
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert error_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_TENSOR")
    assert "Expected 16 bytes" in caught.value.details()
    request = infer_request("mse", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)})
    request.inputs[0].datatype = "BYTES"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert error_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_DTYPE")
    request = infer_request("mse", {"y_true": np.zeros((2, 2), np.float32), "y_pred": np.zeros((2, 2), np.float32)},
                            raw=False)
    del request.inputs[1].contents.fp32_contents[-1]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert error_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_TENSOR")


def test_undecodable_bytes_are_invalid_argument(address):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff")
    assert error_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST")
