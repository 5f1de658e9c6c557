"""The per-request shortcuts of the evaluator, each proven equal to what it
shortcuts. ``Evaluator.check`` runs its shape-only checks once per kind of request
(plan, reduction, gradient flag, inputs' names, dtypes and shapes) and its
value checks on every request. Proven equal to the full check: after any
first request of the same kind, a second request is refused, or passes,
exactly as a fresh evaluator's full check refuses or passes it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorflow")

from lossd_server.errors import LossdError  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses.custom import full_registry  # noqa: E402

# Losses whose checks read values (sparse labels, ignore_class, ctc) and
# ones whose checks read only shapes; with parameters that change the checks.
SPECS = [
    {"name": "huber", "params": {"delta": 1.5}},
    {"name": "mse"},
    {"name": "sparse_categorical_crossentropy"},
    {"name": "sparse_categorical_crossentropy", "params": {"ignore_class": 1}},
    {"name": "categorical_crossentropy"},
    {"terms": [{"loss": {"name": "mse"}, "weight": 0.5},
               {"loss": {"name": "sparse_categorical_crossentropy"}, "weight": 2.0}]},
]


@pytest.fixture(scope="module")
def registry():
    return full_registry(plugins=False)


def _evaluator(registry, **limits) -> Evaluator:
    return Evaluator(registry, backend.select_device("cpu"), **limits)


def _outcome(evaluator: Evaluator, plan, request) -> tuple:
    tensors, sample_weight, reduction, gradient = request
    try:
        evaluator.check(plan, tensors, sample_weight, reduction, gradient)
    except LossdError as exc:
        return type(exc).__name__, exc.reason, str(exc)
    return ("passed",)


@st.composite
def requests(draw, rows: int, classes: int, label_dtype: str, weighted: tuple):
    """A request of one fixed kind (shapes, dtypes) with drawn values:
    labels in or out of range, integral or not, finite or not."""
    y_true = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, float("nan"), float(classes)]),
                           min_size=rows, max_size=rows))
    y_pred = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).random((rows, classes), dtype=np.float32)
    y_true = np.asarray(y_true, dtype=label_dtype) if label_dtype == "float32" else \
        np.asarray(np.nan_to_num(y_true, nan=0.0), dtype=label_dtype)
    sample_weight = None if weighted is None else np.ones(weighted, np.float32)
    return ({"y_true": y_true.reshape(rows, 1), "y_pred": y_pred}, sample_weight,
            draw(st.sampled_from(["sum_over_batch_size", "none"])), False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), spec=st.sampled_from(SPECS), rows=st.integers(1, 4), classes=st.integers(1, 3),
       label_dtype=st.sampled_from(["float32", "int32"]),
       weighted=st.sampled_from([None, "rows", "wrong"]), limit=st.sampled_from([None, 6]))
def test_a_remembered_kind_checks_as_the_full_check(registry, data, spec, rows, classes, label_dtype, weighted,
                                                     limit):
    shape = {None: None, "rows": (rows,), "wrong": (rows + 1, 2)}[weighted]
    kind = requests(rows, classes, label_dtype, shape)
    first, second = data.draw(kind), data.draw(kind)
    second = (second[0], second[1], first[2], first[3])  # the same kind: reduction and gradient too
    remembering = _evaluator(registry, max_broadcast_elements=limit)
    plan = remembering.planner.plan(spec)
    _outcome(remembering, plan, first)
    expected = _outcome(_evaluator(registry, max_broadcast_elements=limit), plan, second)
    assert _outcome(remembering, plan, second) == expected
    assert _outcome(remembering, plan, second) == expected  # and once more, remembered for sure


def test_a_label_out_of_range_is_refused_after_its_kind_passed(registry):
    evaluator = _evaluator(registry)
    plan = evaluator.planner.plan({"name": "sparse_categorical_crossentropy"})
    y_pred = np.full((2, 3), 1 / 3, np.float32)
    evaluator.check(plan, {"y_true": np.array([[0], [2]], np.int32), "y_pred": y_pred}, None, "sum")
    with pytest.raises(LossdError) as refused:
        evaluator.check(plan, {"y_true": np.array([[0], [3]], np.int32), "y_pred": y_pred}, None, "sum")
    assert refused.value.reason == "LABEL_OUT_OF_RANGE"


def test_a_new_plan_of_the_same_kind_is_checked_in_full(registry):
    """A plan object is remembered by identity and held: another plan (a
    stored loss changed under the same name) is checked afresh."""
    evaluator = _evaluator(registry)
    tensors = {"y_true": np.zeros((2, 3), np.float32), "y_pred": np.zeros((2, 3), np.float32)}
    evaluator.check(evaluator.planner.plan({"name": "mse"}), tensors, None, "sum")
    plan = evaluator.planner.plan({"name": "sparse_categorical_crossentropy"})
    with pytest.raises(LossdError) as refused:
        evaluator.check(plan, {"y_true": np.array([[0], [7]], np.int32), "y_pred": tensors["y_pred"]}, None,
                        "sum")
    assert refused.value.reason == "LABEL_OUT_OF_RANGE"


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "float64", "bfloat16"]),
       shape=st.sampled_from([(), (1,), (7,), (16, 10), (3, 1, 2)]),
       values=st.lists(st.sampled_from([0.0, 1.0, -2.5, 6e4, -6e4, 3e38, -3e38, 1e300, float("inf"),
                                        float("-inf"), float("nan")]), min_size=160, max_size=160))
def test_the_nan_inf_flag_equals_isfinite(dtype, shape, values):
    """``any_non_finite``'s shortcuts (a scalar's ``math.isfinite``, min and
    max of large arrays) flag exactly the arrays ``numpy.isfinite`` flags,
    in every floating dtype, without a numpy warning."""
    import ml_dtypes

    from lossd_server.evaluation.evaluator import any_non_finite

    size = int(np.prod(shape))
    with np.errstate(over="ignore", invalid="ignore"):  # the casts of values too large for the dtype
        array = np.asarray(values[:size], np.float64).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    array = array.reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert any_non_finite([array]) == (not np.isfinite(array.astype(np.float64)).all())
