"""The loss registry: every loss lossd can evaluate, with its parameters.

The Keras part of the table is an allowlist of Keras classes grouped by
family, as in ``keras.losses``. Parameters, defaults and docs are read from
the classes themselves (``inspect.signature`` and the ``Args:`` section of
the docstring), so they cannot drift from the installed Keras. Each entry
builds a real ``keras.losses.Loss`` instance; lossd never reimplements a loss.

Parameter values are validated here (type, range, unknown names) and input
shapes are checked against what the loss expects, so that bad input is
refused with a clear message before it reaches TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import sys
import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from lossd.wire import REDUCTION_NONE
from lossd_server.errors import InvalidArgument
from lossd_server.losses import cost as costs
# How per-sample values depend on the rows of the inputs (LossEntry.row_structure);
# the expression language owns the analysis, the Keras table declares it.
from lossd_server.losses.expression_rows import ROWS, ROWS_COSINE, ROWS_MEAN, ROWS_SUM, RowStructure  # noqa: F401


# Keras constructor arguments that lossd sets itself, never the client.
_RESERVED = {"self", "reduction", "name", "dtype"}

PARAM_TYPES = ("float", "int", "bool", "int_or_null", "axis", "string")
INT32_LIMIT = 2 ** 31


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A constructor parameter of a loss, under its Keras name."""

    name: str
    type: str
    default: Any
    doc: str = ""
    minimum: Optional[float] = None
    exclusive_minimum: bool = False
    maximum: Optional[float] = None


# Shape conventions: how y_true relates to y_pred, and the shape of the
# per-sample values the loss returns (what sample_weight must broadcast to).
SHAPES_SAME = "same"        # y_true has y_pred's shape (Keras's trailing-1 rule allowed)
SHAPES_SPARSE = "sparse"    # y_true holds class indices: y_pred's shape without the class axis
SHAPES_LABELS = "labels"    # y_true is (batch,) labels, y_pred (batch, features): circle
SHAPES_CTC = "ctc"          # y_true (batch, max_label_length), y_pred (batch, time, classes)
SHAPES_ANY = "any"          # expression and plugin losses: checked when they run



