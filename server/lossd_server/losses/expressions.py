"""A small, safe expression language for user-defined loss functions.

Remote users send the *text* of a loss, for example the Huber loss::

    mean(where(abs(y_true - y_pred) <= delta,
               0.5 * square(y_true - y_pred),
               delta * (abs(y_true - y_pred) - 0.5 * delta)), axis=-1)

The text is parsed with :func:`ast.parse` (``mode="eval"``) and every node of
the tree is checked against a strict whitelist. Nothing the user sends is ever
handed to ``eval``, ``exec`` or ``compile`` as code: the checked tree is turned
into a tree of small Python closures, each calling one :mod:`keras.ops`
function. The result is differentiable, works eagerly, inside ``tf.function``
and under ``tf.GradientTape``.

Grammar
-------
Written in EBNF; it is a subset of Python expression syntax, so the usual
Python precedence rules apply (``**`` binds tighter than unary minus, so
``-x ** 2`` is ``-(x ** 2)``)::

    expression := disjunction
    disjunction:= conjunction ("or" conjunction)*          # booleans only
    conjunction:= inversion ("and" inversion)*             # booleans only
    inversion  := "not" inversion | comparison             # booleans only
    comparison := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)*
    sum        := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := ("+" | "-") factor | power
    power      := primary ["**" exponent]
    exponent   := ["+" | "-"] (NUMBER | PARAMETER)         # |NUMBER| <= 16
    primary    := NUMBER | TENSOR | PARAMETER | CONSTANT
                | FUNCTION "(" [arguments] ")" | "(" expression ")"
    arguments  := expression ("," expression)* ("," keyword)*
    keyword    := "axis" "=" axis | "keepdims" "=" ("True" | "False")
    axis       := INT | "None" | "(" INT ("," INT)* [","] ")"  # INT may be negative

* ``NUMBER`` is an int or float literal (``2``, ``0.5``, ``1e-3``) whose
  absolute value is at most 1e12 and that is finite. Numbers are always used
  as floating point values of the computation dtype (see below).
* ``TENSOR`` and ``PARAMETER`` are the names given to :func:`compile_expression`
  (for a loss typically ``y_true``, ``y_pred`` and user parameters such as
  ``delta``). ``CONSTANT`` is ``pi`` or ``e``; a tensor or parameter with the
  same name takes precedence.
* ``FUNCTION`` is one of the names in the table below.
* Chained comparisons work like in Python: ``0 < x <= 1`` means
  ``(0 < x) and (x <= 1)``, computed elementwise.

Types
-----
Every sub-expression is either a *number* (a tensor of the computation dtype)
or a *boolean* (the result of a comparison). The two are checked when the
expression is compiled:

* comparisons take numbers and produce booleans;
* ``and``, ``or`` and ``not`` take booleans and map to elementwise
  ``logical_and``, ``logical_or`` and ``logical_not``;
* booleans are accepted only as the condition of ``where`` and as operands of
  ``and``/``or``/``not``. Arithmetic on a boolean is refused; write
  ``where(cond, 1.0, 0.0)`` to turn one into a number;
* the expression as a whole must be a number.

Functions
---------
Elementwise (all arguments broadcast against each other):

* ``abs(x)`` -- absolute value.
* ``square(x)`` -- x * x.
* ``sqrt(x)`` -- square root.
* ``log(x)`` -- natural logarithm.
* ``exp(x)`` -- e raised to x.
* ``log1p(x)`` -- log(1 + x), accurate for small x.
* ``expm1(x)`` -- exp(x) - 1, accurate for small x.
* ``tanh(x)`` -- hyperbolic tangent.
* ``sigmoid(x)`` -- 1 / (1 + exp(-x)).
* ``softplus(x)`` -- log(1 + exp(x)), computed stably.
* ``relu(x)`` -- max(x, 0).
* ``sign(x)`` -- -1, 0 or 1 following the sign of x.
* ``negative(x)`` -- -x.
* ``clip(x, lo, hi)`` -- x limited to [lo, hi], i.e. minimum(maximum(x, lo), hi).
* ``maximum(a, b)`` -- elementwise larger of a and b.
* ``minimum(a, b)`` -- elementwise smaller of a and b.
* ``where(cond, a, b)`` -- a where the boolean cond holds, else b.
* ``pow(a, b)`` -- a ** b; b follows the same rule as the ** exponent.

Reductions. **The default axis is -1 (the last axis), not "all axes"**: this
matches the Keras losses, which average over the last axis and return one
value per sample. Pass ``axis=None`` to reduce over every axis:

* ``mean(x, axis=-1, keepdims=False)`` -- arithmetic mean.
* ``sum(x, axis=-1, keepdims=False)`` -- sum.
* ``max(x, axis=-1, keepdims=False)`` -- largest element.
* ``min(x, axis=-1, keepdims=False)`` -- smallest element.
* ``logsumexp(x, axis=-1, keepdims=False)`` -- log(sum(exp(x))), computed stably.

Along one axis (``axis`` is a single int or ``None``, no tuples):

* ``softmax(x, axis=-1)`` -- exp(x) normalised to sum to 1 along the axis.
* ``log_softmax(x, axis=-1)`` -- log(softmax(x)), computed stably.

Other:

* ``epsilon()`` -- the Keras fuzz factor, keras.config.epsilon().

Computation dtype
-----------------
The values are computed in the dtype of the first floating point tensor the
expression reads (in order of first appearance in the text), or
``keras.config.floatx()`` when none is floating. All tensors the expression
reads, all numbers and all parameters are converted to that dtype, so integer
labels can be mixed with float predictions.

Limits
------
The source may be at most :data:`MAX_LENGTH` (2,000) characters of printable
ASCII (plus tab and newline); expressions may nest at most :data:`MAX_DEPTH`
(32) levels deep, counting both brackets and the parsed tree (so a chain of
more than about 30 additions needs parentheses or ``sum``), and may contain at
most :data:`MAX_NODES` (256) sub-expressions. Exponents are limited to
``|exponent| <= 16`` (or a parameter), so ``10 ** 1000`` or ``9 ** 9 ** 9``
are refused before anything is computed. Axis values must lie in
``[-32, 31]``.

Everything else is refused with :class:`ExpressionError`, among others:
attribute access, subscripts, strings and f-strings, lambdas,
comprehensions, list/tuple/dict/set literals, ``a if c else b`` (use
``where``), ``:=``, ``%``, ``//``, ``@``, bitwise operators, ``is``/``in``,
``True``/``False``/``None`` outside of ``keepdims``/``axis``, complex
numbers, starred and unknown keyword arguments and any name or function not
listed above. Error messages give the 1-based column (counting from the start
of the source, a newline counts as one character) and the offending text.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import string
import threading
from dataclasses import dataclass, field
from keyword import iskeyword
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_NODES",
    "FUNCTIONS",
    "CONSTANTS",
    "Expression",
    "ExpressionError",
    "FunctionSpec",
    "compile_expression",
]

MAX_LENGTH = 2000
"""Longest accepted source text, in characters."""

MAX_DEPTH = 32
"""Deepest accepted nesting, of brackets and of the parsed expression tree."""

MAX_NODES = 256
"""Most sub-expressions (names, numbers, operators, calls) in one expression."""

MAX_CONSTANT = 1e12
"""Largest absolute value of a number literal."""

MAX_EXPONENT = 16
"""Largest absolute value of a constant exponent of ``**`` and ``pow``."""

MAX_AXIS = 32
"""Axis values must lie in ``[-MAX_AXIS, MAX_AXIS - 1]``."""

CONSTANTS: Mapping[str, float] = MappingProxyType({"pi": math.pi, "e": math.e})
"""Named constants; a tensor or parameter of the same name shadows them."""

# Longest piece of source quoted in an error message.
_SNIPPET_LENGTH = 40

# The two static types of a sub-expression.
_NUMBER = "number"
_BOOLEAN = "boolean"


# CPython 3.11 and 3.12 keep the AST constructor's recursion depth in
# interpreter-wide state, set from the calling thread's stack depth: two
# threads converting trees at once (one of them letting the other run, as a
# garbage collection inside ast.parse can) fail with SystemError "AST
# constructor recursion depth mismatch", and a valid expression would be
# refused. Our own parses take turns under this lock; a parse that still
# collides with one elsewhere in the process (TensorFlow's autograph parses
# source too) is retried, since the text was never at fault.
_PARSE_LOCK = threading.Lock()
_PARSE_TRIES = 3


def parse(text: str) -> ast.Expression:
    """``ast.parse(text, mode="eval")``, safe to call from many threads."""
    for _ in range(_PARSE_TRIES - 1):
        try:
            with _PARSE_LOCK:
                return ast.parse(text, mode="eval")
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
    with _PARSE_LOCK:
        return ast.parse(text, mode="eval")


class ExpressionError(ValueError):
    """Raised for an expression that cannot be accepted.

    Attributes:
        reason: What is wrong, without position or hint.
        column: 1-based column of the offending text in the source (a newline
            counts as one character), or None when the problem is not at one
            place (for example the source is too long).
        snippet: Up to 40 characters of the offending source text, starting at
            ``column``; None when there is nothing to quote.
        hint: What would have been allowed, or None.
    """

    def __init__(
        self,
        reason: str,
        *,
        column: int | None = None,
        snippet: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.column = column
        self.snippet = snippet
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        if self.column is not None:
            # ascii() quotes and escapes the snippet so that control
            # characters cannot garble logs or status messages.
            quoted = ascii(self.snippet) if self.snippet else "end of expression"
            text = f"expression refused at column {self.column} ({quoted}): {self.reason}"
        else:
            text = f"expression refused: {self.reason}"
        if self.hint:
            text += f"; allowed: {self.hint}"
        return text


class _Context:
    """Per-call state handed to every compiled closure."""

    __slots__ = ("ops", "dtype", "epsilon", "tensors", "params")

    def __init__(self, ops: Any, dtype: str, epsilon: float) -> None:
        self.ops = ops
        self.dtype = dtype
        self.epsilon = epsilon
        self.tensors: dict[str, Any] = {}
        self.params: dict[str, Any] = {}

    def constant(self, value: float) -> Any:
        """Returns ``value`` as a scalar tensor of the computation dtype."""
        return self.ops.convert_to_tensor(value, dtype=self.dtype)


# A compiled sub-expression: takes the per-call context, returns a tensor.
_Closure = Callable[[_Context], Any]


@dataclass(frozen=True)
class FunctionSpec:
    """One entry of the function whitelist :data:`FUNCTIONS`.

    Attributes:
        name: The name used in expressions.
        args: Names of the positional parameters, in order (all required).
        doc: One-line description.
        keywords: Allowed keyword arguments and their defaults.
        arg_kinds: Static type of each positional argument ("number" or
            "boolean"); the result is always a number.
        exponent_arg: Index of a positional argument that follows the ``**``
            exponent rule, or None.
        axis_tuple: Whether ``axis`` may be a tuple of ints.
    """

    name: str
    args: tuple[str, ...]
    doc: str
    impl: Callable[[_Context, list, Mapping[str, Any]], Any] = field(repr=False, compare=False)
    keywords: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    arg_kinds: tuple[str, ...] = ()
    exponent_arg: int | None = None
    axis_tuple: bool = True

    @property
    def signature(self) -> str:
        """The call signature, for example ``mean(x, axis=-1, keepdims=False)``."""
        parts = list(self.args) + [f"{k}={v!r}" for k, v in self.keywords.items()]
        return f"{self.name}({', '.join(parts)})"


def _elementwise(name: str, doc: str, impl: Callable[[Any, Any], Any]) -> FunctionSpec:
    return FunctionSpec(name, ("x",), doc, lambda ctx, a, kw: impl(ctx.ops, a[0]))


def _reduction(name: str, doc: str, impl: Callable[..., Any]) -> FunctionSpec:
    return FunctionSpec(
        name,
        ("x",),
        doc,
        lambda ctx, a, kw: impl(ctx.ops, a[0], axis=kw["axis"], keepdims=kw["keepdims"]),
        keywords=MappingProxyType({"axis": -1, "keepdims": False}),
    )


def _along_axis(name: str, doc: str, impl: Callable[..., Any]) -> FunctionSpec:
    return FunctionSpec(
        name,
        ("x",),
        doc,
        lambda ctx, a, kw: impl(ctx.ops, a[0], axis=kw["axis"]),
        keywords=MappingProxyType({"axis": -1}),
        axis_tuple=False,
    )


# The whitelist. Every callable reachable from an expression is listed here,
# each calling one fixed keras.ops function (no name lookups driven by user
# text). The doc strings must match the module docstring; a test checks it.
_FUNCTION_LIST = [
    _elementwise("abs", "absolute value", lambda ops, x: ops.abs(x)),
    _elementwise("square", "x * x", lambda ops, x: ops.square(x)),
    _elementwise("sqrt", "square root", lambda ops, x: ops.sqrt(x)),
    _elementwise("log", "natural logarithm", lambda ops, x: ops.log(x)),
    _elementwise("exp", "e raised to x", lambda ops, x: ops.exp(x)),
    _elementwise("log1p", "log(1 + x), accurate for small x", lambda ops, x: ops.log1p(x)),
    _elementwise("expm1", "exp(x) - 1, accurate for small x", lambda ops, x: ops.expm1(x)),
    _elementwise("tanh", "hyperbolic tangent", lambda ops, x: ops.tanh(x)),
    _elementwise("sigmoid", "1 / (1 + exp(-x))", lambda ops, x: ops.sigmoid(x)),
    _elementwise("softplus", "log(1 + exp(x)), computed stably", lambda ops, x: ops.softplus(x)),
    _elementwise("relu", "max(x, 0)", lambda ops, x: ops.relu(x)),
    _elementwise("sign", "-1, 0 or 1 following the sign of x", lambda ops, x: ops.sign(x)),
    _elementwise("negative", "-x", lambda ops, x: ops.negative(x)),
    FunctionSpec(
        "clip",
        ("x", "lo", "hi"),
        "x limited to [lo, hi], i.e. minimum(maximum(x, lo), hi)",
        # Not ops.clip: tf.clip_by_value wants bounds no larger than x, while
        # here any argument may be a full tensor, so broadcast all three.
        lambda ctx, a, kw: ctx.ops.minimum(ctx.ops.maximum(a[0], a[1]), a[2]),
    ),
    FunctionSpec(
        "maximum",
        ("a", "b"),
        "elementwise larger of a and b",
        lambda ctx, a, kw: ctx.ops.maximum(a[0], a[1]),
    ),
    FunctionSpec(
        "minimum",
        ("a", "b"),
        "elementwise smaller of a and b",
        lambda ctx, a, kw: ctx.ops.minimum(a[0], a[1]),
    ),
    FunctionSpec(
        "where",
        ("cond", "a", "b"),
        "a where the boolean cond holds, else b",
        lambda ctx, a, kw: ctx.ops.where(a[0], a[1], a[2]),
        arg_kinds=(_BOOLEAN, _NUMBER, _NUMBER),
    ),
    FunctionSpec(
        "pow",
        ("a", "b"),
        "a ** b; b follows the same rule as the ** exponent",
        lambda ctx, a, kw: ctx.ops.power(a[0], a[1]),
        exponent_arg=1,
    ),
    _reduction("mean", "arithmetic mean", lambda ops, x, **kw: ops.mean(x, **kw)),
    _reduction("sum", "sum", lambda ops, x, **kw: ops.sum(x, **kw)),
    _reduction("max", "largest element", lambda ops, x, **kw: ops.max(x, **kw)),
    _reduction("min", "smallest element", lambda ops, x, **kw: ops.min(x, **kw)),
    _reduction(
        "logsumexp",
        "log(sum(exp(x))), computed stably",
        lambda ops, x, **kw: ops.logsumexp(x, **kw),
    ),
    _along_axis(
        "softmax",
        "exp(x) normalised to sum to 1 along the axis",
        lambda ops, x, **kw: ops.softmax(x, **kw),
    ),
    _along_axis(
        "log_softmax",
        "log(softmax(x)), computed stably",
        lambda ops, x, **kw: ops.log_softmax(x, **kw),
    ),
    FunctionSpec(
        "epsilon",
        (),
        "the Keras fuzz factor, keras.config.epsilon()",
        lambda ctx, a, kw: ctx.constant(ctx.epsilon),
    ),
]

FUNCTIONS: Mapping[str, FunctionSpec] = MappingProxyType(
    {spec.name: spec for spec in sorted(_FUNCTION_LIST, key=lambda s: s.name)}
)
"""The function whitelist: name -> :class:`FunctionSpec` (with a one-line ``doc``)."""

# Operators. Each maps an AST operator class to its source spelling and the
# keras.ops call implementing it.
_ARITHMETIC: dict[type, tuple[str, Callable[[Any, Any, Any], Any]]] = {
    ast.Add: ("+", lambda ops, a, b: ops.add(a, b)),
    ast.Sub: ("-", lambda ops, a, b: ops.subtract(a, b)),
    ast.Mult: ("*", lambda ops, a, b: ops.multiply(a, b)),
    ast.Div: ("/", lambda ops, a, b: ops.divide(a, b)),
    ast.Pow: ("**", lambda ops, a, b: ops.power(a, b)),
}
_REFUSED_ARITHMETIC: dict[type, str] = {
    ast.MatMult: "'@' (matrix multiplication) is not allowed",
    ast.Mod: "'%' (modulo) is not allowed",
    ast.FloorDiv: "'//' (floor division) is not allowed; use '/'",
    ast.LShift: "bitwise operator '<<' is not allowed",
    ast.RShift: "bitwise operator '>>' is not allowed",
    ast.BitOr: "bitwise operator '|' is not allowed; use 'or' on comparisons",
    ast.BitAnd: "bitwise operator '&' is not allowed; use 'and' on comparisons",
    ast.BitXor: "bitwise operator '^' is not allowed; use '**' for powers",
}
_COMPARISONS: dict[type, tuple[str, Callable[[Any, Any, Any], Any]]] = {
    ast.Lt: ("<", lambda ops, a, b: ops.less(a, b)),
    ast.LtE: ("<=", lambda ops, a, b: ops.less_equal(a, b)),
    ast.Gt: (">", lambda ops, a, b: ops.greater(a, b)),
    ast.GtE: (">=", lambda ops, a, b: ops.greater_equal(a, b)),
    ast.Eq: ("==", lambda ops, a, b: ops.equal(a, b)),
    ast.NotEq: ("!=", lambda ops, a, b: ops.not_equal(a, b)),
}

# Node types that are refused outright, with the reason given to the user.
_REFUSED_NODES: dict[type, str] = {
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "subscripts (indexing and slicing) are not allowed",
    ast.Slice: "slices are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.IfExp: "conditional expressions ('a if c else b') are not allowed; use where(c, a, b)",
    ast.NamedExpr: "assignment expressions (':=') are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.List: "list literals are not allowed",
    ast.Tuple: "tuples are only allowed as the value of axis=",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed",
    ast.Starred: "starred arguments ('*x') are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.Await: "'await' is not allowed",
    ast.Yield: "'yield' is not allowed",
    ast.YieldFrom: "'yield' is not allowed",
}

# A Python number literal, matched at a position where a number starts; used
# to find numbers that run straight into a name, such as "1if" or "0x1for".
_NUMBER_LITERAL = re.compile(
    r"""
      0[xX](?:_?[0-9a-fA-F])+ | 0[oO](?:_?[0-7])+ | 0[bB](?:_?[01])+
    | (?:(?:\d(?:_?\d)*)?\.\d(?:_?\d)* | \d(?:_?\d)*\.?)(?:[eE][+-]?\d(?:_?\d)*)?[jJ]?
    """,
    re.VERBOSE,
)
_IDENTIFIER_CHARS = frozenset(string.ascii_letters + string.digits + "_")

# Characters accepted in the source besides printable ASCII.
_WHITESPACE_CONTROLS = frozenset("\t\n\r")
_OPENING = frozenset("([{")
_CLOSING = frozenset(")]}")


def compile_expression(
    source: str, *, tensors: Collection[str], params: Collection[str]
) -> Expression:
    """Parses and checks an expression; does not touch TensorFlow.

    Args:
        source: The expression text, see the module docstring for the language.
        tensors: Names of the tensors the expression may read, e.g.
            ``("y_true", "y_pred")``.
        params: Names of the scalar parameters it may read, e.g. ``("delta",)``.

    Returns:
        The checked expression, ready to be called with tensors and parameter
        values.

    Raises:
        ExpressionError: The expression (or a tensor or parameter name) is not
            acceptable; the message says where and why.
        TypeError: ``tensors`` or ``params`` is a single string rather than a
            collection of names.
    """
    tensor_names = _check_names(tensors, "tensor")
    param_names = _check_names(params, "parameter")
    clash = sorted(tensor_names & param_names)
    if clash:
        raise ExpressionError(f"{clash[0]!r} is both a tensor and a parameter name")
    compiler = _Compiler(source, tensor_names, param_names)
    return compiler.compile()


class Expression:
    """A checked expression; call it to build the value with ``keras.ops``.

    Instances are immutable and safe to share between threads. Create them with
    :func:`compile_expression`.

    Attributes:
        source: The expression text as given.
        tensors_used: Names of the tensors the expression reads.
        params_used: Names of the parameters the expression reads.
    """

    __slots__ = ("source", "tensors_used", "params_used", "_tensor_order", "_root")

    def __init__(
        self,
        source: str,
        tensor_order: tuple[str, ...],
        params_used: frozenset[str],
        root: _Closure,
    ) -> None:
        self.source = source
        self.tensors_used = frozenset(tensor_order)
        self.params_used = params_used
        self._tensor_order = tensor_order  # order of first appearance in source
        self._root = root

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __call__(self, tensors: Mapping[str, Any], params: Mapping[str, float] | None = None) -> Any:
        """Builds the value of the expression with ``keras.ops``.

        The result is differentiable and works eagerly, inside ``tf.function``
        and under ``tf.GradientTape``. The computation dtype is the dtype of
        the first floating tensor read (in order of appearance in the source),
        or ``keras.config.floatx()``; every tensor read, every number and every
        parameter is converted to it.

        Args:
            tensors: Tensor (or array-like) per name; must contain every name in
                :attr:`tensors_used`, extra entries are ignored.
            params: Value per parameter name (Python numbers or scalar
                tensors); must contain every name in :attr:`params_used`.

        Returns:
            A backend tensor of the computation dtype.

        Raises:
            ExpressionError: A tensor or parameter the expression reads is
                missing. Shape errors (for example an axis out of range for the
                actual tensors) come from the backend unchanged.
        """
        # Imported here so that compiling expressions stays cheap and
        # TensorFlow-free; after the first call this is a dict lookup.
        import keras
        from keras import ops

        params = {} if params is None else params
        missing = sorted(self.tensors_used - set(tensors)) + sorted(self.params_used - set(params))
        if missing:
            kind = "tensor" if missing[0] in self.tensors_used else "parameter"
            raise ExpressionError(f"{kind} {missing[0]!r} was not provided")

        values = {name: ops.convert_to_tensor(tensors[name]) for name in self._tensor_order}
        dtype = keras.config.floatx()
        for name in self._tensor_order:
            if keras.backend.is_float_dtype(values[name].dtype):
                dtype = keras.backend.standardize_dtype(values[name].dtype)
                break

        ctx = _Context(ops, dtype, keras.config.epsilon())
        for name, value in values.items():
            if keras.backend.standardize_dtype(value.dtype) != dtype:
                value = ops.cast(value, dtype)
            ctx.tensors[name] = value
        for name in self.params_used:
            value = params[name]
            if isinstance(value, (int, float)):
                # Straight to the target dtype: a detour through float32 would
                # round a float64 parameter such as 0.1.
                ctx.params[name] = ctx.constant(float(value))
            else:
                ctx.params[name] = ops.cast(value, dtype)
        return self._root(ctx)


def _check_names(names: Collection[str], kind: str) -> frozenset[str]:
    """Validates the tensor or parameter names the caller declares."""
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{kind} names must be a collection of strings, not a single string")
    result = frozenset(names)
    for name in result:
        if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
            raise ExpressionError(f"{kind} name {name!r} is not an ASCII identifier")
        if iskeyword(name):
            raise ExpressionError(f"{kind} name {name!r} is a reserved word")
    return result


class _Compiler:
    """Checks one source text and turns it into a tree of closures.

    The checks run in order of cost: length, characters and bracket depth on
    the raw text (before the Python parser sees pathological input), then the
    parser, then tree size and depth (iteratively, so a deep tree cannot
    exhaust the Python stack), then the recursive whitelist walk, whose
    recursion is bounded by MAX_DEPTH.
    """

    def __init__(self, source: str, tensors: frozenset[str], params: frozenset[str]) -> None:
        self.source = source
        self.tensors = tensors
        self.params = params
        self.tensor_order: list[str] = []
        self.params_used: set[str] = set()
        self.hint = (
            f"tensor names [{', '.join(sorted(tensors))}], "
            f"parameters [{', '.join(sorted(params))}], "
            f"constants [{', '.join(CONSTANTS)}], "
            f"functions [{', '.join(FUNCTIONS)}]"
        )
        # Filled in by _parse: offset of the parsed text within the source and
        # the start offsets of its lines, to turn (line, column) into columns.
        self.shift = 0
        self.line_starts: list[int] = [0]

    # -- entry point ------------------------------------------------------

    def compile(self) -> Expression:
        tree = self._parse()
        self._check_size(tree)
        kind, root = self._build(tree.body)
        if kind != _NUMBER:
            raise self._error(
                tree.body,
                "the expression must produce a number, not a boolean; "
                "use where(condition, 1.0, 0.0) to turn a comparison into a number",
            )
        return Expression(self.source, tuple(self.tensor_order), frozenset(self.params_used), root)

    # -- errors -------------------------------------------------------------

    def _error_at(self, offset: int, reason: str, end: int | None = None, hint: bool = False) -> ExpressionError:
        """An error pointing at the 0-based ``offset`` of the source."""
        stop = min(len(self.source), end if end is not None else offset + _SNIPPET_LENGTH)
        snippet = self.source[offset:stop][:_SNIPPET_LENGTH]
        return ExpressionError(
            reason, column=offset + 1, snippet=snippet, hint=self.hint if hint else None
        )

    def _offset(self, lineno: int | None, col: int | None) -> int:
        """Turns a parser position (1-based line, 0-based column) into an offset."""
        if not lineno or lineno > len(self.line_starts):
            return len(self.source)
        offset = self.shift + self.line_starts[lineno - 1] + max(col or 0, 0)
        return min(offset, len(self.source))

    def _error(self, node: ast.expr | ast.keyword, reason: str, hint: bool = False) -> ExpressionError:
        """An error pointing at ``node``; the source is ASCII, so byte columns are characters."""
        start = self._offset(node.lineno, node.col_offset)
        end = self._offset(node.end_lineno, node.end_col_offset) if node.end_lineno else None
        return self._error_at(start, reason, end, hint)

    # -- raw text and parser ------------------------------------------------

    def _parse(self) -> ast.Expression:
        source = self.source
        if not isinstance(source, str):
            raise ExpressionError(f"the expression must be a string, not {type(source).__name__}")
        if len(source) > MAX_LENGTH:
            raise ExpressionError(
                f"the expression is {len(source)} characters long; the limit is {MAX_LENGTH}",
                snippet=source[:_SNIPPET_LENGTH],
            )
        if not source.strip():
            raise ExpressionError("the expression is empty")

        depth = 0
        for offset, char in enumerate(source):
            if not char.isascii():
                # Besides keeping messages plain, this stops look-alike
                # identifiers: Python folds e.g. fullwidth letters (NFKC).
                raise self._error_at(offset, f"only ASCII characters are allowed, found {char!r}")
            if not char.isprintable() and char not in _WHITESPACE_CONTROLS:
                raise self._error_at(offset, f"control character {char!r} is not allowed")
            if char in "'\"":
                # Strings have no use in the language; refusing them before
                # parsing also spares the parser's escape-sequence handling.
                raise self._error_at(offset, "strings are not allowed")
            if char in _OPENING:
                depth += 1
                if depth > MAX_DEPTH:
                    raise self._error_at(offset, f"brackets are nested deeper than the limit of {MAX_DEPTH}")
            elif char in _CLOSING:
                depth -= 1

        self._check_number_boundaries()

        # eval() forgives leading whitespace but the parser does not; strip it
        # and remember the shift so that columns still count from the source.
        text = source.lstrip()
        self.shift = len(source) - len(text)
        self.line_starts = [0]
        for offset, char in enumerate(text):
            if char == "\n":
                self.line_starts.append(offset + 1)
        try:
            tree = parse(text)
        except SyntaxError as exc:
            # SyntaxError.offset is 1-based.
            offset = self._offset(exc.lineno, (exc.offset or 1) - 1)
            raise self._error_at(offset, f"syntax error: {exc.msg}") from None
        except (RecursionError, MemoryError) as exc:
            raise ExpressionError("the expression is too complex to parse") from exc
        except Exception as exc:  # noqa: BLE001 - untrusted input, any parser failure is a refusal
            raise ExpressionError(f"the expression cannot be parsed ({type(exc).__name__})") from exc
        return tree

    def _check_number_boundaries(self) -> None:
        """Refuses a number that runs straight into a name, like ``1if`` or ``0x1for``.

        Python's tokenizer accepts some of these with a SyntaxWarning (printed
        to stderr, or raised under ``-W error``). Refusing them first keeps
        user text from producing warnings, which could only be silenced by
        changing the process-wide, thread-unsafe warning filters.
        """
        source = self.source
        offset = 0
        while offset < len(source):
            char = source[offset]
            starts_number = char.isdigit() or (char == "." and source[offset + 1 : offset + 2].isdigit())
            # A digit inside a name (y2) does not start a number.
            if starts_number and (offset == 0 or source[offset - 1] not in _IDENTIFIER_CHARS):
                end = _NUMBER_LITERAL.match(source, offset).end()
                if end < len(source) and source[end] in _IDENTIFIER_CHARS:
                    raise self._error_at(
                        offset, "a number must be separated from the name or digits that follow it"
                    )
                offset = end
            else:
                offset += 1

    def _check_size(self, tree: ast.Expression) -> None:
        """Enforces MAX_NODES and MAX_DEPTH without recursion."""
        count = 0
        stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node, ast.expr):
                count += 1
                if count > MAX_NODES:
                    raise self._error(node, f"the expression has more than {MAX_NODES} parts")
                if depth > MAX_DEPTH:
                    raise self._error(node, f"the expression is nested deeper than the limit of {MAX_DEPTH}")
                child_depth = depth + 1
            else:
                # Operators, contexts and keywords do not add a level.
                child_depth = depth
            stack.extend((child, child_depth) for child in ast.iter_child_nodes(node))

    # -- whitelist walk -------------------------------------------------------

    def _build(self, node: ast.AST) -> tuple[str, _Closure]:
        """Checks ``node`` and returns its static type and closure."""
        if isinstance(node, ast.Constant):
            return _NUMBER, self._number(node)
        if isinstance(node, ast.Name):
            return _NUMBER, self._name(node)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node)
        if isinstance(node, ast.BinOp):
            return _NUMBER, self._binary(node)
        if isinstance(node, ast.Compare):
            return _BOOLEAN, self._compare(node)
        if isinstance(node, ast.BoolOp):
            return _BOOLEAN, self._boolean(node)
        if isinstance(node, ast.Call):
            return _NUMBER, self._call(node)
        reason = _REFUSED_NODES.get(type(node), f"{type(node).__name__} expressions are not allowed")
        raise self._error(node, reason, hint=True)

    def _build_number(self, node: ast.AST, what: str) -> _Closure:
        kind, closure = self._build(node)
        if kind != _NUMBER:
            raise self._error(
                node,
                f"{what} must be a number, not a boolean (comparison); "
                "use where(condition, 1.0, 0.0) to turn it into a number",
            )
        return closure

    def _build_boolean(self, node: ast.AST, what: str) -> _Closure:
        kind, closure = self._build(node)
        if kind != _BOOLEAN:
            raise self._error(node, f"{what} must be a boolean such as a comparison (e.g. 'x > 0')")
        return closure

    def _number(self, node: ast.Constant) -> _Closure:
        value = node.value
        # bool is a subclass of int: check the exact type.
        if type(value) not in (int, float):
            raise self._error(node, _constant_reason(value), hint=True)
        # abs() first: math.isfinite() raises OverflowError on an int past a float's range.
        if abs(value) > MAX_CONSTANT or not math.isfinite(value):
            raise self._error(node, f"numbers must be finite with absolute value at most {MAX_CONSTANT:g}")
        number = float(value)
        return lambda ctx: ctx.constant(number)

    def _name(self, node: ast.Name) -> _Closure:
        name = node.id
        if name in self.tensors:
            if name not in self.tensor_order:
                self.tensor_order.append(name)
            return lambda ctx: ctx.tensors[name]
        if name in self.params:
            self.params_used.add(name)
            return lambda ctx: ctx.params[name]
        if name in CONSTANTS:
            number = CONSTANTS[name]
            return lambda ctx: ctx.constant(number)
        if name in FUNCTIONS:
            raise self._error(node, f"{name!r} is a function; call it as {FUNCTIONS[name].signature}")
        raise self._error(node, f"unknown name {name!r}", hint=True)

    def _unary(self, node: ast.UnaryOp) -> tuple[str, _Closure]:
        if isinstance(node.op, ast.Not):
            operand = self._build_boolean(node.operand, "the operand of 'not'")
            return _BOOLEAN, lambda ctx: ctx.ops.logical_not(operand(ctx))
        if isinstance(node.op, ast.Invert):
            raise self._error(node, "bitwise operator '~' is not allowed; use 'not' on comparisons")
        operand = self._build_number(node.operand, "the operand of unary minus/plus")
        if isinstance(node.op, ast.USub):
            return _NUMBER, lambda ctx: ctx.ops.negative(operand(ctx))
        return _NUMBER, operand  # unary plus is the identity

    def _binary(self, node: ast.BinOp) -> _Closure:
        op_type = type(node.op)
        if op_type not in _ARITHMETIC:
            reason = _REFUSED_ARITHMETIC.get(op_type, f"operator {op_type.__name__} is not allowed")
            raise self._error(node, reason)
        symbol, impl = _ARITHMETIC[op_type]
        if op_type is ast.Pow:
            self._check_exponent(node.right, "the exponent of '**'")
        left = self._build_number(node.left, f"the left operand of '{symbol}'")
        right = self._build_number(node.right, f"the right operand of '{symbol}'")
        return lambda ctx: impl(ctx.ops, left(ctx), right(ctx))

    def _check_exponent(self, node: ast.AST, what: str) -> None:
        """Exponents must be a bounded number or a parameter, optionally signed.

        Checked on the tree before anything else so that '10 ** 1000' or
        '9 ** 9 ** 9' never reach arithmetic of any kind.
        """
        inner = node
        if isinstance(inner, ast.UnaryOp) and isinstance(inner.op, (ast.USub, ast.UAdd)):
            inner = inner.operand
        if isinstance(inner, ast.Name) and inner.id in self.params:
            return
        if (
            isinstance(inner, ast.Constant)
            and type(inner.value) in (int, float)
            and math.isfinite(inner.value)
            and abs(inner.value) <= MAX_EXPONENT
        ):
            return
        raise self._error(
            node, f"{what} must be a number with absolute value at most {MAX_EXPONENT}, or a parameter"
        )

    def _compare(self, node: ast.Compare) -> _Closure:
        impls = []
        for op in node.ops:
            if type(op) not in _COMPARISONS:
                spelling = {ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
                raise self._error(
                    node,
                    f"comparison '{spelling.get(type(op), type(op).__name__)}' is not allowed; "
                    "use <, <=, >, >=, == or !=",
                )
            impls.append(_COMPARISONS[type(op)][1])
        operands = [self._build_number(node.left, "a compared value")]
        operands += [self._build_number(item, "a compared value") for item in node.comparators]

        def compare(ctx: _Context) -> Any:
            # Like Python, a < b < c is (a < b) and (b < c) with b computed once.
            values = [operand(ctx) for operand in operands]
            result = None
            for impl, left, right in zip(impls, values, values[1:]):
                step = impl(ctx.ops, left, right)
                result = step if result is None else ctx.ops.logical_and(result, step)
            return result

        return compare

    def _boolean(self, node: ast.BoolOp) -> _Closure:
        word = "and" if isinstance(node.op, ast.And) else "or"
        operands = [self._build_boolean(value, f"an operand of '{word}'") for value in node.values]

        def combine(ctx: _Context) -> Any:
            logical = ctx.ops.logical_and if word == "and" else ctx.ops.logical_or
            result = operands[0](ctx)
            for operand in operands[1:]:
                result = logical(result, operand(ctx))
            return result

        return combine

    def _call(self, node: ast.Call) -> _Closure:
        func = node.func
        if not isinstance(func, ast.Name):
            if isinstance(func, ast.Attribute):
                raise self._error(func, "attribute access is not allowed", hint=True)
            raise self._error(func, "only the listed functions can be called, by name", hint=True)
        name = func.id
        spec = FUNCTIONS.get(name)
        if spec is None:
            if name in self.tensors or name in self.params:
                raise self._error(func, f"{name!r} is not a function", hint=True)
            raise self._error(func, f"unknown function {name!r}", hint=True)

        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self._error(arg, "starred arguments ('*x') are not allowed")
        options = dict(spec.keywords)
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self._error(keyword, "'**' keyword unpacking is not allowed")
            if keyword.arg not in spec.keywords:
                allowed = ", ".join(spec.keywords) or "none"
                raise self._error(
                    keyword,
                    f"{name}() has no keyword argument {keyword.arg!r} (allowed: {allowed}); "
                    f"the signature is {spec.signature}",
                )
            if keyword.arg == "axis":
                options["axis"] = self._axis(keyword.value, spec)
            else:
                options["keepdims"] = self._keepdims(keyword.value)

        if len(node.args) != len(spec.args):
            count = len(spec.args)
            reason = (
                f"{name}() takes {count} positional argument{'s' if count != 1 else ''}, "
                f"got {len(node.args)}; the signature is {spec.signature}"
            )
            if len(node.args) > count and spec.keywords:
                reason += f" (pass {' and '.join(spec.keywords)} by keyword)"
            raise self._error(node, reason)

        if spec.exponent_arg is not None:
            self._check_exponent(node.args[spec.exponent_arg], f"the exponent argument of {name}()")
        kinds = spec.arg_kinds or (_NUMBER,) * len(spec.args)
        args = []
        for arg_name, kind, arg in zip(spec.args, kinds, node.args):
            what = f"argument {arg_name!r} of {name}()"
            if kind == _BOOLEAN:
                args.append(self._build_boolean(arg, what))
            else:
                args.append(self._build_number(arg, what))

        impl = spec.impl
        frozen_options = MappingProxyType(options)
        return lambda ctx: impl(ctx, [arg(ctx) for arg in args], frozen_options)

    def _axis(self, node: ast.AST, spec: FunctionSpec) -> int | tuple[int, ...] | None:
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if isinstance(node, ast.Tuple):
            if not spec.axis_tuple:
                raise self._error(node, f"{spec.name}() takes a single axis, not a tuple")
            if not node.elts:
                raise self._error(node, "axis tuples must not be empty")
            axes = tuple(self._single_axis(element) for element in node.elts)
            if len(set(axes)) != len(axes):
                raise self._error(node, "axis tuples must not repeat an axis")
            return axes
        return self._single_axis(node)

    def _single_axis(self, node: ast.AST) -> int:
        sign, inner = 1, node
        if isinstance(inner, ast.UnaryOp) and isinstance(inner.op, (ast.USub, ast.UAdd)):
            sign = -1 if isinstance(inner.op, ast.USub) else 1
            inner = inner.operand
        if isinstance(inner, ast.Constant) and type(inner.value) is int:
            axis = sign * inner.value
            if -MAX_AXIS <= axis < MAX_AXIS:
                return axis
            raise self._error(node, f"axis must lie in [{-MAX_AXIS}, {MAX_AXIS - 1}]")
        raise self._error(node, "axis must be an int constant, a tuple of int constants or None")

    def _keepdims(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and type(node.value) is bool:
            return node.value
        raise self._error(node, "keepdims must be True or False")


def _constant_reason(value: Any) -> str:
    """Why a non-numeric literal is refused."""
    if isinstance(value, bool):
        return "True and False are only allowed as keepdims values"
    if value is None:
        return "None is only allowed as an axis value"
    if value is Ellipsis:
        return "'...' is not allowed"
    if isinstance(value, complex):
        return "complex numbers are not allowed"
    if isinstance(value, (str, bytes)):
        return "strings are not allowed"
    return f"literal of type {type(value).__name__} is not allowed"


# ---------------------------------------------------------------------------
# What the analyses of a checked tree share (expression_rows, expression_shapes).

REDUCING_FUNCTIONS = frozenset(f.name for f in _FUNCTION_LIST if "keepdims" in f.keywords)
"""Functions that reduce ``x`` over ``axis`` (``mean``, ``sum``, ``max``, ``min``, ``logsumexp``)."""

ALONG_AXIS_FUNCTIONS = frozenset(f.name for f in _FUNCTION_LIST if "axis" in f.keywords and not f.axis_tuple)
"""Functions that keep ``x``'s shape and couple values along one ``axis`` (``softmax``, ``log_softmax``)."""


def axis_literal(node: ast.AST) -> int | None:
    """The int an axis node of a checked tree spells (``-1``, ``+2``, ``0``),
    or None when it is not an int literal."""
    sign = 1
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -sign if isinstance(node.op, ast.USub) else sign
        node = node.operand
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return sign * node.value
    return None


@functools.lru_cache(maxsize=1024)
def parsed_body(source: str) -> ast.AST:
    """The body of a checked expression's tree, parsed once per text: the
    analyses run on every evaluation and only read the tree."""
    return parse(source.strip()).body


def size(source: str) -> int:
    """How many parts (sub-expressions) a checked expression has: the
    measure of :data:`MAX_NODES`, and what a plan's compile cost grows with."""
    return sum(isinstance(node, ast.expr) for node in ast.walk(parsed_body(source)))
