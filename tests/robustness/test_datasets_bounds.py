"""Issue 11, items 2, 3, 5, 10, 11 and 15 (datasets), against real servers
with small limits (so the inputs stay small):

* 2: decoding memory is one budget for all uploads at once: one that does
  not fit beside the others is RESOURCE_EXHAUSTED (DECODE_BUDGET_EXHAUSTED),
  and eight at once stay within it; a zip member that declares more than the
  limit is refused from the listing, before it is read;
* 3: an ``.npz`` is refused from its ``.npy`` headers before an array is
  loaded; stored bytes are bounded (DATASET_STORAGE_FULL) and DeleteDataset
  (client, asyncio client and ``lossd datasets delete``) frees them, but not
  while a job that has not ended uses the dataset (DATASET_IN_USE);
* 5: archive members are counted with a stop at the limit (TOO_MANY_MEMBERS);
* 10: a full disk is RESOURCE_EXHAUSTED (DISK_FULL) wherever it shows, keeps
  what was stored and leaves no file behind; a start sweeps what a crash left;
* 11: temporary files cannot collide with a dataset's name;
* 15: class names are stored escaped, symlinks do not lead out of a folder
  dataset, and no error message names a server path.

Each refusal checks the status, the ErrorInfo reason, that health stays
SERVING and that every stored dataset is still listed and reads back the same.
Memory is the peak resident size of this process (the server runs in it),
read from /proc/self/status after resetting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

import grpc
import numpy as np
import pytest
from tests.servers import lossd_servers
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
import lossd.aio
from lossd_server.training import datasets

MiB = 1 << 20
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- servers, files and checks ---------------------------------------------------

@pytest.fixture(scope="module")
def make_server(tmp_path_factory):
    """``make_server(data_dir=None, **settings)``: a started server (``Server``:
    ``address``, ``settings.data_dir``, ``training``), stopped at the end of the module."""
    with lossd_servers(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> pathlib.Path:
    """A dataset root with class folders (``good``), a file symlink leading
    out of its folder (``file_link``), a folder symlink leading out
    (``dir_link``), a symlink that stays inside (``inner_link``), and an
    image outside the root the links point at."""
    base = tmp_path_factory.mktemp("dataset-root-parent")
    root, outside = base / "root", base / "outside"
    for name in ("good", "file_link", "dir_link", "inner_link"):
        for label in ("a", "b"):
            write_images(root / name / label, 3)
    write_images(outside / "c", 2)
    os.symlink(outside / "c" / "0.png", root / "file_link" / "a" / "stolen.png")
    os.symlink(outside / "c", root / "dir_link" / "c")
    os.symlink(root / "inner_link" / "a" / "0.png", root / "inner_link" / "b" / "again.png")
    return root


@pytest.fixture(scope="module")
def srv(make_server, dataset_root):
    """Upload limit 1 MiB (4 MiB decoded), decoding budget 16 MiB, 256 MiB of
    datasets, 100 archive members, the dataset root above."""
    return make_server(max_upload_bytes=MiB, max_decoding_bytes=16 * MiB, max_dataset_bytes=256 * MiB,
                       max_archive_members=100, dataset_root=dataset_root)


@pytest.fixture(scope="module")
def mem_srv(make_server):
    """Upload limit 4 MiB (16 MiB decoded), decoding budget 24 MiB: one
    4 MiB uint8 upload (20 MiB to decode) at a time."""
    return make_server(max_upload_bytes=4 * MiB, max_decoding_bytes=24 * MiB, max_dataset_bytes=1 << 30)


@pytest.fixture()
def client(srv):
    with lossd.Client(srv.address, timeout=60) as c:
        yield c


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: pathlib.Path, n: int, side: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(png(rng.integers(0, 256, (side, side), dtype=np.uint8)))


def class_zip(path: pathlib.Path, classes, *, n: int = 3, extra: dict | None = None) -> pathlib.Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for label in classes:
            for i in range(n):
                zf.writestr(f"{label}/{i}.png", png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def zeros_npz(path: pathlib.Path, shape, dtype=np.uint8) -> pathlib.Path:
    """Compressed all-zero images (two classes): tiny on the wire, large decoded."""
    np.savez_compressed(path, x=np.zeros(shape, dtype), y=np.arange(shape[0]) % 2)
    return path


def small_npz(path: pathlib.Path, n: int = 10, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), y=np.arange(n) % 2)
    return path


def refused(call, code: grpc.StatusCode, reason: str, *fragments: str) -> lossd.LossdError:
    with pytest.raises(lossd.LossdError) as caught:
        call()
    error = caught.value
    assert (error.code, error.reason) == (code, reason), f"{error.code.name} {error.reason}: {error.message}"
    for fragment in fragments:
        assert fragment in error.message, error.message
    return error


def assert_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lossd.v1.TrainingService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING


def stored(server) -> dict:
    """Every uploaded dataset as ListDatasets shows it, with its file read back."""
    out = {}
    with lossd.Client(server.address, timeout=60) as c:
        for d in c.list_datasets():
            if d.source != "upload":
                continue
            x, y, names = datasets.load_arrays(server.training.catalog.info(d.name).path)
            out[d.name] = (d.examples, d.image_shape, tuple(d.class_names), d.size_bytes, x.tobytes(),
                           y.tobytes(), tuple(names))
    return out


def files(server) -> list[str]:
    folder = pathlib.Path(server.settings.data_dir) / "datasets"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@contextlib.contextmanager
def unchanged(server):
    """The block may fail, but must leave health SERVING, every stored dataset
    as it was, no new file, and no memory or disk reserved."""
    before, before_files = stored(server), files(server)
    yield
    assert_serving(server.address)
    assert stored(server) == before, "a stored dataset changed"
    assert files(server) == before_files, "a refused upload left a file"
    catalog = server.training.catalog
    assert catalog.memory.held == 0 and catalog.disk.held == 0, "a reservation was not given back"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def peak_growth():
    """Yields a dict; after the block ``["bytes"]`` is how far this process's
    resident memory rose above where it started: VmHWM after resetting it
    (writing 5 to /proc/self/clear_refs), else the most VmRSS sampled."""
    out, stop, samples = {}, threading.Event(), []
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status_bytes("VmRSS")
    sampler = None
    if not reset:
        def sample():
            while not stop.is_set():
                samples.append(_status_bytes("VmRSS"))
                time.sleep(0.002)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        yield out
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        out["bytes"] = (_status_bytes("VmHWM") if reset else max(samples, default=base)) - base


def at_once(calls) -> list:
    """Runs the calls on threads released together; returns each one's result
    or the LossdError it raised."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except lossd.LossdError as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


