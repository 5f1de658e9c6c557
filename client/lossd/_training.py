"""Training jobs from the client: create, watch, wait, cancel, download and
use trained models. The requests and answers are built here once; the
methods are mixed into ``lossd.Client`` (``TrainingMixin``) and
``lossd.aio.Client`` (``AsyncTrainingMixin``), which differ only in how they
wait for the stub. Needs no TensorFlow, and Pillow only for
``save_image_grid``."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import pathlib
import sys
import time
import uuid
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from lossd import wire
from lossd._errors import LossdError, client_error, status_error, translate_errors, translate_errors_async
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



# protobuf's JSON mapping writes 64-bit integers as strings (seed "1"), and a
# Struct holds every number as a double (filters 32.0).
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _integral_as_int(value):
    """A Struct's value with whole numbers as ints, as a user writes them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_as_int(v) for k, v in value.items()}
    return value


def message_to_plain_dict(message) -> dict:
    """``message`` as protobuf's JSON mapping gives it (field names as in
    the .proto), but with 64-bit integers as ints and the whole numbers of
    its Structs (a preset's or a loss's params) as ints: ``"seed": 1``,
    ``"filters": [32, 64]``, not ``"1"`` and ``[32.0, 64.0]``. Other
    numbers are unchanged (``"dropout": 0.25``)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _plain_fields(message, data)
    return data


def _plain_fields(message, data: dict) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = getattr(message, field.name)
        repeated = field.is_repeated
        kind = field.message_type
        if kind is not None and kind.full_name == "google.protobuf.Struct":
            data[field.name] = _integral_as_int(data[field.name])
        elif kind is not None and not kind.GetOptions().map_entry:
            for item, item_data in zip(value, data[field.name]) if repeated else [(value, data[field.name])]:
                _plain_fields(item, item_data)
        elif field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in data[field.name]] if repeated else int(data[field.name])


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
            ``examples_per_second``, ``eta_seconds``, the latest ``metrics`` and
            ``loss_state`` (a stateful loss's state by name, numpy arrays).
        model_kind: ``classifier`` (use ``predict``) or ``generator`` (use ``generate``).
        owner: The name of the token that created it ("" for jobs from
            before owners, or on a server without tokens).
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
    owner: str = ""

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
            spec=message_to_plain_dict(message.spec),
            create_time=_time(message.create_time), start_time=_time(message.start_time),
            end_time=_time(message.end_time),
            error=status_error(message.error) if message.HasField("error") else None,
            progress={"epochs_completed": p.epochs_completed, "epochs": p.epochs, "step": p.step,
                      "steps_per_epoch": p.steps_per_epoch, "examples_per_second": p.examples_per_second,
                      "eta_seconds": p.eta_seconds, "metrics": dict(p.metrics),
                      "loss_state": loss_state(p.loss_state)},
            model_kind=message.model_kind, display_name=message.display_name, request_id=message.request_id,
            owner=message.owner)


def loss_state(tensors) -> dict[str, np.ndarray]:
    """A ``map<string, Tensor>`` of a stateful loss's state as numpy arrays."""
    return {name: wire.to_numpy(t, field=f"loss_state[{name}]") for name, t in tensors.items()}


