"""Custom losses: expression losses (inline or registered), lossd's built-in
losses (``vae_kl``, ``matrix_crossentropy``), and Python plugins installed through the ``lossd.losses``
entry-point group.

Expressions are checked and compiled by ``lossd_server.losses.expressions`` (never
evaluated by Python); here they become ``keras.losses.Loss`` objects, so
reductions, sample weights and dtypes follow Keras exactly as for the
built-in losses. Registered expression losses are kept one row each in the
server's store (``lossd_server.state.store.Store``) and survive restarts;
a ``losses.json`` written by an older server is imported once.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
import threading
import unicodedata
from importlib import metadata
from typing import Any, Callable, Mapping, Optional, Sequence

import keras

from lossd.wire import DEFAULT_REDUCTION
from lossd_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from lossd_server.losses import cost as costs
from lossd_server.losses.expression_rows import row_structure
from lossd_server.losses.expression_shapes import value_shapes
from lossd_server.losses.expressions import ExpressionError, compile_expression
from lossd_server.losses.matrix import matrix_entry
from lossd_server.losses.registry import (SHAPES_ANY, LossEntry, LossRegistry, Parameter, _docstring_args,
                                 _first_sentence, _param_type, default_registry)
from lossd_server.state.store import LOSSES

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lossd.losses"
# Where servers before the store kept registered losses; imported once, then
# renamed with IMPORTED_SUFFIX so it is never imported twice.
LEGACY_FILE = "losses.json"
IMPORTED_SUFFIX = ".imported"
# Metric label values of their own: a registered loss may not take them.
RESERVED_NAMES = ("expression", "composite", "other")
_DOC_CONTROLS_ALLOWED = "\n\t"
DEFAULT_INPUTS = ("y_true", "y_pred")

VAE_KL = "-0.5 * mean(1 + z_log_var - square(z_mean) - exp(z_log_var), axis=-1)"


@keras.saving.register_keras_serializable(package="lossd")
class ExpressionLoss(keras.losses.Loss):
    """A loss written in lossd's expression language, as a Keras loss.

    Called with its input tensors positionally (in ``inputs`` order), or as
    ``loss(y_true, y_pred, sample_weight)`` when its inputs are those two, so
    ``model.compile(loss=ExpressionLoss(...))`` works and the model saves.
    """

    def __init__(self, expression: str, inputs: Sequence[str] = DEFAULT_INPUTS,
                 params: Optional[Mapping[str, float]] = None, reduction=DEFAULT_REDUCTION,
                 name: str = "expression", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.expression = expression
        self.inputs = tuple(inputs)
        self.params = dict(params or {})
        self._compiled = compile_expression(expression, tensors=self.inputs, params=list(self.params))

    def __call__(self, *args, sample_weight=None):
        if len(args) == len(self.inputs) + 1 and sample_weight is None:
            *args, sample_weight = args  # model.fit passes (y_true, y_pred, sample_weight) positionally
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} tensors {list(self.inputs)}; got {len(args)}")
        named = dict(zip(self.inputs, args))
        # Keras's Loss.__call__ converts every tensor of the structure to the
        # loss dtype and applies sample weights and the reduction.
        return super().__call__(named, named, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        return self._compiled(y_true, self.params)

    def get_config(self):
        return {**super().get_config(), "expression": self.expression, "inputs": list(self.inputs),
                "params": self.params}


def _expression_error(exc: ExpressionError, where: str, expression: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {exc}. Expected an expression in lossd's expression language (README, "
                           f"Expressions). Received: {expression[:200]!r}.", reason="BAD_EXPRESSION",
                           metadata={"column": str(exc.column or ""), "snippet": exc.snippet or ""})


def _float_params(values: Mapping[str, Any], where: str) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(
                f"{where}: expression parameters are numbers. Received: {key}={json.dumps(value)}.",
                reason="BAD_PARAMETER", metadata={"parameter": key})
        out[key] = float(value)
    return out


def expression_entry(expression: str, *, params: Mapping[str, Any], inputs: Sequence[str],
                     name: str = "", doc: str = "", source: str = "expression",
                     where: str = "expression") -> LossEntry:
    """A registry entry for an expression over ``inputs`` with parameter defaults ``params``."""
    defaults = _float_params(params, where)
    try:
        compiled = compile_expression(expression, tensors=inputs, params=list(defaults))
    except ExpressionError as exc:
        raise _expression_error(exc, where, expression) from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: {exc}. Expected an expression in lossd's expression language (README, "
                              f"Expressions). Received: {expression[:200]!r}.", reason="BAD_EXPRESSION") from None
    if not compiled.tensors_used:
        raise InvalidArgument(f"{where}: a loss must read at least one tensor. Expected an expression over "
                              f"{', '.join(inputs) or 'y_true, y_pred'}. Received: {expression[:200]!r}.",
                              reason="BAD_EXPRESSION")
    unused = sorted(set(defaults) - compiled.params_used)
    if unused:
        raise InvalidArgument(f"{where}: parameter {unused[0]!r} is not used by the expression.",
                              reason="UNKNOWN_PARAMETER", metadata={"parameter": unused[0]})
    inputs = tuple(inputs)

    def build(values: Mapping[str, Any], reduction: str, dtype: str):
        return ExpressionLoss(expression, inputs, values, reduction=reduction, dtype=dtype,
                              name=name or "expression")

    return LossEntry(
        name=name, aliases=(), doc=doc or f"User-defined loss: {expression}",
        parameters=tuple(Parameter(k, "float", v, "") for k, v in defaults.items()),
        build=build, source=source, inputs=inputs, shapes=SHAPES_ANY,
        row_structure=lambda p, ranks: row_structure(expression, ranks, params=defaults), expression=expression,
        value_shapes=lambda shapes: value_shapes(expression, shapes),
        cost=costs.expression(lambda shapes: value_shapes(expression, shapes)))


def inline_entry(expression: str, params: Mapping[str, Any], tensor_names: Sequence[str]) -> LossEntry:
    """The entry for an expression sent inside a request: it may read any of
    the request's tensors; its parameters are the request's values."""
    try:
        compiled = compile_expression(expression, tensors=tensor_names, params=list(params))
    except ExpressionError as exc:
        raise _expression_error(exc, "expression", expression) from None
    inputs = tuple(n for n in tensor_names if n in compiled.tensors_used)
    return expression_entry(expression, params=params, inputs=inputs)


def builtin_entries() -> list[LossEntry]:
    """Terms lossd adds to Keras's losses."""
    vae_kl = expression_entry(VAE_KL, params={}, inputs=("z_mean", "z_log_var"), name="vae_kl",
                              doc="KL divergence of a VAE's latent Gaussian from N(0, 1): "
                                  "-0.5 * mean(1 + log_var - mean^2 - exp(log_var)) over the last axis.",
                              source="builtin")
    return [vae_kl, matrix_entry()]