# -- item 2: decoding memory across concurrent uploads ---------------------------

def test_a_zip_member_declaring_more_than_the_limit_is_refused_before_it_is_read(srv, tmp_path):
    # The bomb, scaled to the 1 MiB upload limit: 24 MiB of zeros as
    # a/big.png in a 24 KiB zip. Eight at once used to read 8 x 24 MiB.
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("a/big.png", "w") as member:
            for _ in range(24):
                member.write(bytes(MiB))
        zf.writestr("b/0.png", png(np.zeros((8, 8), np.uint8)))
    assert path.stat().st_size < MiB
    with unchanged(srv), peak_growth() as peak, lossd.Client(srv.address, timeout=60) as c:
        results = at_once([lambda i=i: c.upload_dataset(path, name=f"bomb{i}") for i in range(8)])
    for error in results:
        assert isinstance(error, lossd.LossdError), error
        assert (error.code, error.reason) == (INVALID, "UPLOAD_TOO_LARGE"), error
        assert "the files hold more than 4,194,304 bytes" in error.message
    assert peak["bytes"] < 16 * MiB, f"peak grew {peak['bytes'] / MiB:.0f} MiB"


def test_an_upload_that_does_not_fit_beside_another_is_resource_exhausted(mem_srv, tmp_path, monkeypatch):
    path = zeros_npz(tmp_path / "x.npz", (16, 512, 512))  # 4 MiB of uint8: 20 MiB to decode
    catalog, entered, release = mem_srv.training.catalog, threading.Event(), threading.Event()
    real = datasets.normalize

    def held(*args, **kwargs):  # the first upload stops inside decoding, holding its share
        if not entered.is_set():
            entered.set()
            release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "normalize", held)
    with lossd.Client(mem_srv.address, timeout=60) as c:
        first = []
        thread = threading.Thread(target=lambda: first.append(c.upload_dataset(path, name="first")))
        thread.start()
        try:
            assert entered.wait(30)
            assert catalog.memory.held >= 20 * MiB
            error = refused(lambda: c.upload_dataset(path, name="second"), EXHAUSTED, "DECODE_BUDGET_EXHAUSTED",
                            "max_decoding_bytes", "Retry once")
            assert error.metadata["limit_bytes"] == str(24 * MiB)
            assert int(error.metadata["free_bytes"]) < int(error.metadata["needed_bytes"])
            assert "second" not in {d.name for d in c.list_datasets()}
        finally:
            release.set()
            thread.join(60)
        assert first and first[0].examples == 16
        assert catalog.memory.held == 0, "the finished upload kept its share"
        assert c.upload_dataset(path, name="second").examples == 16  # the budget is back
        assert catalog.memory.held == 0
        for name in ("first", "second"):
            c.delete_dataset(name)
    assert_serving(mem_srv.address)