@dataclasses.dataclass
class JobEvent:
    """One event of a job, as ``watch`` yields it.

    ``kind`` says which fields are set: ``state`` (``state``, ``error``),
    ``epoch`` (``epoch``, ``epochs``, ``metrics``, ``seconds``,
    ``examples_per_second``), ``progress`` (``epoch``, ``epochs``, ``step``,
    ``steps_per_epoch``, ``loss``, ``examples_per_second``, ``eta_seconds``,
    and ``loss_state``: a stateful loss's state by name, such as
    ``matrix_crossentropy``'s ``matrix``) or ``message`` (``message``).
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
    loss_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

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
                       eta_seconds=p.eta_seconds, loss_state=loss_state(p.loss_state), **base)
        return cls(kind="message", message=m.message, **base)


@dataclasses.dataclass
class Dataset:
    """A dataset the server can train on; ``owner`` is the name of the token
    that uploaded it ("" for built-in and folder datasets)."""

    name: str
    source: str
    examples: int
    image_shape: tuple[int, ...]
    class_names: list[str]
    create_time: Optional[datetime.datetime] = None
    size_bytes: int = 0
    owner: str = ""

    @classmethod
    def from_proto(cls, m: pb.Dataset) -> "Dataset":
        return cls(m.name, m.source, m.examples, tuple(m.image_shape), list(m.class_names), _time(m.create_time),
                   m.size_bytes, m.owner)


@dataclasses.dataclass
class GenerateProgress:
    """One step of a generation, as ``generate_stream`` yields it: ``step``
    of ``steps`` done, ``elapsed_seconds`` since the server began, and its
    estimate of the seconds left. The last one (``step == steps``) holds the
    ``images`` (float32 N x H x W x C in [0, 1]); the others hold None."""

    step: int
    steps: int
    elapsed_seconds: float
    eta_seconds: float
    images: Optional[np.ndarray] = None

    @property
    def done(self) -> bool:
        """Whether this is the last step, with the images."""
        return self.images is not None


class GenerateSteps:
    """GenerateStream's messages as GenerateProgress: steps 1 .. N-1 as they
    come, step N with the images of the result message that follows it."""

    def __init__(self) -> None:
        self._last: Optional[GenerateProgress] = None

    def add(self, message: pb.GenerateStreamResponse) -> Optional[GenerateProgress]:
        """The item ``message`` completes, or None (the last step waits for its images)."""
        if message.WhichOneof("kind") == "result":
            last = self._last or GenerateProgress(1, 1, 0.0, 0.0)
            return dataclasses.replace(last, images=generated_images(message.result), eta_seconds=0.0)
        p = message.progress
        item = GenerateProgress(p.step, p.steps, p.elapsed_seconds, p.eta_seconds)
        if p.step >= p.steps:
            self._last = item
            return None
        return item


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


class GenerateBar(ProgressBar):
    """``ProgressBar``'s line for a generation: steps, bar, elapsed time and ETA."""

    def update(self, item: GenerateProgress) -> None:  # type: ignore[override]
        filled = int(round(item.step / max(item.steps, 1) * self.width))
        line = (f"step {item.step}/{item.steps} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{_format_seconds(item.elapsed_seconds)} elapsed  ETA {_format_seconds(item.eta_seconds)}")
        self._write(line, final=item.done)


# -- requests and answers, shared by the sync and asyncio clients --------------

def job_name(job: "Job | str") -> str:
    """``jobs/{id}`` for a Job, a ``jobs/{id}`` name or a bare id."""
    name = job.name if isinstance(job, Job) else str(job)
    return name if name.startswith("jobs/") else f"jobs/{name}"


def create_job_request(model: str, dataset: str, *, loss: Any, loss_params: Optional[Mapping[str, Any]],
                       model_params: Optional[Mapping[str, Any]], optimizer: str, learning_rate: Optional[float],
                       optimizer_params: Optional[Mapping[str, Any]], epochs: int, batch_size: int,
                       validation_split: Optional[float], metrics: Sequence[str], seed: int, steps_per_epoch: int,
                       display_name: str, request_id: Optional[str], workers: int = 0) -> pb.CreateJobRequest:
    spec = pb.JobSpec(dataset=dataset, epochs=epochs, batch_size=batch_size, metrics=list(metrics), seed=seed,
                      steps_per_epoch=steps_per_epoch, workers=workers)
    spec.model.preset = model
    _copy_struct(spec.model.params, model_params, "model_params")
    if validation_split is not None:
        spec.validation_split = validation_split
    if loss is not None:
        spec.loss.CopyFrom(wire.spec_from_dict(loss, loss_params))
    spec.optimizer.name = optimizer
    if learning_rate is not None:
        spec.optimizer.learning_rate = learning_rate
    _copy_struct(spec.optimizer.params, optimizer_params, "optimizer_params")
    return pb.CreateJobRequest(spec=spec, display_name=display_name,
                               request_id=request_id if request_id is not None else uuid.uuid4().hex)


