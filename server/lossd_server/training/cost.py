"""The cost model of a training job: what it will cost, from its spec and
its dataset's facts alone, checked at CreateJob before the job is queued.

It reuses ``losses.cost.Cost`` (``work`` and ``memory``), as evaluation
does, with a job's own figures:

* ``work``, in multiply-adds: one example's forward pass through the model
  (``models.count_work``: its convolutions' and dense layers'
  multiply-adds) times ``TRAIN_PASSES`` (forward, and a backward pass that
  computes the gradients of both the activations and the weights: about
  twice the forward's) for every example the job trains on (epochs x steps
  per epoch x batch size), plus one forward pass over the validation
  examples each epoch. It is the "model size x dataset size x epochs" a
  user budgets with, counted in the unit accelerators are sold in.
* ``memory``, in bytes of float32: one batch's activations, kept from the
  forward pass for the backward pass and joined by their gradients
  (``ACTIVATIONS_LIVE`` x the values ``count_work`` counts, times the
  batch size), plus the weights with their gradients and two optimizer
  slots (``WEIGHT_COPIES`` x the parameters; Adam's two moments).

``TrainingLimits`` checks an estimate against ``max_training_cost`` and
``max_training_memory_bytes`` and refuses (RESOURCE_EXHAUSTED,
``TRAINING_COST_TOO_HIGH`` or ``TRAINING_MEMORY_TOO_HIGH``) what exceeds
them, with the estimate, the limit and the setting in ErrorInfo, as
``losses.cost.CostLimits`` does for one evaluation. Nothing here imports
Keras, TensorFlow or gRPC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

from lossd_server.errors import ResourceExhausted
from lossd_server.losses.cost import Cost
from lossd_server.training import models

# Forward plus backward: the backward pass multiplies each layer's kernel
# twice (gradient of its input and of its weights), so a training step is
# about three forward passes' multiply-adds.
TRAIN_PASSES = 3
# Values alive per activation the layers output: the value (kept for the
# backward pass), the value after its activation, pooling or normalization
# (counted once here), and its gradient.
ACTIVATIONS_LIVE = 3
# Copies of the weights a job holds: the weights, their gradients, and two
# optimizer slots (Adam's moments; SGD holds fewer).
WEIGHT_COPIES = 4
FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class JobShape:
    """What a job's cost depends on, from its normalized spec and dataset."""

    preset: str
    params: Mapping[str, Any]
    image_shape: Sequence[int]
    num_classes: int
    epochs: int
    steps_per_epoch: int  # batches a training epoch runs
    batch_size: int
    validation_examples: int


def estimate(job: JobShape) -> Cost:
    """The cost of training ``job``: ``work`` in multiply-adds, ``memory`` in bytes."""
    macs, values = models.count_work(job.preset, job.params, job.image_shape, job.num_classes)
    parameters = models.count_parameters(job.preset, job.params, job.image_shape, job.num_classes)
    trained = job.epochs * job.steps_per_epoch * job.batch_size
    validated = job.epochs * job.validation_examples
    work = float(macs) * (TRAIN_PASSES * trained + validated)
    memory = float(FLOAT32) * (ACTIVATIONS_LIVE * values * job.batch_size + WEIGHT_COPIES * parameters)
    return Cost(work, memory)


@dataclasses.dataclass(frozen=True)
class TrainingLimits:
    """The most one job may cost: ``max_cost`` multiply-adds and
    ``max_memory_bytes`` of activations and weights (None: unlimited)."""

    max_cost: Optional[float] = None
    max_memory_bytes: Optional[int] = None

    @classmethod
    def from_settings(cls, settings) -> "TrainingLimits":
        return cls(getattr(settings, "max_training_cost", None), getattr(settings, "max_training_memory_bytes", None))

    def check(self, job: JobShape) -> Cost:
        """Estimates ``job`` and refuses it when it exceeds a limit.

        Raises:
            ResourceExhausted: ``TRAINING_MEMORY_TOO_HIGH`` or
                ``TRAINING_COST_TOO_HIGH``, with the estimate, the limit and
                the setting in its metadata.
        """
        cost = estimate(job)
        over_work = self.max_cost is not None and cost.work > self.max_cost
        over_memory = self.max_memory_bytes is not None and cost.memory > self.max_memory_bytes
        if not (over_work or over_memory):
            return cost
        received = (f"model `{job.preset}` on images of shape {tuple(job.image_shape)}, batch_size={job.batch_size}, "
                    f"epochs={job.epochs} x {job.steps_per_epoch} steps")
        # Memory first: a job process that runs out of it dies, after its queue wait.
        if over_memory:
            raise ResourceExhausted(
                f"This job would hold about {cost.memory / 2 ** 20:,.0f} MiB of activations and weights. Expected "
                f"at most {self.max_memory_bytes / 2 ** 20:,.0f} MiB (the server's max_training_memory_bytes): use "
                f"a smaller batch_size or model. Received: {received}.", reason="TRAINING_MEMORY_TOO_HIGH",
                metadata=_metadata(job, cost.memory, self.max_memory_bytes, "LOSSD_MAX_TRAINING_MEMORY_BYTES"))
        raise ResourceExhausted(
            f"This job would cost about {cost.work:.3g} multiply-adds (docs/limits.md). Expected at most "
            f"{self.max_cost:.3g} (the server's max_training_cost): train fewer epochs or steps, a smaller "
            f"model, or on fewer images. Received: {received}.", reason="TRAINING_COST_TOO_HIGH",
            metadata=_metadata(job, cost.work, self.max_cost, "LOSSD_MAX_TRAINING_COST"))


def _metadata(job: JobShape, estimate_: float, limit: float, setting: str) -> dict[str, str]:
    return {"model": job.preset, "estimate": str(int(estimate_)), "limit": str(int(limit)), "setting": setting}


def steps_per_epoch(steps: int, train_examples: int, batch_size: int) -> int:
    """Batches one epoch runs: ``steps`` when set, else the whole training split."""
    return steps or math.ceil(train_examples / batch_size)