def test_an_upload_larger_than_the_whole_budget_is_invalid(mem_srv, tmp_path):
    # float64: 16 MiB as loaded (within 4 x the upload limit), 26 MiB to decode: more than the 24 MiB budget.
    path = zeros_npz(tmp_path / "f64.npz", (8, 512, 512), np.float64)
    with unchanged(mem_srv), lossd.Client(mem_srv.address, timeout=60) as c:
        error = refused(lambda: c.upload_dataset(path, name="f64"), INVALID, "UPLOAD_TOO_LARGE",
                        "Expected at most 25,165,824 (the server's max_decoding_bytes)")
    assert int(error.metadata["needed_bytes"]) > 24 * MiB


def test_eight_concurrent_uploads_stay_within_the_decoding_budget(mem_srv, tmp_path):
    path = zeros_npz(tmp_path / "x.npz", (16, 512, 512))  # 20 MiB each to decode; 160 MiB for eight
    with lossd.Client(mem_srv.address, timeout=60) as c:
        c.upload_dataset(path, name="warm-up")  # first-use allocations happen outside the measurement
        c.delete_dataset("warm-up")
        with peak_growth() as peak:
            results = at_once([lambda i=i: c.upload_dataset(path, name=f"many{i}") for i in range(8)])
        done = [r for r in results if not isinstance(r, lossd.LossdError)]
        for error in (r for r in results if isinstance(r, lossd.LossdError)):
            assert (error.code, error.reason) == (EXHAUSTED, "DECODE_BUDGET_EXHAUSTED"), error
        assert done, "not one upload got through"
        assert {d.name for d in done} <= {d.name for d in c.list_datasets()}
        for d in done:
            c.delete_dataset(d.name)
    assert mem_srv.training.catalog.memory.held == 0
    # The budget (24 MiB) plus what the gRPC threads and the upload files take.
    assert peak["bytes"] < 48 * MiB, f"peak grew {peak['bytes'] / MiB:.0f} MiB for {len(done)} upload(s)"
    assert_serving(mem_srv.address)


# -- item 3: .npz headers, stored bytes, DeleteDataset -----------------------------

