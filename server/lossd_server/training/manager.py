"""The training manager: validates and queues jobs, runs each in its own
spawned process under a concurrency limit, records what the processes
report, cancels, resumes after a restart, and serves trained models.

One scheduler thread owns the job processes: it starts queued jobs when a
slot is free, drains their report queues into the store, notices processes
that exit, and stops the ones being cancelled. Every other thread (the RPCs)
only reads the store or asks the scheduler to act, so process handling
needs no locking beyond the manager's one lock for state transitions.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import multiprocessing
import os
import pathlib
import queue as queue_module
import re
import tarfile
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lossd_server.errors import FailedPrecondition, InvalidArgument, NotFound
from lossd_server.training import datasets, models, worker
from lossd_server.training.losses import from_logits, plan_training_loss
from lossd_server.training.store import (CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING,
                                         SUCCEEDED, Event, JobRecord, Store)

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32
DEFAULT_VALIDATION_SPLIT = 0.2
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_GENERATE = 1024
MAX_PREDICT = 65_536
CHUNK_BYTES = 1 << 20
ARTIFACTS = ("model", "history", "tensorboard")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
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


def _metrics_state(state: str) -> str:
    # lossd_training_jobs has no "cancelling": such a job still runs.
    return RUNNING if state == CANCELLING else state


class TrainingManager:
    """Queues, runs, watches and cancels training jobs; serves their models.

    Args:
        settings: ``lossd_server.config.Settings`` (``data_dir``,
            ``max_concurrent_jobs``, ``max_upload_bytes``, ``dataset_root``,
            ``mixed_precision``, ``progress_every_batches``).
        planner: The ``Planner`` job losses are planned with: the one
            evaluation uses (``Evaluator.planner``), so a bad loss gets the
            same error from CreateJob as from Evaluate.
        metrics: Optional ``lossd_server.observability.metrics.Metrics`` to update.
        gpus: Number of GPUs; None asks TensorFlow.
    """

    def __init__(self, settings, planner, metrics=None, *, gpus: Optional[int] = None):
        self.settings = settings
        self.planner = planner
        self.metrics = metrics
        self.data_dir = pathlib.Path(settings.data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.datasets_dir = self.data_dir / "datasets"
        self.store = Store(self.data_dir / "lossd.sqlite3")
        if gpus is None:
            import tensorflow as tf

            gpus = len(tf.config.list_physical_devices("GPU"))
        self.gpus = gpus
        self.slots = settings.max_concurrent_jobs or max(gpus, 1)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._events = threading.Condition()
        self._running: dict[str, _Running] = {}
        self._gpu_of: dict[str, Optional[int]] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._models_lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Recovers jobs a previous server left unfinished, then starts scheduling."""
        for job in self.store.jobs_in_states([CANCELLING]):
            self.store.update_job(job.id, state=CANCELLED, end_time=time.time(),
                                  event=("state", {"state": CANCELLED}))
        for job in self.store.jobs_in_states([RUNNING]):
            epoch = (worker.read_checkpoint(self.jobs_dir / job.id) or {}).get("epoch", 0)
            self.store.append_event(job.id, "message", {
                "text": f"The server restarted; the job will resume from the checkpoint of epoch {epoch}."
                if epoch else "The server restarted; the job will start again (no checkpoint yet)."})
            self.store.update_job(job.id, state=QUEUED, event=("state", {"state": QUEUED}))
        self._update_job_counts()
        self._thread = threading.Thread(target=self._loop, name="training-scheduler", daemon=True)
        self._thread.start()
        log.info("training: %d slot(s), %d GPU(s), data under %s", self.slots, self.gpus, self.data_dir)

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
        self.store.close()

    # -- jobs ------------------------------------------------------------------

    def create_job(self, spec: Mapping[str, Any], *, display_name: str = "", request_id: str = "") -> JobRecord:
        """Checks a spec and queues the job; a known ``request_id`` returns its job.

        Args:
            spec: The JobSpec as a dict: ``model {preset, params}``, ``dataset``,
                ``loss {name, params}``, ``optimizer {name, learning_rate,
                params}``, ``epochs``, ``batch_size``, ``validation_split``,
                ``metrics``, ``seed``, ``steps_per_epoch``.

        Raises:
            InvalidArgument: anything that would make the job fail: unknown
                model, dataset, loss, optimizer or metric, bad parameters, or
                a loss that does not suit the model and labels.
        """
        if request_id:
            if not _REQUEST_ID.match(request_id):
                raise InvalidArgument(f"Invalid request_id. Expected 1 to 128 printable ASCII characters. "
                                      f"Received: {request_id[:140]!r}.", reason="BAD_REQUEST_ID")
            existing = self.store.get_job_by_request_id(request_id)
            if existing is not None:
                return existing
        normalized, runtime, kind = self._normalize(spec)
        job = JobRecord(id=uuid.uuid4().hex[:16], spec=normalized, runtime=runtime, model_kind=kind,
                        request_id=request_id or None, display_name=display_name[:200],
                        progress={"epochs_completed": 0, "epochs": normalized["epochs"]})
        job, created = self.store.create_job(job)
        if created:
            log.info("job %s created: %s on %s", job.id, normalized["model"]["preset"], normalized["dataset"])
            self._update_job_counts()
            self._notify()
        return job

    def _normalize(self, spec: Mapping[str, Any]) -> tuple[dict, dict, str]:
        model = dict(spec.get("model") or {})
        preset = models.get_preset(model.get("preset", ""))
        info = self.dataset_info(spec.get("dataset", ""))
        params = models.resolve_model_params(preset.name, model.get("params"), info.image_shape)
        loss = plan_training_loss(self.planner, spec.get("loss"), preset.kind)
        optimizer = models.resolve_optimizer(spec.get("optimizer"))
        metrics = models.resolve_metrics(spec.get("metrics") or [], preset.kind)

        def whole(field: str, default: int, lo: int, hi: int) -> int:
            value = spec.get(field) or default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                    or not lo <= value <= hi:
                raise InvalidArgument(f"Invalid {field}. Expected an integer in [{lo}, {hi}]. "
                                      f"Received: {value!r}.", reason="BAD_JOB_SPEC", metadata={"field": field})
            return int(value)

        epochs = whole("epochs", DEFAULT_EPOCHS, 1, MAX_EPOCHS)
        batch_size = whole("batch_size", DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE)
        steps = whole("steps_per_epoch", 0, 0, 1 << 30) if spec.get("steps_per_epoch") else 0
        seed = whole("seed", 1, 0, 2**32 - 1)
        split = spec.get("validation_split")
        split = DEFAULT_VALIDATION_SPLIT if split is None else split
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 <= split < 1.0:
            raise InvalidArgument(f"Invalid validation_split. Expected a number in [0, 1). Received: {split!r}.",
                                  reason="BAD_JOB_SPEC", metadata={"field": "validation_split"})
        n_val = int(round(info.examples * split))
        if info.examples - n_val < 1:
            raise InvalidArgument(f"validation_split={split:g} leaves no training images out of {info.examples}.",
                                  reason="BAD_JOB_SPEC", metadata={"field": "validation_split"})
        normalized = {
            "model": {"preset": preset.name, "params": params},
            "dataset": spec.get("dataset"),
            "loss": loss.to_spec() if loss is not None else {},
            "optimizer": optimizer,
            "epochs": epochs, "batch_size": batch_size, "validation_split": float(split),
            "metrics": metrics, "seed": seed, "steps_per_epoch": steps,
        }
        runtime = {"dataset_source": info.source, "dataset_path": info.path, "image_shape": list(info.image_shape),
                   "class_names": info.class_names,
                   "logits": from_logits(loss)}
        return normalized, runtime, preset.kind

    def get_job(self, job_id: str) -> JobRecord:
        """The job; raises NotFound (JOB_NOT_FOUND)."""
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"Job `jobs/{job_id}` does not exist.", reason="JOB_NOT_FOUND",
                           metadata={"job": f"jobs/{job_id}"[:100]})
        return job

    def list_jobs(self, states=(), page_size: int = 0, page_token: str = "") -> tuple[list[JobRecord], str]:
        """A page of jobs, newest first, and the next page's token."""
        if page_size < 0:
            raise InvalidArgument(f"Invalid page_size. Expected 0 to 1000. Received: {page_size}.",
                                  reason="BAD_PAGE_SIZE")
        return self.store.list_jobs(states, min(page_size or 50, 1000), page_token)

    def cancel_job(self, job_id: str) -> JobRecord:
        """Cancels a job (best effort); returns it, normally CANCELLED.

        Raises:
            FailedPrecondition: the job already finished (JOB_ALREADY_FINISHED).
        """
        with self._lock:
            job = self.get_job(job_id)
            if job.final:
                raise FailedPrecondition(
                    f"Job `jobs/{job_id}` already finished ({job.state}); only queued or running jobs can be "
                    "cancelled.", reason="JOB_ALREADY_FINISHED", metadata={"state": job.state})
            if job.state == QUEUED:
                self._finish(job, CANCELLED)
                return self.get_job(job_id)
            if job.state == RUNNING:
                self.store.update_job(job_id, state=CANCELLING, event=("state", {"state": CANCELLING}))
            self._cancel.add(job_id)
        self._notify()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            job = self.get_job(job_id)
            if job.final:
                return job
            with self._events:
                self._events.wait(0.05)
        return self.get_job(job_id)

    def watch(self, job_id: str, after: int = 0, is_active: Callable[[], bool] = lambda: True
              ) -> Iterator[Event]:
        """The job's events after ``after``, then live ones; ends when the job has
        ended (or ``is_active()`` turns false, or the manager stops)."""
        self.get_job(job_id)
        while True:
            events = self.store.events(job_id, after)
            for event in events:
                after = event.seq
                yield event
            if events:
                continue
            job = self.get_job(job_id)
            if job.final and not self.store.events(job_id, after):
                return
            if not is_active() or self._stopping:
                return
            with self._events:
                self._events.wait(0.5)

    def job_dir(self, job_id: str) -> pathlib.Path:
        return self.jobs_dir / job_id

    # -- the scheduler ---------------------------------------------------------

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
                job_dir = self.job_dir(job.id)
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
        self._update_job_counts()
        with self._events:
            self._events.notify_all()

    def _pump(self) -> None:
        for job_id, run in list(self._running.items()):
            self._drain(run)
            if job_id in self._cancel:
                self._kill(run)
                self._drain(run)
                self._cancel.discard(job_id)
                self._finish(self.get_job(job_id), CANCELLED)
                continue
            if not run.process.is_alive():
                run.process.join(1)
                self._drain(run)
                job = self.get_job(job_id)
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
            job = self.get_job(job_id)
            progress = {**job.progress, "step": report["step"], "steps_per_epoch": report["steps_per_epoch"],
                        "examples_per_second": report["examples_per_second"], "eta_seconds": report["eta_seconds"],
                        "metrics": {**job.progress.get("metrics", {}), "loss": report["loss"]}}
            self.store.update_job(job_id, progress=progress, event=("progress", report))
            run.rate = report["examples_per_second"]
            if self.metrics is not None:
                self.metrics.lossd_training_examples_total.inc(max(report["examples"] - run.counted_examples, 0))
                run.counted_examples = report["examples"]
                self.metrics.lossd_training_examples_per_second.set(sum(r.rate for r in self._running.values()))
        elif kind == "epoch":
            job = self.get_job(job_id)
            progress = {**job.progress, "epochs_completed": report["epoch"], "epochs": report["epochs"],
                        "step": 0, "metrics": report["metrics"],
                        "examples_per_second": report["examples_per_second"]}
            self.store.update_job(job_id, progress=progress, event=("epoch", report))
            if self.metrics is not None:
                self.metrics.lossd_training_epochs_total.inc()
                self.metrics.lossd_training_examples_total.inc(max(report["examples"] - run.counted_examples, 0))
                run.counted_examples = 0
                for split, key in (("train", "loss"), ("validation", "val_loss")):
                    if key in report["metrics"]:
                        self.metrics.lossd_training_loss.labels(split).set(report["metrics"][key])

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
                self.metrics.lossd_training_examples_per_second.set(sum(r.rate for r in self._running.values()))
        self._update_job_counts()
        with self._events:
            self._events.notify_all()

    def _update_job_counts(self) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = collections.Counter()
        for state, n in self.store.counts_by_state().items():
            counts[_metrics_state(state)] += n
        self.metrics.set_training_jobs(dict(counts))

    # -- datasets --------------------------------------------------------------

    def dataset_info(self, ref: str) -> datasets.DatasetInfo:
        """What a job needs to know about a dataset reference; checks it exists."""
        if ref in datasets.BUILTIN:
            return datasets.builtin_info(ref)
        if isinstance(ref, str) and ref.startswith(datasets.FOLDER_PREFIX):
            rel = ref[len(datasets.FOLDER_PREFIX):]
            path = datasets.resolve_folder(self.settings.dataset_root, rel)
            x, _, class_names = datasets.parse_folder(path, self.settings.max_upload_bytes)
            return datasets.info_from_arrays(ref, "folder", x, class_names, str(path))
        stored = self.store.get_dataset(ref) if ref else None
        if stored is None:
            raise datasets.DatasetError(
                f"Unknown dataset {str(ref)[:80]!r}. Expected a built-in dataset ({', '.join(datasets.BUILTIN)}), "
                "the name of an uploaded dataset (see ListDatasets) or folder:PATH.",
                reason="UNKNOWN_DATASET", metadata={"dataset": str(ref)[:80]})
        return datasets.DatasetInfo.from_dict(stored)

    def list_datasets(self) -> list[datasets.DatasetInfo]:
        infos = [datasets.builtin_info(name) for name in datasets.BUILTIN]
        infos += [datasets.DatasetInfo.from_dict(d) for d in self.store.list_datasets()]
        return sorted(infos, key=lambda i: i.name)

    def upload_dataset(self, name: str, fmt: str, size_bytes: int, chunks: Iterator[bytes]) -> datasets.DatasetInfo:
        """Receives an upload into a temporary file, checks and normalises it,
        then stores it under ``<data_dir>/datasets/``.

        Raises:
            InvalidArgument: bad name or format, a size over the limit or
                unlike the header's (UPLOAD_TOO_LARGE, SIZE_MISMATCH), or
                content that fails the checks (BAD_DATASET, CORRUPT_IMAGE...).
        """
        datasets.check_name(name)
        if fmt not in datasets.FORMATS:
            raise InvalidArgument(f"Invalid dataset format. Expected one of {list(datasets.FORMATS)}. "
                                  f"Received: {fmt!r}.", reason="BAD_DATASET_FORMAT")
        limit = self.settings.max_upload_bytes
        if size_bytes <= 0 or size_bytes > limit:
            raise InvalidArgument(f"Invalid upload size. Expected 1 to {limit:,} bytes (the server's "
                                  f"max_upload_bytes). Received: size_bytes={size_bytes:,}.",
                                  reason="UPLOAD_TOO_LARGE" if size_bytes > limit else "SIZE_MISMATCH")
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.datasets_dir, prefix=".upload-", suffix=f".{fmt}") as tmp:
            received = 0
            for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise InvalidArgument(f"The upload is larger than its header said. Expected {size_bytes:,} "
                                          f"bytes. Received: more than that.", reason="SIZE_MISMATCH")
                tmp.write(chunk)
            if received != size_bytes:
                raise InvalidArgument(f"The upload ended early. Expected {size_bytes:,} bytes. "
                                      f"Received: {received:,}.", reason="SIZE_MISMATCH")
            tmp.flush()
            if fmt == "npz":
                x, y, class_names = datasets.parse_npz(tmp.name, limit)
            else:
                x, y, class_names = datasets.parse_archive(tmp.name, fmt, limit)
        path = self.datasets_dir / f"{name}.npz"
        size = datasets.save_arrays(path, x, y, class_names)
        info = datasets.info_from_arrays(name, "upload", x, class_names, str(path), size)
        self.store.put_dataset(name, info.to_dict())
        log.info("dataset %s uploaded: %d images of %s, %d classes", name, info.examples, info.image_shape,
                 len(class_names))
        return info

    # -- artifacts and use -------------------------------------------------------

    def artifact(self, job_id: str, artifact: str) -> tuple[str, int, Iterator[bytes]]:
        """``(filename, size, chunks)`` of a job's artifact.

        Raises:
            FailedPrecondition: the artifact does not exist yet (ARTIFACT_NOT_READY).
        """
        job = self.get_job(job_id)
        job_dir = self.job_dir(job_id)
        if artifact == "model":
            return self._file(job, job_dir / worker.MODEL_FILE, f"{job_id}.keras")
        if artifact == "history":
            path = job_dir / worker.HISTORY_FILE
            if not path.exists():
                checkpoint = worker.read_checkpoint(job_dir)
                if checkpoint is not None:  # a running job's history so far
                    import json

                    data = json.dumps(checkpoint["history"]).encode()
                    return f"{job_id}-history.json", len(data), iter([data])
            return self._file(job, path, f"{job_id}-history.json")
        if artifact == "tensorboard":
            logs = job_dir / worker.LOGS_DIR
            if not logs.is_dir():
                raise self._not_ready(job, artifact)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(logs, arcname=f"{job_id}-logs")
            data = buffer.getvalue()
            return f"{job_id}-logs.tar.gz", len(data), (data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES))
        raise InvalidArgument(f"Unknown artifact. Expected one of {list(ARTIFACTS)}. Received: {artifact!r}.",
                              reason="BAD_ARTIFACT")

    @staticmethod
    def _not_ready(job: JobRecord, artifact: str) -> FailedPrecondition:
        return FailedPrecondition(f"Job `jobs/{job.id}` has no {artifact} artifact yet (state {job.state}). "
                                  "Expected a job that succeeded.", reason="ARTIFACT_NOT_READY",
                                  metadata={"state": job.state})

    def _file(self, job: JobRecord, path: pathlib.Path, filename: str) -> tuple[str, int, Iterator[bytes]]:
        if not path.exists():
            raise self._not_ready(job, path.name)
        size = path.stat().st_size

        def chunks():
            with open(path, "rb") as f:
                while True:
                    data = f.read(CHUNK_BYTES)
                    if not data:
                        return
                    yield data

        return filename, size, chunks()

    def _trained(self, job_id: str, kind: str):
        job = self.get_job(job_id)
        if job.state != SUCCEEDED:
            raise FailedPrecondition(f"Job `jobs/{job_id}` has no trained model (state {job.state}). Expected a "
                                     "job that succeeded.", reason="JOB_NOT_SUCCEEDED", metadata={"state": job.state})
        if job.model_kind != kind:
            raise FailedPrecondition(
                f"Job `jobs/{job_id}` trained a {job.model_kind} ({job.spec['model']['preset']}). Expected a "
                f"{kind}: use {'Generate' if kind == models.CLASSIFIER else 'Predict'} instead.",
                reason="WRONG_MODEL_KIND", metadata={"model_kind": job.model_kind})
        with self._models_lock:
            model = self._models.get(job_id)
            if model is None:
                model = models.load_model(self.job_dir(job_id) / worker.MODEL_FILE)
                self._models[job_id] = model
                while len(self._models) > 4:
                    self._models.popitem(last=False)
            self._models.move_to_end(job_id)
        return job, model

    def predict(self, job_id: str, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Class probabilities (float32, N x classes) for images of the trained shape."""
        job, model = self._trained(job_id, models.CLASSIFIER)
        shape = tuple(job.runtime["image_shape"])
        x = images[..., None] if images.ndim == 3 and shape[-1] == 1 else images
        if x.ndim != 4 or tuple(x.shape[1:]) != shape or not 1 <= x.shape[0] <= MAX_PREDICT:
            raise InvalidArgument(
                f"Predict expects images of shape [N, {', '.join(map(str, shape))}] (the channel axis may be "
                f"left out for grayscale) with 1 <= N <= {MAX_PREDICT}, as the model was trained. "
                f"Received: shape {list(images.shape)}.", reason="SHAPE_MISMATCH")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
            if not np.all(np.isfinite(x)):
                raise InvalidArgument("Predict: images hold NaN or Inf. Expected pixels in [0, 1].",
                                      reason="BAD_TENSOR")
        else:
            raise InvalidArgument(f"Predict expects uint8 or float images. Received: {x.dtype}.",
                                  reason="UNSUPPORTED_DTYPE")
        out = np.concatenate([np.asarray(model(x[i:i + 1024], training=False)) for i in range(0, len(x), 1024)])
        if job.runtime.get("logits"):
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out = out / out.sum(axis=1, keepdims=True)
        return out.astype(np.float32), list(job.runtime["class_names"])

    def generate(self, job_id: str, count: int, seed: int = 0) -> np.ndarray:
        """``count`` new images (float32, N x H x W x C in [0, 1]) from a trained generator."""
        if not 1 <= count <= MAX_GENERATE:
            raise InvalidArgument(f"Invalid count. Expected 1 to {MAX_GENERATE}. Received: {count}.",
                                  reason="BAD_COUNT")
        _, model = self._trained(job_id, models.GENERATOR)
        images = np.asarray(model.generate(count, seed=seed or None))
        return np.clip(images, 0.0, 1.0).astype(np.float32)
