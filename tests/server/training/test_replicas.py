"""Replicas on one PostgreSQL database and one artifacts folder: real servers
(two in this process, or a `lossd serve` process beside one), a real
PostgreSQL (tests/postgres.py). Retried creates make one job whichever
replica they reach, a loss registered on one replica evaluates on the
other within a second, a job created on one is watched from the other, and
a replica killed with SIGKILL has its job resumed by another from the
checkpoint. A burst of creates spread over replicas in three processes
admits exactly ``max_queued_jobs`` and a token's ``max_jobs``. A dataset
uploaded through a replica that mounts the artifacts at one path trains
and is deleted through one that mounts them at another."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import psycopg
import pytest

import lossd
from tests.grpc_errors import reason_of
from lossd.v1 import training_service_pb2 as tpb
from lossd.v1 import training_service_pb2_grpc as tpb_grpc
from digit_files import write_class_folders
from tests.servers import PATIENCE, alive, kill_group, lossd_servers, serve_process

# Short leases: a dead replica's job is taken over within seconds.
LEASE_SECONDS = 2.0


@pytest.fixture()
def shared(postgres, tmp_path):
    """One fresh database and one artifacts folder for this test's replicas."""
    return {"database_url": postgres.create_database(), "artifacts_dir": tmp_path / "artifacts"}


@pytest.fixture()
def replica(tmp_path_factory, shared):
    """``replica(**settings)``: a started in-process server on the shared
    database and artifacts folder (each with a data directory of its own)."""
    with lossd_servers(tmp_path_factory, **shared, max_concurrent_jobs=1, job_lease_seconds=LEASE_SECONDS,
                       shared_state_poll_seconds=0.2, progress_every_batches=2) as start:
        yield start


def _client(srv, timeout=60) -> lossd.Client:
    return lossd.Client(f"127.0.0.1:{srv.port}", timeout=timeout)


def _until(check, seconds: float, step: float = 0.02):
    """Calls ``check()`` until it returns without raising; returns its value
    and how long that took. Past ``seconds`` the last error is raised."""
    start = time.monotonic()
    while True:
        try:
            return check(), time.monotonic() - start
        except (lossd.LossdError, AssertionError):
            if time.monotonic() - start > seconds:
                raise
            time.sleep(step)


def test_concurrent_creates_on_two_replicas_with_25_request_ids_make_25_jobs(replica):
    a, b = replica(), replica()
    with _client(a) as ca, _client(b) as cb:
        def create(i: int):
            client = (ca, cb)[i % 2]
            return client.create_job("mlp", "digits", epochs=1, steps_per_epoch=1, request_id=f"retry-{i % 25}")

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            made = list(pool.map(create, range(50)))
        by_request: dict[str, set] = {}
        for i, job in enumerate(made):
            by_request.setdefault(f"retry-{i % 25}", set()).add(job.name)
        assert len(by_request) == 25 and all(len(names) == 1 for names in by_request.values())
        listed = cb.list_jobs(limit=100)
        assert len(listed) == 25
        assert {j.name for j in listed} == {n for names in by_request.values() for n in names}
        for job in listed:  # no need to train them
            try:
                ca.cancel_job(job)
            except lossd.LossdError as exc:
                assert exc.reason == "JOB_ALREADY_FINISHED"


