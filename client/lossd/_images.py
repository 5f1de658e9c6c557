"""Images from a generation saved as one PNG grid. Needs Pillow."""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import numpy as np



def save_image_grid(images, path: "str | os.PathLike", *, columns: Optional[int] = None, scale: int = 4,
                    padding: int = 1) -> pathlib.Path:
    """Saves images (N x H x W [x C], floats in [0, 1] or uint8) as one PNG grid.

    Needs Pillow (``pip install pillow``).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("save_image_grid needs Pillow: pip install pillow") from None
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    mode = "L" if c == 1 else "RGB"
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid, mode=mode)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = pathlib.Path(path)
    picture.save(path)
    return path
