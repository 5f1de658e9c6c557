"""The reduction rules' owner (``lossd_server.losses.reductions``) against
Keras's own reduction.

The reference is a ``keras.losses.Loss`` whose per-sample values are the
values given: calling it runs Keras's weighting (rank alignment, broadcast)
and ``reduce_values`` on them, nothing of ours. The owner's side is what
every splitter does: weights aligned and multiplied by its rules, the
weighted values summed in row pieces, the sums combined with the divisor of
the whole (``combine``). Weights of every rank Keras aligns: the values'
rank (broadcasting axes of 1), lower ranks, one more with a trailing 1, one
fewer where the values end in 1, a scalar, and shapes Keras refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from keras.src.losses.loss import squeeze_or_expand_to_same_rank  # noqa: E402

from lossd.wire import REDUCTION_MEAN_WITH_SAMPLE_WEIGHT, REDUCTION_NONE, REDUCTION_SUM, REDUCTIONS  # noqa: E402
from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.losses import reductions  # noqa: E402


class _Values(keras.losses.Loss):
    """Keras's loss whose per-sample values are y_pred as given."""

    def __init__(self, reduction, mask=None):
        super().__init__(reduction=reduction, dtype="float64")
        self.mask = mask

    def call(self, y_true, y_pred):
        if self.mask is not None:  # as a masking layer's output carries it
            keras.src.backend.set_keras_mask(y_pred, keras.ops.convert_to_tensor(self.mask))
        return y_pred


def _keras(values, weights, reduction, mask=None):
    """Keras's reduction of ``values`` weighted by ``weights``; None where it refuses them."""
    try:
        return np.asarray(_Values(reduction, mask)(values, values, sample_weight=weights))
    except (ValueError, tf.errors.InvalidArgumentError):
        return None


axis = st.sampled_from([1, 1, 2, 3])


@st.composite
def values_and_weights(draw):
    values = tuple(draw(st.lists(axis, max_size=3)))
    if values and draw(st.integers(0, 9)) == 0:
        values = (0, *values[1:])  # no rows
    kind = draw(st.sampled_from(["same", "lower", "trailing_1", "squeezed", "scalar", "any"]))
    if kind == "same":
        weights = tuple(draw(st.sampled_from([d, 1])) for d in values)
    elif kind == "lower":
        weights = tuple(draw(st.sampled_from([d, 1])) for d in values[draw(st.integers(0, len(values))):])
    elif kind == "trailing_1":
        weights = tuple(draw(st.sampled_from([d, 1])) for d in values) + (1,)
    elif kind == "squeezed" and values[-1:] == (1,):
        weights = values[:-1]
    elif kind == "scalar":
        weights = ()
    else:
        weights = tuple(draw(st.lists(axis, max_size=4)))
    return values, weights


