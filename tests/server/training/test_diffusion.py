"""The ``diffusion`` preset end to end: a real server trains a class-conditioned
denoiser on digits through a real job, and Generate samples it."""

from __future__ import annotations

import json

import grpc
import pytest

import lossd


@pytest.fixture(scope="module")
def diffusion_job(training_address):
    """Two epochs of the default diffusion model on digits, finished."""
    with lossd.Client(training_address, timeout=180) as c:
        job = c.create_job("diffusion", "digits", epochs=2, batch_size=64, learning_rate=2e-3,
                           display_name="tiny diffusion")
        return c.wait(job, progress=False, timeout=180)


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
