"""The thin client's API against the real in-process server, compared with
``keras.losses`` and ``tf.GradientTape`` in this process."""

from __future__ import annotations

import inspect
import json

import grpc
import numpy as np
import pytest

import lossd

keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402

RNG = np.random.default_rng(11)
MiB = 1 << 20

ISSUE_LOSSES = [
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "huber", "log_cosh", "binary_crossentropy", "binary_focal_crossentropy",
    "categorical_crossentropy", "categorical_focal_crossentropy", "sparse_categorical_crossentropy",
    "categorical_generalized_cross_entropy", "kl_divergence", "poisson", "hinge", "squared_hinge",
    "categorical_hinge", "cosine_similarity", "dice", "tversky", "circle", "ctc",
]
ISSUE_ALIASES = {"mse": "mean_squared_error", "mae": "mean_absolute_error",
                 "mape": "mean_absolute_percentage_error", "msle": "mean_squared_logarithmic_error",
                 "bce": "binary_crossentropy", "cce": "categorical_crossentropy", "kld": "kl_divergence",
                 "logcosh": "log_cosh"}
PARAM_TYPES = {"float", "int", "bool", "string", "int_or_null", "axis", "float_or_null"}


def data(shape=(8, 5), dtype=np.float32):
    return RNG.normal(size=shape).astype(dtype), RNG.normal(size=shape).astype(dtype)


# -- losses() -------------------------------------------------------------------

@pytest.fixture(scope="module")
def losses(address):
    with lossd.Client(address, timeout=60) as client:
        return {info.name: info for info in client.losses()}


def test_losses_lists_every_issue_loss_with_aliases(losses):
    assert set(ISSUE_LOSSES) <= set(losses), sorted(set(ISSUE_LOSSES) - set(losses))
    aliases = {alias: info.name for info in losses.values() for alias in info.aliases}
    for alias, name in ISSUE_ALIASES.items():
        assert aliases.get(alias) == name, f"alias {alias} -> {aliases.get(alias)}, expected {name}"


def test_every_loss_is_described(losses):
    for info in losses.values():
        assert isinstance(info, lossd.LossInfo)
        assert info.name and info.name == info.name.lower(), info.name
        assert info.doc and "\n" not in info.doc, f"{info.name}: doc {info.doc!r}"
        assert info.source in ("keras", "builtin", "plugin", "expression"), info
        assert info.inputs, info
        names = [p.name for p in info.parameters]
        assert len(names) == len(set(names)), f"{info.name}: duplicate parameters {names}"
        for p in info.parameters:
            assert isinstance(p, lossd.LossParameter)
            assert p.name and p.type in PARAM_TYPES, f"{info.name}.{p.name}: type {p.type!r}"
            json.dumps(p.default)  # a JSON value
            assert isinstance(p.doc, str)
            assert not {"reduction", "name", "dtype"} & {p.name}, f"{info.name} exposes {p.name}"


def test_huber_delta(losses):
    huber = losses["huber"]
    delta = next(p for p in huber.parameters if p.name == "delta")
    assert delta.default == 1.0 and isinstance(delta.default, float)
    assert delta.type == "float"
    assert delta.doc
    assert "huber_loss" in huber.aliases or "Huber" in huber.aliases


def test_parameter_defaults_are_keras_defaults(losses):
    checked = 0
    for info in losses.values():
        if info.source != "keras":
            continue
        cls = next((getattr(keras.losses, a) for a in info.aliases
                    if a[:1].isupper() and inspect.isclass(getattr(keras.losses, a, None))), None)
        assert cls is not None, f"{info.name}: no Keras class among aliases {info.aliases}"
        signature = inspect.signature(cls.__init__).parameters
        for p in info.parameters:
            assert p.name in signature, f"{info.name}.{p.name} is not a {cls.__name__} argument"
            default = signature[p.name].default
            default = None if default is inspect.Parameter.empty else default
            assert p.default == default, f"{info.name}.{p.name}: {p.default!r} != Keras {default!r}"
        checked += 1
    assert checked >= len(ISSUE_LOSSES)


