"""Jobs that no replica can run say so (issue 23): replicas publish their job
slots in the shared PostgreSQL store with a lease. Two `lossd serve` replica
processes with one job slot each refuse `workers=2` with NOT_ENOUGH_JOB_SLOTS
naming the largest live slot count; a `workers=2` job queued while a
two-slot replica was live gets an event saying why it waits once that
replica is killed (its publication expires). Store methods are checked on
SQLite and PostgreSQL alike. Real PostgreSQL (tests/postgres.py), real
`lossd serve` processes."""

from __future__ import annotations

import time

import grpc
import pytest

import lossd
from tests.servers import kill_group, serve_process

pytest.importorskip("tensorflow")

# Long enough that a replica starved of CPU while another one loads TensorFlow
# (the suite runs in parallel) still renews its publication in time; the
# orphaned job below hears why within a lease of the kill.
LEASE_SECONDS = 6.0


def _env(url: str, folder, slots: int) -> dict:
    return {"LOSSD_DATABASE_URL": url, "LOSSD_ARTIFACTS_DIR": str(folder / "artifacts"),
            "LOSSD_MAX_CONCURRENT_JOBS": str(slots), "LOSSD_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
            "LOSSD_SHARED_STATE_POLL_SECONDS": "0.2"}


def _events(client, job) -> list:
    """The job's events so far (a watch cut at its deadline)."""
    seen = []
    try:
        for event in client.watch(job, timeout=1.5):
            seen.append(event)
    except lossd.LossdError as error:
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    return seen


def test_the_store_keeps_the_live_replicas_slots(open_store):
    store = open_store()
    store.publish_replica("a", 2, 60)
    store.publish_replica("b", 1, 60)
    store.publish_replica("gone", 8, -1)  # its lease ran out
    assert store.live_replicas() == {"a": 2, "b": 1}
    store.publish_replica("a", 3, 60)  # published again: the new count
    store.withdraw_replica("b")
    assert store.live_replicas() == {"a": 3}


def test_two_one_slot_replicas_refuse_a_two_worker_job_and_an_orphaned_one_hears_why(postgres, tmp_path):
    url = postgres.create_database()
    procs = []
    try:
        one, address_one = serve_process(tmp_path / "one", tmp_path / "one.log", _env(url, tmp_path, 1))
        procs.append(one)
        two, address_two = serve_process(tmp_path / "two", tmp_path / "two.log", _env(url, tmp_path, 1))
        procs.append(two)
        with lossd.Client(address_one, timeout=60) as client:
            with pytest.raises(lossd.LossdError) as refused:
                client.create_job("mlp", "digits", workers=2, epochs=1, steps_per_epoch=1)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.reason == "NOT_ENOUGH_JOB_SLOTS"
            assert refused.value.metadata["slots"] == "1" and refused.value.metadata["workers"] == "2"
            assert "Expected at most 1" in refused.value.message

            # A two-slot replica joins and runs a long one-worker job, so a
            # two-worker job waits in the queue until it is killed.
            big, address_big = serve_process(tmp_path / "big", tmp_path / "big.log", _env(url, tmp_path, 2))
            procs.append(big)
            with lossd.Client(address_big, timeout=60) as on_big:
                long = on_big.create_job("cnn", "digits", epochs=50, batch_size=8)
                deadline = time.monotonic() + 120
                while on_big.get_job(long).state != "running":
                    assert time.monotonic() < deadline, "the long job did not start"
                    time.sleep(0.2)
            pair = client.create_job("mlp", "digits", workers=2, epochs=1, steps_per_epoch=1)
            time.sleep(1.0)
            assert client.get_job(pair).state == "queued"
            kill_group(big)
            deadline = time.monotonic() + 60
            told = []
            while not told:
                assert time.monotonic() < deadline, "no event said why the job waits"
                events = _events(client, pair)
                told = [e for e in events if e.kind == "message" and "No live replica can run this job" in e.message]
                time.sleep(0.2)
            assert "needs 2 job slots" in told[0].message and "has 1" in told[0].message
            assert client.get_job(pair).state == "queued"
            client.cancel_job(pair)
            client.cancel_job(long)
    finally:
        for proc in procs:
            kill_group(proc)
