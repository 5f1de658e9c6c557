"""EvaluateChunked: tensors too large for one message arrive as row slices.

Whether and how a request may be split is decided once, from the plan and
the header's shapes, by ``chunk_layout``; it asks the registry how the
loss's values depend on the rows of its inputs (``LossEntry.row_structure``):

* ``ROWS``: each row's values depend on that row alone (MSE on rank >= 2,
  crossentropy over a class axis, an expression reducing axes other than
  the first). Each chunk runs the plan's own compiled program with reduction
  ``none``: Keras returns the chunk's weighted values (streamed back for
  reduction ``none``) and the gradient of their sum. The session adds the
  sums and counts the values, and applies the request reduction's divisor at
  the end, to the loss here and to the gradient rows at the receiver
  (``gradient_scale``).
* ``ROWS_MEAN`` / ``ROWS_SUM``: the loss itself reduces over the rows (MSE of
  a rank-1 vector, ``mean(..., axis=-2)`` on a matrix). Each chunk runs with
  the request's own reduction; as that reduction is linear in the values, the
  whole request's result is the row-weighted mean (or the sum) of the chunks'
  results, and each chunk's gradient rows are scaled by the same weight.
* ``ROWS_COSINE``: the cosine similarity of two long vectors (rank 1, or
  ``axis=None``) is ``-S_tp * min(rsqrt(S_tt), 1/eps) * min(rsqrt(S_pp), 1/eps)``
  over three sums of products that the chunks add up (Keras's
  ``normalize``). Its gradient, ``a * y_true + b * y_pred``, needs every
  row's sums first, so the summary carries ``a`` and ``b`` and the receiver,
  who holds both tensors, forms it.
* anything else is refused with ``NOT_CHUNKABLE`` before a chunk is read.

The numbers always come from the compiled Keras program; what this module
adds is only the linear combination, whose rules (Keras's ``reduce_values``:
sum, then divide by the number of values, or by the sum of the sample
weights) are ``losses.reductions``'. A property test
(tests/server/evaluation/test_chunks.py) compares every registered loss split
in pieces with the one-piece answer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np

from lossd.wire import REDUCTION_NONE, check_reduction, is_float
from lossd_server.errors import InvalidArgument
from lossd_server.evaluation.evaluator import Evaluator
from lossd_server.losses import reductions
from lossd_server.losses.plan import DEFAULT_INPUTS, Plan
from lossd_server.losses.registry import ROWS, ROWS_COSINE, ROWS_MEAN, ROWS_SUM, values_shape

NOT_CHUNKABLE = "NOT_CHUNKABLE"
_CHUNK_TENSORS = ("y_true", "y_pred", "sample_weight")


def _refuse(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(
        f"{message} Send it with Evaluate instead (raise --max-message-bytes on the client and the "
        "server if it does not fit one message).", reason=NOT_CHUNKABLE, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How a request is split: ``mode`` is ``ROWS``, ``ROWS_MEAN``,
    ``ROWS_SUM`` or ``ROWS_COSINE``; ``rows`` is the full row count."""

    mode: str
    rows: int


