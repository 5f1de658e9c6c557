"""``matrix_crossentropy``: a loss with state that travels with the request.

Values and the updated matrix are compared with a plain numpy
implementation of the formulas (``lossd_server.losses.matrix``), the
gradient with ``tf.GradientTape`` on the same formula written directly in
TensorFlow; then a real gRPC round trip (Evaluate and EvaluateStream), the
refusals of bad matrices, and the refusal to split the loss into rows.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402

import lossd  # noqa: E402
from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.chunks import chunk_layout  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.losses.plan import row_family  # noqa: E402

EPS = 1e-7  # keras.config.epsilon()
TOL = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-12, atol=1e-12)}


# -- plain numpy references ------------------------------------------------------

def numpy_loss(t, o, a):
    """Per-sample Σ_i [−t_i log2(o_i) + (A·t)_i exp(o_i) − t_i exp(o_i)], in float64."""
    t, o, a = (np.asarray(x, np.float64) for x in (t, o, a))
    out = np.zeros(len(t))
    for s in range(len(t)):
        at = a @ t[s]
        log2 = np.log2(np.clip(o[s], EPS, 1 - EPS))
        out[s] = np.sum(-t[s] * log2 + at * np.exp(o[s]) - t[s] * np.exp(o[s]))
    return out


def numpy_update(a, t, o, window):
    """A moved 1/window of the way to the batch's row-normalised confusion
    (true class i predicted as argmax o), rows without samples unchanged."""
    a, t, o = (np.asarray(x, np.float64) for x in (a, t, o))
    k = a.shape[0]
    counts, totals = np.zeros((k, k)), np.zeros(k)
    for s in range(len(t)):
        j = int(np.argmax(o[s]))
        for i in range(k):
            counts[i, j] += t[s, i]
            totals[i] += t[s, i]
    new = a.copy()
    for i in range(k):
        if totals[i] > 0:
            new[i] = a[i] + (counts[i] / totals[i] - a[i]) / window
    return new


def _inputs(rng, batch, k, dtype, soft=False):
    labels = rng.integers(0, k, batch)
    t = rng.dirichlet(np.ones(k), batch) if soft else np.eye(k)[labels]
    o = rng.dirichlet(np.ones(k), batch)
    a = rng.uniform(0, 1, (k, k))
    a /= a.sum(axis=1, keepdims=True)
    return t.astype(dtype), o.astype(dtype), a.astype(dtype)


@pytest.fixture(scope="module")
def evaluator():
    ev = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"))
    yield ev
    ev.close()


def _plan(evaluator, spec=None, names=("y_true", "y_pred", "matrix")):
    return evaluator.planner.plan(spec or {"name": "matrix_crossentropy"}, names)


# -- numerics --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k, batch", [(2, 1), (3, 5), (7, 4), (10, 33)])
@pytest.mark.parametrize("soft", [False, True])
def test_values_and_update_equal_numpy(evaluator, dtype, k, batch, soft):
    rng = np.random.default_rng(k * 100 + batch)
    t, o, a = _inputs(rng, batch, k, dtype, soft)
    plan = _plan(evaluator)
    for window in (4, 1, 9):
        spec = {"name": "matrix_crossentropy", "params": {"window": window}}
        result = evaluator.evaluate(_plan(evaluator, spec), {"y_true": t, "y_pred": o, "matrix": a},
                                    reduction="none")
        assert result.loss.dtype == np.dtype(dtype) and result.outputs["matrix"].dtype == np.dtype(dtype)
        np.testing.assert_allclose(result.loss, numpy_loss(t, o, a), **TOL[dtype])
        np.testing.assert_allclose(result.outputs["matrix"], numpy_update(a, t, o, window), **TOL[dtype])
    for reduction, reduce in (("sum", np.sum), ("sum_over_batch_size", np.mean)):
        result = evaluator.evaluate(plan, {"y_true": t, "y_pred": o, "matrix": a}, reduction=reduction)
        np.testing.assert_allclose(result.loss, reduce(numpy_loss(t, o, a)), **TOL[dtype])


def test_absent_classes_keep_their_rows(evaluator):
    """A class with no sample in the batch has no news: its row stays as it was."""
    t = np.eye(5)[[0, 0, 2]].astype(np.float32)
    o = np.eye(5)[[1, 0, 2]].astype(np.float32) * 0.9 + 0.02
    a = np.full((5, 5), 0.2, np.float32)
    new = evaluator.evaluate(_plan(evaluator), {"y_true": t, "y_pred": o, "matrix": a}).outputs["matrix"]
    np.testing.assert_array_equal(new[[1, 3, 4]], a[[1, 3, 4]])
    np.testing.assert_allclose(new[0], a[0] + (np.array([0.5, 0.5, 0, 0, 0]) - a[0]) / 4, rtol=1e-6)
    np.testing.assert_allclose(new.sum(axis=1), 1.0, rtol=1e-6)  # rows stay normalised


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_missing_matrix_starts_from_the_identity(evaluator, dtype):
    rng = np.random.default_rng(7)
    t, o, _ = _inputs(rng, 9, 4, dtype)
    result = evaluator.evaluate(_plan(evaluator, names=("y_true", "y_pred")), {"y_true": t, "y_pred": o},
                                reduction="none")
    eye = np.eye(4)
    np.testing.assert_allclose(result.loss, numpy_loss(t, o, eye), **TOL[dtype])
    np.testing.assert_allclose(result.outputs["matrix"], numpy_update(eye, t, o, 4), **TOL[dtype])
    # With the identity the exp terms cancel: crossentropy in bits.
    np.testing.assert_allclose(result.loss, -np.sum(t * np.log2(o.astype(np.float64)), axis=-1),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none"])
def test_gradient_equals_gradient_tape(evaluator, dtype, reduction):
    rng = np.random.default_rng(11)
    t, o, a = _inputs(rng, 12, 5, dtype, soft=True)
    o[0, 0] = 0.0  # inside the clip: no gradient through log2 there
    sw = rng.uniform(0.5, 2.0, 12).astype(dtype)
    result = evaluator.evaluate(_plan(evaluator), {"y_true": t, "y_pred": o, "matrix": a}, gradient=True,
                                reduction=reduction, sample_weight=sw)

    def formula(y_true, y_pred):
        log2 = tf.math.log(tf.clip_by_value(y_pred, EPS, 1 - EPS)) / tf.math.log(tf.constant(2.0, dtype))
        per_sample = tf.reduce_sum(-y_true * log2 + tf.linalg.matvec(a, y_true) * tf.exp(y_pred)
                                   - y_true * tf.exp(y_pred), axis=-1)
        weighted = per_sample * sw
        # "none" differentiates the sum of the per-sample values, as lossd does.
        return weighted if reduction == "none" else {"sum": tf.reduce_sum(weighted),
                                                     "sum_over_batch_size": tf.reduce_mean(weighted)}[reduction]

    _, want_gradient = value_and_gradient(formula, t, o)
    np.testing.assert_allclose(result.gradient, want_gradient, **TOL[dtype])


def test_one_plan_one_program(evaluator):
    """The update runs inside the loss's compiled program: one compilation
    per signature, none on a second call of another batch size."""
    rng = np.random.default_rng(2)
    spec = {"name": "matrix_crossentropy", "params": {"window": 3}}
    plan = _plan(evaluator, spec)
    before = evaluator.compilations
    for batch in (3, 8):
        t, o, a = _inputs(rng, batch, 6, "float32")
        evaluator.evaluate(plan, {"y_true": t, "y_pred": o, "matrix": a}, gradient=True)
    assert evaluator.compilations == before + 1


def test_composite_term_returns_its_matrix(evaluator):
    rng = np.random.default_rng(5)
    t, o, a = _inputs(rng, 6, 3, "float64")
    spec = {"terms": [{"loss": {"name": "matrix_crossentropy"}, "weight": 0.5},
                      {"loss": {"name": "categorical_crossentropy"}}]}
    result = evaluator.evaluate(_plan(evaluator, spec), {"y_true": t, "y_pred": o, "matrix": a}, reduction="sum")
    np.testing.assert_allclose(result.outputs["matrix"], numpy_update(a, t, o, 4), rtol=1e-12)
    keras_cce = keras.losses.CategoricalCrossentropy(reduction="sum", dtype="float64")(t, o)
    np.testing.assert_allclose(result.loss, 0.5 * numpy_loss(t, o, a).sum() + keras_cce, rtol=1e-10)
    twice = {"terms": [{"loss": {"name": "matrix_crossentropy"}, "label": "a"},
                       {"loss": {"name": "matrix_crossentropy"}, "label": "b"}]}
    with pytest.raises(InvalidArgument, match="Expected at most one term") as exc:
        _plan(evaluator, twice)
    assert exc.value.reason == "BAD_LOSS_SPEC"


# -- never split into rows ---------------------------------------------------------

def test_never_batched_or_chunked(evaluator):
    plan = _plan(evaluator, names=("y_true", "y_pred"))
    assert row_family(plan) is None
    infos = {"y_true": ("float32", (100, 4)), "y_pred": ("float32", (100, 4))}
    with pytest.raises(InvalidArgument, match="returns state") as exc:
        chunk_layout(plan, infos, "sum_over_batch_size")
    assert exc.value.reason == "NOT_CHUNKABLE"


def test_chunked_request_is_refused_over_grpc(address):
    rng = np.random.default_rng(1)
    t, o, _ = _inputs(rng, 4000, 4, "float32")
    with lossd.Client(address, timeout=60, max_message_bytes=32 << 10, chunk_bytes=4096) as sliced:
        with pytest.raises(lossd.LossdError) as exc:
            sliced.evaluate("matrix_crossentropy", t, o)
    assert exc.value.code.name == "INVALID_ARGUMENT" and exc.value.reason == "NOT_CHUNKABLE"
    assert "returns state" in exc.value.message


# -- over gRPC ---------------------------------------------------------------------

def test_round_trip_carries_the_matrix(client):
    """The state travels with the requests: each answer's matrix is the next request's."""
    rng = np.random.default_rng(3)
    k = 5
    a = None
    expected = np.eye(k)
    for step in range(3):
        t, o, _ = _inputs(rng, 16, k, "float32")
        tensors = {} if a is None else {"matrix": a}
        r = client.evaluate("matrix_crossentropy", t, o, gradient=True, tensors=tensors)
        np.testing.assert_allclose(r.loss, numpy_loss(t, o, expected).mean(), rtol=2e-5)
        assert r.gradient.shape == o.shape
        expected = numpy_update(expected, t, o, 4)
        assert isinstance(r.outputs["matrix"], np.ndarray) and r.outputs["matrix"].shape == (k, k)
        np.testing.assert_allclose(r.outputs["matrix"], expected, rtol=2e-5, atol=1e-6)
        a = r.outputs["matrix"]
    assert client.evaluate("mse", t, o).outputs == {}


def test_stream_carries_outputs(client):
    rng = np.random.default_rng(4)
    requests = []
    for _ in range(3):
        t, o, a = _inputs(rng, 8, 3, "float64")
        requests.append({"loss": {"name": "matrix_crossentropy", "params": {"window": 2}}, "y_true": t,
                         "y_pred": o, "tensors": {"matrix": a}})
    results = list(client.evaluate_many(requests))
    for request, result in zip(requests, results):
        want = numpy_update(request["tensors"]["matrix"], request["y_true"], request["y_pred"], 2)
        np.testing.assert_allclose(result.outputs["matrix"], want, rtol=1e-12)


@pytest.mark.parametrize("matrix, reason, words", [
    (np.eye(4, dtype=np.float32), "SHAPE_MISMATCH", "matrix.shape=[3, 3]"),
    (np.ones((3, 4), np.float32), "SHAPE_MISMATCH", "matrix.shape=[3, 3]"),
    (np.ones(3, np.float32), "SHAPE_MISMATCH", "matrix.shape=[3, 3]"),
    (np.eye(3, dtype=np.int32), "UNSUPPORTED_DTYPE", "matrix.dtype=int32"),
])
def test_bad_matrix_is_invalid_argument(client, matrix, reason, words):
    rng = np.random.default_rng(6)
    t, o, _ = _inputs(rng, 4, 3, "float32")
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("matrix_crossentropy", t, o, tensors={"matrix": matrix})
    assert exc.value.code.name == "INVALID_ARGUMENT" and exc.value.reason == reason, exc.value
    assert "Expected" in exc.value.message and "Received" in exc.value.message and words in exc.value.message


def test_bad_predictions_and_window_are_invalid_argument(client):
    rng = np.random.default_rng(8)
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("matrix_crossentropy", rng.uniform(size=(2, 3, 4)), rng.uniform(size=(2, 3, 4)))
    assert exc.value.reason == "SHAPE_MISMATCH" and "Expected rank 2" in exc.value.message
    t, o, _ = _inputs(rng, 4, 3, "float32")
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("matrix_crossentropy", t, o, params={"window": 0})
    assert exc.value.reason == "PARAMETER_OUT_OF_RANGE" and "Expected" in exc.value.message