@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One registered loss.

    Attributes:
        name: Canonical snake_case name.
        aliases: Other names that resolve to it.
        doc: One-line description.
        parameters: Constructor parameters, in order.
        build: ``build(params, reduction, dtype) -> keras.losses.Loss``.
        source: ``keras``, ``builtin``, ``plugin`` or ``expression``.
        inputs: Names of the tensors the loss reads, in the order it takes them.
        shapes: The shape convention (``SHAPES_*``).
        row_structure: ``row_structure(params, ranks)`` says how the
            per-sample values depend on the rows (first axis) of the inputs,
            given each input's rank (after Keras's trailing-1 alignment): a
            ``RowStructure`` of kind ``ROWS``, ``ROWS_MEAN`` or ``ROWS_SUM``
            (with the values' rank where the shape convention does not give
            it), or None (coupled). It decides
            whether and how EvaluateChunked may split a request
            (``lossd_server.evaluation.chunks``). None is always safe.
        hinge_labels: The loss turns {0, 1} labels into {-1, 1} when *every*
            label of the batch is 0 or 1 (Keras's hinge losses), a property
            of the whole batch that a split must preserve.
        expression: Source text, for expression losses.
        value_shapes: ``value_shapes(shapes)``, given each input's shape by
            the entry's own input names, is an ``expression_shapes.ValueShapes``:
            the element count of the largest value the loss computes and
            the per-sample values' shape (raising ``expression_shapes.ShapeError``
            when the shapes cannot work), or None when unknown. Expression
            entries answer it from the expression tree, so the evaluator
            refuses a huge broadcast before tracing.
        row_parameters: The numeric parameters that may differ from row to
            row: Keras uses them only in elementwise tensor arithmetic, so
            the loss accepts a tensor of one value per row in their place
            (``lossd_server.evaluation.batching`` evaluates requests with
            different values in one call). An explicit allow-list, checked
            against Keras by tests/server/evaluation/test_batching.py; a parameter Keras
            branches on in Python (``if label_smoothing:``) is never in it.
        optional_inputs: Those of ``inputs`` a request may leave out: the
            loss then starts from a documented default (a stateful loss's
            initial state). The others are required.
        outputs: Names of the tensors the loss returns besides its value
            (a stateful loss's updated state): its built object has a method
            ``outputs(*inputs) -> {name: tensor}`` taking its inputs as the
            loss does (None for an optional input left out), run in the same
            compiled program, and ``initial_outputs(y_pred_shape)``, the state
            it starts from. A loss with outputs is never split into rows
            (batching, EvaluateChunked): its state is updated from the whole batch.
        check_tensors: ``check_tensors(params, tensors)``, given the tensors
            present by the entry's own input names, refuses those the shape
            conventions cannot judge (a state of the wrong shape or dtype)
            with InvalidArgument, before anything is traced.
        cost: ``cost(params, shapes, itemsize, gradient) -> cost.Cost``: the
            work and memory evaluating the loss takes on inputs of these
            shapes (by the entry's own input names), from the shapes alone
            (``lossd_server.losses.cost``). Linear in the elements unless
            the entry declares otherwise.
    """

    name: str
    aliases: tuple[str, ...]
    doc: str
    parameters: tuple[Parameter, ...]
    build: Callable[[Mapping[str, Any], str, str], Any]
    source: str = "keras"
    inputs: tuple[str, ...] = ("y_true", "y_pred")
    shapes: str = SHAPES_SAME
    row_structure: Callable[[Mapping[str, Any], Mapping[str, int]], Optional[RowStructure]] = \
        lambda params, ranks: None
    hinge_labels: bool = False
    expression: str = ""
    value_shapes: Callable[[Mapping[str, tuple]], Any] = lambda shapes: None
    row_parameters: frozenset[str] = frozenset()
    optional_inputs: frozenset[str] = frozenset()
    outputs: tuple[str, ...] = ()
    check_tensors: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], None] = lambda params, tensors: None
    cost: costs.CostFunction = costs.elementwise

    def describe(self) -> dict:
        """A JSON-friendly description, as ListLosses returns it."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "doc": self.doc,
            "source": self.source,
            "inputs": list(self.inputs),
            "expression": self.expression,
            "parameters": [
                {"name": p.name, "type": p.type, "default": p.default, "doc": p.doc}
                for p in self.parameters
            ],
        }


# ---------------------------------------------------------------------------
# Reading parameters and docs off the Keras classes.

_ARG_LINE = re.compile(r"^(\s*)(\w+):\s*(.*)$")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    return (match.group(1) if match else text).strip()


def _docstring_args(doc: str) -> dict[str, str]:
    """Parses the Google-style ``Args:`` section into ``{name: first sentence}``."""
    lines = inspect.cleandoc(doc or "").splitlines()
    args: dict[str, list[str]] = {}
    inside, indent, current = False, None, None
    for line in lines:
        if line.strip() == "Args:":
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if line.strip() and not line.startswith(" "):
            break  # the next section ("Example:", "Returns:") ends Args
        match = _ARG_LINE.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            current = match.group(2)
            args[current] = [match.group(3)]
        elif current and line.strip():
            args[current].append(line.strip())
    return {name: _first_sentence(" ".join(parts)) for name, parts in args.items()}


def _param_type(name: str, default: Any) -> str:
    if name == "axis":
        return "axis"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, float):
        return "float"
    if isinstance(default, int):
        return "int"
    if isinstance(default, str):
        return "string"
    if default is None:
        return "int_or_null"
    raise TypeError(f"cannot infer the type of parameter {name}={default!r}")