def _copy_struct(target, params: Optional[Mapping[str, Any]], field: str) -> None:
    struct = wire.dict_to_struct(params, field=field)
    if struct is not None:
        target.CopyFrom(struct)


class JobPages:
    """``list_jobs`` page by page: ``request()`` is the next page's request, or
    None when done; ``add()`` takes its answer; ``jobs`` is the result."""

    def __init__(self, states: Iterable[str], page_size: int, limit: Optional[int]):
        self._states = [_state_value(s) for s in states]
        self._page_size, self._limit = page_size, limit
        self._token: Optional[str] = ""
        self.jobs: list[Job] = []

    def request(self) -> Optional[pb.ListJobsRequest]:
        if self._token is None:
            return None
        return pb.ListJobsRequest(page_size=self._page_size, page_token=self._token, states=self._states)

    def add(self, response: pb.ListJobsResponse) -> None:
        self.jobs.extend(Job.from_proto(j) for j in response.jobs)
        if self._limit is not None and len(self.jobs) >= self._limit:
            del self.jobs[self._limit:]
            self._token = None
        else:
            self._token = response.next_page_token or None


def _state_value(state: str) -> int:
    names = [_state_name(v) for v in pb.Job.State.values() if v != pb.Job.STATE_UNSPECIFIED]
    if not isinstance(state, str) or state.lower() not in names:
        raise client_error(f"Unknown job state. Expected one of {names}. Received: {state!r}.")
    return pb.Job.State.Value(f"STATE_{state.upper()}")


def watch_request(job: "Job | str", after_sequence: int) -> pb.WatchJobRequest:
    return pb.WatchJobRequest(name=job_name(job), after_sequence=after_sequence)


class Waiter:
    """``wait``'s bookkeeping: the progress bar, the overall deadline, and
    where to resume a watch that was cut short."""

    RETRY_SECONDS = 1.0

    def __init__(self, progress: bool, file: Optional[TextIO], timeout: Optional[float]):
        self.bar = ProgressBar(file or sys.stderr) if progress else None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last = 0  # the sequence of the last event seen

    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def update(self, event: JobEvent) -> None:
        self.last = event.sequence
        if self.bar is not None:
            self.bar.update(event)

    def retry_after(self, error: LossdError) -> float:
        """Seconds to wait before watching again after ``error``. A stream cut
        short (server restart, proxy idle timeout) is resumed from the last
        event seen, at once when the server closed it for being idle
        (``STREAM_IDLE``: the job had nothing to report); any other error is
        raised."""
        if self.deadline and time.monotonic() > self.deadline:
            raise error
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.reason == "STREAM_IDLE":
            return 0.0
        if error.code != grpc.StatusCode.UNAVAILABLE:
            raise error
        return self.RETRY_SECONDS


def upload_requests(path: "str | os.PathLike", name: Optional[str], chunk_bytes: int, replace: bool = False
                    ) -> Iterator[pb.UploadDatasetRequest]:
    """The header, then the file in chunks; the format and the file are
    checked now, before any call."""
    path = pathlib.Path(path)
    suffix = "".join(path.suffixes[-2:]) if "".join(path.suffixes[-2:]) in _FORMATS else path.suffix
    fmt = _FORMATS.get(suffix.lower())
    if fmt is None:
        raise client_error(f"Cannot tell the dataset format of {path.name}. Expected a file ending in "
                           f"{', '.join(_FORMATS)}.")
    header = pb.DatasetHeader(name=name or path.name[: -len(suffix)], format=fmt, size_bytes=path.stat().st_size,
                              replace=replace)
    return _upload_messages(path, header, chunk_bytes)


