"""Job records: what CreateJob checks and stores, and how a job is found.

``create`` turns a JobSpec dict into a queued job: every field checked (model
preset and parameters, dataset, loss, optimizer, metrics, numbers), defaults
filled in, and the facts the job's process needs (dataset path, image shape,
class names, whether the model outputs logits) recorded beside the spec. A
known ``request_id`` returns its job instead, so a retried create is safe.

A job belongs to the caller that created it (``JobRecord.owner``). A caller
finds only the jobs it owns (``Caller.owns``: admins find all); another
caller's job is JOB_NOT_FOUND, worded as for a job that does not exist, so
its existence does not leak.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Callable, Mapping

from lossd.wire import DEFAULT_REDUCTION
from lossd_server.callers import ANONYMOUS, Caller
from lossd_server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lossd_server.losses import reductions
from lossd_server.observability import tracing
from lossd_server.losses.plan import Planner
from lossd_server.losses.registry import ROWS
from lossd_server.training import cost, models
from lossd_server.training.catalog import DatasetCatalog
from lossd_server.training.kinds import CLASSIFIER, GENERATOR
from lossd_server.training.losses import SPARSE, from_logits, label_format, plan_training_loss
from lossd_server.state.store import CANCELLING, QUEUED, RUNNING, JobRecord, Store

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_SPLIT = 0.2
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def lookup(store: Store, job_id: str, caller: Caller = ANONYMOUS) -> JobRecord:
    """The job, if ``caller`` owns it (the default, ``ANONYMOUS``, is an
    admin: the server's own look-ups); raises NotFound (JOB_NOT_FOUND)."""
    job = store.get_job(job_id)
    if job is None or not caller.owns(job.owner):
        raise NotFound(f"Job `jobs/{job_id}` does not exist. Expected the name of one of your jobs (ListJobs). "
                       f"Received: {f'jobs/{job_id}'[:100]!r}.", reason="JOB_NOT_FOUND",
                       metadata={"job": f"jobs/{job_id}"[:100]})
    return job


def workers_of(job: JobRecord) -> int:
    """How many worker processes (and job slots) ``job`` takes: its spec's
    ``workers``, absent (1) in the specs of single-process jobs."""
    return int(job.spec.get("workers", 1))


# What a stored spec and runtime hold (``_normalize`` writes them): a row
# without them could not be shown by GetJob nor run by a worker.
_SPEC_FIELDS = {"model": dict, "dataset": str, "loss": dict, "optimizer": dict, "epochs": int, "batch_size": int,
                "validation_split": (int, float), "metrics": list, "seed": int, "steps_per_epoch": int}
_RUNTIME_FIELDS = {"dataset_source": str, "dataset_path": str, "image_shape": list, "class_names": list}


def check_record(job: JobRecord) -> None:
    """Raises ValueError when a stored job lacks what the server needs to show
    or run it (the store moves such rows to the quarantine at open)."""
    for where, fields in (("spec", _SPEC_FIELDS), ("runtime", _RUNTIME_FIELDS)):
        values = getattr(job, where)
        for field, kind in fields.items():
            if not isinstance(values.get(field), kind) or isinstance(values.get(field), bool):
                raise ValueError(f"{where}.{field} is {type(values.get(field)).__name__}, not "
                                 f"{getattr(kind, '__name__', 'a number')}")
    if not isinstance(job.spec["model"].get("preset"), str) or not isinstance(job.spec["model"].get("params"), dict):
        raise ValueError("spec.model lacks preset or params")
    if job.model_kind not in (CLASSIFIER, GENERATOR):
        raise ValueError(f"unknown model kind {job.model_kind!r}")


def create(store: Store, planner: Planner, catalog: DatasetCatalog, spec: Mapping[str, Any], *,
           caller: Caller, display_name: str = "", request_id: str = "") -> tuple[JobRecord, bool]:
    """Checks a spec and stores the job, queued, as ``caller``'s; a known
    ``request_id`` returns its job.

    Args:
        caller: Who creates it: the job's owner. It may train on built-in
            and folder datasets and on the uploads it owns.
        spec: The JobSpec as a dict: ``model {preset, params}``, ``dataset``,
            ``loss`` (a LossSpec dict), ``optimizer {name, learning_rate,
            params}``, ``epochs``, ``batch_size``, ``validation_split``,
            ``metrics``, ``seed``, ``steps_per_epoch``.

    Returns:
        ``(job, created)``: ``created`` is False when ``request_id`` named an
        existing job.

    Raises:
        InvalidArgument: anything that would make the job fail: unknown
            model, dataset, loss, optimizer or metric, bad parameters, or a
            loss that does not suit the model and labels.
        AlreadyExists: REQUEST_ID_IN_USE, ``request_id`` names another
            caller's job.
        ResourceExhausted: DISK_NEARLY_FULL (``min_free_disk_bytes``),
            TOO_MANY_JOBS (``max_queued_jobs``), or
            CALLER_JOB_LIMIT: ``caller`` has as many jobs queued or running as
            its token's ``max_jobs``.
    """
    if request_id:
        if not _REQUEST_ID.fullmatch(request_id):
            raise InvalidArgument(f"Invalid request_id. Expected 1 to 128 printable ASCII characters. "
                                  f"Received: {request_id[:140]!r}.", reason="BAD_REQUEST_ID")
        existing = _retried(store, request_id, caller)
        if existing is not None:
            return existing, False
    settings = catalog.settings
    normalized, runtime, kind = _normalize(spec, planner, catalog, caller, settings)
    traceparent = tracing.current.new_job_trace()  # None with tracing off
    if traceparent is not None:  # the job's own trace, kept with it for every process that runs it
        runtime["traceparent"] = traceparent
    job = JobRecord(id=uuid.uuid4().hex[:16], spec=normalized, runtime=runtime, model_kind=kind,
                    request_id=request_id or None, display_name=display_name[:200],
                    progress={"epochs_completed": 0, "epochs": normalized["epochs"]}, owner=caller.name)
    catalog.require_free_space("the new job")
    limit = getattr(settings, "max_queued_jobs", None)

    def admit(count) -> None:
        # In the insert's transaction, after the store's create lock: the
        # counts are of every replica's committed jobs, and no create on any
        # replica inserts between this count and this insert.
        if limit is not None:
            queued = count([QUEUED])
            if queued >= limit:
                raise ResourceExhausted(
                    f"Too many queued jobs. Expected at most {limit} (max_queued_jobs) waiting to run. "
                    f"Received: a job while {queued} are queued; wait for some to finish or cancel some.",
                    reason="TOO_MANY_JOBS", metadata={"queued": str(queued), "limit": str(limit)})
        _check_caller_jobs(count, caller)

    # A retry of a create that won meanwhile gets its job, whatever the limits;
    # a concurrent create with the same request_id may win.
    job, created = store.create_job(job, admit)
    tracing.current.job(job.runtime.get("traceparent")).link_current()  # a retry links to the job it returns
    if not created:
        _check_request_id_owner(job, caller)
    if created:
        log.info("job %s created: %s on %s", job.id, normalized["model"]["preset"], normalized["dataset"])
    return job, created


def _check_caller_jobs(count: Callable[..., int], caller: Caller) -> None:
    """Refuses a job past the caller's ``max_jobs``; ``count`` is the one
    ``Store.create_job`` gives its ``admit``."""
    limit = caller.limits.max_jobs
    if limit is None:
        return
    active = count([QUEUED, RUNNING, CANCELLING], caller.name)
    if active >= limit:
        raise ResourceExhausted(
            f"Too many jobs of yours. Expected at most {limit} queued or running at once (the max_jobs of "
            f"{caller.name!r}'s token). Received: a job while {active} are queued or running; wait for one to "
            "end or cancel one.", reason="CALLER_JOB_LIMIT",
            metadata={"active": str(active), "limit": str(limit), "caller": caller.name})


def _retried(store: Store, request_id: str, caller: Caller) -> JobRecord | None:
    """The job an earlier create with ``request_id`` made, if any."""
    existing = store.get_job_by_request_id(request_id)
    if existing is not None:
        _check_request_id_owner(existing, caller)
    return existing


def _check_request_id_owner(job: JobRecord, caller: Caller) -> None:
    # Request ids are one namespace for all callers: one that another caller's
    # job holds is refused without naming or returning that job.
    if not caller.owns(job.owner):
        raise AlreadyExists(f"request_id {job.request_id!r} is in use by another caller's job. Expected a "
                            "request_id of your own (a fresh random one per new job).",
                            reason="REQUEST_ID_IN_USE")


def _whole(spec: Mapping[str, Any], field: str, default: int, lo: int, hi: int) -> int:
    value = spec.get(field) or default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not lo <= value <= hi:
        raise InvalidArgument(f"Invalid {field}. Expected an integer in [{lo}, {hi}]. Received: {value!r}.",
                              reason="BAD_JOB_SPEC", metadata={"field": field})
    return int(value)


def _workers(spec: Mapping[str, Any], settings, preset, loss, batch_size: int, metrics: list,
             classes: int = 2) -> int:
    """The job's worker count (1 by default), checked: at most
    ``max_job_workers``, no more than the batch has examples, and more than
    one only for a classifier with a stateless loss whose every term splits
    over the rows of a batch (``_check_rows_split``: the custom training loop
    that multi-worker jobs run covers those)."""
    limit = getattr(settings, "max_job_workers", 1)
    workers = _whole(spec, "workers", 1, 1, limit)
    if workers == 1:
        return 1
    if preset.kind != CLASSIFIER:
        raise InvalidArgument(
            f"Invalid workers. Expected 1 for the `{preset.name}` preset: multi-worker training covers classifiers "
            f"(cnn, mlp). Received: workers={workers}.", reason="BAD_JOB_SPEC", metadata={"field": "workers"})
    if loss is not None and loss.outputs:
        raise InvalidArgument(
            f"Invalid workers. Expected 1 for loss `{loss.metric_name}`, which keeps state across batches "
            f"({', '.join(loss.outputs)}) that the workers would not share. Received: workers={workers}.",
            reason="BAD_JOB_SPEC", metadata={"field": "workers"})
    if loss is not None:
        _check_rows_split(loss, workers, classes)
    if set(metrics) - {"accuracy"}:
        raise InvalidArgument(
            f"Invalid metrics for workers={workers}. Expected `accuracy` alone: the multi-worker loop computes "
            f"loss and accuracy. Received: {metrics}.", reason="BAD_JOB_SPEC", metadata={"field": "metrics"})
    if batch_size < workers:
        raise InvalidArgument(
            f"Invalid workers. Expected at most batch_size={batch_size} workers, so that each takes a share of "
            f"every batch. Received: workers={workers}.", reason="BAD_JOB_SPEC", metadata={"field": "workers"})
    return workers


def _check_rows_split(loss, workers: int, classes: int) -> None:
    """Refuses a multi-worker job whose loss the workers' row shares cannot
    reproduce (``multiworker.worker_share`` adds per-row sums): a term whose
    values couple the rows of a batch (``reductions.row_structure``, the
    test chunked evaluation and micro-batching use), one that maps labels by
    the whole batch (hinge), or one that divides by the labels its
    ``ignore_class`` leaves over the whole batch."""
    pred_shape = (2 * workers, classes)
    true_shape = pred_shape[:1] if label_format(loss) == SPARSE else pred_shape
    for i, term in enumerate(loss.terms):
        where = f"terms[{i}] (`{term.entry.name or 'expression'}`)" if loss.composite else \
            f"loss `{term.entry.name or 'expression'}`"
        structure = reductions.row_structure(term, true_shape, pred_shape)
        why = None
        if structure is None or structure.kind != ROWS:
            why = "its values couple the rows of a batch (a reduction, normalisation or maximum over them)"
        elif term.entry.hinge_labels:
            why = "it maps {0, 1} labels to {-1, 1} only when every label of the batch is 0 or 1"
        elif term.params.get("ignore_class") is not None and (
                term.reduction or DEFAULT_REDUCTION) in reductions.MASK_DIVIDED:
            why = (f"with ignore_class and reduction `{term.reduction or DEFAULT_REDUCTION}` it divides by the "
                   "labels not ignored over the whole batch")
        if why:
            raise InvalidArgument(
                f"Invalid workers. Expected 1 for {where}: {why}, which the workers' shares of the batch cannot "
                f"reproduce. Received: workers={workers}.", reason="BAD_JOB_SPEC", metadata={"field": "workers"})


def _check_bounds(settings, preset: str, params: Mapping[str, Any], info, epochs: int, steps: int,
                  batch_size: int, n_train: int, n_val: int) -> None:
    """Refuses a job whose steps, model size, cost or memory pass the
    settings, before anything is spent (``training/cost.py``)."""
    max_steps = getattr(settings, "max_training_steps", None)
    per_epoch = cost.steps_per_epoch(steps, n_train, batch_size)
    if max_steps is not None and epochs * per_epoch > max_steps:
        how = f"steps_per_epoch={steps}" if steps else f"{per_epoch} batches of {batch_size} per epoch"
        raise InvalidArgument(
            f"Job too long. Expected at most {max_steps} training steps (max_training_steps). "
            f"Received: epochs={epochs} x {how} = {epochs * per_epoch} steps.",
            reason="TOO_MANY_STEPS", metadata={"field": "epochs", "limit": str(max_steps)})
    max_params = getattr(settings, "max_model_parameters", None)
    count = models.count_parameters(preset, params, info.image_shape, len(info.class_names))
    if max_params is not None and count > max_params:
        raise InvalidArgument(
            f"Model too large. Expected at most {max_params} parameters (max_model_parameters). "
            f"Received: model `{preset}` with {count} parameters on images of shape {tuple(info.image_shape)}.",
            reason="MODEL_TOO_LARGE", metadata={"model": preset, "parameters": str(count),
                                                "limit": str(max_params)})
    cost.TrainingLimits.from_settings(settings).check(cost.JobShape(
        preset, params, info.image_shape, len(info.class_names), epochs, per_epoch, batch_size, n_val))


def _normalize(spec: Mapping[str, Any], planner: Planner, catalog: DatasetCatalog, caller: Caller,
               settings=None) -> tuple[dict, dict, str]:
    """``(stored spec, runtime facts, model kind)``."""
    model = dict(spec.get("model") or {})
    preset = models.get_preset(model.get("preset", ""))
    info = catalog.info(spec.get("dataset", ""), caller)
    params = models.resolve_model_params(preset.name, model.get("params"), info.image_shape)
    # The planner evaluation uses: a bad loss gets the error Evaluate gives.
    loss = plan_training_loss(planner, spec.get("loss"), preset.kind, preset.name)
    optimizer = models.resolve_optimizer(spec.get("optimizer"), preset.defaults.learning_rate)
    metrics = models.resolve_metrics(spec.get("metrics") or [], preset.kind)
    epochs = _whole(spec, "epochs", preset.defaults.epochs, 1, MAX_EPOCHS)
    batch_size = _whole(spec, "batch_size", preset.defaults.batch_size, 1, MAX_BATCH_SIZE)
    steps = _whole(spec, "steps_per_epoch", 0, 0, 1 << 30) if spec.get("steps_per_epoch") else 0
    seed = _whole(spec, "seed", 1, 0, 2**32 - 1)
    workers = _workers(spec, settings, preset, loss, batch_size, metrics, len(info.class_names))
    split = spec.get("validation_split")
    split = DEFAULT_VALIDATION_SPLIT if split is None else split
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 <= split < 1.0:
        raise InvalidArgument(f"Invalid validation_split. Expected a number in [0, 1). Received: {split!r}.",
                              reason="BAD_JOB_SPEC", metadata={"field": "validation_split"})
    n_val = int(round(info.examples * split))
    if info.examples - n_val < 1:
        raise InvalidArgument(f"validation_split={split:g} leaves no training images out of {info.examples}.",
                              reason="BAD_JOB_SPEC", metadata={"field": "validation_split"})
    _check_bounds(settings, preset.name, params, info, epochs, steps, batch_size, info.examples - n_val, n_val)
    normalized = {
        "model": {"preset": preset.name, "params": params},
        "dataset": spec.get("dataset"),
        # Self-contained: a registered expression is stored as its text.
        "loss": loss.to_spec() if loss is not None else {},
        "optimizer": optimizer,
        "epochs": epochs, "batch_size": batch_size, "validation_split": float(split),
        "metrics": metrics, "seed": seed, "steps_per_epoch": steps,
    }
    if workers > 1:  # absent means 1: specs stored before the field read the same
        normalized["workers"] = workers
    runtime = {"dataset_source": info.source, "dataset_path": info.path, "image_shape": list(info.image_shape),
               "class_names": info.class_names, "logits": from_logits(loss)}
    return normalized, runtime, preset.kind