# Ranges Keras documents but does not always check; checking them here turns
# a NaN or a TensorFlow error minutes later into a clear INVALID_ARGUMENT now.
# Keyed by (loss name or "*", parameter): (minimum, exclusive, maximum).
_RANGES: dict[tuple[str, str], tuple[Optional[float], bool, Optional[float]]] = {
    ("huber", "delta"): (0.0, True, None),
    ("*", "label_smoothing"): (0.0, False, 1.0),
    ("binary_focal_crossentropy", "gamma"): (0.0, False, None),
    ("categorical_focal_crossentropy", "gamma"): (0.0, False, None),
    ("binary_focal_crossentropy", "alpha"): (0.0, False, 1.0),
    ("categorical_focal_crossentropy", "alpha"): (0.0, False, 1.0),
    ("categorical_generalized_cross_entropy", "q"): (0.0, True, 1.0),
    ("tversky", "alpha"): (0.0, False, None),
    ("tversky", "beta"): (0.0, False, None),
    ("circle", "gamma"): (0.0, True, None),
}


def keras_parameters(name: str, cls: type) -> tuple[Parameter, ...]:
    """The parameters of a Keras loss class, read from its signature and docstring
    (falling back to the docstring of Keras's function of the same name, which
    documents some arguments the class leaves out, such as ``ignore_class``)."""
    import keras

    function = getattr(keras.losses, name, None)
    docs = _docstring_args(getattr(function, "__doc__", "") or "")
    docs.update({k: v for k, v in _docstring_args(cls.__doc__ or "").items() if v})
    params = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in _RESERVED or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        lo, excl, hi = _RANGES.get((name, p.name)) or _RANGES.get(("*", p.name)) or (None, False, None)
        params.append(Parameter(p.name, _param_type(p.name, default), default,
                                docs.get(p.name, ""), lo, excl, hi))
    return tuple(params)


def _keras_entry(name: str, cls: type, aliases: Sequence[str] = (), *, shapes: str = SHAPES_SAME,
                 over_rows: Optional[str] = None, coupled: bool = False, hinge_labels: bool = False,
                 row_parameters: Sequence[str] = (), cost: costs.CostFunction = costs.elementwise) -> LossEntry:
    """An entry for a Keras loss class.

    ``over_rows`` is how the loss combines rows when it reduces over the row
    axis (a rank-1 input, or an ``axis`` that names axis 0): ``ROWS_MEAN``
    for the losses that average an elementwise term over the last axis,
    ``ROWS_SUM`` for those that sum one, ``ROWS_COSINE`` for the cosine
    similarity (a function of three sums over the rows), None when the
    reduction couples the rows otherwise (normalisation, max, ratios of sums). ``coupled`` marks a
    loss whose samples always depend on each other (circle). ``row_parameters``
    is ``LossEntry.row_parameters``; ``cost`` is ``LossEntry.cost``.
    """
    def build(params: Mapping[str, Any], reduction: str, dtype: str):
        return cls(**params, reduction=reduction, dtype=dtype)

    all_aliases = tuple(dict.fromkeys([cls.__name__, *aliases]))
    parameters = keras_parameters(name, cls)
    has_axis = any(p.name == "axis" for p in parameters)

    def row_structure(params: Mapping[str, Any], ranks: Mapping[str, int]) -> Optional[RowStructure]:
        if coupled:
            return None
        rank = ranks.get("y_pred", 0)
        if rank < 1 or (shapes == SHAPES_SPARSE and rank < 2):
            return None  # no row axis to split along (sparse labels would be scalars)
        axis = params.get("axis", -1) if has_axis else -1
        axes = range(rank) if axis is None else [a % rank for a in (axis if isinstance(axis, list) else [axis])]
        kind = over_rows if 0 in axes else ROWS
        return RowStructure(kind) if kind else None

    all_aliases = tuple(dict.fromkeys([cls.__name__, *aliases]))
    return LossEntry(name=name, aliases=all_aliases, doc=_first_sentence(cls.__doc__ or name),
                     parameters=parameters, build=build, shapes=shapes, row_structure=row_structure,
                     hinge_labels=hinge_labels, row_parameters=frozenset(row_parameters), cost=cost)


