"""The reference every numerics test compares with: a loss computed by Keras
(or TensorFlow) itself in the test's process, and its gradient taken with
``tf.GradientTape``. One owner, so every suite differentiates the same way."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf


def value_and_gradient(fn: Callable[[tf.Tensor, tf.Tensor], Any], y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """``fn(y_true, y_pred)`` and the gradient of its sum with respect to ``y_pred``.

    Both inputs become constants of their own dtype; the sum is what lossd
    differentiates too (a per-sample result gives d(sum)/d(y_pred), a scalar
    gives its own gradient). Returns numpy arrays.
    """
    y_true = tf.constant(y_true)
    y_pred = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        value = fn(y_true, y_pred)
        total = tf.reduce_sum(value)
    return np.asarray(value), tape.gradient(total, y_pred).numpy()


def reduced_magnitude(values: np.ndarray, reduction: str, sample_weight, floor: float = 0.0) -> float:
    """What a reduced loss's rounding is relative to: the request's
    reduction of its absolute weighted per-sample ``values`` (reduction
    ``none``), each at least ``floor``. A path that adds the values in
    another order or precision than Keras agrees with it to a relative
    tolerance of this, not of a loss that cancels to about 0."""
    total = float(np.sum(np.maximum(np.abs(values.astype(np.float64)), floor)))
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        weights = abs(float(np.sum(np.asarray(sample_weight).astype(values.dtype), dtype=np.float64)))
        return total / weights if weights else 0.0
    return total / values.size
