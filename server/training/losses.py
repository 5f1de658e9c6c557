"""Training losses: a LossSpec (dict form) to a Keras loss, and the checks
that a loss suits a model and its labels, run at job-creation time."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from lossd_server.errors import InvalidArgument
from lossd_server.losses import SHAPES_SAME, SHAPES_SPARSE, LossRegistry, resolve_parameters
from lossd_server.training.models import CLASSIFIER, GENERATOR

DEFAULT_CLASSIFIER_LOSS = "sparse_categorical_crossentropy"


def _check_form(spec: Mapping[str, Any]) -> None:
    if spec.get("terms") or spec.get("expression"):
        # TODO(lead): composite and expression losses, through the evaluator's plans.
        raise InvalidArgument(
            "Composite and expression losses are not supported for training yet. Expected a registered loss "
            "by name, such as {\"name\": \"sparse_categorical_crossentropy\"}.",
            reason="UNSUPPORTED_TRAINING_LOSS")
    if not spec.get("name"):
        raise InvalidArgument("Invalid loss. Expected a registered loss name. Received: an empty name.",
                              reason="UNKNOWN_LOSS")


def resolve_training_loss(spec: Optional[Mapping[str, Any]], registry: LossRegistry, model_kind: str
                          ) -> Optional[dict]:
    """Checks a job's loss against the model; returns its canonical form.

    Classifiers are trained on integer class labels, so they need a loss that
    takes class indices (``sparse_categorical_crossentropy``...); a loss that
    expects one-hot targets of the output's shape is refused here rather
    than failing in the job. A generator's loss compares pixels with pixels
    and becomes its reconstruction term.

    Args:
        spec: ``{"name": ..., "params": {...}}``, or empty for the model's default.
        registry: Where loss names resolve.
        model_kind: ``classifier`` or ``generator``.

    Returns:
        ``{"name": canonical, "params": {all parameters}}``, or None for a
        generator's own default loss.
    """
    if not spec or not any(spec.get(k) for k in ("name", "expression", "terms")):
        if model_kind == GENERATOR:
            return None
        spec = {"name": DEFAULT_CLASSIFIER_LOSS}
    _check_form(spec)
    entry = registry.get(spec["name"])
    params = resolve_parameters(entry, spec.get("params"))
    if model_kind == CLASSIFIER and entry.shapes != SHAPES_SPARSE:
        raise InvalidArgument(
            f"Loss `{entry.name}` does not suit a classifier trained on integer class labels: it expects "
            "targets of the model output's shape [batch, classes] (one-hot), and the dataset has labels of "
            "shape [batch]. Expected a loss that takes class indices, such as "
            "`sparse_categorical_crossentropy`.", reason="INCOMPATIBLE_LOSS", metadata={"loss": entry.name})
    if model_kind == GENERATOR:
        if entry.shapes != SHAPES_SAME:
            raise InvalidArgument(
                f"Loss `{entry.name}` cannot be a generator's reconstruction loss. Expected a loss comparing "
                "images with images of the same shape, such as `binary_crossentropy` or `mse`.",
                reason="INCOMPATIBLE_LOSS", metadata={"loss": entry.name})
        if params.get("from_logits"):
            raise InvalidArgument(
                f"Loss `{entry.name}` with from_logits=true does not suit the vae, whose decoder outputs "
                "pixels in [0, 1]. Expected from_logits=false.", reason="INCOMPATIBLE_LOSS",
                metadata={"loss": entry.name})
    return {"name": entry.name, "params": params}


def build_training_loss(spec: Mapping[str, Any], registry: LossRegistry, reduction: str = "sum_over_batch_size"):
    """Builds the Keras loss of a LossSpec dict ``{"name", "params"}``.

    Args:
        spec: A registered loss by name with its parameters (Keras names).
        registry: Where the name resolves.
        reduction: ``sum_over_batch_size`` (Keras's default, for classifiers)
            or ``none`` (per-pixel values, for the VAE's reconstruction term).

    Returns:
        A ``keras.losses.Loss`` computing in float32.

    Raises:
        InvalidArgument: composite or expression losses (not supported for
            training yet), an unknown loss or bad parameters.
    """
    _check_form(spec)
    entry = registry.get(spec["name"])
    return entry.build(resolve_parameters(entry, spec.get("params")), reduction, "float32")
