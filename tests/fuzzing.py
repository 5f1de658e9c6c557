"""Schema-driven fuzzing of lossd's RPCs: request generators and a driver.

One module owns the fuzz inputs, so the tests and ``bench/fuzz.py`` draw
from the same generators:

* Hypothesis strategies for ``google.protobuf.Struct`` values (``STRUCT_VALUES``,
  ``structs()``) and hostile loss expressions (``HOSTILE_CORE``,
  ``generated_hostile()``, ``nested_calls``, ``balanced_sum``), used by
  ``tests/server/losses/test_spec_errors.py`` and ``test_expressions.py`` too;
* ``messages(descriptor)``: any message of a proto descriptor, every field
  drawn from its type (boundary integers, NaN, unicode, unknown enum values,
  long strings, nested messages, maps, oneofs);
* ``calls(ctx)``: one call of any method of ``lossd.v1.LossService``,
  ``lossd.v1.TrainingService``, ``lossd.v1.SharedMemoryService`` or
  ``grpc.health.v1.Health`` or server reflection (streaming ones included): half fully random
  messages, half "near-valid" ones (a valid request with one field mutated:
  wrong dtype, shape against content, huge or negative dims, NaN, unicode
  names, deep or long expressions, empty values), so requests get past the
  first validation into the code behind it;
* ``run()``: sends drawn calls from a few threads, each with a deadline, and
  tallies status codes per method, keeping every INTERNAL/UNKNOWN (also those
  EvaluateStream returns inside a response) with the request as JSON. Against
  a server with tokens (``Context.tokens``), each call also draws the
  credential it is sent with (``CREDENTIALS``).

Imports neither TensorFlow nor the server, so the bench's client process
stays small.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import json
import queue
import random
import threading
import time
import zipfile
from typing import Callable, Optional

import grpc
import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory, struct_pb2, text_format
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis import strategies as st
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from lossd.v1 import (loss_pb2, loss_service_pb2, monitor_service_pb2, shared_memory_service_pb2, tensor_pb2,
                      training_service_pb2)
from lossd_server.grpc import oip_servicer

FD = _descriptor.FieldDescriptor
SERVICES = (loss_service_pb2.DESCRIPTOR.services_by_name["LossService"],
            training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
            shared_memory_service_pb2.DESCRIPTOR.services_by_name["SharedMemoryService"],
            monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
            oip_servicer.SERVICE)  # the Open Inference Protocol's inference.GRPCInferenceService
# Server streams that stay open until the client ends them: the first
# response is read, then the call is cancelled (as a client that closes).
OPEN_ENDED = {"OpenSession", "Watch"}
# The credential each call is sent with, by label, against a server with
# tokens (``Context.tokens`` maps a label to its token): mostly one with every
# scope lossd's methods need, so requests reach the handlers; sometimes a
# token without the method's scope, none at all, or one the server never
# issued. ``"none"`` and an empty label send no ``authorization`` metadata.
CREDENTIALS = ["user"] * 6 + ["admin"] * 2 + ["evaluate", "none", "bad"]
FORGED_TOKEN = "lsd_000000000000_" + "A" * 43  # the shape of a real one
# Bytes no request message parses (each method must answer INVALID_ARGUMENT).
UNDECODABLE = [b"\xff" * 11, b"\x0a\x7f\x01", b"\x0f", b"\x12\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]
METHODS = [method for service in SERVICES for method in service.methods]
BAD_CODES = ("INTERNAL", "UNKNOWN")

# Server settings small enough that no request can make the server spend much
# (bench/fuzz.py passes them as flags, tests/robustness/test_fuzz_smoke.py as
# Settings). Training: one slot, two queued jobs, four steps a job, so the jobs
# fuzzing creates stay short and few.
SMALL_LIMITS = dict(
    max_message_bytes=1 << 20, max_tensor_elements=100_000, max_broadcast_elements=1_000_000,
    max_composite_terms=4, max_upload_bytes=256 << 10, max_training_steps=4, max_model_parameters=50_000,
    max_queued_jobs=2, max_concurrent_jobs=1, max_registered_losses=8, cache_size=64, workers=8,
)

# -- Struct values (loss, model and optimizer params) ------------------------------

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70).map(float))
STRUCT_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
PARAM_NAMES = st.sampled_from(["delta", "axis", "from_logits", "label_smoothing", "ignore_class", "gamma",
                               "alpha", "k", "reduction", "", "learning_rate", "beta_1", "hidden_units",
                               "filters", "latent_dim", "dropout", "activation"])


def make_struct(values: dict) -> struct_pb2.Struct:
    """A Struct holding ``values`` as they are: NaN, Inf and 1e300 included
    (``Struct.update`` refuses nothing)."""
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def structs() -> st.SearchStrategy[struct_pb2.Struct]:
    """Structs of up to three entries under parameter-like names."""
    return st.dictionaries(st.one_of(PARAM_NAMES, st.text(max_size=6)), STRUCT_VALUES, max_size=3).map(make_struct)


# -- hostile expressions -----------------------------------------------------------

def nested_calls(depth: int) -> str:
    """``abs(abs(...(y_true)...))``: ``depth`` calls deep."""
    return "abs(" * depth + "y_true" + ")" * depth


def balanced_sum(leaves: int) -> str:
    """A balanced sum of ``leaves`` names ``a``: 2n - 1 nodes, shallow depth."""
    if leaves == 1:
        return "a"
    half = leaves // 2
    return f"({balanced_sum(half)}+{balanced_sum(leaves - half)})"


# (source, a fragment the refusal message must contain, case-insensitively;
# None for "just a position").
HOSTILE_CORE = [
    ("__import__('os').system('x')", None),
    ("__import__(y_true)", "unknown function '__import__'"),
    ("y_true.__class__.__mro__", "attribute"),
    ("().__class__", "attribute"),
    ("().__class__.__bases__[0].__subclasses__()", None),
    ("[].__class__", "attribute"),
    ("y_true.__class__", "attribute"),
    ("y_true.numpy()", "attribute"),
    ("abs.__self__", "attribute"),
    ("mean.__globals__", "attribute"),
    ("abs(y_true).__class__", "attribute"),
    ("(lambda: 0).__globals__", None),
    ("[x for x in ()]", "comprehension"),
    ("(x for x in ())", "generator"),
    ("{x for x in ()}", "comprehension"),
    ("{x: x for x in ()}", "comprehension"),
    ("lambda: 0", "lambda"),
    ("lambda x: x", "lambda"),
    ("open('/etc/passwd')", "string"),
    ("open(y_true)", "unknown function 'open'"),
    ("getattr(y_true, 'numpy')", None),
    ("getattr(y_true, y_pred)", "unknown function 'getattr'"),
    ("y_true[0]", "subscript"),
    ("y_true[::-1]", "subscript"),
    ("y_true[...]", "subscript"),
    ("'a'*10", "string"),
    ("b'x'", "string"),
    ("f'{y_true}'", "string"),
    ("9**9**9", "exponent"),
    ("10**100", "exponent"),
    ("10**1000", "exponent"),
    ("1e400", "finite"),
    ("-1e400", "finite"),
    ("1e13", "1e+12"),
    ("10000000000000000000000000000000000000", "1e+12"),
    ("0x" + "f" * 40, "1e+12"),
    ("(" * 5000, "limit"),
    ("a" * 100000, "limit"),
    ("abs(" * 1000 + "y_true" + ")" * 1000, "limit"),
    ("-" * 1990 + "y_true", "nested deeper"),
    ("(" * 40 + "y_true" + ")" * 40, "nested deeper"),
    ("y_true+" * 100 + "y_true", "nested deeper"),
    ("eval('1')", None),
    ("eval(y_true)", "unknown function 'eval'"),
    ("exec(y_true)", "unknown function 'exec'"),
    ("exec", "unknown name 'exec'"),
    ("compile(y_true)", "unknown function"),
    ("globals()", "unknown function 'globals'"),
    ("locals()", "unknown function"),
    ("vars()", "unknown function"),
    ("breakpoint()", "unknown function"),
    ("print(y_true)", "unknown function 'print'"),
    ("type(y_true)", "unknown function 'type'"),
    ("y_true if 1 else 2", "where"),
    ("(x := 1)", ":="),
    ("(y_true := 1)", ":="),
    ("1j", "complex"),
    ("y_true + 2j", "complex"),
    ("y_true @ y_pred", "@"),
    ("y_true and y_pred", "boolean"),
    ("y_true > 0 and y_pred", "boolean"),
    ("y_true or 1", "boolean"),
    ("not y_true", "boolean"),
    ("~y_true", "~"),
    ("y_true << 1", "<<"),
    ("y_true % 2", "%"),
    ("y_true // 2", "//"),
    ("y_true ^ 2", "^"),
    ("y_true is y_pred", "'is'"),
    ("y_true is not y_pred", "'is not'"),
    ("y_true in y_pred", "'in'"),
    ("y_true not in y_pred", "'not in'"),
    ("mean(y_true, axis=y_pred)", "axis"),
    ("mean(y_true, axis=1.0)", "axis"),
    ("mean(y_true, axis=True)", "axis"),
    ("mean(y_true, axis=(0, 0))", "repeat"),
    ("mean(y_true, axis=())", "empty"),
    ("mean(y_true, axis=99)", "axis"),
    ("mean(y_true, axis=-99)", "axis"),
    ("mean(y_true, axis=__import__('os'))", None),
    ("mean(y_true, foo=1)", "'foo'"),
    ("mean(y_true, keepdims=1)", "keepdims"),
    ("mean(y_true, keepdims=y_pred)", "keepdims"),
    ("mean(y_true, -1)", "keyword"),
    ("softmax(y_true, axis=(0, 1))", "single axis"),
    ("softmax(y_true, keepdims=True)", "keepdims"),
    ("abs(x=y_true)", "keyword"),
    ("abs(y_true, **{})", "'**'"),
    ("clip(y_true)", "3 positional arguments"),
    ("clip(y_true, 0, 1, 2)", "3 positional arguments"),
    ("where(y_true, 1, 0)", "boolean"),
    ("where(y_true > 0, y_true > 1, 0)", "number"),
    ("(y_true < y_pred) + 1", "number"),
    ("-(y_true < 1)", "number"),
    ("mean(y_true > 0)", "number"),
    ("(y_true < 1) < 2", "number"),
    ("y_true < y_pred", "must produce a number"),
    ("*y_true", None),
    ("mean(*y_true)", "starred"),
    ("[*y_true]", None),
    ("{}", "dict"),
    ("[]", "list"),
    ("()", "tuple"),
    ("(y_true,)", "tuple"),
    ("y_true, y_pred", "tuple"),
    ("{y_true}", "set"),
    ("{1: 2}", "dict"),
    ("None", "None"),
    ("...", "'...'"),
    ("True", "True"),
    ("False + y_true", "False"),
    ("await y_true", "await"),
    ("(yield)", None),
    ("__builtins__", "unknown name '__builtins__'"),
    ("__builtins__.eval", "attribute"),
    ("_", "unknown name '_'"),
    ("self", "unknown name 'self'"),
    ("x", "unknown name 'x'"),
    ("FUNCTIONS", "unknown name"),
    ("ops.abs(y_true)", "attribute"),
    ("keras.ops.abs(y_true)", "attribute"),
    ("tf.print(y_true)", "attribute"),
    ("y_true(1)", "not a function"),
    ("delta()", "not a function"),
    ("abs", "is a function"),
    ("abs(y_true)(1)", "only the listed functions"),
    ("foo(y_true)", "unknown function 'foo'"),
    ("y_true;y_pred", "syntax"),
    ("y_true\ny_pred", "syntax"),
    ("y_true +", "syntax"),
    (")", None),
    ("y_true)", None),
    ("", "empty"),
    ("   ", "empty"),
    # Unicode and escape tricks: Python folds look-alike letters (NFKC) into
    # ASCII names, so these would otherwise read y_true.
    ("\uff59_true", "ascii"),
    ("\U0001d432_true", "ascii"),
    ("y_true\u200b", "ascii"),
    ("y\u0308_true", "ascii"),
    ("\\u0079_true", None),
    ("'\\x79_true'", "string"),
    ("y_true\x00", "control"),
    ("y_true\x0c+1", "control"),
    ("y_true\x1b[2J", "control"),
    # Found by bench/fuzz.py: an integer past a float's range raised OverflowError (INTERNAL).
    ("7" * 400, "finite"),
    ("y_true * " + "9" * 309, "finite"),
]


def generated_hostile() -> list[tuple[str, Optional[str]]]:
    """Attribute access, Python builtins, unsupported operators, wrong arity
    for every function of the expression language, bad exponents."""
    from lossd_server.losses.expressions import FUNCTIONS  # the language's own table; no TensorFlow

    cases: list[tuple[str, Optional[str]]] = []
    bases = ["y_true", "y_pred", "delta", "(1)", "abs(y_true)", "(y_true + 1)", "mean(y_pred)", "pi", "epsilon()"]
    attributes = ["__class__", "__dict__", "__globals__", "__subclasses__", "numpy", "shape", "dtype", "__init__"]
    cases += [(f"{base}.{attr}", "attribute") for base in bases for attr in attributes]
    names = [
        "print", "open", "eval", "exec", "compile", "globals", "locals", "vars", "dir", "getattr",
        "setattr", "delattr", "__import__", "input", "breakpoint", "help", "type", "object", "super",
        "memoryview", "bytearray", "id", "hash", "iter", "next", "exit", "quit", "os", "sys",
        "subprocess", "tf", "np", "keras", "ops", "cls", "__name__", "__file__", "__loader__",
        "__spec__", "__class__", "float", "int", "len", "range", "cosh", "cast", "log2",
    ]
    cases += [(name, f"'{name}'") for name in names]
    cases += [(f"{name}(y_true)", f"unknown function '{name}'") for name in names]
    operators = ["%", "//", "@", "<<", ">>", "|", "&", "^"]
    pairs = [("y_true", "y_pred"), ("1", "2"), ("delta", "y_pred")]
    cases += [(f"{a} {op} {b}", op) for op in operators for a, b in pairs]
    for name, spec in FUNCTIONS.items():
        too_many = ", ".join(["y_true"] * (len(spec.args) + 1))
        cases.append((f"{name}({too_many})", "positional argument"))
        if spec.args:
            cases.append((f"{name}()", "positional argument"))
        if not spec.keywords:
            arguments = ["y_true"] * len(spec.args) + ["axis=0"]
            cases.append((f"{name}({', '.join(arguments)})", "no keyword"))
    bad_exponents = ["17", "-17", "100", "1e3", "y_pred", "(1 + 1)", "abs(2)", "2 ** 2", "pi"]
    cases += [(f"y_true ** {exponent}", "exponent") for exponent in bad_exponents]
    cases += [(f"pow(y_true, {exponent})", "exponent") for exponent in bad_exponents]
    return cases


# Expressions that evaluate, so near-valid requests reach compilation and
# TensorFlow; ``k`` is a parameter, ``w`` an extra tensor.
GOOD_EXPRESSIONS = [
    "mean(square(y_true - y_pred), axis=-1)",
    "sum(abs(y_true - y_pred), axis=None)",
    "mean(square(y_true - y_pred) * k, axis=-1)",
    "mean(log_softmax(y_pred, axis=-1) * y_true, axis=-1)",
    "max(abs(y_true - y_pred), axis=0)",
    "y_true * square(y_pred)",
    "mean(square(y_true - y_pred) * w, axis=-1)",
    "mean(where(abs(y_true - y_pred) <= k, square(y_true - y_pred), abs(y_true - y_pred)), axis=-1)",
]


# -- any message of a descriptor ---------------------------------------------------

# Strings lossd gives meaning to, mixed into every string field.
WORDS = ["", "mse", "huber", "digits", "jobs/", "jobs/x", "mlp", "cnn", "vae", "adam", "accuracy", "y_true",
         "y_pred", "sample_weight", "expression", "composite", "folder:", "folder:../../etc", "a" * 65,
         "\uff4d\uff53\uff45", "\x00", "\u202e", "jobs/../..", "ÿ" * 3, "..", "nan", "-1", "9" * 30]
_INT_BOUNDS = {32: (-2**31, 2**31 - 1), 64: (-2**63, 2**63 - 1)}
_SIGNED = {FD.TYPE_INT32: 32, FD.TYPE_SINT32: 32, FD.TYPE_SFIXED32: 32,
           FD.TYPE_INT64: 64, FD.TYPE_SINT64: 64, FD.TYPE_SFIXED64: 64}
_UNSIGNED = {FD.TYPE_UINT32: 32, FD.TYPE_FIXED32: 32, FD.TYPE_UINT64: 64, FD.TYPE_FIXED64: 64}


def _pick(getter: Callable[[], list[str]], fallback: str = "jobs/0") -> st.SearchStrategy[str]:
    """One element of ``getter()``, read at draw time (the list may grow during a run)."""
    def element(i: int) -> str:
        values = getter() or [fallback]
        return values[i % len(values)]

    return st.integers(0, 1 << 16).map(element)


def strings(extra: Callable[[], list[str]] = lambda: []) -> st.SearchStrategy[str]:
    """Random text, lossd's own words, names from ``extra()`` (read at draw
    time, so lists that grow during a run are seen), and long strings."""
    return st.one_of(
        st.text(max_size=12), st.sampled_from(WORDS),
        _pick(extra, ""),
        st.tuples(st.text(min_size=1, max_size=3), st.integers(10, 30_000)).map(lambda t: (t[0] * t[1])[:t[1]]))


def _seeded_bytes(n: int, seed_: int) -> bytes:
    return random.Random(seed_).randbytes(n)


BYTES = st.one_of(st.binary(max_size=16), st.tuples(st.integers(0, 70_000), st.integers()).map(
    lambda t: _seeded_bytes(*t)))


def scalars(field: FD, words: Callable[[], list[str]] = lambda: []) -> st.SearchStrategy:
    """Values of a non-message field, from its type alone."""
    if field.type in _SIGNED:
        lo, hi = _INT_BOUNDS[_SIGNED[field.type]]
        return st.one_of(st.integers(lo, hi), st.integers(-3, 70))
    if field.type in _UNSIGNED:
        return st.integers(0, 2 ** _UNSIGNED[field.type] - 1)
    if field.type == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if field.type == FD.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return strings(words)
    if field.type == FD.TYPE_BYTES:
        return BYTES
    if field.type == FD.TYPE_ENUM:
        # proto3 enums are open: a client can send numbers the schema does not name.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(*_INT_BOUNDS[32]))
    raise TypeError(f"no strategy for field {field.full_name} of type {field.type}")


def _real_oneof(oneof) -> bool:
    # A proto3 `optional` field sits alone in a synthetic oneof named after it.
    return not (len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name)


def _message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


_STRATEGIES: dict = {}


def _cached(key, make: Callable[[], st.SearchStrategy]) -> st.SearchStrategy:
    # Building a strategy costs more than drawing from it: build each once.
    strategy = _STRATEGIES.get(key)
    if strategy is None:
        strategy = _STRATEGIES[key] = make()
    return strategy


def messages(descriptor, *, depth: int = 3, words: Callable[[], list[str]] = lambda: []) -> st.SearchStrategy:
    """Any message of ``descriptor``: each field set or not, drawn from its
    type; nested messages down to ``depth`` levels; one member of each oneof."""
    return _cached(("message", descriptor.full_name, depth, id(words)), lambda: _messages(descriptor, depth, words))


def _messages(descriptor, depth: int, words) -> st.SearchStrategy:
    if descriptor.full_name == "google.protobuf.Struct":
        return structs()
    cls = _message_class(descriptor)
    if not descriptor.fields:
        return st.builds(cls)
    oneofs = [oneof for oneof in descriptor.oneofs if _real_oneof(oneof)]
    plain = [f for f in descriptor.fields if f.containing_oneof is None or not _real_oneof(f.containing_oneof)]

    @st.composite
    def build(draw):
        message = cls()
        for oneof in oneofs:
            chosen = draw(st.sampled_from([None, *oneof.fields]))
            if chosen is not None:
                set_field(draw, message, chosen, depth, words)
        for field in plain:
            if draw(st.booleans()):
                set_field(draw, message, field, depth, words)
        return message

    return build()


def field_values(field: FD, depth: int, words) -> st.SearchStrategy:
    """One value for a singular field (a message, or a scalar)."""
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth=depth - 1, words=words)
    return _cached(("scalar", field.full_name, id(words)), lambda: scalars(field, words))


_COUNTS = st.one_of(st.integers(0, 3), st.sampled_from([8, 65, 300]))


def set_field(draw, message, field: FD, depth: int, words) -> None:
    """Sets (or, for repeated fields, fills) ``field`` of ``message`` with drawn values."""
    if field.type == FD.TYPE_MESSAGE and depth <= 0:
        return
    if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        container = getattr(message, field.name)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(field_values(key_field, depth, words))
            if value_field.type == FD.TYPE_MESSAGE:
                container[key].CopyFrom(draw(field_values(value_field, depth, words)))
            else:
                container[key] = draw(field_values(value_field, depth, words))
        return
    if field.is_repeated:
        # A few elements, or many scalars (a shape of rank 65, a long list of names).
        count = draw(st.integers(0, 3) if field.type == FD.TYPE_MESSAGE else _COUNTS)
        # Long lists repeat three drawn values: each draw costs Hypothesis time.
        values = [draw(field_values(field, depth, words)) for _ in range(min(count, 3))]
        values = (values * count)[:count]
        container = getattr(message, field.name)
        del container[:]
        if field.type == FD.TYPE_MESSAGE:
            for value in values:
                container.add().CopyFrom(value)
        else:
            container.extend(values)
        return
    value = draw(field_values(field, depth, words))
    if field.type == FD.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- near-valid requests -------------------------------------------------------------

@dataclasses.dataclass
class Context:
    """What the fuzzer knows about the server under test; lists may grow
    while it runs (``calls`` reads them at draw time)."""

    loss_names: list[str] = dataclasses.field(default_factory=lambda: ["mse", "huber", "mae"])
    jobs: list[str] = dataclasses.field(default_factory=list)             # any job names seen
    classifier_jobs: list[str] = dataclasses.field(default_factory=list)  # trained classifiers (Predict)
    generator_jobs: list[str] = dataclasses.field(default_factory=list)   # trained generators (Generate)
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["digits"])
    loss_names_registered: list[str] = dataclasses.field(default_factory=lambda: ["fuzz_a", "fuzz_b", "fuzz_c"])
    cancel_created: bool = True  # cancel each job CreateJob makes, right away
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # CREDENTIALS label -> token; {}: none
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self):
        # One bound method for the whole run: strategies are cached by its identity.
        self.words = self._words

    def _words(self) -> list[str]:
        return self.loss_names + self.jobs + self.datasets + self.loss_names_registered

    def metadata(self, credential: str) -> tuple:
        """The call metadata a ``CREDENTIALS`` label stands for on this server."""
        if credential == "bad":
            return (("authorization", f"Bearer {FORGED_TOKEN}"),)
        token = self.tokens.get(credential)
        return (("authorization", f"Bearer {token}"),) if token else ()

    def add_job(self, name: str) -> None:
        with self.lock:
            if name not in self.jobs:
                self.jobs.append(name)
                del self.jobs[:-32]  # the newest few are enough


_FLOATS = (np.float32, np.float64)
_OTHER_DTYPES = (np.float16, np.int32, np.int64, np.uint8, np.bool_, np.int8)


@st.composite
def tensor_pairs(draw):
    """(y_true, y_pred) arrays that many losses accept: same-shape values in
    (0, 1), binary labels, or class indices with y_pred's class axis dropped."""
    dtype = draw(st.sampled_from(_FLOATS + _OTHER_DTYPES[:1]))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y_pred = rng.uniform(0.05, 0.95, shape).astype(dtype)
    kind = draw(st.sampled_from(["same", "binary", "sparse"]))
    if kind == "same":
        y_true = rng.uniform(0.05, 0.95, shape).astype(dtype)
    elif kind == "binary":
        y_true = rng.integers(0, 2, shape).astype(dtype)
    else:
        y_true = rng.integers(0, shape[-1], shape[:-1] or (1,)).astype(np.int32)
    return y_true, y_pred


def tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """An array as a Tensor, encoded here (not with lossd.wire) so that
    dtypes the wire refuses to encode can still be sent."""
    enum = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3, np.dtype(np.int8): 5,
            np.dtype(np.int16): 6, np.dtype(np.int32): 7, np.dtype(np.int64): 8, np.dtype(np.uint8): 9,
            np.dtype(np.bool_): 10}[array.dtype]
    return tensor_pb2.Tensor(dtype=enum, shape=array.shape, content=np.ascontiguousarray(array).tobytes())


HUGE_DIMS = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, -1, -2**63, 0, 100_001, 1 << 20]


@st.composite
def mutate_tensor(draw, message) -> str:
    """Mutates a Tensor or TensorInfo in place; returns what it did."""
    how = draw(st.sampled_from(["dtype", "shape", "dims", "rank", "content", "nan", "empty", "transpose"]))
    has_content = hasattr(message, "content")
    if how == "dtype":
        message.dtype = draw(st.one_of(st.integers(0, 12), st.integers(*_INT_BOUNDS[32])))
    elif how == "shape":
        message.shape.append(draw(st.integers(1, 4)))
    elif how == "dims":
        index = draw(st.integers(0, max(0, len(message.shape) - 1)))
        if message.shape:
            message.shape[index] = draw(st.sampled_from(HUGE_DIMS))
        else:
            message.shape.append(draw(st.sampled_from(HUGE_DIMS)))
    elif how == "rank":
        del message.shape[:]
        message.shape.extend([1] * draw(st.sampled_from([0, 8, 9, 64, 65, 200])))
    elif how == "content" and has_content:
        cut = draw(st.integers(-8, 8))
        message.content = message.content[:cut] if cut < 0 else message.content + bytes(cut or 1)
    elif how == "nan" and has_content and message.dtype in (2, 3):
        dt = np.float32 if message.dtype == 2 else np.float64
        values = np.frombuffer(message.content, dtype=dt).copy()
        if values.size:
            values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
        message.content = values.tobytes()
    elif how == "empty":
        del message.shape[:]
        message.shape.extend([0, *draw(st.lists(st.integers(0, 3), max_size=2))])
        if has_content:
            message.content = b""
    elif how == "transpose" and len(message.shape) >= 2:
        dims = list(message.shape)
        del message.shape[:]
        message.shape.extend(dims[::-1])
    return f"tensor {how}"