def test_a_loss_registered_on_one_replica_evaluates_on_the_other_within_a_second(replica):
    a, b = replica(), replica()
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    mean_abs = np.mean(np.abs(y_true - y_pred), axis=-1).mean()

    def expression_on(client) -> str:
        found = [info.expression for info in client.losses() if info.name == "tripled_mae"]
        assert found, "not registered there"
        return found[0]

    with _client(a) as ca, _client(b) as cb:
        with pytest.raises(lossd.LossdError) as unknown:
            cb.evaluate("tripled_mae", y_true, y_pred)
        assert unknown.value.reason == "UNKNOWN_LOSS"

        # Timed up to the moment b knows the loss; compiling it on first use comes after.
        ca.register_loss("tripled_mae", "3 * mean(abs(y_true - y_pred), axis=-1)")
        expression, took = _until(lambda: expression_on(cb), 1.0)
        assert took < 1.0 and expression.startswith("3 *")
        np.testing.assert_allclose(cb.evaluate("tripled_mae", y_true, y_pred).loss, 3 * mean_abs, rtol=1e-6)

        ca.register_loss("tripled_mae", "5 * mean(abs(y_true - y_pred), axis=-1)", replace=True)

        def replaced():
            expression = expression_on(cb)
            assert expression.startswith("5 *"), expression
            return expression

        _, took = _until(replaced, 1.0)
        assert took < 1.0
        np.testing.assert_allclose(cb.evaluate("tripled_mae", y_true, y_pred).loss, 5 * mean_abs, rtol=1e-6)

        cb.delete_loss("tripled_mae")  # deleted on b: a forgets it too

        def gone():
            try:
                ca.evaluate("tripled_mae", y_true, y_pred)
            except lossd.LossdError as exc:
                assert exc.reason == "UNKNOWN_LOSS", exc
                return
            raise AssertionError("the deleted loss still evaluates")

        _, took = _until(gone, 1.0)
        assert took < 1.0


def test_a_job_created_on_one_replica_runs_once_and_is_watched_from_the_other(replica, shared):
    a, b = replica(), replica()
    with _client(a, 120) as ca, _client(b, 120) as cb:
        job = ca.create_job("mlp", "digits", epochs=2, steps_per_epoch=3, batch_size=16)
        events = list(cb.watch(job, timeout=120))  # b follows it from the shared database, to the end
        finished = cb.get_job(job)
    assert finished.state == "succeeded", finished.error
    assert [e.state for e in events if e.kind == "state"] == ["queued", "running", "succeeded"]
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    job_dir = pathlib.Path(shared["artifacts_dir"]) / "jobs" / job.id
    assert len(json.loads((job_dir / "history.json").read_text())["loss"]) == 2


def test_a_replica_without_job_slots_queues_jobs_that_another_replica_runs(replica, shared):
    # An evaluator replica (max_concurrent_jobs 0) takes CreateJob, and leaves
    # the running to replicas with slots, as deploy/k8s deploys them.
    evaluator = replica(max_concurrent_jobs=0, replica_id="evaluator")
    with _client(evaluator, 120) as ce:
        job = ce.create_job("mlp", "digits", epochs=1, steps_per_epoch=2, batch_size=16)
        job_id = job.name.split("/")[1]
        time.sleep(1.0)  # five of the evaluator's claim rounds (every 0.2 s)
        assert ce.get_job(job).state == "queued"

        replica(replica_id="runner")

        def leased_to_runner():
            with psycopg.connect(shared["database_url"]) as db:
                owner, state = db.execute("SELECT lease_owner, state FROM jobs WHERE id = %s", (job_id,)).fetchone()
            assert state in ("running", "succeeded") and (owner == "runner" or state == "succeeded"), (owner, state)

        _until(leased_to_runner, 60, step=0.05)
        events = list(ce.watch(job, timeout=120))
        finished = ce.get_job(job)
    assert finished.state == "succeeded", finished.error
    assert [e.state for e in events if e.kind == "state"] == ["queued", "running", "succeeded"]


def test_a_server_without_job_slots_or_a_shared_queue_refuses_jobs(tmp_path_factory):
    with lossd_servers(tmp_path_factory, max_concurrent_jobs=0) as start:
        srv = start()
        with _client(srv) as client:
            with pytest.raises(lossd.LossdError) as info:
                client.create_job("mlp", "digits", epochs=1)
    assert info.value.code.name == "FAILED_PRECONDITION" and info.value.reason == "NO_JOB_SLOTS"
    assert "max_concurrent_jobs is 0" in info.value.message and "LOSSD_DATABASE_URL" in info.value.message


def _worker_pid(job_dir: pathlib.Path, other_than: int = 0, seconds: float = 60) -> int:
    """The pid of the job's running process (written by the worker at start), once it is not ``other_than``."""
    def running() -> int:
        pid = int((job_dir / "worker.pid").read_text())
        assert pid != other_than and alive(pid)
        return pid

    return _until(lambda: _retry_missing(running), seconds, step=0.1)[0]


def _retry_missing(read):
    try:
        return read()
    except (FileNotFoundError, ValueError) as exc:  # not written yet, or being written
        raise AssertionError(str(exc)) from None


