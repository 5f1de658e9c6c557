"""Datasets a job can train on: the built-in ``digits``, uploads (``.npz``, or a
zip/tar of one folder per class of PNG/JPEG images) and folders under a
configured root on the server.

Everything is checked before it is stored, and every bound before the
resource it guards is spent:

- the upload's size against ``max_upload_bytes``, and what it decodes to
  (float32 images, 4 bytes a pixel) against ``DECODED_FACTOR`` times that,
  from the ``.npy`` headers or the archive's listing, before anything is read;
- the members of an archive (or the entries of a folder) against
  ``max_archive_members``, counted with a stop at the limit before the zip or
  tar library lists them; large pax/long-name tar headers and image files
  larger than any image of ``MAX_SIDE`` pixels could be, before they are read;
- memory while decoding, across all uploads at once: each reserves what it
  is about to hold from one ``ByteBudget`` (``max_decoding_bytes``);
- then shapes, labels and images (a corrupt image is named in the error).

A stored dataset is an uncompressed ``.npz`` of float32 images in [0, 1]
(N x H x W x C) and int64 labels in [0, classes), plus class names (escaped
for display by ``printable``). Dataset files are written only through
``write_chunk`` (a full disk is ``errors.disk_full``), and temporary files live in
the hidden ``TMP_DIR`` folder, whose name no dataset can have. Error
messages name the upload, the member or ``folder:PATH``, never a server
path. This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pathlib
import re
import secrets
import shutil
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from lossd_server.errors import InvalidArgument, LossdError, ResourceExhausted

BUILTIN = ("digits",)
FORMATS = ("npz", "zip", "tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_PREFIX = "folder:"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_SIDE = 1024          # largest image height or width
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 200     # characters of one class name (a folder name or a string label)
DECODED_FACTOR = 4       # float32 images may take this many times max_upload_bytes
# One image file: a PNG of MAX_SIDE x MAX_SIDE RGBA pixels at 16 bits holds
# 8 MiB of pixels even uncompressed; a larger file is not an image we take.
MAX_IMAGE_FILE_BYTES = 32 << 20
# One pax or GNU long-name tar header: tarfile reads it whole into memory.
MAX_TAR_HEADER_BYTES = 1 << 20
# Uploads being received and arrays being saved, under the datasets folder.
# A dataset name starts with a letter or digit, so it can never be this.
TMP_DIR = ".tmp"
# A stored upload: its name, then a token new for every upload (so a replace
# writes a new file and switches the record to it in one step).
_STORED_FILE = re.compile(rf"({NAME_RE.pattern})@[0-9a-f]{{16}}\.npz")


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
        owner: Who uploaded it (the caller's name); empty for built-in and
            folder datasets, which every caller may use, and for uploads from
            before owners, which only admins may.
    """

    name: str
    source: str
    examples: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    create_time: float = 0.0
    size_bytes: int = 0
    path: str = ""
    owner: str = ""

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


def printable(text: str) -> str:
    """``text`` fit to show: backslashes and unprintable characters (control
    characters such as ANSI escapes, bidirectional overrides) escaped as
    Python's ``repr`` writes them (``\\x1b``, ``\\u202e``); printable
    Unicode stays as it is. Different names stay different."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


# ---------------------------------------------------------------------------
# Server-wide byte budgets.

class ByteBudget:
    """Bytes that concurrent requests reserve from one server-wide allowance
    before they spend them: memory to decode uploads, disk for datasets.

    A request takes its share through a ``Reservation`` (``reserve()``),
    which gives everything back when it closes, on every path. A ``take``
    that does not fit is refused at once rather than queued: INVALID_ARGUMENT
    (UPLOAD_TOO_LARGE) when the request alone would pass the allowance,
    RESOURCE_EXHAUSTED (``reason``) when it fits alone but not beside what is
    already spent and held.

    Args:
        capacity: The allowance in bytes.
        setting: The setting that sets it, named in refusals.
        what: What the bytes are, for messages ("memory for decoding datasets").
        reason: The ErrorInfo reason when the rest is spent or held.
        advice: What the client can do then, a sentence.
        spent: Bytes spent outside any reservation (the stored datasets),
            read at each ``take``; none by default.
        quota: A caller's quota rather than a server-wide allowance: every
            refusal, a request alone past it too, is RESOURCE_EXHAUSTED
            (``reason``), since the caller can free its own share.
    """

    def __init__(self, capacity: int, *, setting: str, what: str, reason: str, advice: str,
                 spent: Optional[Callable[[], int]] = None, quota: bool = False):
        self.capacity = int(capacity)
        self.setting, self.what, self.reason, self.advice = setting, what, reason, advice
        self._spent = spent
        self.quota = quota
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes the open reservations hold."""
        return self._held

    def reserve(self) -> "Reservation":
        return Reservation(self)