def _upload_messages(path: pathlib.Path, header: pb.DatasetHeader, chunk_bytes: int
                     ) -> Iterator[pb.UploadDatasetRequest]:
    yield pb.UploadDatasetRequest(header=header)
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield pb.UploadDatasetRequest(chunk=data)


def download_request(job: "Job | str", artifact: str) -> pb.DownloadArtifactRequest:
    if artifact not in ARTIFACTS:
        raise client_error(f"Unknown artifact. Expected one of {list(ARTIFACTS)}. Received: {artifact!r}.")
    return pb.DownloadArtifactRequest(name=job_name(job), artifact=ARTIFACTS[artifact])


class ArtifactFile:
    """Where ``download`` writes the chunks: the server's file name in ``dest``
    when it is a folder, else ``dest`` itself. It writes a ``.part`` file
    beside it and renames it once the download is complete; ``path`` is the
    file written."""

    def __init__(self, dest: "str | os.PathLike"):
        self.dest = pathlib.Path(dest)
        self.path: Optional[pathlib.Path] = None
        self._part: Optional[pathlib.Path] = None
        self._out = None

    def write(self, chunk: pb.DownloadArtifactResponse) -> None:
        if self._out is None:
            # Only the file's name: a server cannot write outside ``dest``.
            self.path = self.dest / pathlib.PurePath(chunk.filename).name if self.dest.is_dir() else self.dest
            self._part = self.path.with_name(self.path.name + ".part")
            self._out = open(self._part, "wb")
        self._out.write(chunk.data)

    def __enter__(self) -> "ArtifactFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._out is not None:
            self._out.close()
        if exc_type is not None:
            if self._part is not None:
                self._part.unlink(missing_ok=True)
            return
        if self._part is None:
            raise LossdError(grpc.StatusCode.INTERNAL, "the server sent no data")
        os.replace(self._part, self.path)


def predict_request(job: "Job | str", images) -> pb.PredictRequest:
    images = np.asarray(images)
    if images.dtype == np.float64:
        images = images.astype(np.float32)
    return pb.PredictRequest(name=job_name(job), images=wire.from_numpy(images, field="images"))


def probabilities(response: pb.PredictResponse) -> np.ndarray:
    return wire.to_numpy(response.probabilities, field="probabilities").copy()


