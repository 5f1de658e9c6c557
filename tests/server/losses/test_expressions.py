"""Tests for the loss expression language in ``lossd_server.losses.expressions``.

Reference values come from ``keras.losses`` or from NumPy re-implementations
written here from the documented semantics, never from the module's own output.
"""

from __future__ import annotations

import ast
import builtins
import math
import os
import pathlib
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import HOSTILE_CORE, balanced_sum, generated_hostile, nested_calls
from lossd_server.losses import expression_rows, expression_shapes, expressions
from lossd_server.losses.expressions import (
    FUNCTIONS,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_NODES,
    Expression,
    ExpressionError,
    compile_expression,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402

TENSORS = ("y_true", "y_pred")
PARAMS = ("delta",)

HUBER = (
    "mean(where(abs(y_true - y_pred) <= delta, 0.5 * square(y_true - y_pred), "
    "delta * (abs(y_true - y_pred) - 0.5 * delta)), axis=-1)"
)

# A refusal must be quick; the brief asks for < 50 ms, the bound is generous
# because CI runs on a small shared machine.
REFUSAL_SECONDS = 0.2


def compile_loss(source: str, params=PARAMS) -> Expression:
    return compile_expression(source, tensors=TENSORS, params=params)


def rng_inputs(dtype, shape=(8, 5), seed=0):
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=shape).astype(dtype)
    y_pred = (y_true + rng.normal(scale=1.5, size=shape)).astype(dtype)
    return y_true, y_pred


def tolerances(dtype):
    # float64 is not held to float64 precision: some keras losses use
    # float32 constants (log_cosh computes log(2) in float32).
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-7, "atol": 1e-9}


# --------------------------------------------------------------------------
# Agreement with keras.losses
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("delta", [0.1, 0.5, 1.0, 2.5])
def test_huber_matches_keras_value_and_gradient(dtype, delta):
    expression = compile_loss(HUBER)
    y_true, y_pred = rng_inputs(dtype, seed=int(delta * 10))

    ours, our_grad = value_and_gradient(
        lambda t, p: expression({"y_true": t, "y_pred": p}, {"delta": delta}), y_true, y_pred
    )
    theirs, their_grad = value_and_gradient(
        lambda t, p: keras.losses.huber(t, p, delta=delta), y_true, y_pred
    )

    assert ours.dtype == dtype and ours.shape == (8,)
    np.testing.assert_allclose(ours, theirs, **tolerances(dtype))
    np.testing.assert_allclose(our_grad, their_grad, **tolerances(dtype))
    # Both branches of the where() must have been exercised for the gradient
    # comparison to mean anything.
    error = np.abs(y_true - y_pred)
    assert (error <= delta).any() and (error > delta).any()


def _probabilities(dtype, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=(6, 4)).astype(dtype)
    y_pred = rng.uniform(0.001, 0.999, size=(6, 4)).astype(dtype)
    y_pred[0, 0], y_pred[1, 1] = 0.0, 1.0  # exercise the epsilon clipping
    return y_true, y_pred


