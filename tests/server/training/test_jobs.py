"""TrainingService end to end: a real server on a free port, real job
processes training real models on real digits (tiny runs)."""

from __future__ import annotations

import json
import tarfile
import threading
import time

import grpc
import numpy as np
import pytest

import lossd
from digit_files import digits_uint8, zip_of_class_folders


def _states(events):
    return [e.state for e in events if e.kind == "state"]


def test_job_runs_and_reports_to_every_watcher(tclient):
    job = tclient.create_job("cnn", "digits", epochs=2, steps_per_epoch=4, batch_size=16)
    assert job.name.startswith("jobs/") and job.state in ("queued", "running")
    seen: dict[int, list] = {}

    def watch(i):
        seen[i] = list(tclient.watch(job))

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    late = list(tclient.watch(job))  # after the end: replayed from the start
    assert [e.sequence for e in seen[0]] == [e.sequence for e in seen[1]] == [e.sequence for e in late]
    assert _states(late) == ["queued", "running", "succeeded"]
    epochs = [e for e in late if e.kind == "epoch"]
    assert [e.epoch for e in epochs] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(epochs[0].metrics)
    assert all(e.examples == 64 and e.examples_per_second > 0 for e in epochs)
    progress = [e for e in late if e.kind == "progress"]
    assert progress and all(p.examples_per_second > 0 and np.isfinite(p.loss) for p in progress)
    assert progress[0].eta_seconds > 0
    done = tclient.get_job(job)
    assert done.state == "succeeded" and done.progress["epochs_completed"] == 2
    assert done.start_time and done.end_time and done.create_time <= done.start_time <= done.end_time


def test_request_id_makes_create_idempotent(tclient):
    a = tclient.create_job("mlp", "digits", epochs=1, steps_per_epoch=1, request_id="retry-me")
    b = tclient.create_job("mlp", "digits", epochs=1, steps_per_epoch=1, request_id="retry-me")
    assert a.name == b.name
    assert sum(j.request_id == "retry-me" for j in tclient.list_jobs()) == 1
    tclient.wait(a, progress=False)


def test_list_pages_and_filters(tclient, cnn_job):
    jobs = tclient.list_jobs(page_size=1)
    assert len(jobs) == len({j.name for j in jobs}) >= 1
    assert cnn_job.name in {j.name for j in tclient.list_jobs(["succeeded"], page_size=1)}
    assert cnn_job.name not in {j.name for j in tclient.list_jobs(["failed"])}


def test_artifacts_download(tclient, cnn_job, tmp_path):
    import keras

    model = tclient.download(cnn_job, tmp_path, artifact="model")
    assert model.suffix == ".keras"
    loaded = keras.saving.load_model(model, compile=False)
    assert loaded.output_shape == (None, 10)
    history = json.loads(tclient.download(cnn_job, tmp_path / "h.json", artifact="history").read_text())
    assert len(history["loss"]) == 2 and len(history["val_accuracy"]) == 2
    logs = tclient.download(cnn_job, tmp_path, artifact="tensorboard")
    with tarfile.open(logs) as tar:
        names = tar.getnames()
    assert any("train/events.out.tfevents" in n for n in names)
    assert any("validation/events.out.tfevents" in n for n in names)


def test_downloaded_model_loads_in_plain_keras(tclient, cnn_job, tmp_path):
    # A fresh interpreter that imports only Keras and numpy (nothing of
    # lossd's registers a class there) loads the file with Keras's default
    # call, and its outputs are those of the model the server loads.
    import subprocess
    import sys

    model = tclient.download(cnn_job, tmp_path, artifact="model")
    x, _ = digits_uint8(16)
    np.save(tmp_path / "x.npy", (x / 255.0).astype(np.float32)[..., None])
    script = (
        "import sys, numpy as np, keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "assert not [k for k in sys.modules if k.startswith('lossd')], 'lossd was imported'\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n")
    done = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "x.npy"),
                           str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 0, done.stderr[-3000:]
    from lossd_server.training.models import load_model

    served = load_model(model).predict(np.load(tmp_path / "x.npy"), verbose=0)
    assert served.shape == (16, 10)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), served, atol=1e-6)


