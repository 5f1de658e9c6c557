"""Custom losses drive training jobs: a registered expression loss and a
composite train a cnn on digits, end to end through the server."""

from __future__ import annotations

import numpy as np

import lossd
from tests.servers import PATIENCE

# Cross-entropy written by hand over one-hot targets (expression losses on a
# classifier get y_true one-hot, shaped like the softmax output).
CROSS_ENTROPY = "sum(-y_true * log(clip(y_pred, epsilon(), 1.0)), axis=-1)"


def _epoch_losses(client, job):
    return [e.metrics["loss"] for e in client.watch(job) if e.kind == "epoch"]


def test_registered_expression_loss_trains_a_cnn(tclient):
    tclient.register_loss("hand_ce", CROSS_ENTROPY, doc="Cross-entropy on one-hot targets.", replace=True)
    job = tclient.create_job("cnn", "digits", loss="hand_ce", epochs=3, steps_per_epoch=12, batch_size=32,
                             learning_rate=3e-3)
    # The job keeps the definition it was created with, even if the loss goes away.
    tclient.delete_loss("hand_ce")
    done = tclient.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    losses = _epoch_losses(tclient, job)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype("float32")
    probs = tclient.predict(job, images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_composite_loss_trains_a_cnn(tclient):
    loss = {"terms": [{"name": "sparse_categorical_crossentropy"},
                      {"name": "categorical_generalized_cross_entropy", "params": {"q": 0.7}, "weight": 0.5}]}
    job = tclient.create_job("cnn", "digits", loss=loss, epochs=2, steps_per_epoch=10, batch_size=32)
    done = tclient.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    losses = _epoch_losses(tclient, job)
    assert len(losses) == 2 and losses[-1] < losses[0], losses


def test_mixed_label_formats_are_refused_at_create(tclient):
    loss = {"terms": [{"name": "sparse_categorical_crossentropy"}, {"expression": CROSS_ENTROPY}]}
    try:
        tclient.create_job("cnn", "digits", loss=loss, epochs=1)
    except lossd.LossdError as error:
        assert error.reason == "INCOMPATIBLE_LOSS" and "label formats" in error.message
    else:
        raise AssertionError("a composite mixing class indices and one-hot targets was accepted")


def test_a_chosen_reconstruction_loss_trains_the_vae(tclient):
    """The VAE's reconstruction term is the planned loss with reduction none (per pixel)."""
    job = tclient.create_job("vae", "digits", loss="mse", epochs=2, steps_per_epoch=8, batch_size=64,
                             learning_rate=3e-3)
    done = tclient.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    epochs = [e.metrics for e in tclient.watch(job) if e.kind == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["reconstruction_loss"] < epochs[0]["reconstruction_loss"], epochs
