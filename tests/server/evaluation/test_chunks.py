"""Chunked evaluation equals the one-piece evaluation, or is refused.

The client switches to EvaluateChunked by itself once a request passes one
message; a client with a tiny ``max_message_bytes`` makes every request go
through it in many slices. For every registered loss, ranks 1 to 4, every
reduction, with and without sample weights and gradients, and for
expressions reducing over any axis, the chunked answer must equal the
one-piece answer (rtol 1e-4 in float32, 1e-10 in float64), or the request
must be refused with NOT_CHUNKABLE before any value is returned.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")

import lossd  # noqa: E402
from lossd import wire  # noqa: E402
from lossd_server.losses.expression_rows import ROWS, ROWS_MEAN, ROWS_SUM, RowStructure, row_structure  # noqa: E402
from lossd_server.losses.registry import SHAPES_CTC, SHAPES_LABELS, SHAPES_SPARSE  # noqa: E402

# Under the client's 64 KiB allowance for a message's other fields, so every
# request goes through EvaluateChunked, cut into slices of about 512 bytes.
TINY_MESSAGE = 32 << 10
SLICE_BYTES = 512
RTOL = {np.float32: 1e-4, np.float64: 1e-10}
ATOL = {np.float32: 1e-6, np.float64: 1e-12}

EXPRESSIONS = [
    "mean(square(y_true - y_pred), axis=-1)",
    "mean(square(y_true - y_pred), axis=-2)",
    "mean(square(y_true - y_pred), axis=0)",
    "sum(abs(y_true - y_pred), axis=(0, -1))",
    "mean(square(y_true - y_pred), axis=None)",
    "sum(y_true * log(y_pred), axis=None) * -0.5",
    "mean(y_pred, axis=None) - mean(y_true, axis=None)",
    "square(mean(y_true - y_pred, axis=None))",
    "max(abs(y_true - y_pred), axis=0)",
    "mean(log_softmax(y_pred, axis=0) * y_true, axis=-1)",
    "mean(log_softmax(y_pred, axis=-1) * y_true, axis=-1)",
    "y_true * square(y_pred)",
    "mean(square(y_true - y_pred), axis=-1, keepdims=True)",
    "mean(square(y_true - y_pred), axis=0, keepdims=True)",
]


@pytest.fixture(scope="module")
def clients(address):
    with lossd.Client(address, timeout=120) as whole, \
            lossd.Client(address, timeout=120, max_message_bytes=TINY_MESSAGE, chunk_bytes=SLICE_BYTES) as sliced:
        yield whole, sliced


@pytest.fixture(scope="module")
def losses(clients):
    whole, _ = clients
    return {info.name: info for info in whole.losses()}


def _inputs(draw, name: str, shapes: str, rank: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    rows = draw(st.integers(2, 40))
    tail = tuple(draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (rows, *tail)
    y_pred = rng.uniform(0.05, 0.95, shape).astype(dtype)
    if shapes == SHAPES_SPARSE:
        if rank < 2:
            shape = (rows, 3)
            y_pred = rng.uniform(0.05, 0.95, shape).astype(dtype)
        y_true = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    elif shapes == SHAPES_LABELS:
        y_pred = rng.standard_normal((rows, 3)).astype(dtype)
        y_true = rng.integers(0, 3, rows).astype(np.int32)
    elif shapes == SHAPES_CTC:
        y_pred = rng.uniform(0.05, 0.95, (rows, 6, 4)).astype(dtype)
        y_true = rng.integers(1, 4, (rows, 3)).astype(np.int32)
    elif draw(st.booleans()):
        y_true = rng.integers(0, 2, shape).astype(dtype)  # binary labels (hinge, crossentropy)
    else:
        y_true = rng.uniform(0.05, 0.95, shape).astype(dtype)
    return y_true, y_pred


@st.composite
def requests(draw, names):
    loss = draw(st.sampled_from(names + [f"expr:{e}" for e in EXPRESSIONS]))
    rank = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shapes = names_shapes.get(loss, "same")
    y_true, y_pred = _inputs(draw, loss, shapes, rank, dtype)
    reduction = draw(st.sampled_from(wire.REDUCTIONS))
    gradient = draw(st.booleans())
    sample_weight = None
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        sw_rank = draw(st.integers(1, max(1, y_pred.ndim - 1)))
        sample_weight = rng.uniform(0.0, 2.0, y_pred.shape[:sw_rank]).astype(dtype)
    spec = {"expression": loss[5:]} if loss.startswith("expr:") else {"name": loss}
    return spec, y_true, y_pred, dict(reduction=reduction, gradient=gradient, sample_weight=sample_weight)


names_shapes: dict[str, str] = {}


def _call(client, spec, y_true, y_pred, kwargs):
    try:
        return client.evaluate(spec, y_true, y_pred, **kwargs), None
    except lossd.LossdError as error:
        return None, error


def _assert_same(whole, sliced, dtype):
    rtol, atol = RTOL[dtype], ATOL[dtype]
    np.testing.assert_allclose(sliced.loss, whole.loss, rtol=rtol, atol=atol, equal_nan=True)
    assert sliced.loss.shape == whole.loss.shape
    if whole.gradient is not None:
        np.testing.assert_allclose(sliced.gradient, whole.gradient, rtol=rtol, atol=atol, equal_nan=True)
    assert sliced.non_finite == whole.non_finite


def test_every_request_here_is_sliced(clients):
    """The control: the tiny client does send these requests in slices."""
    _, sliced = clients
    sent = []
    original = sliced._losses.EvaluateChunked

    def recording(requests, **kwargs):
        def spy():
            for message in requests:
                sent.append(message.WhichOneof("kind"))
                yield message
        return original(spy(), **kwargs)

    sliced._losses.EvaluateChunked = recording
    try:
        sliced.evaluate("mse", np.zeros((200, 2), np.float32), np.ones((200, 2), np.float32))
    finally:
        sliced._losses.EvaluateChunked = original
    assert sent[0] == "header" and sent.count("chunk") >= 2, sent


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_chunked_equals_one_piece_or_is_refused(clients, losses, data):
    whole_client, sliced_client = clients
    if not names_shapes:
        from lossd_server.losses.registry import default_registry

        names_shapes.update({e.name: e.shapes for e in default_registry().entries()})
    names = sorted(n for n in losses if losses[n].source in ("keras", "builtin"))
    spec, y_true, y_pred, kwargs = data.draw(requests(names))
    whole, whole_error = _call(whole_client, spec, y_true, y_pred, kwargs)
    sliced, sliced_error = _call(sliced_client, spec, y_true, y_pred, kwargs)
    if sliced_error is not None:
        assert sliced_error.code.name == "INVALID_ARGUMENT", sliced_error
        if sliced_error.reason == "NOT_CHUNKABLE":
            event("refused: not chunkable")
            return
        # Otherwise the one-piece call must have been refused for the same reason.
        assert whole_error is not None, f"only the chunked call failed: {sliced_error}"
        assert whole_error.reason == sliced_error.reason, (whole_error, sliced_error)
        event("refused by both")
        return
    assume(whole_error is None)  # what one message refuses, slices may not be asked to answer
    event("compared")
    # TensorFlow's CTC kernel computes in float32 whatever the input dtype.
    _assert_same(whole, sliced, np.float32 if spec.get("name") == "ctc" else y_pred.dtype.type)


# -- the cases the issue names, which must be computed, not refused -------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "log_cosh", "kl_divergence", "binary_crossentropy"])
@pytest.mark.parametrize("reduction", wire.REDUCTIONS)
def test_rank_1_losses_over_the_batch_are_computed_exactly(clients, loss, reduction, dtype):
    whole_client, sliced_client = clients
    rng = np.random.default_rng(1)
    y_true = rng.uniform(0.05, 0.95, 1001).astype(dtype)
    y_pred = rng.uniform(0.05, 0.95, 1001).astype(dtype)
    sliced = sliced_client.evaluate(loss, y_true, y_pred, reduction=reduction, gradient=True)
    whole = whole_client.evaluate(loss, y_true, y_pred, reduction=reduction, gradient=True)
    _assert_same(whole, sliced, dtype)


def test_expression_over_axis_minus_2_with_sum(clients):
    """The issue's case: mean over axis -2 of a (rows, 8) pair, reduction sum."""
    whole_client, sliced_client = clients
    rng = np.random.default_rng(2)
    y_true = rng.standard_normal((2000, 8)).astype(np.float32)
    y_pred = rng.standard_normal((2000, 8)).astype(np.float32)
    spec = {"expression": "mean(square(y_true - y_pred), axis=-2)"}
    expected = np.sum(np.mean(np.square(y_true - y_pred), axis=-2))
    for reduction in wire.REDUCTIONS:
        sliced = sliced_client.evaluate(spec, y_true, y_pred, reduction=reduction, gradient=True)
        whole = whole_client.evaluate(spec, y_true, y_pred, reduction=reduction, gradient=True)
        _assert_same(whole, sliced, np.float32)
    sliced = sliced_client.evaluate(spec, y_true, y_pred, reduction="sum")
    np.testing.assert_allclose(sliced.loss, expected, rtol=1e-5)