def keras_entries() -> list[LossEntry]:
    """The Keras losses lossd exposes, grouped by family as in ``keras.losses``."""
    from keras import losses as kl

    return [
        # Probabilistic
        _keras_entry("binary_crossentropy", kl.BinaryCrossentropy, ["bce"], over_rows=ROWS_MEAN),
        _keras_entry("binary_focal_crossentropy", kl.BinaryFocalCrossentropy, ["bfce"], over_rows=ROWS_MEAN,
                     row_parameters=["gamma", "alpha"]),
        _keras_entry("categorical_crossentropy", kl.CategoricalCrossentropy, ["cce"]),
        _keras_entry("categorical_focal_crossentropy", kl.CategoricalFocalCrossentropy, ["cfce"],
                     row_parameters=["gamma", "alpha"]),
        _keras_entry("sparse_categorical_crossentropy", kl.SparseCategoricalCrossentropy,
                     ["scce"], shapes=SHAPES_SPARSE),
        _keras_entry("categorical_generalized_cross_entropy", kl.CategoricalGeneralizedCrossEntropy,
                     ["gce"], shapes=SHAPES_SPARSE),
        _keras_entry("kl_divergence", kl.KLDivergence, ["kld", "kullback_leibler_divergence"], over_rows=ROWS_SUM),
        _keras_entry("poisson", kl.Poisson, over_rows=ROWS_MEAN),
        # Regression
        _keras_entry("mean_squared_error", kl.MeanSquaredError, ["mse"], over_rows=ROWS_MEAN),
        _keras_entry("mean_absolute_error", kl.MeanAbsoluteError, ["mae"], over_rows=ROWS_MEAN),
        _keras_entry("mean_absolute_percentage_error", kl.MeanAbsolutePercentageError, ["mape"],
                     over_rows=ROWS_MEAN),
        _keras_entry("mean_squared_logarithmic_error", kl.MeanSquaredLogarithmicError, ["msle"],
                     over_rows=ROWS_MEAN),
        _keras_entry("cosine_similarity", kl.CosineSimilarity, over_rows=ROWS_COSINE),
        _keras_entry("huber", kl.Huber, ["huber_loss"], over_rows=ROWS_MEAN, row_parameters=["delta"]),
        _keras_entry("log_cosh", kl.LogCosh, ["logcosh"], over_rows=ROWS_MEAN),
        # Hinge
        _keras_entry("hinge", kl.Hinge, over_rows=ROWS_MEAN, hinge_labels=True),
        _keras_entry("squared_hinge", kl.SquaredHinge, over_rows=ROWS_MEAN, hinge_labels=True),
        _keras_entry("categorical_hinge", kl.CategoricalHinge),
        # Image segmentation
        _keras_entry("dice", kl.Dice),
        _keras_entry("tversky", kl.Tversky),
        # Similarity: each sample's value depends on the whole batch.
        _keras_entry("circle", kl.Circle, shapes=SHAPES_LABELS, coupled=True, cost=costs.circle),
        # Sequence
        _keras_entry("ctc", kl.CTC, shapes=SHAPES_CTC, cost=costs.ctc),
    ]


# ---------------------------------------------------------------------------
# Validation of parameters and inputs.