@st.composite
def loss_specs(draw, ctx: Context) -> loss_pb2.LossSpec:
    """Loss specs near what clients send: a known loss (maybe with params),
    a good or hostile expression, a deep or long one, or a small composite."""
    kind = draw(st.sampled_from(["name", "name", "params", "expression", "hostile", "deep", "composite",
                                 "registered"]))
    if kind in ("name", "params"):
        spec = loss_pb2.LossSpec(name=draw(_pick(lambda: ctx.loss_names, "mse")))
        if kind == "params":
            spec.params.CopyFrom(draw(structs()))
        return spec
    if kind == "registered":
        return loss_pb2.LossSpec(name=draw(_pick(lambda: ctx.loss_names_registered, "fuzz_a")))
    if kind == "expression":
        spec = loss_pb2.LossSpec(expression=draw(st.sampled_from(GOOD_EXPRESSIONS)))
        if "k" in spec.expression.replace("keepdims", ""):
            spec.params.CopyFrom(make_struct({"k": draw(st.sampled_from([0.5, 1.0, 2.0, -1.0, 1e30]))}))
        return spec
    if kind == "hostile":
        return loss_pb2.LossSpec(expression=draw(st.sampled_from(_hostile_sources())))
    if kind == "deep":
        n = draw(st.sampled_from([30, 31, 32, 33, 100, 128, 129, 400]))
        source = draw(st.sampled_from([nested_calls(n), balanced_sum(n).replace("a", "y_true"),
                                       "y_true" + " " * (n * 16), "(" * n + "y_true" + ")" * n,
                                       "+".join(["y_true"] * n), "-" * n + "y_true"]))
        return loss_pb2.LossSpec(expression=source)
    terms = []
    for i in range(draw(st.integers(1, 5))):
        term = loss_pb2.LossTerm(label=draw(st.sampled_from([f"t{i}", "t0", "", "ü", "a" * 100])),
                                 loss=loss_pb2.LossSpec(name=draw(_pick(lambda: ctx.loss_names, "mse"))))
        if draw(st.booleans()):
            term.weight = draw(st.floats(allow_nan=True, allow_infinity=True))
        term.reduction = draw(st.integers(0, 6))
        terms.append(term)
    return loss_pb2.LossSpec(terms=terms)