# -- evaluate() -------------------------------------------------------------------

def test_evaluate_by_name(client):
    y_true, y_pred = data()
    result = client.evaluate("huber", y_true, y_pred)
    assert isinstance(result, lossd.EvaluateResult)
    assert isinstance(result.loss, np.ndarray) and result.loss.shape == () and result.loss.dtype == np.float32
    assert result.gradient is None and result.terms == {} and result.non_finite is False
    np.testing.assert_allclose(result.loss, keras.losses.Huber()(y_true, y_pred), rtol=1e-6)


def test_evaluate_by_alias(client):
    y_true, y_pred = data()
    result = client.evaluate("mse", y_true, y_pred)
    np.testing.assert_allclose(result.loss, keras.losses.MeanSquaredError()(y_true, y_pred), rtol=1e-6)


def test_evaluate_with_a_config_dict(client):
    y_true, y_pred = data()
    result = client.evaluate({"name": "huber", "params": {"delta": 0.5}}, y_true, y_pred)
    np.testing.assert_allclose(result.loss, keras.losses.Huber(delta=0.5)(y_true, y_pred), rtol=1e-6)
    assert not np.isclose(result.loss, keras.losses.Huber()(y_true, y_pred))


def test_params_argument(client):
    y_true, y_pred = data()
    result = client.evaluate("huber", y_true, y_pred, params={"delta": 2.0})
    np.testing.assert_allclose(result.loss, keras.losses.Huber(delta=2.0)(y_true, y_pred), rtol=1e-6)


def test_params_argument_merges_into_and_overrides_the_config(client):
    y_true = RNG.integers(0, 2, size=(8, 5)).astype(np.float32)
    logits = RNG.normal(size=(8, 5)).astype(np.float32)
    result = client.evaluate({"name": "bce", "params": {"from_logits": True, "label_smoothing": 0.3}},
                             y_true, logits, params={"label_smoothing": 0.1})
    expected = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)(y_true, logits)
    np.testing.assert_allclose(result.loss, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient(client, dtype):
    y_true, y_pred = data((6, 4), dtype)
    result = client.evaluate("huber", y_true, y_pred, params={"delta": 0.7}, gradient=True)
    value, grad = value_and_gradient(keras.losses.Huber(delta=0.7), y_true, y_pred)
    assert result.gradient.shape == y_pred.shape and result.gradient.dtype == dtype
    assert result.loss.dtype == dtype
    np.testing.assert_allclose(result.loss, value, rtol=1e-6)
    np.testing.assert_allclose(result.gradient, grad, rtol=1e-5, atol=1e-8)


def test_reduction_none_gives_per_sample_values(client):
    y_true, y_pred = data((7, 3, 4))
    result = client.evaluate("mae", y_true, y_pred, reduction="none", gradient=True)
    value, grad = value_and_gradient(keras.losses.MeanAbsoluteError(reduction="none"), y_true, y_pred)
    assert result.loss.shape == (7, 3) == value.shape
    np.testing.assert_allclose(result.loss, value, rtol=1e-6)
    np.testing.assert_allclose(result.gradient, grad, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"])
def test_reductions_with_sample_weight(client, reduction):
    y_true, y_pred = data((8, 3))
    sw = RNG.uniform(0.1, 2.0, size=8).astype(np.float32)
    result = client.evaluate("mse", y_true, y_pred, sample_weight=sw, reduction=reduction)
    expected = keras.losses.MeanSquaredError(reduction=reduction)(y_true, y_pred, sample_weight=sw)
    np.testing.assert_allclose(result.loss, expected, rtol=1e-6)


# A 1 us deadline fires only on a call that takes more than about a millisecond:
# gRPC lets a faster one (a warm 8x5 evaluation, ListLosses) complete most times.
SLOW_SHAPE = (200_000, 5)


def test_timeout_deadline_exceeded(client):
    y = np.ones(SLOW_SHAPE, np.float32)
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("huber", y, y, timeout=1e-6)
    assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert exc.value.reason == ""
    assert exc.value.message


def test_client_default_timeout(address):
    y = np.ones(SLOW_SHAPE, np.float32)
    with lossd.Client(address, timeout=1e-6) as client:
        with pytest.raises(lossd.LossdError) as exc:
            client.evaluate("huber", y, y)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A per-call timeout overrides the client's default.
        result = client.evaluate("huber", y[:8], y[:8], timeout=60)
    assert float(result.loss) == 0.0


def test_lossd_error_fields(client):
    y_true, y_pred = data()
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("hubr", y_true, y_pred)
    error = exc.value
    assert isinstance(error, Exception)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "UNKNOWN_LOSS"
    assert "'hubr'" in error.message and "Did you mean huber" in error.message
    assert error.metadata == {"loss": "hubr"}
    assert str(error) == f"INVALID_ARGUMENT UNKNOWN_LOSS: {error.message}"


def test_server_side_shape_check(client):
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate("mse", np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == "SHAPE_MISMATCH"
    assert "y_true.shape=[4, 3]" in exc.value.message and "y_pred.shape=[4, 2]" in exc.value.message


def test_request_id_metadata_is_sent(address):
    y_true, y_pred = data()
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "abc-123")]) as client:
        result = client.evaluate("mse", y_true, y_pred)
    np.testing.assert_allclose(result.loss, keras.losses.MeanSquaredError()(y_true, y_pred), rtol=1e-6)


