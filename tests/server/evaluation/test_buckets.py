"""XLA shape buckets give Keras's answer.

Small row-separable requests, alone or micro-batched, run as XLA executables
padded to row buckets (``lossd_server.evaluation.buckets``). Each result is
compared with Keras itself (``keras_reference``), never with lossd's own
output: the loss to rtol 1e-6 (a reduced loss to rtol 1e-6 of the sum of the
magnitudes it adds up: lossd sums in float64, Keras in the loss's dtype),
per-sample values and gradients to rtol 1e-6, and bit for bit where XLA's
kernels allow (``EXACT``). Padding rows must never show: not in a loss, not
in a gradient, not in the NaN/Inf flag (``mean(y_true / y_pred)`` is NaN on
the zero padding). Every example also checks that the bucketed executable
answered (``Buckets.calls``), so no test passes by falling back.
"""

from __future__ import annotations

import threading
from concurrent import futures

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")

from tests.keras_reference import reduced_magnitude, value_and_gradient  # noqa: E402

from lossd import wire  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.batching import Batcher, row_item  # noqa: E402
from lossd_server.evaluation.buckets import MIN_ROWS, bucket  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.losses.registry import SHAPES_SPARSE, LossEntry  # noqa: E402

# Expressions, each with the same function written in keras.ops for the reference.
EXPRESSIONS = {
    "mean(square(y_true - y_pred), axis=-1)": lambda t, p: keras.ops.mean(keras.ops.square(t - p), axis=-1),
    "y_true * square(y_pred)": lambda t, p: t * keras.ops.square(p),
    # NaN on the zero padding rows, and so is its gradient there.
    "mean(y_true / y_pred, axis=-1)": lambda t, p: keras.ops.mean(t / p, axis=-1),
}
# Per-sample values bit for bit with Keras's: elementwise arithmetic that
# XLA computes as TensorFlow's kernels do. Where a loss reduces each row
# (a mean over the last axis), XLA adds in another order and rounds the
# last place differently; transcendental functions differ as their
# vectorised kernels do (docs/xla.md).
EXACT = {"expr:y_true * square(y_pred)"}
ROW_PARAMETER_VALUES = {"delta": (0.3, 3.0), "gamma": (0.0, 4.0), "alpha": (0.0, 1.0)}
# Row counts on both sides of bucket edges.
ROWS = (1, 2, MIN_ROWS - 1, MIN_ROWS, MIN_ROWS + 1, 15, 16, 17, 31, 33)


def every_loss(registry) -> list[str]:
    """``xla_losses`` naming every loss: ``auto`` then buckets a lone request
    of any loss (the server's list names only those measured faster), so the
    exactness checks below reach every bucketable loss ("" is an inline
    expression's entry, which has no name)."""
    return ["", *(entry.name for entry in registry.entries())]


@pytest.fixture(scope="module")
def evaluator():
    registry = custom.full_registry(plugins=False)
    ev = Evaluator(registry, backend.select_device("cpu"), xla="auto", xla_losses=every_loss(registry),
                   expression_compiler=custom.inline_entry, max_pending_compiles=64, compile_timeout=600)
    yield ev
    ev.close()


def _bucketable(evaluator) -> list[str]:
    """The registered losses whose rows are independent: those a bucket serves."""
    rng = np.random.default_rng(0)
    names = []
    for entry in evaluator.registry.entries():
        if entry.source not in ("keras", "builtin"):
            continue
        y_true, y_pred = _inputs(rng, entry.shapes, 4, (3,), np.float32)
        if row_item(evaluator.planner.plan({"name": entry.name}), {"y_true": y_true, "y_pred": y_pred}, None,
                    "sum", False, 1 << 16) is not None:
            names.append(entry.name)
    return sorted(names)


def _inputs(rng, shapes: str, rows: int, tail: tuple, dtype):
    shape = (rows, *tail)
    if shapes == SHAPES_SPARSE:
        return rng.integers(0, shape[-1], shape[:-1]).astype(np.int32), rng.uniform(0.05, 0.95, shape).astype(dtype)
    y_pred = rng.uniform(0.05, 0.95, shape).astype(dtype)
    if rng.integers(0, 2):
        return rng.integers(0, 2, shape).astype(dtype), y_pred
    return rng.uniform(0.05, 0.95, shape).astype(dtype), y_pred


