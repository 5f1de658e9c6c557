"""Issue 11, items 12 and 13, as fault injection: ``kill -9`` the server or a
job's process at points of running jobs that cover every phase of a job
(6 kills), then corrupt each persisted file; after every step each finished
job and each registered loss is intact, and what was corrupted is in the
quarantine.

The server is the real ``lossd serve`` command in its own process group;
every kill lands on a job that is training or starting. Bounded to about a
minute on two cores: the jobs are tiny (3 epochs of 5 batches of 8x8
digits) and the kills do not wait for jobs to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from tests.servers import PATIENCE, alive, free_port

pytestmark = pytest.mark.slow

SEED = 11
EPOCHS = 3
# Where each kill lands: the target, and how many more of the running job's
# progress (one a batch) and epoch events it waits for. A fresh run of a job
# has 18: epoch k's batches are events 6k-5 to 6k-1 and its end, where the
# checkpoint is written, event 6k. Each target is killed while the job's
# process starts (0) and at an epoch's end (6, 12); the server mid-epoch (3),
# the worker on the last batch before the job's end (17; for a resumed job,
# whose run is shorter, after its end). Ten seeded random points (the test's
# first form) drew these phases again and again, at twice the time.
KILL_POINTS = (("worker", 0), ("server", 3), ("worker", 6), ("server", 0), ("worker", 17), ("server", 12))
KILLS = len(KILL_POINTS)
SQUARED = "mean(square(y_true - y_pred), axis=-1)"


class _Server:
    """``lossd serve`` over one data directory, restartable."""

    def __init__(self, data_dir: pathlib.Path, log: pathlib.Path):
        self.data_dir, self.log = data_dir, log
        self.proc = None
        self.address = ""

    def start(self) -> None:
        port = free_port()
        command = [str(pathlib.Path(sys.executable).with_name("lossd")), "serve", "--port", str(port),
                   "--metrics-port", "off", "--data-dir", str(self.data_dir), "--grace-seconds", "0", "--drain-seconds", "0",
                   "--max-concurrent-jobs", "1", "--job-max-retries", str(KILLS), "--progress-every-batches", "1"]
        self.proc = subprocess.Popen(command, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, start_new_session=True)
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + PATIENCE  # against a hang: TensorFlow's import, beside the other worker
        with lossd.Client(self.address, timeout=2) as client:
            while True:
                try:
                    client.list_jobs(limit=1)
                    return
                except lossd.LossdError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"lossd serve did not start:\n{self.log.read_text()[-3000:]}")
                    time.sleep(0.2)

    def kill(self) -> None:
        """``kill -9`` the server alone; its job process follows (PR_SET_PDEATHSIG)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGTERM: the server stops cleanly (SQLite folds its WAL into the database file)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def client(self, timeout: float = 60) -> lossd.Client:
        return lossd.Client(self.address, timeout=timeout)

    def state_health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="lossd.state"), timeout=10).status


def _running_worker(server: _Server, killed: set[int], timeout: float = PATIENCE) -> tuple[str, int]:
    """A running job and its live process (one not killed before). The wait
    is a deadline against a hang (PATIENCE): a retried job's new process
    imports TensorFlow, which took past 90 s beside the other xdist worker."""
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while time.monotonic() < deadline:
            for job in client.list_jobs(states=["running"]):
                pid_file = server.data_dir / "jobs" / job.id / "worker.pid"
                try:
                    pid = int(pid_file.read_text())
                except (OSError, ValueError):
                    continue
                if pid not in killed and alive(pid):
                    return job.id, pid
            time.sleep(0.1)
    raise AssertionError("no job process started")


def _after_training_events(server: _Server, job_id: str, n: int) -> None:
    """Returns once the job has reported ``n`` more progress or epoch events (or ended)."""
    if n == 0:
        return
    last = _last_sequence(server, job_id)
    with server.client(timeout=120) as client:
        seen = 0
        for event in client.watch(job_id, after_sequence=last):
            seen += event.kind in ("progress", "epoch")
            if seen >= n:
                return


def _last_sequence(server: _Server, job_id: str) -> int:
    # Read beside the server (WAL readers never block it): WatchJob has no "from now" position.
    with contextlib.closing(sqlite3.connect(server.data_dir / "lossd.sqlite3", timeout=30)) as db, db:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]


