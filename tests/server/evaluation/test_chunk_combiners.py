"""The chunk combiners on their own, without a network: a ChunkedSession fed
uneven slices gives what the evaluator gives in one piece, and what Keras
gives; its layouts and refusals are decided from the header alone."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.chunks import ChunkedSession, chunk_layout  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.losses.registry import ROWS, ROWS_COSINE, ROWS_MEAN, ROWS_SUM  # noqa: E402

REDUCTIONS = ("none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight")


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                     expression_compiler=custom.inline_entry)


def _infos(**arrays):
    return {name: (a.dtype.name, a.shape) for name, a in arrays.items()}


def _run(evaluator, spec, arrays, reduction, gradient, cuts):
    """Feeds the arrays in slices cut at ``cuts``; assembles as the client does."""
    plan = evaluator.planner.plan(spec)
    session = ChunkedSession(evaluator, plan, _infos(**arrays), reduction=reduction, gradient=gradient)
    values, grads = [], np.zeros_like(arrays["y_pred"]) if gradient else None
    bounds = [0, *cuts, arrays["y_pred"].shape[0]]
    for start, stop in zip(bounds, bounds[1:]):
        streamed, grad = session.feed(start, {k: v[start:stop] for k, v in arrays.items()})
        if streamed is not None:
            values.append(streamed)
        if grad is not None:
            grads[start:stop] = grad
    done = session.finish()
    loss = done.loss if done.loss is not None else np.concatenate(values)
    if gradient:
        grads = grads * done.gradient_scale + done.y_true_gradient_coefficient * arrays["y_true"] \
            + done.y_pred_gradient_coefficient * arrays["y_pred"]
    return session.layout.mode, loss, grads


def _whole(evaluator, spec, arrays, reduction, gradient):
    tensors = {k: v for k, v in arrays.items() if k != "sample_weight"}
    result = evaluator.evaluate(evaluator.planner.plan(spec), tensors, sample_weight=arrays.get("sample_weight"),
                                reduction=reduction, gradient=gradient)
    return result.loss, result.gradient


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec, shape, weights, mode", [
    ({"name": "mse"}, (37, 5), (37,), ROWS),
    ({"name": "huber", "params": {"delta": 0.3}}, (37, 4, 3), (37, 4), ROWS),
    ({"expression": "mean(square(y_true - y_pred) * k, axis=-1)", "params": {"k": 3.0}}, (37, 4), (37,), ROWS),
    ({"name": "mse"}, (37,), None, ROWS_MEAN),
    ({"name": "kl_divergence"}, (37,), None, ROWS_SUM),
    ({"expression": "mean(square(y_true - y_pred), axis=-2)"}, (37, 6), None, ROWS_MEAN),
    ({"expression": "sum(abs(y_true - y_pred), axis=(0, 2), keepdims=True)"}, (37, 2, 3), None, ROWS_SUM),
    ({"name": "cosine_similarity"}, (37,), None, ROWS_COSINE),
    ({"name": "cosine_similarity", "params": {"axis": None}}, (37, 3), None, ROWS_COSINE),
])
def test_uneven_slices_give_the_one_piece_answer(evaluator, spec, shape, weights, mode, reduction):
    rng = np.random.default_rng(7)
    arrays = {"y_true": rng.uniform(0.05, 0.95, shape), "y_pred": rng.uniform(0.05, 0.95, shape)}
    if weights is not None:
        arrays["sample_weight"] = rng.uniform(0, 2, weights)
    got_mode, loss, grad = _run(evaluator, spec, arrays, reduction, True, cuts=[1, 2, 20, 36])
    want, want_grad = _whole(evaluator, spec, arrays, reduction, True)
    assert got_mode == mode
    np.testing.assert_allclose(loss, want, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-13)


def test_cosine_sums_match_keras_at_the_norm_clamp(evaluator):
    """A zero vector: Keras clamps 1/|x| at 1/epsilon, so the loss is 0 and the
    gradient comes from the clamped norm alone."""
    y_true = np.zeros(9)
    y_pred = np.linspace(-1, 1, 9)
    _, loss, grad = _run(evaluator, {"name": "cosine_similarity"}, {"y_true": y_true, "y_pred": y_pred},
                         "sum", True, cuts=[4])
    want, want_grad = _whole(evaluator, {"name": "cosine_similarity"}, {"y_true": y_true, "y_pred": y_pred},
                             "sum", True)
    np.testing.assert_allclose(loss, keras.losses.CosineSimilarity(dtype="float64")(y_true, y_pred), atol=1e-12)
    np.testing.assert_allclose(grad, want_grad, atol=1e-12)


@pytest.mark.parametrize("spec, shape, params", [
    ({"name": "circle"}, None, None),
    ({"name": "dice"}, (8, 3), None),
    ({"name": "categorical_crossentropy"}, (8,), None),
    ({"expression": "max(abs(y_true - y_pred), axis=0)"}, (8, 3), None),
    ({"expression": "softmax(y_pred, axis=0) * y_true"}, (8, 3), None),
    ({"terms": [{"loss": {"name": "mse"}}, {"loss": {"name": "mae"}}]}, (8, 3), None),
])
def test_layouts_that_couple_rows_are_refused_from_the_header(evaluator, spec, shape, params):
    if spec.get("name") == "circle":
        infos = {"y_true": ("int32", (8,)), "y_pred": ("float32", (8, 4))}
    else:
        infos = {"y_true": ("float32", shape), "y_pred": ("float32", shape)}
    with pytest.raises(InvalidArgument) as exc:
        chunk_layout(evaluator.planner.plan(spec), infos, "sum")
    assert exc.value.reason == "NOT_CHUNKABLE", exc.value


def test_weights_keras_would_broadcast_along_the_last_axis_are_refused(evaluator):
    # values (rows, 4, 4) and weights (4,): Keras multiplies along the last axis, not the rows.
    infos = {"y_true": ("float32", (4, 4, 4, 2)), "y_pred": ("float32", (4, 4, 4, 2)),
             "sample_weight": ("float32", (4,))}
    with pytest.raises(InvalidArgument) as exc:
        chunk_layout(evaluator.planner.plan({"name": "mse"}), infos, "sum")
    assert exc.value.reason == "NOT_CHUNKABLE" and "last axes" in exc.value.message


def test_hinge_labels_are_checked_across_slices(evaluator):
    rng = np.random.default_rng(8)
    y_pred = rng.standard_normal((6, 2))
    binary_then_signed = np.array([[0, 1], [1, 0], [1, 1], [-1, 1], [1, -1], [-1, -1]], dtype=float)
    with pytest.raises(InvalidArgument) as exc:
        _run(evaluator, {"name": "hinge"}, {"y_true": binary_then_signed, "y_pred": y_pred}, "sum", False, [3])
    assert exc.value.reason == "NOT_CHUNKABLE"
    # All {-1, 1}, or all {0, 1}: any split is exact.
    for labels in (np.sign(rng.standard_normal((6, 2))), rng.integers(0, 2, (6, 2)).astype(float)):
        _, loss, _ = _run(evaluator, {"name": "hinge"}, {"y_true": labels, "y_pred": y_pred}, "sum", False, [3])
        np.testing.assert_allclose(loss, _whole(evaluator, {"name": "hinge"},
                                                {"y_true": labels, "y_pred": y_pred}, "sum", False)[0], rtol=1e-12)