def test_an_npz_is_refused_from_its_headers_before_an_array_is_loaded(srv, client, tmp_path):
    # The 261 KB .npz, scaled: 16 MiB of uint8 zeros in 16 KiB decode
    # to 64 MiB of float32, 16 times the 4 MiB this server allows.
    path = zeros_npz(tmp_path / "big.npz", (64, 512, 512))
    assert path.stat().st_size < 100_000
    with unchanged(srv), peak_growth() as peak:
        refused(lambda: client.upload_dataset(path, name="big"), INVALID, "UPLOAD_TOO_LARGE",
                "decodes to 67,108,864 bytes", "Expected at most 4,194,304")
        refused(lambda: client.upload_dataset(zeros_npz(tmp_path / "tall.npz", (2, 4096, 4)), name="tall"),
                INVALID, "BAD_DATASET", "expected image sides of 1 to 1024 pixels. Received: 4096x4")
    assert peak["bytes"] < 8 * MiB, f"peak grew {peak['bytes'] / MiB:.0f} MiB"


def test_stored_bytes_are_bounded_and_delete_frees_them(make_server, tmp_path):
    srv = make_server(max_upload_bytes=MiB, max_dataset_bytes=10 * MiB)
    path = zeros_npz(tmp_path / "x.npz", (16, 256, 256))  # 4 MiB stored
    with lossd.Client(srv.address, timeout=60) as c:
        a, b = c.upload_dataset(path, name="a"), c.upload_dataset(path, name="b")
        assert a.size_bytes > 4 * MiB and a.size_bytes + b.size_bytes <= 10 * MiB
        with unchanged(srv):
            error = refused(lambda: c.upload_dataset(path, name="c"), EXHAUSTED, "DATASET_STORAGE_FULL",
                            "max_dataset_bytes", "DeleteDataset")
        assert int(error.metadata["free_bytes"]) == 10 * MiB - a.size_bytes - b.size_bytes
        c.delete_dataset("a")
        assert srv.training.store.dataset_bytes() == b.size_bytes
        assert "a" not in {d.name for d in c.list_datasets()}
        assert c.upload_dataset(path, name="c").examples == 16
        used = sum(p.stat().st_size for p in (pathlib.Path(srv.settings.data_dir) / "datasets").rglob("*")
                   if p.is_file())
        assert used == srv.training.store.dataset_bytes() <= 10 * MiB
    assert_serving(srv.address)


def test_delete_refuses_unknown_built_in_and_folder_names(client, srv):
    with unchanged(srv):
        error = refused(lambda: client.delete_dataset("nope"), grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND",
                        "'nope' does not exist")
        assert error.metadata == {"dataset": "nope"}
        refused(lambda: client.delete_dataset("digits"), INVALID, "DATASET_NOT_DELETABLE", "built in")
        refused(lambda: client.delete_dataset("folder:good"), INVALID, "DATASET_NOT_DELETABLE", "a folder")


def test_a_dataset_a_queued_job_uses_can_be_deleted_only_once_the_job_ended(srv, client, tmp_path, monkeypatch):
    # The scheduler starts nothing here, so the job stays queued.
    monkeypatch.setattr(srv.training.scheduler, "_launch", lambda: None)
    client.upload_dataset(small_npz(tmp_path / "d.npz"), name="busy")
    job = client.create_job("mlp", "busy", epochs=1, steps_per_epoch=1)
    assert job.state == "queued"
    with unchanged(srv):
        error = refused(lambda: client.delete_dataset("busy"), grpc.StatusCode.FAILED_PRECONDITION,
                        "DATASET_IN_USE", job.name, "once the job ends or is cancelled")
        assert error.metadata == {"dataset": "busy", "job": job.name}
        refused(lambda: client.upload_dataset(small_npz(tmp_path / "e.npz", 12), name="busy", replace=True),
                grpc.StatusCode.FAILED_PRECONDITION, "DATASET_IN_USE", job.name)
    assert client.cancel_job(job).state == "cancelled"
    path = srv.training.catalog.info("busy").path
    client.delete_dataset("busy")
    assert not os.path.exists(path) and "busy" not in {d.name for d in client.list_datasets()}
    assert_serving(srv.address)


