"""The backend's direct call path (TensorFlow's C API, no Python dispatch)
gives exactly what the public concrete function gives, raises TensorFlow's
own exception types, and is the path actually in use."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402

from lossd_server.evaluation import backend  # noqa: E402


def _mse_program(tensors, sample_weight):
    mse = keras.losses.MeanSquaredError(dtype=tensors["y_pred"].dtype.name)
    value = mse(tensors["y_true"], tensors["y_pred"], sample_weight=sample_weight)
    return value, [value], {}


def _compiled(dtype: str, *, gradient: bool, sample_weight: bool = False) -> backend.Compiled:
    specs = [backend.InputSpec("y_pred", dtype, (None, 4)), backend.InputSpec("y_true", dtype, (None, 4))]
    if sample_weight:
        specs.append(backend.InputSpec("sample_weight", dtype, (None,)))
    return backend.Compiled(_mse_program, specs, has_sample_weight=sample_weight, gradient=gradient,
                            device=backend.select_device("cpu"))


def test_direct_path_is_in_use():
    # A TensorFlow upgrade that moves the private bindings would silently
    # cost ~140 µs per small request; this makes the loss visible.
    assert _compiled("float32", gradient=False)._direct is not None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gradient", [False, True])
def test_direct_path_matches_concrete_function_and_keras(dtype, gradient):
    rng = np.random.default_rng(3)
    y_pred, y_true = rng.normal(size=(5, 4)).astype(dtype), rng.normal(size=(5, 4)).astype(dtype)
    sw = rng.uniform(0.5, 2, size=5).astype(dtype)
    compiled = _compiled(dtype, gradient=gradient, sample_weight=True)
    total, terms, grad, _ = compiled([y_pred, y_true, sw])
    direct, compiled._direct = compiled._direct, None  # the public fallback
    try:
        ref_total, ref_terms, ref_grad, _ = compiled([y_pred, y_true, sw])
    finally:
        compiled._direct = direct
    assert total.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(total, ref_total)
    np.testing.assert_array_equal(terms[0], ref_terms[0])
    np.testing.assert_allclose(total, keras.losses.MeanSquaredError(dtype=dtype)(y_true, y_pred, sample_weight=sw),
                               rtol=1e-6)
    if gradient:
        np.testing.assert_array_equal(grad, ref_grad)
        _, keras_grad = value_and_gradient(
            lambda t, p: keras.losses.MeanSquaredError(dtype=dtype)(t, p, sample_weight=sw), y_true, y_pred)
        np.testing.assert_allclose(grad, keras_grad, rtol=1e-6)
    else:
        assert grad is None and ref_grad is None


def test_direct_path_accepts_read_only_views():
    # The server decodes requests with numpy.frombuffer: read-only arrays
    # over the message's bytes.
    data = np.arange(8, dtype="float32")
    y_pred = np.frombuffer(data.tobytes(), dtype="float32").reshape(2, 4)
    y_true = np.frombuffer(np.zeros(8, "float32").tobytes(), dtype="float32").reshape(2, 4)
    assert not y_pred.flags.writeable
    total, _, grad, _ = _compiled("float32", gradient=True)([y_pred, y_true])
    np.testing.assert_allclose(total, np.mean(data ** 2))
    np.testing.assert_allclose(grad, 2 * data.reshape(2, 4) / 8)


def test_direct_path_raises_tensorflow_errors():
    # Batch sizes that the signature allows but the kernels refuse: the same
    # exception type the public path raises, so the evaluator's
    # classification into INVALID_ARGUMENT still applies.
    compiled = _compiled("float32", gradient=False)
    with pytest.raises(tf.errors.InvalidArgumentError):
        compiled([np.zeros((3, 4), "float32"), np.zeros((2, 4), "float32")])


def test_a_switch_cancelled_before_its_first_call_stops_that_call():
    """``Cancellation`` makes TensorFlow's manager when a call first takes
    it: a cancel that came earlier (the RPC ended before its evaluation
    ran) still stops the call; an unused switch stops nothing."""
    compiled = _compiled("float32", gradient=False)
    y = np.ones((3, 4), np.float32)
    unused = backend.Cancellation()
    compiled([y, y], unused)  # runs: never cancelled
    assert not unused.cancelled
    early = backend.Cancellation()
    early.cancel()
    assert early.cancelled
    with pytest.raises(backend.CANCELLED):
        compiled([y, y], early)
    late = backend.Cancellation()
    compiled([y, y], late)  # its manager exists now: cancel reaches it
    late.cancel()
    with pytest.raises(backend.CANCELLED):
        compiled([y, y], late)
