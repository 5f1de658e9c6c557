"""The scheduler: runs queued jobs, each in its own spawned process, under a
concurrency limit; records what the processes report; cancels; after a
restart, requeues what was running (it resumes from its checkpoint); and
streams a job's events to watchers.

One scheduler thread owns the job processes: it starts queued jobs when a
slot is free, drains their report queues into the store, notices processes
that exit, and stops the ones being cancelled. Every other thread (the RPCs)
only reads the store or asks the scheduler to act, so process handling
needs no locking beyond one lock for state transitions.

A process that dies without reporting (killed, out of memory, a crash in
native code) frees its slot at once; its job is queued again to resume from
its checkpoint, up to ``job_max_retries`` times, then fails WORKER_CRASHED.
A fault of the scheduler itself (a full disk refusing the store's writes) is
logged once, not once per loop, and what could not be recorded is retried.

Several replicas may share one store (PostgreSQL, ``Store.shared``): each
scheduler claims queued jobs from it (``Store.claim_jobs``, row locks) and
holds a lease on each job it runs, renewed at least every second. A job
whose replica died is claimed again once its lease ran out and resumes from
its checkpoint in the shared artifacts folder; a replica that finds it lost
a lease (another took the job over) stops its process, so a job never runs
twice at once. The renewal also tells a replica that another one cancelled
its job.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import queue as queue_module
import secrets
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

from lossd_server.callers import Caller
from lossd_server.errors import FailedPrecondition, ResourceExhausted, Unavailable, redact_paths
from lossd_server.observability import tracing
from lossd_server.observability.logs import audited
from lossd_server.training import jobs, loop, multiworker, worker
from lossd_server.training.artifacts import Artifacts
from lossd_server.state.store import (CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, Event, JobRecord,
                                      Store)

log = logging.getLogger(__name__)

# How long CancelJob waits for a running job's process to stop.
CANCEL_WAIT_SECONDS = 5.0
# A repeated scheduler fault (a full disk) is logged again only after this many
# seconds without it.
FAULT_QUIET_SECONDS = 30.0
# Longest between two lease renewals, whatever the lease: the renewal is also
# how a replica learns that another one cancelled its job.
RENEW_SECONDS = 1.0
# How long an idle scheduler alone on its store sleeps unless woken.
IDLE_SECONDS = 5.0


def default_replica_id() -> str:
    """``<hostname>-<pid>-<random>``: unique even for two servers in one process."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclasses.dataclass
class _Running:
    job_id: str
    process: Any
    queue: Any
    started: float
    done: Optional[dict] = None
    rate: float = 0.0
    counted_examples: int = 0  # training examples of the current epoch already counted in metrics
    # A multi-worker job: ``process`` is worker 0 (the chief), these the others.
    others: list = dataclasses.field(default_factory=list)
    others_done: dict = dataclasses.field(default_factory=dict)  # worker index -> its ``done`` report
    port_retried: bool = False  # its workers were started again after one lost its port (PortTaken)

    @property
    def slots(self) -> int:
        """The job slots it takes: one per worker process."""
        return 1 + len(self.others)

    @property
    def processes(self) -> list:
        return [self.process, *self.others]


