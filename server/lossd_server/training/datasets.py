"""Datasets a job can train on: the built-in ``digits``, uploads (``.npz``, or a
zip/tar of one folder per class of PNG/JPEG images) and folders under a
configured root on the server.

Everything is checked before it is stored: sizes against the upload limit
(also for what the file decodes to, so a small archive cannot expand into
memory), shapes, labels and images (a corrupt image is named in the error).
A stored dataset is an uncompressed ``.npz`` of float32 images in [0, 1]
(N x H x W x C) and int64 labels in [0, classes), plus class names. This
module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import tarfile
import time
import zipfile
from typing import Iterable, Optional, Sequence

import numpy as np

from lossd_server.errors import InvalidArgument

BUILTIN = ("digits",)
FORMATS = ("npz", "zip", "tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_PREFIX = "folder:"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_SIDE = 1024          # largest image height or width
MAX_CLASSES = 10_000
DECODED_FACTOR = 4       # float32 images may take this many times max_upload_bytes


@dataclasses.dataclass
class DatasetInfo:
    """What a job needs to know about a dataset before it runs.

    Attributes:
        name: The name jobs refer to it by.
        source: ``builtin``, ``upload`` or ``folder``.
        examples: Number of images.
        image_shape: ``(height, width, channels)``.
        class_names: Class names in label order.
        create_time: Seconds since the epoch (0 for built-ins).
        size_bytes: Bytes of the stored file (0 for built-ins).
        path: Where the arrays are (an ``.npz``, a folder, or empty for built-ins).
    """

    name: str
    source: str
    examples: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    create_time: float = 0.0
    size_bytes: int = 0
    path: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


class DatasetError(InvalidArgument):
    """A dataset that cannot be used; the message names what is wrong."""

    default_reason = "BAD_DATASET"


# ---------------------------------------------------------------------------
# Built-in.

def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the
    package, no download): float32 N x 8 x 8 x 1 in [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    return x, digits.target.astype(np.int64), [str(i) for i in range(10)]


def builtin_info(name: str) -> DatasetInfo:
    if name == "digits":
        return DatasetInfo("digits", "builtin", 1797, (8, 8, 1), [str(i) for i in range(10)])
    raise AssertionError(name)


# ---------------------------------------------------------------------------
# Checking and normalising arrays.

def normalize(x: np.ndarray, y: np.ndarray, *, where: str = "dataset",
              class_names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checks images and labels; returns float32 NHWC images in [0, 1], labels
    in [0, classes) and the class names.

    Images may be N x H x W or N x H x W x C (C of 1 or 3), uint8 in [0, 255]
    or floats in [0, 1]. Labels may be integers or strings; they are mapped
    to 0..K-1 in sorted order unless ``class_names`` gives the order.
    """
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: `x` must be images of shape N x H x W or N x H x W x C with C of 1 or 3. "
                           f"Received: shape {list(x.shape)}.")
    n, h, w, _ = x.shape
    if n < 2:
        raise DatasetError(f"{where}: expected at least 2 images. Received: {n}.")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise DatasetError(f"{where}: expected image sides of 1 to {MAX_SIDE} pixels. Received: {h}x{w}.")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{where}: `y` must hold one label per image, shape [{n}]. "
                           f"Received: shape {list(y.shape)}.", reason="SHAPE_MISMATCH")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DatasetError(f"{where}: `x` holds NaN or Inf.")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(f"{where}: float images must lie in [0, 1] (or send uint8 in [0, 255]). "
                               f"Received: values in [{lo:g}, {hi:g}].")
    else:
        raise DatasetError(f"{where}: `x` must be uint8 or float. Received: dtype {x.dtype}.")

    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{where}: labels must be integers or strings. Received: non-integer floats.",
                               reason="BAD_LABELS")
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "US"):
        raise DatasetError(f"{where}: labels must be integers or strings. Received: dtype {y.dtype}.",
                           reason="BAD_LABELS")
    values = [str(v) for v in np.unique(y)] if class_names is None else list(class_names)
    if len(values) < 2 and class_names is None:
        raise DatasetError(f"{where}: expected at least 2 classes. Received: 1 class ({values[0]!r}).",
                           reason="BAD_LABELS")
    if len(values) > MAX_CLASSES:
        raise DatasetError(f"{where}: expected at most {MAX_CLASSES} classes. Received: {len(values)}.",
                           reason="BAD_LABELS")
    if class_names is None and np.issubdtype(y.dtype, np.integer):
        uniq = np.unique(y)
        if uniq.min() >= 0 and uniq.max() < max(2 * len(uniq), 10):
            # Integer labels that are already small indices keep their values
            # (missing classes get an empty slot) so label 7 stays class 7.
            values = [str(i) for i in range(int(uniq.max()) + 1)]
            return x, y.astype(np.int64), values
        index = {v: i for i, v in enumerate(uniq.tolist())}
        return x, np.array([index[v] for v in y.tolist()], dtype=np.int64), [str(v) for v in uniq.tolist()]
    index = {v: i for i, v in enumerate(values)}
    return x, np.array([index[str(v)] for v in y.tolist()], dtype=np.int64), values