class Reservation:
    """One request's share of a ``ByteBudget``, as a context manager that
    gives back everything it holds when the block ends."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.held = 0

    def take(self, nbytes: int, what: str) -> None:
        """Reserves ``nbytes`` more for ``what`` (such as "Decoding 'v'"), or raises.

        Raises:
            InvalidArgument: UPLOAD_TOO_LARGE, the request alone needs more
                than the whole allowance (of a server-wide budget).
            ResourceExhausted: the budget's reason; what is spent and held
                leaves too little (or, of a quota, any refusal).
        """
        budget, nbytes = self.budget, int(nbytes)
        if nbytes <= 0:
            return
        with budget._lock:
            if budget.quota:
                used = budget._held + (budget._spent() if budget._spent else 0)
                if used + nbytes > budget.capacity:
                    raise ResourceExhausted(
                        f"{what} needs {nbytes:,} more bytes of {budget.what}. Expected at most "
                        f"{budget.capacity:,} in all ({budget.setting}). Received: {used + nbytes:,} with "
                        f"the {used:,} already used. {budget.advice}", reason=budget.reason,
                        metadata={"needed_bytes": nbytes, "used_bytes": used, "limit_bytes": budget.capacity})
            elif self.held + nbytes > budget.capacity:
                raise InvalidArgument(
                    f"{what} needs {self.held + nbytes:,} bytes of {budget.what}. Expected at most "
                    f"{budget.capacity:,} (the server's {budget.setting}).", reason="UPLOAD_TOO_LARGE",
                    metadata={"needed_bytes": self.held + nbytes, "limit_bytes": budget.capacity})
            free = budget.capacity - budget._held - (budget._spent() if budget._spent else 0)
            if nbytes > free:
                raise ResourceExhausted(
                    f"{what} needs {nbytes:,} more bytes of {budget.what}, but only {max(free, 0):,} of the "
                    f"server's {budget.capacity:,} are free ({budget.setting}). {budget.advice}",
                    reason=budget.reason, metadata={"needed_bytes": nbytes, "free_bytes": max(free, 0),
                                                    "limit_bytes": budget.capacity})
            budget._held += nbytes
            self.held += nbytes

    def give_back(self, nbytes: int) -> None:
        """Returns ``nbytes`` of what this reservation holds (no more than that)."""
        nbytes = min(int(nbytes), self.held)
        if nbytes > 0:
            with self.budget._lock:
                self.budget._held -= nbytes
                self.held -= nbytes

    def close(self) -> None:
        self.give_back(self.held)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unlimited() -> Reservation:
    """A reservation on no budget (the job process, tests)."""
    return ByteBudget(sys.maxsize, setting="", what="memory", reason="", advice="").reserve()


# ---------------------------------------------------------------------------
# Writing files.

def write_chunk(f, data) -> None:
    """Writes ``data`` to the open file ``f``. Every byte of a dataset file
    goes through here (an upload as it arrives, the arrays as they are
    stored), so there is one place where a full disk shows."""
    f.write(data)


class _Output:
    """A file whose writes go through ``write_chunk``; everything else is the file's."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        write_chunk(self._f, data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _why(exc: BaseException, path: os.PathLike | str = "") -> str:
    """An exception as text fit for a client: an OSError's reason without its
    file name, anything else without the server path it was given."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    if path:
        text = text.replace(str(path), "<file>")
    return f"{type(exc).__name__}: {text[:300]}"


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

def _check_images_shape(shape: Sequence[int], where: str) -> None:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: `x` must be images of shape N x H x W or N x H x W x C with C of 1 or 3. "
                           f"Received: shape {list(shape)}.")
    n, h, w, _ = shape
    if n < 2:
        raise DatasetError(f"{where}: expected at least 2 images. Received: {n}.")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise DatasetError(f"{where}: expected image sides of 1 to {MAX_SIDE} pixels. Received: {h}x{w}.")


def _class_names(names: Sequence[str], where: str) -> list[str]:
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{where}: expected at most {MAX_CLASSES} classes. Received: {len(names)}.",
                           reason="BAD_LABELS")
    longest = max((len(n) for n in names), default=0)
    if longest > MAX_CLASS_NAME:
        raise DatasetError(f"{where}: class names may have at most {MAX_CLASS_NAME} characters. "
                           f"Received: one of {longest:,}.", reason="BAD_LABELS")
    return [printable(n) for n in names]


def normalize(x: np.ndarray, y: np.ndarray, *, where: str = "dataset",
              class_names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checks images and labels; returns float32 NHWC images in [0, 1], labels
    in [0, classes) and the class names (escaped by ``printable``).

    Images may be N x H x W or N x H x W x C (C of 1 or 3), uint8 in [0, 255]
    or floats in [0, 1]. Labels may be integers or strings; they are mapped
    to 0..K-1 in sorted order unless ``class_names`` gives the order. The
    float32 images are made in place (uint8 input: 5 bytes a pixel at the
    peak), and labels are mapped with numpy, never one Python object each.
    """
    _check_images_shape(x.shape, where)
    if x.ndim == 3:
        x = x[..., None]
    n = x.shape[0]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{where}: `y` must hold one label per image, shape [{n}]. "
                           f"Received: shape {list(y.shape)}.", reason="SHAPE_MISMATCH")
    if x.dtype == np.uint8:
        x = x.astype(np.float32)
        x /= 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = np.asarray(x, dtype=np.float32)
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
    uniq, inverse = np.unique(y, return_inverse=True)
    inverse = inverse.reshape(-1)
    if class_names is not None:
        index = {v: i for i, v in enumerate(class_names)}
        labels = np.array([index[str(v)] for v in uniq.tolist()], dtype=np.int64)[inverse]
        return x, labels, _class_names(list(class_names), where)
    if len(uniq) > MAX_CLASSES:  # before one string is made per class
        raise DatasetError(f"{where}: expected at most {MAX_CLASSES} classes. Received: {len(uniq)}.",
                           reason="BAD_LABELS")
    if len(uniq) < 2:
        raise DatasetError(f"{where}: expected at least 2 classes. Received: 1 class "
                           f"({printable(str(uniq.tolist()[0]))!r}).", reason="BAD_LABELS")
    if np.issubdtype(y.dtype, np.integer) and uniq[0] >= 0 and uniq[-1] < max(2 * len(uniq), 10):
        # Integer labels that are already small indices keep their values
        # (missing classes get an empty slot) so label 7 stays class 7.
        return x, y.astype(np.int64), [str(i) for i in range(int(uniq[-1]) + 1)]
    return x, inverse.astype(np.int64), _class_names([str(v) for v in uniq.tolist()], where)