def test_the_asyncio_client_deletes(srv, tmp_path):
    async def main():
        async with lossd.aio.Client(srv.address, timeout=60) as c:
            await c.upload_dataset(small_npz(tmp_path / "d.npz"), name="async-gone")
            await c.delete_dataset("async-gone")
            with pytest.raises(lossd.LossdError) as caught:
                await c.delete_dataset("async-gone")
            return caught.value, [d.name for d in await c.list_datasets()]

    error, names = asyncio.run(main())
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    assert "async-gone" not in names


def test_lossd_datasets_delete_as_a_user_types_it(srv, client, tmp_path):
    client.upload_dataset(small_npz(tmp_path / "d.npz"), name="typed")
    lossd_cmd = pathlib.Path(sys.executable).with_name("lossd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")} | {"LOSSD_ADDRESS": srv.address}

    def run(*argv):
        return subprocess.run([str(lossd_cmd), *argv], capture_output=True, text=True, env=env, timeout=120)

    done = run("datasets", "delete", "typed")
    assert (done.returncode, done.stdout, done.stderr) == (0, "deleted typed\n", "")
    assert "typed" not in {d.name for d in client.list_datasets()}
    again = run("datasets", "delete", "typed", "--address", srv.address)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("error: NOT_FOUND DATASET_NOT_FOUND: Dataset 'typed' does not exist."), \
        again.stderr
    listed = run("datasets", "--help")
    assert "delete" in listed.stdout


# -- item 5: archive members -----------------------------------------------------

def test_archive_members_are_counted_with_a_stop_at_the_limit(srv, client, tmp_path, monkeypatch):
    # The 400,000 empty members, scaled to this server's 100.
    n = 5000
    tgz, bare_zip, npz = tmp_path / "many.tar.gz", tmp_path / "many.zip", tmp_path / "many.npz"
    with tarfile.open(tgz, "w:gz") as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"a/{i}.png")
            tf.addfile(info, io.BytesIO(b""))
    with zipfile.ZipFile(bare_zip, "w") as zf:
        for i in range(n):
            zf.writestr(f"a/{i}.png", b"")
    small_npz(npz)
    with zipfile.ZipFile(npz, "a") as zf:
        for i in range(n):
            zf.writestr(f"extra{i}.npy", b"")

    headers, listings = [], []
    real_next, real_list = tarfile.TarFile.next, zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: headers.append(1) or real_next(self))
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: listings.append(1) or real_list(self))
    with unchanged(srv):
        for path in (tgz, bare_zip, npz):
            headers.clear(), listings.clear()
            start = time.process_time()
            error = refused(lambda: client.upload_dataset(path, name="many"), INVALID, "TOO_MANY_MEMBERS",
                            "expected at most 100 files and folders", "max_archive_members")
            assert time.process_time() - start < 2.0
            assert error.metadata == {"limit": "100"}
            assert len(headers) <= 102, f"tarfile read {len(headers)} headers of {path.name}"
            assert listings == [], f"zipfile listed {path.name} past the limit"


# -- item 10: a full disk ----------------------------------------------------------

