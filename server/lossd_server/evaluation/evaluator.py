"""The loss evaluator: turns a loss spec and numpy tensors into the loss, its
terms and its gradient, through a bounded cache of compiled programs.

A *plan* is the validated, canonical form of a loss spec (names resolved,
parameters typed, defaults filled). A compiled program is keyed by the plan,
the reduction, the gradient flag and each input's dtype and traced shape, so
the same loss on a new batch size reuses the compiled graph (see
``backend.signature_shape``). Nothing here imports gRPC.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import threading
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lossd_server.evaluation import backend
from lossd_server.errors import InvalidArgument
from lossd_server.losses.registry import (REDUCTIONS, SHAPES_ANY, LossEntry, LossRegistry, check_labels,
                                 resolve_parameters, values_shape)

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
XLA_MIN_ELEMENTS = 1 << 20
DEFAULT_INPUTS = ("y_true", "y_pred")
# Up to this many elements ``isfinite().all()`` is the faster NaN/Inf check;
# above it, min/max, which allocate nothing (see any_non_finite).
ISFINITE_MAX_ELEMENTS = 1 << 16

_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy builds the name on every access (about
    4 µs), and a request reads it several times."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if len(_DTYPE_NAMES) < 64:  # a handful in practice; never unbounded
            _DTYPE_NAMES[dtype] = name
    return name


@dataclasses.dataclass(frozen=True)
class Term:
    """One term of a plan: a registry entry with resolved parameters."""

    label: str
    entry: LossEntry
    params: Mapping[str, Any]
    weight: float
    reduction: Optional[str]  # None: the request's reduction
    inputs: tuple[str, ...]   # request tensors, in the order the entry takes them


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated loss spec."""

    terms: tuple[Term, ...]
    composite: bool
    key: str          # canonical JSON: equal plans compile to the same program
    metric_name: str  # the registered name, or "composite"/"expression"

    @functools.cached_property
    def tensor_names(self) -> frozenset[str]:
        """Every tensor the terms read (computed once: plans are cached and reused)."""
        return frozenset(name for term in self.terms for name in term.inputs)


@dataclasses.dataclass
class Result:
    """What an evaluation returns."""

    loss: np.ndarray
    gradient: Optional[np.ndarray]
    terms: list[tuple[str, np.ndarray, float]]  # (label, value, weight) for composites
    non_finite: bool


