"""Guidance losses (training/guidance.py) on a real Evaluator: planned once
with the evaluation planner, split by what each term reads, and their
gradient with respect to the image equal to plain numpy formulas and to a
GradientTape through a real Keras classifier."""

from __future__ import annotations

import numpy as np
import pytest

from lossd_server.errors import InvalidArgument
from lossd_server.evaluation import backend
from lossd_server.evaluation.evaluator import Evaluator
from lossd_server.losses import custom
from lossd_server.training import guidance


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                     expression_compiler=custom.inline_entry)


def _images(rng, n=5, shape=(8, 8, 2)):
    return rng.random((n, *shape)).astype(np.float32)


def _guide(evaluator, spec, *, init_weight=0.0, init=None, labels=None, classifier=None):
    plans = guidance.plan_guidance(evaluator.planner, spec, init_weight=init_weight,
                                   has_classifier=classifier is not None, has_init=init is not None)
    return guidance.guide_function(plans, evaluator, init=init, labels=labels, classifier=classifier)


def test_init_weight_term_is_the_articles_half_weighted_mse(evaluator):
    rng = np.random.default_rng(0)
    x, z = _images(rng), _images(rng)
    w = 3.0
    got = _guide(evaluator, None, init_weight=w, init=z)(x)
    # d/dx of w/2 * sum over images of mean over the last axis of (x - z)^2
    np.testing.assert_allclose(got, w / 2 * 2 * (x - z) / x.shape[-1], rtol=1e-5, atol=1e-7)
    one_init = _guide(evaluator, None, init_weight=w, init=z[:1])(x)  # one init image for every sample
    np.testing.assert_allclose(one_init, w * (x - z[:1]) / x.shape[-1], rtol=1e-5, atol=1e-7)


def test_a_composite_of_registered_losses_and_expressions_adds_up(evaluator):
    rng = np.random.default_rng(1)
    x, z = _images(rng), _images(rng)
    spec = {"terms": [{"loss": {"name": "mean_absolute_error"}, "weight": 0.5, "inputs": ["y_true", "y_pred"]},
                      {"loss": {"expression": "sum(square(y_pred), axis=-1)"}, "label": "energy"}]}
    got = _guide(evaluator, spec, init_weight=2.0, init=z)(x)
    want = 0.5 * np.sign(x - z) / x.shape[-1] + 2 * x + 2.0 * (x - z) / x.shape[-1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_classifier_crossentropy_gradient_goes_back_through_the_classifier(evaluator):
    import keras
    import tensorflow as tf

    from tests.keras_reference import value_and_gradient

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    rng = np.random.default_rng(2)
    x = _images(rng)
    labels = np.array([0, 1, 2, 3, 1], np.int32)

    def probabilities(images):
        return np.asarray(model(images), np.float32)

    def back(images, d_probabilities):
        return backend.input_gradient(model, images, d_probabilities)

    got = _guide(evaluator, None, labels=labels, classifier=(probabilities, back))(x)
    # The crossentropy of the labels, differentiated with respect to the images.
    _, want = value_and_gradient(
        lambda t, images: -tf.reduce_sum(tf.math.log(tf.gather(model(images), t, batch_dims=1))), labels, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec, kwargs, reason", [
    ({"expression": "mean(classifier) + mean(y_pred)"}, {"has_classifier": True}, "BAD_GUIDANCE"),
    ({"terms": [{"loss": {"name": "sparse_categorical_crossentropy"}, "inputs": ["label", "classifier"]}]}, {},
     "MISSING_TENSOR"),
    ({"name": "mse"}, {}, "MISSING_TENSOR"),  # reads y_true: init images needed
    ({"name": "no_such_loss"}, {}, "UNKNOWN_LOSS"),
    ({"expression": "mean(z)"}, {}, "BAD_EXPRESSION"),  # z is no guidance tensor
])
def test_bad_guidance_is_refused_before_any_step(evaluator, spec, kwargs, reason):
    args = {"init_weight": 0.0, "has_classifier": False, "has_init": False, **kwargs}
    with pytest.raises(InvalidArgument) as exc:
        guidance.plan_guidance(evaluator.planner, spec, **args)
    assert exc.value.reason == reason
    if reason in ("BAD_GUIDANCE", "MISSING_TENSOR"):  # ours; the others are the planner's, as Evaluate words them
        assert "Expected" in str(exc.value) and "Received" in str(exc.value)


def test_nothing_to_guide_is_no_guidance(evaluator):
    assert guidance.plan_guidance(evaluator.planner, None, init_weight=0.0, has_classifier=False,
                                  has_init=True) is None
