"""Fixtures for training tests: a real server with its own data directory
and a dataset root holding a small folder dataset (real digit PNGs, made by
``digit_files``)."""

from __future__ import annotations

import pathlib

import pytest

from digit_files import write_class_folders
from tests.servers import PATIENCE


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("dataset-root")
    write_class_folders(root / "small", 40)
    return root


@pytest.fixture(scope="session")
def training_server(tmp_path_factory, dataset_root):
    """A server with training: two job slots (so tests overlap), a 2 MiB upload
    limit, the dataset root above; stopped (with its job processes) at the end."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0,
                        data_dir=tmp_path_factory.mktemp("training-data"), max_concurrent_jobs=2,
                        max_upload_bytes=2 << 20, dataset_root=dataset_root, progress_every_batches=2)
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="session")
def training_address(training_server) -> str:
    return f"127.0.0.1:{training_server.port}"


@pytest.fixture()
def tclient(training_address):
    import lossd

    with lossd.Client(training_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def cnn_job(training_address):
    """A tiny cnn job on digits (2 epochs of 6 batches), finished."""
    import lossd

    with lossd.Client(training_address, timeout=PATIENCE) as c:
        job = c.create_job("cnn", "digits", epochs=2, steps_per_epoch=6, batch_size=32, display_name="tiny cnn")
        return c.wait(job, progress=False, timeout=PATIENCE)


@pytest.fixture(scope="session")
def diffusion_job(training_address):
    """Two epochs of the default diffusion model on digits, finished."""
    import lossd

    with lossd.Client(training_address, timeout=PATIENCE) as c:
        job = c.create_job("diffusion", "digits", epochs=2, batch_size=64, learning_rate=2e-3,
                           display_name="tiny diffusion")
        return c.wait(job, progress=False, timeout=PATIENCE)


@pytest.fixture(scope="session")
def vae_job(training_address):
    """A vae trained for two batches: a generator without classes."""
    import lossd

    with lossd.Client(training_address, timeout=PATIENCE) as c:
        return c.wait(c.create_job("vae", "digits", epochs=1, steps_per_epoch=2), progress=False, timeout=PATIENCE)
