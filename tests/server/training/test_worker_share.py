"""A multi-worker job's shares of a batch add up to the batch's loss.

In-process, no cluster: a batch is split into row shares the way the
multi-worker input pipeline does (``x[i::n]``), each share goes through the
function the replica step runs (``multiworker.per_sample_program`` and
``worker_share``), and the shares' sums are compared with what Keras's
``model.fit`` computes through the job's ``PlanLoss`` on the whole batch: the
gradient of the loss's values (TensorFlow sums a tensor loss) and the mean
its loss tracker reports (``keras.metrics.Mean`` weighted by the rows).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd.wire import REDUCTIONS
from lossd_server.training import multiworker
from lossd_server.training.losses import PlanLoss, from_logits, job_planner, label_format, plan_training_loss
from lossd_server.training.losses import SPARSE
from lossd_server.training.kinds import CLASSIFIER

CLASSES = 3
FEATURES = 4

# Classifier losses of the registry and expressions, grouped by the labels
# they take (the terms of a composite must agree, and on from_logits too).
# Each row: (loss, per-sample values of one row are a scalar).
SPARSE_LOSSES = [
    {"name": "sparse_categorical_crossentropy"},
    {"name": "categorical_generalized_cross_entropy", "params": {"q": 0.7}},
]
LOGIT_LOSSES = [{"name": "sparse_categorical_crossentropy", "params": {"from_logits": True}}]
ONE_HOT_LOSSES = [
    {"expression": "-sum(y_true * log(y_pred), axis=-1)"},
    {"expression": "mean(square(y_true - y_pred), axis=-1)"},
]
# Values of one per class: alone only (an unreduced term of one value per row
# beside it would broadcast rows against classes).
ONE_HOT_WIDE = {"expression": "square(y_true - y_pred)"}

reductions = st.sampled_from((None,) + REDUCTIONS)
weights = st.sampled_from([1.0, 0.25, 2.5, -0.5])


@st.composite
def losses(draw):
    group = draw(st.sampled_from([SPARSE_LOSSES, LOGIT_LOSSES, ONE_HOT_LOSSES]))
    form = draw(st.sampled_from(["single", "terms"]))
    if form == "single":
        if group is ONE_HOT_LOSSES and draw(st.booleans()):
            return ONE_HOT_WIDE
        return draw(st.sampled_from(group))
    n = draw(st.integers(1, 2))
    return {"terms": [{"label": f"t{i}", "loss": draw(st.sampled_from(group)), "weight": draw(weights),
                       "reduction": draw(reductions)} for i in range(n)]}


def _model(logits: bool, seed: int):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(CLASSES, activation=None if logits else "softmax")])
    model(np.zeros((1, FEATURES), "float32"))
    return model


def _gradients(tape, target, model):
    return [np.zeros(v.shape, "float32") if g is None else g.numpy()
            for v, g in zip(model.trainable_variables, tape.gradient(target, model.trainable_variables))]


@settings(max_examples=40, deadline=None)
@given(spec=losses(), rows=st.integers(1, 13), shares=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_shares_add_up_to_the_one_piece_loss(spec, rows, shares, seed):
    """Rows 1-13 over 1-4 shares: uneven splits, and batches (a short last
    one) with fewer rows than shares, whose empty shares add 0."""
    plan = plan_training_loss(job_planner(), spec, CLASSIFIER)
    model = _model(from_logits(plan), seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    labels = rng.integers(0, CLASSES, size=rows).astype("int32")
    y = labels if label_format(plan) == SPARSE else np.eye(CLASSES, dtype="float32")[labels]

    # The single-process job: model.fit's train step on the whole batch.
    with tf.GradientTape() as tape:
        one_piece = PlanLoss(plan)(y, model(x, training=True))
    expected_gradients = _gradients(tape, one_piece, model)
    tracker = keras.metrics.Mean()
    tracker.update_state(one_piece, sample_weight=rows)

    program = multiworker.per_sample_program(plan)
    trained = reported = 0.0
    gradients = [np.zeros_like(g) for g in expected_gradients]
    for i in range(shares):
        with tf.GradientTape() as tape:
            _, values, _ = program({"y_true": y[i::shares], "y_pred": model(x[i::shares], training=True)}, None)
            share, shown = multiworker.worker_share(plan, values, rows)
        trained, reported = trained + float(share), reported + float(shown)
        gradients = [a + b for a, b in zip(gradients, _gradients(tape, share, model))]

    np.testing.assert_allclose(trained, float(tf.reduce_sum(one_piece)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reported, float(tracker.result()), rtol=1e-5, atol=1e-6)
    for got, want in zip(gradients, expected_gradients):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_term_reduced_alone_matches_keras(reduction):
    """Every reduction, one fixed uneven split (5 rows over 2 shares), as a
    readable example of the property above."""
    test_shares_add_up_to_the_one_piece_loss.hypothesis.inner_test(
        spec={"terms": [{"loss": {"name": "sparse_categorical_crossentropy"}, "weight": 0.5,
                         "reduction": reduction}]}, rows=5, shares=2, seed=3)
