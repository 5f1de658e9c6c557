"""The TrainingService servicer: converts messages to and from the plain
records of ``lossd_server.training``; everything else happens there."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lossd import wire
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc
from lossd_server.errors import DOMAIN, DeadlineExceeded, InvalidArgument, NotFound
from lossd_server.grpc.timestamps import timestamp
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Callers
from lossd_server.grpc.status import handle_errors
from lossd_server.training.inference import GenerateOptions
from lossd_server.training.manager import TrainingManager
from lossd_server.state.store import Event, JobRecord

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name

_STATES = {
    "queued": pb.Job.STATE_QUEUED, "running": pb.Job.STATE_RUNNING, "succeeded": pb.Job.STATE_SUCCEEDED,
    "failed": pb.Job.STATE_FAILED, "cancelling": pb.Job.STATE_CANCELLING, "cancelled": pb.Job.STATE_CANCELLED,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
_FORMATS = {pb.DatasetHeader.FORMAT_NPZ: "npz", pb.DatasetHeader.FORMAT_ZIP: "zip",
            pb.DatasetHeader.FORMAT_TAR: "tar"}
_ARTIFACTS = {pb.ARTIFACT_MODEL: "model", pb.ARTIFACT_HISTORY: "history", pb.ARTIFACT_TENSORBOARD: "tensorboard"}


def error_status(error: dict | None) -> status_pb2.Status | None:
    """A stored job error as a ``google.rpc.Status`` with an ErrorInfo."""
    if not error:
        return None
    # A stored error is state, which may be damaged (tests/robustness/test_store_faults.py):
    # what it lacks is filled in, never a KeyError that turns GetJob into INTERNAL.
    if not isinstance(error, dict):
        error = {"message": str(error)}
    metadata = error.get("metadata")
    info = error_details_pb2.ErrorInfo(
        reason=str(error.get("reason") or "JOB_FAILED"), domain=DOMAIN,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {})
    detail = any_pb2.Any()
    detail.Pack(info)
    code = error.get("code")
    code = code if isinstance(code, str) and code in code_pb2.Code.keys() else "INTERNAL"
    return status_pb2.Status(code=code_pb2.Code.Value(code), message=str(error.get("message", "")),
                             details=[detail])


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def job_id(name: str) -> str:
    """``jobs/{id}`` (or a bare id) -> id."""
    ident = name[len("jobs/"):] if name.startswith("jobs/") else name
    if not ident or "/" in ident or len(ident) > 64:
        raise NotFound(f"Job {name[:80]!r} does not exist. Expected a name of the form `jobs/{{job}}`.",
                       reason="JOB_NOT_FOUND", metadata={"job": name[:100]})
    return ident


def _loss_message(loss: dict):
    """A stored job loss (``Plan.to_spec()``, or the form an older server
    stored, whose losses carry a ``label``) as a LossSpec message."""
    def plain(d: dict) -> dict:
        return {k: v for k, v in d.items() if k in ("name", "params", "expression")}

    if "terms" in loss:
        return wire.spec_from_dict({"terms": [{**{k: v for k, v in t.items() if k != "loss"}, "loss": plain(t["loss"])}
                                              for t in loss["terms"]]})
    return wire.spec_from_dict(plain(loss))


def spec_to_proto(spec: dict) -> pb.JobSpec:
    """The stored (normalised) spec as a JobSpec message."""
    message = pb.JobSpec(dataset=spec["dataset"], epochs=spec["epochs"], batch_size=spec["batch_size"],
                         validation_split=spec["validation_split"], metrics=spec["metrics"], seed=spec["seed"],
                         steps_per_epoch=spec["steps_per_epoch"], workers=spec.get("workers", 1))
    message.model.preset = spec["model"]["preset"]
    message.model.params.update(spec["model"]["params"])
    if spec.get("loss"):
        message.loss.CopyFrom(_loss_message(spec["loss"]))
    optimizer = spec["optimizer"]
    message.optimizer.name = optimizer["name"]
    if optimizer.get("learning_rate") is not None:
        message.optimizer.learning_rate = optimizer["learning_rate"]
    message.optimizer.params.update(optimizer.get("params") or {})
    return message


def spec_from_proto(message: pb.JobSpec) -> dict[str, Any]:
    """A JobSpec message as the dict ``TrainingManager.create_job`` takes."""
    spec: dict[str, Any] = {
        "model": {"preset": message.model.preset,
                  "params": wire.struct_to_dict(message.model.params, field="model.params")},
        "dataset": message.dataset,
        "epochs": message.epochs, "batch_size": message.batch_size,
        "validation_split": message.validation_split if message.HasField("validation_split") else None,
        "metrics": list(message.metrics), "seed": message.seed, "steps_per_epoch": message.steps_per_epoch,
        "workers": message.workers,
    }
    if message.HasField("loss"):
        spec["loss"] = wire.spec_to_dict(message.loss)
    if message.HasField("optimizer"):
        opt = message.optimizer
        spec["optimizer"] = {"name": opt.name, "params": wire.struct_to_dict(opt.params, field="optimizer.params"),
                             "learning_rate": opt.learning_rate if opt.HasField("learning_rate") else None}
    return spec


def job_to_proto(job: JobRecord) -> pb.Job:
    p = job.progress
    message = pb.Job(
        name=job_name(job.id), display_name=job.display_name, spec=spec_to_proto(job.spec),
        state=_STATES[job.state], create_time=timestamp(job.create_time), start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time), error=error_status(job.error), request_id=job.request_id or "",
        model_kind=job.model_kind, owner=job.owner,
        progress=pb.JobProgress(epochs_completed=p.get("epochs_completed", 0), epochs=p.get("epochs", 0),
                                step=p.get("step", 0), steps_per_epoch=p.get("steps_per_epoch", 0),
                                examples_per_second=p.get("examples_per_second", 0.0),
                                eta_seconds=p.get("eta_seconds", 0.0), metrics=p.get("metrics", {}),
                                loss_state=_loss_state(p)))
    return message


def _loss_state(payload: dict) -> dict:
    """A stateful loss's state (stored as nested lists) as Tensors, by name."""
    return {name: wire.from_numpy(np.asarray(value, np.float32), field=f"loss_state[{name}]")
            for name, value in (payload.get("loss_state") or {}).items()}


