"""Dataset checks, without a server or TensorFlow: digits, .npz, archives of
class folders (real PNGs), folders under the dataset root."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import tarfile
import zipfile

import numpy as np
import pytest

from lossd_server.errors import InvalidArgument, ResourceExhausted, disk_full
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


def test_a_folder_reference_must_be_printable(tmp_path):
    (tmp_path / "root" / "\x1b[2J").mkdir(parents=True)
    with pytest.raises(DatasetError) as exc:
        datasets.resolve_folder(tmp_path / "root", "\x1b[2J")
    assert exc.value.reason == "BAD_DATASET_NAME" and "\x1b" not in exc.value.message + str(exc.value.metadata)


def test_folders_off_without_a_root():
    with pytest.raises(DatasetError) as exc:
        datasets.resolve_folder(None, "set")
    assert exc.value.reason == "FOLDER_DATASETS_DISABLED"


@pytest.mark.parametrize("name", ["", "digits", "../x", "a" * 65, "folder-x", "a b"])
def test_bad_dataset_names(name):
    with pytest.raises(DatasetError):
        datasets.check_name(name)


# -- issue 11: bounds, names, links (the server-level checks are in tests/robustness/test_datasets_bounds.py)

def test_printable_escapes_what_a_terminal_would_act_on():
    assert datasets.printable("plain name é 数字") == "plain name é 数字"
    assert datasets.printable("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert datasets.printable("a\nb\tc\u202ed\x00") == "a\\nb\\tc\\u202ed\\x00"
    # Backslashes too, so an escaped name never equals a literal one.
    assert datasets.printable("a\\x1b") == "a\\\\x1b" != datasets.printable("a\x1b")


def test_a_byte_budget_refuses_at_once_and_gives_everything_back():
    budget = datasets.ByteBudget(100, setting="max_things", what="things", reason="THINGS_BUSY",
                                 advice="Retry later.", spent=lambda: 10)
    with budget.reserve() as first:
        first.take(60, "First")
        with pytest.raises(InvalidArgument) as alone:
            budget.reserve().take(101, "Huge")
        assert alone.value.reason == "UPLOAD_TOO_LARGE" and "Expected at most 100 (the server's max_things)" \
            in alone.value.message
        with budget.reserve() as second:
            with pytest.raises(ResourceExhausted) as busy:
                second.take(31, "Second")
            assert busy.value.reason == "THINGS_BUSY" and busy.value.metadata["free_bytes"] == "30"
            assert "Second needs 31 more bytes of things, but only 30" in busy.value.message
            second.take(30, "Second")
            assert budget.held == 90
        first.give_back(50)
        assert budget.held == 10
    assert budget.held == 0


def test_an_image_file_larger_than_any_image_is_refused_before_it_is_read():
    def never():
        raise AssertionError("read")

    size = datasets.MAX_IMAGE_FILE_BYTES + 1
    with pytest.raises(DatasetError) as exc:
        datasets.images_from_members([("a/big.png", size, never), ("b/0.png", 10, never)], 1 << 30, "up")
    assert exc.value.reason == "IMAGE_TOO_LARGE" and exc.value.metadata == {"file": "a/big.png"}


def test_image_reads_and_pixels_are_reserved_and_given_back(tmp_path):
    budget = datasets.ByteBudget(MB, setting="s", what="memory", reason="BUSY", advice="")
    path = zip_of_class_folders(tmp_path / "d.zip", 30)
    with budget.reserve() as memory:
        x, _, _ = datasets.parse_archive(path, "zip", MB, memory=memory)
        assert memory.held == 5 * x.size  # the uint8 images and their float32 copy, until the upload ends
    assert budget.held == 0
    with pytest.raises(InvalidArgument) as exc:  # 30 images of 8x8: 9,600 bytes at the end
        datasets.parse_archive(path, "zip", MB, memory=datasets.ByteBudget(
            9_000, setting="max_decoding_bytes", what="memory", reason="BUSY", advice="").reserve())
    assert exc.value.reason == "UPLOAD_TOO_LARGE" and "max_decoding_bytes" in exc.value.message


def test_tar_file_sizes_count_before_their_data_is_skipped(tmp_path):
    # A non-image member is never decoded, but skipping it in a .tar.gz
    # decompresses it: its declared size counts.
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("README.bin")
        info.size = 8 * MB
        tf.addfile(info, io.BytesIO(bytes(8 * MB)))
    with pytest.raises(DatasetError) as exc:
        datasets.parse_archive(tmp_path / "d.tar.gz", "tar", MB)
    assert exc.value.reason == "UPLOAD_TOO_LARGE" and "hold more than 4,194,304 bytes" in exc.value.message


def test_a_large_pax_header_is_refused_before_tarfile_reads_it(tmp_path):
    with tarfile.open(tmp_path / "d.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/0.png")
        info.pax_headers = {"comment": "x" * (2 * MB)}
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(DatasetError) as exc:
        datasets.parse_archive(tmp_path / "d.tar", "tar", 64 * MB, where="up")
    assert exc.value.reason == "BAD_ARCHIVE" and exc.value.message.startswith("up: a tar header")


def test_members_are_counted_with_a_stop(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for i in range(50):
            zf.writestr(f"a/{i}.png", b"")
    write_class_folders(tmp_path / "folder", 50)
    for parse in (lambda: datasets.parse_archive(tmp_path / "d.zip", "zip", MB, max_members=10, where="up"),
                  lambda: datasets.parse_folder(tmp_path / "folder", MB, max_members=10, where="folder:f")):
        with pytest.raises(DatasetError) as exc:
            parse()
        assert exc.value.reason == "TOO_MANY_MEMBERS" and "expected at most 10 files" in exc.value.message


@pytest.mark.parametrize("target", ["outside", "dangling", "loop"])
def test_a_link_out_of_a_folder_dataset_is_refused(tmp_path, target):
    write_class_folders(tmp_path / "set", 20)
    (tmp_path / "outside.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    link = tmp_path / "set" / "class_0" / "link.png"
    if target == "loop":
        os.symlink(link, link)
    else:
        os.symlink(tmp_path / ("outside.png" if target == "outside" else "missing.png"), link)
    with pytest.raises(DatasetError) as exc:
        datasets.parse_folder(tmp_path / "set", MB, where="folder:set")
    assert exc.value.reason == "PATH_OUTSIDE_ROOT" and str(tmp_path) not in exc.value.message
    assert exc.value.message.startswith("folder:set: 'class_0/link.png' is a symbolic link")


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets, "write_chunk", full)
    x, y = np.zeros((2, 8, 8, 1), np.float32), np.arange(2)
    with pytest.raises(OSError) as exc:
        datasets.save_arrays(tmp_path / "d.npz", x, y, ["a", "b"])
    assert disk_full(exc.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_sweep_keeps_every_file_a_record_might_need(tmp_path):
    (tmp_path / ".tmp").mkdir()
    leftovers = [".tmp/upload-1.zip", ".tmp/save-2.npz", ".upload-x.npz", "v.tmp.npz", "v@00000000000000aa.npz"]
    kept = ["v@00000000000000bb.npz", "w.tmp.npz", "orphan@00000000000000cc.npz", "old.npz", "notes.txt"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = datasets.sweep(tmp_path, {"v": "v@00000000000000bb.npz", "w.tmp": "w.tmp.npz"})
    assert sorted(removed) == sorted(pathlib.PurePath(n).name for n in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(kept)


def _catalog(tmp_path, **settings):
    from lossd_server.config import Settings
    from lossd_server.training.catalog import DatasetCatalog
    from lossd_server.state.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "lossd.sqlite3")
    return DatasetCatalog(Settings(data_dir=tmp_path, **settings), store, tmp_path / "datasets"), store


@pytest.mark.parametrize("state", ["queued", "running", "cancelling"])
def test_a_dataset_is_in_use_until_its_jobs_end(tmp_path, state):
    from lossd_server.callers import ANONYMOUS
    from lossd_server.errors import FailedPrecondition
    from lossd_server.state.store import JobRecord

    catalog, store = _catalog(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4) % 2)
    catalog.upload("d", "npz", os.path.getsize(tmp_path / "d.npz"), iter([(tmp_path / "d.npz").read_bytes()]),
                   caller=ANONYMOUS)
    store.create_job(JobRecord("j1", {"dataset": "d"}, {}, "classifier", state=state))
    with pytest.raises(FailedPrecondition) as exc:
        catalog.delete("d", ANONYMOUS)
    assert exc.value.reason == "DATASET_IN_USE" and exc.value.metadata == {"dataset": "d", "job": "jobs/j1"}
    store.update_job("j1", state="cancelled")
    with catalog.using("d"):  # a job on it being created
        with pytest.raises(FailedPrecondition) as exc:
            catalog.delete("d", ANONYMOUS)
        assert "a job being created" in exc.value.message
    catalog.delete("d", ANONYMOUS)
    assert store.get_dataset("d") is None and store.dataset_bytes() == 0
    assert [p for p in (tmp_path / "datasets").rglob("*") if p.is_file()] == []
