"""The cost model: what evaluating a loss will cost, from the request's shapes
and dtypes alone, before anything is allocated or compiled.

Every registry entry declares a cost function (``LossEntry.cost``)::

    cost(params, shapes, itemsize, gradient) -> Cost

given its parameters, each input's shape by the entry's own input names, the
byte size of the dtype the loss computes in, and whether the gradient is
asked for. A ``Cost`` has two figures:

* ``work``: the element operations the loss's kernels walk, in *cost units*.
  Each declaration counts the sizes its kernels walk (``ctc``: time steps x
  batch x its 2(L + 1) alignment states squared; ``circle``: batch squared;
  ``matrix_crossentropy``: classes squared) times the passes its kernels
  make over them, so that one unit is about one nanosecond of one core of
  the reference machine (2 cores, AVX-512; measured by
  ``bench/cost_model.py``, figures in ``docs/limits.md``). It is an
  estimate of CPU time, not a measurement: a GPU walks the same sizes
  faster, but the sizes are what grows.
* ``memory``: bytes of the largest intermediates live at once. With the
  gradient, the intermediates the backward pass reads stay alive and the
  gradients join them: ``GRADIENT_MEMORY`` times the forward figure, unless
  the declaration knows better (``ctc`` computes its gradient with its loss).

A composite costs the sum of its terms (the terms run in one program, and
with the gradient their intermediates are all alive at once). A loss with
no declaration of its own (plain elementwise Keras losses, plugins) is
linear in its elements (``elementwise``).

``CostLimits`` checks an estimate against ``max_evaluation_cost`` and
``max_evaluation_memory_bytes`` and refuses (RESOURCE_EXHAUSTED,
``COST_TOO_HIGH`` or ``MEMORY_TOO_HIGH``) what exceeds them. Nothing here
imports TensorFlow or gRPC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from lossd_server.errors import ResourceExhausted

# The figures below are cost units (about a nanosecond of one reference
# core each) per element walked, and values alive at once, measured with
# bench/cost_model.py (docs/limits.md has the run): each is rounded up from
# what the measured cases took, so the model errs towards refusing.

# What the backward pass adds, for losses that declare no better figure: it
# walks about twice what the forward pass walked (measured 1.7-2.7x), and
# it holds the forward intermediates it reads plus gradients of the same sizes.
GRADIENT_WORK = 3.0
GRADIENT_MEMORY = 3.0

# A matrix product's multiply-adds are cheap beside elementwise passes
# (oneDNN's kernels: about 0.02 units each measured here).
MATMUL = 0.05

# Elementwise losses (Keras's regression, probabilistic and hinge losses):
# units per input element (measured 1.5 for MSE, 2.3 for crossentropy), and
# how many values of the largest input's size are alive at once.
ELEMENTWISE = 2.0
ELEMENTWISE_LIVE = 4

# circle: units per pair of the batch x batch values (distances, masks,
# weights, logsumexp both ways: measured 7.2), and how many such values are
# alive at once (measured 6.8, and 11.8 with the gradient).
CIRCLE = 8.0
CIRCLE_LIVE = 8
CIRCLE_LIVE_GRADIENT = 13

# ctc (TensorFlow's dense CTC, what Keras's CTC runs on every device without
# cuDNN): for each time step, both the forward and the backward scan add the
# [batch, S, S] transition matrix (S = 2 x (label length + 1) states) to the
# state and reduce it with a logsumexp: units per element of it per step
# (measured 3.6-5); projecting the classes onto the states walks time x
# batch x labels x classes.
CTC_STEP = 5.0
CTC_PROJECTION = 4.0

# matrix_crossentropy: units per element of the classes x classes matrix
# (the identity when the request has none, the batch's confusion counts,
# their normalised and moved copies, the update's where(): measured 6.6),
# and how many such matrices are alive at once (measured 1 in float32 at
# C=4000; issue 23 saw 5.3 GB, 3 of them, in float16 at C=30000).
MATRIX = 7.0
MATRIX_LIVE = 3

# Expressions: each node of the tree walks its value once (measured 0.3-0.6
# units per element); alive at once are a few of the largest values, or
# with the gradient every node's value and a gradient of each.
EXPRESSION = 1.0
EXPRESSION_LIVE = 6


@dataclasses.dataclass(frozen=True)
class Cost:
    """What an evaluation will cost: ``work`` in cost units (about one
    nanosecond of one reference core each) and ``memory`` in bytes."""

    work: float
    memory: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.work + other.work, self.memory + other.memory)


ZERO = Cost(0.0, 0.0)

# params, shapes by the entry's input names, compute itemsize, gradient -> Cost
CostFunction = Callable[[Mapping[str, Any], Mapping[str, tuple], int, bool], Cost]


def _elements(shape: Optional[Sequence[int]]) -> int:
    return math.prod(int(d) for d in shape) if shape is not None else 0


def _with_gradient(work: float, memory: float, gradient: bool) -> Cost:
    return Cost(work * GRADIENT_WORK, memory * GRADIENT_MEMORY) if gradient else Cost(work, memory)


def elementwise(params: Mapping[str, Any], shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
    """The default: linear in the elements of every input (what Keras's
    elementwise losses, and plugins, whose kernels are unknown, walk)."""
    elements = sum(_elements(shape) for shape in shapes.values())
    largest = max((_elements(shape) for shape in shapes.values()), default=0)
    return _with_gradient(ELEMENTWISE * elements, ELEMENTWISE_LIVE * largest * itemsize, gradient)


def circle(params: Mapping[str, Any], shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
    """``circle``: y_pred ``[B, D]``; the pairwise similarities are a ``B x D``
    by ``D x B`` product, and every step after it walks ``B x B`` values."""
    pred = shapes.get("y_pred", ())
    rows = int(pred[0]) if len(pred) >= 1 else 0
    features = int(pred[-1]) if len(pred) >= 2 else 1
    pairs = rows * rows
    work = MATMUL * pairs * features + CIRCLE * pairs
    if gradient:
        return Cost(GRADIENT_WORK * work, CIRCLE_LIVE_GRADIENT * pairs * itemsize)
    return Cost(work, CIRCLE_LIVE * pairs * itemsize)


def ctc(params: Mapping[str, Any], shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
    """``ctc``: y_true ``[B, L]`` labels, y_pred ``[B, T, C]`` logits.
    TensorFlow's dense CTC builds a ``[B, S, S]`` transition matrix
    (``S = 2(L + 1)``) and walks it at each of the ``T`` steps of its
    forward and its backward scan; it computes the gradient with the loss
    (in float32 whatever the input dtype), so asking for it adds only the
    final product."""
    labels, pred = shapes.get("y_true", ()), shapes.get("y_pred", ())
    if len(labels) != 2 or len(pred) != 3:
        return ZERO  # values_shape refuses these shapes
    batch, steps, classes = (int(d) for d in pred)
    length = int(labels[1])
    states = 2 * (length + 1)
    float32 = 4
    transitions = batch * states * states
    projection = steps * batch * length * classes
    work = 2 * steps * CTC_STEP * transitions + CTC_PROJECTION * projection
    # Alive together: the transition matrix (as probabilities, logs and the
    # backward scan's transpose), one step's broadcast sum and its
    # logsumexp temporaries, the projection, and both scans' outputs.
    memory = float32 * (6 * transitions + 2 * projection + 4 * steps * batch * states)
    return Cost(work, memory)


def matrix_crossentropy(params: Mapping[str, Any], shapes: Mapping[str, tuple], itemsize: int,
                        gradient: bool) -> Cost:
    """``matrix_crossentropy``: y_pred ``[B, C]`` and a ``C x C`` matrix
    (the identity when the request has none): ``t·Aᵀ`` and the confusion
    counts are ``B x C x C`` products, the update walks ``C x C`` values."""
    pred = shapes.get("y_pred", ())
    if len(pred) != 2:
        return ZERO  # check_tensors refuses it
    batch, classes = (int(d) for d in pred)
    square = classes * classes
    work = MATMUL * 2 * batch * square + MATRIX * square + ELEMENTWISE * batch * classes
    memory = (MATRIX_LIVE * square + ELEMENTWISE_LIVE * batch * classes) * itemsize
    # The gradient flows through the elementwise part only (the matrix and
    # its update are constants to it): it adds passes over [B, C].
    if gradient:
        work += (GRADIENT_WORK - 1) * ELEMENTWISE * batch * classes
        memory += (GRADIENT_MEMORY - 1) * ELEMENTWISE_LIVE * batch * classes * itemsize
    return Cost(work, memory)


def expression(value_shapes: Callable[[Mapping[str, tuple]], Any]) -> CostFunction:
    """The cost of an expression loss, from its shape analysis
    (``expression_shapes.value_shapes``): every node walks its value once
    (``total`` elements over the tree); alive at once are a few of the
    largest values, or, with the gradient, every node's value and a
    gradient of each."""
    def cost(params: Mapping[str, Any], shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
        analysis = value_shapes(shapes)
        if analysis is None:
            return elementwise(params, shapes, itemsize, gradient)
        if gradient:
            return Cost(GRADIENT_WORK * EXPRESSION * analysis.total, 2 * analysis.total * itemsize)
        return Cost(EXPRESSION * analysis.total, EXPRESSION_LIVE * analysis.largest * itemsize)
    return cost


def estimate(plan, shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
    """The cost of evaluating ``plan`` on tensors of ``shapes`` (by request
    tensor name), computing in a dtype of ``itemsize`` bytes: the sum of its
    terms' declared costs."""
    total = ZERO
    for term in plan.terms:
        own = {name: tuple(shapes[given]) for name, given in zip(term.entry.inputs, term.inputs) if given in shapes}
        total = total + term.entry.cost(term.params, own, itemsize, gradient)
    return total


