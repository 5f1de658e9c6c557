"""Issue 11, items 1, 4 and 14 (rank, axis): what a small evaluation request
can make the server spend is bounded before anything is traced or allocated.

* broadcasting inside an expression (inline, the built-in ``vae_kl``, a
  composite's term): ``(N, 1) - (1, N)`` is refused from the shapes alone,
  INVALID_ARGUMENT ``BROADCAST_TOO_LARGE``, quickly;
* operands that cannot broadcast: ``SHAPE_MISMATCH``; an out-of-range axis:
  ``BAD_EXPRESSION``;
* composites with more than ``max_composite_terms`` terms: ``TOO_MANY_TERMS``;
* tensors of rank above ``wire.MAX_RANK``: ``BAD_TENSOR``, in the codec.

Each test checks the status, the ErrorInfo reason and that health stays
SERVING. Runs against the session server of tests/conftest.py (default
settings: the defaults themselves must protect) and one small-limit server.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc_errors import error_info, status_of
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2

pytest.importorskip("tensorflow")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
F32 = tensor_pb2.DATA_TYPE_FLOAT32


@pytest.fixture(scope="module")
def channel(address):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return loss_service_pb2_grpc.LossServiceStub(channel)


def tensor(array) -> tensor_pb2.Tensor:
    return wire.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def request(loss: loss_pb2.LossSpec, y_true, y_pred, **extra) -> loss_service_pb2.EvaluateRequest:
    return loss_service_pb2.EvaluateRequest(
        loss=loss, y_true=y_true if isinstance(y_true, tensor_pb2.Tensor) else tensor(y_true),
        y_pred=y_pred if isinstance(y_pred, tensor_pb2.Tensor) else tensor(y_pred),
        tensors={k: tensor(v) for k, v in extra.items()})


def refused(stub, req, reason: str, *fragments: str):
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(req, timeout=60)
    assert err.value.code() == INVALID, err.value.details()
    status = status_of(err.value)
    info = error_info(status)
    assert info.reason == reason, status.message
    for fragment in fragments:
        assert fragment in status.message, status.message
    return status, info


def assert_serving(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lossd.v1.LossService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    ok = stub.Evaluate(request(loss_pb2.LossSpec(expression="mean(square(y_true - y_pred))"),
                               np.zeros((4, 3)), np.ones((4, 3))), timeout=60)
    np.testing.assert_allclose(wire.to_numpy(ok.loss), 1.0)


N = 45000
COLUMN, ROW = np.zeros((N, 1), np.float32), np.zeros((1, N), np.float32)


# -- item 1: broadcast result size ---------------------------------------------

def test_outer_broadcast_in_an_inline_expression_is_refused_fast(channel, stub):
    # 360 KB of request; 2e9 elements (8 GB) had TensorFlow tried.
    start = time.monotonic()
    status, info = refused(stub, request(loss_pb2.LossSpec(expression="mean(square(y_true - y_pred), axis=None)"),
                                         COLUMN, ROW),
                           "BROADCAST_TOO_LARGE", f"{N * N} elements", "Expected at most 100000000",
                           f"y_true.shape=[{N}, 1]", f"y_pred.shape=[1, {N}]")
    assert time.monotonic() - start < 5
    assert info.metadata["elements"] == str(N * N)
    assert_serving(channel, stub)


def test_outer_broadcast_through_vae_kl_is_refused(channel, stub):
    start = time.monotonic()
    refused(stub, request(loss_pb2.LossSpec(name="vae_kl"), np.zeros((4, 3)), np.zeros((4, 3)),
                          z_mean=COLUMN, z_log_var=ROW),
            "BROADCAST_TOO_LARGE", "vae_kl", f"z_mean.shape=[{N}, 1]", f"z_log_var.shape=[1, {N}]")
    assert time.monotonic() - start < 5
    assert_serving(channel, stub)


def test_outer_broadcast_in_a_composite_term_is_refused(channel, stub):
    terms = [loss_pb2.LossTerm(label="mse", loss=loss_pb2.LossSpec(name="mse")),
             loss_pb2.LossTerm(label="outer", loss=loss_pb2.LossSpec(expression="sum(a - b, axis=None)"),
                               inputs=["a", "b"])]
    # The expression reads extra tensors a and b; the mse term's own inputs are fine.
    spec = loss_pb2.LossSpec(terms=terms)
    start = time.monotonic()
    refused(stub, request(spec, np.zeros((4, 3)), np.zeros((4, 3)), a=COLUMN, b=ROW),
            "BROADCAST_TOO_LARGE", "outer")
    assert time.monotonic() - start < 5
    assert_serving(channel, stub)


def test_outer_broadcast_through_sample_weight_is_refused(channel, stub):
    # Per-sample values (1, N) times a sample weight (N, 1): Keras broadcasts to (N, N).
    req = request(loss_pb2.LossSpec(expression="y_true - y_pred"), ROW, ROW)
    req.sample_weight.CopyFrom(tensor(COLUMN))
    req.reduction = loss_pb2.REDUCTION_NONE
    start = time.monotonic()
    refused(stub, req, "BROADCAST_TOO_LARGE", f"{N * N} elements", f"sample_weight.shape=[{N}, 1]")
    assert time.monotonic() - start < 5
    assert_serving(channel, stub)


def test_outer_broadcast_between_per_sample_composite_terms_is_refused(channel, stub):
    # Each term alone is N elements; their sum, (N, 1) + (1, N), would be N * N.
    spec = loss_pb2.LossSpec(terms=[
        loss_pb2.LossTerm(label="col", loss=loss_pb2.LossSpec(expression="a * 1.0"), inputs=["a"]),
        loss_pb2.LossTerm(label="row", loss=loss_pb2.LossSpec(expression="b * 1.0"), inputs=["b"])])
    req = request(spec, np.zeros((4, 3)), np.zeros((4, 3)), a=COLUMN, b=ROW)
    req.reduction = loss_pb2.REDUCTION_NONE
    start = time.monotonic()
    refused(stub, req, "BROADCAST_TOO_LARGE", "composite", f"col: [{N}, 1]", f"row: [1, {N}]")
    assert time.monotonic() - start < 5
    assert_serving(channel, stub)


def test_ordinary_broadcasts_still_evaluate(stub):
    # (4, 3) against (3,) and a keepdims reduction are fine and correct.
    y_true, y_pred = np.arange(12.0).reshape(4, 3), np.array([1.0, 2.0, 3.0])
    spec = loss_pb2.LossSpec(expression="mean(square(y_true - y_pred) - mean(y_true, axis=-1, keepdims=True))")
    answer = stub.Evaluate(request(spec, y_true, y_pred), timeout=60)
    expected = np.mean(np.square(y_true - y_pred) - y_true.mean(-1, keepdims=True), axis=-1)
    np.testing.assert_allclose(wire.to_numpy(answer.loss), expected.mean(), rtol=1e-5)


def test_operands_that_do_not_broadcast_are_a_shape_mismatch(channel, stub):
    refused(stub, request(loss_pb2.LossSpec(expression="mean(y_true - y_pred)"), np.zeros((4, 3)), np.zeros((5, 3))),
            "SHAPE_MISMATCH", "[4, 3]", "[5, 3]")
    assert_serving(channel, stub)


# -- item 14: rank and axis -----------------------------------------------------

def test_out_of_range_axis_is_invalid_argument(channel, stub):
    refused(stub, request(loss_pb2.LossSpec(expression="mean(square(y_true - y_pred), axis=5)"),
                          np.zeros((4, 3)), np.zeros((4, 3))),
            "BAD_EXPRESSION", "axis 5 is out of range", "rank 2")
    refused(stub, request(loss_pb2.LossSpec(expression="softmax(y_pred, axis=-3)"),
                          np.zeros((4, 3)), np.zeros((4, 3))),
            "BAD_EXPRESSION", "axis -3")
    assert_serving(channel, stub)


@pytest.mark.parametrize("field", ["y_true", "y_pred"])
def test_rank_above_the_limit_is_refused_in_the_codec(channel, stub, field):
    high = tensor_pb2.Tensor(dtype=F32, shape=[1] * (wire.MAX_RANK + 1), content=b"\0" * 4)
    ok = tensor(np.zeros((1,)))
    tensors = {"y_true": ok, "y_pred": ok, field: high}
    refused(stub, request(loss_pb2.LossSpec(name="mse"), tensors["y_true"], tensors["y_pred"]),
            "BAD_TENSOR", "rank of at most 64", f"rank {wire.MAX_RANK + 1}")
    assert_serving(channel, stub)


def test_rank_limit_in_the_codec():
    with pytest.raises(wire.WireError) as err:
        wire.check_shape([1] * 65, field="t")
    assert err.value.reason == "BAD_TENSOR"
    assert wire.check_shape([1] * 64, field="t") == 1


# -- item 4: terms per composite -------------------------------------------------

def many_terms(count: int) -> loss_pb2.LossSpec:
    return loss_pb2.LossSpec(terms=[
        loss_pb2.LossTerm(label=f"t{i}", loss=loss_pb2.LossSpec(expression=f"mean(square(y_true - y_pred)) * {i + 1}"))
        for i in range(count)])


def test_a_composite_of_1000_terms_is_refused_before_compiling(channel, stub):
    start = time.monotonic()
    _, info = refused(stub, request(many_terms(1000), np.zeros((4, 3)), np.zeros((4, 3))),
                      "TOO_MANY_TERMS", "at most 16 terms", "Received: 1000")
    assert time.monotonic() - start < 5  # 36 s of compilation before the bound
    assert info.metadata["limit"] == "16"
    assert_serving(channel, stub)


def test_a_composite_at_the_limit_evaluates(stub):
    answer = stub.Evaluate(request(many_terms(16), np.zeros((4, 3)), np.ones((4, 3))), timeout=120)
    np.testing.assert_allclose(wire.to_numpy(answer.loss), sum(range(1, 17)), rtol=1e-5)


# -- the settings ----------------------------------------------------------------

def test_small_limits_from_settings(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    monkeypatch.setenv("LOSSD_MAX_BROADCAST_ELEMENTS", "100")
    monkeypatch.setenv("LOSSD_MAX_COMPOSITE_TERMS", "2")
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, data_dir=tmp_path, grace_seconds=1.0)
    assert (settings.max_broadcast_elements, settings.max_composite_terms) == (100, 2)
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            s = loss_service_pb2_grpc.LossServiceStub(ch)
            spec = loss_pb2.LossSpec(expression="mean(y_true * y_pred)")
            s.Evaluate(request(spec, np.zeros((10, 10)), np.zeros((10, 10))), timeout=60)  # 100: at the limit
            refused(s, request(spec, np.zeros((10, 1)), np.zeros((1, 11))), "BROADCAST_TOO_LARGE",
                    "110 elements", "Expected at most 100")
            refused(s, request(many_terms(3), np.zeros((2, 2)), np.zeros((2, 2))), "TOO_MANY_TERMS",
                    "at most 2 terms")
            assert_serving(ch, s)
    finally:
        srv.stop(0)


def test_create_job_with_too_many_terms_is_refused(client):
    # Training plans through the evaluator's planner: the same bound.
    import lossd

    loss = {"terms": [{"label": f"t{i}", "name": "sparse_categorical_crossentropy"} for i in range(17)]}
    with pytest.raises(lossd.LossdError) as err:
        client.create_job("cnn", "digits", loss=loss, epochs=1, steps_per_epoch=1)
    assert err.value.reason == "TOO_MANY_TERMS", err.value.message
    assert "at most 16 terms" in err.value.message


# -- issue 23: sample_weight rank -----------------------------------------------

@pytest.mark.parametrize("rank", [4, 33, 64])
def test_a_sample_weight_of_too_many_dimensions_is_invalid_argument(channel, stub, rank):
    # A weight of shape [1] * 64 was INTERNAL: numpy's broadcast raised a RuntimeError.
    req = request(loss_pb2.LossSpec(name="mse"), np.zeros((4, 3)), np.ones((4, 3)))
    req.sample_weight.CopyFrom(tensor(np.ones([1] * rank)))
    refused(stub, req, "SAMPLE_WEIGHT_MISMATCH", "too many dimensions", "Expected at most rank 2",
            f"(rank {rank})")
    assert_serving(channel, stub)