def _type_error(loss: str, param: Parameter, value: Any) -> InvalidArgument:
    expected = {
        "float": "a number", "int": "an integer", "bool": "true or false",
        "int_or_null": "an integer or null", "axis": "an integer, a list of integers or null",
        "string": "a string",
    }[param.type]
    return InvalidArgument(
        f"Invalid value for parameter `{param.name}` of loss `{loss}`. Expected {expected}. "
        f"Received: {param.name}={json.dumps(value) if _jsonable(value) else repr(value)}.",
        reason="BAD_PARAMETER", metadata={"loss": loss, "parameter": param.name})


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def as_int(value: Any) -> Optional[int]:
    """An integral number as an int, else None."""
    # google.protobuf.Struct carries every number as a double.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def coerce_parameter(loss: str, param: Parameter, value: Any) -> Any:
    """Checks one parameter value's type and range; returns it in its Python type."""
    if param.type == "bool":
        if not isinstance(value, bool):
            raise _type_error(loss, param, value)
        return value
    if param.type == "string":
        if not isinstance(value, str):
            raise _type_error(loss, param, value)
        return value
    if param.type in ("int", "int_or_null"):
        if value is None and param.type == "int_or_null":
            return None
        integer = as_int(value)
        if integer is None:
            raise _type_error(loss, param, value)
        if not -INT32_LIMIT <= integer < INT32_LIMIT:  # TensorFlow takes these as int32
            raise InvalidArgument(
                f"Invalid value for parameter `{param.name}` of loss `{loss}`. Expected an integer in "
                f"[-2^31, 2^31). Received: {param.name}={integer}.", reason="PARAMETER_OUT_OF_RANGE",
                metadata={"loss": loss, "parameter": param.name})
        value = integer
    elif param.type == "axis":
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            axes = [as_int(v) for v in value]
            if not axes or any(a is None for a in axes):
                raise _type_error(loss, param, value)
            return axes
        integer = as_int(value)
        if integer is None:
            raise _type_error(loss, param, value)
        return integer
    elif param.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _type_error(loss, param, value)
        value = float(value)
        if value != 0.0 and abs(value) < sys.float_info.min:
            # TensorFlow's kernels flush subnormal numbers to zero and XLA's
            # keep them, so gamma=1e-309 answered like 0 eagerly and like
            # itself in an XLA bucket (NaN where the focal factor's base is
            # NaN). Flushed here, every path answers as Keras's eager kernels do.
            _check_range(loss, param, value)
            try:
                _check_range(loss, param, 0.0)
            except InvalidArgument:
                raise InvalidArgument(
                    f"Invalid value for parameter `{param.name}` of loss `{loss}`. Expected a value that is "
                    f"not subnormal (TensorFlow computes {value:g} as 0, which this parameter does not take). "
                    f"Received: {param.name}={value:g}.", reason="PARAMETER_OUT_OF_RANGE",
                    metadata={"loss": loss, "parameter": param.name}) from None
            return 0.0
    _check_range(loss, param, value)
    return value


def _check_range(loss: str, param: Parameter, value: float) -> None:
    lo, hi = param.minimum, param.maximum
    ok = True
    if lo is not None:
        ok = value > lo if param.exclusive_minimum else value >= lo
    if hi is not None:
        ok = ok and value <= hi
    if ok:
        return
    low = "" if lo is None else (f"> {lo:g}" if param.exclusive_minimum else f">= {lo:g}")
    high = "" if hi is None else f"<= {hi:g}"
    expected = " and ".join(part for part in (low, high) if part)
    raise InvalidArgument(
        f"Invalid value for parameter `{param.name}` of loss `{loss}`. Expected a value {expected}. "
        f"Received: {param.name}={value:g}.", reason="PARAMETER_OUT_OF_RANGE",
        metadata={"loss": loss, "parameter": param.name})