def _dead(pid: int, seconds: float) -> float:
    """Waits for ``pid`` to end; returns how long it took."""
    def ended():
        assert not alive(pid), f"process {pid} still runs"

    return _until(ended, seconds, step=0.05)[1]


def test_a_replica_that_lost_its_lease_stops_its_copy_and_any_replica_can_cancel_the_job(replica, shared):
    a = replica()
    with _client(a, 120) as ca:
        job = ca.create_job("cnn", "digits", epochs=50, batch_size=8)  # runs until cancelled
        job_dir = pathlib.Path(shared["artifacts_dir"]) / "jobs" / job.id
        first = _worker_pid(job_dir)
        # As if another replica had taken the job over while a stalled: a's
        # next renewal finds the lease is not its own and stops its process.
        a.training.store.update_job(job.id, lease_owner="another-replica")
        assert _dead(first, 5) < 3
        # "another-replica" never renews: once its lease runs out, a replica
        # (a, or b started now) takes the job over and runs it again.
        b = replica()
        second = _worker_pid(job_dir, other_than=first)
        with _client(b, 120) as cb:
            cancelled = cb.cancel_job(job)  # whichever replica runs it hears of it from the database
        assert cancelled.state == "cancelled"
        assert _dead(second, 5) < 5
        events = list(ca.watch(job))
    took_over = [e for e in events if e.kind == "message" and "stopped renewing its lease" in e.message]
    assert len(took_over) == 1
    assert [e.state for e in events if e.kind == "state"] == ["queued", "running", "running", "cancelling",
                                                              "cancelled"]


# -- the artifacts folder at different paths ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_dataset_uploaded_where_the_artifacts_are_at_one_path_trains_where_they_are_at_another(
        backend, request, tmp_path, tmp_path_factory):
    # The artifacts folder with two mount points (symlinks), and the dataset
    # root at two paths (copies: the server stores a folder's real path, which
    # a symlink would not change): the first replica's are gone (unmounted)
    # by the time the second trains on what it stored.
    real, pictures_a = tmp_path / "volume", write_class_folders(tmp_path / "pics-a" / "small", 30).parent
    real.mkdir()
    pictures_b = shutil.copytree(pictures_a, tmp_path / "pics-b")
    mount_a, mount_b = tmp_path / "mount-a", tmp_path / "mount-b"
    for link in (mount_a, mount_b):
        link.symlink_to(real)
    rng = np.random.default_rng(5)
    upload = tmp_path / "shapes.npz"
    np.savez(upload, x=rng.integers(0, 255, (24, 8, 8), dtype=np.uint8), y=np.arange(24) % 3)
    # SQLite: one data directory (its database) for both; PostgreSQL: one each.
    shared = {"data_dir": tmp_path / "data"} if backend == "sqlite" else \
        {"database_url": request.getfixturevalue("postgres").create_database()}
    with lossd_servers(tmp_path_factory, job_lease_seconds=LEASE_SECONDS, shared_state_poll_seconds=0.2) as start:
        a = start(**shared, artifacts_dir=mount_a, dataset_root=pictures_a,
                  max_concurrent_jobs=1 if backend == "sqlite" else 0)
        tiny = dict(epochs=1, steps_per_epoch=2, batch_size=8)
        with _client(a) as ca:
            stored = ca.upload_dataset(upload, "shapes")
            # On PostgreSQL the jobs are created here (no slots) and run by the other replica.
            queued = [ca.create_job("mlp", ref, **tiny) for ref in ("shapes", "folder:small")] \
                if backend == "postgresql" else []
        a.stop(0)  # SQLite: the database is one process's, so the second server comes after
        mount_a.unlink()
        shutil.rmtree(pictures_a)
        b = start(**shared, artifacts_dir=mount_b, dataset_root=pictures_b, max_concurrent_jobs=2)
        with _client(b, 120) as cb:
            listed = {d.name: d for d in cb.list_datasets()}
            assert listed["shapes"].examples == 24 and listed["shapes"].size_bytes == stored.size_bytes
            for job in queued or [cb.create_job("mlp", ref, **tiny) for ref in ("shapes", "folder:small")]:
                finished = cb.wait(job, progress=False, timeout=PATIENCE)
                assert finished.state == "succeeded", (finished.spec["dataset"], finished.error)
            files = list((real / "datasets").glob("shapes@*.npz"))
            assert len(files) == 1
            cb.delete_dataset("shapes")  # the record, and the file through this replica's path
            assert not files[0].exists()
            assert "shapes" not in {d.name for d in cb.list_datasets()}


