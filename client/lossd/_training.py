"""Training jobs from the client: create, watch, wait, cancel, download and
use trained models. Mixed into ``lossd.Client``; needs no TensorFlow, and
Pillow only for ``save_image_grid``."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import grpc
import numpy as np
from google.protobuf import json_format

from lossd import _requests, wire
from lossd._errors import LossdError, client_error, from_rpc_error, status_error, translate_errors
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc

UPLOAD_CHUNK_BYTES = 1 << 20
FINAL_STATES = ("succeeded", "failed", "cancelled")
ARTIFACTS = {"model": pb.ARTIFACT_MODEL, "history": pb.ARTIFACT_HISTORY, "tensorboard": pb.ARTIFACT_TENSORBOARD}
_FORMATS = {".npz": pb.DatasetHeader.FORMAT_NPZ, ".zip": pb.DatasetHeader.FORMAT_ZIP,
            ".tar": pb.DatasetHeader.FORMAT_TAR, ".tgz": pb.DatasetHeader.FORMAT_TAR,
            ".tar.gz": pb.DatasetHeader.FORMAT_TAR, ".tar.bz2": pb.DatasetHeader.FORMAT_TAR,
            ".tar.xz": pb.DatasetHeader.FORMAT_TAR}


def _state_name(value: int) -> str:
    return pb.Job.State.Name(value).removeprefix("STATE_").lower()


def _time(ts) -> Optional[datetime.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Job:
    """A training job.

    Attributes:
        name: ``jobs/{id}``.
        state: ``queued``, ``running``, ``cancelling``, ``succeeded``,
            ``failed`` or ``cancelled``.
        spec: The spec the server normalised (defaults filled in), as a dict.
        error: Why the job failed (a LossdError with ``reason`` such as
            ``NON_FINITE_LOSS``), or None.
        progress: ``epochs_completed``, ``epochs``, ``step``,
            ``examples_per_second``, ``eta_seconds`` and the latest ``metrics``.
        model_kind: ``classifier`` (use ``predict``) or ``generator`` (use ``generate``).
    """

    name: str
    state: str
    spec: dict
    create_time: Optional[datetime.datetime]
    start_time: Optional[datetime.datetime]
    end_time: Optional[datetime.datetime]
    error: Optional[LossdError]
    progress: dict
    model_kind: str
    display_name: str = ""
    request_id: str = ""

    @property
    def id(self) -> str:
        return self.name.split("/", 1)[-1]

    @property
    def done(self) -> bool:
        """Whether the job has reached a final state."""
        return self.state in FINAL_STATES

    @classmethod
    def from_proto(cls, message: pb.Job) -> "Job":
        p = message.progress
        return cls(
            name=message.name, state=_state_name(message.state),
            spec=json_format.MessageToDict(message.spec, preserving_proto_field_name=True),
            create_time=_time(message.create_time), start_time=_time(message.start_time),
            end_time=_time(message.end_time),
            error=status_error(message.error) if message.HasField("error") else None,
            progress={"epochs_completed": p.epochs_completed, "epochs": p.epochs, "step": p.step,
                      "steps_per_epoch": p.steps_per_epoch, "examples_per_second": p.examples_per_second,
                      "eta_seconds": p.eta_seconds, "metrics": dict(p.metrics)},
            model_kind=message.model_kind, display_name=message.display_name, request_id=message.request_id)


@dataclasses.dataclass
class JobEvent:
    """One event of a job, as ``watch`` yields it.

    ``kind`` says which fields are set: ``state`` (``state``, ``error``),
    ``epoch`` (``epoch``, ``epochs``, ``metrics``, ``seconds``,
    ``examples_per_second``), ``progress`` (``epoch``, ``epochs``, ``step``,
    ``steps_per_epoch``, ``loss``, ``examples_per_second``, ``eta_seconds``)
    or ``message`` (``message``).
    """

    sequence: int
    time: Optional[datetime.datetime]
    kind: str
    state: str = ""
    error: Optional[LossdError] = None
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    loss: float = float("nan")
    metrics: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    examples: int = 0
    examples_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""

    @classmethod
    def from_proto(cls, m: pb.JobEvent) -> "JobEvent":
        kind = m.WhichOneof("kind")
        base = {"sequence": m.sequence, "time": _time(m.time)}
        if kind == "state_changed":
            s = m.state_changed
            return cls(kind="state", state=_state_name(s.state),
                       error=status_error(s.error) if s.HasField("error") else None, **base)
        if kind == "epoch_ended":
            e = m.epoch_ended
            return cls(kind="epoch", epoch=e.epoch, epochs=e.epochs, metrics=dict(e.metrics), seconds=e.seconds,
                       examples=e.examples, examples_per_second=e.examples_per_second,
                       loss=e.metrics.get("loss", float("nan")), **base)
        if kind == "progress":
            p = m.progress
            return cls(kind="progress", epoch=p.epoch, epochs=p.epochs, step=p.step,
                       steps_per_epoch=p.steps_per_epoch, loss=p.loss, examples_per_second=p.examples_per_second,
                       eta_seconds=p.eta_seconds, **base)
        return cls(kind="message", message=m.message, **base)


@dataclasses.dataclass
class Dataset:
    """A dataset the server can train on."""

    name: str
    source: str
    examples: int
    image_shape: tuple[int, ...]
    class_names: list[str]
    create_time: Optional[datetime.datetime] = None
    size_bytes: int = 0

    @classmethod
    def from_proto(cls, m: pb.Dataset) -> "Dataset":
        return cls(m.name, m.source, m.examples, tuple(m.image_shape), list(m.class_names), _time(m.create_time),
                   m.size_bytes)


def _job_name(job: "Job | str") -> str:
    name = job.name if isinstance(job, Job) else str(job)
    return name if name.startswith("jobs/") else f"jobs/{name}"


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A one-line text progress bar for a job: epoch, bar, loss, examples/s and ETA."""

    def __init__(self, file: TextIO = sys.stderr, width: int = 30):
        self.file, self.width = file, width
        self.tty = getattr(file, "isatty", lambda: False)()
        self.last_metrics: dict = {}

    def update(self, event: JobEvent) -> None:
        if event.kind == "progress" and event.epochs:
            fraction = ((event.epoch - 1) + event.step / max(event.steps_per_epoch, 1)) / event.epochs
            filled = int(round(fraction * self.width))
            line = (f"epoch {event.epoch}/{event.epochs} [{'#' * filled}{'.' * (self.width - filled)}] "
                    f"{fraction * 100:5.1f}%  loss {event.loss:.4f}  {event.examples_per_second:,.0f} img/s  "
                    f"ETA {_format_seconds(event.eta_seconds)}")
            self._write(line, final=False)
        elif event.kind == "epoch":
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(event.metrics.items()))
            self._write(f"epoch {event.epoch}/{event.epochs} done in {event.seconds:.1f}s  {metrics}", final=True)
        elif event.kind == "state":
            text = f"state: {event.state}"
            if event.error is not None:
                text += f" ({event.error.reason}: {event.error.message})"
            self._write(text, final=True)
        elif event.kind == "message":
            self._write(event.message, final=True)

    def _write(self, line: str, *, final: bool) -> None:
        if self.tty:
            self.file.write("\r\x1b[2K" + line + ("\n" if final else ""))
        elif final or line:
            # Not a terminal (a log file, CI): progress lines only every so often.
            if final or not hasattr(self, "_last") or time.monotonic() - self._last > 5:
                self._last = time.monotonic()
                self.file.write(line + "\n")
        self.file.flush()