def resolve_parameters(entry: LossEntry, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Validates client parameters against an entry; returns all of them, defaults filled in."""
    params = dict(params or {})
    known = {p.name: p for p in entry.parameters}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidArgument(
            f"Unknown parameter `{unknown[0]}` for loss `{entry.name}`. Expected one of "
            f"[{', '.join(known) or 'no parameters'}]. Received: {', '.join(unknown)}.",
            reason="UNKNOWN_PARAMETER", metadata={"loss": entry.name, "parameter": unknown[0]})
    resolved = {}
    for name, param in known.items():
        resolved[name] = coerce_parameter(entry.name, param, params[name]) if name in params else param.default
    return resolved


def _shape_error(entry: LossEntry, what: str, true_shape, pred_shape) -> InvalidArgument:
    return InvalidArgument(
        f"Shape mismatch for loss `{entry.name}`: expected {what}. "
        f"Received: y_true.shape={list(true_shape)}, y_pred.shape={list(pred_shape)}.",
        reason="SHAPE_MISMATCH", metadata={"loss": entry.name})


def align_ranks(true_shape: tuple, pred_shape: tuple) -> tuple[tuple, tuple]:
    """Keras's ``squeeze_or_expand_to_same_rank`` on shapes: ranks that differ
    by one with a trailing 1 are aligned (a rank-1 partner is expanded,
    otherwise the trailing 1 is squeezed) before the loss runs."""
    a, b = tuple(true_shape), tuple(pred_shape)
    if len(a) == len(b) + 1 and a[-1:] == (1,):
        return (a, b + (1,)) if len(b) == 1 else (a[:-1], b)
    if len(b) == len(a) + 1 and b[-1:] == (1,):
        return (a + (1,), b) if len(a) == 1 else (a, b[:-1])
    return a, b


def values_shape(entry: LossEntry, params: Mapping[str, Any], true_shape: tuple,
                 pred_shape: tuple) -> Optional[tuple]:
    """Checks y_true's shape against y_pred's; returns the per-sample values' shape.

    Returns None where the shape is only known once the loss runs.
    """
    true_shape, pred_shape = tuple(true_shape), tuple(pred_shape)
    if entry.shapes == SHAPES_ANY:
        return None
    if entry.shapes == SHAPES_SAME:
        a, b = align_ranks(true_shape, pred_shape)
        if a != b:
            error = _shape_error(entry, "the same shape (a trailing dimension of 1 may differ)",
                                 true_shape, pred_shape)
            if (entry.name.startswith("categorical_") and len(pred_shape) >= 1
                    and true_shape in (pred_shape[:-1], pred_shape[:-1] + (1,))):
                # y_true holds one class index per row, where this loss wants
                # one-hot rows: name what fits, as CreateJob does.
                twin = "sparse_categorical_crossentropy"
                error = InvalidArgument(
                    f"{error.message} y_true looks like integer class labels, but `{entry.name}` takes one-hot "
                    f"labels. Use one-hot y_true of shape {list(pred_shape)}"
                    + (f", or `{twin}`, which takes class indices." if entry.name == "categorical_crossentropy"
                       else " (keras.utils.to_categorical)."),
                    reason="SHAPE_MISMATCH", metadata=error.metadata)
            raise error
        if len(b) == 0:  # y_pred () or, aligned with a y_true of shape (), y_pred (1,)
            raise _shape_error(entry, "y_pred of rank >= 1 after aligning ranks", true_shape, pred_shape)
        pred_shape = b
        axis = params.get("axis", -1) if any(p.name == "axis" for p in entry.parameters) else -1
        if axis is None:
            return ()
        axes = [a % len(pred_shape) for a in (axis if isinstance(axis, list) else [axis])]
        if any(not 0 <= a < len(pred_shape) for a in axes):
            raise InvalidArgument(
                f"Invalid `axis` for loss `{entry.name}`: expected axes within rank {len(pred_shape)}. "
                f"Received: axis={axis}.", reason="BAD_PARAMETER")
        return tuple(d for i, d in enumerate(pred_shape) if i not in axes)
    if entry.shapes == SHAPES_SPARSE:
        if len(pred_shape) < 1 or true_shape not in (pred_shape[:-1], pred_shape[:-1] + (1,)):
            raise _shape_error(entry, f"y_true of shape {list(pred_shape[:-1])} holding class "
                               "indices (y_pred's shape without its last axis)", true_shape, pred_shape)
        return pred_shape[:-1]
    if entry.shapes == SHAPES_LABELS:
        if len(pred_shape) != 2 or true_shape != pred_shape[:1]:
            raise _shape_error(entry, "y_true of shape [batch] (labels) and y_pred of shape "
                               "[batch, features]", true_shape, pred_shape)
        return pred_shape[:1]
    if entry.shapes == SHAPES_CTC:
        if len(true_shape) != 2 or len(pred_shape) != 3 or true_shape[0] != pred_shape[0]:
            raise _shape_error(entry, "y_true of shape [batch, max_label_length] and y_pred of "
                               "shape [batch, time, classes]", true_shape, pred_shape)
        return pred_shape[:1]
    raise AssertionError(entry.shapes)


def check_labels(entry: LossEntry, params: Mapping[str, Any], y_true: np.ndarray,
                 y_pred_shape: tuple) -> None:
    """Refuses class indices outside ``[0, classes)``, which TensorFlow would
    reject with an opaque error on CPU and silently zero on GPU."""
    if entry.shapes not in (SHAPES_SPARSE, SHAPES_CTC) or y_true.size == 0:
        return
    classes = y_pred_shape[-1]
    labels = y_true
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InvalidArgument(
                f"Labels for loss `{entry.name}` must be integer class indices. Expected integer values. "
                f"Received: non-integer values in y_true ({labels.dtype}).", reason="LABEL_OUT_OF_RANGE")
    ignore = params.get("ignore_class")
    if ignore is not None:
        labels = labels[labels != ignore]
        if labels.size == 0:
            return
    lo, hi = labels.min(), labels.max()
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise InvalidArgument(
            f"Label out of range for loss `{entry.name}`: expected class indices in [0, {classes}) "
            f"(y_pred has {classes} classes{'' if ignore is None else f', ignore_class={ignore}'}). "
            f"Received: {bad:g}.", reason="LABEL_OUT_OF_RANGE", metadata={"loss": entry.name})


# ---------------------------------------------------------------------------
# The registry.

class UnknownLoss(InvalidArgument):
    default_reason = "UNKNOWN_LOSS"


class LossRegistry:
    """Name -> LossEntry, with aliases; thread-safe for registration at run time."""

    def __init__(self, entries: Iterable[LossEntry] = ()):
        self._lock = threading.Lock()
        self._entries: dict[str, LossEntry] = {}
        self._lookup: dict[str, str] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: LossEntry, *, replace: bool = False) -> None:
        """Adds an entry; a name or alias already taken by another entry is refused."""
        with self._lock:
            names = [entry.name, *entry.aliases]
            for n in names:
                owner = self._lookup.get(n)
                if owner is not None and not (replace and owner == entry.name):
                    raise ValueError(f"loss name {n!r} is already registered (by {owner!r})")
            if replace and entry.name in self._entries:
                self._remove_locked(entry.name)
            self._entries[entry.name] = entry
            for n in names:
                self._lookup[n] = entry.name

    def unregister(self, name: str) -> LossEntry:
        with self._lock:
            canonical = self._lookup.get(name)
            if canonical is None:
                raise self._unknown(name)
            return self._remove_locked(canonical)

    def _remove_locked(self, canonical: str) -> LossEntry:
        entry = self._entries.pop(canonical)
        for n in [entry.name, *entry.aliases]:
            self._lookup.pop(n, None)
        return entry

    def get(self, name: str) -> LossEntry:
        """The entry for a name or alias; raises UnknownLoss (with suggestions) otherwise."""
        canonical = self._lookup.get(name)
        if canonical is None:
            raise self._unknown(name)
        return self._entries[canonical]

    def canonical(self, name: str) -> Optional[str]:
        """The canonical name for a name or alias, or None: never raises."""
        return self._lookup.get(name) if isinstance(name, str) else None

    def _unknown(self, name: str) -> UnknownLoss:
        # Suggestions ignore case ('MSE' -> mse) and name each loss once, by
        # its lowercase spelling where it has one (huber, not huber, Huber).
        spellings: dict[str, str] = {}
        for key in self._lookup:
            if key.lower() not in spellings or key.islower():
                spellings[key.lower()] = key
        wanted = name.lower() if isinstance(name, str) else ""
        matches = [wanted] if wanted in spellings else difflib.get_close_matches(wanted, list(spellings), n=10)
        close, seen = [], set()
        for match in matches:
            if self._lookup[spellings[match]] not in seen:
                seen.add(self._lookup[spellings[match]])
                close.append(spellings[match])
        close = close[:3]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        shown = name if len(name) <= 80 else name[:80] + "..."
        return UnknownLoss(
            f"Unknown loss. Expected a registered loss name or alias (see ListLosses). Received: {shown!r}.{hint}",
            metadata={"loss": shown})

    def entries(self) -> list[LossEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def custom_objects(self) -> dict[str, Any]:
        """Class name -> loss class, for ``keras.losses.deserialize`` and
        ``keras.models.load_model``. Keras's own lookup table misses some
        exported losses (CategoricalGeneralizedCrossEntropy in Keras 3.15)."""
        out = {}
        for entry in self._entries.values():
            if entry.source == "keras":
                cls = type(entry.build({p.name: p.default for p in entry.parameters}, REDUCTION_NONE, "float32"))
                out[cls.__name__] = cls
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._lookup


def default_registry() -> LossRegistry:
    """A registry of the Keras losses lossd exposes."""
    return LossRegistry(keras_entries())