# -- evaluate_many() ---------------------------------------------------------------

def test_evaluate_many_keeps_order_past_a_failure(client):
    batches = [data((4, 3)) for _ in range(5)]
    requests = [
        {"loss": "mse", "y_true": batches[0][0], "y_pred": batches[0][1]},
        {"loss": "huber", "y_true": batches[1][0], "y_pred": batches[1][1], "params": {"delta": 0.5}},
        {"loss": "hubr", "y_true": batches[2][0], "y_pred": batches[2][1]},
        {"loss": {"name": "mae"}, "y_true": batches[3][0], "y_pred": batches[3][1], "reduction": "none"},
        {"loss": "huber", "y_true": batches[4][0], "y_pred": batches[4][1], "gradient": True},
    ]
    out = list(client.evaluate_many(requests))
    assert len(out) == 5
    assert isinstance(out[2], lossd.LossdError)
    assert out[2].code == grpc.StatusCode.INVALID_ARGUMENT and out[2].reason == "UNKNOWN_LOSS"
    expected = [keras.losses.MeanSquaredError()(*batches[0]), keras.losses.Huber(delta=0.5)(*batches[1]), None,
                keras.losses.MeanAbsoluteError(reduction="none")(*batches[3]), keras.losses.Huber()(*batches[4])]
    for i in (0, 1, 3, 4):
        assert isinstance(out[i], lossd.EvaluateResult), out[i]
        np.testing.assert_allclose(out[i].loss, expected[i], rtol=1e-6, err_msg=f"request {i}")
    assert out[3].loss.shape == (4,)
    assert out[4].gradient.shape == (4, 3) and out[0].gradient is None


def test_evaluate_many_local_failure_in_the_middle(client):
    y_true, y_pred = data((4, 3))
    requests = [{"loss": "mse", "y_true": y_true, "y_pred": y_pred},
                {"loss": "mse", "y_true": y_true, "y_pred": y_pred.astype(np.int32)},
                {"loss": "mae", "y_true": y_true, "y_pred": y_pred}]
    out = []
    try:
        out.extend(client.evaluate_many(requests))
    except lossd.LossdError as error:
        out.append(error)
    errors = [o for o in out if isinstance(o, lossd.LossdError)]
    assert errors and all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors), errors
    assert errors[0].reason == "UNSUPPORTED_DTYPE", errors[0]