def _check_decoded_size(shape: Sequence[int], itemsize: int, max_bytes: int, where: str) -> None:
    nbytes = int(np.prod([int(d) for d in shape], dtype=object)) * itemsize
    limit = DECODED_FACTOR * max_bytes
    if nbytes > limit:
        raise DatasetError(f"{where}: the data decodes to {nbytes:,} bytes. Expected at most {limit:,} "
                           f"({DECODED_FACTOR} x the upload limit).", reason="UPLOAD_TOO_LARGE")


def _check_files_size(total: int, max_bytes: int, where: str) -> None:
    limit = DECODED_FACTOR * max_bytes
    if total > limit:
        raise DatasetError(f"{where}: the files hold more than {limit:,} bytes ({DECODED_FACTOR} x the upload "
                           "limit).", reason="UPLOAD_TOO_LARGE")


def _too_many_members(where: str, limit: int) -> DatasetError:
    return DatasetError(f"{where}: expected at most {limit:,} files and folders (the server's "
                        f"max_archive_members). Received: more.", reason="TOO_MANY_MEMBERS",
                        metadata={"limit": limit})


# ---------------------------------------------------------------------------
# Parsing files.

def _check_zip_members(path: os.PathLike, limit: Optional[int], where: str) -> None:
    """Counts the entries of a zip's central directory, stopping past
    ``limit``, before ``zipfile`` lists them all (it makes an object of
    each, as many as a few bytes of input each can claim)."""
    if limit is None:
        return
    with open(path, "rb") as f:
        # zipfile's own reading of the end record (private, unchanged since
        # Python 2.6): where the central directory starts and how long it is.
        end = zipfile._EndRecData(f)
        if end is None:
            raise zipfile.BadZipFile("File is not a zip file")
        size, offset = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]
        concat = end[zipfile._ECD_LOCATION] - size - offset
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        f.seek(offset + concat)
        count = seen = 0
        while seen < size:
            header = f.read(46)
            if len(header) < 46 or header[:4] != b"PK\x01\x02":
                return  # zipfile reports the damage
            count += 1
            if count > limit:
                raise _too_many_members(where, limit)
            skip = sum(struct.unpack("<HHH", header[28:34]))  # name, extra field and comment lengths
            f.seek(skip, os.SEEK_CUR)
            seen += 46 + skip


