"""The training service's requests and answers, built once here for the sync
and asyncio clients (``lossd._training``'s two mixins), which differ only in
how they wait for the stub."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import grpc
import numpy as np

from lossd import wire
from lossd._errors import LossdError, client_error
from lossd.v1 import training_service_pb2 as pb
from lossd._jobs import ARTIFACTS, Dataset, GenerateProgress, Job, JobEvent, state_name
from lossd._progress import ProgressBar

# A dataset file's suffix -> its format on the wire.
DATASET_FORMATS = {".npz": pb.DatasetHeader.FORMAT_NPZ, ".zip": pb.DatasetHeader.FORMAT_ZIP,
                   ".tar": pb.DatasetHeader.FORMAT_TAR, ".tgz": pb.DatasetHeader.FORMAT_TAR,
                   ".tar.gz": pb.DatasetHeader.FORMAT_TAR, ".tar.bz2": pb.DatasetHeader.FORMAT_TAR,
                   ".tar.xz": pb.DatasetHeader.FORMAT_TAR}


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
    names = [state_name(v) for v in pb.Job.State.values() if v != pb.Job.STATE_UNSPECIFIED]
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
    suffix = "".join(path.suffixes[-2:]) if "".join(path.suffixes[-2:]) in DATASET_FORMATS else path.suffix
    fmt = DATASET_FORMATS.get(suffix.lower())
    if fmt is None:
        raise client_error(f"Cannot tell the dataset format of {path.name}. Expected a file ending in "
                           f"{', '.join(DATASET_FORMATS)}.")
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