def _check_intact(server: _Server, finished: dict[str, dict], losses: dict[str, str]) -> None:
    """Every finished job still succeeded with its history; every registered loss evaluates as registered."""
    with server.client() as client:
        jobs = {j.id: j for j in client.list_jobs()}
        registered = {i.name: i.expression for i in client.losses() if i.source == "expression"}
        y_true, y_pred = np.zeros((2, 3), "float32"), np.ones((2, 3), "float32")
        for name in losses:
            assert float(client.evaluate(name, y_true, y_pred).loss) == pytest.approx(1.0), name
    for job_id, history in finished.items():
        assert jobs[job_id].state == "succeeded", (job_id, jobs[job_id].error)
        assert json.loads((server.data_dir / "jobs" / job_id / "history.json").read_text()) == history
    assert registered == losses


def test_kills_at_random_points_then_corrupt_files_lose_nothing_else(tmp_path):
    rng = random.Random(SEED)
    server = _Server(tmp_path / "data", tmp_path / "server.log")
    server.start()
    losses, finished, killed, targets = {}, {}, set(), []
    try:
        with server.client() as client:
            jobs = [client.create_job("mlp", "digits", epochs=EPOCHS, steps_per_epoch=5, batch_size=16).id
                    for _ in range(3)]
        for run, (target, events) in enumerate(KILL_POINTS):
            with server.client() as client:
                name = f"loss_{run}"
                client.register_loss(name, SQUARED)
                losses[name] = SQUARED
                if all(client.get_job(j).done for j in jobs):
                    jobs.append(client.create_job("mlp", "digits", epochs=EPOCHS, steps_per_epoch=5,
                                                  batch_size=16).id)
            job_id, pid = _running_worker(server, killed)
            _after_training_events(server, job_id, events)
            targets.append(target)
            killed.add(pid)
            if target == "worker":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it finished first: the kill fell after the job
            else:
                server.kill()
                # PR_SET_PDEATHSIG ends it at once; the ceiling only spares a loaded machine's reaping.
                deadline = time.monotonic() + 30
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not alive(pid), "the job process outlived the killed server"
                server.start()
            with server.client() as client:  # what finished so far is kept
                for j in jobs:
                    job = client.get_job(j)
                    if job.state == "succeeded" and j not in finished:
                        finished[j] = json.loads((server.data_dir / "jobs" / j / "history.json").read_text())
            _check_intact(server, finished, losses)
        assert set(targets) == {"server", "worker"}, targets
        with server.client(timeout=300) as client:
            for j in jobs:
                done = client.wait(j, progress=False, timeout=300)
                assert done.state == "succeeded", (j, done.error)
                history = json.loads((server.data_dir / "jobs" / j / "history.json").read_text())
                assert len(history["loss"]) == EPOCHS
                finished.setdefault(j, history)
                assert not list((server.data_dir / "jobs" / j).rglob("tmp-*"))
        _check_intact(server, finished, losses)
        assert server.state_health() == health_pb2.HealthCheckResponse.SERVING

        # Corrupt one loss row, one finished job row, a checkpoint file and an old losses.json.
        server.kill()
        data = server.data_dir
        bad_loss, bad_job = rng.choice(sorted(losses)), rng.choice(sorted(finished))
        with contextlib.closing(sqlite3.connect(data / "lossd.sqlite3")) as db, db:
            db.execute("UPDATE losses SET record = substr(record, 1, 20) WHERE name = ?", (bad_loss,))
            db.execute("UPDATE jobs SET runtime = 'null' WHERE id = ?", (bad_job,))
        (data / "losses.json").write_text('[{"name": "legacy", "expre')
        survivor = next(j for j in sorted(finished) if j != bad_job)
        (data / "jobs" / survivor / "checkpoint.json").write_text("{ torn")
        server.start()
        assert server.state_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        moved = sorted(p.name for p in (data / "quarantine").iterdir())
        assert len(moved) == 3 and any(n.endswith("losses.json") for n in moved), moved
        assert any(bad_job in n for n in moved) and any(bad_loss in n for n in moved), moved
        del losses[bad_loss], finished[bad_job]
        _check_intact(server, finished, losses)

        # Then the database file itself: moved whole, a fresh one serves. (A
        # clean stop first: after a kill, the WAL would still hold page 1.)
        server.stop()
        raw = bytearray((data / "lossd.sqlite3").read_bytes())
        raw[:16] = b"not a database!!"
        (data / "lossd.sqlite3").write_bytes(bytes(raw))
        server.start()
        assert server.state_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        whole = [p for p in (data / "quarantine").iterdir() if p.name.endswith("lossd.sqlite3")]
        assert len(whole) == 1 and whole[0].read_bytes() == bytes(raw)
        with server.client() as client:
            assert client.list_jobs() == []
            assert float(client.evaluate("mse", np.zeros((2, 3), "float32"), np.ones((2, 3), "float32")).loss) == 1.0
    finally:
        server.kill()