def _npz_headers(path: os.PathLike, where: str, max_members: Optional[int]) -> dict:
    """The ``x`` and ``y`` arrays' ``(shape, dtype)`` from their ``.npy`` headers."""
    _check_zip_members(path, max_members, where)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        missing = [k for k in ("x", "y") if f"{k}.npy" not in names]
        if missing:
            received = sorted(printable(n.removesuffix(".npy")) for n in names)
            raise DatasetError(f"{where}: an .npz dataset needs arrays `x` and `y`. "
                               f"Received: {received[:20]}{' ...' if len(received) > 20 else ''}.")
        headers = {}
        for key in ("x", "y"):
            with zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = reader(f)
            if dtype.hasobject:
                raise DatasetError(f"{where}: `{key}` holds Python objects; expected numbers or strings.")
            headers[key] = (tuple(int(d) for d in shape), dtype)
    return headers


def _elements(shape: Sequence[int]) -> int:
    return int(np.prod([int(d) for d in shape], dtype=object))


def parse_npz(path: os.PathLike, max_bytes: int, *, memory: Optional[Reservation] = None,
              max_members: Optional[int] = None, where: Optional[str] = None
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads an ``.npz`` with ``x`` and ``y`` (no pickles).

    The zip's entries are counted first, then the array headers read: an
    array that would decode beyond the limit, or images of a bad shape, are
    refused before anything is loaded, and ``memory`` is reserved for what
    loading and converting will hold before it starts.

    Args:
        max_bytes: The upload limit; the float32 images may take
            ``DECODED_FACTOR`` times it.
        memory: Where the memory for decoding is reserved (unlimited when None).
        max_members: Most entries the zip may have (unlimited when None).
        where: How messages name the file (the dataset's name).
    """
    where = where or pathlib.Path(path).name
    memory = memory or unlimited()
    try:
        headers = _npz_headers(path, where, max_members)
        for shape, dtype in headers.values():
            _check_decoded_size(shape, max(dtype.itemsize, 4), max_bytes, where)
        (x_shape, x_dtype), (y_shape, y_dtype) = headers["x"], headers["y"]
        _check_images_shape(x_shape, where)
        # Loaded x and its float32 copy (for floats, a finiteness mask too);
        # loaded y, np.unique's sorted copy and inverse, the int64 labels.
        xn, yn = _elements(x_shape), _elements(y_shape)
        x_bytes = xn * (x_dtype.itemsize + (4 if x_dtype == np.uint8 else 5))
        memory.take(x_bytes + 2 * yn * (y_dtype.itemsize + 8), f"Decoding {where!r}")
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except LossdError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{where}: not a readable .npz file ({_why(exc, path)}).") from None
    return normalize(x, y, where=where)


def _decode_image(data: bytes, name: str, memory: Reservation):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width > MAX_SIDE or img.height > MAX_SIDE:
                raise DatasetError(f"{printable(name)}: images may be at most {MAX_SIDE}x{MAX_SIDE}. "
                                   f"Received: {img.width}x{img.height}.", reason="BAD_IMAGE",
                                   metadata={"file": printable(name)[:200]})
            # The decoded pixels (up to 4 bytes each, 8 at 16 bits) and their conversion.
            pixels = 8 * img.width * img.height
            memory.take(pixels, f"Decoding {printable(name)!r}")
            img.load()
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            array = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)
        memory.give_back(pixels - array.nbytes)
        return array, gray
    except LossdError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise DatasetError(f"Corrupt image {printable(name)}: cannot decode it ({_why(exc)}).",
                           reason="CORRUPT_IMAGE", metadata={"file": printable(name)[:200]}) from None


def _strip_common_root(paths: list[str]) -> list[str]:
    # Archives made with `zip -r data.zip data/` put everything under one folder.
    parts = [p.split("/") for p in paths]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return ["/".join(p) for p in parts]


def images_from_members(members: Iterable[tuple[str, int, Callable[[], bytes]]], max_bytes: int, where: str,
                        *, memory: Optional[Reservation] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decodes ``(path, size, read)`` members laid out as ``CLASS/IMAGE``.

    Files that are not images (by suffix) and hidden files are skipped.
    Every image must have the size of the first; grayscale and color may not
    be mixed (grayscale images are promoted to RGB when some are color).
    Sizes are checked from the listing before anything is read; members are
    read in the order given (a compressed tar is read forward, once), and
    the images come out sorted by path.
    """
    memory = memory or unlimited()
    entries = []
    for path, size, read in members:
        name = path.replace("\\", "/").strip("/")
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".") or "__MACOSX" in name or not base.lower().endswith(IMAGE_SUFFIXES):
            continue
        if size > MAX_IMAGE_FILE_BYTES:
            raise DatasetError(f"{where}: image files may hold at most {MAX_IMAGE_FILE_BYTES:,} bytes. "
                               f"Received: {printable(name)} of {size:,}.", reason="IMAGE_TOO_LARGE",
                               metadata={"file": printable(name)[:200]})
        entries.append((name, size, read))
    if not entries:
        raise DatasetError(f"{where}: expected one folder per class holding PNG or JPEG images. "
                           "Received: no image files.")
    _check_files_size(sum(e[1] for e in entries), max_bytes, where)
    names = _strip_common_root([e[0] for e in entries])
    decoded = []  # (relative path, class, pixels, gray)
    first_shape, first_name = None, None
    for rel, (name, size, read) in zip(names, entries):
        parts = rel.split("/")
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected images at CLASS/IMAGE (one folder per class). "
                               f"Received: {name!r}.")
        memory.take(2 * size, f"Reading {printable(name)!r}")  # the file, and the reader's buffer
        array, gray = _decode_image(read(), name, memory)
        memory.give_back(2 * size)
        if first_shape is None:
            first_shape, first_name = array.shape[:2], name
        elif array.shape[:2] != first_shape:
            raise DatasetError(
                f"{where}: every image must have the size of the first ({printable(first_name)}: "
                f"{first_shape[1]}x{first_shape[0]}). Received: {printable(name)} of "
                f"{array.shape[1]}x{array.shape[0]}.", reason="BAD_IMAGE", metadata={"file": printable(name)[:200]})
        decoded.append((rel, parts[0], array, gray))
        _check_decoded_size((len(decoded), *first_shape, 3), 4, max_bytes, where)
    decoded.sort(key=lambda d: d[0])
    channels = 1 if all(d[3] for d in decoded) else 3
    x_shape = (len(decoded), *first_shape, channels)
    memory.take(5 * _elements(x_shape), f"Decoding {where!r}")  # the uint8 images, then their float32 copy
    x = np.empty(x_shape, np.uint8)
    labels = []
    for i, (_, label, array, _) in enumerate(decoded):
        x[i] = array[..., None] if array.ndim == 2 else array  # a gray image fills every channel
        labels.append(label)
        decoded[i] = None  # each decoded image goes as soon as it is copied
        memory.give_back(array.nbytes)
    return normalize(x, np.array(labels), where=where, class_names=sorted(set(labels)))


