"""Row structure of a checked loss expression: how its value depends on the
rows (the first axis) of its inputs, which decides whether an evaluation may
be split into chunks, batches or workers and combined exactly
(``lossd_server.losses.reductions`` combines the parts). Also renaming an
expression's tensors, which reads the same tree.

The expression language itself, and its checks, are in
:mod:`lossd_server.losses.expressions`; this module only reads trees that
passed them.
"""

from __future__ import annotations

import ast
from typing import Any, Collection, Mapping, NamedTuple

from lossd_server.losses.expressions import (ALONG_AXIS_FUNCTIONS as _ALONG_AXIS, REDUCING_FUNCTIONS as _REDUCTIONS,
                                             ExpressionError, axis_literal, parse)

ROWS, ROWS_MEAN, ROWS_SUM = "rows", "mean", "sum"
# Cosine similarity over the rows: a function of the sums of y_true * y_pred,
# y_true ** 2 and y_pred ** 2 over every row (declared by the Keras table only).
ROWS_COSINE = "cosine"

_LINEAR_REDUCTIONS = {"mean": ROWS_MEAN, "sum": ROWS_SUM}


class RowStructure(NamedTuple):
    """How values depend on rows (``ROWS``, ``ROWS_MEAN`` or ``ROWS_SUM``),
    and the rank of the values where it is known."""

    kind: str
    values_rank: int | None = None


def row_structure(source: str, ranks: Mapping[str, int], params: Collection[str] = ()) -> RowStructure | None:
    """How the value of a checked expression depends on the rows (the first
    axis) of its input tensors, given each tensor's rank.

    Returns:
        A ``RowStructure`` whose kind is ``"rows"`` when the value keeps the
        row axis and each row's values
        depend on that row of the inputs alone; ``"mean"`` or ``"sum"`` when
        the expression is, at its top, a mean or sum over axes that include
        the row axis of something row-wise (so the value over all rows is the
        row-count-weighted mean, or the sum, of the values over any split of
        the rows); None when rows are coupled in any other way (a max over
        the rows, a softmax along them, tensors of different ranks
        broadcasting against each other, an operation applied after a
        reduction over the rows...).

    The answer is conservative: None means "not proven separable", and the
    caller refuses to split such an expression.
    """
    tree = parse(source.strip())
    try:
        kind = _RowAnalysis(ranks, frozenset(params)).visit(tree.body)
    except _Coupled:
        return None
    if kind[0] == "rows" and kind[1] >= 1:
        return RowStructure(ROWS, kind[1])
    if kind[0] == "reduced":
        return RowStructure(kind[2], kind[1])
    return None


class _Coupled(Exception):
    """Raised inside the analysis when rows are (or may be) coupled."""


class _RowAnalysis:
    """Walks a checked expression tree. Each node is one of:

    * ``("const",)``: a scalar that depends on no tensor (numbers, parameters);
    * ``("rows", rank)``: axis 0 is the row axis, row i depends on row i only;
    * ``("reduced", rank, "mean" | "sum")``: a linear reduction over the rows
      of a row-wise value; only scaling by constants may follow it.
    """

    def __init__(self, ranks: Mapping[str, int], params: frozenset[str]):
        self.ranks = ranks
        self.params = params

    def visit(self, node: ast.AST) -> tuple:
        if isinstance(node, ast.Constant):
            return ("const",)
        if isinstance(node, ast.Name):
            if node.id in self.ranks:
                rank = self.ranks[node.id]
                if rank < 1:
                    raise _Coupled
                return ("rows", rank)
            return ("const",)  # a parameter or a named constant (pi, e)
        if isinstance(node, ast.UnaryOp):
            operand = self.visit(node.operand)
            return operand  # -x and +x are linear; `not` acts on booleans, which are row-wise
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            linear = isinstance(node.op, (ast.Add, ast.Sub)) and left[0] == right[0] == "reduced"
            if linear and left[1:] == right[1:]:
                return left  # mean(a) + mean(b) over the same rows: still a weighted mean of row-wise terms
            if "reduced" in (left[0], right[0]):
                other = right if left[0] == "reduced" else left
                reduced = left if left[0] == "reduced" else right
                scaling = isinstance(node.op, ast.Mult) or (isinstance(node.op, ast.Div) and right is other)
                if other[0] == "const" and scaling:
                    return reduced
                raise _Coupled
            return self._elementwise([left, right])
        if isinstance(node, ast.Compare):
            return self._elementwise([self.visit(node.left), *[self.visit(c) for c in node.comparators]])
        if isinstance(node, ast.BoolOp):
            return self._elementwise([self.visit(v) for v in node.values])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self._call(node)
        raise _Coupled  # not produced by a checked expression; be safe

    def _elementwise(self, kinds: list[tuple]) -> tuple:
        if any(k[0] == "reduced" for k in kinds):
            raise _Coupled
        rows = {k[1] for k in kinds if k[0] == "rows"}
        if not rows:
            return ("const",)
        if len(rows) > 1:
            raise _Coupled  # ranks differ: broadcasting would not align the row axes
        return ("rows", rows.pop())

    def _call(self, node: ast.Call) -> tuple:
        name = node.func.id
        args = [self.visit(a) for a in node.args]
        options = {k.arg: k.value for k in node.keywords}
        if name in _REDUCTIONS or name in _ALONG_AXIS:
            (x,) = args
            if x[0] == "const":
                return x
            if x[0] == "reduced":
                raise _Coupled
            rank = x[1]
            axes = self._axes(options.get("axis"), rank)
            if name in _ALONG_AXIS:
                if 0 in axes:
                    raise _Coupled
                return x
            keepdims = isinstance(options.get("keepdims"), ast.Constant) and options["keepdims"].value is True
            out_rank = rank if keepdims else rank - len(axes)
            if 0 not in axes:
                return ("rows", out_rank)
            if name in _LINEAR_REDUCTIONS:
                return ("reduced", out_rank, _LINEAR_REDUCTIONS[name])
            raise _Coupled
        return self._elementwise(args)

    @staticmethod
    def _axes(node: ast.AST | None, rank: int) -> set[int]:
        if node is None:
            values: list[Any] = [-1]
        elif isinstance(node, ast.Constant) and node.value is None:
            return set(range(rank))
        elif isinstance(node, ast.Tuple):
            values = [_axis_value(e) for e in node.elts]
        else:
            values = [_axis_value(node)]
        if any(not -rank <= v < rank for v in values):
            raise _Coupled  # the evaluation itself will refuse this axis
        return {v % rank for v in values}


def _axis_value(node: ast.AST) -> int:
    value = axis_literal(node)
    if value is None:
        raise _Coupled
    return value


def rename_tensors(source: str, mapping: Mapping[str, str]) -> str:
    """The expression with its tensor names replaced (``{"a": "y_true"}``),
    for writing a registered expression out over the tensors a composite term
    maps it to. Raises ExpressionError when a new name is already used for
    something else in the expression."""
    tree = parse(source.strip())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    clashes = sorted((set(mapping.values()) & used) - set(mapping))
    if clashes:
        raise ExpressionError(f"cannot rename tensors: {clashes[0]!r} already names something else")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
    return ast.unparse(tree.body)
