"""The scheduler: runs queued jobs, each in its own spawned process, under a
concurrency limit; records what the processes report; cancels; after a
restart, requeues what was running (it resumes from its checkpoint); and
streams a job's events to watchers.

One scheduler thread owns the job processes: it starts queued jobs when a
slot is free, drains their report queues into the store, notices processes
that exit, and stops the ones being cancelled. Every other thread (the RPCs)
only reads the store or asks the scheduler to act, so process handling
needs no locking beyond one lock for state transitions.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import queue as queue_module
import threading
import time
from typing import Any, Callable, Iterator, Optional

from lossd_server.errors import FailedPrecondition
from lossd_server.training import jobs, worker
from lossd_server.training.artifacts import Artifacts
from lossd_server.training.store import (CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, Event,
                                         JobRecord, Store)

log = logging.getLogger(__name__)

# How long CancelJob waits for a running job's process to stop.
CANCEL_WAIT_SECONDS = 5.0


@dataclasses.dataclass
class _Running:
    job_id: str
    process: Any
    queue: Any
    started: float
    done: Optional[dict] = None
    rate: float = 0.0
    counted_examples: int = 0  # training examples of the current epoch already counted in metrics


class Scheduler:
    """Runs, supervises, cancels and watches training jobs.

    Args:
        settings: ``lossd_server.config.Settings`` (``max_concurrent_jobs``,
            ``progress_every_batches``, ``mixed_precision``, ``max_upload_bytes``).
        store: Where jobs and their events live.
        artifacts: The job folders the processes write.
        gpus: How many GPUs there are: one job per GPU at a time by default,
            each job seeing only its own.
        metrics: Optional ``lossd_server.observability.metrics.Metrics``.
    """

    def __init__(self, settings, store: Store, artifacts: Artifacts, *, gpus: int, metrics=None):
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.gpus = gpus
        self.slots = settings.max_concurrent_jobs or max(gpus, 1)
        self.metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._events = threading.Condition()
        self._running: dict[str, _Running] = {}
        self._gpu_of: dict[str, Optional[int]] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Recovers jobs a previous server left unfinished, then starts scheduling."""
        if self._thread is not None:
            raise RuntimeError("The training scheduler was started already.")
        for job in self.store.jobs_in_states([CANCELLING]):
            self.store.update_job(job.id, state=CANCELLED, end_time=time.time(),
                                  event=("state", {"state": CANCELLED}))
        for job in self.store.jobs_in_states([RUNNING]):
            epoch = (worker.read_checkpoint(self.artifacts.job_dir(job.id)) or {}).get("epoch", 0)
            self.store.append_event(job.id, "message", {
                "text": f"The server restarted; the job will resume from the checkpoint of epoch {epoch}."
                if epoch else "The server restarted; the job will start again (no checkpoint yet)."})
            self.store.update_job(job.id, state=QUEUED, event=("state", {"state": QUEUED}))
        self._count_jobs()
        self._thread = threading.Thread(target=self._loop, name="training-scheduler", daemon=True)
        self._thread.start()
        log.info("training: %d slot(s), %d GPU(s), jobs under %s", self.slots, self.gpus, self.artifacts.jobs_dir)

    def stop(self) -> None:
        """Stops scheduling and the job processes. Running jobs keep their state,
        so the next start resumes them from their checkpoints."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        for run in list(self._running.values()):
            self._kill(run)
        self._running.clear()
        with self._events:
            self._events.notify_all()

    # -- what the RPCs ask -----------------------------------------------------

    def submitted(self) -> None:
        """A job was queued: count it and wake the scheduler."""
        self._count_jobs()
        self._notify()

    def cancel(self, job_id: str) -> JobRecord:
        """Cancels a job (best effort); returns it, normally CANCELLED.

        Raises:
            NotFound: no such job (JOB_NOT_FOUND).
            FailedPrecondition: the job already finished (JOB_ALREADY_FINISHED).
        """
        with self._lock:
            job = jobs.lookup(self.store, job_id)
            if job.final:
                raise FailedPrecondition(
                    f"Job `jobs/{job_id}` already finished ({job.state}); only queued or running jobs can be "
                    "cancelled.", reason="JOB_ALREADY_FINISHED", metadata={"state": job.state})
            if job.state == QUEUED:
                self._finish(job, CANCELLED)
                return jobs.lookup(self.store, job_id)
            if job.state == RUNNING:
                self.store.update_job(job_id, state=CANCELLING, event=("state", {"state": CANCELLING}))
            self._cancel.add(job_id)
        self._notify()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            job = jobs.lookup(self.store, job_id)
            if job.final:
                return job
            with self._events:
                self._events.wait(0.05)
        return jobs.lookup(self.store, job_id)

    def watch(self, job_id: str, after: int = 0, is_active: Callable[[], bool] = lambda: True
              ) -> Iterator[Event]:
        """The job's events after ``after``, then live ones; ends when the job has
        ended (or ``is_active()`` turns false, or the scheduler stops)."""
        jobs.lookup(self.store, job_id)
        while True:
            events = self.store.events(job_id, after)
            for event in events:
                after = event.seq
                yield event
            if events:
                continue
            job = jobs.lookup(self.store, job_id)
            if job.final and not self.store.events(job_id, after):
                return
            if not is_active() or self._stopping:
                return
            with self._events:
                self._events.wait(0.5)

    # -- the scheduler thread --------------------------------------------------

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while True:
            try:
                self._pump()
                self._launch()
            except Exception:  # noqa: BLE001 - the scheduler must outlive a bad job
                log.exception("training scheduler error")
            with self._wake:
                if self._stopping:
                    return
                # Poll job queues often while jobs run; when idle, sleep until
                # create, cancel or stop wakes us.
                self._wake.wait(0.1 if self._running else 5.0)

    def _launch(self) -> None:
        with self._lock:
            free = self.slots - len(self._running)
            if free <= 0:
                return
            for job in self.store.jobs_in_states([QUEUED])[:free]:
                used = set(self._gpu_of.values())
                gpu = next((g for g in range(self.gpus) if g not in used), None) if self.gpus else None
                job_dir = self.artifacts.job_dir(job.id)
                job_dir.mkdir(parents=True, exist_ok=True)
                config = {
                    "job_id": job.id, "job_dir": str(job_dir), "spec": job.spec, "runtime": job.runtime,
                    "model_kind": job.model_kind, "progress_every": self.settings.progress_every_batches,
                    "mixed_precision": self.settings.mixed_precision, "gpu": gpu, "parent_pid": os.getpid(),
                    "max_upload_bytes": self.settings.max_upload_bytes,
                }
                q = self._ctx.Queue()
                # Started from this long-lived thread: PR_SET_PDEATHSIG in the
                # child fires when the thread that started it exits.
                process = self._ctx.Process(target=worker.run_job, args=(config, q), name=f"lossd-job-{job.id}",
                                            daemon=True)
                process.start()
                self._running[job.id] = _Running(job.id, process, q, time.time())
                self._gpu_of[job.id] = gpu
                self.store.update_job(job.id, state=RUNNING, start_time=job.start_time or time.time(),
                                      event=("state", {"state": RUNNING}))
                log.info("job %s started (pid %d%s)", job.id, process.pid, f", GPU {gpu}" if gpu is not None else "")
        self._count_jobs()
        with self._events:
            self._events.notify_all()

    def _pump(self) -> None:
        for job_id, run in list(self._running.items()):
            self._drain(run)
            if job_id in self._cancel:
                self._kill(run)
                self._drain(run)
                self._cancel.discard(job_id)
                self._finish(jobs.lookup(self.store, job_id), CANCELLED)
                continue
            if not run.process.is_alive():
                run.process.join(1)
                self._drain(run)
                job = jobs.lookup(self.store, job_id)
                done = run.done or {}
                if done.get("state") == SUCCEEDED:
                    self._finish(job, SUCCEEDED)
                elif done.get("state") == FAILED:
                    self._finish(job, FAILED, {"code": "FAILED_PRECONDITION" if done["reason"] == "NON_FINITE_LOSS"
                                               else "INTERNAL", "reason": done["reason"],
                                               "message": done["message"], "metadata": done.get("metadata", {})})
                else:
                    self._finish(job, FAILED, {
                        "code": "INTERNAL", "reason": "WORKER_CRASHED",
                        "message": f"The training process exited with code {run.process.exitcode} before "
                                   "finishing.", "metadata": {"exitcode": str(run.process.exitcode)}})

    def _drain(self, run: _Running) -> None:
        got = False
        while True:
            try:
                report = run.queue.get_nowait()
            except (queue_module.Empty, EOFError, OSError):
                break
            got = True
            try:
                self._on_report(run, report)
            except Exception:  # noqa: BLE001
                log.exception("bad report from job %s: %r", run.job_id, report)
        if got:
            with self._events:
                self._events.notify_all()

    def _on_report(self, run: _Running, report: dict) -> None:
        kind = report.pop("kind")
        job_id = run.job_id
        if kind == "done":
            run.done = report
        elif kind == "message":
            self.store.append_event(job_id, "message", report)
        elif kind == "progress":
            job = jobs.lookup(self.store, job_id)
            progress = {**job.progress, "step": report["step"], "steps_per_epoch": report["steps_per_epoch"],
                        "examples_per_second": report["examples_per_second"], "eta_seconds": report["eta_seconds"],
                        "metrics": {**job.progress.get("metrics", {}), "loss": report["loss"]}}
            self.store.update_job(job_id, progress=progress, event=("progress", report))
            run.rate = report["examples_per_second"]
            new_examples = max(report["examples"] - run.counted_examples, 0)
            run.counted_examples = report["examples"]
            if self.metrics is not None:
                self.metrics.training_progress(new_examples, self._throughput())
        elif kind == "epoch":
            job = jobs.lookup(self.store, job_id)
            progress = {**job.progress, "epochs_completed": report["epoch"], "epochs": report["epochs"],
                        "step": 0, "metrics": report["metrics"],
                        "examples_per_second": report["examples_per_second"]}
            self.store.update_job(job_id, progress=progress, event=("epoch", report))
            new_examples = max(report["examples"] - run.counted_examples, 0)
            run.counted_examples = 0
            if self.metrics is not None:
                self.metrics.training_epoch_ended(new_examples, report["metrics"])

    def _throughput(self) -> float:
        """Examples per second, summed over the running jobs."""
        return sum(r.rate for r in self._running.values())

    def _kill(self, run: _Running) -> None:
        # SIGTERM first (TensorFlow installs no handler, so it ends at once);
        # SIGKILL if it lingers, to stay within CancelJob's two seconds.
        if run.process.is_alive():
            run.process.terminate()
            run.process.join(1.0)
        if run.process.is_alive():
            run.process.kill()
            run.process.join(1.0)

    def _finish(self, job: JobRecord, state: str, error: Optional[dict] = None) -> None:
        end = time.time()
        self.store.update_job(job.id, state=state, end_time=end, error=error,
                              event=("state", {"state": state, **({"error": error} if error else {})}))
        run = self._running.pop(job.id, None)
        self._gpu_of.pop(job.id, None)
        log.info("job %s %s%s", job.id, state, f": {error['reason']}: {error['message']}" if error else "")
        if self.metrics is not None:
            self.metrics.observe_job_finished(state, end - (job.start_time or job.create_time))
            if run is not None:
                self.metrics.set_training_throughput(self._throughput())
        self._count_jobs()
        with self._events:
            self._events.notify_all()

    def _count_jobs(self) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = collections.Counter()
        for state, n in self.store.counts_by_state().items():
            # lossd_training_jobs has no "cancelling": such a job still runs.
            counts[RUNNING if state == CANCELLING else state] += n
        self.metrics.set_training_jobs(dict(counts))
