"""Training losses: a LossSpec (dict form) to a Keras loss, and the checks
that a loss suits a model and its labels, run at job-creation time.

A job's loss may be any registered loss (Keras, lossd's built-ins, plugins,
registered expressions), an inline expression, or a composite of such terms
over ``y_true`` and ``y_pred``. At creation the spec is resolved into a
self-contained canonical form: a registered expression is copied in as its
expression text, so a job trains with the definition it was created with,
and its process needs no access to the server's loss store.

Label format: classifiers are trained on integer labels. A loss that takes
class indices (``sparse_categorical_crossentropy``...) gets them as they are;
an expression or plugin loss gets one-hot targets of the output's shape
``[batch, classes]``, which is what an expression over ``y_true * log(y_pred)``
needs. A Keras loss that expects one-hot targets (``categorical_crossentropy``)
is refused with a pointer to its sparse twin, as the issue asks.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import keras

from lossd_server.errors import InvalidArgument
from lossd_server.losses.registry import (REDUCTIONS, SHAPES_ANY, SHAPES_SAME, SHAPES_SPARSE, LossRegistry,
                                 resolve_parameters)
from lossd_server.training.models import CLASSIFIER, GENERATOR

DEFAULT_CLASSIFIER_LOSS = "sparse_categorical_crossentropy"
SPARSE, ONE_HOT = "sparse", "one_hot"
TRAINING_INPUTS = ("y_true", "y_pred")


def _incompatible(message: str, loss: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INCOMPATIBLE_LOSS", metadata={"loss": loss})


def _resolve_term(spec: Mapping[str, Any], registry: LossRegistry, where: str) -> tuple[dict, str]:
    """One named or expression loss -> (canonical dict, shape convention)."""
    from lossd_server.losses.custom import expression_entry

    name, expression = spec.get("name") or "", spec.get("expression") or ""
    if bool(name) == bool(expression):
        raise InvalidArgument(f"{where}: expected exactly one of `name` or `expression`. Received: "
                              + ("neither." if not name else "both."), reason="BAD_LOSS_SPEC")
    if expression:
        entry = expression_entry(expression, params=spec.get("params") or {}, inputs=TRAINING_INPUTS,
                                 where=f"{where} expression")
        params = resolve_parameters(entry, spec.get("params"))
        return {"expression": expression, "params": params, "label": "expression"}, SHAPES_ANY
    entry = registry.get(name)
    params = resolve_parameters(entry, spec.get("params"))
    if tuple(entry.inputs) != TRAINING_INPUTS:
        raise _incompatible(
            f"{where}: loss `{entry.name}` reads {list(entry.inputs)}; a training job feeds a loss the labels "
            "and the model's output only. Expected a loss of (y_true, y_pred).", entry.name)
    if entry.source == "expression":
        # Copied in: the job keeps this definition even if the loss is replaced or deleted later.
        return ({"expression": entry.expression, "params": params, "label": entry.name}, SHAPES_ANY)
    return {"name": entry.name, "params": params}, entry.shapes


def resolve_training_loss(spec: Optional[Mapping[str, Any]], registry: LossRegistry, model_kind: str
                          ) -> Optional[dict]:
    """Checks a job's loss against the model; returns its canonical form.

    Args:
        spec: A LossSpec dict (``name``/``expression`` + ``params``, or
            ``terms``), or empty for the model's default loss.
        registry: Where loss names resolve.
        model_kind: ``classifier`` or ``generator``.

    Returns:
        The canonical, self-contained spec (see the module docstring), or
        None for a generator's own default loss.

    Raises:
        InvalidArgument: unknown loss, bad parameters or expression, or a loss
            that cannot work with the model and its labels.
    """
    if not spec or not any(spec.get(k) for k in ("name", "expression", "terms")):
        if model_kind == GENERATOR:
            return None
        spec = {"name": DEFAULT_CLASSIFIER_LOSS}
    if spec.get("terms"):
        if spec.get("name") or spec.get("expression"):
            raise InvalidArgument("A composite loss sets `terms` only. Received: terms and a name or expression.",
                                  reason="BAD_LOSS_SPEC")
        if model_kind == GENERATOR:
            raise _incompatible("The vae's loss is already reconstruction + beta * KL; a composite cannot "
                                "replace it. Expected a reconstruction loss such as `mse`.", "composite")
        terms, shapes = [], set()
        for i, term in enumerate(spec["terms"]):
            if tuple(term.get("inputs") or TRAINING_INPUTS) != TRAINING_INPUTS:
                raise _incompatible(f"terms[{i}]: a training job feeds each term (y_true, y_pred). "
                                    f"Received inputs={list(term['inputs'])}.", "composite")
            loss, shape = _resolve_term(term.get("loss") or {}, registry, f"terms[{i}]")
            reduction = term.get("reduction") or None
            if reduction is not None and reduction not in REDUCTIONS:
                raise InvalidArgument(f"terms[{i}]: invalid reduction. Expected one of {list(REDUCTIONS)}. "
                                      f"Received: {reduction!r}.", reason="BAD_REDUCTION")
            weight = 1.0 if term.get("weight") is None else float(term["weight"])
            terms.append({"loss": loss, "weight": weight, "reduction": reduction,
                          "label": term.get("label") or loss.get("name") or loss.get("label") or f"term_{i}"})
            shapes.add(shape)
        canonical = {"terms": terms}
    else:
        canonical, shape = _resolve_term(spec, registry, "loss")
        shapes = {shape}
    if model_kind == CLASSIFIER:
        label_format(canonical, registry)  # refuses what cannot take integer or one-hot labels
        from_logits(canonical)  # refuses terms that disagree
    elif shapes - {SHAPES_SAME, SHAPES_ANY}:
        raise _incompatible(
            f"Loss `{canonical.get('name')}` cannot be a generator's reconstruction loss. Expected a loss "
            "comparing images with images of the same shape, such as `binary_crossentropy` or `mse`.",
            str(canonical.get("name")))
    elif canonical.get("params", {}).get("from_logits"):
        raise _incompatible(
            f"Loss `{canonical['name']}` with from_logits=true does not suit the vae, whose decoder outputs "
            "pixels in [0, 1]. Expected from_logits=false.", canonical["name"])
    return canonical


def label_format(canonical: Mapping[str, Any], registry: LossRegistry) -> str:
    """``sparse`` (integer labels) or ``one_hot`` for a classifier's canonical loss."""
    terms = [t["loss"] for t in canonical["terms"]] if "terms" in canonical else [canonical]
    formats = set()
    for loss in terms:
        if "expression" in loss:
            formats.add(ONE_HOT)
            continue
        entry = registry.get(loss["name"])
        if entry.shapes == SHAPES_SPARSE:
            formats.add(SPARSE)
        elif entry.shapes == SHAPES_ANY:
            formats.add(ONE_HOT)
        else:
            sparse_twin = {"categorical_crossentropy": "sparse_categorical_crossentropy"}.get(entry.name)
            hint = f" Use `{sparse_twin}` instead." if sparse_twin else ""
            raise _incompatible(
                f"Loss `{entry.name}` does not suit a classifier trained on integer class labels: it expects "
                "targets of the model output's shape [batch, classes] (one-hot), and the dataset has labels of "
                f"shape [batch]. Expected a loss that takes class indices, such as "
                f"`sparse_categorical_crossentropy`, or an expression loss (it gets one-hot targets).{hint}",
                entry.name)
    if len(formats) > 1:
        raise _incompatible("The terms of this composite need different label formats (class indices for some, "
                            "one-hot targets for others). Expected terms that agree.", "composite")
    return formats.pop()