# ---------------------------------------------------------------------------
# Plugins.

def plugin_entry(name: str, obj: Any) -> LossEntry:
    """A registry entry for a plugin: a ``keras.losses.Loss`` subclass, or a
    function ``fn(y_true, y_pred, **params)``."""
    if inspect.isclass(obj) and issubclass(obj, keras.losses.Loss):
        signature = inspect.signature(obj.__init__)
        skip = {"self", "reduction", "name", "dtype"}
        docs = _docstring_args(obj.__doc__ or "")

        def build(params, reduction, dtype):
            return obj(**params, reduction=reduction, dtype=dtype)
    elif callable(obj):
        signature = inspect.signature(obj)
        skip = set(list(signature.parameters)[:2])
        docs = _docstring_args(obj.__doc__ or "")

        def build(params, reduction, dtype):
            return keras.losses.LossFunctionWrapper(obj, reduction=reduction, name=name, dtype=dtype, **params)
    else:
        raise TypeError(f"plugin {name!r} is neither a keras.losses.Loss subclass nor a function")
    parameters = []
    for p in signature.parameters.values():
        if p.name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        parameters.append(Parameter(p.name, _param_type(p.name, default), default, docs.get(p.name, "")))
    return LossEntry(name=name, aliases=(), doc=_first_sentence(obj.__doc__ or name), parameters=tuple(parameters),
                     build=build, source="plugin", shapes=SHAPES_ANY)


