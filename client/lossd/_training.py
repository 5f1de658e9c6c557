"""Training jobs from the client: create, watch, wait, cancel, download and
use trained models. The methods are mixed into ``lossd.Client``
(``TrainingMixin``) and ``lossd.aio.Client`` (``AsyncTrainingMixin``), which
differ only in how they wait for the stub; the requests and answers they
send and read are built in ``lossd._training_requests``, the types they
return are in ``lossd._jobs``. Needs no TensorFlow."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import grpc
import numpy as np

from lossd._errors import LossdError, translate_errors, translate_errors_async
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc
from lossd._jobs import Dataset, GenerateProgress, Job, JobEvent, UPLOAD_CHUNK_BYTES
from lossd._training_requests import (ArtifactFile, GenerateSteps, JobPages, Waiter, create_job_request, datasets,
                                      download_request, generate_request, generated_images, job_name,
                                      predict_request, probabilities, upload_requests, watch_request)


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
            learning_rate: None for the preset's default with Adam (``diffusion``: 2e-3), else the
                optimizer's own.
            optimizer_params: Other optimizer parameters, e.g. ``{"momentum": 0.9}``.
            epochs: 0 for the preset's default (10; ``vae`` 60, ``diffusion`` 100), chosen so the
                default job on digits gives a usable model.
            batch_size: 0 for the preset's default (32; ``diffusion`` 64).
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