_HOSTILE: list[str] = []


def _hostile_sources() -> list[str]:
    if not _HOSTILE:
        _HOSTILE.extend(sorted({source for source, _ in HOSTILE_CORE + generated_hostile()}))
    return _HOSTILE


@st.composite
def evaluate_requests(draw, ctx: Context) -> loss_service_pb2.EvaluateRequest:
    y_true, y_pred = draw(tensor_pairs())
    request = loss_service_pb2.EvaluateRequest(loss=draw(loss_specs(ctx)), y_true=tensor(y_true),
                                               y_pred=tensor(y_pred), reduction=draw(st.integers(0, 5)),
                                               gradient=draw(st.booleans()))
    if draw(st.booleans()):
        request.sample_weight.CopyFrom(tensor(np.full(y_pred.shape[:1], 0.5, y_pred.dtype)))
    if "w" in request.loss.expression.replace("where", "") or draw(st.integers(0, 9)) == 0:
        request.tensors[draw(st.sampled_from(["w", "w", "y_true", "1x", "ü"]))].CopyFrom(tensor(np.ones_like(y_pred)))
    return request


def _npz_bytes(rng, n: int, side: int, classes: int, keys=("x", "y")) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{keys[0]: rng.integers(0, 256, (n, side, side)).astype(np.uint8),
                        keys[1]: rng.integers(0, classes, n)})
    return buffer.getvalue()


