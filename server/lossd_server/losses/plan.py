"""Spec -> plan: the one place a loss specification is validated.

A *plan* is the validated, canonical form of a ``LossSpec`` (as the dict
``lossd.wire.spec_to_dict`` makes): every name resolved in the registry,
every parameter typed and range-checked with its default filled in, every
term's weight, reduction and inputs checked. Evaluate, EvaluateStream,
EvaluateChunked and CreateJob all go through ``Planner.plan``, so one spec
gets one answer (and one error, with one reason) whichever RPC carries it.

``build_program`` turns a plan into the function both evaluation and training
run: each term's ``keras.losses.Loss`` built once, the weighted sum of the
terms. There is no second composite implementation anywhere.

Nothing here imports gRPC or TensorFlow (Keras is imported where a loss is built).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from lossd import wire
from lossd_server.errors import InvalidArgument
from lossd_server.losses import expressions, reductions
from lossd_server.losses.expression_rows import rename_tensors
from lossd_server.losses.registry import LossEntry, LossRegistry, resolve_parameters

DEFAULT_INPUTS = ("y_true", "y_pred")

# expression, params, tensor names -> entry (``custom.inline_entry``).
ExpressionCompiler = Callable[[str, Mapping[str, Any], Sequence[str]], LossEntry]


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
        """Every tensor the terms require (computed once: plans are cached and reused)."""
        return frozenset(given for term in self.terms for own, given in zip(term.entry.inputs, term.inputs)
                         if own not in term.entry.optional_inputs)

    @functools.cached_property
    def optional_tensor_names(self) -> frozenset[str]:
        """The tensors terms read when the request carries them
        (``LossEntry.optional_inputs``), and not required by another term."""
        return frozenset(given for term in self.terms for own, given in zip(term.entry.inputs, term.inputs)
                         if own in term.entry.optional_inputs) - self.tensor_names

    @functools.cached_property
    def outputs(self) -> tuple[str, ...]:
        """The named outputs the program returns besides the loss
        (``LossEntry.outputs``), in term order; the planner keeps them unique."""
        return tuple(name for term in self.terms for name in term.entry.outputs)

    def to_spec(self) -> dict[str, Any]:
        """A self-contained spec dict that plans back to an equal program.

        A registered expression loss is written out as its expression text,
        so the spec keeps its meaning if the loss is later replaced or
        deleted (training jobs store this form).
        """
        def loss(term: Term) -> dict[str, Any]:
            if term.entry.source == "expression":
                # Written over the tensors the term reads, as an inline expression would be.
                mapping = {own: given for own, given in zip(term.entry.inputs, term.inputs) if own != given}
                text = rename_tensors(term.entry.expression, mapping) if mapping else term.entry.expression
                return {"expression": text, "params": dict(term.params)}
            return {"name": term.entry.name, "params": dict(term.params)}

        if not self.composite:
            return loss(self.terms[0])
        return {"terms": [{"label": t.label, "loss": loss(t), "weight": t.weight, "reduction": t.reduction,
                           "inputs": list(t.inputs)} for t in self.terms]}


class Planner:
    """Turns loss specs into plans against a registry.

    Args:
        registry: Where loss names resolve.
        expression_compiler: Turns an inline expression into an entry
            (``custom.inline_entry``); None refuses expressions.
        max_terms: Most terms a composite may have (``max_composite_terms``);
            None is unlimited.
        max_nodes: Most expression parts a plan may have over all its terms
            (``max_program_nodes``); a term that is not an expression counts
            as one part. Tracing time and the compiled graph's memory grow
            with it. None is unlimited.
    """

    def __init__(self, registry: LossRegistry, expression_compiler: Optional[ExpressionCompiler] = None,
                 max_terms: Optional[int] = None, max_nodes: Optional[int] = None):
        self.registry = registry
        self.expression_compiler = expression_compiler
        self.max_terms = max_terms
        self.max_nodes = max_nodes

    def plan(self, spec: Mapping[str, Any], tensor_names: Sequence[str] = DEFAULT_INPUTS) -> Plan:
        """Validates a loss spec (``{"name", "params"}``, ``{"expression", "params"}``
        or ``{"terms": [...]}``) into a Plan.

        Args:
            spec: The dict form of a LossSpec (``lossd.wire.spec_to_dict``).
            tensor_names: The tensors the request carries: the names an
                inline expression may read.

        Raises:
            InvalidArgument: with reason ``BAD_LOSS_SPEC``, ``UNKNOWN_LOSS``,
                ``UNKNOWN_PARAMETER``, ``BAD_PARAMETER``,
                ``PARAMETER_OUT_OF_RANGE``, ``BAD_EXPRESSION``, ``BAD_REDUCTION`` or
                ``TOO_MANY_TERMS``.
        """
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"A loss spec is a dict. Received: {type(spec).__name__}.",
                                  reason="BAD_LOSS_SPEC")
        tensor_names = tuple(tensor_names)
        terms_spec = spec.get("terms") or []
        if terms_spec:
            if spec.get("name") or spec.get("expression"):
                raise InvalidArgument(
                    "A composite loss sets `terms` only. Expected `name`, `expression` or `terms`. "
                    f"Received: terms and {'name' if spec.get('name') else 'expression'}.",
                    reason="BAD_LOSS_SPEC")
            if spec.get("params"):
                raise InvalidArgument(
                    "A composite loss takes its parameters in each term. Expected `params` inside "
                    "`terms[i].loss`. Received: top-level params.", reason="BAD_LOSS_SPEC")
            if self.max_terms is not None and hasattr(terms_spec, "__len__") and len(terms_spec) > self.max_terms:
                # Checked before any term is compiled: each one costs compile time.
                raise InvalidArgument(
                    f"A composite loss has at most {self.max_terms} terms (the server's max_composite_terms). "
                    f"Expected at most {self.max_terms}. Received: {len(terms_spec)}.",
                    reason="TOO_MANY_TERMS",
                    metadata={"limit": str(self.max_terms), "received": str(len(terms_spec))})
            terms = tuple(self._term(t, i, tensor_names) for i, t in enumerate(terms_spec))
            labels = [t.label for t in terms]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise InvalidArgument(
                    "Composite term labels must be unique; set `label` on each term. Expected distinct labels. "
                    f"Received: {dupes[0]!r} twice.", reason="BAD_LOSS_SPEC")
            outputs = [name for t in terms for name in t.entry.outputs]
            twice = sorted({x for x in outputs if outputs.count(x) > 1})
            if twice:
                raise InvalidArgument(
                    f"Composite terms return named outputs, which must be unique. Expected at most one term "
                    f"returning {twice[0]!r}. Received: {outputs.count(twice[0])}.", reason="BAD_LOSS_SPEC")
            return self._checked(_finish(terms, composite=True))
        entry, params = self._resolve(spec, "loss", tensor_names)
        inputs = entry.inputs if entry.source != "keras" else DEFAULT_INPUTS
        return self._checked(_finish((Term(entry.name, entry, params, 1.0, None, inputs),), composite=False))

    def _checked(self, plan: Plan) -> Plan:
        """Refuses a plan above ``max_nodes`` expression parts, before anything is traced."""
        if self.max_nodes is None:
            return plan
        parts = sum(expressions.size(t.entry.expression) if t.entry.expression else 1 for t in plan.terms)
        if parts > self.max_nodes:
            raise InvalidArgument(
                f"Loss `{plan.metric_name}` has {parts} expression parts over its terms. Expected at most "
                f"{self.max_nodes} (the server's max_program_nodes): compiling grows with them. Received: "
                f"{parts}.", reason="PROGRAM_TOO_LARGE",
                metadata={"limit": str(self.max_nodes), "received": str(parts)})
        return plan

    def _resolve(self, spec: Any, where: str, tensor_names: Sequence[str]) -> tuple[LossEntry, dict]:
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{where}: expected a loss (a dict with `name` or `expression`). "
                                  f"Received: {type(spec).__name__}.", reason="BAD_LOSS_SPEC")
        name, expression = spec.get("name") or "", spec.get("expression") or ""
        if spec.get("terms"):
            raise InvalidArgument(f"{where}: a composite cannot be nested inside a term. Expected a `name` or an "
                                  "`expression`. Received: `terms`.", reason="BAD_LOSS_SPEC")
        if not isinstance(name, str) or not isinstance(expression, str):
            raise InvalidArgument(f"{where}: `name` and `expression` are strings.", reason="BAD_LOSS_SPEC")
        if bool(name) == bool(expression):
            raise InvalidArgument(
                f"{where}: expected exactly one of `name`, `expression` or `terms`. Received: "
                + ("none of them." if not name else "both `name` and `expression`."),
                reason="BAD_LOSS_SPEC")
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise InvalidArgument(f"{where}: `params` is an object. Received: {type(params).__name__}.",
                                  reason="BAD_PARAMETER")
        if expression:
            if self.expression_compiler is None:
                raise InvalidArgument("Expression losses are not enabled on this server.",
                                      reason="EXPRESSIONS_DISABLED")
            entry = self.expression_compiler(expression, dict(params), tensor_names)
            return entry, resolve_parameters(entry, params)
        entry = self.registry.get(name)
        return entry, resolve_parameters(entry, params)

    def _term(self, t: Any, index: int, tensor_names: Sequence[str]) -> Term:
        where = f"terms[{index}]"
        if not isinstance(t, Mapping):
            raise InvalidArgument(f"{where}: expected a term (a dict with `loss`). Received: {type(t).__name__}.",
                                  reason="BAD_LOSS_SPEC")
        entry, params = self._resolve(t.get("loss") or {}, where, tensor_names)
        inputs = tuple(t.get("inputs") or ())
        if not inputs:
            inputs = DEFAULT_INPUTS if entry.source == "keras" else entry.inputs
        elif len(inputs) != len(entry.inputs):
            raise InvalidArgument(
                f"{where}: loss `{entry.name or 'expression'}` reads {len(entry.inputs)} tensors. Expected "
                f"{len(entry.inputs)} inputs (for {', '.join(entry.inputs)}). Received: inputs={list(inputs)}.",
                reason="BAD_LOSS_SPEC")
        weight = t.get("weight")
        if weight is None:
            weight = 1.0
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidArgument(f"{where}: invalid weight. Expected a finite number. Received: {weight!r}.",
                                  reason="BAD_LOSS_SPEC")
        reduction = t.get("reduction") or None
        if reduction is not None:
            wire.check_reduction(reduction, field=f"{where}.reduction")
        label = t.get("label") or entry.name or f"term_{index}"  # inline expressions have no name
        return Term(label, entry, params, float(weight), reduction, inputs)


def _finish(terms: tuple[Term, ...], composite: bool) -> Plan:
    canonical = [{
        "entry": t.entry.name if t.entry.source != "expression" else None,
        "expression": t.entry.expression, "params": t.params, "label": t.label,
        "weight": t.weight, "reduction": t.reduction, "inputs": list(t.inputs),
    } for t in terms]
    key = json.dumps(canonical, sort_keys=True, default=str)
    metric_name = "composite" if composite else terms[0].entry.name or "expression"
    return Plan(terms, composite, key, metric_name)


# A loss program: takes the named tensors (and optionally sample_weight),
# returns (total, term values, named outputs).
Program = Callable[[Mapping[str, Any], Optional[Any]], tuple[Any, list, dict]]


def build_program(plan: Plan, reduction: str, dtype: str) -> Program:
    """The function evaluation compiles and training calls: builds each term's
    Keras loss once, then returns ``(weighted sum of the terms, term values,
    named outputs)``. The outputs (``LossEntry.outputs``, such as
    ``matrix_crossentropy``'s updated matrix) are computed in the same
    program, from the same inputs; they are empty for most losses.

    Each term uses its own reduction, or ``reduction`` where it sets none.
    An optional input the tensors lack is passed as None.

    The program's ``initial_outputs(y_pred_shape)`` is the state the outputs
    start from (what each term uses when its optional input is absent), for
    a caller that keeps the state, as a training job does.
    """
    built = [(term, term.entry.build(term.params, term.reduction or reduction, dtype)) for term in plan.terms]

    def program(tensors, sample_weight):
        values = []
        outputs = {}
        for term, obj in built:
            # Every entry's loss takes its inputs positionally, in entry.inputs order.
            inputs = [tensors.get(n) for n in term.inputs]
            values.append(obj(*inputs, sample_weight=sample_weight))
            if term.entry.outputs:
                outputs.update(obj.outputs(*inputs))
        return weighted_sum(plan.terms, values), values, outputs

    def initial_outputs(y_pred_shape):
        return {name: value for term, obj in built if term.entry.outputs
                for name, value in obj.initial_outputs(y_pred_shape).items()}

    program.initial_outputs = initial_outputs
    return program


def weighted_sum(terms: Sequence[Term], values: Sequence[Any]):
    """A composite's total: each term's value times its weight, summed (a
    weight of 1 multiplies nothing). The one composite weighting: programs
    and a multi-worker job's shares (``multiworker.worker_share``) use it."""
    total = None
    for term, value in zip(terms, values):
        weighted = value if term.weight == 1.0 else value * term.weight
        total = weighted if total is None else total + weighted
    return total


# The inputs of a rows program besides y_true, y_pred and sample_weight.
ROW_SEGMENTS = "segments"             # (rows,) int32: the request each row belongs to, ascending
ROW_DIVISOR_ROWS = "divisor_rows"     # (requests,) float64: rows counted by the divisor
ROW_DIVISOR_FIXED = "divisor_fixed"   # (requests,) float64: the divisor's fixed part
ROW_PARAMETER_PREFIX = "param_"       # + name: one value per row, shaped to broadcast along the rows


def row_family(plan: Plan) -> Optional[tuple[str, tuple[str, ...]]]:
    """What plans may share one rows program: a key equal for plans that
    differ only in the values of their entry's ``row_parameters``, and the
    names of those parameters. None for a composite, or a loss with
    outputs (its state is updated from the whole batch): not batched."""
    if plan.composite or plan.outputs:
        return None
    term = plan.terms[0]
    names = tuple(sorted(p for p in term.entry.row_parameters if isinstance(term.params.get(p), float)))
    params = {k: ("<per row>" if k in names else v) for k, v in term.params.items()}
    key = json.dumps({"entry": term.entry.name if term.entry.source != "expression" else None,
                      "expression": term.entry.expression, "params": params, "inputs": list(term.inputs)},
                     sort_keys=True, default=str)
    return key, names


def build_rows_program(plan: Plan, dtype: str, row_params: Sequence[str], *, padded: bool = False) -> Program:
    """The program that evaluates several requests of one family (``row_family``)
    in one call, their rows concatenated along the first axis.

    The term's Keras loss (reduction ``none``) computes every row's values
    once, the ``row_params`` read from tensors of one value per row; the
    values are weighted, and each request's are summed (in float64) and
    divided by its own divisor ``divisor_rows * values per row +
    divisor_fixed`` (``reductions.divisor``, with ``reductions.divide``), as
    Keras's ``reduce_values`` does for that request alone. The total is the sum of
    the requests' reduced losses: its gradient with respect to the
    concatenated y_pred is, in each request's rows, that request's own
    gradient. Returns ``(total, [reduced loss per request, weighted values], {})``.

    ``padded``: the call's rows and requests are padded to fixed counts
    (``evaluation.buckets``), so that one XLA executable of static shapes
    serves any smaller call. The padding rows form requests of their own
    whose divisor is 0, which ``divide_no_nan`` turns into 0 whatever their
    values (NaN included): they add nothing to the total, to its gradient or
    to any real request's loss. The number of requests is then the
    divisors' static length, not the data's largest segment id, which XLA
    could not compile.
    """
    from keras import ops

    term = plan.terms[0]

    def program(tensors, sample_weight):
        params = dict(term.params)
        for name in row_params:
            params[name] = tensors[ROW_PARAMETER_PREFIX + name]
        loss = term.entry.build(params, wire.REDUCTION_NONE, dtype)
        values = loss(*[tensors[n] for n in term.inputs])
        if sample_weight is not None:
            values = values * sample_weight
        per_row = ops.reshape(ops.cast(values, "float64"), (ops.shape(values)[0], -1))
        divisors = (tensors[ROW_DIVISOR_ROWS] * ops.cast(ops.shape(per_row)[1], "float64")
                    + tensors[ROW_DIVISOR_FIXED])
        if padded:
            sums = ops.segment_sum(ops.sum(per_row, axis=1), tensors[ROW_SEGMENTS],
                                   num_segments=ops.shape(divisors)[0])
        else:
            sums = ops.segment_sum(ops.sum(per_row, axis=1), tensors[ROW_SEGMENTS], sorted=True)
        reduced = ops.cast(reductions.divide(sums, divisors), dtype)
        return ops.sum(reduced), [reduced, values], {}

    return program