@dataclasses.dataclass(frozen=True)
class CostLimits:
    """The most one evaluation may cost: ``max_cost`` units of work and
    ``max_memory_bytes`` of intermediates (None: unlimited)."""

    max_cost: Optional[float] = None
    max_memory_bytes: Optional[int] = None

    def check(self, plan, shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
        """Estimates the evaluation and refuses it when it exceeds a limit.

        Raises:
            ResourceExhausted: ``COST_TOO_HIGH`` (work) or ``MEMORY_TOO_HIGH``,
                with the estimate, the limit and the setting in its metadata.
        """
        cost = estimate(plan, shapes, itemsize, gradient)
        over_work = self.max_cost is not None and cost.work > self.max_cost
        over_memory = self.max_memory_bytes is not None and cost.memory > self.max_memory_bytes
        if not (over_work or over_memory):
            return cost
        received = ", ".join(f"{name}.shape={list(shape)}" for name, shape in sorted(shapes.items()))
        what = f"Loss `{plan.metric_name}`{' with its gradient' if gradient else ''}"
        # Memory first: running out of it can take the whole server down.
        if over_memory:
            raise ResourceExhausted(
                f"{what} would hold about {cost.memory / 2 ** 20:.0f} MiB of intermediate values on these inputs. "
                f"Expected at most {self.max_memory_bytes / 2 ** 20:.0f} MiB (the server's "
                f"max_evaluation_memory_bytes): send smaller batches or fewer classes. Received: {received}.",
                reason="MEMORY_TOO_HIGH", metadata=_metadata(plan, cost.memory, self.max_memory_bytes,
                                                             "LOSSD_MAX_EVALUATION_MEMORY_BYTES"))
        raise ResourceExhausted(
            f"{what} would cost about {cost.work:.3g} units of work on these inputs (about "
            f"{cost.work / 1e9:.3g} s of CPU; docs/limits.md). Expected at most {self.max_cost:.3g} (the "
            f"server's max_evaluation_cost): send smaller batches or shorter sequences. Received: {received}.",
            reason="COST_TOO_HIGH", metadata=_metadata(plan, cost.work, self.max_cost, "LOSSD_MAX_EVALUATION_COST"))


def _metadata(plan, estimate_: float, limit: float, setting: str) -> dict[str, str]:
    return {"loss": plan.metric_name, "estimate": str(int(estimate_)), "limit": str(int(limit)), "setting": setting}
