"""Shape analysis of a checked loss expression: the shape of its result and
the sizes of every value it computes, from its inputs' shapes alone, so that
the evaluator and the cost model can refuse a request before TensorFlow
allocates anything.

The expression language itself, and its checks, are in
:mod:`lossd_server.losses.expressions`; this module only reads trees that
passed them.
"""

from __future__ import annotations

import ast
import math
from typing import Mapping, NamedTuple, Sequence

from lossd_server.losses.expressions import (ALONG_AXIS_FUNCTIONS as _ALONG_AXIS, REDUCING_FUNCTIONS as _REDUCTIONS,
                                             axis_literal, parsed_body as _parsed)


class ShapeError(ValueError):
    """An expression that cannot be evaluated on the given shapes: tensors
    that do not broadcast (``reason`` ``SHAPE_MISMATCH``) or an axis outside
    a value's rank (``BAD_EXPRESSION``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ValueShapes(NamedTuple):
    """What a loss computes on inputs of given shapes: the element count of
    the largest value (inputs, intermediates and result), the result's
    shape, and the element counts of every value summed over the tree (what
    evaluating it walks: ``lossd_server.losses.cost``)."""

    largest: int
    shape: tuple[int, ...]
    total: int = 0


def value_shapes(source: str, shapes: Mapping[str, Sequence[int]]) -> ValueShapes:
    """The largest value a checked expression computes (its inputs, every
    intermediate and its result) and its result's shape, given each input
    tensor's shape; names not in ``shapes`` (parameters, constants) are
    scalars.

    Shapes follow numpy's rules: elementwise operations broadcast their
    operands, reductions drop (or with ``keepdims`` keep as 1) their axes,
    ``softmax``/``log_softmax`` keep the shape. Nothing is traced or
    allocated, so the evaluator can refuse a request whose broadcasting
    would be huge (``(N, 1) - (1, N)``) before TensorFlow tries.

    Raises:
        ShapeError: operands that do not broadcast, or an out-of-range axis.
    """
    analysis = _ShapeAnalysis({k: tuple(int(d) for d in v) for k, v in shapes.items()})
    shape = analysis.visit(_parsed(source))
    return ValueShapes(analysis.largest, shape, analysis.total)


class _ShapeAnalysis:
    """Walks a checked expression tree (as ``expression_rows`` does), computing
    each node's shape and remembering the largest element count seen."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.largest = 0
        self.total = 0

    def _seen(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        elements = math.prod(shape)
        self.largest = max(self.largest, elements)
        self.total += elements
        return shape

    def visit(self, node: ast.AST) -> tuple[int, ...]:
        if isinstance(node, ast.Constant):
            return self._seen(())
        if isinstance(node, ast.Name):
            return self._seen(self.shapes.get(node.id, ()))
        if isinstance(node, ast.UnaryOp):
            return self._seen(self.visit(node.operand))
        if isinstance(node, ast.BinOp):
            return self._broadcast([self.visit(node.left), self.visit(node.right)], node)
        if isinstance(node, ast.Compare):
            return self._broadcast([self.visit(node.left), *[self.visit(c) for c in node.comparators]], node)
        if isinstance(node, ast.BoolOp):
            return self._broadcast([self.visit(v) for v in node.values], node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self._call(node)
        raise ShapeError(f"cannot analyse {ast.unparse(node)[:40]!r}", "BAD_EXPRESSION")

    def _broadcast(self, shapes: list[tuple[int, ...]], node: ast.AST) -> tuple[int, ...]:
        shape = broadcast_shapes(shapes)
        if shape is None:
            raise ShapeError(
                f"operands of {ast.unparse(node)[:60]!r} do not broadcast together. Expected shapes that "
                f"broadcast (equal, or 1, along each axis). Received: "
                f"{', '.join(str(list(s)) for s in shapes)}.", "SHAPE_MISMATCH")
        return self._seen(shape)

    def _call(self, node: ast.Call) -> tuple[int, ...]:
        name = node.func.id
        args = [self.visit(a) for a in node.args]
        options = {k.arg: k.value for k in node.keywords}
        if name in _REDUCTIONS or name in _ALONG_AXIS:
            (x,) = args
            axes = self._axes(options.get("axis"), x, name)
            if name in _ALONG_AXIS:
                return self._seen(x)
            keepdims = isinstance(options.get("keepdims"), ast.Constant) and options["keepdims"].value is True
            if keepdims:
                return self._seen(tuple(1 if i in axes else d for i, d in enumerate(x)))
            return self._seen(tuple(d for i, d in enumerate(x) if i not in axes))
        if not args:
            return self._seen(())  # epsilon()
        return self._broadcast(args, node)

    @staticmethod
    def _axes(node: ast.AST | None, shape: tuple[int, ...], name: str) -> set[int]:
        rank = len(shape)
        if isinstance(node, ast.Constant) and node.value is None:
            return set(range(rank))
        if node is None:
            values: list[int] = [-1]
        else:
            found = [axis_literal(e) for e in node.elts] if isinstance(node, ast.Tuple) else [axis_literal(node)]
            if None in found:
                raise ShapeError(f"{name}: axis is an integer, a tuple of integers or None.", "BAD_EXPRESSION")
            values = found
        bad = [v for v in values if not -rank <= v < rank]
        if bad:
            raise ShapeError(
                f"{name}: axis {bad[0]} is out of range for a value of rank {rank} (shape {list(shape)}). "
                f"Expected an axis in [{-rank}, {rank - 1}]." if rank else
                f"{name}: axis {bad[0]} is out of range for a scalar (rank 0). Expected axis=None.",
                "BAD_EXPRESSION")
        return {v % rank for v in values}


def broadcast_shapes(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """numpy's broadcast of ``shapes``, or None when they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, d in enumerate(shape, start=rank - len(shape)):
            if d == out[i] or d == 1:
                continue
            if out[i] != 1:
                return None
            out[i] = d
    return tuple(out)
