"""Chunked evaluation (placeholder moved from evaluator.py; rewritten next)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from lossd.wire import FLOAT_DTYPES, check_reduction
from lossd_server.errors import InvalidArgument
from lossd_server.evaluation.evaluator import Evaluator, check_sample_weight
from lossd_server.losses.plan import DEFAULT_INPUTS, Plan
from lossd_server.losses.registry import SHAPES_ANY, values_shape


class ChunkedSession:
    """Evaluates tensors that arrive as slices along their first axis.

    Each slice is evaluated on its own (per-sample values, and the gradient of
    their weighted sum); the session keeps only running totals, so memory is
    bounded by one slice whatever the full size. The reduction's divisor is
    applied at the end: to the loss here, to the gradient by the receiver
    (``gradient_scale``), since it is only known once every slice is in.
    """

    def __init__(self, evaluator: Evaluator, plan: Plan, infos: Mapping[str, tuple[str, tuple]], *,
                 reduction: str, gradient: bool):
        check_reduction(reduction)
        if plan.composite:
            raise InvalidArgument("EvaluateChunked takes one named or expression loss, not a composite.",
                                  reason="BAD_LOSS_SPEC")
        term = plan.terms[0]
        if term.inputs != DEFAULT_INPUTS:
            raise InvalidArgument(
                f"EvaluateChunked evaluates losses of y_true and y_pred; `{term.entry.name}` reads "
                f"{list(term.inputs)}.", reason="BAD_LOSS_SPEC")
        if not term.entry.batch_separable(term.params):
            raise InvalidArgument(
                f"Loss `{term.entry.name}` with these parameters couples the samples of a batch "
                "(e.g. dice or tversky with axis=None, circle), so it cannot be evaluated in slices. "
                "Send it through Evaluate, or set `axis` to exclude the batch axis. Expected a loss whose "
                f"samples are independent. Received: {term.entry.name} with {dict(term.params)}.",
                reason="NOT_BATCH_SEPARABLE")
        for name in ("y_true", "y_pred"):
            if name not in infos:
                raise InvalidArgument(f"The header must declare {name}.", reason="BAD_TENSOR")
        self.evaluator, self.plan, self.reduction, self.gradient = evaluator, plan, reduction, gradient
        self.infos = dict(infos)
        pred_dtype, pred_shape = self.infos["y_pred"]
        if pred_dtype not in FLOAT_DTYPES:
            raise InvalidArgument(f"y_pred: expected a floating dtype ({', '.join(FLOAT_DTYPES)}). "
                                  f"Received: {pred_dtype}.", reason="UNSUPPORTED_DTYPE")
        self.rows = pred_shape[0] if pred_shape else 0
        for name, (_, shape) in self.infos.items():
            if len(shape) == 0 or shape[0] != self.rows:
                raise InvalidArgument(
                    f"EvaluateChunked slices every tensor along its first axis, so all must share it. "
                    f"Expected {name}.shape[0] == {self.rows}. Received: {name}.shape={list(shape)}.",
                    reason="SHAPE_MISMATCH")
        if term.entry.shapes == SHAPES_ANY and len(pred_shape) < 2:
            raise InvalidArgument(
                f"Loss `{term.entry.name or 'expression'}` reduces the last axis, which for a rank-1 y_pred "
                "is the batch axis, so it cannot be evaluated in slices. Send y_pred with shape [rows, n].",
                reason="NOT_BATCH_SEPARABLE")
        self.values_shape = values_shape(term.entry, term.params, self.infos["y_true"][1], pred_shape)
        if "sample_weight" in self.infos and self.values_shape is not None:
            check_sample_weight(self.infos["sample_weight"][1], self.values_shape, term.entry.name)
        self.next_row = 0
        self.total = 0.0
        self.count = 0
        self.weight_sum = 0.0
        self.non_finite = False

    def row_shape(self, name: str) -> tuple:
        return tuple(self.infos[name][1][1:])

    def feed(self, start: int, arrays: Mapping[str, np.ndarray]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Evaluates rows ``[start, start + n)``; returns (values for reduction none, gradient rows)."""
        rows = arrays["y_pred"].shape[0]
        if start != self.next_row or rows <= 0 or start + rows > self.rows:
            raise InvalidArgument(
                f"Chunks must arrive in order without gaps. Expected a chunk starting at row "
                f"{self.next_row} with 1..{self.rows - self.next_row} rows. Received: start={start}, rows={rows}.",
                reason="BAD_CHUNK")
        sample_weight = arrays.get("sample_weight")
        tensors = {k: v for k, v in arrays.items() if k != "sample_weight"}
        result = self.evaluator.evaluate(self.plan, tensors, sample_weight=sample_weight,
                                         reduction="none", gradient=self.gradient)
        self.next_row += rows
        values = np.asarray(result.loss)
        self.total += float(np.sum(values, dtype=np.float64))
        self.count += values.size
        if sample_weight is not None:
            self.weight_sum += float(np.sum(sample_weight, dtype=np.float64))
        self.non_finite |= result.non_finite
        return (values if self.reduction == "none" else None), result.gradient

    def finish(self) -> tuple[Optional[np.ndarray], float, bool]:
        """The reduced loss (None for reduction none), the gradient scale and the NaN/Inf flag."""
        if self.next_row != self.rows:
            raise InvalidArgument(
                f"The stream ended early: expected {self.rows} rows, received {self.next_row}.",
                reason="BAD_CHUNK")
        dtype = self.infos["y_pred"][0]
        if self.reduction == "none":
            return None, 1.0, self.non_finite
        if self.reduction == "sum":
            divisor = 1.0
        elif self.reduction == "mean_with_sample_weight" and "sample_weight" in self.infos:
            divisor = self.weight_sum
        else:
            divisor = float(self.count)
        # Keras divides with divide_no_nan: a zero divisor gives 0, not NaN.
        loss = self.total / divisor if divisor else 0.0
        scale = 1.0 / divisor if divisor else 0.0
        return np.asarray(loss, dtype=dtype), scale, self.non_finite or not np.isfinite(loss)
