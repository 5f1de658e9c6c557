"""The job store, on both backends (SQLite and a real PostgreSQL): persistence
across reopening, idempotent creates, stable paging, events in order, the
schema's versions, job leases, and paths under the artifacts folder stored
relative to it (version 3 rewrites what older versions stored absolute)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from lossd_server.errors import InvalidArgument
from lossd_server.training import datasets
from lossd_server.state.dialect import POSTGRES, SQLITE
from lossd_server.state.postgres import PostgresStore
from lossd_server.state.quarantine import Quarantine
from lossd_server.state.schema import MIGRATIONS
from lossd_server.state.sqlite import SqliteStore
from lossd_server.state.store import JobRecord


def _job(i: int, request_id=None) -> JobRecord:
    return JobRecord(id=f"job{i}", spec={"epochs": i}, runtime={}, model_kind="classifier", request_id=request_id)


def test_jobs_and_events_survive_reopening(open_store):
    store = open_store()
    store.create_job(_job(1))
    store.update_job("job1", state="running", start_time=5.0, event=("state", {"state": "running"}))
    store.append_event("job1", "epoch", {"epoch": 1})
    store.put_dataset("mine", {"name": "mine", "create_time": 1.0})
    store.close()

    again = open_store()
    job = again.get_job("job1")
    assert (job.state, job.start_time, job.spec) == ("running", 5.0, {"epochs": 1})
    assert [(e.seq, e.kind) for e in again.events("job1")] == [(1, "state"), (2, "state"), (3, "epoch")]
    assert [e.seq for e in again.events("job1", after=2)] == [3]
    assert again.get_dataset("mine")["name"] == "mine"
    assert again.schema_version() == MIGRATIONS[-1][0]


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = SqliteStore(tmp_path / "db.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_same_request_id_returns_the_first_job(open_store):
    store = open_store()
    first, created = store.create_job(_job(1, "req-1"))
    second, created_again = store.create_job(_job(2, "req-1"))
    assert created and not created_again and second.id == first.id
    assert store.counts_by_state() == {"queued": 1}


def test_paging_newest_first_and_stable_under_inserts(open_store):
    store = open_store()
    for i in range(5):
        store.create_job(_job(i))
    page, token = store.list_jobs(page_size=2)
    assert [j.id for j in page] == ["job4", "job3"] and token
    store.create_job(_job(9))  # a new job does not shift the next page
    page, token = store.list_jobs(page_size=2, page_token=token)
    assert [j.id for j in page] == ["job2", "job1"]
    page, token = store.list_jobs(page_size=2, page_token=token)
    assert [j.id for j in page] == ["job0"] and token == ""


def test_filter_by_state_and_bad_token(open_store):
    store = open_store()
    for i in range(3):
        store.create_job(_job(i))
    store.update_job("job1", state="succeeded")
    assert [j.id for j in store.list_jobs(["succeeded"])[0]] == ["job1"]
    assert [j.id for j in store.list_jobs(["queued"])[0]] == ["job2", "job0"]
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_jobs(page_token="garbage!")


def test_datasets_and_losses_round_trip_and_count_versions(open_store):
    store, other = open_store(), open_store()
    store.put_dataset("a", {"name": "a", "size_bytes": 100, "create_time": 1.0}, owner="ann")
    store.put_dataset("b", {"name": "b", "size_bytes": 50, "create_time": 2.0}, owner="bob")
    store.put_dataset("a", {"name": "a", "size_bytes": 300, "create_time": 3.0}, owner="ann")  # replaced
    assert (other.dataset_bytes(), other.dataset_bytes("ann"), other.dataset_bytes("nobody")) == (350, 300, 0)
    assert [(d["name"], d["owner"]) for d in other.list_datasets()] == [("a", "ann"), ("b", "bob")]
    assert other.delete_dataset("a") and not other.delete_dataset("a") and store.get_dataset("a") is None

    assert other.version("losses") == 0
    store.put_losses([("half", {"name": "half", "expression": "0.5 * y_pred"})])
    assert other.version("losses") == 1 and other.count_losses() == 1
    store.put_losses([("half", {"name": "half", "expression": "0.25 * y_pred"})])  # a replacement counts too
    assert other.version("losses") == 2 and "0.25" in dict(other.losses())["half"]
    other.delete_loss("half")
    assert store.version("losses") == 3 and store.losses() == []


def test_a_claimed_job_is_leased_to_one_replica_until_its_lease_expires(open_store):
    a, b = open_store(), open_store()
    a.create_job(_job(1))
    a.create_job(_job(2))
    [(first, before)] = a.claim_jobs("replica-a", 1, lease_seconds=0.5)
    assert (first.id, before, first.state) == ("job1", "queued", "running")
    [(second, _)] = b.claim_jobs("replica-b", 5, lease_seconds=30)  # job1 is a's: only job2 is left
    assert second.id == "job2" and b.claim_jobs("replica-b", 5, lease_seconds=30) == []
    assert a.renew_leases("replica-a", ["job1"], 0.5) == {"job1": "running"}
    assert b.renew_leases("replica-b", ["job1"], 30) == {}  # not b's to renew
    time.sleep(0.7)  # a stopped renewing: its lease runs out and b takes the job over
    [(taken, before)] = b.claim_jobs("replica-b", 5, lease_seconds=30)
    assert (taken.id, before) == ("job1", "running")
    assert a.renew_leases("replica-a", ["job1"], 0.5) == {}  # a learns that it lost the job
    assert [e.payload["state"] for e in a.events("job1") if e.kind == "state"] == ["queued", "running", "running"]


def test_an_expired_cancelling_job_is_cancelled_not_claimed(open_store):
    store = open_store()
    store.create_job(_job(1))
    store.claim_jobs("gone", 1, lease_seconds=0.01)
    store.update_job("job1", state="cancelling")
    time.sleep(0.05)
    assert store.claim_jobs("alive", 1, lease_seconds=30) == []
    assert store.get_job("job1").state == "cancelled"
    assert not store.cancel_queued("job1")


def test_one_look_sees_the_versions_the_jobs_by_state_and_whether_a_claim_would_find_a_job(open_store):
    a, b = open_store(), open_store()
    empty = b.look()
    assert (empty.versions, empty.counts, empty.claimable) == ({}, {}, False)
    a.put_losses([("half", {"name": "half", "expression": "0.5 * y_pred"})])
    a.create_job(_job(1))
    a.create_job(_job(2))
    seen = b.look()
    assert seen.versions == {"losses": 1} and seen.counts == {"queued": 2} and seen.claimable
    a.claim_jobs("replica-a", 1, lease_seconds=30)
    a.claim_jobs("replica-a", 1, lease_seconds=0.3)
    running = b.look()
    assert running.counts == {"running": 2} and not running.claimable  # both leased
    time.sleep(0.5)  # one lease ran out: the look says so, and a claim finds that job
    assert b.look().claimable
    [(taken, before)] = b.claim_jobs("replica-b", 5, lease_seconds=30)
    assert (taken.id, before) == ("job2", "running") and not b.look().claimable


def test_concurrent_claims_never_hand_one_job_to_two_replicas(open_store):
    replicas = [open_store() for _ in range(4)]
    for i in range(20):
        replicas[0].create_job(_job(i))
    got: dict[str, list[str]] = {}

    def claim(n: int) -> None:
        while True:
            batch = replicas[n].claim_jobs(f"replica-{n}", 2, lease_seconds=30)
            if not batch:
                return
            for job, _ in batch:
                got.setdefault(job.id, []).append(f"replica-{n}")

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(f"job{i}" for i in range(20))
    assert all(len(owners) == 1 for owners in got.values()), got


def test_concurrent_creates_with_one_request_id_make_one_job(open_store):
    replicas = [open_store() for _ in range(4)]
    results = []

    def create(n: int) -> None:
        for k in range(10):
            results.append(replicas[n].create_job(_job(100 * n + k, f"req-{k}")))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40 and sum(created for _, created in results) == 10
    by_request = {}
    for job, _ in results:
        by_request.setdefault(job.request_id, set()).add(job.id)
    assert all(len(ids) == 1 for ids in by_request.values()) and len(by_request) == 10
    assert replicas[0].counts_by_state() == {"queued": 10}



class _Full(Exception):
    pass


def test_creates_on_four_stores_count_and_insert_as_one_step(open_store):
    # Four stores on one database: for SQLite as four processes on one file
    # (a connection and a lock each), for PostgreSQL as four replicas. The
    # pause between the count and the insert is where a create on another
    # store would slip in, were the two not one step.
    replicas = [open_store() for _ in range(4)]
    limit, alice_limit, made, refused = 5, 2, [], []

    def admit_for(owner: str):
        def admit(count) -> None:
            queued, mine = count(["queued"]), count(["queued", "running"], owner)
            time.sleep(0.02)
            if queued >= limit or (owner == "alice" and mine >= alice_limit):
                raise _Full(queued)
        return admit

    def create(n: int, who: str) -> None:
        for k in range(4):
            job = JobRecord(id=f"{who}{n}-{k}", spec={}, runtime={}, model_kind="classifier", owner=who)
            try:
                made.append(replicas[n].create_job(job, admit_for(who))[0].id)
            except _Full:
                refused.append(job.id)

    threads = [threading.Thread(target=create, args=(n, who)) for n in range(4)
               for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == limit and len(refused) == 32 - limit
    assert sorted(replicas[1].counts_by_state().items()) == [("queued", limit)]
    assert len([j for j in made if j.startswith("alice")]) <= alice_limit
    assert replicas[2].get_job(made[0]) is not None and all(replicas[3].get_job(j) is None for j in refused)


def test_an_unreachable_database_is_unavailable_and_a_restarted_one_is_used_again(tmp_path):
    from tests.postgres import running_postgres

    from lossd_server.errors import Unavailable

    with running_postgres() as pg:
        store = PostgresStore(pg.url(), quarantine=Quarantine(tmp_path / "quarantine"), connect_timeout=2)
        store.create_job(_job(1))
        pg.stop()
        with pytest.raises(Unavailable) as refused:
            store.get_job("job1")
        assert refused.value.reason == "DATABASE_UNAVAILABLE" and "Expected the PostgreSQL server" in \
            refused.value.message
        with pytest.raises(Unavailable):
            store.create_job(_job(2))
        pg.start()
        job, _ = _until_available(lambda: store.get_job("job1"))
        assert job.id == "job1"
        store.close()


def test_a_database_outage_is_one_warning_and_its_end_one_info_line_seconds_after_it_is_back(tmp_path, caplog,
                                                                                                monkeypatch):
    # A replica keeps polling through the outage (the Follower, every 0.1 s) and calls keep
    # failing; psycopg_pool retries its connection meanwhile. Logged: one warning when the
    # outage is first seen and one line when the database answers again, nothing from the pool.
    # An 8 s outage: the pool's own backoff (1, 2, 4, 8 s apart) would next try at 15 s.
    import logging

    from tests.postgres import running_postgres

    from lossd_server.errors import Unavailable
    from lossd_server.state.follower import Follower

    monkeypatch.setattr(logging.getLogger("psycopg.pool"), "level", logging.NOTSET)  # as in a fresh process
    caplog.set_level(logging.DEBUG, logger="lossd_server")
    with running_postgres() as pg:
        store = PostgresStore(pg.url(), quarantine=Quarantine(tmp_path / "quarantine"), connect_timeout=1)
        follower = Follower(store, 0.1)
        follower.start()
        try:
            store.create_job(_job(1))
            pg.stop()
            down = time.monotonic()
            refused = 0
            while time.monotonic() - down < 8:  # the pool retries meanwhile: a few of its reconnects fail
                with contextlib.suppress(Unavailable):
                    store.get_job("job1")
                    continue
                refused += 1
            pg.start()
            back = time.monotonic()
            _, answered = _until_available(lambda: store.get_job("job1"), 30)
            assert answered - back < 4
            time.sleep(0.3)  # a few more looks, all answered
        finally:
            follower.stop()
            store.close()
    assert refused >= 2
    records = [r for r in caplog.records if r.name.startswith(("lossd_server", "psycopg"))]
    loud = [r for r in records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert loud[0].name == "lossd_server.state.postgres" and "is unreachable" in loud[0].getMessage() \
        and "DATABASE_UNAVAILABLE" in loud[0].getMessage() and str(pg.port) in loud[0].getMessage()
    back = [r for r in records if "answers again, after" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO and back[0].created > loud[0].created
    assert not [r for r in records if r.name.startswith("psycopg") and r.levelno >= logging.WARNING]


def _until_available(call, seconds: float = 10.0):
    from lossd_server.errors import Unavailable

    deadline = time.monotonic() + seconds
    while True:
        try:
            return call(), time.monotonic()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_database_that_never_answers_is_one_clear_error_without_the_password(tmp_path):
    from tests.servers import free_port

    url = f"postgresql://lossd:s3cret-pw@127.0.0.1:{free_port()}/lossd"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectionError) as refused:
        PostgresStore(url, quarantine=Quarantine(tmp_path / "quarantine"), connect_timeout=1)
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert "cannot connect to the PostgreSQL database at postgresql://lossd:***@127.0.0.1:" in message, message
    assert "s3cret-pw" not in message


# -- paths under the artifacts folder ---------------------------------------------------------------------------

def _version_2_database(backend: str, request, tmp_path, rows: list[tuple[str, tuple]]):
    """A database as version 2 wrote it (its migrations' SQL, then ``rows``
    as ``(INSERT with ?, values)``); returns ``open(**options)`` for a store on it."""
    dialect = SQLITE if backend == "sqlite" else POSTGRES
    statements = [stmt for _, script in MIGRATIONS if _ <= 2 for stmt in script.format(**dialect.types).split(";")
                  if stmt.strip()]
    statements += ["CREATE TABLE schema_version (version INTEGER NOT NULL)",
                   "INSERT INTO schema_version (version) VALUES (1)", "INSERT INTO schema_version (version) VALUES (2)"]
    if backend == "sqlite":
        path = tmp_path / "old.sqlite3"
        with sqlite3.connect(path) as db:
            for stmt in statements:
                db.execute(stmt)
            for sql, values in rows:
                db.execute(sql, values)
        db.close()
        return lambda **options: SqliteStore(path, **options)
    import psycopg

    url = request.getfixturevalue("postgres").create_database()
    with psycopg.connect(url) as db:
        for stmt in statements:
            db.execute(stmt)
        for sql, values in rows:
            db.execute(dialect.sql(sql), values)
    return lambda **options: PostgresStore(url, quarantine=Quarantine(tmp_path / "quarantine"), **options)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_version_3_makes_absolute_paths_under_the_artifacts_folder_relative_and_readable_elsewhere(
        backend, request, tmp_path):
    # Version 2 stored the paths a replica reached the folder by (mount-a);
    # the replica that migrates reaches it by mount-b, and mount-a is gone after.
    real = tmp_path / "volume"
    (real / "datasets").mkdir(parents=True)
    mount_a, mount_b = tmp_path / "mount-a", tmp_path / "mount-b"
    mount_a.symlink_to(real)
    mount_b.symlink_to(real)
    x, y = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4, 1), np.arange(6) % 2
    datasets.save_arrays(real / "datasets" / "up@abc.npz", x, y, ["a", "b"])
    old_path, outside = str(mount_a / "datasets" / "up@abc.npz"), str(tmp_path / "elsewhere" / "folder")
    pictures = tmp_path / "pictures"  # the dataset root, also reached by two paths
    (pictures / "small").mkdir(parents=True)
    (tmp_path / "pictures-a").symlink_to(pictures)
    (tmp_path / "pictures-b").symlink_to(pictures)
    info = {"name": "up", "source": "upload", "examples": 6, "image_shape": [4, 4, 1], "class_names": ["a", "b"],
            "create_time": 1.0, "size_bytes": 10, "path": old_path, "owner": ""}
    insert_dataset = "INSERT INTO datasets (name, info, create_time, owner) VALUES (?, ?, ?, ?)"
    insert_job = ("INSERT INTO jobs (id, spec, runtime, model_kind, state, create_time) "
                  "VALUES (?, ?, ?, 'classifier', 'queued', 1.0)")
    rows = [(insert_dataset, ("up", json.dumps(info), 1.0, "")),
            (insert_dataset, ("far", json.dumps({**info, "name": "far", "source": "folder", "path": outside}), 1.0,
                              "")),
            (insert_job, ("j1", json.dumps({"dataset": "up"}), json.dumps({"dataset_source": "upload",
                                                                           "dataset_path": old_path}))),
            (insert_job, ("j2", "{}", "not json")),  # left to the checks at open
            (insert_job, ("j3", json.dumps({"dataset": "folder:small"}), json.dumps(
                {"dataset_source": "folder", "dataset_path": str(tmp_path / "pictures-a" / "small")})))]
    opener = _version_2_database(backend, request, tmp_path, rows)
    store = opener(artifacts_root=mount_b, dataset_root=tmp_path / "pictures-b")
    try:
        assert store.schema_version() == MIGRATIONS[-1][0]  # 3 and every later one
        mount_a.unlink()
        (tmp_path / "pictures-a").unlink()
        with store._read() as db:
            raw = {r["name"]: json.loads(r["info"])["path"] for r in db.execute("SELECT name, info FROM datasets")}
            runtimes = {r["id"]: json.loads(r["runtime"])["dataset_path"]
                        for r in db.execute("SELECT id, runtime FROM jobs")}
        assert raw == {"up": "datasets/up@abc.npz", "far": outside}
        assert runtimes == {"j1": "datasets/up@abc.npz", "j3": "small"}  # j2 went to the quarantine
        assert store.get_job("j3").runtime["dataset_path"] == str(tmp_path / "pictures-b" / "small")
        up = store.get_dataset("up")
        assert up["path"] == str(mount_b / "datasets" / "up@abc.npz")
        loaded_x, loaded_y, names = datasets.load_arrays(up["path"])
        np.testing.assert_array_equal(loaded_x, x)
        np.testing.assert_array_equal(loaded_y, y)
        assert names == ["a", "b"]
        assert store.get_job("j1").runtime["dataset_path"] == up["path"]
        assert {d["name"]: d["path"] for d in store.list_datasets()} == {"up": up["path"], "far": outside}
    finally:
        store.close()
    # Another replica, at yet another path, reads the same rows under its own.
    again = opener(artifacts_root=real, dataset_root=pictures)
    try:
        assert again.get_dataset("up")["path"] == str(real / "datasets" / "up@abc.npz")
        assert again.get_job("j1").runtime["dataset_path"] == str(real / "datasets" / "up@abc.npz")
        assert again.get_job("j3").runtime["dataset_path"] == str(pictures / "small")
    finally:
        again.close()


def test_new_records_store_paths_relative_to_the_artifacts_folder_and_the_dataset_root(open_store, tmp_path):
    root = tmp_path / "artifacts"
    store = open_store()
    store.artifacts_root = root  # as opened by a server with this artifacts folder
    path = str(root / "datasets" / "new@x.npz")
    store.put_dataset("new", {"name": "new", "path": path, "size_bytes": 1})
    runtime = {"dataset_source": "upload", "dataset_path": path}
    store.create_job(JobRecord(id="j", spec={}, runtime=runtime, model_kind="classifier"))
    assert runtime["dataset_path"] == path  # the caller's dict is its own
    with store._read() as db:
        assert json.loads(db.execute("SELECT info FROM datasets").fetchone()["info"])["path"] == "datasets/new@x.npz"
        assert json.loads(db.execute("SELECT runtime FROM jobs").fetchone()["runtime"])["dataset_path"] == \
            "datasets/new@x.npz"
    store.dataset_root = tmp_path / "pictures"
    store.create_job(JobRecord(id="f", spec={}, model_kind="classifier", runtime={
        "dataset_source": "folder", "dataset_path": str(tmp_path / "pictures" / "small")}))
    store.artifacts_root, store.dataset_root = tmp_path / "elsewhere", tmp_path / "pics"
    assert store.get_dataset("new")["path"] == str(tmp_path / "elsewhere" / "datasets" / "new@x.npz")
    assert store.get_job("j").runtime["dataset_path"] == str(tmp_path / "elsewhere" / "datasets" / "new@x.npz")
    assert store.get_job("f").runtime["dataset_path"] == str(tmp_path / "pics" / "small")
