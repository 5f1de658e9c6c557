"""One job over several workers (``workers: N``, MultiWorkerMirroredStrategy):
real TensorFlow, real worker processes talking gRPC collectives on loopback,
CPU only, through a real server. Every process a test starts is stopped by
the server it runs under (``srv.stop``) or by the test itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time

import numpy as np
import pytest

import lossd
from lossd_server.training import multiworker
from tests.servers import PATIENCE, alive, lossd_servers

pytestmark = pytest.mark.slow

# A dense model without dropout: each worker's share of a batch then gives
# exactly the gradient one process computes on the whole batch.
MLP = {"hidden_units": [32], "dropout": 0.0}


@pytest.fixture(scope="module")
def mw_server(tmp_path_factory):
    with lossd_servers(tmp_path_factory, max_concurrent_jobs=2, progress_every_batches=2, job_max_retries=1,
                       job_collective_timeout_seconds=10) as start:
        yield start()


@pytest.fixture()
def mw_client(mw_server):
    with lossd.Client(f"127.0.0.1:{mw_server.port}", timeout=120) as c:
        yield c


def _weights(path):
    import keras

    return keras.models.load_model(path, compile=False).get_weights()


def test_two_workers_train_the_model_one_process_trains(mw_server, mw_client):
    """2 workers: the job succeeds with progress and epoch events, both
    workers hold the same weights after every epoch, and the model equals,
    within 1e-5, the one a single-process job (``model.fit``) trains with the
    same global batch and seed. The reference is the real single-worker
    path, not the custom loop run once: an independent implementation, so
    a fault common to both cannot hide. SGD, because Adam divides by the
    root of tiny second moments and turns 1e-9 rounding into visible steps."""
    common = dict(model_params=MLP, epochs=2, steps_per_epoch=4, batch_size=32, seed=7, optimizer="sgd", learning_rate=0.05,
                  validation_split=0.1)
    job = mw_client.create_job("mlp", "digits", workers=2, **common)
    single = mw_client.create_job("mlp", "digits", **common)
    assert job.spec["workers"] == 2 and single.spec["workers"] == 1
    done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    assert mw_client.wait(single, progress=False, timeout=PATIENCE).state == "succeeded"

    events = list(mw_client.watch(job))
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    progress = [e for e in events if e.kind == "progress"]
    assert [(e.epoch, e.step) for e in progress] == [(1, 2), (1, 4), (2, 2), (2, 4)]  # the chief's alone
    assert all(np.isfinite(e.loss) and e.examples_per_second > 0 for e in progress)

    jobs_dir = mw_server.settings.data_dir / "jobs"
    replicas = jobs_dir / job.id / "replicas"
    digests = [json.loads((replicas / f"worker-{i}.json").read_text())["epochs"] for i in (0, 1)]
    assert set(digests[0]) == {"1", "2"} and digests[0] == digests[1]
    assert digests[0]["1"] != digests[0]["2"]  # it trained

    history = json.loads((jobs_dir / job.id / "history.json").read_text())
    single_history = json.loads((jobs_dir / single.id / "history.json").read_text())
    assert set(history) == set(single_history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in history.items():  # the same metrics, as model.fit computes them
        np.testing.assert_allclose(values, single_history[key], atol=1e-5, rtol=0, err_msg=key)
    multi, one = _weights(jobs_dir / job.id / "model.keras"), _weights(jobs_dir / single.id / "model.keras")
    assert len(multi) == len(one)
    for a, b in zip(multi, one):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    initial = _initial_weights(mw_server, single)
    assert max(float(np.abs(a - b).max()) for a, b in zip(one, initial)) > 1e-3  # so 1e-5 says something


def test_summed_and_unreduced_terms_train_as_one_process_does(mw_server, mw_client):
    """A composite with a term reduced by ``sum``, one left unreduced
    (``none``: model.fit trains on the gradient of the values' sum and
    reports their mean) and one mean, over full epochs whose last batch is
    short (1,617 training images in batches of 32): 2 workers train the model
    and report the history a single-process job (``model.fit``) does."""
    loss = {"terms": [
        {"label": "summed", "loss": {"name": "sparse_categorical_crossentropy"}, "weight": 0.5, "reduction": "sum"},
        {"label": "unreduced", "loss": {"name": "categorical_generalized_cross_entropy"}, "weight": 0.25,
         "reduction": "none"},
        {"label": "mean", "loss": {"name": "sparse_categorical_crossentropy"}, "weight": 2.0}]}
    common = dict(model_params=MLP, epochs=2, batch_size=32, seed=11, optimizer="sgd", learning_rate=1e-4,
                  validation_split=0.1, loss=loss)
    job = mw_client.create_job("mlp", "digits", workers=2, **common)
    single = mw_client.create_job("mlp", "digits", **common)
    done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    assert mw_client.wait(single, progress=False, timeout=PATIENCE).state == "succeeded"

    jobs_dir = mw_server.settings.data_dir / "jobs"
    history = json.loads((jobs_dir / job.id / "history.json").read_text())
    single_history = json.loads((jobs_dir / single.id / "history.json").read_text())
    assert set(history) == set(single_history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in history.items():
        np.testing.assert_allclose(values, single_history[key], rtol=1e-5, atol=1e-6, err_msg=key)
    multi, one = _weights(jobs_dir / job.id / "model.keras"), _weights(jobs_dir / single.id / "model.keras")
    for a, b in zip(multi, one):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    initial = _initial_weights(mw_server, single)
    assert max(float(np.abs(a - b).max()) for a, b in zip(one, initial)) > 1e-3  # so 1e-5 says something


def _initial_weights(srv, job):
    """The untrained weights of ``job``'s model (same preset, params and seed)."""
    import keras

    from lossd_server.training import models

    record = srv.training.store.get_job(job.id)
    keras.utils.set_random_seed(record.spec["seed"])
    model = models.build_model("mlp", record.spec["model"]["params"], record.runtime["image_shape"],
                               len(record.runtime["class_names"]), seed=record.spec["seed"])
    return model.get_weights()