def _check_decoded_size(shape: Sequence[int], itemsize: int, max_bytes: int, where: str) -> None:
    nbytes = int(np.prod([int(d) for d in shape], dtype=object)) * itemsize
    limit = DECODED_FACTOR * max_bytes
    if nbytes > limit:
        raise DatasetError(f"{where}: the data decodes to {nbytes:,} bytes. Expected at most {limit:,} "
                           f"({DECODED_FACTOR} x the upload limit).", reason="UPLOAD_TOO_LARGE")


# ---------------------------------------------------------------------------
# Parsing files.

def parse_npz(path: os.PathLike, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads an ``.npz`` with ``x`` and ``y`` (no pickles). The array headers are
    read first, so an array that would decompress beyond the limit is refused
    before it is loaded."""
    where = pathlib.Path(path).name
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = [k for k in ("x", "y") if f"{k}.npy" not in names]
            if missing:
                raise DatasetError(f"{where}: an .npz dataset needs arrays `x` and `y`. "
                                   f"Received: {sorted(n.removesuffix('.npy') for n in names)}.")
            for key in ("x", "y"):
                with zf.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = reader(f)
                if dtype.hasobject:
                    raise DatasetError(f"{where}: `{key}` holds Python objects; expected numbers or strings.")
                _check_decoded_size(shape, max(dtype.itemsize, 4), max_bytes, where)
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{where}: not a readable .npz file ({type(exc).__name__}: {exc}).") from None
    return normalize(x, y, where=where)


def _decode_image(data: bytes, where: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width > MAX_SIDE or img.height > MAX_SIDE:
                raise DatasetError(f"{where}: images may be at most {MAX_SIDE}x{MAX_SIDE}. "
                                   f"Received: {img.width}x{img.height}.", reason="BAD_IMAGE")
            img.load()
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            return np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8), gray
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise DatasetError(f"Corrupt image {where}: cannot decode it ({type(exc).__name__}: {exc}).",
                           reason="CORRUPT_IMAGE", metadata={"file": where}) from None


def _strip_common_root(paths: list[str]) -> list[str]:
    # Archives made with `zip -r data.zip data/` put everything under one folder.
    parts = [p.split("/") for p in paths]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return ["/".join(p) for p in parts]


def images_from_members(members: Iterable[tuple[str, int, "callable"]], max_bytes: int, where: str
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decodes ``(path, size, read)`` members laid out as ``CLASS/IMAGE``.

    Files that are not images (by suffix) and hidden files are skipped.
    Every image must have the size of the first; grayscale and color may not
    be mixed (grayscale images are promoted to RGB when some are color).
    """
    entries = []
    for path, size, read in members:
        name = path.replace("\\", "/").strip("/")
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".") or "__MACOSX" in name or not base.lower().endswith(IMAGE_SUFFIXES):
            continue
        entries.append((name, size, read))
    if not entries:
        raise DatasetError(f"{where}: expected one folder per class holding PNG or JPEG images. "
                           "Received: no image files.")
    names = _strip_common_root([e[0] for e in entries])
    total = 0
    decoded, labels, grays = [], [], []
    first_shape, first_name = None, None
    for rel, (name, size, read) in sorted(zip(names, entries)):
        parts = rel.split("/")
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected images at CLASS/IMAGE (one folder per class). "
                               f"Received: {name!r}.")
        total += size
        if total > DECODED_FACTOR * max_bytes:
            raise DatasetError(f"{where}: the images hold more than {DECODED_FACTOR * max_bytes:,} bytes.",
                               reason="UPLOAD_TOO_LARGE")
        array, gray = _decode_image(read(), name)
        if first_shape is None:
            first_shape, first_name = array.shape[:2], name
        elif array.shape[:2] != first_shape:
            raise DatasetError(
                f"{where}: every image must have the size of the first ({first_name}: "
                f"{first_shape[1]}x{first_shape[0]}). Received: {name} of {array.shape[1]}x{array.shape[0]}.",
                reason="BAD_IMAGE", metadata={"file": name})
        decoded.append(array)
        grays.append(gray)
        labels.append(parts[0])
        _check_decoded_size((len(decoded), *first_shape, 3), 4, max_bytes, where)
    if all(grays):
        x = np.stack(decoded)[..., None]
    else:
        x = np.stack([np.repeat(a[..., None], 3, axis=-1) if g else a for a, g in zip(decoded, grays)])
    class_names = sorted(set(labels))
    return normalize(x, np.array(labels), where=where, class_names=class_names)