@st.composite
def requests(draw, names, rows=st.sampled_from(ROWS), count=st.just(1)):
    """Requests of one family: loss, dtype, trailing shape and gradient shared;
    rows, parameters, weights, reductions and NaN/Inf their own."""
    loss = draw(st.sampled_from(names + [f"expr:{e}" for e in EXPRESSIONS]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    # At least two classes: sparse labels against one class are not row-separable.
    tail = tuple(draw(st.lists(st.integers(2, 5), min_size=1, max_size=2)))
    gradient = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out = []
    for _ in range(draw(count)):
        out.append(_request(draw, rng, loss, dtype, tail, gradient, draw(rows)))
    return out


def _request(draw, rng, loss, dtype, tail, gradient, rows):
    entry = None if loss.startswith("expr:") else keras_entries()[loss]
    y_true, y_pred = _inputs(rng, entry.shapes if entry else "same", rows, tail, dtype)
    params = {}
    for name in sorted(entry.row_parameters if entry else ()):
        lo, hi = ROW_PARAMETER_VALUES[name]
        params[name] = float(draw(st.floats(lo, hi)))
    if entry is not None and "apply_class_balancing" in {p.name for p in entry.parameters}:
        params["apply_class_balancing"] = True  # so alpha counts
    bad = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf]))
    if bad is not None:  # one input element NaN or Inf
        target = y_pred if y_true.dtype.kind != "f" or draw(st.booleans()) else y_true
        target.flat[int(rng.integers(0, target.size))] = bad
    # Weights of the per-sample values' rank (a bucket, like a batch, takes
    # no weights whose rank Keras would align to the values'): one per value,
    # or one per row.
    values = y_pred.shape if loss == "expr:y_true * square(y_pred)" else y_pred.shape[:-1]
    sample_weight = None
    kind = draw(st.sampled_from(["none", "rows", "full"]))
    if kind == "rows":
        sample_weight = rng.uniform(0.0, 2.0, (rows,) + (1,) * (len(values) - 1)).astype(dtype)
    elif kind == "full":
        sample_weight = rng.uniform(0.0, 2.0, values).astype(dtype)
    spec = {"expression": loss[5:]} if loss.startswith("expr:") else {"name": loss, "params": params}
    return dict(loss=loss, spec=spec, params=params, tensors={"y_true": y_true, "y_pred": y_pred},
                sample_weight=sample_weight, reduction=draw(st.sampled_from(wire.REDUCTIONS)), gradient=gradient)


_ENTRIES: dict[str, LossEntry] = {}


def keras_entries() -> dict[str, LossEntry]:
    if not _ENTRIES:
        _ENTRIES.update({e.name: e for e in custom.full_registry(plugins=False).entries()})
    return _ENTRIES


class _Function(keras.losses.Loss):
    """A function of (y_true, y_pred) as a Keras loss: Keras applies the
    weights and the reduction."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def keras_answer(call):
    """Keras's loss (with the request's reduction and weights) and the
    gradient of its sum, in the request's dtype, and its per-sample values."""
    dtype = call["tensors"]["y_pred"].dtype.name
    if call["loss"].startswith("expr:"):
        fn = EXPRESSIONS[call["loss"][5:]]

        def make(reduction):
            return _Function(fn, reduction=reduction, dtype=dtype)
    else:
        cls = type(keras_entries()[call["loss"]].build({}, "none", dtype))

        def make(reduction):
            return cls(**call["params"], reduction=reduction, dtype=dtype)
    weights = call["sample_weight"]
    y_true, y_pred = call["tensors"]["y_true"], call["tensors"]["y_pred"]
    loss = make(call["reduction"])
    value, grad = value_and_gradient(lambda t, p: loss(t, p, sample_weight=weights), y_true, y_pred)
    per_sample = make("none")
    values, _ = value_and_gradient(lambda t, p: per_sample(t, p, sample_weight=weights), y_true, y_pred)
    return value, grad, values


