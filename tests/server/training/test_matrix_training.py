"""Training with ``matrix_crossentropy``: the job keeps the matrix as state,
updated on every training batch, reports it, checkpoints it and restores it
on resume; and it trains a cnn on digits as well as crossentropy does."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lossd
from tests.servers import kill_group, serve_process

pytestmark = pytest.mark.slow

# Small enough for a test (both jobs train side by side on the test server's
# two slots); bench/quality.py has the same comparison at the default epochs.
QUICK = dict(epochs=4, batch_size=32, seed=3)


def test_matrix_job_trains_as_well_as_crossentropy(tclient, training_address, tmp_path):
    matrix = tclient.create_job("cnn", "digits", loss="matrix_crossentropy", **QUICK)
    plain = tclient.create_job("cnn", "digits", loss="sparse_categorical_crossentropy", **QUICK)
    matrix, plain = tclient.wait(matrix, progress=False), tclient.wait(plain, progress=False)
    assert matrix.state == "succeeded", matrix.error
    assert plain.state == "succeeded", plain.error
    got, want = matrix.progress["metrics"]["val_accuracy"], plain.progress["metrics"]["val_accuracy"]
    print(f"cnn on digits, {QUICK}: val_accuracy matrix_crossentropy={got:.4f}, crossentropy={want:.4f}")
    assert got >= want - 0.01

    # The state is reported: a 10 x 10 matrix of rates, rows summing to 1,
    # mostly on the diagonal once the classifier is good, moving during training.
    final = matrix.progress["loss_state"]["matrix"]
    assert final.shape == (10, 10)
    np.testing.assert_allclose(final.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.diag(final) > 0.5), final.round(2)
    events = [e for e in tclient.watch(matrix) if e.kind == "progress"]
    states = [e.loss_state["matrix"] for e in events]
    assert len(states) >= 2 and all(s.shape == (10, 10) for s in states)
    assert not np.allclose(states[0], np.eye(10)) and not np.allclose(states[0], final)
    np.testing.assert_array_equal(states[-1], final)
    assert plain.progress["loss_state"] == {}

    # `lossd jobs plot` draws the matrix as a heat map right of the loss curves.
    from PIL import Image

    from lossd import cli
    from lossd._cli_training import HEAT_MAP_SIZE, heat_color

    out, plain_out = tmp_path / "matrix.png", tmp_path / "plain.png"
    assert cli.main(["jobs", "plot", matrix.id, "--address", training_address, "-o", str(out)]) == 0
    assert cli.main(["jobs", "plot", plain.id, "--address", training_address, "-o", str(plain_out)]) == 0
    with Image.open(out) as image, Image.open(plain_out) as plain_image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert image.width > plain_image.width
    cell = HEAT_MAP_SIZE / 10
    x0, y0 = plain_image.width + 40, 50  # where the first heat map starts
    for i in range(10):
        for j in (i, (i + 5) % 10):
            x, y = int(x0 + (j + 0.5) * cell), int(y0 + (i + 0.5) * cell)
            np.testing.assert_allclose(pixels[y, x], heat_color(final[i, j]), atol=1)


def test_generators_refuse_the_matrix_loss(tclient):
    with pytest.raises(lossd.LossdError) as exc:
        tclient.create_job("vae", "digits", loss="matrix_crossentropy", epochs=1)
    assert exc.value.code.name == "INVALID_ARGUMENT" and exc.value.reason == "INCOMPATIBLE_LOSS"
    assert "classifiers only" in exc.value.message


def test_killed_and_resumed_job_ends_with_the_same_matrix(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    spec = dict(loss="matrix_crossentropy", epochs=3, batch_size=16, seed=11)
    server, address = serve_process(data_dir, log)
    try:
        with lossd.Client(address, timeout=180) as client:
            whole = client.wait(client.create_job("cnn", "digits", **spec), progress=False)
            assert whole.state == "succeeded", whole.error
            job = client.create_job("cnn", "digits", **spec)
            for event in client.watch(job):
                if event.kind == "epoch" and event.epoch == 1:
                    break  # the first checkpoint, with the matrix, is on disk
        checkpoint = json.loads((data_dir / "jobs" / job.id / "checkpoint.json").read_text())
        assert np.asarray(checkpoint["loss_state"]["matrix"]).shape == (10, 10)
        kill_group(server)  # the server and its job process, as kill -9 of a machine would

        server, address = serve_process(data_dir, log)
        with lossd.Client(address, timeout=180) as client:
            resumed = client.wait(job, progress=False)
            assert resumed.state == "succeeded", resumed.error
            events = list(client.watch(job))
        assert any(e.kind == "message" and e.message.startswith("Resuming from the checkpoint") for e in events)
        np.testing.assert_array_equal(resumed.progress["loss_state"]["matrix"], whole.progress["loss_state"]["matrix"])
        assert resumed.progress["metrics"]["val_loss"] == pytest.approx(whole.progress["metrics"]["val_loss"],
                                                                        rel=1e-5)
    finally:
        kill_group(server)