def test_predict_returns_probabilities(tclient, cnn_job):
    x, y = digits_uint8(64)
    probabilities = tclient.predict(cnn_job, x)  # uint8, no channel axis
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    same = tclient.predict(cnn_job, (x / 255.0).astype(np.float32)[..., None])
    np.testing.assert_allclose(same, probabilities, atol=1e-5)
    with pytest.raises(lossd.LossdError) as exc:
        tclient.predict(cnn_job, np.zeros((2, 9, 9), np.uint8))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.reason == "SHAPE_MISMATCH"
    assert "8, 8, 1" in exc.value.message and "[2, 9, 9]" in exc.value.message
    with pytest.raises(lossd.LossdError) as exc:
        tclient.generate(cnn_job, 4)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and exc.value.reason == "WRONG_MODEL_KIND"


def test_vae_lowers_its_loss_and_generates(tclient, tmp_path):
    job = tclient.create_job("vae", "digits", epochs=3, batch_size=64, learning_rate=3e-3)
    job = tclient.wait(job, progress=False)
    assert job.state == "succeeded", job.error
    history = json.loads(tclient.download(job, tmp_path / "h.json", artifact="history").read_text())
    assert history["loss"][-1] < history["loss"][0]
    assert {"reconstruction_loss", "kl_loss", "val_loss"} <= set(history)
    images = tclient.generate(job, 16, seed=3)
    assert images.shape == (16, 8, 8, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
    grid = lossd.save_image_grid(images, tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(grid).size == (4 * 37, 4 * 37)  # 4x4 tiles of 8 px, 1 px padding, scale 4


def test_cancel_reaches_cancelled_within_two_seconds(tclient):
    job = tclient.create_job("cnn", "digits", epochs=1000, batch_size=8)
    for event in tclient.watch(job):
        if event.kind == "progress":  # training for real
            break
    start = time.monotonic()
    cancelled = tclient.cancel_job(job)
    elapsed = time.monotonic() - start
    assert cancelled.state == "cancelled" and elapsed < 2.0, elapsed
    with pytest.raises(lossd.LossdError) as exc:
        tclient.cancel_job(job)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and exc.value.reason == "JOB_ALREADY_FINISHED"


def test_cancel_a_queued_job(training_server, tclient):
    # Fill both slots with long jobs so the third waits in the queue.
    blockers = [tclient.create_job("mlp", "digits", epochs=1000, batch_size=8) for _ in range(2)]
    queued = tclient.create_job("mlp", "digits", epochs=1)
    try:
        assert tclient.get_job(queued).state == "queued"
        assert tclient.cancel_job(queued).state == "cancelled"
        assert _states(tclient.watch(queued)) == ["queued", "cancelled"]
    finally:
        for job in blockers:
            tclient.cancel_job(job)


def test_non_finite_loss_fails_the_job_with_the_step(tclient):
    job = tclient.create_job("mlp", "digits", epochs=2, optimizer="sgd", learning_rate=1e30)
    job = tclient.wait(job, progress=False)
    assert job.state == "failed"
    assert job.error.reason == "NON_FINITE_LOSS"
    step = int(job.error.metadata["step"])
    assert step >= 1 and f"step {step}" in job.error.message


def test_unknown_job(tclient):
    with pytest.raises(lossd.LossdError) as exc:
        tclient.get_job("jobs/does-not-exist")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and exc.value.reason == "JOB_NOT_FOUND"


@pytest.mark.parametrize("kwargs, reason, words", [
    ({"model": "resnet"}, "UNKNOWN_MODEL", "cnn"),
    ({"dataset": "imagenet"}, "UNKNOWN_DATASET", "digits"),
    ({"loss": "hubber"}, "UNKNOWN_LOSS", "huber"),
    ({"loss": "categorical_crossentropy"}, "INCOMPATIBLE_LOSS", "sparse_categorical_crossentropy"),
    ({"optimizer": "adamm"}, "UNKNOWN_OPTIMIZER", "adam"),
    ({"model_params": {"dropout": 2}}, "BAD_MODEL_PARAMETER", "dropout"),
    ({"metrics": ["acuracy"]}, "BAD_METRIC", "acuracy"),
    ({"validation_split": 1.0}, "BAD_JOB_SPEC", "[0, 1)"),
    ({"dataset": "folder:../../etc"}, "PATH_OUTSIDE_ROOT", "outside"),
])
def test_bad_specs_are_refused_at_create_time(tclient, kwargs, reason, words):
    kwargs = {"model": "cnn", "dataset": "digits", **kwargs}
    with pytest.raises(lossd.LossdError) as exc:
        tclient.create_job(kwargs.pop("model"), kwargs.pop("dataset"), **kwargs)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == reason and words in exc.value.message


def test_upload_npz_then_train_on_it(tclient, tmp_path):
    x, y = digits_uint8(300)
    np.savez(tmp_path / "mydigits.npz", x=x, y=y)
    info = tclient.upload_dataset(tmp_path / "mydigits.npz")
    assert (info.name, info.source, info.examples, info.image_shape) == ("mydigits", "upload", 300, (8, 8, 1))
    assert "mydigits" in {d.name for d in tclient.list_datasets()}
    job = tclient.wait(tclient.create_job("mlp", "mydigits", epochs=1, steps_per_epoch=2), progress=False)
    assert job.state == "succeeded", job.error


def test_upload_zip_with_a_corrupt_image_names_it(tclient, tmp_path):
    path = zip_of_class_folders(tmp_path / "bad.zip", 20, corrupt="digits/7/oops.png")
    with pytest.raises(lossd.LossdError) as exc:
        tclient.upload_dataset(path)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.reason == "CORRUPT_IMAGE"
    assert "digits/7/oops.png" in exc.value.message
    info = tclient.upload_dataset(zip_of_class_folders(tmp_path / "good.zip", 30), name="zipped")
    assert info.examples == 30 and info.image_shape == (8, 8, 1)


def test_upload_over_the_limit_is_refused(tclient, tmp_path):
    path = tmp_path / "big.npz"
    path.write_bytes(b"\0" * (3 << 20))  # the test server's limit is 2 MiB
    with pytest.raises(lossd.LossdError) as exc:
        tclient.upload_dataset(path)
    assert exc.value.reason == "UPLOAD_TOO_LARGE" and "2,097,152" in exc.value.message


def test_folder_dataset_under_the_root(tclient):
    job = tclient.wait(tclient.create_job("cnn", "folder:small", epochs=1, steps_per_epoch=1), progress=False)
    assert job.state == "succeeded", job.error


def test_training_metrics(training_server, cnn_job):
    registry = training_server.metrics.registry
    assert registry.get_sample_value("lossd_training_epochs_total") >= 2
    assert registry.get_sample_value("lossd_training_examples_total") >= 2 * 6 * 32
    assert registry.get_sample_value("lossd_training_jobs", {"state": "succeeded"}) >= 1
    assert registry.get_sample_value("lossd_training_job_duration_seconds_count", {"state": "succeeded"}) >= 1
    assert registry.get_sample_value("lossd_training_loss", {"split": "validation"}) > 0


@pytest.mark.parametrize("preset, epochs, batch_size, learning_rate", [
    ("cnn", 10, 32, None), ("mlp", 10, 32, None), ("vae", 60, 32, None),
    ("diffusion", 100, 64, 2e-3),  # 10 epochs at Adam's 1e-3 drew digits a classifier read 22 % of the time
])
def test_each_preset_trains_with_its_own_defaults_unless_the_spec_says_otherwise(
        tclient, preset, epochs, batch_size, learning_rate):
    job = tclient.cancel_job(tclient.create_job(preset, "digits"))
    assert (job.spec["epochs"], job.spec["batch_size"]) == (epochs, batch_size)
    assert job.spec["optimizer"].get("learning_rate") == (pytest.approx(learning_rate) if learning_rate else None)
    # What the spec names wins; another optimizer keeps its own learning rate.
    job = tclient.cancel_job(tclient.create_job(preset, "digits", epochs=3, batch_size=8, optimizer="sgd"))
    assert (job.spec["epochs"], job.spec["batch_size"], job.spec["optimizer"].get("learning_rate")) == (3, 8, None)
    job = tclient.cancel_job(tclient.create_job(preset, "digits", learning_rate=1e-2))
    assert job.spec["optimizer"].get("learning_rate") == pytest.approx(1e-2)
