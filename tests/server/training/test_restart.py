"""`kill -9` the server during a job, start it again: finished jobs are all
still there, and the interrupted job resumes from its last checkpoint and
finishes with the epochs it asked for. The server is the real `lossd serve`
command, in its own process group so nothing outlives the test."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

import lossd

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir: pathlib.Path, log: pathlib.Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    lossd_cmd = pathlib.Path(sys.executable).with_name("lossd")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([str(lossd_cmd), "serve", "--port", str(port), "--metrics-port", "off",
                             "--data-dir", str(data_dir), "--grace-seconds", "0"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    with lossd.Client(address, timeout=2) as client:
        while True:
            try:
                client.list_jobs(limit=1)
                return proc, address
            except lossd.LossdError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lossd serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    # The whole group: the server and any job process it started.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False


def test_kill_9_then_restart_resumes_from_checkpoint(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    server, address = _start(data_dir, log)
    try:
        with lossd.Client(address, timeout=120) as client:
            finished = client.wait(client.create_job("mlp", "digits", epochs=1, steps_per_epoch=2), progress=False)
            assert finished.state == "succeeded"
            job = client.create_job("cnn", "digits", epochs=4, batch_size=8)
            for event in client.watch(job):
                if event.kind == "epoch" and event.epoch == 1:
                    break  # the first checkpoint is on disk (written before the event)
        job_dir = data_dir / "jobs" / job.id
        assert json.loads((job_dir / "checkpoint.json").read_text())["epoch"] >= 1
        worker_pid = int((job_dir / "worker.pid").read_text())
        assert _alive(worker_pid)

        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 5
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pid), "the job process outlived the killed server"
        _stop(server)

        server, address = _start(data_dir, log)
        with lossd.Client(address, timeout=180) as client:
            assert client.get_job(finished).state == "succeeded"
            resumed = client.wait(job, progress=False)
            assert resumed.state == "succeeded", resumed.error
            events = list(client.watch(job))
        history = json.loads((job_dir / "history.json").read_text())
        assert len(history["loss"]) == 4 and len(history["val_accuracy"]) == 4
        resumes = [e for e in events if e.kind == "message" and e.message.startswith("Resuming from the checkpoint")]
        assert len(resumes) == 1
        first_epoch_after = int(resumes[0].message.split("epoch ")[1].split(";")[0]) + 1
        assert first_epoch_after >= 2
        epochs_after = [e.epoch for e in events if e.kind == "epoch" and e.sequence > resumes[0].sequence]
        assert epochs_after == list(range(first_epoch_after, 5))
        states = [e.state for e in events if e.kind == "state"]
        assert states == ["queued", "running", "queued", "running", "succeeded"]
    finally:
        _stop(server)