def chunk_layout(plan: Plan, infos: Mapping[str, tuple[str, tuple]], reduction: str) -> ChunkLayout:
    """Checks that a request can be evaluated exactly in row slices, and how.

    Args:
        plan: The request's plan.
        infos: ``{name: (dtype name, full shape)}`` for y_true, y_pred and
            optionally sample_weight, as the header declares them.
        reduction: The request's reduction.

    Raises:
        InvalidArgument: ``NOT_CHUNKABLE`` when the loss couples the rows in a
            way that a split cannot reproduce exactly; ``SHAPE_MISMATCH``,
            ``BAD_TENSOR`` or ``UNSUPPORTED_DTYPE`` for a bad header.
    """
    check_reduction(reduction)
    for name in ("y_true", "y_pred"):
        if name not in infos:
            raise InvalidArgument(f"The header must declare {name}. Expected a TensorInfo. Received: none.",
                                  reason="BAD_TENSOR")
    if plan.composite:
        raise _refuse("EvaluateChunked takes one named or expression loss, not a composite.", loss="composite")
    term = plan.terms[0]
    loss = term.entry.name or "expression"
    if plan.outputs:
        raise _refuse(
            f"Loss `{loss}` returns state ({', '.join(plan.outputs)}) updated from the whole batch, which "
            "slices cannot reproduce. Expected a loss without outputs. Received: "
            f"{loss} with outputs {list(plan.outputs)}.", loss=loss)
    if term.inputs != DEFAULT_INPUTS:
        raise _refuse(f"EvaluateChunked slices y_true and y_pred; loss `{loss}` reads {list(term.inputs)}.",
                      loss=loss)
    pred_dtype, pred_shape = infos["y_pred"]
    if not is_float(np.dtype(pred_dtype)):
        raise InvalidArgument(f"y_pred: expected a floating dtype. Received: {pred_dtype}.",
                              reason="UNSUPPORTED_DTYPE")
    rows = pred_shape[0] if pred_shape else 0
    for name, (_, shape) in infos.items():
        if len(shape) == 0 or shape[0] != rows:
            message = (f"EvaluateChunked slices every tensor along its first axis, so all must share it. "
                       f"Expected {name}.shape[0] == {rows}. Received: {name}.shape={list(shape)}.")
            if name == "sample_weight":  # it may broadcast in one piece: a limit of slicing
                raise _refuse(message, loss=plan.metric_name)
            raise InvalidArgument(message, reason="SHAPE_MISMATCH")
    true_shape = infos["y_true"][1]
    shape = values_shape(term.entry, term.params, true_shape, pred_shape)  # SHAPE_MISMATCH first
    structure = reductions.row_structure(term, true_shape, pred_shape)
    mode = structure.kind if structure is not None else None
    if mode == ROWS_COSINE and shape != ():
        mode = None  # the sums would be per column: not supported, refused below
    if mode not in (ROWS, ROWS_MEAN, ROWS_SUM, ROWS_COSINE):
        raise _refuse(
            f"Loss `{loss}` couples the rows of the batch in a way that cannot be computed exactly from "
            "slices (a normalisation, a maximum or a ratio over the first axis). Expected a loss whose rows "
            "are independent, or that averages or sums over them. Received: "
            f"{loss} with {dict(term.params)}, y_true {list(infos['y_true'][1])}, y_pred "
            f"{list(infos['y_pred'][1])}.", loss=loss)
    if "sample_weight" in infos:
        if mode != ROWS:
            raise _refuse(
                f"Loss `{loss}` reduces over the rows, so its sample_weight cannot be sliced by rows.", loss=loss)
        if shape is not None:
            reductions.check_sample_weight(infos["sample_weight"][1], shape, loss)
        # Where only the rank of the values is known, ask for weights of that rank.
        known = shape if shape is not None else (None,) * (structure.values_rank or 0)
        if shape is not None or structure.values_rank is not None:
            if not reductions.weights_follow_rows(infos["sample_weight"][1], known):
                raise _refuse(
                    f"sample_weight of shape {list(infos['sample_weight'][1])} weighs the last axes of the "
                    f"per-sample values (of rank {len(known)}; Keras broadcasts it from the right), not their "
                    "rows, so it cannot be sliced by rows. Expected a sample_weight whose first axis is the "
                    "rows' axis.", loss=loss)
    if term.params.get("ignore_class") is not None and reduction in reductions.MASK_DIVIDED:
        raise _refuse(
            f"Loss `{loss}` with ignore_class divides by the number of labels not ignored over the whole "
            f"batch for reduction `{reduction}`. Expected reduction `none` or `sum` for a chunked request.",
            loss=loss)
    return ChunkLayout(mode, rows)


@dataclasses.dataclass
class Summary:
    """What the last message of a chunked evaluation carries."""

    loss: Optional[np.ndarray]  # None when the values were streamed with the chunks
    gradient_scale: float
    non_finite: bool
    y_true_gradient_coefficient: float = 0.0
    y_pred_gradient_coefficient: float = 0.0


