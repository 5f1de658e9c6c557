"""Reductions: the one owner of how a loss's per-sample values become the
loss, and of how pieces of a request add up to the one-piece answer.

Keras reduces a loss's per-sample values (``keras.src.losses.loss.
reduce_weighted_values``) in three steps; each has its rule here:

1. **Weights** (``align_weights``, ``weighted_shape``,
   ``check_sample_weight``, ``weights_for_values``): a sample weight whose
   rank differs from the values' by one, where the longer has a trailing
   axis of 1, is lined up with them first (``squeeze_or_expand_to_same_rank``:
   a rank-1 partner is expanded, otherwise the trailing 1 is squeezed); then
   values and weights are multiplied, broadcasting as numpy does.
2. **Sum** of the weighted values.
3. **Divisor** (``divisor``, ``divide``): ``sum`` divides by 1, and so does
   ``none`` (its gradient is that of the values' sum);
   ``mean_with_sample_weight`` with weights by the weights' sum; the others
   by the number of values; a divisor of 0 gives 0 (``divide_no_nan``).

Every path that splits a request (chunks, micro-batches, XLA buckets, the
workers of a multi-worker job) adds up the sums of step 2 over its pieces,
then divides once by the divisor of the whole (``combine``): the sum is
linear, the divisor comes from the whole, so the answer is the one-piece
answer. What may be split by rows at all is ``row_structure``'s and
``weights_follow_rows``' answer. The one-piece path leaves the numbers to
Keras and checks its weights with the rules of step 1; tests/server/
test_reductions.py proves these rules equal to Keras's own reduction.

Reduction names are ``lossd.wire``'s. Nothing here imports gRPC or
TensorFlow (Keras is imported where a tensor is divided).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from lossd.wire import (REDUCTION_MEAN, REDUCTION_MEAN_WITH_SAMPLE_WEIGHT, REDUCTION_NONE, REDUCTION_SUM,
                        REDUCTION_SUM_OVER_BATCH_SIZE)
from lossd_server.errors import InvalidArgument
from lossd_server.losses.expression_shapes import broadcast_shapes
from lossd_server.losses.registry import SHAPES_SAME, RowStructure, align_ranks

if TYPE_CHECKING:
    from lossd_server.losses.plan import Term

# Reductions whose divisor Keras takes from a loss's mask (``ignore_class``:
# ``apply_mask``), which only the whole batch knows.
MASK_DIVIDED = frozenset({REDUCTION_SUM_OVER_BATCH_SIZE, REDUCTION_MEAN, REDUCTION_MEAN_WITH_SAMPLE_WEIGHT})


@dataclasses.dataclass(frozen=True)
class Divisor:
    """What Keras's ``reduce_values`` divides the sum of the weighted values
    by: ``per_value * values + fixed``, for ``values`` per-sample values."""

    per_value: float
    fixed: float

    def of(self, values):
        """The divisor for that many values (a number, an array or a tensor)."""
        return self.per_value * values + self.fixed


def divisor(reduction: str, weight_sum: Optional[float] = None) -> Divisor:
    """The divisor of ``reduction`` (step 3 of the module's docstring).

    Args:
        reduction: One of ``lossd.wire.REDUCTIONS``.
        weight_sum: The sum of the sample weights as given (before they are
            broadcast against the values); None without weights.
    """
    if reduction in (REDUCTION_SUM, REDUCTION_NONE):
        return Divisor(0.0, 1.0)
    if reduction == REDUCTION_MEAN_WITH_SAMPLE_WEIGHT and weight_sum is not None:
        return Divisor(0.0, float(weight_sum))
    return Divisor(1.0, 0.0)


def unreduced(values: tuple, reduction: str) -> bool:
    """Whether Keras returns the weighted values as they are: reduction
    ``none``, or values of shape ``()`` or ``(0,)``, which ``reduce_values``
    passes through whatever the reduction (a splitter never sees those: its
    pieces are rows of values of rank >= 1, and it checks that rows arrive)."""
    return reduction == REDUCTION_NONE or tuple(values) in ((), (0,))


def divide(total, by):
    """``total / by``, 0 where ``by`` is 0 whatever ``total`` is (NaN
    included): Keras's ``divide_no_nan``, the last step of ``reduce_values``.
    Takes numbers, arrays or tensors; returns a Keras tensor, in float64
    where ``total`` is a Python number (Keras would make it float32)."""
    from keras import ops

    if isinstance(total, (int, float)):
        total = np.float64(total)
    return ops.divide_no_nan(total, by)


def combine(total, values, reduction: str, weight_sum: Optional[float] = None):
    """The combine step: the reduced loss of a whole request from the sum of
    the weighted values of all its pieces (``total``) and the number of its
    values (``values``), ``weight_sum`` as ``divisor`` takes it."""
    return divide(total, divisor(reduction, weight_sum).of(values))


# -- weights ------------------------------------------------------------------


def align_weights(values: tuple, weights: tuple) -> tuple[tuple, tuple]:
    """The shapes of the values and the sample weight once Keras has lined
    their ranks up (``squeeze_or_expand_to_same_rank``, the rule y_true and
    y_pred follow too: ``registry.align_ranks``)."""
    return align_ranks(tuple(values), tuple(weights))


def weighted_shape(values: tuple, weights: tuple) -> Optional[tuple]:
    """The shape of the per-sample values times the sample weight, as Keras
    multiplies them; None where they do not broadcast (Keras refuses those)."""
    return broadcast_shapes(list(align_weights(values, weights)))


def check_sample_weight(weights: tuple, values: tuple, loss: str) -> None:
    """Refuses a sample weight that does not broadcast to the per-sample values
    of ``loss`` once aligned (``SAMPLE_WEIGHT_MISMATCH``): the weighted values
    keep the values' shape, or a trailing 1 that alignment adds.

    Raises:
        InvalidArgument: ``SAMPLE_WEIGHT_MISMATCH``, before any allocation.
    """
    weights, values = tuple(weights), tuple(values)
    if len(weights) > len(values) + 1:  # before numpy, which fails on many dimensions with a RuntimeError
        raise InvalidArgument(
            f"sample_weight has too many dimensions for the per-sample losses of `{loss}`. Expected at most "
            f"rank {len(values) + 1} (the losses' shape is {list(values)}). Received: "
            f"sample_weight.shape={list(weights)} (rank {len(weights)}).", reason="SAMPLE_WEIGHT_MISMATCH")
    aligned_values, aligned_weights = align_weights(values, weights)
    if broadcast_shapes([aligned_values, aligned_weights]) != aligned_values:
        raise InvalidArgument(
            f"sample_weight does not broadcast to the per-sample losses of `{loss}`. Expected a "
            f"shape that broadcasts to {list(values)}. Received: sample_weight.shape={list(weights)}.",
            reason="SAMPLE_WEIGHT_MISMATCH")


def weights_follow_rows(weights: tuple, values: tuple) -> bool:
    """Whether Keras lines the sample weight up with the values' first axis
    (their ranks are equal once aligned); otherwise it broadcasts it against
    the values' last axes, and slicing both by rows would pair them wrongly."""
    aligned_values, aligned_weights = align_weights(values, weights)
    return len(aligned_values) == len(aligned_weights)


def weights_for_values(sample_weight: np.ndarray, values: tuple, dtype: Any) -> Optional[np.ndarray]:
    """The sample weight as Keras multiplies it into values of shape
    ``values``, broadcast to that shape (a view, in ``dtype``), so that rows
    of several requests can be weighted in one call; None where the ranks
    differ by one (Keras aligns those; a rows call multiplies by numpy's
    broadcast and leaves them to the one-piece program) or where Keras's
    product does not keep the values' shape."""
    values = tuple(values)
    if abs(sample_weight.ndim - len(values)) == 1 or weighted_shape(values, sample_weight.shape) != values:
        return None
    return np.broadcast_to(sample_weight.astype(dtype, copy=False), values)


# -- rows ---------------------------------------------------------------------


def row_structure(term: Term, true_shape: tuple, pred_shape: tuple) -> Optional[RowStructure]:
    """How a term reading (y_true, y_pred) of these shapes depends on their
    rows (``LossEntry.row_structure`` after Keras's trailing-1 alignment);
    None when the rows are coupled. The one test of row-separability:
    chunked evaluation, micro-batching, XLA buckets and multi-worker jobs
    all ask it."""
    if term.entry.shapes == SHAPES_SAME:
        true_shape, pred_shape = align_ranks(true_shape, pred_shape)
    return term.entry.row_structure(term.params, {"y_true": len(true_shape), "y_pred": len(pred_shape)})
