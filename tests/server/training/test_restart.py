"""`kill -9` the server during a job, start it again: finished jobs are all
still there, and the interrupted job resumes from its last checkpoint and
finishes with the epochs it asked for. The server is the real `lossd serve`
command, in its own process group so nothing outlives the test."""

from __future__ import annotations

import json
import signal
import time

import pytest

import lossd
from tests.servers import alive, kill_group, serve_process

pytestmark = pytest.mark.slow


def test_kill_9_then_restart_resumes_from_checkpoint(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    server, address = serve_process(data_dir, log)
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
        assert alive(worker_pid)

        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 5
        while alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker_pid), "the job process outlived the killed server"
        kill_group(server)

        server, address = serve_process(data_dir, log)
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
        kill_group(server)