def from_logits(canonical: Optional[Mapping[str, Any]]) -> bool:
    """Whether the classifier should output logits: its loss says ``from_logits``.

    Expression losses read probabilities (the softmax output). The terms of a
    composite must agree, since the model has one output.
    """
    if not canonical:
        return False
    terms = [t["loss"] for t in canonical["terms"]] if "terms" in canonical else [canonical]
    flags = {bool((t.get("params") or {}).get("from_logits")) for t in terms}
    if len(flags) > 1:
        raise _incompatible("The terms of this composite disagree on `from_logits`, and the model has one "
                            "output. Expected every term to take logits, or every term probabilities.",
                            "composite")
    return flags.pop()


@keras.saving.register_keras_serializable(package="lossd")
class CompositeLoss(keras.losses.Loss):
    """The weighted sum of Keras losses, each with its own reduction."""

    def __init__(self, terms=(), weights=(), name="composite", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.terms = [keras.losses.get(t) if isinstance(t, dict) else t for t in terms]
        self.weights = [float(w) for w in weights]

    def __call__(self, y_true, y_pred, sample_weight=None):
        total = None
        for term, weight in zip(self.terms, self.weights):
            value = term(y_true, y_pred, sample_weight=sample_weight) * weight
            total = value if total is None else total + value
        return total

    def get_config(self):
        return {**super().get_config(), "terms": [keras.losses.serialize(t) for t in self.terms],
                "weights": self.weights}


def _build_one(loss: Mapping[str, Any], registry: LossRegistry, reduction: str):
    if "expression" in loss:
        from lossd_server.losses.custom import ExpressionLoss

        return ExpressionLoss(loss["expression"], TRAINING_INPUTS, loss.get("params") or {}, reduction=reduction,
                              dtype="float32", name=loss.get("label") or "expression")
    entry = registry.get(loss["name"])
    return entry.build(resolve_parameters(entry, loss.get("params")), reduction, "float32")


def build_training_loss(spec: Mapping[str, Any], registry: LossRegistry, reduction: str = "sum_over_batch_size"):
    """Builds the Keras loss of a canonical spec (see ``resolve_training_loss``).

    Args:
        spec: The canonical spec: a named loss, an expression, or terms.
        registry: Where names resolve.
        reduction: ``sum_over_batch_size`` (Keras's default, for classifiers)
            or ``none`` (per-pixel values, for the VAE's reconstruction term).

    Returns:
        A ``keras.losses.Loss`` computing in float32.
    """
    if "terms" in spec:
        terms = [_build_one(t["loss"], registry, t.get("reduction") or reduction) for t in spec["terms"]]
        return CompositeLoss(terms, [t["weight"] for t in spec["terms"]], reduction=reduction)
    return _build_one(spec, registry, reduction)