def _full_disk(monkeypatch, when=lambda f: True):
    real = datasets.write_chunk

    def write_chunk(f, data):
        if when(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", "")))
        return real(f, data)

    monkeypatch.setattr(datasets, "write_chunk", write_chunk)


@pytest.mark.parametrize("where", ["receiving", "storing"])
def test_a_full_disk_is_resource_exhausted_and_keeps_what_was_stored(srv, client, tmp_path, monkeypatch, where):
    client.upload_dataset(small_npz(tmp_path / "old.npz", 10), name=f"full-{where}")
    saving = (lambda f: "save-" in str(getattr(f, "name", ""))) if where == "storing" else (lambda f: True)
    _full_disk(monkeypatch, saving)
    with unchanged(srv):
        for name, replace in ((f"new-{where}", False), (f"full-{where}", True)):  # a new one, and a replace
            error = refused(lambda: client.upload_dataset(small_npz(tmp_path / "new.npz", 14), name=name,
                                                          replace=replace),
                            EXHAUSTED, "DISK_FULL", "disk is full", "nothing of it was kept")
            assert str(srv.settings.data_dir) not in error.message
    monkeypatch.undo()
    assert client.upload_dataset(tmp_path / "new.npz", name=f"full-{where}", replace=True).examples == 14


def test_a_full_disk_under_the_store_removes_the_new_file(srv, client, tmp_path, monkeypatch):
    client.upload_dataset(small_npz(tmp_path / "old.npz", 10), name="full-record")

    def put_dataset(name, info, owner=""):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = 13  # SQLITE_FULL
        raise error

    monkeypatch.setattr(srv.training.store, "put_dataset", put_dataset)
    with unchanged(srv):
        for name, replace in (("new-record", False), ("full-record", True)):
            refused(lambda: client.upload_dataset(small_npz(tmp_path / "new.npz", 14), name=name, replace=replace),
                    EXHAUSTED, "DISK_FULL")


def test_a_start_sweeps_what_a_crash_left_and_keeps_every_dataset(make_server, tmp_path):
    data_dir = tmp_path / "data"
    first = make_server(data_dir=data_dir)
    with lossd.Client(first.address, timeout=60) as c:
        c.upload_dataset(small_npz(tmp_path / "v.npz", 10), name="v")
        c.upload_dataset(small_npz(tmp_path / "w.npz", 12), name="w")
    kept = stored(first)
    first.stop(0)
    folder = data_dir / "datasets"
    v_file = pathlib.Path(json.loads(_record(data_dir, "v"))["path"]).name
    # What crashes left: uploads being received or saved, an old server's
    # temporary files (eight `.upload-*`, `fill1.tmp.npz`), and a replaced
    # file whose removal did not happen.
    (folder / ".tmp" / "upload-abc.zip").write_bytes(b"partial")
    (folder / ".tmp" / "save-abc.npz").write_bytes(b"partial")
    for i in range(8):
        (folder / f".upload-{i}.npz").write_bytes(b"partial")
    (folder / "fill1.tmp.npz").write_bytes(b"partial")
    (folder / "v@0123456789abcdef.npz").write_bytes(b"superseded")
    (folder / "lost@0123456789abcdef.npz").write_bytes(b"no record: kept, it may be someone's data")
    second = make_server(data_dir=data_dir)
    assert files(second) == sorted(["lost@0123456789abcdef.npz", v_file,
                                    pathlib.Path(json.loads(_record(data_dir, "w"))["path"]).name])
    assert stored(second) == kept
    assert_serving(second.address)


def _record(data_dir: pathlib.Path, name: str) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "lossd.sqlite3")) as db:
        return db.execute("SELECT info FROM datasets WHERE name = ?", (name,)).fetchone()[0]


# -- item 11: names ------------------------------------------------------------------

def test_temporary_files_never_collide_with_a_dataset_name(srv, client, tmp_path):
    client.upload_dataset(small_npz(tmp_path / "a.npz", 10, seed=1), name="v.tmp")
    before = stored(srv)["v.tmp"]
    client.upload_dataset(small_npz(tmp_path / "b.npz", 12, seed=2), name="v")
    client.upload_dataset(small_npz(tmp_path / "c.npz", 14, seed=3), name="v", replace=True)
    assert stored(srv)["v.tmp"] == before  # listed, and its file reads back the same
    info = srv.training.catalog.info("v.tmp")
    x, y, _ = datasets.load("upload", info.path, srv.settings.max_upload_bytes)  # what a job on it loads
    assert x.shape == (10, 8, 8, 1)
    own = {pathlib.Path(srv.training.catalog.info(name).path).name for name in ("v", "v.tmp")}
    assert {name for name in files(srv) if name.startswith("v")} == own, "a file is named like a dataset"
    assert not any(name.startswith(".tmp/") for name in files(srv)), "a temporary file was left"


