"""Loss-guided generation: the guidance loss of a Generate request, planned
and evaluated with the programs Evaluate runs, and its gradient with respect
to the image being generated.

The guidance loss is a composite over named tensors:

- ``y_pred``: the sampling step's estimate of the clean images (N x H x W x C
  in [0, 1]): the tensor the gradient is taken with respect to;
- ``y_true``: the request's ``init_images`` (z_orig);
- ``classifier``: a trained classifier job's class probabilities on ``y_pred``
  (the stand-in for CLIP's text-image similarity);
- ``label``: each image's class, as an index into the classifier's classes
  (into the model's own without a classifier).

Its terms are the request's ``guidance`` spec (unset with a classifier:
``sparse_categorical_crossentropy`` of ``(label, classifier)``) and, for
``init_weight`` > 0, the article's ``init_weight / 2 * mse(y_true, y_pred)``.
The whole composite goes through the evaluation ``Planner`` once, so a bad
spec gets the status Evaluate gives it. It is then split by what each term
reads: the terms of the image are one plan whose gradient with respect to
``y_pred`` the ``Evaluator`` returns; the terms of ``classifier`` are another,
evaluated on the probabilities with ``classifier`` renamed ``y_pred``, and
their gradient goes back through the classifier to the image
(``backend.input_gradient``). Both reduce with ``sum``: each image's loss
steers that image alone, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from lossd.wire import REDUCTION_SUM
from lossd_server.errors import InvalidArgument
from lossd_server.losses.plan import Plan, Planner

IMAGE, INIT, CLASSIFIER, LABEL = "y_pred", "y_true", "classifier", "label"
GUIDANCE_TENSORS = (IMAGE, INIT, CLASSIFIER, LABEL)
REDUCTION = REDUCTION_SUM
DEFAULT_CLASSIFIER_TERM = {"label": "classifier", "loss": {"name": "sparse_categorical_crossentropy"},
                           "inputs": [LABEL, CLASSIFIER]}


def _bad(message: str, reason: str = "BAD_GUIDANCE") -> InvalidArgument:
    return InvalidArgument(message, reason=reason)


@dataclasses.dataclass(frozen=True)
class GuidancePlans:
    """A guidance loss, planned and split.

    Attributes:
        image: The terms that read the image (and ``y_true``, ``label``); None if none.
        classifier: The terms of the classifier's probabilities, with
            ``classifier`` renamed ``y_pred``; None if none.
        tensors: Every tensor the terms read.
    """

    image: Optional[Plan]
    classifier: Optional[Plan]
    tensors: frozenset


def plan_guidance(planner: Planner, spec: Optional[Mapping[str, Any]], *, init_weight: float,
                  has_classifier: bool, has_init: bool) -> Optional[GuidancePlans]:
    """Plans a request's guidance loss; None when nothing guides.

    Raises:
        InvalidArgument: whatever the planner refuses, or BAD_GUIDANCE (a
            term reading both the image and the classifier's probabilities),
            MISSING_TENSOR (a term reading ``classifier`` without a classifier
            job, or ``y_true`` without init_images).
    """
    terms: list = []
    if spec and spec.get("terms"):
        terms = list(spec["terms"])
    elif spec and (spec.get("name") or spec.get("expression")):
        terms = [{"loss": {k: spec[k] for k in ("name", "expression", "params") if spec.get(k)}}]
    elif has_classifier:
        terms = [DEFAULT_CLASSIFIER_TERM]
    if init_weight > 0:
        terms.append({"label": "init_weight", "loss": {"name": "mean_squared_error"}, "weight": init_weight / 2,
                      "inputs": [INIT, IMAGE]})
    if not terms:
        return None
    full = planner.plan({"terms": terms}, GUIDANCE_TENSORS)  # one validation: Evaluate's errors
    for name, present, what in ((CLASSIFIER, has_classifier, "a classifier job (`classifier`)"),
                                (INIT, has_init, "init_images")):
        if name in full.tensor_names and not present:
            raise _bad(f"The guidance loss reads tensor {name!r}. Expected {what} in the request. "
                       "Received: none.", reason="MISSING_TENSOR")
    image_terms, classifier_terms = [], []
    for term in full.to_spec()["terms"]:
        inputs = term["inputs"]
        if CLASSIFIER in inputs and IMAGE in inputs:
            raise _bad(f"Guidance term {term['label']!r} reads both the image (y_pred) and the classifier's "
                       f"probabilities. Expected one of them. Received: inputs={inputs}.")
        if CLASSIFIER in inputs:
            classifier_terms.append({**term, "inputs": [IMAGE if n == CLASSIFIER else n for n in inputs]})
        else:
            image_terms.append(term)
    return GuidancePlans(
        image=planner.plan({"terms": image_terms}, GUIDANCE_TENSORS) if image_terms else None,
        classifier=planner.plan({"terms": classifier_terms}, GUIDANCE_TENSORS) if classifier_terms else None,
        tensors=full.tensor_names)


def guide_function(plans: GuidancePlans, evaluator, *, init: Optional[np.ndarray], labels: Optional[np.ndarray],
                   classifier=None) -> Callable[[np.ndarray], np.ndarray]:
    """``guide(images) -> gradient``: the gradient of the guidance loss with
    respect to ``images`` (float32 N x H x W x C).

    Args:
        plans: ``plan_guidance``'s plans.
        evaluator: The ``Evaluator`` Evaluate uses (its compiled-program cache).
        init: The init images, N x H x W x C float32, or None.
        labels: Each image's class in the classifier's classes (N int32), or None.
        classifier: ``(probabilities(images), input_gradient(images, d_probabilities))``
            of the classifier job, or None.
    """
    def extra(plan: Plan, n: int) -> dict:
        tensors = {}
        if INIT in plan.tensor_names:
            tensors[INIT] = init if len(init) == n else np.broadcast_to(init, (n, *init.shape[1:])).copy()
        if LABEL in plan.tensor_names:
            tensors[LABEL] = labels
        return tensors

    def guide(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        gradient = np.zeros_like(images)
        if plans.image is not None:
            result = evaluator.evaluate(plans.image, {IMAGE: images, **extra(plans.image, len(images))},
                                        reduction=REDUCTION, gradient=True)
            gradient += result.gradient
        if plans.classifier is not None:
            probabilities, back = classifier
            p = probabilities(images)
            result = evaluator.evaluate(plans.classifier, {IMAGE: p, **extra(plans.classifier, len(images))},
                                        reduction=REDUCTION, gradient=True)
            gradient += back(images, result.gradient)
        return np.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0)

    return guide