_BOMB: list[bytes] = []


def _zip_bytes(rng, n: int, bomb: bool) -> bytes:
    """A zip of ``n`` members in two class folders that are not images; with
    ``bomb``, 8 MiB of zeros (a few KiB compressed) instead."""
    if bomb:
        if not _BOMB:
            _BOMB.append(_zip_members([("c0/0.png", bytes(8 << 20)), ("c1/1.png", bytes(1 << 10))]))
        return _BOMB[0]
    return _zip_members([(f"c{i % 2}/{i}.png", rng.bytes(32)) for i in range(n)])


def _zip_members(members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


@st.composite
def upload_streams(draw, ctx: Context) -> list:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fmt = draw(st.sampled_from([1, 1, 1, 2, 3]))
    if fmt == 1:
        data = _npz_bytes(rng, draw(st.integers(1, 40)), draw(st.sampled_from([8, 8, 1, 64])),
                          draw(st.integers(1, 12)), draw(st.sampled_from([("x", "y"), ("images", "labels"),
                                                                         ("x", "z")])))
    else:
        data = _zip_bytes(rng, draw(st.integers(1, 6)), draw(st.booleans()))
    header = training_service_pb2.DatasetHeader(name=draw(st.sampled_from(["fuzzset", "fuzzset2", "digits", ""])),
                                                format=fmt, size_bytes=len(data), replace=draw(st.booleans()))
    # At most 256 chunks: a stream of 100k one-byte messages costs seconds of
    # both sides' Python and tests nothing a few hundred do not (the bound on
    # a stream's messages is its deadline and max_upload_bytes).
    size = max(draw(st.integers(1, 8192)), -(-len(data) // 256))
    chunks = [training_service_pb2.UploadDatasetRequest(chunk=data[i:i + size]) for i in range(0, len(data), size)]
    return [training_service_pb2.UploadDatasetRequest(header=header), *chunks]


@st.composite
def chunked_streams(draw, ctx: Context) -> list:
    y_true, y_pred = draw(tensor_pairs())
    header = loss_service_pb2.ChunkedHeader(
        loss=draw(loss_specs(ctx)), reduction=draw(st.integers(0, 5)), gradient=draw(st.booleans()),
        y_true=tensor_pb2.TensorInfo(dtype=tensor(y_true).dtype, shape=y_true.shape),
        y_pred=tensor_pb2.TensorInfo(dtype=tensor(y_pred).dtype, shape=y_pred.shape))
    rows = y_pred.shape[0]
    step = draw(st.integers(1, max(1, rows)))
    stream = [loss_service_pb2.EvaluateChunkedRequest(header=header)]
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        stream.append(loss_service_pb2.EvaluateChunkedRequest(chunk=loss_service_pb2.TensorChunk(
            start=start, rows=stop - start, y_true=y_true[start:stop].tobytes() if y_true.shape[0] == rows
            else y_true.tobytes(), y_pred=y_pred[start:stop].tobytes())))
    return stream


# Presets small enough to pass max_model_parameters, so CreateJob's later checks run.
_TINY_MODELS = {"mlp": {"hidden_units": [4]}, "cnn": {"filters": [2], "dense_units": 0},
                "vae": {"filters": [2], "latent_dim": 2}}


@st.composite
def job_specs(draw, ctx: Context) -> training_service_pb2.JobSpec:
    preset = draw(st.sampled_from(["mlp", "mlp", "cnn", "vae"]))
    spec = training_service_pb2.JobSpec(dataset=draw(_pick(lambda: ctx.datasets, "digits")), epochs=1,
                                        steps_per_epoch=draw(st.integers(1, 4)),
                                        batch_size=draw(st.sampled_from([0, 8])))
    spec.model.preset = preset
    spec.model.params.CopyFrom(make_struct(_TINY_MODELS[preset]))
    if preset != "vae" or draw(st.booleans()):
        spec.loss.CopyFrom(draw(loss_specs(ctx)))
    if draw(st.booleans()):
        spec.optimizer.name = draw(st.sampled_from(["adam", "sgd", "lion", "ftrl"]))
        spec.optimizer.learning_rate = draw(st.sampled_from([1e-3, 0.0, -1.0, float("nan"), 1e300]))
    return spec


def _near_valid_base(method: str, ctx: Context) -> st.SearchStrategy[list]:
    """Valid (or nearly valid) request messages for a method, as a list."""
    return _cached(("near-valid", method, id(ctx)), lambda: _near_valid_base_uncached(method, ctx))


def _near_valid_base_uncached(method: str, ctx: Context) -> st.SearchStrategy[list]:
    one = lambda strategy: strategy.map(lambda m: [m])  # noqa: E731
    jobs = _pick(lambda: ctx.jobs)
    if method == "Evaluate":
        return one(evaluate_requests(ctx))
    if method == "EvaluateStream":
        return st.lists(evaluate_requests(ctx).map(lambda r: loss_service_pb2.EvaluateStreamRequest(
            request=r, request_id="r")), min_size=1, max_size=4)
    if method == "EvaluateChunked":
        return chunked_streams(ctx)
    if method == "RegisterLoss":
        return one(st.builds(lambda name, spec, replace, doc: loss_service_pb2.RegisterLossRequest(
            name=name, expression=spec.expression or spec.name, params=spec.params, replace=replace, doc=doc),
            _pick(lambda: ctx.loss_names_registered, "fuzz_a"), loss_specs(ctx), st.booleans(),
            st.sampled_from(["", "a doc", "tab\tok", "bell\x07"])))
    if method == "DeleteLoss":
        return one(_pick(lambda: ctx.loss_names_registered).map(lambda n: loss_service_pb2.DeleteLossRequest(name=n)))
    if method == "CreateJob":
        return one(st.builds(lambda spec, rid: training_service_pb2.CreateJobRequest(spec=spec, request_id=rid),
                             job_specs(ctx), st.sampled_from(["", "", "", "fuzz-retry", "bad id\n"])))
    if method in ("GetJob", "CancelJob"):
        cls = getattr(training_service_pb2, f"{method}Request")
        return one(jobs.map(lambda n: cls(name=n)))
    if method == "WatchJob":
        return one(st.builds(lambda n, a: training_service_pb2.WatchJobRequest(name=n, after_sequence=a), jobs,
                             st.integers(-2, 5)))
    if method == "ListJobs":
        return one(st.builds(lambda size, states: training_service_pb2.ListJobsRequest(page_size=size,
                                                                                         states=states),
                             st.integers(-1, 1001), st.lists(st.integers(0, 7), max_size=3)))
    if method == "UploadDataset":
        return upload_streams(ctx)
    if method == "DownloadArtifact":
        return one(st.builds(lambda n, a: training_service_pb2.DownloadArtifactRequest(name=n, artifact=a), jobs,
                             st.integers(0, 4)))
    if method == "Predict":
        return one(st.builds(lambda n, seed_, shape: training_service_pb2.PredictRequest(
            name=n, images=tensor(np.random.default_rng(seed_).uniform(0, 1, shape).astype(np.float32))),
            st.one_of(_pick(lambda: ctx.classifier_jobs), jobs), st.integers(0, 2**32 - 1),
            st.sampled_from([(2, 8, 8, 1), (1, 8, 8), (3, 8, 8, 3), (2, 4, 4, 1), (1, 64)])))
    if method in ("Generate", "GenerateStream"):  # one request message for both
        return one(st.builds(lambda n, c, s: training_service_pb2.GenerateRequest(name=n, count=c, seed=s),
                             st.one_of(_pick(lambda: ctx.generator_jobs), jobs), st.integers(-1, 70),
                             st.integers(*_INT_BOUNDS[64])))
    if method in ("RegisterRegion", "UnregisterRegion"):
        cls = getattr(shared_memory_service_pb2, f"{method}Request")
        names = st.sampled_from(["lossd_x", "lossd_nl\n", "lossd_../etc/passwd", "lossd_a/b", "lossd_" + "x" * 300,
                                 "psm_1", "lossd_\x00", "lossd_0123456789abcdef_r"])
        fields = dict(session_id=st.sampled_from(["", "0" * 32, "nope"]), name=names)
        if method == "RegisterRegion":
            fields["byte_size"] = st.sampled_from([0, -1, 1, 4096, 2**40, 2**63 - 1])
        return one(st.builds(cls, **fields))
    if method in ("Check", "Watch"):  # grpc.health.v1
        return one(st.sampled_from(["", "lossd.v1.LossService", "lossd.v1.TrainingService", "lossd.state", "nope",
                                    "\u202e", "x" * 300]).map(lambda n: health_pb2.HealthCheckRequest(service=n)))
    if method == "ServerReflectionInfo":
        symbols = st.sampled_from(["lossd.v1.LossService", "lossd.v1.Tensor", "lossd.v1.LossService.Evaluate",
                                   "grpc.health.v1.Health", "", "nope", "lossd.v1." + "x" * 300])
        one_request = st.one_of(
            st.just(reflection_pb2.ServerReflectionRequest(list_services="")),
            symbols.map(lambda n: reflection_pb2.ServerReflectionRequest(file_containing_symbol=n)),
            st.sampled_from(["lossd/v1/loss.proto", "google/protobuf/struct.proto", "../etc/passwd", ""]).map(
                lambda n: reflection_pb2.ServerReflectionRequest(file_by_filename=n)))
        return st.lists(one_request, min_size=1, max_size=3)
    # ListLosses, ListDatasets, OpenSession: nothing to be near.
    return one(st.just(_message_class(_method(method).input_type)()))


@st.composite
def mutate(draw, message, depth: int, words) -> str:
    """Mutates one field somewhere in ``message`` (in place); returns its path."""
    fields = list(message.DESCRIPTOR.fields)
    field = draw(st.sampled_from(fields))
    value = getattr(message, field.name)
    if field.type == FD.TYPE_MESSAGE and depth > 0 and draw(st.integers(0, 3)) > 0:
        is_map = field.message_type.GetOptions().map_entry
        if is_map:
            if len(value) and field.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                key = draw(st.sampled_from(sorted(value)))
                return f"{field.name}[{key}]." + draw(mutate(value[key], depth - 1, words))
        elif field.is_repeated:
            if len(value):
                index = draw(st.integers(0, len(value) - 1))
                return f"{field.name}[{index}]." + draw(mutate(value[index], depth - 1, words))
        elif message.HasField(field.name):
            if field.message_type.full_name in ("lossd.v1.Tensor", "lossd.v1.TensorInfo") and draw(st.booleans()):
                return f"{field.name}: " + draw(mutate_tensor(value))
            if field.message_type.full_name == "google.protobuf.Struct":
                value.CopyFrom(draw(structs()))
                return field.name
            return f"{field.name}." + draw(mutate(value, depth - 1, words))
    if field.containing_oneof is not None and _real_oneof(field.containing_oneof):
        message.ClearField(field.containing_oneof.name)
    message.ClearField(field.name)
    set_field(draw, message, field, 2, words)
    return field.name


def _method(name: str):
    return next(m for m in METHODS if m.name == name)


@dataclasses.dataclass
class Call:
    """One call to send: the method, its request messages (one, or the
    stream), and how they were made."""

    method: _descriptor.MethodDescriptor
    requests: list  # messages, or bytes sent as they are (``UNDECODABLE``)
    how: str
    credential: str = ""  # a CREDENTIALS label; "" sends none

    def to_json(self) -> dict:
        """The call as JSON: each request as text proto (to read) and as
        base64 wire bytes (exact: JSON has no Inf for Struct numbers); a
        reproducer ``replay()`` can send."""
        return {"method": f"/{self.method.containing_service.full_name}/{self.method.name}", "how": self.how,
                "credential": self.credential,
                "requests": [repr(m) if isinstance(m, bytes) else text_format.MessageToString(m, as_utf8=True)
                             for m in self.requests],
                "requests_base64": [base64.b64encode(request_bytes(m)).decode() for m in self.requests]}

    @classmethod
    def from_json(cls, data: dict) -> "Call":
        service, name = data["method"].strip("/").split("/")
        method = next(m for m in METHODS if m.name == name and m.containing_service.full_name == service)
        request_class = _message_class(method.input_type)
        requests = []
        for raw in data["requests_base64"]:
            try:
                requests.append(request_class.FromString(base64.b64decode(raw)))
            except Exception:  # noqa: BLE001 - an undecodable call is replayed as its bytes
                requests.append(base64.b64decode(raw))
        return cls(method, requests, data.get("how", "replay"), data.get("credential", ""))


def request_bytes(request) -> bytes:
    """A request as it goes on the wire (bytes go as they are)."""
    return request if isinstance(request, bytes) else request.SerializeToString()


@st.composite
def _random_call(draw, method, ctx: Context) -> Call:
    strategy = messages(method.input_type, words=ctx.words)
    if method.client_streaming:
        return Call(method, draw(st.lists(strategy, max_size=4)), "random")
    return Call(method, [draw(strategy)], "random")


@st.composite
def _near_valid_call(draw, method, ctx: Context) -> Call:
    requests = draw(_near_valid_base(method.name, ctx))
    if not draw(st.integers(0, 4)):
        return Call(method, requests, "valid")
    if method.client_streaming and draw(st.integers(0, 3)) == 0:
        how = draw(st.sampled_from(["drop", "repeat", "swap", "empty"]))
        if how == "drop" and requests:
            del requests[draw(st.integers(0, len(requests) - 1))]
        elif how == "repeat" and requests:
            requests.append(requests[draw(st.integers(0, len(requests) - 1))])
        elif how == "swap" and len(requests) > 1:
            requests[0], requests[-1] = requests[-1], requests[0]
        elif how == "empty":
            requests = []
        return Call(method, requests, f"near-valid: stream {how}")
    if not requests or not requests[0].DESCRIPTOR.fields:
        return Call(method, requests, "valid")
    index = draw(st.integers(0, len(requests) - 1))
    return Call(method, requests, "near-valid: " + draw(mutate(requests[index], 4, ctx.words)))


def _undecodable_call(method) -> st.SearchStrategy[Call]:
    return st.sampled_from(UNDECODABLE).map(lambda raw: Call(method, [raw], "undecodable"))


def calls(ctx: Context, methods=None) -> st.SearchStrategy[Call]:
    """One call of any method (or of ``methods``): random or near-valid,
    about half each, and one in twenty of bytes that do not parse."""
    methods = list(methods or METHODS)
    table = {m.full_name: _cached(("call", m.full_name, id(ctx)),
                                  lambda m=m: st.integers(0, 19).flatmap(
                                      lambda k, m=m: _undecodable_call(m) if k == 0 else
                                      st.one_of(_random_call(m, ctx), _near_valid_call(m, ctx))))
             for m in methods}
    return st.sampled_from(methods).flatmap(lambda m: table[m.full_name])


def draw_calls(ctx: Context, count: int, sink: Callable[[Call], None], *, seed_: int = 0,
               batch: int = 1000, methods=None, stop: Optional[threading.Event] = None) -> None:
    """Draws ``count`` calls and hands each to ``sink``.

    Hypothesis drives the drawing (its biased choices find edge values that
    uniform sampling misses) in batches of ``batch``, each with its own seed,
    so its per-run bookkeeping stays small however long the run. A batch
    Hypothesis abandons (``FlakyStrategyDefinition``) ends early.
    """
    drawn = 0
    batch_index = 0
    credentials = st.sampled_from(CREDENTIALS) if ctx.tokens else st.just("")
    while drawn < count and not (stop and stop.is_set()):
        size = min(batch, count - drawn)
        emitted = []

        @settings(max_examples=size, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck), derandomize=False)
        @seed(seed_ * 1_000_003 + batch_index)
        @given(call=calls(ctx, methods), credential=credentials)
        def generate(call, credential):
            if len(emitted) < size and not (stop and stop.is_set()):
                emitted.append(1)
                call.credential = credential
                sink(call)

        try:
            generate()
        except FlakyStrategyDefinition:
            # The lists ``_pick`` reads (jobs, names) grow during a run, so a
            # prefix Hypothesis replays can draw differently and it gives up
            # the batch; the calls it emitted were sent, the next batch goes on.
            pass
        drawn += len(emitted)
        batch_index += 1


# -- sending and tallying -------------------------------------------------------

def _invoke(channel: grpc.Channel, call: Call, timeout: float, metadata: tuple = ()):
    """Sends ``call`` with ``metadata``; returns the responses (raises grpc.RpcError)."""
    method = call.method
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = _message_class(method.output_type)
    kwargs = dict(request_serializer=request_bytes, response_deserializer=response_class.FromString)
    options = dict(timeout=timeout, metadata=metadata)
    if method.name in OPEN_ENDED:
        stream = channel.unary_stream(path, **kwargs)(call.requests[0], **options)
        try:
            first = next(stream, None)
            return [] if first is None else [first]
        finally:
            stream.cancel()
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path, **kwargs)(iter(call.requests), **options))
    if method.client_streaming:
        return [channel.stream_unary(path, **kwargs)(iter(call.requests), **options)]
    if method.server_streaming:
        return list(channel.unary_stream(path, **kwargs)(call.requests[0], **options))
    return [channel.unary_unary(path, **kwargs)(call.requests[0], **options)]


