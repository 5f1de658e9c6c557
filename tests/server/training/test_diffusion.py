"""The ``diffusion`` preset end to end: a real server trains a class-conditioned
denoiser on digits through a real job, and Generate samples it."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

import lossd
from tests.servers import PATIENCE


def test_diffusion_trains_through_a_job_and_its_loss_goes_down(tclient, diffusion_job, tmp_path):
    assert diffusion_job.state == "succeeded", diffusion_job.error
    assert diffusion_job.model_kind == "generator"
    assert diffusion_job.spec["loss"]["name"] in ("mse", "mean_squared_error")  # the default: MSE on the noise
    history = json.loads(tclient.download(diffusion_job, tmp_path / "h.json", artifact="history").read_text())
    assert len(history["loss"]) == 2 and history["loss"][-1] < history["loss"][0]
    assert "val_loss" in history
    kinds = [e.kind for e in tclient.watch(diffusion_job)]
    assert "progress" in kinds and kinds.count("epoch") == 2


@pytest.mark.parametrize("kwargs, reason", [
    ({"model_params": {"timesteps": 10}}, "BAD_MODEL_PARAMETER"),
    ({"model_params": {"filters": [4, 4, 4, 4]}}, "BAD_MODEL_PARAMETER"),  # at most 3 levels
    ({"loss": "sparse_categorical_crossentropy"}, "INCOMPATIBLE_LOSS"),  # the noise is no class label
])
def test_diffusion_specs_are_checked_at_create_time(tclient, kwargs, reason):
    with pytest.raises(lossd.LossdError) as exc:
        tclient.create_job("diffusion", "digits", **kwargs)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.reason == reason
    assert "Expected" in exc.value.message


GUIDANCE_SCALE = 1.0


def _mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def test_generate_returns_count_images_in_range_deterministic_for_a_seed(tclient, diffusion_job):
    images = tclient.generate(diffusion_job, 6, seed=5, prompt="7", steps=20)
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
    again = tclient.generate(diffusion_job, 6, seed=5, prompt="7", steps=20)
    np.testing.assert_array_equal(images, again)
    other_seed = tclient.generate(diffusion_job, 6, seed=6, prompt="7", steps=20)
    assert _mse(images, other_seed) > 1e-3
    every_class = tclient.generate(diffusion_job, 12, seed=5)  # no prompt: classes 0..9, 0, 1; default steps
    assert every_class.shape == (12, 8, 8, 1)


def test_the_prompt_changes_the_output(tclient, diffusion_job):
    # Two epochs teach the class embedding little (bench/quality.py measures
    # how well a longer run follows the prompt); any change shows the class
    # reaches the denoiser, where the same seed gives the same noise.
    zeros = tclient.generate(diffusion_job, 8, seed=2, prompt="0", steps=20)
    ones = tclient.generate(diffusion_job, 8, seed=2, prompt="1", steps=20)
    assert _mse(zeros, ones) > 1e-5
    np.testing.assert_array_equal(zeros, tclient.generate(diffusion_job, 8, seed=2, prompt="0", steps=20))


@pytest.mark.parametrize("kwargs, reason", [
    ({"prompt": "eleven"}, "UNKNOWN_CLASS"),
    ({"steps": 101}, "BAD_STEPS"),  # the default model has timesteps=100
    ({"steps": -1}, "BAD_STEPS"),
    ({"prompt": "3", "init_images": np.zeros((3, 8, 8, 1), np.float32), "init_weight": 1.0}, "SHAPE_MISMATCH"),
    ({"init_images": np.zeros((2, 5, 5, 1), np.float32), "init_weight": 1.0}, "SHAPE_MISMATCH"),
    ({"init_weight": 1.0}, "MISSING_TENSOR"),  # no init images to pull toward
    ({"guidance": {"name": "no_such_loss"}}, "UNKNOWN_LOSS"),  # the planner's own answer, as Evaluate gives it
    ({"init_images": np.zeros((1, 8, 8, 1)), "init_weight": -1.0}, "BAD_GUIDANCE"),
])
def test_bad_generate_requests_are_invalid_argument(tclient, diffusion_job, kwargs, reason):
    with pytest.raises(lossd.LossdError) as exc:
        tclient.generate(diffusion_job, 4, seed=1, **kwargs)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert exc.value.reason == reason
    assert "Expected" in exc.value.message and ("Received" in exc.value.message or reason == "UNKNOWN_LOSS")


def test_generation_cost_is_bounded_before_it_is_spent(training_server, tclient, diffusion_job):
    inference = training_server.training.inference
    limit = inference.max_pixel_steps
    inference.max_pixel_steps = 4 * 20 * 64 - 1  # one value short of 4 images x 20 steps x 8x8x1
    try:
        with pytest.raises(lossd.LossdError) as exc:
            tclient.generate(diffusion_job, 4, seed=1, steps=20)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.reason == "GENERATION_TOO_LARGE"
        assert "5120" in exc.value.message
        assert tclient.generate(diffusion_job, 4, seed=1, steps=19).shape == (4, 8, 8, 1)
    finally:
        inference.max_pixel_steps = limit


def test_a_model_without_classes_takes_no_prompt(tclient, vae_job):
    assert vae_job.state == "succeeded", vae_job.error
    assert tclient.generate(vae_job, 3, seed=1).shape == (3, 8, 8, 1)
    for kwargs in ({"prompt": "7"}, {"steps": 10}, {"init_images": np.zeros((3, 8, 8, 1)), "init_weight": 1.0}):
        with pytest.raises(lossd.LossdError) as exc:
            tclient.generate(vae_job, 3, seed=1, **kwargs)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.reason == "NOT_CONDITIONAL"
        assert "Expected" in exc.value.message and "Received" in exc.value.message


def test_cli_generate_writes_a_grid(training_address, diffusion_job, tmp_path, capsys):
    from PIL import Image

    from lossd import cli

    out, npy = tmp_path / "sevens.png", tmp_path / "sevens.npy"
    assert cli.main(["jobs", "generate", diffusion_job.name, "--address", training_address, "--prompt", "7",
                     "--count", "16", "--steps", "10", "--seed", "4", "-o", str(out), "--npy", str(npy)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out)
    # Progress on stderr (not a terminal: the first step, then the last when the images are in).
    lines = printed.err.splitlines()
    assert lines[0].startswith("step 1/10 [") and lines[-1].startswith("step 10/10 [" + "#" * 30 + "]"), lines
    assert "ETA" in lines[0] and "elapsed" in lines[-1]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (4 * 37, 4 * 37)  # 4x4 tiles of 8 px, 1 px padding, x4
    images = np.load(npy)
    with lossd.Client(training_address) as client:
        same = client.generate(diffusion_job, 16, seed=4, prompt="7", steps=10)
    np.testing.assert_array_equal(images, same)
    assert cli.main(["jobs", "generate", diffusion_job.name, "--address", training_address, "--prompt", "7",
                     "--count", "16", "--steps", "10", "--seed", "4", "-o", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_init_weight_pulls_samples_toward_their_init_images(tclient, diffusion_job):
    from sklearn.datasets import load_digits

    digits = load_digits()
    init = (digits.images[digits.target == 3][:6] / 16.0)[..., None].astype(np.float32)
    free = tclient.generate(diffusion_job, 6, seed=9, prompt="3", steps=20)
    pulled = tclient.generate(diffusion_job, 6, seed=9, prompt="3", steps=20, init_images=init, init_weight=1.0)
    assert _mse(pulled, init) < 0.5 * _mse(free, init)
    weak = tclient.generate(diffusion_job, 6, seed=9, prompt="3", steps=20, init_images=init, init_weight=0.1)
    assert _mse(pulled, init) < _mse(weak, init) < _mse(free, init)  # the pull grows with init_weight


@pytest.fixture(scope="module")
def digit_classifier(training_address):
    """A cnn trained for three epochs on digits: confident enough to steer by."""
    with lossd.Client(training_address, timeout=PATIENCE) as c:
        return c.wait(c.create_job("cnn", "digits", epochs=3, batch_size=32), progress=False, timeout=PATIENCE)


def test_classifier_guidance_raises_the_classifiers_confidence(tclient, diffusion_job, digit_classifier):
    free = tclient.generate(diffusion_job, 8, seed=11, prompt="4", steps=20)
    barely = tclient.generate(diffusion_job, 8, seed=11, prompt="4", steps=20, classifier=digit_classifier,
                              guidance_scale=1e-9)
    assert _mse(barely, free) < 1e-6  # a vanishing guidance leaves the unguided sample
    guided = tclient.generate(diffusion_job, 8, seed=11, prompt="4", steps=20, classifier=digit_classifier,
                              guidance_scale=GUIDANCE_SCALE)
    p_free, p_guided = (tclient.predict(digit_classifier, x)[:, 4].mean() for x in (free, guided))
    assert p_guided > p_free + 0.05, (p_free, p_guided)


@pytest.mark.parametrize("kwargs, code, reason", [
    ({"classifier": "jobs/doesnotexist"}, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
    ({"guidance": {"terms": [{"loss": {"name": "sparse_categorical_crossentropy"},
                              "inputs": ["label", "classifier"]}]}},
     grpc.StatusCode.INVALID_ARGUMENT, "MISSING_TENSOR"),  # reads the classifier, names none
    ({"guidance": {"expression": "mean(classifier) * mean(y_pred)"}, "classifier": "CNN"},
     grpc.StatusCode.INVALID_ARGUMENT, "BAD_GUIDANCE"),
    ({"classifier": "SELF"}, grpc.StatusCode.FAILED_PRECONDITION, "WRONG_MODEL_KIND"),  # a generator
])
def test_bad_guidance_requests(tclient, diffusion_job, cnn_job, kwargs, code, reason):
    kwargs = dict(kwargs)
    if kwargs.get("classifier") in ("CNN", "SELF"):
        kwargs["classifier"] = cnn_job if kwargs["classifier"] == "CNN" else diffusion_job
    with pytest.raises(lossd.LossdError) as exc:
        tclient.generate(diffusion_job, 4, seed=1, prompt="2", steps=5, **kwargs)
    assert exc.value.code == code and exc.value.reason == reason, exc.value


def test_a_diffusion_job_resumes_from_its_checkpoint(tmp_path):
    """The job process's own code (worker._train), run twice on one job folder:
    the second run, asked for one more epoch, resumes from the first one's
    checkpoint (the denoiser's weights and the optimizer's state)."""
    from lossd_server.training import loop, models, worker

    params = models.resolve_model_params("diffusion", {"filters": [8, 16], "embed_dim": 16}, (8, 8, 1))
    spec = {"model": {"preset": "diffusion", "params": params}, "dataset": "digits", "loss": {"name": "mse"},
            "optimizer": {"name": "adam", "learning_rate": 1e-3, "params": {}}, "epochs": 1, "batch_size": 64,
            "validation_split": 0.2, "metrics": [], "seed": 1, "steps_per_epoch": 3}
    config = {"job_id": "resume", "job_dir": str(tmp_path), "spec": spec, "model_kind": "generator",
              "runtime": {"dataset_source": "builtin", "dataset_path": "", "image_shape": [8, 8, 1],
                          "class_names": [str(i) for i in range(10)], "logits": False},
              "progress_every": 1, "mixed_precision": False, "gpu": None, "max_upload_bytes": 1 << 20}
    reports = []

    def send(kind, **payload):
        reports.append((kind, payload))

    worker._train(config, tmp_path, send)
    first = models.load_model(tmp_path / loop.MODEL_FILE)
    assert loop.read_checkpoint(tmp_path)["epoch"] == 1
    reports.clear()
    worker._train({**config, "spec": {**spec, "epochs": 2}}, tmp_path, send)
    messages = [p["text"] for kind, p in reports if kind == "message"]
    assert any(m.startswith("Resuming from the checkpoint of epoch 1") for m in messages), messages
    assert [p["epoch"] for kind, p in reports if kind == "epoch"] == [2]
    history = json.loads((tmp_path / loop.HISTORY_FILE).read_text())
    assert len(history["loss"]) == 2
    second = models.load_model(tmp_path / loop.MODEL_FILE)
    assert isinstance(second, models.diffusion_class()) and second.timesteps == params["timesteps"]
    assert any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))


def test_a_training_diffusion_job_cancels(tclient):
    job = tclient.create_job("diffusion", "digits", epochs=1000, batch_size=16,
                             model_params={"filters": [8, 16], "embed_dim": 16})
    for event in tclient.watch(job):
        if event.kind == "progress":  # training for real
            break
    assert tclient.cancel_job(job).state == "cancelled"
    with pytest.raises(lossd.LossdError) as exc:
        tclient.generate(job, 2, seed=1)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION and exc.value.reason == "JOB_NOT_SUCCEEDED"