def event_to_proto(event: Event) -> pb.JobEvent:
    message = pb.JobEvent(sequence=event.seq, time=timestamp(event.time))
    d = event.payload
    if event.kind == "state":
        message.state_changed.CopyFrom(pb.JobEvent.StateChanged(state=_STATES[d["state"]],
                                                                error=error_status(d.get("error"))))
    elif event.kind == "epoch":
        message.epoch_ended.CopyFrom(pb.JobEvent.EpochEnded(
            epoch=d["epoch"], epochs=d["epochs"], metrics=d["metrics"], seconds=d["seconds"],
            examples=d["examples"], examples_per_second=d["examples_per_second"]))
    elif event.kind == "progress":
        message.progress.CopyFrom(pb.JobEvent.Progress(
            epoch=d["epoch"], epochs=d["epochs"], step=d["step"], steps_per_epoch=d["steps_per_epoch"],
            loss=d["loss"], examples_per_second=d["examples_per_second"], eta_seconds=d["eta_seconds"],
            loss_state=_loss_state(d)))
    else:
        message.message = d.get("text", "")
    return message


def _readable_event(event: Event):
    """The JobEvent for ``event``; None, with a warning, for one whose
    payload cannot be read (garbage written into the store): a watcher
    skips it and goes on with the next."""
    try:
        if event.payload is None:  # the store could not parse it
            raise ValueError("the payload is not a JSON object")
        return event_to_proto(event)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("WatchJob skips event %s of job %s: it cannot be read (%s: %s)", event.seq, event.job_id,
                    type(exc).__name__, str(exc)[:200])
        return None


