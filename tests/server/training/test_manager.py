"""The training manager without a network: nothing runs until ``start()``,
then the scheduler runs the queued job in its own process and records it in
the metrics through their training methods."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from lossd_server.callers import ANONYMOUS
from lossd_server.config import Settings
from lossd_server.losses.custom import full_registry, inline_entry
from lossd_server.losses.plan import Planner
from lossd_server.observability.metrics import Metrics
from lossd_server.training.manager import TrainingManager


@pytest.fixture()
def manager(tmp_path):
    registry = full_registry(plugins=False)
    metrics = Metrics(CollectorRegistry(), loss_names=registry.names(), version="test", process_metrics=False)
    manager = TrainingManager(Settings(data_dir=tmp_path, progress_every_batches=1), Planner(registry, inline_entry),
                              metrics, gpus=0)
    yield manager, metrics
    manager.stop()


def test_jobs_wait_for_start_then_run(manager):
    manager, metrics = manager
    job = manager.create_job({"model": {"preset": "mlp"}, "dataset": "digits", "epochs": 1, "steps_per_epoch": 2},
                             caller=ANONYMOUS)
    time.sleep(0.5)
    assert manager.get_job(job.id, ANONYMOUS).state == "queued"  # built, not started: nothing runs
    assert metrics.registry.get_sample_value("lossd_training_jobs", {"state": "queued"}) == 1

    manager.start()
    states = [e.payload["state"] for e in manager.scheduler.watch(job.id, ANONYMOUS) if e.kind == "state"]
    assert states == ["queued", "running", "succeeded"], manager.get_job(job.id, ANONYMOUS).error
    assert manager.artifacts.model_path(job.id).exists()
    sample = metrics.registry.get_sample_value
    assert sample("lossd_training_jobs", {"state": "succeeded"}) == 1
    assert sample("lossd_training_jobs", {"state": "queued"}) == 0
    assert sample("lossd_training_epochs_total") == 1
    assert sample("lossd_training_examples_total") == 2 * 32
    assert sample("lossd_training_loss", {"split": "train"}) > 0
    assert sample("lossd_training_job_duration_seconds_count", {"state": "succeeded"}) == 1
