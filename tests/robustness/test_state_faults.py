"""Issue 11, items 9, 10, 12, 13 and 15: persisted state and faults, against
real servers on their own data directories.

- Registered losses are rows of the store, written one at a time; an older
  server's ``losses.json`` is imported once.
- Corrupt state (a losses.json, a loss row, a job row, the SQLite file) never
  stops the server: it starts, evaluates, moves what it could not read into
  ``quarantine/``, and health reports ``lossd.state`` NOT_SERVING while ""
  and the services stay SERVING.
- A full disk is RESOURCE_EXHAUSTED (DISK_FULL) for registrations and
  CreateJob, leaves no temporary file, and a job finishing meanwhile frees
  its slot and is recorded once space returns, with one log line.
- A job process killed mid-job is retried from its checkpoint, up to
  ``job_max_retries`` times, each retry a job event; then it fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import signal
import sqlite3
import time
import urllib.request

import grpc
import numpy as np
import pytest
from tests.servers import PATIENCE, lossd_servers
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd

QUARANTINE = "quarantine"
DB = "lossd.sqlite3"
SQUARED = "mean(square(y_true - y_pred), axis=-1)"


@pytest.fixture()
def serve(tmp_path_factory):
    """``serve(data_dir, **settings)``: a real in-process server on a free port
    over ``data_dir``; returns the ``Server`` (``stop(0)`` it to restart on the
    same directory). Every server still running is stopped at the end."""
    with lossd_servers(tmp_path_factory) as start:
        yield start


def _address(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def _health(srv, service: str) -> int:
    with grpc.insecure_channel(_address(srv)) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def _quarantined_gauge(srv) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    line = next(l for l in text.splitlines() if l.startswith("lossd_state_quarantined_items "))
    return float(line.split()[1])


def _assert_serves_evaluation(srv) -> None:
    y_true = np.array([[0.0, 1.0], [1.0, 0.0]], "float32")
    y_pred = np.array([[0.5, 0.5], [1.0, 1.0]], "float32")
    with lossd.Client(_address(srv), timeout=60) as client:
        result = client.evaluate("mse", y_true, y_pred)
    assert float(result.loss) == pytest.approx(float(np.mean(np.square(y_true - y_pred))))
    for service in ("", "lossd.v1.LossService", "lossd.v1.TrainingService"):
        assert _health(srv, service) == health_pb2.HealthCheckResponse.SERVING, service


def _assert_degraded(srv, count: int) -> list[pathlib.Path]:
    """The server serves, reports the state degraded, and ``count`` items are in the quarantine."""
    _assert_serves_evaluation(srv)
    assert _health(srv, "lossd.state") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _quarantined_gauge(srv) == count
    items = sorted((srv.settings.data_dir / QUARANTINE).iterdir())
    assert len([p for p in items if not p.name.endswith(("-wal", "-shm"))]) == count, items
    return items


def _registered(srv) -> dict[str, str]:
    with lossd.Client(_address(srv), timeout=60) as client:
        return {i.name: i.expression for i in client.losses() if i.source == "expression"}


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registered losses live in the store --------------------------------------------------------------------------

def test_registrations_are_rows_written_one_at_a_time(tmp_path, serve):
    srv = serve(tmp_path)
    with lossd.Client(_address(srv), timeout=60) as client:
        for i in range(30):
            client.register_loss(f"loss_{i}", f"{i + 1} * {SQUARED}", doc="x" * 200)
        client.register_loss("loss_3", f"0.5 * {SQUARED}", replace=True)
        client.delete_loss("loss_4")
    srv.stop(0)
    assert not (tmp_path / "losses.json").exists()
    with contextlib.closing(sqlite3.connect(tmp_path / DB)) as db, db:
        rows = dict(db.execute("SELECT name, record FROM losses").fetchall())
    assert len(rows) == 29 and json.loads(rows["loss_3"])["expression"] == f"0.5 * {SQUARED}"

    again = serve(tmp_path)
    losses = _registered(again)
    assert set(losses) == {f"loss_{i}" for i in range(30)} - {"loss_4"}
    assert losses["loss_3"] == f"0.5 * {SQUARED}" and losses["loss_7"] == f"8 * {SQUARED}"
    assert _health(again, "lossd.state") == health_pb2.HealthCheckResponse.SERVING
    assert _quarantined_gauge(again) == 0


def test_a_legacy_losses_json_is_imported_once_and_kept_aside(tmp_path, serve):
    legacy = [{"name": "old_one", "expression": SQUARED, "params": {}, "inputs": ["y_true", "y_pred"], "doc": "a"},
              {"name": "old_two", "expression": "mean(abs(y_true - y_pred) * k, axis=-1)", "params": {"k": 3.0},
               "inputs": ["y_true", "y_pred"], "doc": ""}]
    (tmp_path / "losses.json").write_text(json.dumps(legacy))
    (tmp_path / ".losses-abc123").write_text("a temporary file an older server left")
    srv = serve(tmp_path, max_registered_losses=2)
    assert _registered(srv) == {"old_one": SQUARED, "old_two": legacy[1]["expression"]}
    assert not (tmp_path / "losses.json").exists() and not list(tmp_path.glob(".losses-*"))
    assert json.loads((tmp_path / "losses.json.imported").read_text()) == legacy
    with lossd.Client(_address(srv), timeout=60) as client:
        with pytest.raises(lossd.LossdError) as exc:  # the cap counts imported losses
            client.register_loss("third", SQUARED)
        assert exc.value.reason == "TOO_MANY_LOSSES"
        client.delete_loss("old_one")
    srv.stop(0)
    again = serve(tmp_path)  # the .imported file is not read again: the deletion stands
    assert set(_registered(again)) == {"old_two"}
    assert _health(again, "lossd.state") == health_pb2.HealthCheckResponse.SERVING


# -- corrupt state ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b'[{"name": "half", "expression": "mean(y_', id="truncated"),
    pytest.param(b'{"name": "not a list"}', id="malformed"),
    pytest.param(b"\xff\xfe\x00garbage", id="binary"),
])
def test_a_bad_losses_json_is_quarantined_and_the_server_serves(tmp_path, serve, content, caplog):
    (tmp_path / "losses.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="lossd_server"):
        srv = serve(tmp_path)
    [moved] = _assert_degraded(srv, 1)
    assert moved.name.endswith("losses.json") and moved.read_bytes() == content
    assert not (tmp_path / "losses.json").exists()
    lines = [r.getMessage() for r in caplog.records if "quarantine" in r.getMessage()]
    assert len(lines) == 1 and "losses.json" in lines[0] and "not a JSON list" in lines[0]
    assert all(r.exc_info is None for r in caplog.records if "quarantine" in r.getMessage())
    with lossd.Client(_address(srv), timeout=60) as client:  # registration still works
        client.register_loss("fresh", SQUARED)
    assert "fresh" in _registered(srv)


def test_a_bad_loss_row_is_quarantined_and_the_others_load(tmp_path, serve):
    srv = serve(tmp_path)
    with lossd.Client(_address(srv), timeout=60) as client:
        for name in ("good_a", "broken", "bad_expr", "good_b"):
            client.register_loss(name, SQUARED)
    srv.stop(0)
    with contextlib.closing(sqlite3.connect(tmp_path / DB)) as db, db:
        db.execute("UPDATE losses SET record = '{\"name\": \"broken\", \"expr' WHERE name = 'broken'")
        db.execute("UPDATE losses SET record = ? WHERE name = 'bad_expr'",
                   (json.dumps({"name": "bad_expr", "expression": "import os", "params": {}}),))
    again = serve(tmp_path)
    items = _assert_degraded(again, 2)
    assert set(_registered(again)) == {"good_a", "good_b"}
    saved = {json.loads(p.read_text())["row"]["name"]: json.loads(p.read_text())["row"]["record"] for p in items}
    assert saved["broken"] == '{"name": "broken", "expr'
    assert json.loads(saved["bad_expr"])["expression"] == "import os"
    with contextlib.closing(sqlite3.connect(tmp_path / DB)) as db, db:
        assert {r[0] for r in db.execute("SELECT name FROM losses")} == {"good_a", "good_b"}


def _cancelled_jobs(srv, n: int) -> list[str]:
    """``n`` real job rows (created, then cancelled before they train)."""
    ids = []
    with lossd.Client(_address(srv), timeout=120) as client:
        for i in range(n):
            job = client.create_job("mlp", "digits", epochs=1, steps_per_epoch=1, display_name=f"job {i}")
            client.cancel_job(job)
            ids.append(job.id)
    return ids


@pytest.mark.parametrize("column, value", [
    pytest.param("spec", '{"model": {"preset": "mlp"', id="spec-not-json"),
    pytest.param("state", "exploded", id="unknown-state"),
    pytest.param("spec", '{"model": {"preset": "mlp", "params": {}}}', id="spec-missing-fields"),
    pytest.param("progress", "[1, 2]", id="progress-not-an-object"),
])
def test_a_malformed_job_row_is_quarantined_and_the_others_are_served(tmp_path, serve, column, value):
    srv = serve(tmp_path, max_concurrent_jobs=1)
    ids = _cancelled_jobs(srv, 3)
    srv.stop(0)
    with contextlib.closing(sqlite3.connect(tmp_path / DB)) as db, db:
        original = db.execute(f"SELECT {column} FROM jobs WHERE id = ?", (ids[1],)).fetchone()[0]
        db.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", (value, ids[1]))
    again = serve(tmp_path, max_concurrent_jobs=1)
    [moved] = _assert_degraded(again, 1)
    saved = json.loads(moved.read_text())
    assert saved["row"]["id"] == ids[1] and saved["row"][column] == value
    assert [e["kind"] for e in saved["events"]][:1] == ["state"]
    assert original != value
    with lossd.Client(_address(again), timeout=60) as client:
        assert sorted(j.id for j in client.list_jobs()) == sorted([ids[0], ids[2]])
        assert client.get_job(ids[0]).state == "cancelled"
        with pytest.raises(lossd.LossdError) as exc:
            client.get_job(ids[1])
        assert exc.value.reason == "JOB_NOT_FOUND"


def _overwrite_pages(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    for start in range(page, len(data), page):  # every page but the first (the header and schema root)
        data[start:start + page] = bytes([0xA5]) * page
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: p.write_bytes(b"this is not a database" * 100), id="not-a-database"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:100] + b"\0" * (p.stat().st_size - 100)), id="zeroed"),
    pytest.param(_overwrite_pages, id="pages-overwritten"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), id="truncated"),
])
def test_a_damaged_database_is_moved_whole_and_a_fresh_one_serves(tmp_path, serve, damage):
    srv = serve(tmp_path, max_concurrent_jobs=1)
    _cancelled_jobs(srv, 2)
    with lossd.Client(_address(srv), timeout=60) as client:
        for i in range(40):
            client.register_loss(f"kept_{i}", SQUARED, doc="padding " * 100)
    srv.stop(0)
    damage(tmp_path / DB)
    digest = _sha(tmp_path / DB)

    again = serve(tmp_path, max_concurrent_jobs=1)
    items = _assert_degraded(again, 1)
    [moved] = [p for p in items if p.name.endswith(DB)]
    assert _sha(moved) == digest  # moved whole, byte for byte
    with lossd.Client(_address(again), timeout=60) as client:
        assert client.list_jobs() == [] and _registered(again) == {}
        client.register_loss("after", SQUARED)  # the fresh database takes writes
    assert set(_registered(again)) == {"after"}


# -- disk full ----------------------------------------------------------------------------------------------------

def _fill_database(srv) -> None:
    """Makes the store's database refuse to grow: SQLite then fails every write
    that needs a new page with SQLITE_FULL, "database or disk is full" (the
    error a full disk gives)."""
    db = srv.training.store._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def _exhaust_events(srv) -> None:
    """After ``_fill_database``, takes the room left in the events table's last
    pages (as other jobs' events would), so any job's next event needs a page."""
    from lossd_server.errors import ResourceExhausted

    for size in (2000, 500, 100, 20, 0):
        for _ in range(500):
            try:
                srv.training.store.append_event("~filler", "message", {"text": "x" * size})
            except ResourceExhausted:
                break


def _unfill_database(srv) -> None:
    srv.training.store._db.execute("PRAGMA max_page_count = 1073741823")


def _files(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_disk_full_refuses_registrations_and_jobs_with_resource_exhausted(tmp_path, serve):
    srv = serve(tmp_path, max_concurrent_jobs=1)
    before = _files(tmp_path)
    _fill_database(srv)
    try:
        with lossd.Client(_address(srv), timeout=60) as client:
            refused, n = [], 0
            for size in (1000, 300, 100, 30, 0):  # fill what room the last pages still have
                for _ in range(50):
                    n += 1
                    try:
                        client.register_loss(f"filler_{n}", SQUARED, doc="d" * size)
                    except lossd.LossdError as exc:
                        refused.append((n, exc))
                        break
            assert len(refused) == 5, "the database never filled"
            i, exc = refused[0]
            assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.reason == "DISK_FULL"
            assert str(tmp_path) not in exc.message and "disk is full" in exc.message
            assert not {f"filler_{i}" for i, _ in refused} & set(_registered(srv))  # the registry took none
            with pytest.raises(lossd.LossdError) as job_exc:
                # A spec larger than a page needs pages the database may not add.
                client.create_job("mlp", "digits", epochs=1, steps_per_epoch=1,
                                  loss={"terms": [{"loss": {"expression": SQUARED + " " * 1900},
                                                   "weight": 1.0, "label": f"t{t}"} for t in range(4)]})
            assert job_exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert job_exc.value.reason == "DISK_FULL"
            assert client.list_jobs() == []
    finally:
        _unfill_database(srv)
    new = {f for f in _files(tmp_path) - before if not f.startswith(DB)}
    assert new == set(), f"temporary files left behind: {new}"
    with lossd.Client(_address(srv), timeout=60) as client:  # space is back: everything works again
        client.register_loss(f"filler_{i}", SQUARED)
        assert f"filler_{i}" in _registered(srv)


def test_a_failed_write_removes_its_temporary_file_and_reports_disk_full(tmp_path):
    from lossd_server.training import loop, worker

    target = tmp_path / "checkpoint.json"
    target.write_text('{"epoch": 1}')

    def full_disk(tmp: pathlib.Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(OSError) as exc:
        loop.replace_from_temp(target, tmp_path / "tmp-checkpoint.json", full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"] and target.read_text() == '{"epoch": 1}'
    report = worker.failure_report(RuntimeError("Unable to save weights"))
    assert report["reason"] == "TRAINING_ERROR"
    try:  # h5py and Keras re-raise ENOSPC as another error; the cause still counts
        raise RuntimeError("Unable to synchronously create file") from exc.value
    except RuntimeError as wrapped:
        report = worker.failure_report(wrapped)
    assert (report["code"], report["reason"]) == ("RESOURCE_EXHAUSTED", "DISK_FULL")
    assert str(tmp_path) not in report["message"]


def test_job_errors_never_show_server_paths(tmp_path):
    from lossd_server.training import worker

    where = tmp_path / "datasets" / "mine.npz"
    report = worker.failure_report(FileNotFoundError(errno.ENOENT, "No such file or directory", str(where)))
    assert report["reason"] == "TRAINING_ERROR" and "FileNotFoundError" in report["message"]
    assert str(tmp_path) not in report["message"] and "<path>" in report["message"]
    report = worker.failure_report(ValueError("Expected 2 inputs; the loss was 1/2 of y_true / y_pred"))
    assert "1/2 of y_true / y_pred" in report["message"]  # divisions are not paths


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_job_ending_on_a_full_disk_frees_its_slot_logs_once_and_is_recorded_later(tmp_path, serve, caplog):
    srv = serve(tmp_path, max_concurrent_jobs=1, progress_every_batches=1)
    with lossd.Client(_address(srv), timeout=PATIENCE) as client:
        job = client.create_job("mlp", "digits", epochs=2, steps_per_epoch=20, batch_size=8)
        _wait_for(lambda: client.get_job(job).state == "running", PATIENCE, "the job to run")
        scheduler = srv.training.scheduler
        with caplog.at_level(logging.INFO, logger="lossd_server.training.scheduler"):
            _fill_database(srv)
            _exhaust_events(srv)
            try:
                # The process ends; its final state cannot be stored, but its slot is free.
                _wait_for(lambda: not scheduler._running and scheduler._unrecorded, PATIENCE, "the job to end")
                time.sleep(1.5)  # 15 scheduler loops on the full disk
                assert client.get_job(job).state == "running"  # what the store still says
            finally:
                _unfill_database(srv)
            finished = client.wait(job, progress=False, timeout=PATIENCE)
        assert finished.state == "succeeded", finished.error
    faults = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(faults) == 1 and "disk is full" in faults[0].getMessage(), [r.getMessage() for r in faults]
    assert faults[0].exc_info is None  # the reason says it all: no traceback


# -- a killed job process -----------------------------------------------------------------------------------------

def _kill_worker(data_dir: pathlib.Path, job_id: str, after_pid: int = 0) -> int:
    pid_file = data_dir / "jobs" / job_id / "worker.pid"
    pid = _wait_for(lambda: pid_file.exists() and int(pid_file.read_text() or 0) not in (0, after_pid)
                    and int(pid_file.read_text()), PATIENCE, "a job process")
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
def test_a_killed_job_process_is_retried_from_its_checkpoint_then_fails_past_the_limit(tmp_path, serve):
    srv = serve(tmp_path, max_concurrent_jobs=1, job_max_retries=1, progress_every_batches=1)
    with lossd.Client(_address(srv), timeout=PATIENCE) as client:
        job = client.create_job("cnn", "digits", epochs=20, steps_per_epoch=4, batch_size=8)
        seen = []
        for event in client.watch(job):
            seen.append(event)
            if event.kind == "epoch" and event.epoch == 1:
                break  # the epoch-1 checkpoint is on disk (written before the event)
        first = _kill_worker(tmp_path, job.id)
        resumed = []
        for event in client.watch(job, after_sequence=seen[-1].sequence):
            resumed.append(event)
            if event.kind == "message" and event.message.startswith("Resuming from the checkpoint"):
                break
        retry = [e.message for e in resumed if e.kind == "message" and "retry" in e.message]
        assert len(retry) == 1 and re.fullmatch(
            r"The training process was killed by SIGKILL \(sent by kill -9 or the kernel's out-of-memory "
            r"killer\); retry 1 of 1, from the checkpoint of epoch [1-9]\d*\.", retry[0]), retry
        assert str(tmp_path) not in " ".join(e.message for e in resumed)
        _kill_worker(tmp_path, job.id, after_pid=first)  # the second crash is past job_max_retries=1
        failed = client.wait(job, progress=False, timeout=PATIENCE)
        assert failed.state == "failed" and failed.error.reason == "WORKER_CRASHED"
        assert "after 1 retries" in failed.error.message and str(tmp_path) not in failed.error.message
        states = [e.state for e in client.watch(job) if e.kind == "state"]
        assert states == ["queued", "running", "queued", "running", "failed"]
        assert srv.training.scheduler._running == {}  # the slot is free

        # A fresh job on the same server: killed once, it resumes and finishes all its epochs.
        job = client.create_job("cnn", "digits", epochs=3, steps_per_epoch=4, batch_size=8)
        for event in client.watch(job):
            if event.kind == "epoch" and event.epoch == 1:
                break
        _kill_worker(tmp_path, job.id)
        done = client.wait(job, progress=False, timeout=PATIENCE)
        assert done.state == "succeeded", done.error
        events = list(client.watch(job))
    epochs = [e.epoch for e in events if e.kind == "epoch"]
    # Resumed from the checkpoint: no epoch is trained twice (a kill between a
    # checkpoint and its event hides that epoch's event).
    assert epochs[0] == 1 and epochs[-1] == 3 and epochs == sorted(set(epochs)), epochs
    assert sum(e.kind == "message" and "retry 1 of 1" in e.message for e in events) == 1
    history = json.loads((tmp_path / "jobs" / job.id / "history.json").read_text())
    assert len(history["loss"]) == 3
    assert not list((tmp_path / "jobs" / job.id).rglob("tmp-*"))