def _check(call, got):
    """``got`` (a Result) against Keras."""
    want, want_grad, values = keras_answer(call)
    y_true, y_pred = call["tensors"]["y_true"], call["tensors"]["y_pred"]
    where = f"{call['loss']} {y_pred.dtype} {call['reduction']} rows={len(y_pred)}"
    assert got.loss.shape == np.shape(want) and got.loss.dtype == y_pred.dtype, where
    floor = _cancelling_scale(call)
    weight = 1.0 if call["sample_weight"] is None else float(np.max(np.abs(call["sample_weight"]), initial=1.0))
    if call["reduction"] == "none":
        if call["loss"] in EXACT:
            np.testing.assert_array_equal(got.loss, want, err_msg=where)
        else:
            _allclose(got.loss, want, floor * weight, where)
    else:
        scale = reduced_magnitude(values, call["reduction"], call["sample_weight"], floor * weight / 1e-6)
        if np.isfinite(want):
            assert abs(float(got.loss) - float(want)) <= 1e-6 * scale + 1e-30, (where, got.loss, want, scale)
        else:
            np.testing.assert_array_equal(got.loss, want, err_msg=where)
    if call["gradient"]:
        assert got.gradient.shape == y_pred.shape and got.gradient.dtype == y_pred.dtype, where
        _allclose(got.gradient, want_grad, floor * max(weight, 1.0), where)
    else:
        assert got.gradient is None
    inputs = [y_true, y_pred] + ([] if call["sample_weight"] is None else [call["sample_weight"]])
    expected_flag = not all(np.isfinite(a).all() for a in [*inputs, np.asarray(want)]
                            + ([want_grad] if call["gradient"] else []) if a.dtype.kind == "f")
    assert got.non_finite == expected_flag, where
    return where


def _allclose(got, want, floor, where):
    atol = max(1e-6 * float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)), floor)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol, equal_nan=True, err_msg=where)


def _cancelling_scale(call) -> float:
    """A few units in the last place of the inputs' magnitude: what a loss
    that subtracts terms of that size (log_cosh) keeps of a small value."""
    inputs = [a for a in call["tensors"].values() if np.isfinite(a).all()] or [np.zeros(1)]
    eps = float(np.finfo(call["tensors"]["y_pred"].dtype).eps)
    return 8 * eps * (1.0 + max(float(np.max(np.abs(a), initial=0.0)) for a in inputs))


def _evaluate(evaluator, call):
    return evaluator.evaluate(evaluator.planner.plan(call["spec"]), call["tensors"],
                              sample_weight=call["sample_weight"], reduction=call["reduction"],
                              gradient=call["gradient"])


def _bucketed(evaluator, call):
    """The request evaluated once its bucket's executable is compiled; asserts
    the executable answered it."""
    _evaluate(evaluator, call)  # starts the compilation (or is already served by it)
    assert evaluator.wait_compiled()
    before = evaluator.buckets.calls
    result = _evaluate(evaluator, call)
    assert evaluator.buckets.calls == before + 1, f"{call['loss']}: not served by a bucket"
    return result


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bucketed_request_equals_keras(evaluator, data):
    """One request at a time, every bucketable loss, reduction, weight kind,
    row count across bucket edges, with and without NaN/Inf and gradient."""
    call = data.draw(requests(_bucketable(evaluator)))[0]
    result = _bucketed(evaluator, call)
    event(_check(call, result).split(" rows=")[0].split(" ")[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormal_parameter_answers_as_keras(evaluator, dtype):
    """A subnormal float64 parameter (which TensorFlow's kernels flush to zero
    and XLA's keep) gets Keras's eager answer from a bucket: before the planner
    flushed it, gamma=2.2e-309 with an Inf prediction answered NaN bucketed
    and 1.97 in Keras."""
    y_true = np.array([[0.87148002, 0.5959722], [0.7065469, 0.53926249]], dtype)
    y_pred = np.array([[0.62326552, 0.29280804], [0.08687617, np.inf]], dtype)
    params = {"alpha": 0.0, "gamma": 2.225073858507203e-309, "apply_class_balancing": True}
    call = dict(loss="binary_focal_crossentropy", spec={"name": "binary_focal_crossentropy", "params": params},
                params=params, tensors={"y_true": y_true, "y_pred": y_pred}, sample_weight=None,
                reduction="none", gradient=False)
    result = _bucketed(evaluator, call)
    _check(call, result)
    assert np.isfinite(result.loss).all()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bucketed_batch_equals_keras(evaluator, data):
    """Micro-batches of ragged requests with their own row parameters,
    weights, reductions and NaN/Inf, padded to one bucket: each request gets
    Keras's answer for itself alone."""
    calls = data.draw(requests(_bucketable(evaluator), rows=st.integers(1, 12), count=st.integers(2, 5)))
    batcher = Batcher(evaluator, max_delay_us=2_000_000, max_elements=1 << 16, max_requests=len(calls))
    _together(batcher, evaluator, calls)  # compiles the family's bucket
    assert evaluator.wait_compiled()
    before, batches = evaluator.buckets.calls, batcher.batches
    got = _together(batcher, evaluator, calls)
    assert batcher.batches == batches + 1 and evaluator.buckets.calls == before + 1
    for call, result in zip(calls, got):
        _check(call, result)


def _together(batcher, evaluator, calls):
    """Each call from a thread of its own, all in flight before any evaluates."""
    barrier = threading.Barrier(len(calls))

    def one(call):
        with batcher.in_flight():
            barrier.wait()
            return batcher.evaluate(evaluator.planner.plan(call["spec"]), call["tensors"],
                                    sample_weight=call["sample_weight"], reduction=call["reduction"],
                                    gradient=call["gradient"])

    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls, timeout=120))