# -- job limits hold across replicas ------------------------------------------------------------------------------

QUEUE_LIMIT, ALICE_JOBS = 5, 3


def _create_burst(addresses: list[str], token: str, n: int) -> tuple[list[str], list[tuple]]:
    """``n`` CreateJob calls at once, spread round the ``addresses``; returns
    the names of the jobs made and ``(code, reason)`` of each refusal."""
    channels = [grpc.insecure_channel(a) for a in addresses]
    try:
        stubs = [tpb_grpc.TrainingServiceStub(c) for c in channels]
        spec = tpb.JobSpec(dataset="digits", epochs=1, steps_per_epoch=1)
        spec.model.preset = "mlp"
        barrier = threading.Barrier(n)

        def create(i: int):
            barrier.wait(30)  # all at once: the count and the insert race, unless they are one step
            try:
                return stubs[i % len(stubs)].CreateJob(tpb.CreateJobRequest(spec=spec), timeout=60,
                                                       metadata=[("authorization", f"Bearer {token}")]).name
            except grpc.RpcError as exc:
                return exc.code(), reason_of(exc)

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(create, range(n)))
    finally:
        for channel in channels:
            channel.close()
    return [r for r in results if isinstance(r, str)], [r for r in results if not isinstance(r, str)]


def test_a_burst_of_creates_over_three_replica_processes_admits_exactly_the_job_limits(
        postgres, tmp_path, tmp_path_factory, create_token):
    # Three processes (one in this one, two `lossd serve`): a lock within one
    # process cannot order the counts, only one in the shared database can.
    # No job slots anywhere, so every admitted job stays queued.
    url, tokens_file = postgres.create_database(), tmp_path / "tokens.jsonl"
    tokens = {"alice": create_token(tokens_file, "alice", "train", "--max-jobs", str(ALICE_JOBS)),
              "bob": create_token(tokens_file, "bob", "train")}
    env = {"LOSSD_DATABASE_URL": url, "LOSSD_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "LOSSD_TOKENS_FILE": str(tokens_file), "LOSSD_MAX_CONCURRENT_JOBS": "0",
           "LOSSD_MAX_QUEUED_JOBS": str(QUEUE_LIMIT)}
    procs = []
    try:
        with lossd_servers(tmp_path_factory, database_url=url, artifacts_dir=tmp_path / "artifacts",
                           tokens_file=tokens_file, max_concurrent_jobs=0, max_queued_jobs=QUEUE_LIMIT) as start:
            addresses = [f"127.0.0.1:{start().port}"]
            for i in range(2):
                proc, address = serve_process(tmp_path / f"data-{i}", tmp_path / f"serve-{i}.log", env,
                                              token=tokens["bob"])
                procs.append(proc)
                addresses.append(address)

            made, refused = _create_burst(addresses, tokens["alice"], 24)
            assert len(made) == ALICE_JOBS, made
            assert set(refused) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "CALLER_JOB_LIMIT")}

            made_by_bob, refused = _create_burst(addresses, tokens["bob"], 24)
            assert len(made_by_bob) == QUEUE_LIMIT - ALICE_JOBS, made_by_bob
            assert set(refused) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_JOBS")}
        with psycopg.connect(url) as db:
            stored = db.execute("SELECT owner, state, COUNT(*) FROM jobs GROUP BY owner, state").fetchall()
        assert sorted(stored) == [("alice", "queued", ALICE_JOBS), ("bob", "queued", QUEUE_LIMIT - ALICE_JOBS)]
    finally:
        for proc in procs:
            kill_group(proc)


# -- a replica killed with SIGKILL -------------------------------------------------------------------------------

def _serve(data_dir: pathlib.Path, log: pathlib.Path, shared: dict) -> tuple[subprocess.Popen, str]:
    """`lossd serve` on the shared database and artifacts."""
    return serve_process(data_dir, log, {"LOSSD_DATABASE_URL": shared["database_url"],
                                         "LOSSD_ARTIFACTS_DIR": str(shared["artifacts_dir"]),
                                         "LOSSD_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
                                         "LOSSD_REPLICA_ID": "killed-replica"})


