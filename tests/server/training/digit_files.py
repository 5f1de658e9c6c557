"""Real image files for training tests: scikit-learn's digits as uint8
images, PNG bytes, class folders and zip archives of them."""

from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np


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
