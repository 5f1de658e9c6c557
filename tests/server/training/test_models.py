"""Model presets and optimizers: parameters checked at creation time, the
VAE built, trained, saved and loaded for real with Keras."""

from __future__ import annotations

import numpy as np
import pytest

from lossd_server.errors import InvalidArgument
from lossd_server.training import models


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
