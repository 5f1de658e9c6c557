"""Bad input through the real gRPC server: every failure is a clear status.

Each test sends one kind of bad request through raw ``lossd.v1`` stubs (the
thin client would refuse some of them locally) and checks the status code,
the ``ErrorInfo`` reason and that the message says what was expected and
what was received. The last test checks the server still serves afterwards.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.grpc_errors import error_info
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
F32 = tensor_pb2.DATA_TYPE_FLOAT32
RNG = np.random.default_rng(7)


# -- helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def channel(address):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return loss_service_pb2_grpc.LossServiceStub(channel)


def spec(name: str = "", params: dict | None = None, **fields) -> loss_pb2.LossSpec:
    out = loss_pb2.LossSpec(name=name, **fields)
    if params:
        out.params.CopyFrom(struct(params))
    return out


def struct(params: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(params)
    return s


def tensor(array) -> tensor_pb2.Tensor:
    return wire.from_numpy(np.asarray(array))


def request(loss="mean_squared_error", y_true=None, y_pred=None, params=None, **fields):
    y_true = np.zeros((4, 3), np.float32) if y_true is None else y_true
    y_pred = np.ones((4, 3), np.float32) if y_pred is None else y_pred
    loss = spec(loss, params) if isinstance(loss, str) else loss
    return loss_service_pb2.EvaluateRequest(
        loss=loss,
        y_true=y_true if isinstance(y_true, tensor_pb2.Tensor) else tensor(y_true),
        y_pred=y_pred if isinstance(y_pred, tensor_pb2.Tensor) else tensor(y_pred),
        **fields)


def check_status(status, code: grpc.StatusCode, reason: str, *fragments: str,
                 expected_received: bool = True) -> error_details_pb2.ErrorInfo:
    """Asserts a google.rpc.Status: code, ErrorInfo reason and domain, and a
    message holding ``fragments`` (what was expected and what was received)."""
    assert status.code == code.value[0], f"expected {code.name}, got {code_pb2.Code.Name(status.code)}: {status.message}"
    info = error_info(status)
    assert info.reason == reason, f"expected reason {reason}, got {info.reason}: {status.message}"
    assert info.domain == "lossd.dev"
    message = status.message
    if expected_received:
        assert "expected" in message.lower(), f"message does not say what was expected: {message!r}"
        assert "received" in message.lower(), f"message does not say what was received: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message {message!r}"
    return info


def call_error(fn, req, **kwargs):
    """Makes a unary call that must fail; returns its google.rpc.Status."""
    with pytest.raises(grpc.RpcError) as exc:
        fn(req, timeout=60, **kwargs)
    status = rpc_status.from_call(exc.value)
    assert status is not None, f"no rich status: {exc.value.code()} {exc.value.details()}"
    assert exc.value.code().value[0] == status.code
    assert exc.value.details() == status.message
    return status


def evaluate_error(stub, req, code=INVALID, reason="", *fragments, **kwargs):
    status = call_error(stub.Evaluate, req)
    return check_status(status, code, reason, *fragments, **kwargs)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# -- loss specs -----------------------------------------------------------------

def test_unknown_loss_suggests_close_names(stub):
    info = evaluate_error(stub, request("hubr"), INVALID, "UNKNOWN_LOSS", "Unknown loss",
                          "Expected a registered loss name or alias", "Received: 'hubr'", "Did you mean huber")
    assert info.metadata["loss"] == "hubr"


def test_unknown_alias_case(stub):
    # Names are case-sensitive snake_case; the CamelCase class name is an alias.
    evaluate_error(stub, request("HUBER"), INVALID, "UNKNOWN_LOSS", "Received: 'HUBER'")


def test_unknown_parameter(stub):
    info = evaluate_error(stub, request("huber", params={"deltaa": 1.0}), INVALID, "UNKNOWN_PARAMETER",
                          "`deltaa`", "Expected one of [delta]", "Received: deltaa")
    assert dict(info.metadata) == {"loss": "huber", "parameter": "deltaa"}


@pytest.mark.parametrize("loss, params, expected, received", [
    ("huber", {"delta": "big"}, "Expected a number", 'delta="big"'),
    ("binary_crossentropy", {"from_logits": 1.0}, "Expected true or false", "from_logits=1.0"),
    ("sparse_categorical_crossentropy", {"ignore_class": 1.5}, "Expected an integer or null",
     "ignore_class=1.5"),
    ("cosine_similarity", {"axis": "last"}, "Expected an integer, a list of integers or null", 'axis="last"'),
])
def test_parameter_of_the_wrong_type(stub, loss, params, expected, received):
    info = evaluate_error(stub, request(loss, params=params), INVALID, "BAD_PARAMETER", expected, received)
    assert info.metadata["parameter"] == next(iter(params))


@pytest.mark.parametrize("loss, params, expected, received", [
    ("huber", {"delta": 0.0}, "Expected a value > 0", "delta=0"),
    ("huber", {"delta": -1.5}, "Expected a value > 0", "delta=-1.5"),
    ("binary_crossentropy", {"label_smoothing": 2}, "Expected a value >= 0 and <= 1", "label_smoothing=2"),
    ("categorical_crossentropy", {"label_smoothing": -0.1}, "Expected a value >= 0 and <= 1",
     "label_smoothing=-0.1"),
])
def test_parameter_out_of_range(stub, loss, params, expected, received):
    info = evaluate_error(stub, request(loss, params=params), INVALID, "PARAMETER_OUT_OF_RANGE",
                          expected, received)
    assert dict(info.metadata) == {"loss": loss, "parameter": next(iter(params))}


def test_missing_loss(stub):
    req = request()
    req.ClearField("loss")
    evaluate_error(stub, req, INVALID, "BAD_LOSS_SPEC", "Expected a LossSpec", "Received: none")


def test_empty_loss_spec(stub):
    evaluate_error(stub, request(spec()), INVALID, "BAD_LOSS_SPEC", "expected exactly one of",
                   "Received: none of them")


def test_name_and_expression_both_set(stub):
    evaluate_error(stub, request(spec("huber", expression="mean(square(y_true - y_pred))")),
                   INVALID, "BAD_LOSS_SPEC", "expected exactly one of", "both `name` and `expression`")


def test_composite_with_a_name(stub):
    loss = spec("huber")
    loss.terms.add(loss=spec("mse"))
    evaluate_error(stub, request(loss), INVALID, "BAD_LOSS_SPEC", "Expected `name`, `expression` or `terms`",
                   "Received: terms and name")


def test_composite_nested_in_a_term(stub):
    inner = loss_pb2.LossSpec()
    inner.terms.add(loss=spec("mse"))
    loss = loss_pb2.LossSpec()
    loss.terms.add(loss=inner)
    # The message names the place and the rule, but has no "Expected ... Received" wording.
    evaluate_error(stub, request(loss), INVALID, "BAD_LOSS_SPEC", "terms[0]", "composite cannot be nested",
                   expected_received=False)


def test_bad_reduction_enum_number(stub):
    evaluate_error(stub, request(reduction=99), INVALID, "BAD_REDUCTION", "Expected a Reduction value 0-5",
                   "Received: 99")


def test_bad_term_reduction_enum_number(stub):
    loss = loss_pb2.LossSpec()
    loss.terms.add(loss=spec("mse"), reduction=42)
    evaluate_error(stub, request(loss), INVALID, "BAD_REDUCTION", "terms[0].reduction", "Received: 42")


# -- tensors ------------------------------------------------------------------

@pytest.mark.parametrize("field", ["y_true", "y_pred"])
def test_missing_tensor(stub, field):
    req = request()
    req.ClearField(field)
    evaluate_error(stub, req, INVALID, "BAD_TENSOR", f"{field} is required", "Expected a Tensor", "Received: none")


def test_shape_mismatch(stub):
    info = evaluate_error(stub, request(y_true=np.zeros((4, 3), np.float32), y_pred=np.ones((4, 2), np.float32)),
                          INVALID, "SHAPE_MISMATCH", "y_true.shape=[4, 3]", "y_pred.shape=[4, 2]")
    assert info.metadata["loss"] == "mean_squared_error"


def test_content_length_does_not_match_shape(stub):
    bad = tensor_pb2.Tensor(dtype=F32, shape=[4, 3], content=b"\0" * 40)
    evaluate_error(stub, request(y_pred=bad), INVALID, "BAD_TENSOR", "y_pred", "Expected 48 bytes",
                   "Received: 40 bytes")


def test_content_longer_than_shape(stub):
    bad = tensor_pb2.Tensor(dtype=F32, shape=[4, 3], content=b"\0" * 52)
    evaluate_error(stub, request(y_true=bad), INVALID, "BAD_TENSOR", "y_true", "Expected 48 bytes",
                   "Received: 52 bytes")


def test_negative_dimension(stub):
    bad = tensor_pb2.Tensor(dtype=F32, shape=[-1, 3], content=b"\0" * 12)
    evaluate_error(stub, request(y_pred=bad), INVALID, "BAD_TENSOR", "negative dimension", "Expected sizes >= 0",
                   "shape=[-1, 3]")


@pytest.mark.parametrize("field", ["y_true", "y_pred", "sample_weight"])
@pytest.mark.parametrize("shape", [[10**6, 10**6], [2**62, 4], [2**63 - 1, 2**63 - 1, 2]])
def test_shape_over_the_element_limit_is_refused_before_allocating(stub, server, field, shape):
    hostile = tensor_pb2.Tensor(dtype=F32, shape=shape, content=b"\0\0\0\0")
    req = request()
    getattr(req, field).CopyFrom(hostile)
    limit = server.settings.max_tensor_elements
    evaluate_error(stub, req, INVALID, "TENSOR_TOO_LARGE")  # warm-up: the same path, nothing cached
    before = rss_bytes()
    start = time.perf_counter()
    evaluate_error(stub, req, INVALID, "TENSOR_TOO_LARGE", field, f"Expected at most {limit:,} elements",
                   f"shape={shape}")
    elapsed = time.perf_counter() - start
    grown = rss_bytes() - before
    assert elapsed < 1.0, f"refusing a hostile shape took {elapsed:.2f} s"
    assert grown < 32 << 20, f"server RSS grew by {grown / 2**20:.1f} MiB refusing a hostile shape"


@pytest.mark.parametrize("dtype, received", [(tensor_pb2.DATA_TYPE_UNSPECIFIED, "unspecified"),
                                             (99, "<unknown 99>")])
@pytest.mark.parametrize("field", ["y_true", "y_pred"])
def test_unsupported_dtype(stub, field, dtype, received):
    bad = tensor_pb2.Tensor(dtype=dtype, shape=[4, 3], content=b"\0" * 48)
    evaluate_error(stub, request(**{field: bad}), INVALID, "UNSUPPORTED_DTYPE", field,
                   "Expected one of", "float32", f"Received: {received}")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_y_pred(stub, dtype):
    evaluate_error(stub, request(y_pred=np.ones((4, 3), dtype)), INVALID, "UNSUPPORTED_DTYPE",
                   "expected a floating dtype", f"Received: {np.dtype(dtype).name}")


@pytest.mark.parametrize("shape", [[0], [0, 3], [4, 0]])
def test_empty_tensors(stub, shape):
    empty = tensor_pb2.Tensor(dtype=F32, shape=shape)
    evaluate_error(stub, request(y_true=empty, y_pred=empty), INVALID, "EMPTY_TENSOR",
                   "Expected at least one element", f"shape={shape}")


def test_empty_sample_weight(stub):
    req = request(sample_weight=tensor_pb2.Tensor(dtype=F32, shape=[0]))
    evaluate_error(stub, req, INVALID, "EMPTY_TENSOR", "sample_weight", "Received: shape=[0]")


# -- labels and sample weights ---------------------------------------------------------

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]], np.float32)


@pytest.mark.parametrize("labels, received", [([0, 1, 3, 2], "Received: 3"), ([0, -1, 1, 2], "Received: -1"),
                                              ([0, 1, 7, -2], "Received: -2")])
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_sparse_labels_out_of_range(stub, labels, received, dtype):
    info = evaluate_error(stub, request("sparse_categorical_crossentropy", y_true=np.array(labels, dtype),
                                        y_pred=PROBS),
                          INVALID, "LABEL_OUT_OF_RANGE", "expected class indices in [0, 3)", received)
    assert info.metadata["loss"] == "sparse_categorical_crossentropy"


def test_sparse_labels_not_integers(stub):
    evaluate_error(stub, request("sparse_categorical_crossentropy", y_true=np.array([0, 1.5, 2, 1], np.float32),
                                 y_pred=PROBS),
                   INVALID, "LABEL_OUT_OF_RANGE", "must be integer class indices", "Received: non-integer",
                   expected_received=False)


def test_ignore_class_is_honoured(stub):
    labels = np.array([0, -1, 2, -1], np.int32)
    response = stub.Evaluate(request("sparse_categorical_crossentropy", y_true=labels, y_pred=PROBS,
                                     params={"ignore_class": -1}), timeout=60)
    expected = keras.losses.SparseCategoricalCrossentropy(ignore_class=-1)(labels, PROBS)
    np.testing.assert_allclose(wire.to_numpy(response.loss), np.asarray(expected), rtol=1e-6)
    assert not response.non_finite
    # Another out-of-range label is still refused, and the message names ignore_class.
    evaluate_error(stub, request("sparse_categorical_crossentropy", y_true=np.array([0, -1, 5, 1], np.int32),
                                 y_pred=PROBS, params={"ignore_class": -1}),
                   INVALID, "LABEL_OUT_OF_RANGE", "ignore_class=-1", "Received: 5")


@pytest.mark.parametrize("sw_shape", [(3,), (5,), (4, 2), (2, 4)])
def test_sample_weight_that_does_not_broadcast(stub, sw_shape):
    req = request(sample_weight=tensor(np.ones(sw_shape, np.float32)))
    evaluate_error(stub, req, INVALID, "SAMPLE_WEIGHT_MISMATCH", "broadcasts to [4]",
                   f"sample_weight.shape={list(sw_shape)}")


# -- NaN and Inf --------------------------------------------------------------------

NON_FINITE = [
    ("mean_squared_error", keras.losses.MeanSquaredError, np.nan),
    ("huber", keras.losses.Huber, np.inf),
    ("mean_absolute_error", keras.losses.MeanAbsoluteError, -np.inf),
    ("log_cosh", keras.losses.LogCosh, np.nan),
]


@pytest.mark.parametrize("name, cls, bad", NON_FINITE)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_non_finite_inputs_are_evaluated_as_keras_does(stub, name, cls, bad, reduction):
    y_true = RNG.normal(size=(4, 3)).astype(np.float32)
    y_pred = RNG.normal(size=(4, 3)).astype(np.float32)
    y_pred[1, 2] = bad
    enum = {"none": loss_pb2.REDUCTION_NONE, "sum": loss_pb2.REDUCTION_SUM}[reduction]
    response = stub.Evaluate(request(name, y_true=y_true, y_pred=y_pred, reduction=enum), timeout=60)
    got = wire.to_numpy(response.loss)
    expected = np.asarray(cls(reduction=reduction)(y_true, y_pred))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    assert not np.all(np.isfinite(expected)), "the reference should be non-finite"
    assert response.non_finite is True


def test_non_finite_y_true_is_flagged(stub):
    y_true = np.array([[0.0, np.nan, 1.0]], np.float32)
    y_pred = np.array([[0.1, 0.2, 0.3]], np.float32)
    response = stub.Evaluate(request("mse", y_true=y_true, y_pred=y_pred), timeout=60)
    np.testing.assert_allclose(wire.to_numpy(response.loss),
                               np.asarray(keras.losses.MeanSquaredError()(y_true, y_pred)), equal_nan=True)
    assert np.isnan(wire.to_numpy(response.loss))
    assert response.non_finite is True


def test_finite_inputs_are_not_flagged(stub):
    y_true = RNG.normal(size=(4, 3)).astype(np.float32)
    y_pred = RNG.normal(size=(4, 3)).astype(np.float32)
    response = stub.Evaluate(request("huber", y_true=y_true, y_pred=y_pred), timeout=60)
    np.testing.assert_allclose(wire.to_numpy(response.loss), np.asarray(keras.losses.Huber()(y_true, y_pred)),
                               rtol=1e-6)
    assert response.non_finite is False


def test_finite_inputs_with_a_non_finite_result_are_flagged(stub):
    # log(0) in crossentropy is clipped by Keras; an overflowing square is not.
    y_true = np.array([[0.0, 0.0]], np.float32)
    y_pred = np.array([[3e38, 0.0]], np.float32)
    response = stub.Evaluate(request("mse", y_true=y_true, y_pred=y_pred), timeout=60)
    expected = np.asarray(keras.losses.MeanSquaredError()(y_true, y_pred))
    np.testing.assert_array_equal(wire.to_numpy(response.loss), expected)
    assert np.isinf(expected)
    assert response.non_finite is True


# -- unexpected exceptions --------------------------------------------------------------

SECRET = "secret internal detail"


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """A server whose only loss raises an unexpected exception when built."""
    from lossd_server.app import create_server
    from lossd_server.config import Settings
    from lossd_server.losses.registry import LossEntry, LossRegistry

    def build(params, reduction, dtype):
        raise RuntimeError(SECRET)

    registry = LossRegistry([LossEntry(name="boom", aliases=(), doc="Always fails.", parameters=(), build=build)])
    settings = Settings(host="127.0.0.1", port=0, metrics_port=None,
                        data_dir=tmp_path_factory.mktemp("broken-data"), grace_seconds=0)
    srv = create_server(settings, registry=registry)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture()
def broken_stub(broken_server):
    with grpc.insecure_channel(f"127.0.0.1:{broken_server.port}") as ch:
        yield loss_service_pb2_grpc.LossServiceStub(ch)


def check_internal(status, caplog) -> str:
    assert status.code == code_pb2.INTERNAL, status
    assert SECRET not in status.message
    assert "RuntimeError" not in status.message
    info = error_info(status)
    assert info.reason == "INTERNAL"
    rid = info.metadata["request_id"]
    assert rid and rid != "-"
    assert rid in status.message
    assert status.message == f"Internal error; the server logged it with request id {rid}."
    logged = [r for r in caplog.records if rid in r.getMessage() and r.exc_info]
    assert logged, f"no log record with request id {rid} and a traceback: {caplog.text}"
    assert logged[0].levelno == logging.ERROR
    assert SECRET in caplog.text and "Traceback" in caplog.text
    return rid


def test_unexpected_exception_is_internal_and_generic(broken_stub, caplog):
    caplog.set_level(logging.INFO)
    status = call_error(broken_stub.Evaluate, request("boom"))
    check_internal(status, caplog)


def test_unexpected_exception_logs_the_client_request_id(broken_stub, caplog):
    caplog.set_level(logging.INFO)
    status = call_error(broken_stub.Evaluate, request("boom"), metadata=[("x-request-id", "req-from-client-42")])
    assert check_internal(status, caplog) == "req-from-client-42"


def test_unexpected_exception_in_a_stream_item(broken_stub, caplog):
    caplog.set_level(logging.INFO)
    items = [loss_service_pb2.EvaluateStreamRequest(request=request("boom"), request_id="a"),
             loss_service_pb2.EvaluateStreamRequest(request=request("nope"), request_id="b")]
    out = list(broken_stub.EvaluateStream(iter(items), timeout=60,
                                          metadata=[("x-request-id", "stream-rid-7")]))
    assert [o.request_id for o in out] == ["a", "b"]
    assert check_internal(out[0].error, caplog) == "stream-rid-7"
    check_status(out[1].error, INVALID, "UNKNOWN_LOSS", "'nope'", expected_received=False)


# -- streams ------------------------------------------------------------------------

def test_evaluate_stream_error_in_the_middle(stub):
    y_true = RNG.normal(size=(4, 3)).astype(np.float32)
    y_pred = RNG.normal(size=(4, 3)).astype(np.float32)
    items = [
        loss_service_pb2.EvaluateStreamRequest(request=request("mse", y_true, y_pred), request_id="first"),
        loss_service_pb2.EvaluateStreamRequest(request=request("huber", y_true, y_pred, params={"delta": -1.0}),
                                               request_id="bad"),
        loss_service_pb2.EvaluateStreamRequest(request=request("hubr", y_true, y_pred), request_id="unknown"),
        loss_service_pb2.EvaluateStreamRequest(request=request("mae", y_true, y_pred), request_id="last"),
    ]
    out = list(stub.EvaluateStream(iter(items), timeout=60))
    assert [o.request_id for o in out] == ["first", "bad", "unknown", "last"]
    assert not out[0].HasField("error") and not out[3].HasField("error")
    np.testing.assert_allclose(wire.to_numpy(out[0].response.loss),
                               np.asarray(keras.losses.MeanSquaredError()(y_true, y_pred)), rtol=1e-6)
    np.testing.assert_allclose(wire.to_numpy(out[3].response.loss),
                               np.asarray(keras.losses.MeanAbsoluteError()(y_true, y_pred)), rtol=1e-6)
    assert not out[1].HasField("response") and not out[2].HasField("response")
    check_status(out[1].error, INVALID, "PARAMETER_OUT_OF_RANGE", "Expected a value > 0", "delta=-1")
    check_status(out[2].error, INVALID, "UNKNOWN_LOSS", "Did you mean huber", expected_received=False)


def _header(loss="mean_squared_error", rows=8, cols=3, params=None, **fields):
    return loss_service_pb2.EvaluateChunkedRequest(header=loss_service_pb2.ChunkedHeader(
        loss=spec(loss, params), y_true=tensor_pb2.TensorInfo(dtype=F32, shape=[rows, cols]),
        y_pred=tensor_pb2.TensorInfo(dtype=F32, shape=[rows, cols]), **fields))


def _chunk(start, rows, cols=3):
    data = np.ones((rows, cols), np.float32).tobytes()
    return loss_service_pb2.EvaluateChunkedRequest(
        chunk=loss_service_pb2.TensorChunk(start=start, rows=rows, y_true=data, y_pred=data))


def chunked_error(stub, messages):
    """Runs EvaluateChunked to its end; returns (answers before the error, the error's Status)."""
    answers = []
    with pytest.raises(grpc.RpcError) as exc:
        for answer in stub.EvaluateChunked(iter(messages), timeout=60):
            answers.append(answer)
    status = rpc_status.from_call(exc.value)
    assert status is not None, f"no rich status: {exc.value.code()} {exc.value.details()}"
    return answers, status


def test_chunks_out_of_order(stub):
    answers, status = chunked_error(stub, [_header(rows=8), _chunk(0, 4), _chunk(6, 2)])
    assert [a.chunk.start for a in answers] == [0]
    check_status(status, INVALID, "BAD_CHUNK", "Expected a chunk starting at row 4", "Received: start=6, rows=2")


def test_a_chunked_request_counts_as_one_evaluation(server, stub):
    """A chunked request is one evaluation in the metrics, whatever its number
    of chunks; a refused one (in a chunk or in its header) is the client's
    error, as for Evaluate."""
    def count(outcome):
        return server.metrics.registry.get_sample_value(
            "lossd_loss_evaluations_total", {"loss": "mean_squared_error", "outcome": outcome}) or 0.0

    before = {o: count(o) for o in ("ok", "invalid_argument", "error")}
    answers = list(stub.EvaluateChunked(iter([_header(rows=8), _chunk(0, 4), _chunk(4, 4)]), timeout=60))
    assert answers[-1].WhichOneof("kind") == "summary"
    assert count("ok") - before["ok"] == 1
    chunked_error(stub, [_header(rows=8), _chunk(0, 4), _chunk(6, 2)])
    bad_header = _header(rows=8)
    bad_header.header.y_true.shape[:] = [7, 3]
    chunked_error(stub, [bad_header, _chunk(0, 4)])
    assert count("ok") - before["ok"] == 1
    assert count("invalid_argument") - before["invalid_argument"] == 2
    assert count("error") == before["error"]


def test_chunk_past_the_end(stub):
    _, status = chunked_error(stub, [_header(rows=8), _chunk(0, 4), _chunk(4, 6)])
    check_status(status, INVALID, "BAD_CHUNK", "with 1..4 rows", "Received: start=4, rows=6")


def test_chunked_stream_ending_early(stub):
    answers, status = chunked_error(stub, [_header(rows=8), _chunk(0, 4)])
    assert len(answers) == 1
    check_status(status, INVALID, "BAD_CHUNK", "expected 8 rows", "received 4")


def test_chunked_without_a_header(stub):
    _, status = chunked_error(stub, [_chunk(0, 4)])
    check_status(status, INVALID, "BAD_CHUNK", "Expected a ChunkedHeader first", "Received: chunk")


def test_chunked_empty_stream(stub):
    _, status = chunked_error(stub, [])
    check_status(status, INVALID, "BAD_CHUNK", "Received: nothing")


def test_chunked_second_header(stub):
    _, status = chunked_error(stub, [_header(rows=8), _chunk(0, 4), _header(rows=8)])
    check_status(status, INVALID, "BAD_CHUNK", "Received a second header", expected_received=False)


@pytest.mark.parametrize("loss, params", [("dice", None), ("tversky", None), ("circle", None),
                                          ("dice", {"axis": [0, 1]})])
def test_chunked_loss_not_batch_separable(stub, loss, params):
    header = _header(loss, params=params)
    if loss == "circle":
        header.header.y_true.shape[:] = [8]
    _, status = chunked_error(stub, [header, _chunk(0, 8)])
    # The message says why and what to do, without "Expected ... Received" wording.
    check_status(status, INVALID, "NOT_CHUNKABLE", f"`{loss}`", "cannot be computed exactly from slices",
                 "Send it with Evaluate instead")


def test_chunked_hostile_shape_in_header(stub):
    header = _header()
    header.header.y_pred.shape[:] = [10**6, 10**6]
    _, status = chunked_error(stub, [header])
    check_status(status, INVALID, "TENSOR_TOO_LARGE", "y_pred", "shape=[1000000, 1000000]")


def test_chunk_content_not_matching_rows(stub):
    bad = _chunk(0, 4)
    bad.chunk.y_pred = bad.chunk.y_pred[:-4]
    _, status = chunked_error(stub, [_header(rows=8), bad])
    check_status(status, INVALID, "BAD_TENSOR", "chunk y_pred", "Expected 48 bytes", "Received: 44 bytes")


# -- still serving ----------------------------------------------------------------------

def test_server_still_serves_after_all_of_that(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lossd.v1.LossService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    y_true = RNG.normal(size=(5, 2)).astype(np.float32)
    y_pred = RNG.normal(size=(5, 2)).astype(np.float32)
    response = stub.Evaluate(request("huber", y_true, y_pred, params={"delta": 2.0}), timeout=60)
    np.testing.assert_allclose(wire.to_numpy(response.loss),
                               np.asarray(keras.losses.Huber(delta=2.0)(y_true, y_pred)), rtol=1e-6)
