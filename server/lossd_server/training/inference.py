"""Using trained models: Predict (classifiers) and Generate (generators).

Models are loaded from their job folders on first use (without compiling:
inference needs no loss) and kept in a small least-recently-used cache.
With the training worker and ``evaluation.backend``, this is the only part
of the server that runs TensorFlow.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from lossd_server.errors import FailedPrecondition, InvalidArgument
from lossd_server.training import models
from lossd_server.training.artifacts import Artifacts
from lossd_server.training.store import SUCCEEDED, JobRecord

MAX_PREDICT = 65_536   # images per Predict
MAX_GENERATE = 1024    # images per Generate
PREDICT_BATCH = 1024   # images per model call
MODEL_CACHE_SIZE = 4   # trained models kept loaded


class Inference:
    """Runs trained models, loading each once (at most ``cache_size`` kept).

    Args:
        artifacts: Where trained models are.
        cache_size: Most models kept loaded; the least recently used goes.
    """

    def __init__(self, artifacts: Artifacts, cache_size: int = MODEL_CACHE_SIZE):
        self.artifacts = artifacts
        self.cache_size = cache_size
        self._models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def predict(self, job: JobRecord, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Class probabilities (float32, N x classes) for images of the trained
        shape (uint8 in [0, 255] or float in [0, 1]), and the class names.

        Raises:
            FailedPrecondition: the job has not succeeded, or trained a generator.
            InvalidArgument: images of another shape or dtype, or holding NaN/Inf.
        """
        _check_trained(job, models.CLASSIFIER)
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
        model = self._model(job)
        out = np.concatenate([np.asarray(model(x[i:i + PREDICT_BATCH], training=False))
                              for i in range(0, len(x), PREDICT_BATCH)])
        if job.runtime.get("logits"):
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out = out / out.sum(axis=1, keepdims=True)
        return out.astype(np.float32), list(job.runtime["class_names"])

    def generate(self, job: JobRecord, count: int, seed: int = 0) -> np.ndarray:
        """``count`` new images (float32, N x H x W x C in [0, 1]) from a trained generator.

        Raises:
            InvalidArgument: a count outside [1, MAX_GENERATE] (BAD_COUNT).
            FailedPrecondition: the job has not succeeded, or trained a classifier.
        """
        if not 1 <= count <= MAX_GENERATE:
            raise InvalidArgument(f"Invalid count. Expected 1 to {MAX_GENERATE}. Received: {count}.",
                                  reason="BAD_COUNT")
        _check_trained(job, models.GENERATOR)
        images = np.asarray(self._model(job).generate(count, seed=seed or None))
        return np.clip(images, 0.0, 1.0).astype(np.float32)

    def _model(self, job: JobRecord):
        with self._lock:
            model = self._models.get(job.id)
            if model is None:
                model = models.load_model(self.artifacts.model_path(job.id))
                self._models[job.id] = model
                while len(self._models) > self.cache_size:
                    self._models.popitem(last=False)
            self._models.move_to_end(job.id)
        return model


def _check_trained(job: JobRecord, kind: str) -> None:
    if job.state != SUCCEEDED:
        raise FailedPrecondition(f"Job `jobs/{job.id}` has no trained model (state {job.state}). Expected a "
                                 "job that succeeded.", reason="JOB_NOT_SUCCEEDED", metadata={"state": job.state})
    if job.model_kind != kind:
        raise FailedPrecondition(
            f"Job `jobs/{job.id}` trained a {job.model_kind} ({job.spec['model']['preset']}). Expected a "
            f"{kind}: use {'Generate' if kind == models.CLASSIFIER else 'Predict'} instead.",
            reason="WRONG_MODEL_KIND", metadata={"model_kind": job.model_kind})