class ChunkedSession:
    """Evaluates one EvaluateChunked request, slice by slice.

    Memory is bounded by one slice whatever the full size: only running
    sums are kept (as float64).
    """

    def __init__(self, evaluator: Evaluator, plan: Plan, infos: Mapping[str, tuple[str, tuple]], *,
                 reduction: str, gradient: bool, cancellation=None):
        self.layout = chunk_layout(plan, infos, reduction)
        self.cancellation = cancellation  # Evaluator.evaluate's: stops a chunk when the call ends
        # Each chunk's cost is checked as it is evaluated; a request whose
        # single row costs too much could send no chunk, so it is refused
        # here, before any chunk is uploaded.
        one_row = {name: (1, *shape[1:]) for name, (_, shape) in infos.items() if name != "sample_weight"}
        evaluator.check_cost(plan, one_row, np.dtype(infos["y_pred"][0]).itemsize, gradient)
        self.evaluator, self.plan, self.reduction, self.gradient = evaluator, plan, reduction, gradient
        self.infos = dict(infos)
        self.rows = self.layout.rows
        self.next_row = 0
        self.total: Optional[np.ndarray] = None  # running sum (ROWS) or weighted sum of results
        self.count = 0  # values seen (ROWS)
        self.weight_sum = 0.0
        self.non_finite = False
        self._hinge = _HingeLabels(plan.terms[0].entry.name) if plan.terms[0].entry.hinge_labels else None
        self._cosine = _CosineSums() if self.layout.mode == ROWS_COSINE else None

    def row_shape(self, name: str) -> tuple:
        return tuple(self.infos[name][1][1:])

    def feed(self, start: int, arrays: Mapping[str, np.ndarray]
             ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Evaluates rows ``[start, start + n)``; returns (values to stream for
        row-wise reduction none, gradient rows)."""
        rows = arrays["y_pred"].shape[0]
        if start != self.next_row or rows <= 0 or start + rows > self.rows:
            raise InvalidArgument(
                f"Chunks must arrive in order without gaps. Expected a chunk starting at row "
                f"{self.next_row} with 1..{self.rows - self.next_row} rows. Received: start={start}, rows={rows}.",
                reason="BAD_CHUNK")
        if self._hinge is not None:
            self._hinge.check(arrays["y_true"])
        sample_weight = arrays.get("sample_weight")
        tensors = {k: v for k, v in arrays.items() if k != "sample_weight"}
        streamed = None
        if self._cosine is not None:
            self._cosine.add(arrays["y_true"], arrays["y_pred"])
            self.next_row += rows
            return None, None
        if self.layout.mode == ROWS:
            result = self.evaluator.evaluate(self.plan, tensors, sample_weight=sample_weight,
                                             reduction=REDUCTION_NONE, gradient=self.gradient,
                                             cancellation=self.cancellation)
            if sample_weight is not None and not reductions.weights_follow_rows(sample_weight.shape, result.loss.shape):
                raise _refuse(
                    f"sample_weight of shape {list(self.infos['sample_weight'][1])} weighs the last axes of the "
                    "per-sample values (Keras broadcasts it from the right), not their rows, so it cannot be "
                    "sliced by rows. Expected a sample_weight whose first axis is the rows' axis.",
                    loss=self.plan.metric_name)
            gradient = result.gradient
            if self.reduction == REDUCTION_NONE:
                streamed = result.loss
            else:
                self._add(np.sum(result.loss, dtype=np.float64), 1.0)
                self.count += result.loss.size
                if sample_weight is not None:
                    self.weight_sum += float(np.sum(sample_weight, dtype=np.float64))
        else:
            result = self.evaluator.evaluate(self.plan, tensors, reduction=self.reduction, gradient=self.gradient,
                                             cancellation=self.cancellation)
            weight = rows / self.rows if self.layout.mode == ROWS_MEAN else 1.0
            self._add(result.loss, weight)
            gradient = result.gradient
            if gradient is not None and weight != 1.0:
                gradient = gradient * gradient.dtype.type(weight)
        self.next_row += rows
        self.non_finite |= result.non_finite
        return streamed, gradient

    def _add(self, value: np.ndarray, weight: float) -> None:
        value = np.asarray(value, dtype=np.float64) * weight
        self.total = value if self.total is None else self.total + value

    def finish(self) -> Summary:
        """The summary, once every row is in."""
        if self.next_row != self.rows:
            raise InvalidArgument(
                f"The stream ended early: expected {self.rows} rows, received {self.next_row}.",
                reason="BAD_CHUNK")
        dtype = self.infos["y_pred"][0]
        if self._cosine is not None:
            loss, a, b = self._cosine.finish()
            loss = np.asarray(loss, dtype=dtype)
            non_finite = self._cosine.non_finite or not bool(np.isfinite(loss))
            return Summary(loss, 0.0, non_finite, a if self.gradient else 0.0, b if self.gradient else 0.0)
        if self.layout.mode == ROWS and self.reduction == REDUCTION_NONE:
            return Summary(None, 1.0, self.non_finite)
        if self.layout.mode != ROWS:
            loss = np.asarray(self.total, dtype=dtype)
            return Summary(loss, 1.0, self.non_finite or not bool(np.all(np.isfinite(loss))))
        weight_sum = self.weight_sum if "sample_weight" in self.infos else None
        loss = np.asarray(float(reductions.combine(np.float64(self.total), self.count, self.reduction, weight_sum)),
                          dtype=dtype)
        # Each gradient row is d(sum)/d(row): the loss's gradient divides it by the same divisor.
        scale = float(reductions.combine(1.0, self.count, self.reduction, weight_sum))
        return Summary(loss, scale, self.non_finite or not bool(np.isfinite(loss)))


class _CosineSums:
    """Running sums for the cosine similarity of two vectors split in rows.

    Keras (``losses.cosine_similarity`` with ``ops.normalize``) computes
    ``-sum(t * p) * min(rsqrt(sum(t*t)), 1/eps) * min(rsqrt(sum(p*p)), 1/eps)``
    over the reduced axes; here those are every axis, so three float64 sums
    carry the whole answer.
    """

    def __init__(self):
        self.tp = self.tt = self.pp = 0.0
        self.non_finite = False

    def add(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        t = np.asarray(y_true, dtype=np.float64).reshape(-1)
        p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
        if t.size != p.size:
            raise InvalidArgument(f"cosine_similarity: y_true and y_pred rows differ in size. Received: "
                                  f"{t.size} and {p.size} values.", reason="SHAPE_MISMATCH")
        self.tp += float(t @ p)
        self.tt += float(t @ t)
        self.pp += float(p @ p)
        self.non_finite |= not (np.isfinite(self.tp) and np.isfinite(self.tt) and np.isfinite(self.pp))

    def finish(self) -> tuple[float, float, float]:
        """The loss, and the coefficients of y_true and y_pred in its gradient."""
        import keras  # Keras's own epsilon: the same clamp as the one-piece path

        cap = 1.0 / keras.config.epsilon()
        inv_t = min(self.tt ** -0.5 if self.tt > 0 else math.inf, cap)
        inv_p = min(self.pp ** -0.5 if self.pp > 0 else math.inf, cap)
        loss = -self.tp * inv_t * inv_p
        # d/dp_i: -t_i * inv_t * inv_p - tp * inv_t * d(inv_p)/d(pp) * 2 p_i, where
        # d(inv_p)/d(pp) = -0.5 * pp ** -1.5 unless the clamp holds (then 0).
        a = -inv_t * inv_p
        b = self.tp * inv_t * self.pp ** -1.5 if inv_p < cap else 0.0
        return loss, a, b


class _HingeLabels:
    """Keras's hinge losses turn {0, 1} labels into {-1, 1} only when every
    label of the batch is 0 or 1. A slice whose labels are all 0 or 1 is
    converted on its own, so a split gives the one-piece answer unless one
    slice converted a 0 while another slice shows the batch is not binary."""

    def __init__(self, loss: str):
        self.loss = loss
        self.converted_zero = False
        self.not_binary = False

    def check(self, labels: np.ndarray) -> None:
        binary = bool(np.all((labels == 0) | (labels == 1)))
        if binary:
            self.converted_zero |= bool(np.any(labels == 0))
        else:
            self.not_binary = True
        if self.converted_zero and self.not_binary:
            raise _refuse(
                f"Loss `{self.loss}` maps labels {{0, 1}} to {{-1, 1}} only when every label of the batch is 0 "
                "or 1, and these labels mix 0 with values other than 0 and 1 across slices. Expected labels "
                "in {-1, 1}, or all in {0, 1}.", loss=self.loss)
