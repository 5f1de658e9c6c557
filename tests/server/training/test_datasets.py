"""Dataset checks, without a server or TensorFlow: digits, .npz, archives of
class folders (real PNGs), folders under the dataset root."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from lossd_server.training import datasets
from lossd_server.training.datasets import DatasetError

from digit_files import digits_uint8, png_bytes, write_class_folders, zip_of_class_folders  # noqa: E402

MB = 1 << 20


def test_digits_are_the_real_sklearn_digits():
    x, y, names = datasets.load_digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 == x.min() and x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10)) and names == [str(i) for i in range(10)]


def test_npz_uint8_with_string_labels(tmp_path):
    x, y = digits_uint8(50)
    labels = np.array([f"digit{v}" for v in y])
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    xs, ys, names = datasets.parse_npz(tmp_path / "d.npz", MB)
    assert xs.shape == (50, 8, 8, 1) and xs.dtype == np.float32 and xs.max() <= 1.0
    assert names == sorted(set(labels.tolist()))
    assert [names[i] for i in ys] == labels.tolist()


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 8, 8), np.uint8)}, "needs arrays `x` and `y`"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(3)}, r"one label per image, shape \[4\]"),
    ({"x": np.full((4, 8, 8), 2.0, np.float32), "y": np.arange(4)}, r"must lie in \[0, 1\]"),
    ({"x": np.zeros((4, 8, 8, 5), np.uint8), "y": np.arange(4)}, "C of 1 or 3"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4)}, "at least 2 classes"),
])
def test_npz_bad_content_is_refused_with_what_was_received(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=match):
        datasets.parse_npz(tmp_path / "bad.npz", MB)


def test_npz_header_checked_before_decompressing(tmp_path):
    # 64 MB of zeros compresses to almost nothing: the header check refuses it
    # before anything that size is allocated.
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((1000, 256, 256), np.uint8), y=np.arange(1000))
    assert os.path.getsize(tmp_path / "bomb.npz") < MB
    with pytest.raises(DatasetError, match="decodes to") as exc:
        datasets.parse_npz(tmp_path / "bomb.npz", MB)
    assert exc.value.reason == "UPLOAD_TOO_LARGE"


def test_zip_of_class_folders_decodes_real_pngs(tmp_path):
    path = zip_of_class_folders(tmp_path / "d.zip", 30)
    x, y, names = datasets.parse_archive(path, "zip", MB)
    ref, labels = digits_uint8(30)
    assert x.shape == (30, 8, 8, 1) and names == sorted({str(v) for v in labels})
    # Members are sorted by path, so compare as a set of (image, label) pairs.
    got = {(img.tobytes(), names[lab]) for img, lab in zip((x[..., 0] * 255).round().astype(np.uint8), y)}
    assert got == {(img.tobytes(), str(lab)) for img, lab in zip(ref, labels)}


def test_corrupt_image_is_named_in_the_error(tmp_path):
    path = zip_of_class_folders(tmp_path / "d.zip", 20, corrupt="digits/3/broken.png")
    with pytest.raises(DatasetError, match="digits/3/broken.png") as exc:
        datasets.parse_archive(path, "zip", MB)
    assert exc.value.reason == "CORRUPT_IMAGE" and exc.value.metadata["file"] == "digits/3/broken.png"


def test_images_of_different_sizes_are_refused(tmp_path):
    x, _ = digits_uint8(2)
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        for name, data in (("a/0.png", png_bytes(x[0])), ("b/1.png", png_bytes(np.zeros((9, 8), np.uint8)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match=r"size of the first .*Received: b/1.png of 8x9"):
        datasets.parse_archive(tmp_path / "d.tar.gz", "tar", MB)


def test_folder_under_root(tmp_path):
    write_class_folders(tmp_path / "root" / "set", 20)
    path = datasets.resolve_folder(tmp_path / "root", "set")
    x, y, names = datasets.parse_folder(path, MB)
    assert x.shape == (20, 8, 8, 1) and len(names) == len(set(y.tolist()))


@pytest.mark.parametrize("rel", ["../outside", "/etc", "set/../../outside", "link"])
def test_folder_escaping_the_root_is_refused(tmp_path, rel):
    (tmp_path / "root" / "set").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    with pytest.raises(DatasetError) as exc:
        datasets.resolve_folder(tmp_path / "root", rel)
    assert exc.value.reason == "PATH_OUTSIDE_ROOT"


def test_folders_off_without_a_root():
    with pytest.raises(DatasetError) as exc:
        datasets.resolve_folder(None, "set")
    assert exc.value.reason == "FOLDER_DATASETS_DISABLED"


@pytest.mark.parametrize("name", ["", "digits", "../x", "a" * 65, "folder-x", "a b"])
def test_bad_dataset_names(name):
    with pytest.raises(DatasetError):
        datasets.check_name(name)
