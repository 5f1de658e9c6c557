"""The training service's one object: it builds the parts, starts and stops
them, and answers the job-record calls. Each responsibility lives in its own
module:

- ``jobs``: checking a JobSpec and storing the job; finding a job.
- ``scheduler``: running, supervising, cancelling, resuming and watching jobs.
- ``catalog``: the datasets jobs train on, and uploads.
- ``artifacts``: job folders and the files clients download from them.
- ``inference``: Predict and Generate with trained models.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

from lossd_server.callers import Caller
from lossd_server.config import StartupError
from lossd_server.errors import FailedPrecondition, InvalidArgument
from lossd_server.losses.plan import Planner
from lossd_server.training import jobs
from lossd_server.training.artifacts import Artifacts, artifacts_root
from lossd_server.training.catalog import DatasetCatalog
from lossd_server.training.datasets import DatasetInfo
from lossd_server.training.inference import Inference
from lossd_server.training.scheduler import Scheduler
from lossd_server.state.postgres import PostgresStore
from lossd_server.state.quarantine import QUARANTINE_DIR, Quarantine
from lossd_server.state.sqlite import SqliteStore
from lossd_server.state.store import JobRecord, Store

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
STORE_FILE = "lossd.sqlite3"


def open_store(settings) -> Store:
    """The server's store: PostgreSQL at ``settings.database_url`` when set,
    else SQLite under ``settings.data_dir``; paths under the artifacts folder
    (``artifacts_root``) and the dataset root are stored relative to them. Unreadable state found at open
    is in ``store.quarantine`` (a job row is checked by ``jobs.check_record``).

    Raises:
        StartupError: the database cannot be reached.
    """
    data_dir, root = pathlib.Path(settings.data_dir), artifacts_root(settings)
    if not settings.database_url:
        return SqliteStore(data_dir / STORE_FILE, check_job=jobs.check_record, check_dataset=DatasetInfo.from_dict,
                           artifacts_root=root, dataset_root=settings.dataset_root)
    try:
        return PostgresStore(settings.database_url, quarantine=Quarantine(data_dir / QUARANTINE_DIR),
                             check_job=jobs.check_record, check_dataset=DatasetInfo.from_dict,
                             pool_size=settings.database_pool_size,
                             artifacts_root=root, dataset_root=settings.dataset_root)
    except ConnectionError as exc:
        raise StartupError(f"{exc} (set LOSSD_DATABASE_URL or --database-url)") from None


class TrainingManager:
    """Training jobs, datasets and trained models under one data directory.

    Nothing runs until ``start()``; ``stop()`` stops the job processes (a
    running job resumes at the next start) and closes the store.

    Args:
        settings: ``lossd_server.config.Settings`` (``data_dir`` and the
            training settings the parts read).
        planner: The ``Planner`` job losses are planned with: the one
            evaluation uses (``Evaluator.planner``), so a bad loss gets the
            same error from CreateJob as from Evaluate.
        metrics: Optional ``lossd_server.observability.metrics.Metrics``.
        gpus: How many GPUs the machine has (``evaluation.backend.gpu_count()``).
        store: The server's ``Store`` (shared with registered losses); by
            default ``open_store(settings)``.
        evaluator: The ``Evaluator`` whose compiled programs guidance losses
            run on (Generate); None refuses guidance.

    Attributes:
        scheduler: Cancel and watch jobs (``Scheduler``).
        catalog: Datasets (``DatasetCatalog``).
        artifacts: Job folders and downloads (``Artifacts``).
        inference: Predict and Generate (``Inference``).
    """

    def __init__(self, settings, planner: Planner, metrics=None, *, gpus: int, store: Store | None = None,
                 evaluator=None):
        root = artifacts_root(settings)
        root.mkdir(parents=True, exist_ok=True)
        self.planner = planner
        self.metrics = metrics
        self.store = store if store is not None else open_store(settings)
        self.artifacts = Artifacts(root / "jobs")
        self.catalog = DatasetCatalog(settings, self.store, root / "datasets")
        self.scheduler = Scheduler(settings, self.store, self.artifacts, gpus=gpus, metrics=metrics)
        self.inference = Inference(self.artifacts, evaluator=evaluator,
                                   max_pixel_steps=getattr(settings, "max_generate_pixel_steps", 1 << 25),
                                   metrics=metrics)

    def start(self) -> None:
        """Resumes what a previous server left unfinished and starts scheduling."""
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.store.close()

    def create_job(self, spec: Mapping[str, Any], *, caller: Caller, display_name: str = "",
                   request_id: str = "") -> JobRecord:
        """Checks a spec and queues the job as ``caller``'s (see ``jobs.create``).
        Its dataset cannot be deleted or replaced until the job is recorded.

        Raises:
            FailedPrecondition: NO_JOB_SLOTS, on a server that runs no jobs
                (``max_concurrent_jobs`` 0) with a store no other replica
                shares: nothing would ever run the job. NOT_ENOUGH_JOB_SLOTS,
                ``workers`` beyond this server's slots (on a store no other
                replica shares).
        """
        if self.scheduler.slots == 0 and not self.store.shared:
            raise FailedPrecondition(
                "This server runs no training jobs (max_concurrent_jobs is 0) and shares its job queue with no "
                "other replica. Expected a server with job slots, or one on a shared database "
                "(LOSSD_DATABASE_URL). Received: a job.", reason="NO_JOB_SLOTS")
        workers = spec.get("workers") or 1
        slots = self.scheduler.slots
        if (isinstance(workers, int) and slots < workers <= self.catalog.settings.max_job_workers and slots
                and not self.store.shared):  # a bad count gets BAD_JOB_SPEC from jobs.create
            raise FailedPrecondition(
                f"Too many workers for this server. Expected at most {slots} (a job with workers N takes N of the "
                f"server's max_concurrent_jobs slots, {slots} here). Received: workers={workers}.",
                reason="NOT_ENOUGH_JOB_SLOTS", metadata={"workers": str(workers), "slots": str(slots)})
        if (isinstance(workers, int) and 0 < workers <= self.catalog.settings.max_job_workers and self.store.shared):
            self._check_live_slots(workers)
        with self.catalog.using(str(spec.get("dataset", ""))):
            job, created = jobs.create(self.store, self.planner, self.catalog, spec, caller=caller,
                                       display_name=display_name, request_id=request_id)
        if created:
            self.scheduler.submitted()
        return job

    def _check_live_slots(self, workers: int) -> None:
        """On a shared store: refuses a job of ``workers`` workers that no live
        replica has the slots for, while some live replica has slots (with
        none, as when only evaluator replicas run, the job waits for one).

        Raises:
            FailedPrecondition: NOT_ENOUGH_JOB_SLOTS, naming the most slots of a live replica.
        """
        largest = max(self.store.live_replicas().values(), default=0)
        if 0 < largest < workers:
            raise FailedPrecondition(
                f"Too many workers for the live replicas. Expected at most {largest} (a job with workers N takes N "
                f"job slots of one replica, and the live replica with the most has {largest}: its "
                f"max_concurrent_jobs). Received: workers={workers}.", reason="NOT_ENOUGH_JOB_SLOTS",
                metadata={"workers": str(workers), "slots": str(largest)})

    def get_job(self, job_id: str, caller: Caller) -> JobRecord:
        """The job, if ``caller`` owns it; raises NotFound (JOB_NOT_FOUND)
        for a job that does not exist and for another caller's alike."""
        return jobs.lookup(self.store, job_id, caller)

    def list_jobs(self, caller: Caller, states=(), page_size: int = 0, page_token: str = ""
                  ) -> tuple[list[JobRecord], str]:
        """A page of the jobs ``caller`` owns (an admin: all), newest first,
        and the next page's token."""
        if page_size < 0:
            raise InvalidArgument(f"Invalid page_size. Expected 0 to {MAX_PAGE_SIZE}. Received: {page_size}.",
                                  reason="BAD_PAGE_SIZE")
        return self.store.list_jobs(states, min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), page_token,
                                    owner=None if caller.admin else caller.name)