class TrainingMixin:
    """Training-job methods of ``lossd.Client`` (they use its channel, deadline and metadata)."""

    _channel: grpc.Channel

    @property
    def _training(self) -> pb_grpc.TrainingServiceStub:
        stub = self.__dict__.get("_training_stub")
        if stub is None:
            stub = self.__dict__["_training_stub"] = pb_grpc.TrainingServiceStub(self._channel)
        return stub

    @translate_errors
    def create_job(self, model: str = "cnn", dataset: str = "digits", *, loss: Any = None,
                   loss_params: Optional[Mapping[str, Any]] = None, model_params: Optional[Mapping[str, Any]] = None,
                   optimizer: str = "adam", learning_rate: Optional[float] = None,
                   optimizer_params: Optional[Mapping[str, Any]] = None, epochs: int = 0, batch_size: int = 0,
                   validation_split: Optional[float] = None, metrics: Sequence[str] = (), seed: int = 0,
                   steps_per_epoch: int = 0, display_name: str = "", request_id: Optional[str] = None,
                   timeout: Optional[float] = None) -> Job:
        """Creates a training job; the server checks everything before queueing it.

        Args:
            model: The preset: ``cnn``, ``mlp`` or ``vae``.
            dataset: ``digits``, an uploaded dataset's name or ``folder:PATH``.
            loss: A registered loss name (``"sparse_categorical_crossentropy"``,
                or one registered with ``register_loss``), ``{"name": ..., "params": {...}}``,
                ``{"expression": ..., "params": {...}}`` or a composite
                ``{"terms": [...]}`` (as for ``evaluate``); None for the model's default.
            loss_params: Loss parameters under Keras's names.
            model_params: Preset parameters, e.g. ``{"filters": [16, 32]}``.
            optimizer: A Keras optimizer name (``adam``, ``sgd``, ...).
            learning_rate: None for the optimizer's default.
            optimizer_params: Other optimizer parameters, e.g. ``{"momentum": 0.9}``.
            epochs: 0 for the server's default (10).
            batch_size: 0 for the default (32).
            validation_split: Held-out fraction; None for the default (0.2).
            metrics: Keras metric names; empty for ``accuracy`` on classifiers.
            seed: 0 for the default (1).
            steps_per_epoch: Caps the batches per epoch; 0 for all.
            display_name: A name for people.
            request_id: Makes retries safe: the same id returns the same job.
                A fresh id is made when None.
            timeout: Deadline in seconds for this call.

        Returns:
            The queued Job.

        Raises:
            LossdError: INVALID_ARGUMENT with a reason such as UNKNOWN_MODEL,
                UNKNOWN_DATASET, UNKNOWN_LOSS or INCOMPATIBLE_LOSS.
        """
        spec = pb.JobSpec(dataset=dataset, epochs=epochs, batch_size=batch_size, metrics=list(metrics), seed=seed,
                          steps_per_epoch=steps_per_epoch)
        spec.model.preset = model
        spec.model.params.update(dict(model_params or {}))
        if validation_split is not None:
            spec.validation_split = validation_split
        if loss is not None:
            spec.loss.CopyFrom(wire.spec_from_dict(loss, loss_params))
        spec.optimizer.name = optimizer
        if learning_rate is not None:
            spec.optimizer.learning_rate = learning_rate
        spec.optimizer.params.update(dict(optimizer_params or {}))
        request = pb.CreateJobRequest(spec=spec, display_name=display_name,
                                      request_id=request_id if request_id is not None else uuid.uuid4().hex)
        return Job.from_proto(self._training.CreateJob(request, **self._call_args(timeout)))

    @translate_errors
    def get_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """The job's current state (``job`` is a Job, ``jobs/{id}`` or an id)."""
        return Job.from_proto(self._training.GetJob(pb.GetJobRequest(name=_job_name(job)),
                                                    **self._call_args(timeout)))

    @translate_errors
    def list_jobs(self, states: Iterable[str] = (), *, page_size: int = 100, limit: Optional[int] = None,
                  timeout: Optional[float] = None) -> list[Job]:
        """Jobs, newest first, fetching pages as needed.

        Args:
            states: Only jobs in these states (``"running"``, ``"succeeded"``...).
            page_size: Jobs per request.
            limit: Most jobs to return; None for all.
        """
        values = [pb.Job.State.Value(f"STATE_{s.upper()}") for s in states]
        jobs: list[Job] = []
        token = ""
        while True:
            response = self._training.ListJobs(pb.ListJobsRequest(page_size=page_size, page_token=token,
                                                                  states=values), **self._call_args(timeout))
            jobs.extend(Job.from_proto(j) for j in response.jobs)
            token = response.next_page_token
            if not token or (limit is not None and len(jobs) >= limit):
                return jobs[:limit] if limit is not None else jobs

    @translate_errors
    def cancel_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """Cancels a queued or running job (best effort); returns it, normally ``cancelled``.

        Raises:
            LossdError: FAILED_PRECONDITION (JOB_ALREADY_FINISHED) for a finished job.
        """
        return Job.from_proto(self._training.CancelJob(pb.CancelJobRequest(name=_job_name(job)),
                                                       **self._call_args(timeout)))

    def watch(self, job: "Job | str", *, after_sequence: int = 0, timeout: Optional[float] = None
              ) -> Iterator[JobEvent]:
        """Yields the job's events from the first (or after ``after_sequence``),
        then live ones, until the job ends."""
        try:
            for message in self._training.WatchJob(pb.WatchJobRequest(name=_job_name(job),
                                                                      after_sequence=after_sequence),
                                                   **self._call_args(timeout)):
                yield JobEvent.from_proto(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def wait(self, job: "Job | str", *, progress: bool = True, file: Optional[TextIO] = None,
             timeout: Optional[float] = None) -> Job:
        """Waits for the job to end, optionally drawing a progress bar
        (epoch, loss, examples/s, ETA) on ``file`` (stderr by default).

        Returns:
            The finished Job; check ``job.state`` and ``job.error``.
        """
        bar = ProgressBar(file or sys.stderr) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        last = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                for event in self.watch(job, after_sequence=last, timeout=remaining):
                    last = event.sequence
                    if bar is not None:
                        bar.update(event)
            except LossdError as error:
                # A stream cut short (server restart, proxy idle timeout) is
                # resumed from the last event seen; other errors are real.
                if error.code != grpc.StatusCode.UNAVAILABLE or (deadline and time.monotonic() > deadline):
                    raise
                time.sleep(1.0)
                continue
            result = self.get_job(job)
            if result.done:
                return result

    def upload_dataset(self, path: "str | os.PathLike", name: Optional[str] = None, *,
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES, timeout: Optional[float] = None) -> Dataset:
        """Uploads an ``.npz`` (``x``, ``y``) or a zip/tar of one folder per class of images.

        Args:
            path: The file; its suffix gives the format.
            name: The dataset's name; the file name without suffix when None.
        """
        path = pathlib.Path(path)
        suffix = "".join(path.suffixes[-2:]) if "".join(path.suffixes[-2:]) in _FORMATS else path.suffix
        fmt = _FORMATS.get(suffix.lower())
        if fmt is None:
            raise client_error(f"Cannot tell the dataset format of {path.name}. Expected a file ending in "
                               f"{', '.join(_FORMATS)}.")
        size = path.stat().st_size
        name = name or path.name[: -len(suffix)]

        def messages():
            yield pb.UploadDatasetRequest(header=pb.DatasetHeader(name=name, format=fmt, size_bytes=size))
            with open(path, "rb") as f:
                while True:
                    data = f.read(chunk_bytes)
                    if not data:
                        return
                    yield pb.UploadDatasetRequest(chunk=data)

        try:
            return Dataset.from_proto(self._training.UploadDataset(messages(), **self._call_args(timeout)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    @translate_errors
    def list_datasets(self, *, timeout: Optional[float] = None) -> list[Dataset]:
        """Every dataset the server can train on."""
        response = self._training.ListDatasets(pb.ListDatasetsRequest(), **self._call_args(timeout))
        return [Dataset.from_proto(d) for d in response.datasets]

    def download(self, job: "Job | str", dest: "str | os.PathLike" = ".", *, artifact: str = "model",
                 timeout: Optional[float] = None) -> pathlib.Path:
        """Downloads an artifact: ``model`` (.keras), ``history`` (JSON) or
        ``tensorboard`` (.tar.gz of the logs).

        Args:
            dest: A folder (the server's file name is used) or a file path.

        Returns:
            The written file's path.
        """
        if artifact not in ARTIFACTS:
            raise client_error(f"Unknown artifact. Expected one of {list(ARTIFACTS)}. Received: {artifact!r}.")
        dest = pathlib.Path(dest)
        request = pb.DownloadArtifactRequest(name=_job_name(job), artifact=ARTIFACTS[artifact])
        target, tmp, out = None, None, None
        try:
            for chunk in self._training.DownloadArtifact(request, **self._call_args(timeout)):
                if out is None:
                    target = dest / chunk.filename if dest.is_dir() else dest
                    tmp = target.with_name(target.name + ".part")
                    out = open(tmp, "wb")
                out.write(chunk.data)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            if out is not None:
                out.close()
        if tmp is None:
            raise LossdError(grpc.StatusCode.INTERNAL, "the server sent no data")
        os.replace(tmp, target)
        return target

    @translate_errors
    def predict(self, job: "Job | str", images, *, timeout: Optional[float] = None) -> np.ndarray:
        """Class probabilities (N x classes, rows summing to 1) from a trained classifier.

        Args:
            images: N x H x W or N x H x W x C, uint8 in [0, 255] or floats in [0, 1].
        """
        images = np.asarray(images)
        if images.dtype == np.float64:
            images = images.astype(np.float32)
        request = pb.PredictRequest(name=_job_name(job), images=wire.from_numpy(images, field="images"))
        response = self._training.Predict(request, **self._call_args(timeout))
        return wire.to_numpy(response.probabilities, field="probabilities").copy()

    @translate_errors
    def generate(self, job: "Job | str", n: int, *, seed: int = 0, timeout: Optional[float] = None) -> np.ndarray:
        """``n`` new images (float32, N x H x W x C in [0, 1]) from a trained generator."""
        response = self._training.Generate(pb.GenerateRequest(name=_job_name(job), count=n, seed=seed),
                                           **self._call_args(timeout))
        return wire.to_numpy(response.images, field="images").copy()


def save_image_grid(images, path: "str | os.PathLike", *, columns: Optional[int] = None, scale: int = 4,
                    padding: int = 1) -> pathlib.Path:
    """Saves images (N x H x W [x C], floats in [0, 1] or uint8) as one PNG grid.

    Needs Pillow (``pip install pillow``).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("save_image_grid needs Pillow: pip install pillow") from None
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    mode = "L" if c == 1 else "RGB"
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid, mode=mode)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = pathlib.Path(path)
    picture.save(path)
    return path
