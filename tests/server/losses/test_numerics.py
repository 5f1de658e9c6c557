"""Every registered loss, through the real server, equals Keras in-process:
float32 and float64, every reduction, with and without sample weights, and
the gradient equals tf.GradientTape's."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402

from lossd_server.losses.registry import default_registry  # noqa: E402

REDUCTIONS = ["none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"]
LOSSES = [e.name for e in default_registry().entries()]
BATCH, CLASSES = 6, 5


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_inputs(name: str, dtype: str, rng: np.random.Generator):
    """Inputs inside each loss's domain (probabilities where it takes them,
    labels where it takes labels), and sample weights shaped like its values."""
    b, c = BATCH, CLASSES
    labels = rng.integers(0, c, size=b)
    onehot = np.eye(c)[labels]
    probs = _softmax(rng.normal(size=(b, c)))
    if name in ("binary_crossentropy", "binary_focal_crossentropy", "dice", "tversky"):
        y_true, y_pred = rng.integers(0, 2, size=(b, c)).astype(dtype), rng.uniform(0.05, 0.95, (b, c))
    elif name in ("categorical_crossentropy", "categorical_focal_crossentropy", "categorical_hinge"):
        y_true, y_pred = onehot, probs
    elif name in ("sparse_categorical_crossentropy", "categorical_generalized_cross_entropy"):
        y_true, y_pred = labels.astype("int64"), probs
    elif name == "kl_divergence":
        y_true, y_pred = _softmax(rng.normal(size=(b, c))), probs
    elif name in ("hinge", "squared_hinge"):
        y_true, y_pred = rng.choice([-1.0, 1.0], size=(b, c)), rng.normal(size=(b, c))
    elif name in ("poisson", "mean_squared_logarithmic_error", "mean_absolute_percentage_error"):
        y_true, y_pred = rng.uniform(0.5, 2.0, (b, c)), rng.uniform(0.5, 2.0, (b, c))
    elif name == "circle":
        emb = rng.normal(size=(b, 8))
        y_true, y_pred = rng.integers(0, 3, size=b).astype("int32"), emb / np.linalg.norm(emb, axis=1, keepdims=True)
    elif name == "ctc":
        y_true = rng.integers(1, c, size=(b, 3)).astype("int32")
        y_pred = rng.normal(size=(b, 7, c))
    else:
        y_true, y_pred = rng.normal(size=(b, c)), rng.normal(size=(b, c))
    y_pred = np.asarray(y_pred, dtype=dtype)
    if np.asarray(y_true).dtype.kind == "f":
        y_true = np.asarray(y_true, dtype=dtype)
    values_shape = () if name in ("dice", "tversky") else (b,)
    sample_weight = rng.uniform(0.1, 2.0, size=values_shape).astype(dtype)
    return y_true, y_pred, sample_weight


def keras_reference(name: str, y_true, y_pred, sample_weight, reduction: str, dtype: str):
    entry = default_registry().get(name)
    cls = type(entry.build({}, "none", dtype))
    loss = cls(reduction=reduction, dtype=dtype)
    return value_and_gradient(lambda t, p: loss(t, p, sample_weight=sample_weight), y_true, y_pred)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_matches_keras(client, name, dtype):
    # crc32, not hash(): str hashes change with every interpreter (PYTHONHASHSEED).
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    y_true, y_pred, sw = make_inputs(name, dtype, rng)
    rtol = 2e-5 if dtype == "float32" else 1e-10
    for reduction in REDUCTIONS:
        for weights in (None, sw):
            got = client.evaluate(name, y_true, y_pred, sample_weight=weights, reduction=reduction, gradient=True)
            want, want_grad = keras_reference(name, y_true, y_pred, weights, reduction, dtype)
            where = f"{name} {dtype} reduction={reduction} weighted={weights is not None}"
            assert got.loss.dtype == np.dtype(dtype), where
            assert got.loss.shape == np.shape(want), where
            np.testing.assert_allclose(got.loss, want, rtol=rtol, atol=rtol, err_msg=where)
            # Rounding errors scale with the largest gradient entry (circle's reach ~200).
            scale = max(1.0, float(np.max(np.abs(want_grad))))
            np.testing.assert_allclose(got.gradient, want_grad, rtol=rtol * 10, atol=rtol * scale, err_msg=where)
            assert got.non_finite is False, where


def test_parameters_change_the_value_as_in_keras(client):
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 4)).astype("float32") * 3
    cases = [
        ("huber", {"delta": 2.0}, keras.losses.Huber(delta=2.0)),
        ("categorical_crossentropy", {"from_logits": True, "label_smoothing": 0.1},
         keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)),
        ("binary_focal_crossentropy", {"apply_class_balancing": True, "gamma": 1.5, "from_logits": True},
         keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=1.5, from_logits=True)),
        ("cosine_similarity", {"axis": 0}, keras.losses.CosineSimilarity(axis=0)),
    ]
    for name, params, reference in cases:
        y_t = np.abs(y_true) / np.abs(y_true).sum(-1, keepdims=True) if "crossentropy" in name else y_true
        got = client.evaluate(name, y_t, y_pred, params=params)
        np.testing.assert_allclose(got.loss, reference(y_t, y_pred).numpy(), rtol=1e-5, err_msg=name)


def test_sparse_labels_with_ignore_class(client):
    rng = np.random.default_rng(2)
    labels = np.array([0, 3, -1, 2, -1, 1])
    logits = rng.normal(size=(6, 4)).astype("float32")
    got = client.evaluate("sparse_categorical_crossentropy", labels, logits,
                          params={"from_logits": True, "ignore_class": -1}, gradient=True)
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    np.testing.assert_allclose(got.loss, ref(labels, logits).numpy(), rtol=1e-5)


def test_integer_and_bool_labels_are_cast_as_keras_casts_them(client):
    y_pred = np.random.default_rng(3).uniform(0.1, 0.9, size=(5, 3)).astype("float32")
    for y_true in (np.array([[1, 0, 1]] * 5, dtype="int32"), np.array([[True, False, True]] * 5),
                   np.array([[1, 0, 1]] * 5, dtype="uint8")):
        got = client.evaluate("bce", y_true, y_pred)
        want = keras.losses.BinaryCrossentropy()(y_true.astype("float32"), y_pred).numpy()
        np.testing.assert_allclose(got.loss, want, rtol=1e-6, err_msg=str(y_true.dtype))


def test_float16_predictions_compute_in_float16(client):
    rng = np.random.default_rng(4)
    y_true = rng.normal(size=(16, 4)).astype("float16")
    y_pred = rng.normal(size=(16, 4)).astype("float16")
    got = client.evaluate("mse", y_true, y_pred, gradient=True)
    want = keras.losses.MeanSquaredError(dtype="float16")(y_true, y_pred).numpy()
    assert got.loss.dtype == np.float16 and got.gradient.dtype == np.float16
    np.testing.assert_allclose(got.loss, want, rtol=1e-3)


def test_nan_and_inf_are_evaluated_as_keras_does_and_flagged(client):
    y_true = np.ones((4, 3), dtype="float32")
    y_pred = np.array([[0.5, np.nan, 0.1]] + [[0.2, 0.3, 0.4]] * 3, dtype="float32")
    got = client.evaluate("mse", y_true, y_pred, reduction="none")
    want = keras.losses.MeanSquaredError(reduction="none")(y_true, y_pred).numpy()
    np.testing.assert_array_equal(np.isnan(got.loss), np.isnan(want))
    np.testing.assert_allclose(got.loss[1:], want[1:], rtol=1e-6)
    assert got.non_finite is True
    inf = client.evaluate("mae", y_true, np.full((4, 3), np.inf, dtype="float32"))
    assert np.isinf(inf.loss) and inf.non_finite is True
    assert client.evaluate("mae", y_true, y_true).non_finite is False


def test_new_batch_sizes_do_not_recompile(server, client):
    evaluator = server.evaluator
    rng = np.random.default_rng(5)

    def call(batch):
        y = rng.normal(size=(batch, 10)).astype("float32")
        client.evaluate("categorical_crossentropy", _softmax(y), _softmax(y * 2), params={"from_logits": False})

    call(3)
    call(7)
    before = evaluator.compilations
    for batch in (2, 5, 64, 17, 200, 9):
        call(batch)
    assert evaluator.compilations == before, "a new batch size recompiled the loss"