def parse_archive(path: os.PathLike, fmt: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a zip or tar (plain or compressed) of ``CLASS/IMAGE`` files, in memory:
    nothing is extracted to disk, so member paths cannot escape anywhere."""
    where = pathlib.Path(path).name
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                members = [(i.filename, i.file_size, (lambda i=i: zf.read(i)))
                           for i in zf.infolist() if not i.is_dir()]
                return images_from_members(members, max_bytes, where)
        with tarfile.open(path, "r:*") as tf:
            members = [(m.name, m.size, (lambda m=m: tf.extractfile(m).read()))
                       for m in tf.getmembers() if m.isfile()]
            return images_from_members(members, max_bytes, where)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{where}: not a readable {fmt} archive ({type(exc).__name__}: {exc}).") from None


def resolve_folder(root: Optional[os.PathLike], rel: str) -> pathlib.Path:
    """The path of ``folder:REL`` under the dataset root; refuses paths that
    escape it (``..``, absolute paths, symlinks pointing outside)."""
    if root is None:
        raise DatasetError("Folder datasets are off on this server. Expected an uploaded or built-in dataset "
                           "(the server's `dataset_root` setting turns folders on).",
                           reason="FOLDER_DATASETS_DISABLED")
    base = pathlib.Path(root).resolve()
    target = (base / rel).resolve()
    if not rel or pathlib.PurePath(rel).is_absolute() or not target.is_relative_to(base):
        raise DatasetError(f"Dataset folder {rel!r} is outside the dataset root. Expected a path relative to "
                           "the root, without `..`.", reason="PATH_OUTSIDE_ROOT", metadata={"path": rel[:200]})
    if not target.exists():
        raise DatasetError(f"Dataset folder {rel!r} does not exist under the dataset root.",
                           reason="UNKNOWN_DATASET", metadata={"path": rel[:200]})
    return target


def parse_folder(path: pathlib.Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a server folder: an ``.npz`` file, or one sub-folder per class of images."""
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetError(f"{path.name}: expected a folder of class folders or an .npz file.")
        return parse_npz(path, max_bytes)
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    members = [(str(p.relative_to(path)), p.stat().st_size, p.read_bytes) for p in files]
    return images_from_members(members, max_bytes, path.name)


def save_arrays(path: pathlib.Path, x: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> int:
    """Writes the normalised arrays atomically; returns the file's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, class_names=np.array(list(class_names)))
    os.replace(tmp, path)
    return path.stat().st_size


def load_arrays(path: os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a dataset written by ``save_arrays``."""
    with np.load(path, allow_pickle=False) as data:
        return data["x"], data["y"], [str(c) for c in data["class_names"]]


def check_name(name: str) -> str:
    """Checks an upload's name; returns it."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in BUILTIN \
            or name.startswith(FOLDER_PREFIX.rstrip(":")):
        raise DatasetError(
            "Invalid dataset name. Expected 1 to 64 letters, digits, `_`, `-` or `.`, starting with a letter "
            f"or digit, and not a built-in name ({', '.join(BUILTIN)}) or `folder...`. Received: {name!r}.",
            reason="BAD_DATASET_NAME")
    return name


def info_from_arrays(name: str, source: str, x: np.ndarray, class_names: Sequence[str], path: str = "",
                     size_bytes: int = 0) -> DatasetInfo:
    return DatasetInfo(name, source, int(x.shape[0]), tuple(int(d) for d in x.shape[1:]), list(class_names),
                       time.time(), size_bytes, path)


def load(source: str, path: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads a dataset's arrays, given ``DatasetInfo.source`` and ``.path`` (used by the worker)."""
    if source == "builtin":
        return load_digits()
    if source == "upload":
        return load_arrays(path)
    if source == "folder":
        return parse_folder(pathlib.Path(path), max_bytes)
    raise AssertionError(source)