# -- automatic chunking ---------------------------------------------------------------

@pytest.fixture()
def small_client(address, monkeypatch):
    """A client limited to 1 MiB messages that records what it streams in chunks."""
    with lossd.Client(address, timeout=120, max_message_bytes=MiB) as client:
        sent = []
        chunked = client._losses.EvaluateChunked

        def spy(requests, **kwargs):
            def recorded():
                for message in requests:
                    sent.append(message.WhichOneof("kind"))
                    yield message
            return chunked(recorded(), **kwargs)

        monkeypatch.setattr(client._losses, "EvaluateChunked", spy)
        client.sent = sent
        yield client


ROWS = 250_000  # x 3 float32 = 3 MB per tensor, against a 1 MiB message limit


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(5)
    y_true = rng.normal(size=(ROWS, 3)).astype(np.float32)
    y_pred = rng.normal(size=(ROWS, 3)).astype(np.float32)
    sw = rng.uniform(0.0, 2.0, size=ROWS).astype(np.float32)
    return y_true, y_pred, sw


@pytest.mark.parametrize("reduction, weighted", [("sum", False), ("sum_over_batch_size", False),
                                                 ("mean_with_sample_weight", True), ("none", True)])
def test_large_tensors_are_chunked_automatically(small_client, big, reduction, weighted):
    y_true, y_pred, sw = big
    sw = sw if weighted else None
    assert y_pred.nbytes > 2 * MiB
    result = small_client.evaluate("mse", y_true, y_pred, sample_weight=sw, reduction=reduction, gradient=True)
    assert small_client.sent[0] == "header" and small_client.sent.count("chunk") >= 6, small_client.sent
    value, grad = value_and_gradient(
        lambda t, p: keras.losses.MeanSquaredError(reduction=reduction)(t, p, sample_weight=sw), y_true, y_pred)
    assert result.loss.shape == value.shape and result.loss.dtype == np.float32
    assert result.gradient.shape == y_pred.shape and result.gradient.dtype == np.float32
    np.testing.assert_allclose(result.loss, value, rtol=1e-4 if reduction != "none" else 1e-6)
    np.testing.assert_allclose(result.gradient, grad, rtol=1e-4, atol=1e-10)
    assert result.non_finite is False


def test_small_tensors_are_not_chunked(small_client):
    y_true, y_pred = data((100, 3))
    result = small_client.evaluate("mse", y_true, y_pred)
    assert small_client.sent == []
    np.testing.assert_allclose(result.loss, keras.losses.MeanSquaredError()(y_true, y_pred), rtol=1e-6)


@pytest.mark.parametrize("kwargs, reason, fragment", [
    ({"tensors": {"z_mean": np.zeros(4, np.float32)}}, "NOT_CHUNKABLE", "not extra named tensors"),
    ({"sample_weight": np.ones(1, np.float32)}, "NOT_CHUNKABLE", "Expected sample_weight.shape[0] == 250000"),
])
def test_client_refuses_to_chunk_what_it_cannot_slice(small_client, big, kwargs, reason, fragment):
    y_true, y_pred, _ = big
    with pytest.raises(lossd.LossdError) as exc:
        small_client.evaluate("mse", y_true, y_pred, **kwargs)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert exc.value.reason == reason, exc.value
    assert fragment in exc.value.message
    assert "chunk" not in small_client.sent


def test_client_refusing_to_chunk_sends_no_chunks(small_client, big):
    """What holds today: the call fails and no tensor data leaves the client."""
    y_true, y_pred, _ = big
    with pytest.raises(lossd.LossdError):
        small_client.evaluate("mse", y_true, y_pred, tensors={"z_mean": np.zeros(4, np.float32)})
    assert "chunk" not in small_client.sent
