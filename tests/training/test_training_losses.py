"""Model presets, training losses and optimizers: checked at creation time,
built for real with Keras."""

from __future__ import annotations

import numpy as np
import pytest

from lossd_server.errors import InvalidArgument
from lossd_server.losses.registry import default_registry
from lossd_server.training import models
from lossd_server.training.losses import build_training_loss, resolve_training_loss


@pytest.fixture(scope="module")
def registry():
    from lossd_server.losses.custom import full_registry

    return full_registry(plugins=False)


@pytest.mark.parametrize("preset, params, reason", [
    ("resnet", {}, "UNKNOWN_MODEL"),
    ("cnn", {"filters": [32, "x"]}, "BAD_MODEL_PARAMETER"),
    ("cnn", {"dropout": 1.5}, "BAD_MODEL_PARAMETER"),
    ("cnn", {"units": 3}, "BAD_MODEL_PARAMETER"),
    ("mlp", {"activation": "swishy"}, "BAD_MODEL_PARAMETER"),
    ("vae", {"filters": [8, 8, 8, 8]}, "INCOMPATIBLE_DATASET"),  # 8x8 images cannot be halved 4 times
])
def test_bad_model_parameters(preset, params, reason):
    with pytest.raises(InvalidArgument) as exc:
        models.resolve_model_params(preset, params, (8, 8, 1))
    assert exc.value.reason == reason


def test_struct_numbers_become_ints():
    params = models.resolve_model_params("cnn", {"filters": [16.0, 32.0], "kernel_size": 3.0}, (8, 8, 1))
    assert params["filters"] == [16, 32] and isinstance(params["kernel_size"], int)


@pytest.mark.parametrize("spec, kind, reason", [
    ({"name": "categorical_crossentropy"}, "classifier", "INCOMPATIBLE_LOSS"),  # one-hot loss, integer labels
    ({"name": "mse"}, "classifier", "INCOMPATIBLE_LOSS"),
    ({"name": "sparse_categorical_crossentropy"}, "generator", "INCOMPATIBLE_LOSS"),
    ({"name": "bce", "params": {"from_logits": True}}, "generator", "INCOMPATIBLE_LOSS"),
    ({"name": "hubre"}, "classifier", "UNKNOWN_LOSS"),
    ({"name": "scce", "params": {"delta": 1.0}}, "classifier", "UNKNOWN_PARAMETER"),
    ({"expression": "mean(y_pred.shape)"}, "classifier", "BAD_EXPRESSION"),
    ({"name": "vae_kl"}, "classifier", "INCOMPATIBLE_LOSS"),  # reads z_mean, z_log_var
    ({"terms": [{"loss": {"name": "scce"}}, {"loss": {"expression": "mean(square(y_true - y_pred))"}}]},
     "classifier", "INCOMPATIBLE_LOSS"),  # class indices for one term, one-hot targets for the other
    ({"terms": [{"loss": {"name": "mse"}, "inputs": ["x", "x_hat"]}]}, "classifier", "INCOMPATIBLE_LOSS"),
    ({"terms": [{"loss": {"name": "mse"}}]}, "generator", "INCOMPATIBLE_LOSS"),
])
def test_losses_that_cannot_work_are_refused(registry, spec, kind, reason):
    with pytest.raises(InvalidArgument) as exc:
        resolve_training_loss(spec, registry, kind)
    assert exc.value.reason == reason


def test_default_losses(registry):
    assert resolve_training_loss({}, registry, "classifier")["name"] == "sparse_categorical_crossentropy"
    assert resolve_training_loss(None, registry, "generator") is None
    assert resolve_training_loss({"name": "mse"}, registry, "generator")["name"] == "mean_squared_error"


def test_build_training_loss_matches_keras(registry):
    import keras

    loss = build_training_loss({"name": "scce", "params": {"from_logits": True}}, registry)
    y, logits = np.array([1, 0]), np.array([[0.5, 2.0], [1.0, -1.0]], np.float32)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(float(loss(y, logits)), float(expected), rtol=1e-6)


@pytest.mark.parametrize("spec, reason", [
    ({"name": "adamm"}, "UNKNOWN_OPTIMIZER"),
    ({"name": "sgd", "params": {"momentun": 0.9}}, "BAD_OPTIMIZER_PARAMETER"),
    ({"name": "adam", "learning_rate": -1.0}, "BAD_OPTIMIZER_PARAMETER"),
])
def test_bad_optimizers(spec, reason):
    with pytest.raises(InvalidArgument) as exc:
        models.resolve_optimizer(spec)
    assert exc.value.reason == reason


def test_vae_trains_saves_and_loads(tmp_path):
    """The VAE's loss is reconstruction + beta * KL; it goes down on real
    digits, and the .keras file restores the same decoder."""
    import keras

    from lossd_server.training.datasets import load_digits

    keras.utils.set_random_seed(0)
    x, _, _ = load_digits()
    vae = models.build_model("vae", models.resolve_model_params("vae", {}, (8, 8, 1)), (8, 8, 1), 10, seed=0)
    vae.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = vae.fit(x[:512], epochs=3, batch_size=64, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    np.testing.assert_allclose(history["loss"], np.array(history["reconstruction_loss"]) + np.array(history["kl_loss"]),
                               rtol=1e-3)
    vae.save(tmp_path / "vae.keras")
    loaded = models.load_model(tmp_path / "vae.keras")
    z = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded.decoder(z)), np.asarray(vae.decoder(z)), atol=1e-6)
    images = np.asarray(loaded.generate(5, seed=1))
    assert images.shape == (5, 8, 8, 1) and 0 <= images.min() and images.max() <= 1


def test_expression_and_composite_training_losses_match_keras(registry):
    """An expression loss gets one-hot targets; a composite sums its weighted terms."""
    import keras

    from lossd_server.training.losses import ONE_HOT, SPARSE, label_format

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=16)
    probs = rng.dirichlet(np.ones(10), size=16).astype("float32")
    onehot = np.eye(10, dtype="float32")[labels]
    ce = "sum(-y_true * log(clip(y_pred, epsilon(), 1.0)), axis=-1)"
    expr = resolve_training_loss({"expression": ce}, registry, "classifier")
    assert label_format(expr, registry) == ONE_HOT
    got = build_training_loss(expr, registry)(onehot, probs)
    want = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)

    composite = resolve_training_loss({"terms": [
        {"loss": {"name": "scce"}},
        {"loss": {"name": "categorical_generalized_cross_entropy", "params": {"q": 0.7}}, "weight": 0.5}]},
        registry, "classifier")
    assert label_format(composite, registry) == SPARSE
    got = build_training_loss(composite, registry)(labels, probs)
    want = (keras.losses.SparseCategoricalCrossentropy()(labels, probs)
            + 0.5 * keras.losses.CategoricalGeneralizedCrossEntropy(q=0.7)(labels, probs))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
