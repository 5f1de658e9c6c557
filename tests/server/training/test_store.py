"""The SQLite job store: persistence across reopening, idempotent creates,
stable paging, events in order."""

from __future__ import annotations

import pytest

from lossd_server.errors import InvalidArgument
from lossd_server.training.store import JobRecord, Store


def _job(i: int, request_id=None) -> JobRecord:
    return JobRecord(id=f"job{i}", spec={"epochs": i}, runtime={}, model_kind="classifier", request_id=request_id)


def test_jobs_and_events_survive_reopening(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    store.create_job(_job(1))
    store.update_job("job1", state="running", start_time=5.0, event=("state", {"state": "running"}))
    store.append_event("job1", "epoch", {"epoch": 1})
    store.put_dataset("mine", {"name": "mine", "create_time": 1.0})
    store.close()

    again = Store(tmp_path / "db.sqlite3")
    job = again.get_job("job1")
    assert (job.state, job.start_time, job.spec) == ("running", 5.0, {"epochs": 1})
    assert [(e.seq, e.kind) for e in again.events("job1")] == [(1, "state"), (2, "state"), (3, "epoch")]
    assert [e.seq for e in again.events("job1", after=2)] == [3]
    assert again.get_dataset("mine")["name"] == "mine"
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_same_request_id_returns_the_first_job(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    first, created = store.create_job(_job(1, "req-1"))
    second, created_again = store.create_job(_job(2, "req-1"))
    assert created and not created_again and second.id == first.id
    assert store.counts_by_state() == {"queued": 1}


def test_paging_newest_first_and_stable_under_inserts(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    for i in range(5):
        store.create_job(_job(i))
    page, token = store.list_jobs(page_size=2)
    assert [j.id for j in page] == ["job4", "job3"] and token
    store.create_job(_job(9))  # a new job does not shift the next page
    page, token = store.list_jobs(page_size=2, page_token=token)
    assert [j.id for j in page] == ["job2", "job1"]
    page, token = store.list_jobs(page_size=2, page_token=token)
    assert [j.id for j in page] == ["job0"] and token == ""


def test_filter_by_state_and_bad_token(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    for i in range(3):
        store.create_job(_job(i))
    store.update_job("job1", state="succeeded")
    assert [j.id for j in store.list_jobs(["succeeded"])[0]] == ["job1"]
    assert [j.id for j in store.list_jobs(["queued"])[0]] == ["job2", "job0"]
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_jobs(page_token="garbage!")