def generate_request(job: "Job | str", n: int, *, seed: int = 0, prompt: str = "", steps: int = 0,
                     guidance: Any = None, guidance_scale: float = 0.0, init_images=None, init_weight: float = 0.0,
                     classifier: "Job | str | None" = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(name=job_name(job), count=n, seed=seed, prompt=str(prompt), steps=steps,
                                 guidance_scale=guidance_scale, init_weight=init_weight,
                                 classifier=job_name(classifier) if classifier is not None else "")
    if guidance is not None:
        request.guidance.CopyFrom(wire.spec_from_dict(guidance))
    if init_images is not None:
        images = np.asarray(init_images)
        request.init_images.CopyFrom(wire.from_numpy(images.astype(np.float32) if images.dtype == np.float64
                                                     else images, field="init_images"))
    return request


def generated_images(response: pb.GenerateResponse) -> np.ndarray:
    return wire.to_numpy(response.images, field="images").copy()


def datasets(response: pb.ListDatasetsResponse) -> list[Dataset]:
    return [Dataset.from_proto(d) for d in response.datasets]


# -- the two clients' training methods -------------------------------------------

class _TrainingStub:
    """The training stub, made on first use from the client's channel."""

    _channel: grpc.Channel

    @property
    def _training(self) -> pb_grpc.TrainingServiceStub:
        stub = self.__dict__.get("_training_stub")
        if stub is None:
            stub = self.__dict__["_training_stub"] = pb_grpc.TrainingServiceStub(self._channel)
        return stub


class TrainingMixin(_TrainingStub):
    """Training-job methods of ``lossd.Client`` (they use its channel, deadline and metadata)."""

    @translate_errors
    def create_job(self, model: str = "cnn", dataset: str = "digits", *, loss: Any = None,
                   loss_params: Optional[Mapping[str, Any]] = None, model_params: Optional[Mapping[str, Any]] = None,
                   optimizer: str = "adam", learning_rate: Optional[float] = None,
                   optimizer_params: Optional[Mapping[str, Any]] = None, epochs: int = 0, batch_size: int = 0,
                   validation_split: Optional[float] = None, metrics: Sequence[str] = (), seed: int = 0,
                   steps_per_epoch: int = 0, display_name: str = "", request_id: Optional[str] = None,
                   workers: int = 0, timeout: Optional[float] = None) -> Job:
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
            workers: Worker processes training this one model together
                (``MultiWorkerMirroredStrategy``; classifiers only); 0 for 1.
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
        request = create_job_request(
            model, dataset, loss=loss, loss_params=loss_params, model_params=model_params, optimizer=optimizer,
            learning_rate=learning_rate, optimizer_params=optimizer_params, epochs=epochs, batch_size=batch_size,
            validation_split=validation_split, metrics=metrics, seed=seed, steps_per_epoch=steps_per_epoch,
            display_name=display_name, request_id=request_id, workers=workers)
        return Job.from_proto(self._training.CreateJob(request, **self._call_args(timeout)))

    @translate_errors
    def get_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """The job's current state (``job`` is a Job, ``jobs/{id}`` or an id)."""
        return Job.from_proto(self._training.GetJob(pb.GetJobRequest(name=job_name(job)),
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
        pages = JobPages(states, page_size, limit)
        while (request := pages.request()) is not None:
            pages.add(self._training.ListJobs(request, **self._call_args(timeout)))
        return pages.jobs

    @translate_errors
    def cancel_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """Cancels a queued or running job (best effort); returns it, normally ``cancelled``.

        Raises:
            LossdError: FAILED_PRECONDITION (JOB_ALREADY_FINISHED) for a finished job.
        """
        return Job.from_proto(self._training.CancelJob(pb.CancelJobRequest(name=job_name(job)),
                                                       **self._call_args(timeout)))

    @translate_errors
    def watch(self, job: "Job | str", *, after_sequence: int = 0, timeout: Optional[float] = None
              ) -> Iterator[JobEvent]:
        """Yields the job's events from the first (or after ``after_sequence``),
        then live ones, until the job ends."""
        for message in self._training.WatchJob(watch_request(job, after_sequence), **self._call_args(timeout)):
            yield JobEvent.from_proto(message)

    def wait(self, job: "Job | str", *, progress: bool = True, file: Optional[TextIO] = None,
             timeout: Optional[float] = None) -> Job:
        """Waits for the job to end, optionally drawing a progress bar
        (epoch, loss, examples/s, ETA) on ``file`` (stderr by default).

        Returns:
            The finished Job; check ``job.state`` and ``job.error``.
        """
        waiter = Waiter(progress, file, timeout)
        while True:
            try:
                for event in self.watch(job, after_sequence=waiter.last, timeout=waiter.remaining()):
                    waiter.update(event)
            except LossdError as error:
                time.sleep(waiter.retry_after(error))
                continue
            result = self.get_job(job)
            if result.done:
                return result

    @translate_errors
    def upload_dataset(self, path: "str | os.PathLike", name: Optional[str] = None, *, replace: bool = False,
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES, timeout: Optional[float] = None) -> Dataset:
        """Uploads an ``.npz`` (``x``, ``y``) or a zip/tar of one folder per class of images.

        Args:
            path: The file; its suffix gives the format.
            name: The dataset's name; the file name without suffix when None.
            replace: Overwrite an uploaded dataset of the same name. Without
                it, a name already taken fails with ALREADY_EXISTS
                (reason ``DATASET_EXISTS``).
        """
        requests = upload_requests(path, name, chunk_bytes, replace)
        return Dataset.from_proto(self._training.UploadDataset(requests, **self._call_args(timeout)))

    @translate_errors
    def list_datasets(self, *, timeout: Optional[float] = None) -> list[Dataset]:
        """Every dataset the server can train on."""
        return datasets(self._training.ListDatasets(pb.ListDatasetsRequest(), **self._call_args(timeout)))

    @translate_errors
    def delete_dataset(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Deletes an uploaded dataset and frees its space on the server.

        Raises:
            LossdError: NOT_FOUND (``DATASET_NOT_FOUND``) for an unknown name;
                FAILED_PRECONDITION (``DATASET_IN_USE``, the job in
                ``metadata["job"]``) while a queued or running job trains on it;
                INVALID_ARGUMENT (``DATASET_NOT_DELETABLE``) for a built-in or
                folder dataset.
        """
        self._training.DeleteDataset(pb.DeleteDatasetRequest(name=name), **self._call_args(timeout))

    @translate_errors
    def download(self, job: "Job | str", dest: "str | os.PathLike" = ".", *, artifact: str = "model",
                 timeout: Optional[float] = None) -> pathlib.Path:
        """Downloads an artifact: ``model`` (.keras), ``history`` (JSON) or
        ``tensorboard`` (.tar.gz of the logs).

        Args:
            dest: A folder (the server's file name is used) or a file path.

        Returns:
            The written file's path.
        """
        request = download_request(job, artifact)
        with ArtifactFile(dest) as out:
            for chunk in self._training.DownloadArtifact(request, **self._call_args(timeout)):
                out.write(chunk)
        return out.path

    @translate_errors
    def predict(self, job: "Job | str", images, *, timeout: Optional[float] = None) -> np.ndarray:
        """Class probabilities (N x classes, rows summing to 1) from a trained classifier.

        Args:
            images: N x H x W or N x H x W x C, uint8 in [0, 255] or floats in [0, 1].
        """
        return probabilities(self._training.Predict(predict_request(job, images), **self._call_args(timeout)))

    @translate_errors
    def generate(self, job: "Job | str", n: int, *, seed: int = 0, prompt: str = "", steps: int = 0,
                 guidance: Any = None, guidance_scale: float = 0.0, init_images=None, init_weight: float = 0.0,
                 classifier: "Job | str | None" = None, timeout: Optional[float] = None) -> np.ndarray:
        """``n`` new images (float32, N x H x W x C in [0, 1]) from a trained generator.

        Args:
            seed: Seed of the samples; 0 for a random one.
            prompt: The class to generate, by name (``diffusion`` jobs); empty
                for every class in turn.
            steps: Sampling steps of a diffusion model; 0 for 50 (or its timesteps if fewer).
            guidance: A loss (name, dict or composite, as ``evaluate`` takes)
                whose gradient steers each step. Its terms read ``y_pred``
                (the images), ``y_true`` (``init_images``), ``classifier``
                (the classifier job's probabilities) and ``label``.
            guidance_scale: The step along the guidance gradient; 0 means 1.
            init_images: Images to stay near (N or 1 x H x W x C).
            init_weight: Adds ``init_weight / 2 * mse(init_images, images)`` to the guidance.
            classifier: A trained classifier job: its crossentropy for the
                prompted class guides the samples unless ``guidance`` says otherwise.
        """
        response = self._training.Generate(
            generate_request(job, n, seed=seed, prompt=prompt, steps=steps, guidance=guidance,
                             guidance_scale=guidance_scale, init_images=init_images, init_weight=init_weight,
                             classifier=classifier), **self._call_args(timeout))
        return generated_images(response)

    @translate_errors
    def generate_stream(self, job: "Job | str", n: int, *, seed: int = 0, prompt: str = "", steps: int = 0,
                        guidance: Any = None, guidance_scale: float = 0.0, init_images=None,
                        init_weight: float = 0.0, classifier: "Job | str | None" = None,
                        timeout: Optional[float] = None) -> Iterator[GenerateProgress]:
        """Generates as ``generate`` does (same arguments, errors and images),
        yielding a ``GenerateProgress`` after each sampling step; the last
        one holds the images. Closing the iterator early (``break``) cancels
        the call, and the server stops sampling at its next step.
        """
        request = generate_request(job, n, seed=seed, prompt=prompt, steps=steps, guidance=guidance,
                                   guidance_scale=guidance_scale, init_images=init_images, init_weight=init_weight,
                                   classifier=classifier)
        call = self._training.GenerateStream(request, **self._call_args(timeout))
        merged = GenerateSteps()
        try:
            for message in call:
                item = merged.add(message)
                if item is not None:
                    yield item
        finally:
            call.cancel()  # no-op once the stream ended; frees the server's thread when the caller stopped early


class AsyncTrainingMixin(_TrainingStub):
    """Training-job methods of ``lossd.aio.Client``: those of ``lossd.Client``
    as coroutines and async generators."""

    @translate_errors_async
    async def create_job(self, model: str = "cnn", dataset: str = "digits", *, loss: Any = None,
                         loss_params: Optional[Mapping[str, Any]] = None,
                         model_params: Optional[Mapping[str, Any]] = None, optimizer: str = "adam",
                         learning_rate: Optional[float] = None, optimizer_params: Optional[Mapping[str, Any]] = None,
                         epochs: int = 0, batch_size: int = 0, validation_split: Optional[float] = None,
                         metrics: Sequence[str] = (), seed: int = 0, steps_per_epoch: int = 0,
                         display_name: str = "", request_id: Optional[str] = None, workers: int = 0,
                         timeout: Optional[float] = None) -> Job:
        """Refer to ``lossd.Client.create_job``."""
        request = create_job_request(
            model, dataset, loss=loss, loss_params=loss_params, model_params=model_params, optimizer=optimizer,
            learning_rate=learning_rate, optimizer_params=optimizer_params, epochs=epochs, batch_size=batch_size,
            validation_split=validation_split, metrics=metrics, seed=seed, steps_per_epoch=steps_per_epoch,
            display_name=display_name, request_id=request_id, workers=workers)
        return Job.from_proto(await self._training.CreateJob(request, **self._call_args(timeout)))

    @translate_errors_async
    async def get_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """Refer to ``lossd.Client.get_job``."""
        return Job.from_proto(await self._training.GetJob(pb.GetJobRequest(name=job_name(job)),
                                                          **self._call_args(timeout)))

    @translate_errors_async
    async def list_jobs(self, states: Iterable[str] = (), *, page_size: int = 100, limit: Optional[int] = None,
                        timeout: Optional[float] = None) -> list[Job]:
        """Refer to ``lossd.Client.list_jobs``."""
        pages = JobPages(states, page_size, limit)
        while (request := pages.request()) is not None:
            pages.add(await self._training.ListJobs(request, **self._call_args(timeout)))
        return pages.jobs

    @translate_errors_async
    async def cancel_job(self, job: "Job | str", *, timeout: Optional[float] = None) -> Job:
        """Refer to ``lossd.Client.cancel_job``."""
        return Job.from_proto(await self._training.CancelJob(pb.CancelJobRequest(name=job_name(job)),
                                                             **self._call_args(timeout)))

    @translate_errors_async
    async def watch(self, job: "Job | str", *, after_sequence: int = 0, timeout: Optional[float] = None
                    ) -> AsyncIterator[JobEvent]:
        """Refer to ``lossd.Client.watch``."""
        async for message in self._training.WatchJob(watch_request(job, after_sequence),
                                                     **self._call_args(timeout)):
            yield JobEvent.from_proto(message)

    async def wait(self, job: "Job | str", *, progress: bool = True, file: Optional[TextIO] = None,
                   timeout: Optional[float] = None) -> Job:
        """Refer to ``lossd.Client.wait``."""
        waiter = Waiter(progress, file, timeout)
        while True:
            try:
                async for event in self.watch(job, after_sequence=waiter.last, timeout=waiter.remaining()):
                    waiter.update(event)
            except LossdError as error:
                await asyncio.sleep(waiter.retry_after(error))
                continue
            result = await self.get_job(job)
            if result.done:
                return result

    @translate_errors_async
    async def upload_dataset(self, path: "str | os.PathLike", name: Optional[str] = None, *, replace: bool = False,
                             chunk_bytes: int = UPLOAD_CHUNK_BYTES, timeout: Optional[float] = None) -> Dataset:
        """Refer to ``lossd.Client.upload_dataset``."""
        requests = upload_requests(path, name, chunk_bytes, replace)
        return Dataset.from_proto(await self._training.UploadDataset(requests, **self._call_args(timeout)))

    @translate_errors_async
    async def list_datasets(self, *, timeout: Optional[float] = None) -> list[Dataset]:
        """Refer to ``lossd.Client.list_datasets``."""
        return datasets(await self._training.ListDatasets(pb.ListDatasetsRequest(), **self._call_args(timeout)))

    @translate_errors_async
    async def delete_dataset(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Refer to ``lossd.Client.delete_dataset``."""
        await self._training.DeleteDataset(pb.DeleteDatasetRequest(name=name), **self._call_args(timeout))

    @translate_errors_async
    async def download(self, job: "Job | str", dest: "str | os.PathLike" = ".", *, artifact: str = "model",
                       timeout: Optional[float] = None) -> pathlib.Path:
        """Refer to ``lossd.Client.download``."""
        request = download_request(job, artifact)
        with ArtifactFile(dest) as out:
            async for chunk in self._training.DownloadArtifact(request, **self._call_args(timeout)):
                out.write(chunk)
        return out.path

    @translate_errors_async
    async def predict(self, job: "Job | str", images, *, timeout: Optional[float] = None) -> np.ndarray:
        """Refer to ``lossd.Client.predict``."""
        return probabilities(await self._training.Predict(predict_request(job, images),
                                                          **self._call_args(timeout)))

    @translate_errors_async
    async def generate(self, job: "Job | str", n: int, *, seed: int = 0, prompt: str = "", steps: int = 0,
                       guidance: Any = None, guidance_scale: float = 0.0, init_images=None, init_weight: float = 0.0,
                       classifier: "Job | str | None" = None, timeout: Optional[float] = None) -> np.ndarray:
        """Refer to ``lossd.Client.generate``."""
        response = await self._training.Generate(
            generate_request(job, n, seed=seed, prompt=prompt, steps=steps, guidance=guidance,
                             guidance_scale=guidance_scale, init_images=init_images, init_weight=init_weight,
                             classifier=classifier), **self._call_args(timeout))
        return generated_images(response)

    @translate_errors_async
    async def generate_stream(self, job: "Job | str", n: int, *, seed: int = 0, prompt: str = "", steps: int = 0,
                              guidance: Any = None, guidance_scale: float = 0.0, init_images=None,
                              init_weight: float = 0.0, classifier: "Job | str | None" = None,
                              timeout: Optional[float] = None) -> AsyncIterator[GenerateProgress]:
        """Refer to ``lossd.Client.generate_stream``."""
        request = generate_request(job, n, seed=seed, prompt=prompt, steps=steps, guidance=guidance,
                                   guidance_scale=guidance_scale, init_images=init_images, init_weight=init_weight,
                                   classifier=classifier)
        call = self._training.GenerateStream(request, **self._call_args(timeout))
        merged = GenerateSteps()
        try:
            async for message in call:
                item = merged.add(message)
                if item is not None:
                    yield item
        finally:
            call.cancel()


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