def test_reduction_none_over_the_batch_returns_the_values(clients):
    """Reduction none of a loss that reduces over the rows: the values come
    back whole in the summary (no bare ValueError in the client)."""
    whole_client, sliced_client = clients
    rng = np.random.default_rng(3)
    y_true = rng.standard_normal((3000,)).astype(np.float32)
    y_pred = rng.standard_normal((3000,)).astype(np.float32)
    sliced = sliced_client.evaluate("mse", y_true, y_pred, reduction="none")
    np.testing.assert_allclose(sliced.loss, keras.losses.MeanSquaredError(reduction="none")(y_true, y_pred),
                               rtol=1e-5)


def test_keras_itself_agrees_with_chunked_rank_1_mse(clients):
    _, sliced_client = clients
    rng = np.random.default_rng(4)
    y_true = rng.standard_normal(5001).astype(np.float32)
    y_pred = rng.standard_normal(5001).astype(np.float32)
    result = sliced_client.evaluate("mse", y_true, y_pred, gradient=True)
    np.testing.assert_allclose(result.loss, keras.losses.MeanSquaredError()(y_true, y_pred), rtol=1e-5)
    np.testing.assert_allclose(result.gradient, 2 * (y_pred - y_true) / y_true.size, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("labels", [[0.0, 1.0, 1.0, 0.0] * 300 + [-1.0, 1.0] * 300])
def test_hinge_labels_mixed_across_slices_are_refused(clients, labels):
    """Keras converts {0,1} labels to {-1,1} only when every label is 0 or 1:
    a split that would see a binary slice and a non-binary one is refused."""
    _, sliced_client = clients
    y_true = np.asarray(labels, np.float32).reshape(-1, 2)
    y_pred = np.random.default_rng(5).standard_normal(y_true.shape).astype(np.float32)
    with pytest.raises(lossd.LossdError) as exc:
        sliced_client.evaluate("hinge", y_true, y_pred)
    assert exc.value.reason == "NOT_CHUNKABLE", exc.value


# -- the expression analysis -------------------------------------------------------

@pytest.mark.parametrize("expression, ranks, expected", [
    ("mean(square(y_true - y_pred), axis=-1)", 2, ROWS),
    ("mean(square(y_true - y_pred), axis=-1)", 1, ROWS_MEAN),
    ("mean(square(y_true - y_pred), axis=-2)", 2, ROWS_MEAN),
    ("mean(square(y_true - y_pred), axis=-2)", 3, ROWS),
    ("sum(y_true * y_pred, axis=(0, 2), keepdims=True)", 3, ROWS_SUM),
    ("sum(y_true * y_pred, axis=(0, 2))", 3, ROWS_SUM),
    ("sum(y_true * y_pred, axis=(1, -1))", 3, ROWS),
    ("mean(y_pred, axis=None) - mean(y_true, axis=None)", 2, ROWS_MEAN),
    ("2 * mean(y_pred, axis=None) / 3", 2, ROWS_MEAN),
    ("mean(y_pred, axis=None) + sum(y_true, axis=None)", 2, None),
    ("square(mean(y_true - y_pred, axis=None))", 2, None),
    ("1 / mean(y_pred, axis=None)", 2, None),
    ("max(y_pred, axis=0)", 2, None),
    ("logsumexp(y_pred, axis=0)", 2, None),
    ("softmax(y_pred, axis=0)", 2, None),
    ("softmax(y_pred, axis=-1)", 2, ROWS),
    ("mean(y_pred, axis=0) * y_true", 2, None),
    ("where(y_true > 0.5, y_pred, 1 - y_pred)", 2, ROWS),
    ("y_pred - mean(y_pred, axis=-1, keepdims=True)", 2, ROWS),
    ("mean(y_pred, axis=5)", 2, None),
])
def test_row_structure_of_expressions(expression, ranks, expected):
    structure = row_structure(expression, {"y_true": ranks, "y_pred": ranks})
    assert (structure.kind if structure else None) == expected


def test_row_structure_refuses_tensors_of_different_ranks():
    # (rows,) against (rows, 1) broadcasts to (rows, rows): every row meets every other.
    assert row_structure("square(y_true - y_pred)", {"y_true": 1, "y_pred": 2}) is None


def test_row_structure_knows_the_values_rank():
    assert row_structure("mean(square(y_true - y_pred), axis=-1)", {"y_true": 3, "y_pred": 3}) == RowStructure(ROWS, 2)
    assert row_structure("sum(y_pred, axis=(0, 1), keepdims=True)", {"y_pred": 3}) == RowStructure(ROWS_SUM, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, params", [((5001,), {}), ((701, 3), {"axis": None}), ((3001,), {"axis": 0})])
def test_cosine_of_long_vectors_is_computed_exactly(clients, shape, params, dtype):
    """The issue's case: cosine similarity over the whole vector is a dot
    product and two norms, summed across slices; the gradient too."""
    whole_client, sliced_client = clients
    rng = np.random.default_rng(6)
    y_true = rng.standard_normal(shape).astype(dtype)
    y_pred = (0.7 * y_true + 0.5 * rng.standard_normal(shape)).astype(dtype)
    spec = {"name": "cosine_similarity", "params": params}
    for reduction in wire.REDUCTIONS:
        sliced = sliced_client.evaluate(spec, y_true, y_pred, reduction=reduction, gradient=True)
        whole = whole_client.evaluate(spec, y_true, y_pred, reduction=reduction, gradient=True)
        _assert_same(whole, sliced, dtype)
    keras_value = keras.losses.CosineSimilarity(axis=params.get("axis", -1), dtype=np.dtype(dtype).name)(y_true, y_pred)
    np.testing.assert_allclose(sliced.loss, keras_value, rtol=RTOL[dtype])