@dataclasses.dataclass
class Finding:
    """A bad answer: the call, the code, the server's message."""

    call: Call
    code: str
    details: str


@dataclasses.dataclass
class Tally:
    """Status codes per method, and the calls that got INTERNAL/UNKNOWN."""

    codes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    findings: list = dataclasses.field(default_factory=list)
    hangs: list = dataclasses.field(default_factory=list)  # DEADLINE_EXCEEDED, the first few
    cleanup: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # CancelJob after CreateJob
    # Per-request results inside EvaluateStream responses, by code.
    items: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        return sum(sum(c.values()) for c in self.codes.values())

    def record(self, call: Call, code: str, details: str = "") -> None:
        with self.lock:
            self.codes[call.method.name][code] += 1
            if code in BAD_CODES:
                self.findings.append(Finding(call, code, details))
            elif code == "DEADLINE_EXCEEDED" and len(self.hangs) < 50:
                self.hangs.append(Finding(call, code, details))

    def record_item(self, call: Call, code: str, details: str) -> None:
        """Counts one answer inside a stream (EvaluateStream's per-request results)."""
        with self.lock:
            self.items[call.method.name][code] += 1

    def bad(self) -> int:
        return len(self.findings)


def send(channel: grpc.Channel, call: Call, timeout: float, tally: Tally, ctx: Context) -> str:
    """Sends one call and records its code (an EvaluateStream response that
    carries INTERNAL/UNKNOWN counts as that code); remembers created jobs."""
    metadata = ctx.metadata(call.credential)
    try:
        responses = _invoke(channel, call, timeout, metadata)
    except grpc.RpcError as error:
        code = error.code().name if error.code() is not None else "UNKNOWN"
        tally.record(call, code, error.details() or "")
        return code
    code, details = "OK", ""
    for response in responses:
        if isinstance(response, loss_service_pb2.EvaluateStreamResponse):
            inner = grpc.StatusCode.OK
            if response.HasField("error"):
                inner = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), grpc.StatusCode.UNKNOWN)
            tally.record_item(call, inner.name, response.error.message)
            if inner.name in BAD_CODES:
                code, details = inner.name, f"in an EvaluateStreamResponse: {response.error.message}"
        if isinstance(response, training_service_pb2.Job):
            ctx.add_job(response.name)
            if call.method.name == "CreateJob" and ctx.cancel_created:
                _cancel(channel, response.name, timeout, tally, metadata)
    tally.record(call, code, details)
    return code