# -- item 15: class names, symlinks, paths -----------------------------------------

def test_class_names_are_stored_escaped(srv, client, tmp_path):
    red, flip = "\x1b[31mred\x1b[0m", "\u202eevil"
    info = client.upload_dataset(class_zip(tmp_path / "ansi.zip", [red, flip, "plain"]), name="ansi")
    assert sorted(info.class_names) == sorted(["\\x1b[31mred\\x1b[0m", "\\u202eevil", "plain"])
    listed = next(d for d in client.list_datasets() if d.name == "ansi")
    assert listed.class_names == info.class_names
    assert not any(c != " " and not c.isprintable() for name in listed.class_names for c in name)
    stored_names = datasets.load_arrays(srv.training.catalog.info("ansi").path)[2]
    assert stored_names == info.class_names
    error = refused(lambda: client.upload_dataset(class_zip(tmp_path / "bad.zip", ["a", "b"],
                                                            extra={f"{red}/broken.png": b"not an image"}),
                                                  name="ansi-bad"),
                    INVALID, "CORRUPT_IMAGE", "\\x1b[31mred")
    assert "\x1b" not in error.message and "\x1b" not in error.metadata["file"]


def test_symlinks_do_not_lead_out_of_a_folder_dataset(srv, client, dataset_root):
    with unchanged(srv):
        for ref, link in (("folder:file_link", "a/stolen.png"), ("folder:dir_link", "c")):
            error = refused(lambda: client.create_job("mlp", ref, epochs=1), INVALID, "PATH_OUTSIDE_ROOT",
                            f"{ref}: {link!r} is a symbolic link that points outside")
            assert str(dataset_root.parent) not in error.message + json.dumps(error.metadata)
    inner = srv.training.catalog.info("folder:inner_link")  # a link that stays inside is followed
    assert inner.examples == 7


def test_no_dataset_error_names_a_server_path(srv, client, tmp_path, dataset_root, monkeypatch):
    data_dir = str(pathlib.Path(srv.settings.data_dir).resolve())
    messages = []

    def collect(call):
        with pytest.raises(lossd.LossdError) as caught:
            call()
        messages.append(f"{caught.value.reason}: {caught.value.message} {json.dumps(caught.value.metadata)}")

    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all" * 10)
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 broken" * 10)
    (tmp_path / "garbage.tar").write_bytes(os.urandom(2048))
    (tmp_path / "short.npz").write_bytes(small_npz(tmp_path / "s.npz").read_bytes()[:300])
    for name in ("garbage.npz", "garbage.zip", "garbage.tar", "short.npz"):
        collect(lambda: client.upload_dataset(tmp_path / name, name="leak"))
    collect(lambda: client.upload_dataset(class_zip(tmp_path / "c.zip", ["a", "b"], extra={"a/x.png": b"bad"}),
                                          name="leak"))
    for ref in ("folder:missing", "folder:../outside", "folder:file_link", "folder:dir_link", "nope"):
        collect(lambda: client.create_job("mlp", ref, epochs=1))
    collect(lambda: client.delete_dataset("nope"))
    _full_disk(monkeypatch)
    collect(lambda: client.upload_dataset(small_npz(tmp_path / "d.npz"), name="leak"))
    monkeypatch.undo()
    with pytest.raises(datasets.DatasetError) as caught:  # a job's process loading a file that went away
        datasets.load("upload", str(pathlib.Path(data_dir) / "datasets" / "gone@0123456789abcdef.npz"), MiB)
    messages.append(caught.value.message)
    assert len(messages) == 13
    for message in messages:
        for path in (data_dir, str(dataset_root.parent), str(tmp_path), "/tmp/", "/datasets/"):
            assert path not in message, message