@pytest.mark.slow
def test_kill_9_of_the_replica_running_a_job_makes_another_resume_it(replica, shared, tmp_path):
    proc, address = _serve(tmp_path / "killed-data", tmp_path / "killed.log", shared)
    try:
        with lossd.Client(address, timeout=120) as killed:
            job = killed.create_job("cnn", "digits", epochs=2, batch_size=8)
            for event in killed.watch(job):
                if event.kind == "epoch" and event.epoch == 1:
                    break  # the first checkpoint is in the shared folder (written before the event)
        kill_group(proc)  # the server and its job process
        killed_at = time.time()
        # The survivor starts only now, so the job cannot have been its own
        # from the start; it finds it RUNNING under the dead replica's lease.
        survivor = replica()
        with _client(survivor, 180) as client:
            finished = client.wait(job, progress=False)
            events = list(client.watch(job))
    finally:
        kill_group(proc)
    assert finished.state == "succeeded", finished.error
    took_over = [e for e in events if e.kind == "message" and "stopped renewing its lease" in e.message]
    assert len(took_over) == 1 and "from the checkpoint of epoch" in took_over[0].message
    # Taken over once the lease ran out: not before, and not much later (the
    # survivor's start, its claim interval, a busy machine's slack).
    assert LEASE_SECONDS - 1 < took_over[0].time.timestamp() - killed_at < LEASE_SECONDS + 20
    resumed = [e for e in events if e.kind == "message" and e.message.startswith("Resuming from the checkpoint")]
    assert len(resumed) == 1
    first_epoch_after = int(resumed[0].message.split("epoch ")[1].split(";")[0]) + 1
    assert first_epoch_after >= 2
    assert [e.epoch for e in events if e.kind == "epoch" and e.sequence > resumed[0].sequence] == \
        list(range(first_epoch_after, 3))
    assert [e.state for e in events if e.kind == "state"] == ["queued", "running", "running", "succeeded"]
    history = json.loads((pathlib.Path(shared["artifacts_dir"]) / "jobs" / job.id / "history.json").read_text())
    assert len(history["loss"]) == 2


def _count_store_queries(srv) -> list:
    """Wraps the store of ``srv`` so that each connection use (a read or a
    transaction: one round trip or one transaction with the database) is
    recorded; returns the list it appends the time of each to."""
    store, used = srv.training.store, []
    for name in ("_read", "_transaction"):
        real = getattr(store, name)

        def counting(*args, real=real):
            used.append(time.monotonic())
            return real(*args)

        setattr(store, name, counting)
    return used


def test_an_idle_replica_polls_the_shared_database_once_per_interval_and_still_claims_within_it(replica):
    # One look (one query) an interval serves the registered losses, the
    # job claims and the jobs gauge; a claim is tried only when the look
    # saw a claimable job. Interval 0.2 s (the fixture's shared_state_poll_seconds).
    runners = [replica(replica_id=f"runner-{i}") for i in range(3)]
    time.sleep(0.5)  # past their first claim at start
    used = [_count_store_queries(srv) for srv in runners]
    time.sleep(2.0)
    per_replica = [len(u) for u in used]
    # 10 intervals: 10 looks each (give or take one at each end), and at most one idle claim round
    # (jobs_in_states, claim_jobs, counts_by_state every 5 s); two polls an interval would be 20+.
    assert all(8 <= n <= 14 for n in per_replica), per_replica

    # A job queued on a replica without slots is claimed by an idle runner within an interval or so.
    evaluator = replica(max_concurrent_jobs=0, replica_id="evaluator")
    with _client(evaluator, 120) as ce:
        job = ce.create_job("mlp", "digits", epochs=1, steps_per_epoch=1, batch_size=16)
        queued = time.monotonic()
        _, took = _until(lambda: _assert_state(ce.get_job(job), ("running", "succeeded")), 10)
        assert took < 2.0, took
        ce.wait(job, progress=False)
    assert time.monotonic() - queued < 120


def _assert_state(job, states):
    assert job.state in states, job.state
    return job
