"""Using trained models: Predict (classifiers) and Generate (generators).

Models are loaded from their job folders on first use (without compiling:
inference needs no loss) and kept in a small least-recently-used cache.
With the training worker and ``evaluation.backend``, this is the only part
of the server that runs TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lossd_server.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from lossd_server.training import guidance, models
from lossd_server.training.artifacts import Artifacts
from lossd_server.training.kinds import CLASSIFIER, GENERATOR
from lossd_server.state.store import SUCCEEDED, JobRecord

MAX_PREDICT = 65_536   # images per Predict
MAX_GENERATE = 1024    # images per Generate
PREDICT_BATCH = 1024   # images per model call
MODEL_CACHE_SIZE = 4   # trained models kept loaded
DEFAULT_STEPS = 50     # diffusion sampling steps when a request leaves them 0 (at most the model's timesteps)
DEFAULT_MAX_PIXEL_STEPS = 1 << 25  # count x steps x image values (the max_generate_pixel_steps setting)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """What a Generate request asks of a class-conditioned (diffusion) model.

    Attributes:
        prompt: The class to generate, by name; empty for every class in turn.
        steps: Sampling steps; 0 for the default.
        guidance: The guidance LossSpec as a dict (``lossd.wire.spec_to_dict``), or None.
        guidance_scale: The step along the guidance gradient; 0 means 1.
        init_images: Images to stay near (as sent), or None.
        init_weight: Weight of the ``init_weight / 2 * mse`` term.
        classifier: The classifier job whose probabilities guidance reads, or None.
    """

    prompt: str = ""
    steps: int = 0
    guidance: Optional[Mapping[str, Any]] = None
    guidance_scale: float = 0.0
    init_images: Optional[np.ndarray] = None
    init_weight: float = 0.0
    classifier: Optional[JobRecord] = None

    def diffusion_fields(self) -> list[str]:
        """The fields set that only a diffusion model can honour."""
        return [name for name, value in (
            ("prompt", self.prompt), ("steps", self.steps), ("guidance", self.guidance),
            ("guidance_scale", self.guidance_scale), ("init_images", self.init_images is not None),
            ("init_weight", self.init_weight), ("classifier", self.classifier is not None)) if value]


@dataclasses.dataclass(frozen=True)
class GenerateProgress:
    """One finished step of a generation, as ``Inference.generate_steps`` yields it.

    Attributes:
        step: Steps done, from 1.
        steps: Steps the generation takes (1 for a model that samples in one pass).
        elapsed_seconds: Seconds since ``generate_steps`` was called.
        eta_seconds: Estimated seconds left, from the mean time of the steps done.
        images: float32 N x H x W x C in [0, 1] on the last step; None before.
    """

    step: int
    steps: int
    elapsed_seconds: float
    eta_seconds: float
    images: Optional[np.ndarray] = None


class Inference:
    """Runs trained models, loading each once (at most ``cache_size`` kept).

    Args:
        artifacts: Where trained models are.
        cache_size: Most models kept loaded; the least recently used goes.
    """

    def __init__(self, artifacts: Artifacts, cache_size: int = MODEL_CACHE_SIZE, *, evaluator=None,
                 max_pixel_steps: int = DEFAULT_MAX_PIXEL_STEPS, metrics=None):
        self.artifacts = artifacts
        self.metrics = metrics  # counts generation steps, when set
        self.cache_size = cache_size
        self.evaluator = evaluator  # guidance losses run through Evaluate's compiled programs
        self.max_pixel_steps = max_pixel_steps
        self._models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def predict(self, job: JobRecord, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Class probabilities (float32, N x classes) for images of the trained
        shape (uint8 in [0, 255] or float in [0, 1]), and the class names.

        Raises:
            FailedPrecondition: the job has not succeeded, or trained a generator.
            InvalidArgument: images of another shape or dtype, or holding NaN/Inf.
        """
        _check_trained(job, CLASSIFIER)
        x = _images(images, tuple(job.runtime["image_shape"]), "Predict", MAX_PREDICT)
        model = self._model(job)
        out = np.concatenate([np.asarray(model(x[i:i + PREDICT_BATCH], training=False))
                              for i in range(0, len(x), PREDICT_BATCH)])
        if job.runtime.get("logits"):
            out = _softmax(out)
        return out.astype(np.float32), list(job.runtime["class_names"])

    def generate(self, job: JobRecord, count: int, seed: int = 0, options: GenerateOptions = GenerateOptions(),
                 *, active: Callable[[], bool] = lambda: True) -> np.ndarray:
        """``count`` new images (float32, N x H x W x C in [0, 1]) from a
        trained generator: ``generate_steps`` run to the end.

        Args:
            active: Asked before each step after the first; False stops
                sampling (the call was cancelled or its deadline passed).

        Raises:
            DeadlineExceeded: ``active()`` said False (CALL_ENDED).
            InvalidArgument, FailedPrecondition: as ``generate_steps``.
        """
        for progress in self.generate_steps(job, count, seed, options):
            if progress.images is not None:
                return progress.images
            if not active():
                raise DeadlineExceeded(
                    f"The call ended after {progress.step} of {progress.steps} generation steps. Expected a "
                    "call still waiting for its images. Received: a cancelled call or one past its deadline.",
                    reason="CALL_ENDED")
        raise AssertionError("a generation ended without images")  # pragma: no cover - sample_steps ends with them

    def generate_steps(self, job: JobRecord, count: int, seed: int = 0,
                       options: GenerateOptions = GenerateOptions()) -> Iterator[GenerateProgress]:
        """New images from a trained generator, step by step: the one path of
        Generate and GenerateStream.

        A diffusion model generates the prompted class (every class in turn
        without a prompt) with ``options.steps`` DDIM steps, each steered by
        the guidance loss's gradient when the options ask for guidance
        (``lossd_server.training.guidance``); a ``vae`` samples in one step.
        Every check runs here, before the iterator is returned; the steps
        run as it is iterated, so a caller that stops iterating stops them.

        Returns:
            An iterator of ``GenerateProgress``, one per step; the last holds
            the ``count`` images (float32, N x H x W x C in [0, 1]).

        Raises:
            InvalidArgument: a count outside [1, MAX_GENERATE] (BAD_COUNT);
                an unknown class (UNKNOWN_CLASS), steps out of range
                (BAD_STEPS), work over ``max_pixel_steps``
                (GENERATION_TOO_LARGE), diffusion options for another model
                (NOT_CONDITIONAL), bad init images or a bad guidance loss.
            FailedPrecondition: the job (or the classifier job) has not
                succeeded, or trained the other kind of model.
        """
        start = time.monotonic()
        if not 1 <= count <= MAX_GENERATE:
            raise InvalidArgument(f"Invalid count. Expected 1 to {MAX_GENERATE}. Received: {count}.",
                                  reason="BAD_COUNT")
        _check_trained(job, GENERATOR)
        preset = job.spec["model"]["preset"]
        if preset != "diffusion":
            if options.diffusion_fields():
                raise InvalidArgument(
                    f"Model `{preset}` of job `jobs/{job.id}` is not conditioned on a class and takes no prompt, "
                    "steps or guidance. Expected only count and seed (or a `diffusion` job). Received: "
                    + ", ".join(options.diffusion_fields()) + ".",
                    reason="NOT_CONDITIONAL", metadata={"model": preset})
            model = self._model(job)

            def one_pass():
                images = np.asarray(model.generate(count, seed=seed or None))
                yield 1, 1, np.clip(images, 0.0, 1.0).astype(np.float32)

            return self._timed(one_pass(), start)
        return self._timed(self._diffuse(job, count, seed, options), start)

    def _timed(self, steps: Iterator[tuple], start: float) -> Iterator[GenerateProgress]:
        """``(step, steps, images)`` as GenerateProgress, timed (and counted in metrics)."""
        for step, total, images in steps:
            elapsed = time.monotonic() - start
            if self.metrics is not None:
                self.metrics.generation_step()
            yield GenerateProgress(step, total, elapsed, elapsed / step * (total - step), images)

    def _diffuse(self, job: JobRecord, count: int, seed: int, options: GenerateOptions) -> Iterator[tuple]:
        class_names = list(job.runtime["class_names"])
        timesteps = int(job.spec["model"]["params"]["timesteps"])
        shape = tuple(job.runtime["image_shape"])
        if options.prompt:
            if options.prompt not in class_names:
                shown = class_names[:20] + (["..."] if len(class_names) > 20 else [])
                raise InvalidArgument(
                    f"Unknown class {options.prompt[:80]!r} for job `jobs/{job.id}`. Expected one of its "
                    f"classes: {shown}. Received: prompt={options.prompt[:80]!r}.", reason="UNKNOWN_CLASS",
                    metadata={"prompt": options.prompt[:80]})
            classes = np.full((count,), class_names.index(options.prompt), np.int32)
        else:
            classes = (np.arange(count) % len(class_names)).astype(np.int32)
        steps = options.steps or min(DEFAULT_STEPS, timesteps)
        if not 1 <= steps <= timesteps:
            raise InvalidArgument(
                f"Invalid steps. Expected 1 to {timesteps} (the model's timesteps). Received: {options.steps}.",
                reason="BAD_STEPS", metadata={"limit": str(timesteps)})
        work = count * steps * int(np.prod(shape))
        if work > self.max_pixel_steps:
            raise InvalidArgument(
                f"Generation too large. Expected count x steps x image values at most {self.max_pixel_steps} "
                f"(max_generate_pixel_steps). Received: {count} x {steps} x {int(np.prod(shape))} = {work}.",
                reason="GENERATION_TOO_LARGE", metadata={"limit": str(self.max_pixel_steps)})
        guide = self._guide(job, classes, options, shape, count)
        scale = options.guidance_scale or 1.0
        if not np.isfinite(scale):
            raise InvalidArgument(f"Invalid guidance_scale. Expected a finite number. Received: {scale}.",
                                  reason="BAD_GUIDANCE")
        return self._model(job).sample_steps(classes, steps, seed=seed or None, guide=guide, guidance_scale=scale)

    def _guide(self, job: JobRecord, classes: np.ndarray, options: GenerateOptions, shape: tuple, count: int):
        """The guidance function of a request, or None; every check before a step runs."""
        if options.init_weight < 0 or not np.isfinite(options.init_weight):
            raise InvalidArgument(f"Invalid init_weight. Expected a finite number >= 0. Received: "
                                  f"{options.init_weight}.", reason="BAD_GUIDANCE")
        init = None
        if options.init_images is not None:
            init = _images(options.init_images, shape, "init_images", count)
            if len(init) not in (1, count):
                raise InvalidArgument(f"init_images: one image per sample or one for all. Expected 1 or "
                                      f"count={count} images. Received: {len(init)}.", reason="SHAPE_MISMATCH")
        if self.evaluator is None:
            if options.guidance or options.init_weight or options.classifier is not None:
                raise FailedPrecondition("This server has no evaluator for guidance losses. Expected a server "
                                         "started by lossd serve.", reason="GUIDANCE_UNAVAILABLE")
            return None
        plans = guidance.plan_guidance(self.evaluator.planner, options.guidance, init_weight=options.init_weight,
                                       has_classifier=options.classifier is not None, has_init=init is not None)
        if plans is None:
            return None
        labels, classifier = classes, None
        if options.classifier is not None:
            cjob = options.classifier
            _check_trained(cjob, CLASSIFIER)
            if tuple(cjob.runtime["image_shape"]) != shape:
                raise InvalidArgument(
                    f"Classifier `jobs/{cjob.id}` was trained on images of shape {list(cjob.runtime['image_shape'])}."
                    f" Expected a classifier of this model's images, {list(shape)}.", reason="SHAPE_MISMATCH")
            names, known = list(job.runtime["class_names"]), list(cjob.runtime["class_names"])
            missing = sorted({names[c] for c in classes} - set(known))
            if missing:
                raise InvalidArgument(
                    f"Class {missing[0]!r} is not among the classes of classifier `jobs/{cjob.id}`. Expected a "
                    f"class it knows ({known[:20]}). Received: {missing[0]!r}.", reason="UNKNOWN_CLASS")
            labels = np.array([known.index(names[c]) for c in classes], np.int32)
            classifier = self._classifier(cjob)
        return guidance.guide_function(plans, self.evaluator, init=init, labels=labels, classifier=classifier)

    def _classifier(self, job: JobRecord):
        """``(probabilities, input_gradient)`` functions of a trained classifier."""
        from lossd_server.evaluation import backend

        model, logits = self._model(job), bool(job.runtime.get("logits"))

        def probabilities(images: np.ndarray) -> np.ndarray:
            out = np.asarray(model(images, training=False), dtype=np.float32)
            return _softmax(out) if logits else out

        def back(images: np.ndarray, d_probabilities: np.ndarray) -> np.ndarray:
            return backend.input_gradient(model, images, d_probabilities, softmax=logits)

        return probabilities, back

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
            f"{kind}: use {'Generate' if kind == CLASSIFIER else 'Predict'} instead.",
            reason="WRONG_MODEL_KIND", metadata={"model_kind": job.model_kind})


def _softmax(logits: np.ndarray) -> np.ndarray:
    out = np.exp(logits - logits.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def _images(images: np.ndarray, shape: tuple, what: str, max_count: int) -> np.ndarray:
    """Images of the trained shape (uint8 in [0, 255] or float in [0, 1]) as
    float32 N x H x W x C.

    Raises:
        InvalidArgument: another shape (SHAPE_MISMATCH), another dtype
            (UNSUPPORTED_DTYPE), or NaN/Inf (BAD_TENSOR).
    """
    x = images[..., None] if images.ndim == 3 and shape[-1] == 1 else images
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or not 1 <= x.shape[0] <= max_count:
        raise InvalidArgument(
            f"{what}: images as the model was trained. Expected shape [N, {', '.join(map(str, shape))}] (the "
            f"channel axis may be left out for grayscale) with 1 <= N <= {max_count}. "
            f"Received: shape {list(images.shape)}.", reason="SHAPE_MISMATCH")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InvalidArgument(f"{what}: images hold NaN or Inf. Expected pixels in [0, 1].",
                                  reason="BAD_TENSOR")
        return x
    raise InvalidArgument(f"{what}: expected uint8 or float images. Received: {x.dtype}.",
                          reason="UNSUPPORTED_DTYPE")