class Scheduler:
    """Runs, supervises, cancels and watches training jobs.

    Args:
        settings: ``lossd_server.config.Settings`` (``max_concurrent_jobs``,
            ``progress_every_batches``, ``mixed_precision``, ``max_upload_bytes``,
            ``job_max_retries``, ``replica_id``, ``job_lease_seconds``).
        store: Where jobs and their events live.
        artifacts: The job folders the processes write.
        gpus: How many GPUs there are: one job per GPU at a time by default,
            each job seeing only its own.
        metrics: Optional ``lossd_server.observability.metrics.Metrics``.
    """

    # The loopback addresses of a multi-worker job's workers (tests pick their own).
    pick_addresses = staticmethod(multiworker.free_addresses)

    def __init__(self, settings, store: Store, artifacts: Artifacts, *, gpus: int, metrics=None):
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.gpus = gpus
        # 0 (an evaluator replica): claims nothing; other replicas run the jobs.
        self.slots = max(gpus, 1) if settings.max_concurrent_jobs is None else settings.max_concurrent_jobs
        self.metrics = metrics
        self.replica = settings.replica_id or default_replica_id()
        self.lease_seconds = settings.job_lease_seconds
        # How often the queue is looked at without being woken. A scheduler
        # is woken whenever a job is queued here or a slot frees; on a shared
        # store also by ``heard``, when the store's Follower sees a job that
        # another replica queued or whose lease ran out.
        self.claim_every = IDLE_SECONDS
        self._next_claim = 0.0  # monotonic time of the next claim; 0: at once
        self._renewed = 0.0  # monotonic time of the last lease renewal
        self._published = 0.0  # monotonic time this replica last published its job slots (shared store)
        self._unrunnable: dict[str, int] = {}  # queued job -> the largest live slot count it was told of
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._events = threading.Condition()
        self._running: dict[str, _Running] = {}
        self._gpu_of: dict[str, list[int]] = {}  # job -> the GPUs its processes use
        self._cancel: set[str] = set()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        # Store writes a full disk refused (a job's final state, a requeue),
        # retried every loop until they land.
        self._unrecorded: dict[str, Callable[[], None]] = {}
        self._fault: Optional[str] = None  # the fault logged last; repeats are not logged again
        self._fault_time = 0.0  # when a fault last happened (logged or not)

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Recovers jobs a previous server left unfinished, then starts scheduling."""
        if self._thread is not None:
            raise RuntimeError("The training scheduler was started already.")
        if not self.store.shared:
            self._recover()
        else:
            try:
                self._publish()  # before the first CreateJob: this replica's slots are live
            except (ResourceExhausted, Unavailable) as exc:  # the loop publishes once the database answers
                self._published = 0.0
                self._report_fault(exc.message)
        self._count_jobs()
        self._thread = threading.Thread(target=self._loop, name="training-scheduler", daemon=True)
        self._thread.start()
        log.info("training: %d slot(s), %d GPU(s), jobs under %s, replica %s", self.slots, self.gpus,
                 self.artifacts.jobs_dir, self.replica)

    def _recover(self) -> None:
        """A store no other process uses: whatever it says is running was
        this server's before it stopped, and runs no more."""
        for job in self.store.jobs_in_states([CANCELLING]):
            self.store.update_job(job.id, state=CANCELLED, end_time=time.time(),
                                  event=("state", {"state": CANCELLED}))
        for job in self.store.jobs_in_states([RUNNING]):
            epoch = (loop.read_checkpoint(self.artifacts.job_dir(job.id)) or {}).get("epoch", 0)
            self.store.append_event(job.id, "message", {
                "text": f"The server restarted; the job will resume from the checkpoint of epoch {epoch}."
                if epoch else "The server restarted; the job will start again (no checkpoint yet)."})
            self.store.update_job(job.id, state=QUEUED, event=("state", {"state": QUEUED}))
        # No job process runs yet: what a killed one was writing is garbage.
        if self.artifacts.jobs_dir.is_dir():
            for job_dir in self.artifacts.jobs_dir.iterdir():
                if job_dir.is_dir():
                    loop.remove_temp_files(job_dir)

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
        if self.store.shared and self._running:
            self._release(list(self._running), f"Replica {self.replica} stopped; the job waits for another replica, "
                                               "which resumes it from its last checkpoint.")
        if self.store.shared:
            try:
                self.store.withdraw_replica(self.replica)
            except (ResourceExhausted, Unavailable) as exc:  # its publication expires by itself
                log.warning("replica %s could not withdraw its job slots: %s", self.replica, exc.message)
        self._running.clear()
        with self._events:
            self._events.notify_all()

    # -- what the RPCs ask -----------------------------------------------------

    def submitted(self) -> None:
        """A job was queued: count it and wake the scheduler."""
        self._count_jobs()
        self._next_claim = 0.0
        self._notify()

    def heard(self, look) -> None:
        """What the shared store's ``Follower`` saw (a ``store.Look``): the
        jobs by state for the metrics, and a wake-up to claim when a job is
        claimable (queued by another replica, or its replica's lease ran
        out), so no claim is tried while there is nothing to claim."""
        self._set_counts(look.counts)
        if look.claimable and self.slots > 0:
            self._next_claim = 0.0
            self._notify()

    def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        """Cancels a job ``caller`` owns (best effort); returns it, normally
        CANCELLED. An admin's cancel of another caller's job is audited.

        Raises:
            NotFound: no such job, or another caller's (JOB_NOT_FOUND).
            FailedPrecondition: the job already finished (JOB_ALREADY_FINISHED).
        """
        owner = jobs.lookup(self.store, job_id, caller).owner
        if owner == caller.name:
            return self._cancel_job(job_id)
        with audited(caller.name, "cancel_job", f"jobs/{job_id}", owner=owner):
            return self._cancel_job(job_id)

    def _cancel_job(self, job_id: str) -> JobRecord:
        with self._lock:
            job = jobs.lookup(self.store, job_id)
            if job.final:
                raise FailedPrecondition(
                    f"Job `jobs/{job_id}` already finished ({job.state}); only queued or running jobs can be "
                    "cancelled.", reason="JOB_ALREADY_FINISHED", metadata={"state": job.state})
            if job.state == QUEUED:
                if self.store.cancel_queued(job_id):  # not if a replica claimed it meanwhile
                    self._finish(job, CANCELLED, recorded=True)
                    return jobs.lookup(self.store, job_id)
                job = jobs.lookup(self.store, job_id)
            if job.state == RUNNING:
                self.store.update_job(job_id, state=CANCELLING, event=("state", {"state": CANCELLING}))
            self._cancel.add(job_id)
        self._notify()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        try:
            while time.monotonic() < deadline:
                job = jobs.lookup(self.store, job_id)
                if job.final:
                    return job
                with self._events:
                    self._events.wait(0.05)
            return jobs.lookup(self.store, job_id)
        finally:
            if job_id not in self._running:  # another replica's job: that replica stops it
                self._cancel.discard(job_id)

    def watch(self, job_id: str, caller: Caller, after: int = 0, is_active: Callable[[], bool] = lambda: True
              ) -> Iterator[Event]:
        """The events after ``after`` of a job ``caller`` owns, then live ones;
        ends when the job has ended (or ``is_active()`` turns false, or the
        scheduler stops). Another caller's job is JOB_NOT_FOUND."""
        jobs.lookup(self.store, job_id, caller)
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
                self._record_unrecorded()
                self._renew()
                self._publish()
                self._pump()
                self._launch()
                # Writes may fail on and off while a disk is nearly full: it
                # counts as recovered only after a quiet spell.
                if (self._fault is not None and not self._unrecorded
                        and time.monotonic() - self._fault_time > FAULT_QUIET_SECONDS):
                    log.info("training scheduler recovered from: %s", self._fault)
                    self._fault = None
            except (ResourceExhausted, Unavailable) as exc:  # DISK_FULL, DATABASE_UNAVAILABLE: the message says all
                self._report_fault(exc.message)
            except Exception as exc:  # noqa: BLE001 - the scheduler must outlive a bad job
                self._report_fault(f"{type(exc).__name__}: {exc}", exc)
            with self._wake:
                if self._stopping:
                    return
                # Poll job queues often while jobs run; when idle, sleep until
                # create, cancel or stop wakes us, or the next claim is due.
                self._wake.wait(0.1 if self._running else self.claim_every)

    def _report_fault(self, text: str, exc: Optional[BaseException] = None) -> None:
        """Logs a scheduler fault the first time it happens, not on every loop."""
        self._fault_time = time.monotonic()
        if text == self._fault:
            return
        self._fault = text
        log.error("training scheduler: %s (logged once; retrying quietly)", text, exc_info=exc)

    def _record(self, job_id: str, write: Callable[[], None]) -> None:
        """Runs a store write for a job; one a full disk refuses is kept and
        retried every loop (the newest write per job wins)."""
        try:
            write()
            self._unrecorded.pop(job_id, None)
        except ResourceExhausted as exc:
            self._unrecorded[job_id] = write
            self._report_fault(exc.message)

    def _record_unrecorded(self) -> None:
        for job_id, write in list(self._unrecorded.items()):
            self._record(job_id, write)

    def _launch(self) -> None:
        with self._lock:
            free = self.slots - sum(run.slots for run in self._running.values())
            now = time.monotonic()
            if free <= 0 or now < self._next_claim:
                return
            self._next_claim = now + self.claim_every
            # Claiming stores RUNNING before the process starts: were it the
            # other way, a refused write would leave a process for a job
            # still QUEUED, and the next loop would start it twice. A job
            # whose requeue is not stored yet waits until it is.
            # A multi-worker job starts once as many slots as it has workers
            # are free at once; jobs behind it that fit start meanwhile.
            too_big = [job.id for job in self.store.jobs_in_states([QUEUED]) if jobs.workers_of(job) > free]
            claim_time = time.time()  # a start_time from this claim on is the job's first start
            claimed = self.store.claim_jobs(self.replica, free, self.lease_seconds,
                                            skip=[*self._running, *self._unrecorded, *too_big])
            try:
                while claimed:
                    job, before = claimed[0]
                    needs = jobs.workers_of(job)
                    if needs > free:  # a multi-worker job waits for as many free slots as it has workers
                        break
                    self._start_process(job, taken_over=before != QUEUED)
                    if job.start_time is not None and job.start_time >= claim_time:
                        tracing.current.job(job.runtime.get("traceparent")).record(
                            "lossd.job.queued", job.create_time, job.start_time, **{"lossd.job.id": job.id})
                    free -= needs
                    claimed.pop(0)
            finally:
                if claimed:  # not started: back in the queue for any replica
                    self._release([job.id for job, _ in claimed], None)
        self._count_jobs()
        with self._events:
            self._events.notify_all()

    def _start_process(self, job: JobRecord, *, taken_over: bool, port_retried: bool = False) -> None:
        """Starts the process of a job this replica claimed (one per worker
        of a multi-worker job, each with its ``TF_CONFIG``; ``port_retried``:
        the second start after a worker lost its port)."""
        n_workers = jobs.workers_of(job)
        used = {g for gpus in self._gpu_of.values() for g in gpus}
        gpus = [g for g in range(self.gpus) if g not in used][:n_workers]
        job_dir = self.artifacts.job_dir(job.id)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceExhausted(f"cannot create the folder of job {job.id}: {exc.strerror}",
                                    reason="DISK_FULL") from exc
        if taken_over:  # its replica died: what its process was writing is garbage
            loop.remove_temp_files(job_dir)
            epoch = (loop.read_checkpoint(job_dir) or {}).get("epoch", 0)
            self.store.append_event(job.id, "message", {
                "text": f"The replica running the job stopped renewing its lease; replica {self.replica} resumes "
                        + (f"it from the checkpoint of epoch {epoch}." if epoch else "it from the start (no "
                                                                                       "checkpoint yet)."),
                "replica": self.replica})
        q = self._ctx.Queue()  # one queue for all workers: their reports carry their index
        cluster = self.pick_addresses(n_workers) if n_workers > 1 else None
        processes = []
        try:
            for index in range(n_workers):
                gpu = gpus[index] if index < len(gpus) else None
                if cluster and gpu is None and self.gpus:
                    gpu = -1  # no GPU of its own left: CPU, rather than crowding the others' GPUs
                config = self.process_config(job, gpu)
                if cluster:
                    config.update(cluster=cluster, worker_index=index,
                                  collective_timeout=self.settings.job_collective_timeout_seconds)
                # Started from this long-lived thread: PR_SET_PDEATHSIG in the
                # child fires when the thread that started it exits.
                process = self._ctx.Process(target=worker.run_job, args=(config, q), daemon=True,
                                            name=f"lossd-job-{job.id}" + (f"-worker-{index}" if cluster else ""))
                process.start()  # OSError (no memory or pids left): _launch puts the job back in the queue
                processes.append(process)
        except BaseException:
            for process in processes:
                process.kill()
            raise
        self._running[job.id] = _Running(job.id, processes[0], q, time.time(), others=processes[1:],
                                         port_retried=port_retried)
        self._gpu_of[job.id] = gpus
        log.info("job %s started (pid %s%s)", job.id, ", ".join(str(p.pid) for p in processes),
                 f", GPU {gpus}" if gpus else "")

    def process_config(self, job: JobRecord, gpu: Optional[int]) -> dict:
        """What ``worker.run_job`` needs to train ``job`` (one process's part)."""
        return {
            "job_id": job.id, "job_dir": str(self.artifacts.job_dir(job.id)), "spec": job.spec,
            "runtime": job.runtime, "model_kind": job.model_kind,
            "progress_every": self.settings.progress_every_batches,
            "mixed_precision": self.settings.mixed_precision, "gpu": gpu, "parent_pid": os.getpid(),
            "max_upload_bytes": self.settings.max_upload_bytes,
        }

    def _release(self, job_ids: list[str], text: Optional[str]) -> None:
        """Puts jobs this replica claimed back in the queue, lease dropped."""
        for job_id in job_ids:
            try:
                if text:
                    self.store.append_event(job_id, "message", {"text": text, "replica": self.replica})
                self.store.update_job(job_id, state=QUEUED, lease_owner=None, event=("state", {"state": QUEUED}))
            except Exception as exc:  # noqa: BLE001 - its lease runs out and any replica claims it then
                log.warning("job %s could not be put back in the queue (%s); it is claimed again when its "
                            "lease runs out", job_id, exc)

    def _renew(self) -> None:
        """Renews the leases of the jobs running here; stops those another
        replica took over, and cancels those another replica cancelled."""
        now = time.monotonic()
        if not self._running or now - self._renewed < min(self.lease_seconds / 3, RENEW_SECONDS):
            return
        self._renewed = now
        held = self.store.renew_leases(self.replica, list(self._running), self.lease_seconds)
        for job_id, run in list(self._running.items()):
            state = held.get(job_id)
            if state is None:
                log.warning("job %s: replica %s lost its lease (another replica took the job over); stopping "
                            "its process here", job_id, self.replica)
                self._kill(run)
                self._running.pop(job_id, None)
                self._gpu_of.pop(job_id, None)
            elif state == CANCELLING:
                self._cancel.add(job_id)

    def _publish(self) -> None:
        """On a shared store: publishes this replica's job slots, renewed as
        its jobs' leases are, so CreateJob on any replica knows what the live
        ones can run. The live replica with the smallest id then tells each
        queued job that no live replica can run (more workers than the most
        slots of one live replica) why it waits, once per change."""
        now = time.monotonic()
        if not self.store.shared or now - self._published < min(self.lease_seconds / 3, RENEW_SECONDS):
            return
        self._published = now
        self.store.publish_replica(self.replica, self.slots, self.lease_seconds)
        live = self.store.live_replicas()
        if min(live, default=self.replica) != self.replica:
            self._unrunnable.clear()  # another replica reports
            return
        largest = max(live.values(), default=0)
        queued = self.store.jobs_in_states([QUEUED])
        waiting = {job.id for job in queued}
        for job_id in list(self._unrunnable):
            if job_id not in waiting:
                del self._unrunnable[job_id]
        for job in queued:
            needs = jobs.workers_of(job)
            if needs <= largest:
                self._unrunnable.pop(job.id, None)
            elif self._unrunnable.get(job.id) != largest:
                self._unrunnable[job.id] = largest
                self.store.append_event(job.id, "message", {
                    "text": unrunnable_text(needs, largest), "reason": "NOT_ENOUGH_JOB_SLOTS",
                    "workers": needs, "slots": largest, "replica": self.replica})

    def _pump(self) -> None:
        for job_id, run in list(self._running.items()):
            self._drain(run)
            if job_id in self._cancel:
                self._kill(run)
                self._drain(run)
                self._cancel.discard(job_id)
                self._finish(jobs.lookup(self.store, job_id), CANCELLED)
                continue
            if run.others and self._worker_ended(run):
                continue
            if not run.process.is_alive():
                run.process.join(1)
                self._drain(run)
                if (run.done or {}).get("state") == SUCCEEDED:
                    for other in run.others:  # past the final barrier: they are ending too
                        other.join(2.0)
                self._kill(run)  # a multi-worker job ends with its chief
                job = jobs.lookup(self.store, job_id)
                done = run.done or {}
                if done.get("state") == SUCCEEDED:
                    self._finish(job, SUCCEEDED)
                elif done.get("state") == FAILED:
                    self._failed(run, job, done)
                else:
                    self._crashed(job, run.process.exitcode)

    def _worker_ended(self, run: _Running) -> bool:
        """Handles a non-chief worker of a multi-worker job that ended first:
        killed or crashed (no report), the job's other workers are stopped
        and the job retried like any crashed job; failed (it reported why),
        the job fails with its report. True when the job was ended here."""
        for index, other in enumerate(run.others, start=1):
            if other.is_alive():
                continue
            other.join(1)
            self._drain(run)
            done = run.others_done.get(index)
            if done is not None and done.get("state") == SUCCEEDED:
                continue  # it finished; the chief reports the job's end
            self._kill(run)
            self._drain(run)
            job = jobs.lookup(self.store, run.job_id)
            if done is None:
                log.warning("job %s: worker %d ended without reporting; stopping the other workers", run.job_id,
                            index)
                self._crashed(job, other.exitcode)
            else:
                self._failed(run, job, done)
            return True
        return False

    def _failed(self, run: _Running, job: JobRecord, done: dict) -> None:
        """Ends a job whose process reported a failure (its processes already
        stopped). A worker that lost its port to another program in the
        moment between ``free_addresses`` and its bind (``PortTaken``) is no
        fault of the job: its workers start once more on new ports, not
        counted against ``job_max_retries``; a second loss fails the job
        with the worker's message, which says so."""
        error = {"code": done.get("code", "INTERNAL"), "reason": done["reason"],
                 "message": redact_paths(done["message"]), "metadata": done.get("metadata", {})}
        if done["reason"] != multiworker.PORT_TAKEN or run.port_retried:
            self._finish(job, FAILED, error)
            return
        address = error["metadata"].get("address", "its address")
        text = (f"Worker {error['metadata'].get('worker', '?')} could not listen on {address}: another program "
                "took the port first. Starting the job's workers again on new ports (not counted as a retry).")
        log.warning("job %s: %s", job.id, text)
        self._running.pop(job.id, None)
        self._gpu_of.pop(job.id, None)
        try:
            self.store.append_event(job.id, "message", {"text": text, "address": address})
            self._start_process(job, taken_over=False, port_retried=True)
        except Exception:  # noqa: BLE001 - no second start: the job ends with the worker's own report
            log.warning("job %s: its workers could not be started again", job.id, exc_info=True)
            self._finish(job, FAILED, error)

    def _crashed(self, job: JobRecord, exitcode: Optional[int]) -> None:
        """A job whose process ended without reporting: queued again to resume
        from its checkpoint while retries are left, else failed."""
        how = _exit_description(exitcode)
        limit = self.settings.job_max_retries
        if job.retries >= limit:
            self._finish(job, FAILED, {
                "code": "INTERNAL", "reason": "WORKER_CRASHED",
                "message": f"The training process {how} before finishing"
                           + (f", after {job.retries} retries." if job.retries else "."),
                "metadata": {"exitcode": str(exitcode), "retries": str(job.retries)}})
            return
        self._running.pop(job.id, None)
        self._gpu_of.pop(job.id, None)
        self._next_claim = 0.0
        retry = job.retries + 1
        epoch = (loop.read_checkpoint(self.artifacts.job_dir(job.id)) or {}).get("epoch", 0)
        text = (f"The training process {how}; retry {retry} of {limit}, "
                + (f"from the checkpoint of epoch {epoch}." if epoch else "from the start (no checkpoint yet)."))
        log.warning("job %s: %s", job.id, text)

        def requeue() -> None:
            self.store.append_event(job.id, "message", {"text": text, "retry": retry, "exitcode": exitcode})
            self.store.update_job(job.id, state=QUEUED, retries=retry, lease_owner=None,
                                  event=("state", {"state": QUEUED}))

        self._record(job.id, requeue)
        self._count_jobs()
        with self._events:
            self._events.notify_all()

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
            except ResourceExhausted as exc:  # progress not stored; the job's final state is retried
                self._report_fault(exc.message)
            except Exception:  # noqa: BLE001
                log.exception("bad report from job %s: %r", run.job_id, report)
        if got:
            with self._events:
                self._events.notify_all()

    def _on_report(self, run: _Running, report: dict) -> None:
        kind = report.pop("kind")
        job_id = run.job_id
        index = report.pop("worker", 0)  # a multi-worker job's workers; only the chief reports progress
        if kind == "done" and index:
            run.others_done[index] = report
        elif kind == "done":
            run.done = report
        elif kind == "message":
            self.store.append_event(job_id, "message", report)
        elif kind == "progress":
            job = jobs.lookup(self.store, job_id)
            progress = {**job.progress, "step": report["step"], "steps_per_epoch": report["steps_per_epoch"],
                        "examples_per_second": report["examples_per_second"], "eta_seconds": report["eta_seconds"],
                        "metrics": {**job.progress.get("metrics", {}), "loss": report["loss"]},
                        "loss_state": report.get("loss_state") or {}}
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
        for process in run.processes:
            if process.is_alive():
                process.terminate()
        for process in run.processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)

    def _finish(self, job: JobRecord, state: str, error: Optional[dict] = None, *, recorded: bool = False) -> None:
        """Ends a job in ``state``: frees its slot, stores the state (unless
        ``recorded`` already) and counts it in metrics."""
        # The slot is freed first: a store write a full disk refuses must not
        # keep a finished process's slot (it is retried by _record).
        end = time.time()
        run = self._running.pop(job.id, None)
        self._gpu_of.pop(job.id, None)
        self._next_claim = 0.0  # a free slot: look at the queue at once
        if not recorded:
            self._record(job.id, lambda: self.store.update_job(
                job.id, state=state, end_time=end, error=error, lease_owner=None,
                event=("state", {"state": state, **({"error": error} if error else {})})))
        log.info("job %s %s%s", job.id, state, f": {error['reason']}: {error['message']}" if error else "")
        tracing.current.job(job.runtime.get("traceparent")).root(
            "lossd.job", job.create_time, end, error=f"{error['reason']}: {error['message']}" if error else None,
            **{"lossd.job.id": job.id, "lossd.job.state": state})
        if self.metrics is not None:
            self.metrics.observe_job_finished(state, end - (job.start_time or job.create_time))
            if run is not None:
                self.metrics.set_training_throughput(self._throughput())
        self._count_jobs()
        with self._events:
            self._events.notify_all()

    def _count_jobs(self) -> None:
        if self.metrics is not None:
            self._set_counts(self.store.counts_by_state())

    def _set_counts(self, by_state: dict[str, int]) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = collections.Counter()
        for state, n in by_state.items():
            # lossd_training_jobs has no "cancelling": such a job still runs.
            counts[RUNNING if state == CANCELLING else state] += n
        self.metrics.set_training_jobs(dict(counts))


def unrunnable_text(workers: int, largest: int) -> str:
    """Why a job of ``workers`` workers cannot run on replicas whose most job
    slots are ``largest``."""
    if largest == 0:
        return (f"No live replica has job slots (max_concurrent_jobs), so no replica can run this job of "
                f"{workers} worker(s) now. It waits in the queue until a replica with at least {workers} joins.")
    return (f"No live replica can run this job: it needs {workers} job slots (workers={workers}) and the live "
            f"replica with the most has {largest} (max_concurrent_jobs). It waits in the queue until a replica with "
            f"at least {workers} joins; cancel it, or create it with workers={largest} or fewer.")


def _exit_description(exitcode: Optional[int]) -> str:
    """How a process ended, for people: ``was killed by SIGKILL ...`` or ``exited with code 1``."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (sent by kill -9 or the kernel's out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"