def test_every_row_separable_loss_is_bucketed(evaluator):
    """The control for the property tests: what they draw from."""
    assert set(_bucketable(evaluator)) == {
        "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
        "categorical_focal_crossentropy", "sparse_categorical_crossentropy", "categorical_generalized_cross_entropy",
        "kl_divergence", "poisson", "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error", "cosine_similarity", "huber", "log_cosh", "categorical_hinge"}


def test_padding_never_shows(evaluator):
    """3 real rows in a bucket of 8: the 5 zero padding rows are NaN for this
    loss (0 / 0), in values and gradient, and none of it reaches the answer."""
    call = dict(loss="expr:mean(y_true / y_pred, axis=-1)", spec={"expression": "mean(y_true / y_pred, axis=-1)"},
                params={}, tensors={"y_true": np.full((3, 4), 0.5, np.float32),
                                    "y_pred": np.full((3, 4), 0.25, np.float32)},
                sample_weight=None, reduction="sum", gradient=True)
    result = _bucketed(evaluator, call)
    assert float(result.loss) == 6.0 and not result.non_finite
    np.testing.assert_array_equal(result.gradient, np.full((3, 4), -2.0, np.float32))


def test_a_request_never_waits_for_xla(evaluator):
    """A new bucket's first request takes the graph path while XLA compiles
    in the background; the next one of that bucket uses the executable."""
    ev = Evaluator(evaluator.registry, evaluator.device, xla="auto", xla_losses=("huber",), compile_timeout=600)
    try:
        plan = ev.planner.plan({"name": "huber", "params": {"delta": 0.7}})
        tensors = {"y_true": np.zeros((5, 3), np.float32), "y_pred": np.ones((5, 3), np.float32)}
        first = ev.evaluate(plan, tensors, gradient=True)
        assert ev.buckets.calls == 0
        assert ev.wait_compiled()
        second = ev.evaluate(plan, tensors, gradient=True)
        assert ev.buckets.calls == 1
        np.testing.assert_allclose(second.loss, first.loss, rtol=1e-6)
        np.testing.assert_array_equal(second.gradient, first.gradient)
    finally:
        ev.close()