def _cancel(channel: grpc.Channel, name: str, timeout: float, tally: Tally, metadata: tuple = ()) -> None:
    # Cancelled at once, a job's process dies while it is still importing:
    # training is not what this fuzzes, and the machine has two cores.
    call = Call(_method("CancelJob"), [training_service_pb2.CancelJobRequest(name=name)], "cleanup")
    try:
        _invoke(channel, call, timeout, metadata)
        code, details = "OK", ""
    except grpc.RpcError as error:
        code, details = error.code().name, error.details() or ""
    with tally.lock:
        tally.cleanup[code] += 1
        if code in BAD_CODES:
            tally.findings.append(Finding(call, code, details))


def run(address: str, ctx: Context, count: int, *, clients: int = 2, timeout: float = 10.0, seed_: int = 0,
        methods=None, stop: Optional[threading.Event] = None, tally: Optional[Tally] = None,
        progress: Optional[Callable[[Tally], None]] = None) -> Tally:
    """Draws ``count`` calls and sends them from ``clients`` threads, each
    call with a ``timeout`` deadline; returns the tally. ``stop`` ends it early."""
    tally = tally or Tally()
    stop = stop or threading.Event()
    work: queue.Queue = queue.Queue(maxsize=clients * 4)
    done = object()
    channels = [grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                        ("grpc.max_receive_message_length", 64 << 20)])
                for _ in range(clients)]

    def sender(channel):
        while True:
            call = work.get()
            if call is done:
                return
            if not stop.is_set():
                send(channel, call, timeout, tally, ctx)

    threads = [threading.Thread(target=sender, args=(c,), daemon=True) for c in channels]
    for thread in threads:
        thread.start()
    last = time.monotonic()

    def sink(call):
        nonlocal last
        work.put(call)
        if progress is not None and time.monotonic() - last > 10:
            last = time.monotonic()
            progress(tally)

    try:
        draw_calls(ctx, count, sink, seed_=seed_, methods=methods, stop=stop)
    finally:
        for _ in threads:
            work.put(done)
        for thread in threads:
            thread.join()
        for channel in channels:
            channel.close()
    return tally


def replay(address: str, path: str, timeout: float = 10.0, tokens: Optional[dict] = None) -> str:
    """Sends a saved reproducer again (with the token ``tokens`` maps its
    credential label to); returns the status code."""
    with open(path, encoding="utf-8") as f:
        call = Call.from_json(json.load(f))
    tally = Tally()
    with grpc.insecure_channel(address) as channel:
        code = send(channel, call, timeout, tally, Context(tokens=dict(tokens or {})))
    return code


def summary_rows(tally: Tally) -> list[tuple[str, int, str]]:
    """(method, calls, codes) rows in schema order, codes most frequent first."""
    rows = []
    for method in METHODS:
        for name, table in ((method.name, tally.codes), (f"{method.name} (answers)", tally.items)):
            counts = table.get(method.name)
            if counts:
                rows.append((name, sum(counts.values()), ", ".join(f"{code} {n}" for code, n in counts.most_common())))
    return rows