def _pids(job_dir, after: float = 0.0, timeout: float = PATIENCE) -> list[int]:
    """The pids both workers wrote, once written after ``after`` (a time.time()).
    The wait is a deadline against a hang (PATIENCE), not a bound: each
    worker process imports TensorFlow, slow beside the other xdist worker."""
    names = [job_dir / "worker.pid", job_dir / "worker-1.pid"]
    deadline = time.monotonic() + timeout
    while not all(n.exists() and n.stat().st_mtime > after for n in names):
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.1)
    return [int(n.read_text()) for n in names]


def _wait_for(client, job, predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        current = client.get_job(job)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"{what} not within {seconds} s (state {current.state})"
        time.sleep(0.05)


def _retry_message(client, job, after: int, seconds: float):
    """The job's message that it will be retried, which must come within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for event in client.watch(job, after_sequence=after, timeout=seconds):
            if event.kind == "message" and "retry 1 of 1" in event.message:
                return event
            if event.kind == "progress":  # a live job: look again shortly
                after = event.sequence
                break
        time.sleep(0.05)
    raise AssertionError(f"no retry within {seconds} s")


FINAL = ("failed", "succeeded", "cancelled")


def _progress(client, job, after: int = 0):
    """Returns the sequence of the first progress event after ``after`` (a
    deadline against a hang: the workers start first, importing TensorFlow)."""
    for event in client.watch(job, after_sequence=after, timeout=PATIENCE):
        if event.kind == "progress":
            return event.sequence
    raise AssertionError("no progress event")


def test_killing_one_worker_retries_then_fails_within_seconds(mw_server, mw_client):
    """SIGKILL of worker 1 mid-training: within 10 s the scheduler has
    stopped the chief and queued the job again (one retry left), which
    resumes; killed again, the job fails WORKER_CRASHED within 10 s, and no
    worker process is left."""
    job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=400, steps_per_epoch=10,
                               batch_size=32)
    job_dir = mw_server.settings.data_dir / "jobs" / job.id
    seen = _progress(mw_client, job)
    pids = _pids(job_dir)
    assert all(alive(pid) for pid in pids)
    restarted = time.time()
    os.kill(pids[1], signal.SIGKILL)
    retry = _retry_message(mw_client, job, seen, 10)
    assert "killed by SIGKILL" in retry.message
    deadline = time.monotonic() + 5
    while alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids[0]), "the chief outlived its job's other worker"

    _progress(mw_client, job, retry.sequence)  # running again
    again = _pids(job_dir, after=restarted)
    os.kill(again[1], signal.SIGKILL)
    ended = _wait_for(mw_client, job, lambda j: j.state in FINAL, 10, "the job's end")
    assert ended.state == "failed" and ended.error.reason == "WORKER_CRASHED", ended.error
    deadline = time.monotonic() + 5
    while alive(again[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(again[0]), "the chief outlived its job"


def test_a_resumed_job_finishes_its_epochs(mw_server, mw_client):
    """Worker 1 killed after the first checkpoint: the job resumes from it
    (the events say from which epoch) on two fresh workers and finishes every
    epoch, both workers ending with the same weights."""
    job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=40, steps_per_epoch=10,
                               batch_size=32)
    job_dir = mw_server.settings.data_dir / "jobs" / job.id
    for event in mw_client.watch(job, timeout=PATIENCE):  # a deadline against a hang, as in _progress
        if event.kind == "epoch":
            break
    os.kill(_pids(job_dir)[1], signal.SIGKILL)
    done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    events = list(mw_client.watch(job))
    assert sum("retry 1 of 1" in e.message for e in events if e.kind == "message") == 1
    resumes = [e for e in events if e.kind == "message" and e.message.startswith("Resuming from the checkpoint")]
    assert len(resumes) == 1
    first = int(resumes[0].message.split("epoch ")[1].split(";")[0]) + 1
    after = [e.epoch for e in events if e.kind == "epoch" and e.sequence > resumes[0].sequence]
    assert 2 <= first and after == list(range(first, 41))
    history = json.loads((job_dir / "history.json").read_text())
    assert len(history["loss"]) == 40
    digests = [json.loads((job_dir / "replicas" / f"worker-{i}.json").read_text())["epochs"] for i in (0, 1)]
    assert digests[0]["40"] == digests[1]["40"]


@contextlib.contextmanager
def _ports_taken(scheduler, starts: int):
    """For the next ``starts`` multi-worker starts, another program (this
    test's real listening socket) holds worker 1's port from the moment the
    scheduler chose it: the race ``free_addresses`` cannot rule out, made
    certain. Yields the addresses taken."""
    taken, sockets = [], []

    def pick(n):
        addresses = multiworker.free_addresses(n)
        if len(taken) < starts:
            sock = socket.socket()
            sock.bind(("127.0.0.1", int(addresses[1].rpartition(":")[2])))
            sock.listen()
            sockets.append(sock)
            taken.append(addresses[1])
        return addresses

    scheduler.pick_addresses = pick
    try:
        yield taken
    finally:
        del scheduler.pick_addresses  # the class's own again
        for sock in sockets:
            sock.close()


def test_a_port_taken_before_its_worker_binds_it_starts_the_workers_again(mw_server, mw_client):
    """Worker 1's port taken by another program: the worker cannot listen,
    the scheduler starts both workers again on new ports, and the job
    succeeds, with an event that says what happened and no retry spent."""
    with _ports_taken(mw_server.training.scheduler, 1) as taken:
        job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=1, steps_per_epoch=2,
                                   batch_size=32)
        done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "succeeded", done.error
    assert len(taken) == 1
    messages = [e.message for e in mw_client.watch(job) if e.kind == "message"]
    assert [m for m in messages if "could not listen" in m] == [
        f"Worker 1 could not listen on {taken[0]}: another program took the port first. Starting the job's "
        "workers again on new ports (not counted as a retry)."], messages
    assert mw_server.training.store.get_job(job.id).retries == 0


def test_a_port_taken_twice_fails_the_job_saying_so(mw_server, mw_client):
    with _ports_taken(mw_server.training.scheduler, 2) as taken:
        job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=1, steps_per_epoch=2,
                                   batch_size=32)
        done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert len(taken) == 2 and taken[0] != taken[1]
    assert done.state == "failed", done
    assert (done.error.code.name, done.error.reason) == ("UNAVAILABLE", "WORKER_PORT_TAKEN"), done.error
    assert done.error.metadata == {"worker": "1", "address": taken[1]}
    assert done.error.message.startswith(f"Worker 1 of this multi-worker job could not listen on {taken[1]}: "
                                         "another process took that port"), done.error.message
    assert "creating the job again (a new job gets new ports) helps" in done.error.message
    assert mw_server.training.store.get_job(job.id).retries == 0


def test_cancel_stops_every_worker(mw_server, mw_client):
    job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=400, steps_per_epoch=10,
                               batch_size=32)
    _progress(mw_client, job)
    pids = _pids(mw_server.settings.data_dir / "jobs" / job.id)
    assert mw_client.cancel_job(job).state == "cancelled"
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_a_non_finite_loss_stops_the_job(mw_client):
    job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=3, steps_per_epoch=10,
                               batch_size=32, optimizer="sgd", learning_rate=1e30)
    done = mw_client.wait(job, progress=False, timeout=PATIENCE)
    assert done.state == "failed" and done.error.reason == "NON_FINITE_LOSS", done.error


def test_a_worker_whose_peer_died_fails_within_the_collective_timeout(tmp_path, mw_server, mw_client):
    """Without the scheduler: two worker processes of one job, worker 1
    killed; worker 0 reports a failure (it never hangs) within the collective
    timeout plus a margin."""
    import multiprocessing

    from lossd_server.training import multiworker, worker

    job = mw_client.create_job("mlp", "digits", workers=2, model_params=MLP, epochs=400, steps_per_epoch=10,
                               batch_size=32)
    mw_client.cancel_job(job)  # only its record is used: its spec and runtime as the scheduler passes them
    record = mw_server.training.store.get_job(job.id)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    cluster = multiworker.free_addresses(2)
    processes = []
    for index in (0, 1):
        config = {**mw_server.training.scheduler.process_config(record, None), "job_dir": str(tmp_path / "job"),
                  "cluster": cluster, "worker_index": index, "collective_timeout": 5}
        processes.append(ctx.Process(target=worker.run_job, args=(config, q), daemon=True))
        processes[-1].start()
    try:
        report = q.get(timeout=PATIENCE)  # the spawned workers import TensorFlow first
        while report["kind"] != "progress":
            report = q.get(timeout=PATIENCE)
        processes[1].kill()
        killed = time.monotonic()
        while True:
            report = q.get(timeout=30)
            if report["kind"] == "done":
                break
        assert time.monotonic() - killed < 5 + 5
        assert report["worker"] == 0 and report["reason"] == "WORKER_LOST", report
        assert report["code"] == "UNAVAILABLE" and "within 5 s" in report["message"]
        processes[0].join(10)
        assert not processes[0].is_alive()
    finally:
        for process in processes:
            process.kill()
            process.join(5)


@pytest.mark.parametrize("kwargs, code, reason, says", [
    (dict(workers=-1), "INVALID_ARGUMENT", "BAD_JOB_SPEC", "Expected an integer in [1, 4]. Received: -1"),
    (dict(workers=5), "INVALID_ARGUMENT", "BAD_JOB_SPEC", "Expected an integer in [1, 4]. Received: 5"),
    (dict(workers=3), "FAILED_PRECONDITION", "NOT_ENOUGH_JOB_SLOTS", "Expected at most 2"),
    (dict(workers=2, metrics=["auc"]), "INVALID_ARGUMENT", "BAD_JOB_SPEC", "Expected `accuracy` alone"),
    (dict(workers=2, batch_size=1), "INVALID_ARGUMENT", "BAD_JOB_SPEC", "Expected at most batch_size=1 workers"),
    (dict(workers=2, model="vae"), "INVALID_ARGUMENT", "BAD_JOB_SPEC", "Expected 1 for the `vae` preset"),
    (dict(workers=2, loss={"expression": "mean(square(y_true - y_pred), axis=0)"}), "INVALID_ARGUMENT",
     "BAD_JOB_SPEC", "Expected 1 for loss `expression`: its values couple the rows of a batch"),
    (dict(workers=2, loss={"name": "sparse_categorical_crossentropy", "params": {"ignore_class": 1}}),
     "INVALID_ARGUMENT", "BAD_JOB_SPEC", "divides by the labels not ignored over the whole batch"),
])
def test_bad_workers_are_refused(mw_client, kwargs, code, reason, says):
    kwargs = {"model": "mlp", "dataset": "digits", **kwargs}
    with pytest.raises(lossd.LossdError) as info:
        mw_client.create_job(**kwargs)
    assert info.value.code.name == code and info.value.reason == reason
    assert says in info.value.message and "Received" in info.value.message