def _distributions(dtype, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.dirichlet(np.ones(5), size=6).astype(dtype)
    y_pred = rng.dirichlet(np.ones(5), size=6).astype(dtype)
    return y_true, y_pred


def _logits(dtype, seed):
    rng = np.random.default_rng(seed)
    y_true = np.eye(5)[rng.integers(0, 5, size=7)].astype(dtype)
    y_pred = rng.normal(scale=3.0, size=(7, 5)).astype(dtype)
    return y_true, y_pred


def _signs(dtype, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.choice([-1.0, 1.0], size=(6, 4)).astype(dtype)
    y_pred = rng.normal(size=(6, 4)).astype(dtype)
    return y_true, y_pred


def _positive(dtype, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.poisson(3.0, size=(6, 4)).astype(dtype)
    y_pred = rng.uniform(0.1, 6.0, size=(6, 4)).astype(dtype)
    return y_true, y_pred


KERAS_LOSSES = {
    "mse": ("mean(square(y_pred - y_true), axis=-1)", keras.losses.mean_squared_error, rng_inputs),
    "mae": ("mean(abs(y_pred - y_true))", keras.losses.mean_absolute_error, rng_inputs),
    # log(cosh(d)) written from the definition of cosh, unlike keras' softplus form.
    "log_cosh": (
        "mean(log((exp(y_pred - y_true) + exp(y_true - y_pred)) / 2), axis=-1)",
        keras.losses.log_cosh,
        rng_inputs,
    ),
    "binary_crossentropy": (
        "mean(-(y_true * log(clip(y_pred, epsilon(), 1 - epsilon()))"
        " + (1 - y_true) * log(1 - clip(y_pred, epsilon(), 1 - epsilon()))), axis=-1)",
        keras.losses.binary_crossentropy,
        _probabilities,
    ),
    "categorical_crossentropy_logits": (
        "-sum(y_true * log_softmax(y_pred), axis=-1)",
        lambda t, p: keras.losses.categorical_crossentropy(t, p, from_logits=True),
        _logits,
    ),
    "kl_divergence": (
        "sum(clip(y_true, epsilon(), 1) * log(clip(y_true, epsilon(), 1) / clip(y_pred, epsilon(), 1)))",
        keras.losses.kl_divergence,
        _distributions,
    ),
    "hinge": ("mean(maximum(1 - y_true * y_pred, 0), axis=-1)", keras.losses.hinge, _signs),
    "squared_hinge": (
        "mean(relu(1 - y_true * y_pred) ** 2, axis=-1)",
        keras.losses.squared_hinge,
        _signs,
    ),
    "poisson": ("mean(y_pred - y_true * log(y_pred + epsilon()))", keras.losses.poisson, _positive),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(KERAS_LOSSES))
def test_common_losses_match_keras(name, dtype):
    source, reference, make_inputs = KERAS_LOSSES[name]
    expression = compile_loss(source)
    assert expression.tensors_used == {"y_true", "y_pred"}
    y_true, y_pred = make_inputs(dtype, seed=3)

    ours, our_grad = value_and_gradient(lambda t, p: expression({"y_true": t, "y_pred": p}, {}), y_true, y_pred)
    theirs, their_grad = value_and_gradient(reference, y_true, y_pred)

    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, theirs, **tolerances(dtype))
    np.testing.assert_allclose(our_grad, their_grad, **tolerances(dtype))


def test_works_inside_tf_function_with_unknown_shapes():
    expression = compile_loss(HUBER)
    spec = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def loss_and_grad(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            loss = expression({"y_true": y_true, "y_pred": y_pred}, {"delta": 0.7})
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, y_pred)

    for shape in [(3, 4), (5, 2), (1, 7)]:
        y_true, y_pred = rng_inputs(np.float32, shape=shape, seed=sum(shape))
        loss, grad = loss_and_grad(tf.constant(y_true), tf.constant(y_pred))
        theirs, their_grad = value_and_gradient(lambda t, p: keras.losses.huber(t, p, delta=0.7), y_true, y_pred)
        np.testing.assert_allclose(loss.numpy(), theirs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad.numpy(), their_grad, rtol=1e-5, atol=1e-6)
    # One trace serves all shapes.
    assert loss_and_grad.experimental_get_tracing_count() == 1


# --------------------------------------------------------------------------
# Language features, against NumPy
# --------------------------------------------------------------------------

Y_TRUE = np.array([[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.75, 3.0], [-2.0, 1.0, 0.5, -0.5]])
Y_PRED = np.array([[0.25, -1.5, 1.0, 0.5], [2.0, 0.25, 0.0, -1.0], [-1.0, 0.75, 0.5, 0.1]])


def run(source: str, params=None, y_true=Y_TRUE, y_pred=Y_PRED):
    names = tuple(params or ())
    expression = compile_expression(source, tensors=TENSORS, params=names)
    return np.asarray(expression({"y_true": y_true, "y_pred": y_pred}, params or {}))


def _np_softmax(x, axis):
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _np_logsumexp(x, axis, keepdims=False):
    top = x.max(axis=axis, keepdims=True)
    result = np.log(np.exp(x - top).sum(axis=axis, keepdims=True)) + top
    return result if keepdims else np.squeeze(result, axis=axis)


FEATURES = [
    # Reductions: default axis is the last one.
    ("mean(y_pred)", lambda t, p: p.mean(axis=-1)),
    ("sum(y_pred, axis=0)", lambda t, p: p.sum(axis=0)),
    ("sum(y_pred, axis=(0, 1))", lambda t, p: p.sum()),
    ("sum(y_pred, axis=(-1, 0))", lambda t, p: p.sum()),
    ("max(y_pred, axis=None)", lambda t, p: p.max()),
    ("min(y_pred, axis=-2)", lambda t, p: p.min(axis=0)),
    ("mean(y_pred, axis=0, keepdims=True)", lambda t, p: p.mean(axis=0, keepdims=True)),
    ("max(y_true, keepdims=True)", lambda t, p: t.max(axis=-1, keepdims=True)),
    ("y_pred - mean(y_pred, keepdims=True)", lambda t, p: p - p.mean(axis=-1, keepdims=True)),
    ("logsumexp(y_pred)", lambda t, p: _np_logsumexp(p, -1)),
    ("logsumexp(y_pred, axis=(0, 1), keepdims=True)", lambda t, p: _np_logsumexp(p, (0, 1), True)),
    ("softmax(y_pred)", lambda t, p: _np_softmax(p, -1)),
    ("softmax(y_pred, axis=0)", lambda t, p: _np_softmax(p, 0)),
    ("log_softmax(y_pred, axis=-1)", lambda t, p: np.log(_np_softmax(p, -1))),
    # Elementwise functions.
    ("clip(y_pred, -0.5, 0.6)", lambda t, p: np.clip(p, -0.5, 0.6)),
    ("clip(y_pred, y_true, 1)", lambda t, p: np.minimum(np.maximum(p, t), 1)),
    ("maximum(y_true, y_pred)", lambda t, p: np.maximum(t, p)),
    ("minimum(y_true, 0)", lambda t, p: np.minimum(t, 0)),
    ("relu(y_true) - relu(-y_true)", lambda t, p: t),
    ("sign(y_true)", lambda t, p: np.sign(t)),
    ("negative(y_true)", lambda t, p: -t),
    ("sqrt(abs(y_true))", lambda t, p: np.sqrt(np.abs(t))),
    ("log1p(square(y_true)) + expm1(y_pred)", lambda t, p: np.log1p(t**2) + np.expm1(p)),
    ("tanh(y_pred) * sigmoid(y_true)", lambda t, p: np.tanh(p) / (1 + np.exp(-t))),
    ("softplus(y_true)", lambda t, p: np.log1p(np.exp(t))),
    # Operators and precedence.
    ("-y_true", lambda t, p: -t),
    ("+y_true - -y_pred", lambda t, p: t + p),
    ("-y_true ** 2", lambda t, p: -(t**2)),
    ("(-y_true) ** 2", lambda t, p: t**2),
    ("y_true ** 3", lambda t, p: t**3),
    ("y_pred ** -2", lambda t, p: p**-2.0),
    ("abs(y_pred) ** 0.5", lambda t, p: np.abs(p) ** 0.5),
    ("pow(y_true, 2)", lambda t, p: t**2),
    ("y_true / 4 + 3 * y_pred - 1", lambda t, p: t / 4 + 3 * p - 1),
    ("1 / (y_true - y_true)", lambda t, p: np.full_like(t, np.inf)),
    ("y_true * pi + e", lambda t, p: t * math.pi + math.e),
    ("y_true * 0 + epsilon()", lambda t, p: np.full_like(t, keras.config.epsilon())),
    # Comparisons, chained comparisons and boolean operators.
    ("where(y_true < y_pred, 1, 0)", lambda t, p: (t < p).astype(float)),
    ("where(y_true <= y_pred, 1, 0)", lambda t, p: (t <= p).astype(float)),
    ("where(y_true > y_pred, 1, 0)", lambda t, p: (t > p).astype(float)),
    ("where(y_true >= y_pred, 1, 0)", lambda t, p: (t >= p).astype(float)),
    ("where(y_true == y_pred, 1, 0)", lambda t, p: (t == p).astype(float)),
    ("where(y_true != y_pred, 1, 0)", lambda t, p: (t != p).astype(float)),
    ("where(-0.5 < y_pred <= 0.5, y_pred, 0)", lambda t, p: np.where((-0.5 < p) & (p <= 0.5), p, 0)),
    ("where(0 < y_true < y_pred < 3, 1, 0)", lambda t, p: ((0 < t) & (t < p) & (p < 3)).astype(float)),
    ("where(y_true > 0 and y_pred > 0, 1, 0)", lambda t, p: ((t > 0) & (p > 0)).astype(float)),
    ("where(y_true > 0 or y_pred > 0, 1, 0)", lambda t, p: ((t > 0) | (p > 0)).astype(float)),
    ("where(not y_true > 0, 1, 0)", lambda t, p: (~(t > 0)).astype(float)),
    ("where(not (y_true > 0 or y_pred > 1) and y_pred < 0.3, y_true, y_pred)",
     lambda t, p: np.where(~((t > 0) | (p > 1)) & (p < 0.3), t, p)),
    # Whitespace, including newlines inside brackets.
    ("  mean(\n  y_pred,\n  axis=0)  ", lambda t, p: p.mean(axis=0)),
]


@pytest.mark.parametrize("source, reference", FEATURES, ids=[f[0] for f in FEATURES])
def test_language_features_match_numpy(source, reference):
    with np.errstate(divide="ignore"):
        expected = np.asarray(reference(Y_TRUE, Y_PRED), dtype=np.float64)
    actual = run(source)
    assert actual.dtype == np.float64
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_parameters_and_constants():
    # A parameter takes the tensors' dtype without a detour through float32.
    result = run("y_true * 0 + delta", {"delta": 0.1})
    assert result.dtype == np.float64 and np.all(result == 0.1)
    # Parameters as exponents, with sign.
    np.testing.assert_allclose(run("abs(y_pred) ** k", {"k": 1.5}), np.abs(Y_PRED) ** 1.5)
    np.testing.assert_allclose(run("pow(abs(y_pred) + 1, -k)", {"k": 0.5}), (np.abs(Y_PRED) + 1) ** -0.5)
    # A parameter named like a constant shadows it.
    np.testing.assert_allclose(run("y_true * e", {"e": 2.0}), Y_TRUE * 2.0)
    # Parameters may also be scalar tensors.
    np.testing.assert_allclose(run("y_true * delta", {"delta": tf.constant(3.0)}), Y_TRUE * 3.0)
    # An expression need not read any tensor.
    assert run("2 * delta", {"delta": 4.0}) == 8.0


def test_computation_dtype_follows_first_floating_tensor():
    expression = compile_loss("y_pred + y_true")
    mixed = expression({"y_true": Y_TRUE.astype(np.float32), "y_pred": Y_PRED}, {})
    assert keras.backend.standardize_dtype(mixed.dtype) == "float64"
    mixed = compile_loss("y_true + y_pred")({"y_true": Y_TRUE.astype(np.float32), "y_pred": Y_PRED}, {})
    assert keras.backend.standardize_dtype(mixed.dtype) == "float32"
    # Integer labels are converted to the float dtype of the predictions.
    labels = np.array([[0, 1], [1, 0]], dtype=np.int32)
    preds = np.array([[0.5, 0.5], [0.25, 0.75]], dtype=np.float64)
    result = compile_loss("mean(square(y_true - y_pred))")({"y_true": labels, "y_pred": preds}, {})
    assert keras.backend.standardize_dtype(result.dtype) == "float64"
    np.testing.assert_allclose(np.asarray(result), [0.25, 0.5625])
    # Without any floating tensor, keras' floatx is used.
    result = compile_loss("y_true / 2")({"y_true": labels}, {})
    assert keras.backend.standardize_dtype(result.dtype) == keras.config.floatx()
    np.testing.assert_allclose(np.asarray(result), labels / 2)


def test_names_used_are_reported():
    expression = compile_loss("mean(abs(y_pred - 1) * delta)")
    assert expression.tensors_used == frozenset({"y_pred"})
    assert expression.params_used == frozenset({"delta"})
    assert expression.source == "mean(abs(y_pred - 1) * delta)"
    # Only the tensors read are needed.
    np.testing.assert_allclose(np.asarray(expression({"y_pred": Y_PRED}, {"delta": 2.0})),
                               (np.abs(Y_PRED - 1) * 2).mean(axis=-1))
    assert compile_loss("pi * 2").tensors_used == frozenset()


def test_missing_inputs_are_reported():
    expression = compile_loss("y_true * delta")
    with pytest.raises(ExpressionError, match="y_true"):
        expression({"y_pred": Y_PRED}, {"delta": 1.0})
    with pytest.raises(ExpressionError, match="delta"):
        expression({"y_true": Y_TRUE}, {})


def test_declared_names_are_validated():
    with pytest.raises(ExpressionError, match="both"):
        compile_expression("y_true", tensors=TENSORS, params=("y_true",))
    with pytest.raises(ExpressionError, match="reserved"):
        compile_expression("y_true", tensors=TENSORS, params=("lambda",))
    with pytest.raises(ExpressionError, match="identifier"):
        compile_expression("y_true", tensors=TENSORS, params=("a-b",))
    with pytest.raises(TypeError):
        compile_expression("y_true", tensors="y_true", params=())
    with pytest.raises(ExpressionError, match="string"):
        compile_expression(b"y_true", tensors=TENSORS, params=())  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------


def test_limits_are_exact():
    # Length: padding with spaces is the only change.
    compile_loss("y_true" + " " * (MAX_LENGTH - len("y_true")))
    with pytest.raises(ExpressionError, match="limit"):
        compile_loss("y_true" + " " * (MAX_LENGTH - len("y_true") + 1))
    # Depth: each call is one level and the innermost name one more.
    compile_loss(nested_calls(MAX_DEPTH - 1))
    with pytest.raises(ExpressionError, match="nested deeper"):
        compile_loss(nested_calls(MAX_DEPTH))
    # Nodes: a balanced sum of n names has 2n - 1 nodes and shallow depth.
    compile_expression(balanced_sum((MAX_NODES + 1) // 2), tensors=("a",), params=())
    with pytest.raises(ExpressionError, match=str(MAX_NODES)):
        compile_expression(balanced_sum((MAX_NODES + 1) // 2 + 1), tensors=("a",), params=())
    # Exponents.
    compile_loss("y_true ** 16 + y_true ** -16 + pow(y_true, 16)")
    # Constants.
    compile_loss("y_true * 1e12 - 1000000000000")


# --------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------

# Hostile sources and the fragment each refusal must name live in tests/fuzzing.py,
# which bench/fuzz.py sends to the server too.


def _unique(cases: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Drops repeated sources; generated cases may repeat hand-written ones."""
    first: dict[str, str | None] = {}
    for source, fragment in cases:
        first.setdefault(source, fragment)
    return list(first.items())


HOSTILE = _unique(HOSTILE_CORE + generated_hostile())


def test_hostile_list_is_large():
    assert len(HOSTILE_CORE) >= 60
    assert len({source for source, _ in HOSTILE}) == len(HOSTILE) >= 200


def _check_refusal(source: str, fragment: str | None) -> ExpressionError:
    start = time.perf_counter()
    with pytest.raises(ExpressionError) as info:
        compile_loss(source)
    elapsed = time.perf_counter() - start
    assert elapsed < REFUSAL_SECONDS, f"refusal took {elapsed:.3f} s"

    error = info.value
    message = str(error)
    assert message.startswith("expression refused")
    if fragment is not None:
        assert fragment.lower() in message.lower()
    if error.column is not None:
        assert f"column {error.column}" in message
        assert 1 <= error.column <= len(source) + 1
        # The snippet is the source text at the column.
        assert source[error.column - 1 :].startswith(error.snippet or "")
    else:
        assert "limit" in message or "empty" in message
    return error


@pytest.mark.parametrize(
    "source, fragment", HOSTILE, ids=[f"{i}-{ascii(s)[1:31]}" for i, (s, _) in enumerate(HOSTILE)]
)
def test_hostile_expression_is_refused(source, fragment):
    _check_refusal(source, fragment)


def test_refusals_point_at_the_offending_part():
    error = _check_refusal("mean(abs(y_true.__class__))", "attribute")
    assert error.column == 10 and error.snippet == "y_true.__class__"
    assert "tensor names [y_pred, y_true]" in str(error)
    assert "parameters [delta]" in str(error)
    error = _check_refusal("y_true + foo(1)", "unknown function")
    assert error.column == 10 and error.snippet.startswith("foo")
    error = _check_refusal("abs(y_true) + y_pred ** 20", "exponent")
    assert error.snippet == "20"
    error = _check_refusal("(y_true +\n  1j)", "complex")
    assert error.column == len("(y_true +\n  ") + 1
    error = _check_refusal("   y_true + )", "syntax")
    assert error.column == len("   y_true + ") + 1
    error = _check_refusal("abs(y_true, 'x')", "string")
    assert error.column == len("abs(y_true, ") + 1


@pytest.mark.parametrize(
    "source",
    ["1if y_true else 2", "0x1for", "1or y_true", "y_true+1and 2", "1in y_true", "1is 1", "1not in y_true",
     "0b1if", "0o7or", "1.5e3if", ".5else", "1_0if", "1jif", "y_true*2else", "1.real"],
)
def test_numbers_running_into_names_are_refused_without_warnings(source):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = _check_refusal(source, "number")
    assert caught == []
    assert source[error.column - 1].isdigit() or source[error.column - 1] == "."


def test_numbers_next_to_operators_and_names_in_words_are_fine():
    for source in ["y_true*2", "2*y_true", "1e5*y_true", "1E-5+y_true", "0x1F*y_true", "1_000*y_true",
                   ".5*y_true", "5.*y_true", "1.e3 + y_true", "pow(y_true, 2)", "y_true**-1"]:
        compile_loss(source)
    assert compile_expression("x2e5 * 2", tensors=("x2e5",), params=()).tensors_used == {"x2e5"}


def test_functions_are_not_evaluated_through_python_builtins(monkeypatch):
    """Compiling and running an expression never calls eval/exec."""

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    expression = None
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "eval", forbidden)
        patch.setattr(builtins, "exec", forbidden)
        expression = compile_loss(HUBER)
        value = expression({"y_true": Y_TRUE, "y_pred": Y_PRED}, {"delta": 1.0})
    np.testing.assert_allclose(np.asarray(value), np.asarray(keras.losses.huber(Y_TRUE, Y_PRED, delta=1.0)))


@pytest.mark.parametrize("module", [expressions, expression_rows, expression_shapes], ids=lambda m: m.__name__)
def test_module_never_calls_code_execution_builtins(module):
    tree = ast.parse(pathlib.Path(module.__file__).read_text(encoding="utf-8"))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "getattr", "setattr", "__import__", "globals", "vars"}


def test_compiling_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from lossd_server.losses.expressions import compile_expression\n"
        f"compile_expression({HUBER!r}, tensors=['y_true', 'y_pred'], params=['delta'])\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_module_docstring_documents_every_function():
    doc = expressions.__doc__
    for spec in FUNCTIONS.values():
        assert f"``{spec.signature}`` -- {spec.doc}." in doc
    assert "default axis is -1" in doc
    for limit in (MAX_LENGTH, MAX_DEPTH, MAX_NODES):
        assert f"({limit:,})" in doc or f"({limit})" in doc


# --------------------------------------------------------------------------
# Property-based tests
# --------------------------------------------------------------------------

SOUP_TOKENS = [
    "y_true", "y_pred", "delta", "abs", "mean", "where", "clip", "pow", "axis", "keepdims",
    "__class__", "__import__", "os", "x", "_", "lambda", "if", "else", "for", "in", "not", "and",
    "or", "is", "True", "None", "e", "j", "1", "0", "9", "1e5", "0x", ".", "..", "'", '"', "f",
    "b", "(", ")", "[", "]", "{", "}", ",", ":", ":=", "=", "==", "<", "<=", ">", "!=", "+", "-",
    "*", "**", "/", "//", "%", "@", "~", "&", "|", "^", "<<", ";", "\\", "#", " ", "\n", "\t",
]
SOUP_SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _check_soup(source: str) -> None:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            expression = compile_loss(source)
        except ExpressionError as error:
            assert str(error).startswith("expression refused")
        else:
            assert expression.tensors_used <= set(TENSORS)
            assert expression.params_used <= set(PARAMS)
    assert time.perf_counter() - start < REFUSAL_SECONDS
    # User text must not make the parser print warnings.
    assert [str(w.message) for w in caught] == []


@SOUP_SETTINGS
@given(st.lists(st.sampled_from(SOUP_TOKENS), max_size=60).map("".join))
def test_token_soup_is_accepted_or_refused_cleanly(source):
    _check_soup(source)


@SOUP_SETTINGS
@given(st.text(max_size=200))
def test_random_text_is_accepted_or_refused_cleanly(source):
    _check_soup(source)


# Valid expressions, each generated together with a NumPy function computing
# its documented meaning. Items are (source, numpy function, reads a tensor).

EPS = 1e-7
ARG_T = np.array([[0.3, -1.2, 2.0], [0.0, 1.5, -0.4]])
ARG_P = np.array([[0.9, -0.2, 1.0], [-2.5, 0.5, 0.25]])
ARG_DELTA = 0.75

UNARY_NUMPY = {
    "abs": np.abs,
    "square": np.square,
    "sqrt": np.sqrt,
    "log": np.log,
    "exp": np.exp,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0, x),
    "relu": lambda x: np.maximum(x, 0),
    "negative": np.negative,
}
REDUCE_NUMPY = {
    "mean": lambda x, axis: np.mean(x, axis=axis, keepdims=True),
    "sum": lambda x, axis: np.sum(x, axis=axis, keepdims=True),
    "max": lambda x, axis: np.max(x, axis=axis, keepdims=True),
    "min": lambda x, axis: np.min(x, axis=axis, keepdims=True),
    "logsumexp": lambda x, axis: _np_logsumexp(x, axis, keepdims=True),
}
AXES = [-1, 0, 1, -2, (0, 1), None]
BINARY_NUMPY = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}
COMPARE_NUMPY = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
                 "==": np.equal, "!=": np.not_equal}


def _literal(value: float) -> str:
    return f"({value!r})" if math.copysign(1.0, value) < 0 else repr(value)


leaves = st.one_of(
    st.just(("y_true", lambda: ARG_T, True)),
    st.just(("y_pred", lambda: ARG_P, True)),
    st.just(("delta", lambda: np.float64(ARG_DELTA), False)),
    st.just(("epsilon()", lambda: np.float64(EPS), False)),
    st.just(("pi", lambda: np.float64(math.pi), False)),
    st.floats(-5, 5, allow_nan=False, width=32).map(lambda v: (_literal(v), lambda: np.float64(v), False)),
    st.integers(-3, 3).map(lambda v: (_literal(v), lambda: np.float64(v), False)),
)
# Discontinuous operations (comparisons, sign) only see leaves, so a last-bit
# difference between NumPy's and the backend's transcendental functions cannot
# flip a branch.
conditions = st.recursive(
    st.builds(
        lambda a, op, b: (f"({a[0]} {op} {b[0]})", lambda: COMPARE_NUMPY[op](a[1](), b[1]())),
        leaves, st.sampled_from(sorted(COMPARE_NUMPY)), leaves,
    )
    | st.builds(
        lambda a, b, c: (f"({a[0]} < {b[0]} <= {c[0]})",
                         lambda: (a[1]() < b[1]()) & (b[1]() <= c[1]())),
        leaves, leaves, leaves,
    ),
    lambda inner: st.builds(
        lambda a, op, b: (f"({a[0]} {op} {b[0]})",
                          lambda: (a[1]() & b[1]()) if op == "and" else (a[1]() | b[1]())),
        inner, st.sampled_from(["and", "or"]), inner,
    )
    | inner.map(lambda a: (f"(not {a[0]})", lambda: ~np.asarray(a[1]()))),
    max_leaves=3,
)


def _extend(inner):
    tensorish = inner.filter(lambda item: item[2])
    return st.one_of(
        st.builds(
            lambda name, a: (f"{name}({a[0]})", lambda: UNARY_NUMPY[name](a[1]()), a[2]),
            st.sampled_from(sorted(UNARY_NUMPY)), inner,
        ),
        st.builds(
            lambda a, op, b: (f"({a[0]} {op} {b[0]})", lambda: BINARY_NUMPY[op](a[1](), b[1]()), a[2] or b[2]),
            inner, st.sampled_from(sorted(BINARY_NUMPY)), inner,
        ),
        inner.map(lambda a: (f"(-{a[0]})", lambda: -a[1](), a[2])),
        st.builds(
            lambda a, k, form: (
                f"({a[0]} ** {_literal(k)})" if form == "op" else f"pow({a[0]}, {k!r})",
                lambda: np.power(a[1](), float(k)),
                a[2],
            ),
            inner, st.sampled_from([-3, -2, -1, 0, 1, 2, 3, 0.5, -0.5, 1.5, 16]), st.sampled_from(["op", "call"]),
        ),
        st.builds(
            lambda a: (f"(abs({a[0]}) ** delta)", lambda: np.abs(a[1]()) ** ARG_DELTA, a[2]), inner
        ),
        st.builds(
            lambda name, a, b: (f"{name}({a[0]}, {b[0]})",
                                lambda: (np.maximum if name == "maximum" else np.minimum)(a[1](), b[1]()),
                                a[2] or b[2]),
            st.sampled_from(["maximum", "minimum"]), inner, inner,
        ),
        st.builds(
            lambda a, b, c: (f"clip({a[0]}, {b[0]}, {c[0]})",
                             lambda: np.minimum(np.maximum(a[1](), b[1]()), c[1]()),
                             a[2] or b[2] or c[2]),
            inner, inner, inner,
        ),
        st.builds(
            lambda cond, a, b: (f"where({cond[0]}, {a[0]}, {b[0]})",
                                lambda: np.where(cond[1](), a[1](), b[1]()),
                                a[2] or b[2]),
            conditions, inner, inner,
        ),
        st.builds(
            lambda leaf: (f"sign({leaf[0]})", lambda: np.sign(leaf[1]()), leaf[2]), leaves
        ),
        st.builds(
            lambda name, a, axis: (f"{name}({a[0]}, axis={axis!r}, keepdims=True)",
                                   lambda: REDUCE_NUMPY[name](a[1](), axis), True),
            st.sampled_from(sorted(REDUCE_NUMPY)), tensorish, st.sampled_from(AXES),
        ),
        st.builds(
            lambda log, a, axis: (f"{'log_' if log else ''}softmax({a[0]}, axis={axis})",
                                  lambda: (np.log if log else np.asarray)(_np_softmax(a[1](), axis)), True),
            st.booleans(), tensorish, st.sampled_from([-1, 0, 1, -2]),
        ),
    )


valid_bodies = st.recursive(leaves, _extend, max_leaves=10)


@st.composite
def valid_expressions(draw):
    source, reference, reads_tensor = draw(valid_bodies)
    if reads_tensor and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(REDUCE_NUMPY)))
        axis = draw(st.sampled_from(AXES))
        keepdims = draw(st.booleans())
        body = reference
        source = f"{name}({source}, axis={axis!r}, keepdims={keepdims})"

        def reference():
            result = REDUCE_NUMPY[name](body(), axis)
            if not keepdims:
                result = np.squeeze(result, axis=axis if axis is not None else (0, 1))
            return result

    return source, reference


def _tree_size(source: str) -> tuple[int, int]:
    """(depth, node count) of the expressions in ``source``, as the limits count them."""
    best_depth, count = 0, 0
    stack = [(ast.parse(source, mode="eval").body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, ast.expr):
            count += 1
            best_depth = max(best_depth, depth)
            depth += 1
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))
    return best_depth, count


# Generated softmaxes may run over an axis of size 1, which keras warns about.
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis")
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_expressions())
def test_valid_expressions_compile_and_match_numpy(case):
    source, reference = case
    depth, count = _tree_size(source)
    brackets = max(np.cumsum([{"(": 1, ")": -1}.get(c, 0) for c in source]))
    within_limits = len(source) <= MAX_LENGTH and depth <= MAX_DEPTH and brackets <= MAX_DEPTH and count <= MAX_NODES
    if not within_limits:
        with pytest.raises(ExpressionError, match="limit|parts"):
            compile_loss(source)
        return

    expression = compile_loss(source)
    actual = np.asarray(expression({"y_true": ARG_T, "y_pred": ARG_P}, {"delta": ARG_DELTA}))
    with np.errstate(all="ignore"):
        expected = np.asarray(reference(), dtype=np.float64)

    assert actual.shape == expected.shape
    # Where NumPy's value is finite the backend must agree closely; where it is
    # not (log of a negative, overflow) the precise non-finite value may differ.
    finite = np.isfinite(expected)
    if expression.tensors_used:
        assert actual.dtype == np.float64
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-6, atol=1e-9)
    else:
        # Only numbers and parameters: computed in keras' floatx (float32).
        assert actual.dtype == np.dtype(keras.config.floatx())
        finite &= np.abs(expected) < 1e30  # beyond float32's range
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)
