"""Fixtures for training tests: a real server with its own data directory,
a dataset root holding a small folder dataset, and helpers to make real
image files from scikit-learn's digits."""

from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np
import pytest


def digits_uint8(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real 8x8 digits as uint8 images in [0, 255] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n] * (255 / 16)).round().astype(np.uint8), d.target[:n]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_class_folders(root: pathlib.Path, n: int = 60) -> pathlib.Path:
    """One folder per class of real digit PNGs under ``root``."""
    x, y = digits_uint8(n)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(png_bytes(image))
    return root


def zip_of_class_folders(path: pathlib.Path, n: int = 60, corrupt: str | None = None) -> pathlib.Path:
    x, y = digits_uint8(n)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (image, label) in enumerate(zip(x, y)):
            zf.writestr(f"digits/{label}/{i:04d}.png", png_bytes(image))
        if corrupt:
            zf.writestr(corrupt, b"\x89PNG\r\n\x1a\n this is not an image")
    return path


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

    with lossd.Client(training_address, timeout=180) as c:
        job = c.create_job("cnn", "digits", epochs=2, steps_per_epoch=6, batch_size=32, display_name="tiny cnn")
        return c.wait(job, progress=False, timeout=180)
