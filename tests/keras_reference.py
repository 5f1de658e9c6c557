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