@pytest.mark.parametrize("spec, y_true", [
    ({"name": "hinge"}, None),  # label conversion looks at the whole batch
    ({"name": "dice"}, None),
    ({"name": "sparse_categorical_crossentropy", "params": {"ignore_class": 0}}, "labels"),
    ({"terms": [{"loss": {"name": "mse"}}, {"loss": {"name": "mae"}}]}, None),
    ({"expression": "mean(square(y_true - y_pred), axis=0)"}, None),  # couples the rows
])
def test_coupled_rows_take_the_graph_path(evaluator, spec, y_true):
    rng = np.random.default_rng(1)
    y = rng.uniform(0.05, 0.95, (4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 4).astype(np.int32)
    plan = evaluator.planner.plan(spec)
    tensors = {"y_true": labels if y_true == "labels" else y, "y_pred": y}
    before = evaluator.buckets.calls
    for _ in range(2):
        evaluator.evaluate(plan, tensors, reduction="sum")
        assert evaluator.wait_compiled()
    assert evaluator.buckets.calls == before


def test_a_program_xla_cannot_compile_is_not_tried_again(evaluator, caplog):
    """A loss built on an op XLA lacks (a numpy callback) is served by the
    graph path; its failure is remembered, logged once, and never retried."""
    import tensorflow as tf

    mse = evaluator.registry.get("mean_squared_error")

    class NumpyMSE(keras.losses.Loss):
        def call(self, y_true, y_pred):
            diff = tf.numpy_function(lambda a, b: a - b, [y_true, y_pred], y_pred.dtype, stateful=False)
            diff = tf.reshape(diff, tf.shape(y_pred))
            return keras.ops.mean(keras.ops.square(diff), axis=-1)

    registry = custom.full_registry(plugins=False)
    registry.register(LossEntry("numpy_mse", (), "MSE through numpy.", (),
                                lambda params, reduction, dtype: NumpyMSE(reduction=reduction, dtype=dtype),
                                source="builtin", row_structure=mse.row_structure))
    ev = Evaluator(registry, evaluator.device, xla="auto", xla_losses=("numpy_mse",), compile_timeout=600)
    try:
        plan = ev.planner.plan({"name": "numpy_mse"})
        y = np.arange(12, dtype=np.float32).reshape(4, 3)
        with caplog.at_level("DEBUG", logger="lossd_server.evaluation.evaluator"):
            for rows in (4, 3, 2, 20, 4):  # buckets of 8 and 32
                result = ev.evaluate(plan, {"y_true": np.zeros((rows, 3), np.float32),
                                            "y_pred": np.resize(y, (rows, 3))}, reduction="sum")
                assert ev.wait_compiled()
        np.testing.assert_allclose(result.loss, np.sum(np.mean(np.square(y), axis=-1)), rtol=1e-6)
        assert ev.buckets.calls == 0
        failures = [r for r in caplog.records if "XLA cannot compile" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
    finally:
        ev.close()


def test_buckets_are_powers_of_two():
    assert [bucket(n, MIN_ROWS) for n in (1, 7, 8, 9, 16, 17, 1000)] == [8, 8, 8, 16, 16, 32, 1024]
    assert [bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


def test_xla_off_has_no_buckets(evaluator):
    ev = Evaluator(evaluator.registry, evaluator.device, xla="off")
    assert ev.buckets is None
    ev.close()


def test_through_a_server_with_xla(tmp_path):
    """``LOSSD_XLA=auto`` through a real gRPC server: ragged Huber requests
    with their own deltas, after their buckets compiled, are answered by
    the buckets and equal Keras."""
    import lossd
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, metrics_port=None, data_dir=tmp_path, grace_seconds=0, xla="auto")
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    try:
        rng = np.random.default_rng(9)
        calls = []
        for rows in (1, 7, 8, 9, 30):
            delta = float(rng.uniform(0.5, 2.0))
            calls.append(dict(loss="huber", spec={"name": "huber", "params": {"delta": delta}},
                              params={"delta": delta},
                              tensors={"y_true": rng.normal(size=(rows, 10)).astype(np.float32),
                                       "y_pred": rng.normal(size=(rows, 10)).astype(np.float32)},
                              sample_weight=None, reduction=wire.REDUCTIONS[rows % 5], gradient=True))
        with lossd.Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
            def ask(call):
                return client.evaluate("huber", call["tensors"]["y_true"], call["tensors"]["y_pred"],
                                       params=call["params"], reduction=call["reduction"], gradient=True)

            for call in calls:
                ask(call)
            assert srv.evaluator.wait_compiled()
            before = srv.evaluator.buckets.calls
            for call in calls:
                _check(call, ask(call))
        assert srv.evaluator.buckets.calls == before + len(calls)
    finally:
        srv.stop(0)


def test_auto_buckets_a_lone_request_only_for_the_losses_measured_faster(evaluator):
    """Under the server's ``auto`` a lone MSE request (measured slower
    bucketed) keeps the graph; a lone Huber request (measured faster) is
    bucketed once its executable is ready. Both answer as Keras does."""
    import keras

    from lossd_server.app import XLA_LOSSES

    ev = Evaluator(evaluator.registry, evaluator.device, xla="auto", xla_losses=XLA_LOSSES, compile_timeout=600)
    try:
        rng = np.random.default_rng(4)
        y_true, y_pred = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
        for name, bucketed in (("mean_squared_error", False), ("huber", True)):
            plan = ev.planner.plan({"name": name})
            for _ in range(2):  # the first call starts the bucket's compilation, if any
                ev.evaluate(plan, {"y_true": y_true, "y_pred": y_pred}, reduction="sum")
                assert ev.wait_compiled()
            before = ev.buckets.calls
            result = ev.evaluate(plan, {"y_true": y_true, "y_pred": y_pred}, reduction="sum")
            assert (ev.buckets.calls == before + 1) is bucketed, name
            expected = {"mean_squared_error": keras.losses.MeanSquaredError(reduction="sum"),
                        "huber": keras.losses.Huber(reduction="sum")}[name](y_true, y_pred)
            np.testing.assert_allclose(result.loss, np.asarray(expected), rtol=1e-6)
    finally:
        ev.close()