class Evaluator:
    """Evaluates loss plans on numpy tensors with compiled, cached programs.

    Args:
        registry: Where loss names resolve.
        device: Where to run (``backend.select_device()``).
        cache_size: Most compiled programs kept; the least recently used goes.
        metrics: Optional ``lossd_server.observability.metrics.Metrics`` for cache and
            compilation counts.
        jit_compile: ``"auto"`` (XLA for the losses in ``xla_losses``),
            ``"on"`` or ``"off"``.
        expression_compiler: Turns an expression string into a registry
            entry (set once expressions are supported).
    """

    def __init__(self, registry: LossRegistry, device: backend.Device, *, cache_size: int = 256,
                 metrics=None, jit_compile: str = "auto", xla_losses: Sequence[str] = (),
                 expression_compiler=None):
        self.registry = registry
        self.device = device
        self.cache_size = cache_size
        self.metrics = metrics
        self.jit_compile = jit_compile
        self.xla_losses = frozenset(xla_losses)
        self.expression_compiler = expression_compiler
        self._cache: collections.OrderedDict[tuple, backend.Compiled] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()
        self.compilations = 0

    # -- plans ---------------------------------------------------------------

    def plan(self, spec: Mapping[str, Any], tensor_names: Sequence[str] = DEFAULT_INPUTS) -> Plan:
        """Validates a loss spec (``{"name", "params"}``, ``{"expression", "params"}``
        or ``{"terms": [...]}``) into a Plan; raises InvalidArgument.

        ``tensor_names`` are the tensors the request carries: the names an
        inline expression may read.
        """
        tensor_names = tuple(tensor_names)
        terms_spec = spec.get("terms") or []
        if terms_spec:
            if spec.get("name") or spec.get("expression"):
                raise InvalidArgument(
                    "A composite loss sets `terms` only. Expected `name`, `expression` or `terms`. "
                    f"Received: terms and {'name' if spec.get('name') else 'expression'}.",
                    reason="BAD_LOSS_SPEC")
            terms = []
            for i, t in enumerate(terms_spec):
                terms.append(self._term(t, i, tensor_names))
            labels = [t.label for t in terms]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise InvalidArgument(
                    f"Composite term labels must be unique. Received duplicate label {dupes[0]!r}; "
                    "set `label` on each term.", reason="BAD_LOSS_SPEC")
            return self._finish_plan(tuple(terms), composite=True)
        entry, params = self._resolve(spec, "loss", tensor_names)
        term = Term(entry.name, entry, params, 1.0, None, entry.inputs if entry.source != "keras"
                    else DEFAULT_INPUTS)
        return self._finish_plan((term,), composite=False)

    def _resolve(self, spec: Mapping[str, Any], where: str, tensor_names: Sequence[str]) -> tuple[LossEntry, dict]:
        name, expression = spec.get("name") or "", spec.get("expression") or ""
        if spec.get("terms"):
            raise InvalidArgument(f"{where}: a composite cannot be nested inside a term. Expected a `name` or an "
                                  "`expression`. Received: `terms`.",
                                  reason="BAD_LOSS_SPEC")
        if bool(name) == bool(expression):
            raise InvalidArgument(
                f"{where}: expected exactly one of `name`, `expression` or `terms`. Received: "
                + ("none of them." if not name else "both `name` and `expression`."),
                reason="BAD_LOSS_SPEC")
        if expression:
            if self.expression_compiler is None:
                raise InvalidArgument("Expression losses are not enabled on this server.",
                                      reason="EXPRESSIONS_DISABLED")
            params = dict(spec.get("params") or {})
            entry = self.expression_compiler(expression, params, tensor_names)
            return entry, resolve_parameters(entry, params)
        entry = self.registry.get(name)
        return entry, resolve_parameters(entry, spec.get("params"))

    def _term(self, t: Mapping[str, Any], index: int, tensor_names: Sequence[str]) -> Term:
        where = f"terms[{index}]"
        entry, params = self._resolve(t.get("loss") or {}, where, tensor_names)
        inputs = tuple(t.get("inputs") or ())
        if not inputs:
            inputs = DEFAULT_INPUTS if entry.source == "keras" else entry.inputs
        elif len(inputs) != len(entry.inputs):
            raise InvalidArgument(
                f"{where}: loss `{entry.name}` reads {len(entry.inputs)} tensors "
                f"({', '.join(entry.inputs)}). Received inputs={list(inputs)}.", reason="BAD_LOSS_SPEC")
        weight = t.get("weight")
        weight = 1.0 if weight is None else float(weight)
        if not np.isfinite(weight):
            raise InvalidArgument(f"{where}: weight must be finite. Received: {weight}.",
                                  reason="BAD_LOSS_SPEC")
        reduction = t.get("reduction") or None
        if reduction is not None:
            check_reduction(reduction)
        label = t.get("label") or entry.name or f"term_{index}"  # inline expressions have no name
        return Term(label, entry, params, weight, reduction, inputs)

    def _finish_plan(self, terms: tuple[Term, ...], composite: bool) -> Plan:
        canonical = [{
            "entry": t.entry.name if t.entry.source != "expression" else None,
            "expression": t.entry.expression, "params": t.params, "label": t.label,
            "weight": t.weight, "reduction": t.reduction, "inputs": list(t.inputs),
        } for t in terms]
        key = json.dumps(canonical, sort_keys=True, default=str)
        metric_name = "composite" if composite else terms[0].entry.name or "expression"
        return Plan(terms, composite, key, metric_name)

    # -- evaluation ----------------------------------------------------------

    def evaluate(self, plan: Plan, tensors: Mapping[str, np.ndarray], *,
                 sample_weight: Optional[np.ndarray] = None, reduction: str = "sum_over_batch_size",
                 gradient: bool = False) -> Result:
        """Evaluates a plan on named tensors (``y_true``, ``y_pred`` and extras).

        Raises:
            InvalidArgument: dtypes, shapes, labels or sample weights that do
                not fit the loss, or inputs TensorFlow refuses.
        """
        check_reduction(reduction)
        y_pred = tensors.get("y_pred")
        if y_pred is None:
            raise InvalidArgument("y_pred is required.", reason="BAD_TENSOR")
        compute_dtype = dtype_name(y_pred.dtype)
        if compute_dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"y_pred: expected a floating dtype ({', '.join(FLOAT_DTYPES)}); the loss is "
                f"computed in y_pred's dtype. Received: {compute_dtype}.", reason="UNSUPPORTED_DTYPE")
        missing = sorted(plan.tensor_names - set(tensors))
        if missing:
            raise InvalidArgument(
                f"The loss reads tensor {missing[0]!r}, which the request does not carry. "
                f"Expected tensors: {sorted(plan.tensor_names)}. Received: {sorted(tensors)}.",
                reason="MISSING_TENSOR")
        self._check_inputs(plan, tensors, sample_weight, reduction)

        names = sorted(plan.tensor_names | {"y_pred"})
        arrays = [tensors[n] for n in names]
        specs = [backend.InputSpec(n, dtype_name(a.dtype), backend.signature_shape(a.shape))
                 for n, a in zip(names, arrays)]
        if sample_weight is not None:
            names.append("sample_weight")
            arrays.append(sample_weight)
            specs.append(backend.InputSpec("sample_weight", dtype_name(sample_weight.dtype),
                                           backend.signature_shape(sample_weight.shape)))
        xla = self._use_xla(plan, y_pred.size)
        key = (plan.key, reduction, gradient, xla, tuple(specs))
        compiled = self._compiled(key, plan, specs, reduction, compute_dtype,
                                  sample_weight is not None, gradient, xla)
        try:
            total, terms, grad = compiled(arrays)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise _classify(exc, plan) from exc
        non_finite = any_non_finite([total, *terms, grad, *arrays])
        term_values = [(t.label, v, t.weight) for t, v in zip(plan.terms, terms)] if plan.composite else []
        return Result(total, grad, term_values, non_finite)

    def _check_inputs(self, plan: Plan, tensors: Mapping[str, np.ndarray],
                      sample_weight: Optional[np.ndarray], reduction: str) -> None:
        for name, array in tensors.items():
            if array.dtype.kind not in "biuf" and dtype_name(array.dtype) != "bfloat16":
                raise InvalidArgument(f"{name}: expected a numeric dtype. Received: {array.dtype.name}.",
                                      reason="UNSUPPORTED_DTYPE")
        shapes = []
        for term in plan.terms:
            if len(term.inputs) == 2:
                true_name, pred_name = term.inputs
                shape = values_shape(term.entry, term.params, tensors[true_name].shape,
                                     tensors[pred_name].shape)
                check_labels(term.entry, term.params, tensors[true_name], tensors[pred_name].shape)
            else:
                shape = None
            shapes.append(shape)
            term_reduction = term.reduction or reduction
            if sample_weight is not None and shape is not None:
                check_sample_weight(sample_weight.shape, shape, term.entry.name)
            if term_reduction == "none" and plan.composite and shape is not None:
                known = [s for s, t in zip(shapes, plan.terms) if s is not None]
                if known and known[0] != shape:
                    raise InvalidArgument(
                        "Composite terms with reduction `none` must give per-sample values of one "
                        f"shape. Received: {list(known[0])} and {list(shape)} ({term.label}).",
                        reason="SHAPE_MISMATCH")
        if sample_weight is not None and sample_weight.dtype.kind not in "biuf":
            raise InvalidArgument(
                f"sample_weight: expected a numeric dtype. Received: {sample_weight.dtype.name}.",
                reason="UNSUPPORTED_DTYPE")

    def _compiled(self, key, plan: Plan, specs, reduction: str, dtype: str, has_sw: bool,
                  gradient: bool, xla: bool) -> backend.Compiled:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self._count_lookup("hit")
                return compiled
        # Tracing takes tens of milliseconds: do it outside the cache lock, one
        # compilation at a time, checking again in case another thread just
        # compiled the same key.
        with self._compile_lock:
            with self._lock:
                compiled = self._cache.get(key)
            if compiled is None:
                self._count_lookup("miss")
                compiled = backend.Compiled(
                    _program(plan, reduction, dtype), specs, has_sample_weight=has_sw, gradient=gradient,
                    device=self.device, jit_compile=xla,
                    on_trace=lambda: self._on_trace(plan))
            with self._lock:
                self._cache[key] = compiled
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                entries = len(self._cache)
        if self.metrics is not None:
            self.metrics.lossd_loss_cache_entries.set(entries)
        return compiled

    def _use_xla(self, plan: Plan, elements: int) -> bool:
        """XLA compiles once per concrete input shape (the traced graph is
        shape-polymorphic, XLA's kernels are not), so ``auto`` uses it only
        for large tensors, where one compilation pays for itself at once,
        and only for the losses measured faster with it (bench/xla.py)."""
        if self.jit_compile == "on":
            return True
        if self.jit_compile == "off":
            return False
        return elements >= XLA_MIN_ELEMENTS and all(t.entry.name in self.xla_losses for t in plan.terms)

    def _count_lookup(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_cache_lookup(result == "hit")

    def _on_trace(self, plan: Plan) -> None:
        self.compilations += 1  # traces happen under _compile_lock
        log.debug("compiling %s", plan.metric_name)
        if self.metrics is not None:
            self.metrics.observe_compilation(plan.metric_name)


def any_non_finite(arrays) -> bool:
    """Whether any floating array holds NaN or Inf.

    For large arrays, min and max propagate NaN and expose Inf without the
    temporary boolean array of ``isfinite().all()``: measured here at 3 ms
    for 1e7 float32 elements against 5 ms, and against 7 ms for the same
    check inside the TensorFlow graph (which also cost 170 µs on a small
    request). For small arrays ``isfinite().all()`` is one call instead of
    two (3 µs against 8 µs at 640 elements).
    """
    for a in arrays:
        if a is None or a.size == 0 or a.dtype.kind != "f" and dtype_name(a.dtype) != "bfloat16":
            continue
        if a.size <= ISFINITE_MAX_ELEMENTS:
            if not np.isfinite(a).all():
                return True
        elif not (np.isfinite(a.min()) and np.isfinite(a.max())):
            return True
    return False


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InvalidArgument(
            f"Invalid reduction. Expected one of {list(REDUCTIONS)}. Received: {reduction!r}.",
            reason="BAD_REDUCTION")


def check_sample_weight(sw_shape: tuple, values: tuple, loss: str) -> None:
    """Refuses a sample_weight that does not broadcast to the per-sample values
    (after Keras's rule that aligns ranks differing by a trailing 1)."""
    sw, vals = tuple(sw_shape), tuple(values)
    if len(sw) == len(vals) + 1 and sw[-1:] == (1,):
        sw = sw[:-1]
    elif len(vals) == len(sw) + 1 and vals[-1:] == (1,):
        vals = vals[:-1]
    try:
        ok = np.broadcast_shapes(sw, vals) == vals
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgument(
            f"sample_weight does not broadcast to the per-sample losses of `{loss}`. Expected a "
            f"shape that broadcasts to {list(values)}. Received: sample_weight.shape={list(sw_shape)}.",
            reason="SAMPLE_WEIGHT_MISMATCH")


def _program(plan: Plan, reduction: str, dtype: str) -> backend.Program:
    """The function a compiled graph runs: builds each term's Keras loss once,
    at trace time, and sums the weighted terms."""
    built = []
    for term in plan.terms:
        obj = term.entry.build(term.params, term.reduction or reduction, dtype)
        built.append((term, obj))

    def program(tensors, sample_weight):
        values = []
        total = None
        for term, obj in built:
            # Every entry's loss takes its inputs positionally, in entry.inputs order.
            value = obj(*[tensors[n] for n in term.inputs], sample_weight=sample_weight)
            values.append(value)
            weighted = value if term.weight == 1.0 else value * term.weight
            total = weighted if total is None else total + weighted
        return total, values

    return program


def _classify(exc: Exception, plan: Plan) -> Exception:
    """Turns what TensorFlow or Keras raise on bad input into InvalidArgument;
    anything else is a bug and goes up unchanged (INTERNAL, logged)."""
    import tensorflow as tf

    if isinstance(exc, (tf.errors.InvalidArgumentError, ValueError, TypeError)):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, tf.errors.InvalidArgumentError):
            text = getattr(exc, "message", text).strip().splitlines()[0]
        text = text[:300]
        return InvalidArgument(
            f"Loss `{plan.metric_name}` cannot be evaluated on these inputs: {text}",
            reason="EVALUATION_FAILED", metadata={"loss": plan.metric_name})
    return exc


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