@settings(max_examples=300, deadline=None)
@given(shapes=values_and_weights(), reduction=st.sampled_from(REDUCTIONS), pieces=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_the_rules_pieced_together_are_keras_reduction(shapes, reduction, pieces, seed):
    values_shape, weights_shape = shapes
    rng = np.random.default_rng(seed)
    values = rng.normal(size=values_shape)
    weights = rng.uniform(-1.0, 2.0, size=weights_shape)
    want = _keras(values, weights, reduction)

    # Alignment: the shapes Keras lines up.
    aligned = reductions.align_weights(values_shape, weights_shape)
    keras_aligned = squeeze_or_expand_to_same_rank(keras.ops.zeros(values_shape), keras.ops.zeros(weights_shape))
    assert aligned == tuple(tuple(x.shape) for x in keras_aligned)

    shape = reductions.weighted_shape(values_shape, weights_shape)
    if shape is None:
        assert want is None, "Keras weighed values the owner says do not broadcast"
        with pytest.raises(InvalidArgument, match="sample_weight") as refused:
            reductions.check_sample_weight(weights_shape, values_shape, "loss")
        assert refused.value.reason == "SAMPLE_WEIGHT_MISMATCH"
        return
    assert want is not None, "Keras refused weights the owner says broadcast"
    weighted = values.reshape(aligned[0]) * weights.reshape(aligned[1])
    assert weighted.shape == shape

    # The evaluator's check: accepted where Keras weighs the values without widening them.
    try:
        reductions.check_sample_weight(weights_shape, values_shape, "loss")
        accepted = True
    except InvalidArgument as exc:
        assert exc.reason == "SAMPLE_WEIGHT_MISMATCH"
        accepted = False
    assert accepted == (shape == aligned[0])

    if reductions.unreduced(shape, reduction):
        np.testing.assert_array_equal(want, weighted)
        return
    # The splitters' way: partial sums over row pieces, one division by the whole's divisor.
    parts = np.array_split(weighted, pieces) if weighted.ndim else [weighted]
    total = sum(np.sum(part, dtype=np.float64) for part in parts)
    got = reductions.combine(np.float64(total), weighted.size, reduction, np.sum(weights, dtype=np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(shapes=values_and_weights(), seed=st.integers(0, 2**16))
def test_weights_for_values_are_what_keras_multiplies(shapes, seed):
    """A rows call weights each row with ``weights_for_values``: where it
    gives weights, values times them is Keras's reduction ``none``; it gives
    none where Keras's product changes the values' shape, or where the ranks
    differ by one (a compiled program aligns those by its static shapes)."""
    values_shape, weights_shape = shapes
    rng = np.random.default_rng(seed)
    values = rng.normal(size=values_shape)
    weights = rng.uniform(-1.0, 2.0, size=weights_shape)
    broadcast = reductions.weights_for_values(weights, values_shape, np.float64)
    want = _keras(values, weights, REDUCTION_NONE)
    if broadcast is None:
        assert want is None or want.shape != values_shape or abs(len(weights_shape) - len(values_shape)) == 1
        return
    assert broadcast.shape == values_shape
    np.testing.assert_array_equal(values * broadcast, want)


@settings(max_examples=100, deadline=None)
@given(shapes=values_and_weights())
def test_weights_follow_rows_where_keras_lines_up_the_first_axis(shapes):
    """Slicing values and weights by rows pairs them as Keras does exactly
    where the aligned ranks are equal (then their first axes meet)."""
    values_shape, weights_shape = shapes
    keras_aligned = squeeze_or_expand_to_same_rank(keras.ops.zeros(values_shape), keras.ops.zeros(weights_shape))
    equal_ranks = len(keras_aligned[0].shape) == len(keras_aligned[1].shape)
    assert reductions.weights_follow_rows(weights_shape, values_shape) == equal_ranks


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_divided_are_the_reductions_a_mask_divides_over_the_whole_batch(reduction):
    """Keras divides a masked loss (``ignore_class``) by the mask's count over
    the whole batch for exactly the reductions in ``MASK_DIVIDED``: for the
    others, sums of pieces combine into the one-piece answer."""
    values = np.arange(1.0, 7.0)
    mask = np.array([True, False, True, True, False, True])
    want = _keras(values, None, reduction, mask)
    pieces = [_keras(values[i:i + 2], None, REDUCTION_SUM, mask[i:i + 2]) for i in range(0, 6, 2)]
    combined = np.asarray(reductions.combine(np.float64(sum(pieces)), values.size, reduction))
    if reduction == REDUCTION_NONE:
        np.testing.assert_array_equal(want, values * mask)
    elif reduction in reductions.MASK_DIVIDED:
        assert not np.isclose(combined, want)
    else:
        np.testing.assert_allclose(combined, want, rtol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_zero_divisor_gives_zero_whatever_the_sum_as_keras(reduction):
    """Weights summing to 0 divide a NaN sum into 0 (``divide_no_nan``), as
    Keras does; a divisor that is not 0 keeps the NaN."""
    weights = np.array([1.0, -1.0])
    want = _keras(np.array([np.nan, 2.0]), weights, reduction)
    got = reductions.combine(np.float64(np.nan), 2, reduction, 0.0)
    if reduction == REDUCTION_MEAN_WITH_SAMPLE_WEIGHT:
        assert float(got) == 0.0 == float(want)
    elif reduction != REDUCTION_NONE:
        assert np.isnan(float(got)) and np.isnan(float(want))


@pytest.fixture(scope="module")
def evaluator():
    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses import custom

    return Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"))


@settings(max_examples=15, deadline=None)
@given(loss=st.sampled_from(["binary_crossentropy", "mean_squared_error", "mean_absolute_error"]),
       middle=st.sampled_from([(), (1,), (3,), (1, 1), (2, 1)]), last=st.sampled_from([1, 2]),
       rows=st.integers(1, 5), weights_rank=st.integers(-1, 1), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**16))
def test_the_one_piece_program_weighs_as_keras(evaluator, loss, middle, last, rows, weights_rank, reduction, seed):
    """The compiled one-piece program aligns a sample weight with the values
    as Keras does on the request's shapes, though it is traced for any batch
    size: values that end in an axis of 1 (binary crossentropy of shape
    (N, 1, 1) gives (N, 1)) meet weights of one rank fewer, which Keras
    lines up instead of broadcasting rows against rows. And the bound on the
    weighted values (``max_broadcast_elements``) counts what it computes."""
    rng = np.random.default_rng(seed)
    shape = (rows, *middle, last)
    y_true = rng.uniform(0.05, 0.95, shape).astype("float32")
    y_pred = rng.uniform(0.05, 0.95, shape).astype("float32")
    values = shape[:-1]  # these losses reduce the last axis
    sample_weight = rng.uniform(0.0, 2.0, values[:max(1, len(values) + weights_rank)]).astype("float32")
    try:
        reductions.check_sample_weight(sample_weight.shape, values, loss)
    except InvalidArgument:
        return  # refused before anything runs
    keras_loss = {"binary_crossentropy": keras.losses.BinaryCrossentropy, "mean_squared_error":
                  keras.losses.MeanSquaredError, "mean_absolute_error": keras.losses.MeanAbsoluteError}[loss]
    want = keras_loss(reduction=reduction)(y_true, y_pred, sample_weight=sample_weight)
    got = evaluator.evaluate(evaluator.planner.plan({"name": loss}), {"y_true": y_true, "y_pred": y_pred},
                             sample_weight=sample_weight, reduction=reduction)
    assert got.loss.shape == tuple(want.shape)
    assert got.loss.size <= np.prod(reductions.weighted_shape(values, sample_weight.shape))
    np.testing.assert_allclose(got.loss, np.asarray(want), rtol=1e-5, atol=1e-6)
