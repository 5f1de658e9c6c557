"""Job folders and the artifacts clients download from them.

Each job has a folder ``<artifacts root>/jobs/<id>/`` (``artifacts_root``) that its process writes (see
``loop`` for the files). Three of them can be downloaded, in chunks: the
trained model (``model.keras``), the training history (``history.json``; for
a running job, the history of its last checkpoint) and the TensorBoard logs,
packed into a ``.tar.gz`` on request.
"""

from __future__ import annotations

import io
import json
import pathlib
import tarfile
from typing import Iterator

from lossd_server.errors import FailedPrecondition, InvalidArgument
from lossd_server.training import loop
from lossd_server.state.store import JobRecord

ARTIFACTS = ("model", "history", "tensorboard")
CHUNK_BYTES = 1 << 20

# (filename, size in bytes, the content in chunks)
Download = tuple[str, int, Iterator[bytes]]


def artifacts_root(settings) -> pathlib.Path:
    """Where job folders and uploaded datasets live: ``settings.artifacts_dir``
    (storage every replica shares), or else the data directory."""
    return pathlib.Path(getattr(settings, "artifacts_dir", None) or settings.data_dir)


class Artifacts:
    """The job folders under ``jobs_dir``."""

    def __init__(self, jobs_dir: pathlib.Path):
        self.jobs_dir = pathlib.Path(jobs_dir)

    def job_dir(self, job_id: str) -> pathlib.Path:
        return self.jobs_dir / job_id

    def model_path(self, job_id: str) -> pathlib.Path:
        """Where a job's trained model is, once it succeeded."""
        return self.job_dir(job_id) / loop.MODEL_FILE

    def download(self, job: JobRecord, artifact: str) -> Download:
        """``(filename, size, chunks)`` of a job's artifact.

        Raises:
            InvalidArgument: an unknown artifact (BAD_ARTIFACT).
            FailedPrecondition: the artifact does not exist yet (ARTIFACT_NOT_READY).
        """
        job_dir = self.job_dir(job.id)
        if artifact == "model":
            return _file(job, self.model_path(job.id), f"{job.id}.keras")
        if artifact == "history":
            path = job_dir / loop.HISTORY_FILE
            if not path.exists():
                checkpoint = loop.read_checkpoint(job_dir)
                if checkpoint is not None:  # a running job's history so far
                    data = json.dumps(checkpoint["history"]).encode()
                    return f"{job.id}-history.json", len(data), iter([data])
            return _file(job, path, f"{job.id}-history.json")
        if artifact == "tensorboard":
            logs = job_dir / loop.LOGS_DIR
            if not logs.is_dir():
                raise _not_ready(job, artifact)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(logs, arcname=f"{job.id}-logs")
            data = buffer.getvalue()
            return (f"{job.id}-logs.tar.gz", len(data),
                    (data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)))
        raise InvalidArgument(f"Unknown artifact. Expected one of {list(ARTIFACTS)}. Received: {artifact!r}.",
                              reason="BAD_ARTIFACT")


def _not_ready(job: JobRecord, artifact: str) -> FailedPrecondition:
    return FailedPrecondition(f"Job `jobs/{job.id}` has no {artifact} artifact yet (state {job.state}). "
                              "Expected a job that succeeded.", reason="ARTIFACT_NOT_READY",
                              metadata={"state": job.state})


def _file(job: JobRecord, path: pathlib.Path, filename: str) -> Download:
    if not path.exists():
        raise _not_ready(job, path.name)
    size = path.stat().st_size

    def chunks():
        with open(path, "rb") as f:
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    return
                yield data

    return filename, size, chunks()