class _TarHeaderTooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _TarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's payload whole into
    memory, inside ``next()``, before the caller sees a member: a large one
    is refused first (``_proc_member`` is where tarfile dispatches on the
    header's type, in every Python 3)."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_TAR_HEADER_BYTES:
            raise _TarHeaderTooLarge(self.size)
        return super()._proc_member(tarfile_)


def _read_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


def parse_archive(path: os.PathLike, fmt: str, max_bytes: int, *, memory: Optional[Reservation] = None,
                  max_members: Optional[int] = None, where: Optional[str] = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a zip or tar (plain or compressed) of ``CLASS/IMAGE`` files, in memory:
    nothing is extracted to disk, so member paths cannot escape anywhere.

    Members are counted with a stop past ``max_members`` before they are
    listed, and a tar's file sizes are added up as its headers are read:
    more than ``DECODED_FACTOR * max_bytes`` is refused before the data
    behind them is decompressed, even to be skipped. See ``parse_npz`` for
    the other arguments.
    """
    where = where or pathlib.Path(path).name
    memory = memory or unlimited()
    try:
        if fmt == "zip":
            _check_zip_members(path, max_members, where)
            with zipfile.ZipFile(path) as zf:
                members = [(i.filename, i.file_size, functools.partial(zf.read, i))
                           for i in zf.infolist() if not i.is_dir()]
                return images_from_members(members, max_bytes, where, memory=memory)
        with tarfile.open(path, "r:*", tarinfo=_TarInfo) as tf:
            members, count, total = [], 0, 0
            while (member := tf.next()) is not None:
                count += 1
                if max_members is not None and count > max_members:
                    raise _too_many_members(where, max_members)
                if member.issparse():
                    raise DatasetError(f"{where}: {printable(member.name)!r} is a sparse file. Expected plain "
                                       "files.", reason="BAD_ARCHIVE")
                if member.isfile():
                    total += member.size
                    _check_files_size(total, max_bytes, where)  # before next() skips over it
                    members.append((member.name, member.size, functools.partial(_read_tar_member, tf, member)))
            return images_from_members(members, max_bytes, where, memory=memory)
    except LossdError:
        raise
    except _TarHeaderTooLarge as exc:
        raise DatasetError(f"{where}: a tar header (pax or long name) of {exc.size:,} bytes. Expected at most "
                           f"{MAX_TAR_HEADER_BYTES:,}.", reason="BAD_ARCHIVE") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"{where}: not a readable {fmt} archive ({_why(exc, path)}).") from None


def resolve_folder(root: Optional[os.PathLike], rel: str) -> pathlib.Path:
    """The path of ``folder:REL`` under the dataset root; refuses paths that
    escape it (``..``, absolute paths, symlinks pointing outside)."""
    if root is None:
        raise DatasetError("Folder datasets are off on this server. Expected an uploaded or built-in dataset "
                           "(the server's `dataset_root` setting turns folders on).",
                           reason="FOLDER_DATASETS_DISABLED")
    if not rel.isprintable():  # the reference is stored in the job and shown by `lossd jobs list`
        raise DatasetError(f"Invalid dataset folder {rel[:200]!r}. Expected a path of printable characters.",
                           reason="BAD_DATASET_NAME", metadata={"path": printable(rel)[:200]})
    base = pathlib.Path(root).resolve()
    target = (base / rel).resolve()
    if not rel or pathlib.PurePath(rel).is_absolute() or not target.is_relative_to(base):
        raise DatasetError(f"Dataset folder {rel!r} is outside the dataset root. Expected a path relative to "
                           "the root, without `..`.", reason="PATH_OUTSIDE_ROOT",
                           metadata={"path": printable(rel)[:200]})
    if not target.exists():
        raise DatasetError(f"Dataset folder {rel!r} does not exist under the dataset root.",
                           reason="UNKNOWN_DATASET", metadata={"path": printable(rel)[:200]})
    return target


def _folder_files(folder: pathlib.Path, max_members: Optional[int], where: str
                  ) -> list[tuple[str, pathlib.Path, int]]:
    """The regular files under ``folder`` as ``(relative path, real path,
    size)``, sorted. A symlink is followed only where it points inside
    ``folder`` (one pointing out of it is refused), each real folder is
    read once, and counting stops past ``max_members``."""
    base = folder.resolve()
    files, count, seen, pending = [], 0, set(), [(base, "")]
    while pending:
        real_dir, prefix = pending.pop()
        if real_dir in seen:
            continue
        seen.add(real_dir)
        with os.scandir(real_dir) as entries:
            for entry in entries:
                count += 1
                if max_members is not None and count > max_members:
                    raise _too_many_members(where, max_members)
                rel, real = prefix + entry.name, pathlib.Path(entry.path)
                if entry.is_symlink():
                    try:
                        real = real.resolve(strict=True)
                        inside = real.is_relative_to(base)
                    except (OSError, RuntimeError):  # dangling, or a loop
                        inside = False
                    if not inside:
                        raise DatasetError(
                            f"{where}: {printable(rel)!r} is a symbolic link that points outside the dataset's "
                            "folder (or nowhere). Expected links, if any, to stay inside it.",
                            reason="PATH_OUTSIDE_ROOT", metadata={"path": printable(rel)[:200]})
                if real.is_dir():
                    pending.append((real, rel + "/"))
                elif real.is_file():
                    files.append((rel, real, real.stat().st_size))
    return sorted(files)


def parse_folder(path: pathlib.Path, max_bytes: int, *, memory: Optional[Reservation] = None,
                 max_members: Optional[int] = None, where: Optional[str] = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a server folder: an ``.npz`` file, or one sub-folder per class of
    images. Symbolic links may not lead out of it. See ``parse_npz`` for the
    other arguments."""
    where = where or path.name
    try:
        if path.is_file():
            if path.suffix != ".npz":
                raise DatasetError(f"{where}: expected a folder of class folders or an .npz file.")
            return parse_npz(path, max_bytes, memory=memory, max_members=max_members, where=where)
        members = [(rel, size, real.read_bytes) for rel, real, size in _folder_files(path, max_members, where)]
        return images_from_members(members, max_bytes, where, memory=memory)
    except OSError as exc:
        raise DatasetError(f"{where}: cannot be read ({_why(exc)}).") from None


def stored_size(x: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> int:
    """About how many bytes ``save_arrays`` writes (a little more, never less)."""
    return x.nbytes + y.nbytes + np.array(list(class_names)).nbytes + 4096


def stored_file_name(name: str) -> str:
    """A new file name for an upload of ``name``: one per upload, so a
    replace never writes over the file the current record points at."""
    return f"{name}@{secrets.token_hex(8)}.npz"


_WRITE_BYTES = 1 << 20


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (an uncompressed zip of ``.npy`` files, which
    ``np.load`` reads), without its copy of up to 16 MiB per array: the bytes
    go out as views, a MiB at a time, through ``write_chunk``."""
    with zipfile.ZipFile(_Output(f), "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            array = np.ascontiguousarray(array)
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                data = array.reshape(-1).view(np.uint8)
                for start in range(0, len(data), _WRITE_BYTES):
                    member.write(data[start:start + _WRITE_BYTES])


def save_arrays(path: pathlib.Path, x: np.ndarray, y: np.ndarray, class_names: Sequence[str], *,
                tmp_dir: Optional[pathlib.Path] = None) -> int:
    """Writes the normalised arrays to a temporary file in ``tmp_dir``
    (``TMP_DIR`` beside ``path`` by default), then renames it to ``path``;
    the temporary file is removed on every failure. Returns the file's size."""
    tmp_dir = pathlib.Path(tmp_dir) if tmp_dir is not None else path.parent / TMP_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="save-", suffix=".npz")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            _write_npz(f, {"x": x, "y": y, "class_names": np.array(list(class_names))})
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_arrays(path: os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reads a dataset written by ``save_arrays``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["x"], data["y"], [str(c) for c in data["class_names"]]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise DatasetError(f"The stored dataset cannot be read ({_why(exc, path)}). Expected it in the server's "
                           "data directory; upload it again.", reason="DATASET_UNREADABLE") from None


def sweep(folder: pathlib.Path, stored: dict[str, str]) -> list[str]:
    """Removes what interrupted uploads left in the datasets ``folder``; returns
    the names removed.

    That is everything in ``TMP_DIR``; the temporary files of older servers
    (``.upload-*``, and a ``*.tmp.npz`` no record points at); and a stored
    file of a dataset whose record points at another file (a replace that
    stopped before the old file was removed). A file no record names at all
    stays: it may be a dataset whose record was lost, so it is kept.

    Args:
        stored: Each stored dataset's name and the file name its record points at.
    """
    removed = []
    if not folder.is_dir():
        return removed
    referenced = set(stored.values())
    candidates = list((folder / TMP_DIR).iterdir()) if (folder / TMP_DIR).is_dir() else []
    for path in folder.iterdir():
        if not path.is_file() or path.name in referenced:
            continue
        match = _STORED_FILE.fullmatch(path.name)
        if path.name.startswith(".upload-") or path.name.endswith(".tmp.npz") or (match and match[1] in stored):
            candidates.append(path)
    for path in candidates:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
        except OSError:
            pass  # the next start tries again
    return removed


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
                     size_bytes: int = 0, owner: str = "") -> DatasetInfo:
    return DatasetInfo(name, source, int(x.shape[0]), tuple(int(d) for d in x.shape[1:]), list(class_names),
                       time.time(), size_bytes, path, owner)


def load(source: str, path: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads a dataset's arrays, given ``DatasetInfo.source`` and ``.path`` (used by the worker)."""
    if source == "builtin":
        return load_digits()
    if source == "upload":
        return load_arrays(path)
    if source == "folder":
        return parse_folder(pathlib.Path(path), max_bytes, where="the dataset folder")
    raise AssertionError(source)