def load_plugins(registry: LossRegistry) -> list[str]:
    """Registers every ``lossd.losses`` entry point; a broken plugin is logged and skipped."""
    loaded = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            registry.register(plugin_entry(ep.name, ep.load()))
            loaded.append(ep.name)
        except Exception:  # noqa: BLE001 - one bad plugin must not stop the server
            log.exception("could not load loss plugin %r (%s)", ep.name, ep.value)
    return loaded


# ---------------------------------------------------------------------------
# Registered expression losses, stored in the data directory.

class ExpressionStore:
    """Named expression losses registered by clients, one row each in ``store``.

    Each registration writes its own row in one transaction, so a crash leaves
    the old definition or the new one, and the cost of a registration does
    not grow with the number registered.

    Several replicas may share the store (PostgreSQL): ``refresh`` brings
    this replica's registry in line with what the others registered or
    deleted, after one cheap version read; ``follow`` runs it on every poll of the
    store's ``Follower``, which reads the version for it.

    Args:
        store: The server's store (``lossd_server.state.store.Store``:
            ``losses``, ``count_losses``, ``put_losses``, ``delete_loss``,
            ``quarantine_loss``, ``quarantine``).
        registry: Where loaded and registered losses become visible.
        max_losses: Most registered losses (``Settings.max_registered_losses``).
    """

    def __init__(self, store, registry: LossRegistry, *, max_losses: Optional[int] = None):
        self.store = store
        self.registry = registry
        self.max_losses = max_losses
        self._lock = threading.Lock()
        # What this replica's registry holds from the store: name -> record,
        # as of the store's losses version ``_version`` (None: not loaded).
        self._records: dict[str, dict] = {}
        self._version: Optional[int] = None
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls ``listener()`` after every change of the registered losses:
        a registration, replacement or deletion here or on another replica."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def import_legacy(self, data_dir: pathlib.Path) -> int:
        """Imports ``<data_dir>/losses.json`` (an older server's file) into the
        store once, then renames it ``losses.json.imported``; returns how many
        losses it held. A file that is not a JSON list of losses goes to the
        quarantine instead; so does each entry without a name and expression.
        Leftover temporary files of the old writer are removed."""
        data_dir = pathlib.Path(data_dir)
        for leftover in data_dir.glob(".losses-*"):
            leftover.unlink(missing_ok=True)
        path = data_dir / LEGACY_FILE
        if not path.is_file():
            return 0
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise ValueError(f"expected a JSON list, found {type(records).__name__}")
        except (ValueError, UnicodeDecodeError) as exc:
            self.store.quarantine.move(path, f"{LEGACY_FILE} is not a JSON list of losses ({str(exc)[:200]}); "
                                             "no loss was imported from it")
            return 0
        def usable(r) -> bool:
            return isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("expression"), str)

        good = [r for r in records if usable(r)]
        if len(good) < len(records):
            self.store.quarantine.save("losses-json-entries", [r for r in records if not usable(r)],
                                       f"{len(records) - len(good)} entries of {LEGACY_FILE} lack a name or an "
                                       "expression")
        self.store.put_losses((r["name"], r) for r in good)  # one transaction: all or none
        os.replace(path, path.with_name(path.name + IMPORTED_SUFFIX))
        log.info("imported %d registered losses from %s (renamed %s%s)", len(good), path, LEGACY_FILE,
                 IMPORTED_SUFFIX)
        return len(good)

    def load(self) -> list[str]:
        """Registers every stored loss; returns their names. A row that cannot
        be loaded (malformed, or an expression this version refuses) moves
        to the quarantine, and the rest still load."""
        names = []
        with self._lock:
            self._version = self.store.version(LOSSES)
            for name, text in self.store.losses():
                try:
                    record = self._parse(name, text)
                    self.registry.register(self._entry(record))
                    self._records[name] = record
                    names.append(name)
                except (InvalidArgument, ValueError, TypeError, KeyError, AttributeError) as exc:
                    message = getattr(exc, "message", None) or str(exc)
                    self.store.quarantine_loss(name, f"the stored loss cannot be loaded ({type(exc).__name__}: "
                                                     f"{message[:200]})")
        return names

    @staticmethod
    def _parse(name: str, text: str) -> dict:
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("name") != name:
            raise ValueError("the record is not an object naming this loss")
        return record

    def refresh(self, version: Optional[int] = None) -> list[str]:
        """Registers what other replicas registered or replaced in the store
        since the last look, and unregisters what they deleted; returns the
        names that changed. ``version`` is the store's losses version if the
        caller read it already (``follow``); else it costs one indexed read
        when nothing changed. A row that cannot be loaded is logged and left
        to ``load`` (the next start quarantines it)."""
        if version is None:
            version = self.store.version(LOSSES)
        if version == self._version:
            return []
        changed = []
        with self._lock:
            stored = dict(self.store.losses())
            for name, text in stored.items():
                try:
                    record = self._parse(name, text)
                    if self._records.get(name) == record:
                        continue
                    taken = self.registry.canonical(name)
                    if taken is not None and self.registry.get(taken).source != "expression":
                        raise ValueError("a built-in or plugin loss of this replica has that name")
                    self.registry.register(self._entry(record), replace=True)
                except (InvalidArgument, ValueError, TypeError, KeyError, AttributeError) as exc:
                    log.warning("registered loss %r from the store cannot be loaded here: %s", name,
                                getattr(exc, "message", None) or exc)
                    continue
                self._records[name] = record
                changed.append(name)
            for name in [n for n in self._records if n not in stored]:
                del self._records[name]
                canonical = self.registry.canonical(name)
                if canonical is not None and self.registry.get(canonical).source == "expression":
                    self.registry.unregister(canonical)
                changed.append(name)
            self._version = version
        if changed:
            log.info("registered losses changed on another replica: %s", ", ".join(sorted(changed)))
            self._changed()
        return changed

    def follow(self, look) -> None:
        """``refresh`` with what the shared store's ``Follower`` saw
        (``lossd_server.state.store.Look``): no read of its own unless
        the losses version changed."""
        self.refresh(look.versions.get(LOSSES, 0))

    @staticmethod
    def _entry(record: Mapping[str, Any]) -> LossEntry:
        return expression_entry(record["expression"], params=record.get("params") or {},
                                inputs=record.get("inputs") or DEFAULT_INPUTS, name=record["name"],
                                doc=record.get("doc", ""), where=f"loss {record['name']!r}")

    def register(self, name: str, expression: str, *, params: Mapping[str, Any], inputs: Sequence[str] = (),
                 doc: str = "", replace: bool = False) -> LossEntry:
        """Checks, stores and registers an expression loss.

        Raises:
            InvalidArgument: a bad name (BAD_LOSS_NAME: not a lowercase ASCII
                identifier once NFKC-normalised, a look-alike of another
                loss, or a reserved metric label) or doc (BAD_LOSS_SPEC).
            ResourceExhausted: ``max_losses`` are registered and ``name`` is
                not one of them (TOO_MANY_LOSSES), or the disk is full (DISK_FULL).
        """
        normal = unicodedata.normalize("NFKC", name)
        if normal != name:
            taken = self.registry.canonical(normal) or self.registry.canonical(normal.lower())
            raise InvalidArgument(
                f"Invalid loss name. Expected a name written in its NFKC normal form"
                f"{f'; it reads as the existing loss {taken!r}' if taken else ''}. "
                f"Received: {name[:80]!r} (normalised: {normal[:80]!r}).", reason="BAD_LOSS_NAME",
                metadata={"loss": name[:80]})
        if not name.isascii() or not name.isidentifier() or not name.islower() or len(name) > 64:
            raise InvalidArgument(f"Invalid loss name. Expected a lowercase ASCII identifier of at most 64 "
                                  f"characters. Received: {name[:80]!r}.", reason="BAD_LOSS_NAME",
                                  metadata={"loss": name[:80]})
        if name in RESERVED_NAMES:
            raise InvalidArgument(f"Invalid loss name. Expected a name other than the reserved metric labels "
                                  f"{', '.join(RESERVED_NAMES)}. Received: {name!r}.", reason="BAD_LOSS_NAME",
                                  metadata={"loss": name})
        if len(doc) > 1000:
            raise InvalidArgument(f"doc is too long. Expected at most 1000 characters. Received: {len(doc)}.",
                                  reason="BAD_LOSS_SPEC")
        bad = next((ch for ch in doc if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")
                    and ch not in _DOC_CONTROLS_ALLOWED), None)
        if bad is not None:
            raise InvalidArgument(f"Invalid doc. Expected printable text (newlines and tabs allowed). "
                                  f"Received: a control character U+{ord(bad):04X}.", reason="BAD_LOSS_SPEC")
        record = {"name": name, "expression": expression, "params": dict(params),
                  "inputs": list(inputs or DEFAULT_INPUTS), "doc": doc}
        entry = self._entry(record)
        with self._lock:
            existing = self.registry.canonical(name)
            if existing is not None:
                if self.registry.get(existing).source != "expression":
                    raise AlreadyExists(f"Loss {name!r} is a built-in or plugin loss; choose another name.",
                                        reason="LOSS_EXISTS", metadata={"loss": name})
                if not replace:
                    raise AlreadyExists(f"Loss {name!r} is already registered. Set replace to overwrite it.",
                                        reason="LOSS_EXISTS", metadata={"loss": name})
            if existing is None and self.max_losses is not None:
                count = self.store.count_losses()
                if count >= self.max_losses:
                    raise ResourceExhausted(
                        f"Too many registered losses. Expected at most {self.max_losses} (max_registered_losses). "
                        f"Received: a new loss {name!r} while {count} are registered; delete some first.",
                        reason="TOO_MANY_LOSSES", metadata={"loss": name, "limit": str(self.max_losses)})
            self.store.put_losses([(name, record)])  # DISK_FULL leaves the registry as it was
            self.registry.register(entry, replace=True)
            self._records[name] = record
        self._changed()
        return entry

    def delete(self, name: str) -> None:
        """Removes a registered expression loss."""
        with self._lock:
            canonical = self.registry.canonical(name)
            if canonical is None:
                raise NotFound(f"Loss {name[:80]!r} is not registered.", reason="LOSS_NOT_FOUND",
                               metadata={"loss": name[:80]})
            if self.registry.get(canonical).source != "expression":
                raise FailedPrecondition(f"Loss {name!r} is built in; only registered expression losses can "
                                         "be deleted.", reason="LOSS_NOT_DELETABLE", metadata={"loss": name})
            self.store.delete_loss(canonical)
            self.registry.unregister(canonical)
            self._records.pop(canonical, None)
        self._changed()


def full_registry(*, plugins: bool = True) -> LossRegistry:
    """Keras losses, lossd's built-in terms and plugins (``ExpressionStore.load``
    adds the registered expression losses)."""
    registry = default_registry()
    for entry in builtin_entries():
        registry.register(entry)
    if plugins:
        load_plugins(registry)
    return registry