def dataset_to_proto(info) -> pb.Dataset:
    return pb.Dataset(name=info.name, source=info.source, examples=info.examples, image_shape=info.image_shape,
                      class_names=info.class_names, create_time=timestamp(info.create_time) if info.create_time
                      else None, size_bytes=info.size_bytes, owner=info.owner)


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    """Implements ``lossd.v1.TrainingService`` over a TrainingManager and its parts."""

    def __init__(self, manager: TrainingManager, *, max_elements: int = 1 << 30,
                 stream_idle_seconds: float = float("inf"), callers: Callers = Callers(None)):
        self.manager = manager
        self.callers = callers  # who calls: Callers.of(context)
        self.max_elements = max_elements
        self.stream_idle_seconds = stream_idle_seconds

    @handle_errors
    def CreateJob(self, request, context):
        if not request.HasField("spec"):
            raise InvalidArgument("CreateJob needs a spec. Received: none.", reason="BAD_JOB_SPEC")
        job = self.manager.create_job(spec_from_proto(request.spec), caller=self.callers.of(context),
                                      display_name=request.display_name, request_id=request.request_id)
        return job_to_proto(job)

    @handle_errors
    def GetJob(self, request, context):
        return job_to_proto(self.manager.get_job(job_id(request.name), self.callers.of(context)))

    @handle_errors
    def ListJobs(self, request, context):
        states = []
        for value in request.states:
            if value not in _STATE_NAMES:
                raise InvalidArgument(f"Invalid state filter. Expected Job.State values 1-6. Received: {value}.",
                                      reason="BAD_STATE")
            states.append(_STATE_NAMES[value])
        jobs, token = self.manager.list_jobs(self.callers.of(context), states, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    @handle_errors
    def CancelJob(self, request, context):
        return job_to_proto(self.manager.scheduler.cancel(job_id(request.name), self.callers.of(context)))

    @handle_errors
    def WatchJob(self, request, context):
        # A watch with nothing to report for stream_idle_seconds ends with
        # STREAM_IDLE, so a queued job's watchers do not hold threads for
        # ever; clients resume from the last sequence they saw.
        ident, after, caller = job_id(request.name), request.after_sequence, self.callers.of(context)
        last_event = time.monotonic()

        def active() -> bool:
            return context.is_active() and time.monotonic() - last_event < self.stream_idle_seconds

        for event in self.manager.scheduler.watch(ident, caller, after, active):
            last_event, after = time.monotonic(), event.seq
            message = _readable_event(event)
            if message is not None:
                yield message
        if context.is_active() and not self.manager.get_job(ident, caller).final \
                and time.monotonic() - last_event >= self.stream_idle_seconds:
            raise DeadlineExceeded(
                f"Job {ident} had no new event for {self.stream_idle_seconds:g} s (the server's "
                f"stream_idle_seconds). Watch again with after_sequence={after} to go on.",
                reason="STREAM_IDLE", metadata={"after_sequence": str(after)})

    @handle_errors
    def UploadDataset(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("UploadDataset must start with a header (name, format, size_bytes). "
                                  "Received: " + ("nothing." if first is None else "a chunk."),
                                  reason="BAD_UPLOAD")
        header = first.header
        fmt = _FORMATS.get(header.format)
        if fmt is None:
            raise InvalidArgument(f"Invalid dataset format. Expected FORMAT_NPZ, FORMAT_ZIP or FORMAT_TAR. "
                                  f"Received: {header.format}.", reason="BAD_DATASET_FORMAT")

        def chunks() -> Iterator[bytes]:
            for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidArgument("UploadDataset takes one header, then chunks. Received: a second header.",
                                          reason="BAD_UPLOAD")
                yield message.chunk

        caller = self.callers.of(context)
        info = self.manager.catalog.upload(header.name, fmt, header.size_bytes, chunks(), caller=caller,
                                           replace=header.replace)
        if self.manager.metrics is not None:
            self.manager.metrics.caller_usage(caller.name, upload_bytes=info.size_bytes)
        return dataset_to_proto(info)

    @handle_errors
    def ListDatasets(self, request, context):
        return pb.ListDatasetsResponse(datasets=[dataset_to_proto(i) for i in
                                                         self.manager.catalog.list(self.callers.of(context))])

    @handle_errors
    def DeleteDataset(self, request, context):
        self.manager.catalog.delete(request.name, self.callers.of(context))
        return empty_pb2.Empty()

    @handle_errors
    def DownloadArtifact(self, request, context):
        artifact = _ARTIFACTS.get(request.artifact)
        if artifact is None:
            raise InvalidArgument("Invalid artifact. Expected ARTIFACT_MODEL, ARTIFACT_HISTORY or "
                                  f"ARTIFACT_TENSORBOARD. Received: {request.artifact}.", reason="BAD_ARTIFACT")
        job = self.manager.get_job(job_id(request.name), self.callers.of(context))
        filename, size, chunks = self.manager.artifacts.download(job, artifact)
        first = True
        for data in chunks:
            yield pb.ArtifactChunk(filename=filename if first else "", size_bytes=size if first else 0, data=data)
            first = False
        if first:  # an empty file still sends its name
            yield pb.ArtifactChunk(filename=filename, size_bytes=0)

    @handle_errors
    def Predict(self, request, context):
        images = wire.to_numpy(request.images, field="images", max_elements=self.max_elements)
        job = self.manager.get_job(job_id(request.name), self.callers.of(context))
        probabilities, class_names = self.manager.inference.predict(job, images)
        return pb.PredictResponse(probabilities=wire.from_numpy(probabilities), class_names=class_names)

    def _generation(self, request, context) -> tuple:
        """A Generate request's job, count, seed and GenerateOptions."""
        caller = self.callers.of(context)
        job = self.manager.get_job(job_id(request.name), caller)
        options = GenerateOptions(
            prompt=request.prompt, steps=request.steps,
            guidance=wire.spec_to_dict(request.guidance) if request.HasField("guidance") else None,
            guidance_scale=request.guidance_scale, init_weight=request.init_weight,
            init_images=wire.to_numpy(request.init_images, field="init_images", max_elements=self.max_elements)
            if request.HasField("init_images") else None,
            classifier=self.manager.get_job(job_id(request.classifier), caller) if request.classifier else None)
        return job, request.count, request.seed, options

    @handle_errors
    def Generate(self, request, context):
        # A client that cancels (or whose deadline passes) frees the thread at the next step.
        images = self.manager.inference.generate(*self._generation(request, context), active=context.is_active)
        return pb.GenerateResponse(images=wire.from_numpy(images))

    @handle_errors
    def GenerateStream(self, request, context):
        # Every check runs before the first message; each step is sent as it
        # ends. grpc stops iterating a cancelled call, which stops sampling;
        # the check below also catches a cancel that lands between sends.
        for progress in self.manager.inference.generate_steps(*self._generation(request, context)):
            yield pb.GenerateStreamResponse(progress=pb.GenerateStreamResponse.Progress(
                step=progress.step, steps=progress.steps, elapsed_seconds=progress.elapsed_seconds,
                eta_seconds=progress.eta_seconds))
            if progress.images is not None:
                yield pb.GenerateStreamResponse(result=pb.GenerateResponse(images=wire.from_numpy(progress.images)))
            elif not context.is_active():
                return


def add_training_service(grpc_server, settings, planner, metrics=None, *, gpus: int,
                         store=None, callers: Callers = Callers(None), evaluator=None) -> TrainingManager:
    """Adds TrainingService to a server; starts nothing.

    Args:
        grpc_server: A ``grpc.Server`` not yet started.
        settings: The server's ``Settings``.
        planner: The ``Planner`` evaluation uses; job losses go through it too.
        metrics: Optional ``Metrics`` to update.
        gpus: How many GPUs the machine has.
        store: The server's ``Store``; by default the manager opens one.
        callers: Who calls (``Callers``); by default everyone is ``ANONYMOUS``.
        evaluator: The ``Evaluator`` guidance losses run on; None refuses guidance.

    Returns:
        The TrainingManager: ``start()`` it with the server, ``stop()`` it
        when the server stops.
    """
    manager = TrainingManager(settings, planner, metrics, gpus=gpus, store=store, evaluator=evaluator)
    servicer = TrainingServicer(manager, max_elements=settings.max_tensor_elements,
                                stream_idle_seconds=settings.stream_idle_seconds, callers=callers)
    parsing.add_tolerant(pb_grpc.add_TrainingServiceServicer_to_server, servicer,
                         pb.DESCRIPTOR.services_by_name["TrainingService"], grpc_server)
    return manager
