"""The monitor service: the one owner of the loss-monitor use case under
the gRPC front end (``grpc/monitor_servicer.py``), which decodes and
encodes only.

A monitor (``monitors/NAME``) scores a deployed model's predictions once
their labels arrive: ``observe`` records predictions by id (with their
labels, or not), ``label`` records labels by id, in either order. When an
id has both halves its per-sample loss is computed by the evaluation
service (``EvaluationService.evaluate`` with reduction ``none``: the same
plans, compiled programs, admission and batching as Evaluate), for all of
a call's pairs at once, and stored; ``report`` summarises the stored
losses per window and segment (``monitors.stats``).

An Observe or Label goes through, in order:

1. bounds: ids per call, distinct ids, row sizes, segment keys (before
   anything is read);
2. the stored halves of its ids are read, and the pairs that complete now
   are evaluated, outside any transaction;
3. one transaction (``MonitorState.write``) checks the halves it read are
   still stored as read (else 2 runs again), the pending-ids and segment
   bounds, then pairs, keeps pending and expires; the call is answered
   after its commit.

This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from lossd import wire
from lossd_server.callers import ANONYMOUS, Caller
from lossd_server.errors import InvalidArgument, LossdError, NotFound, ResourceExhausted, Unavailable
from lossd_server.evaluation.service import EvaluationRequest, EvaluationService, Incoming
from lossd_server.monitors import stats
from lossd_server.monitors.state import Bounds, Changed, MonitorRecord, MonitorState, Pending, Rows, Write, Written

log = logging.getLogger(__name__)

MONITOR_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
SEGMENT_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MAX_WINDOWS = 8
MAX_SEGMENT_KEYS = 8
MAX_SEGMENT_VALUE = 64
MAX_ID = 128
MAX_WINDOW_SECONDS = 7 * 86400.0
MAX_RETENTION_SECONDS = 30 * 86400.0
DEFAULT_RETENTION_SECONDS = 86400.0
_WRITE_TRIES = 5  # reads and evaluations again after another call changed an id's halves


def monitor_id(name: str) -> str:
    """``monitors/{id}`` (or a bare id) -> id; NOT_FOUND for what no monitor can be called."""
    ident = name[len("monitors/"):] if name.startswith("monitors/") else name
    if not MONITOR_ID.match(ident):
        raise NotFound(f"Monitor {name[:80]!r} does not exist. Expected a name of the form `monitors/{{monitor}}`.",
                       reason="MONITOR_NOT_FOUND", metadata={"monitor": name[:100]})
    return ident


MAX_HISTORY_POINTS = 1000


class Report:
    """What a monitor measures now (``MonitorReport`` on the wire).

    Attributes:
        history: ``(time, window, count, mean)`` of each window at each of
            the points asked for, every segment together.
    """

    def __init__(self, time: float, windows: list[stats.Summary], record: MonitorRecord,
                 history: Sequence[tuple] = ()):
        self.time = time
        self.windows = windows
        self.history = list(history)
        self.pending_predictions = record.pending_predictions
        self.pending_labels = record.pending_labels
        self.expired_predictions = record.expired_predictions
        self.expired_labels = record.expired_labels


class MonitorService:
    """Monitors: create, read, list, delete, observe, label, reference and
    report (module docstring).

    Args:
        state: The monitors' tables in the server's store.
        evaluation: The evaluation service every pair's loss goes through.
        max_monitors: Most monitors on the server.
        bounds: What one monitor may hold (pending ids, segments, samples).
        max_ids: Most ids one Observe or Label may carry.
        max_row_bytes: Most bytes of one id's prediction or label.
        max_elements: Most elements one tensor may declare.
        metrics: Optional ``Metrics``: the reports' gauges.
        report_seconds: How often ``start``'s thread expires halves and
            sets the gauges.
        clock: Seconds since the epoch (tests move it).
    """

    def __init__(self, state: MonitorState, evaluation: EvaluationService, *, max_monitors: int, bounds: Bounds,
                 max_ids: int, max_row_bytes: int, max_elements: int, metrics=None, report_seconds: float = 5.0,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.evaluation = evaluation
        self.max_monitors = max_monitors
        self.bounds = bounds
        self.max_ids = max_ids
        self.max_row_bytes = max_row_bytes
        self.max_elements = max_elements
        self.metrics = metrics
        self.report_seconds = report_seconds
        self.clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reported: set[str] = set()

    # -- the resource ------------------------------------------------------------

    def create(self, ident: str, *, loss: Optional[Mapping], windows: Sequence[float],
               segment_keys: Sequence[str] = (), retention: Optional[float] = None, display_name: str = "",
               max_loss: Optional[float] = None, caller: Caller = ANONYMOUS) -> MonitorRecord:
        """Creates the monitor ``monitors/{ident}`` after checking every field.

        Raises:
            InvalidArgument: a bad id, loss, window, key or retention.
            AlreadyExists: the name is taken (MONITOR_EXISTS).
            ResourceExhausted: past ``max_monitors`` (TOO_MANY_MONITORS).
        """
        if not MONITOR_ID.match(ident or ""):
            raise InvalidArgument(f"Invalid monitor_id. Expected 1 to 63 lower-case letters, digits and `-`, starting "
                                  f"with a letter. Received: {str(ident)[:80]!r}.", reason="BAD_MONITOR_ID")
        if not loss:
            raise InvalidArgument("monitor.loss is required. Expected a LossSpec with a name, an expression or "
                                  "terms. Received: none.", reason="BAD_LOSS_SPEC")
        self.evaluation.plans.get(loss)  # an unknown loss or bad parameter is refused here, as Evaluate would
        windows = [float(w) for w in windows]
        if not 1 <= len(windows) <= MAX_WINDOWS or len(set(windows)) != len(windows) or not all(
                w == int(w) and 1 <= w <= MAX_WINDOW_SECONDS for w in windows):
            raise InvalidArgument(f"Invalid monitor.windows. Expected 1 to {MAX_WINDOWS} distinct durations of whole "
                                  f"seconds, from 1 s to 7 days. Received: {[w for w in windows][:12]} s.",
                                  reason="BAD_MONITOR_WINDOWS")
        keys = list(segment_keys)
        if len(keys) > MAX_SEGMENT_KEYS or len(set(keys)) != len(keys) or not all(SEGMENT_KEY.match(k) for k in keys):
            raise InvalidArgument(f"Invalid monitor.segment_keys. Expected at most {MAX_SEGMENT_KEYS} distinct "
                                  f"identifiers (lower-case letters, digits, `_`). Received: {keys[:12]}.",
                                  reason="BAD_SEGMENT_KEYS")
        retention = DEFAULT_RETENTION_SECONDS if retention is None else float(retention)
        if not 1 <= retention <= MAX_RETENTION_SECONDS:
            raise InvalidArgument(f"Invalid monitor.retention. Expected 1 s to 30 days. Received: {retention:g} s.",
                                  reason="BAD_RETENTION")
        if len(display_name) > 256:
            raise InvalidArgument(f"display_name is too long. Expected at most 256 characters. Received: "
                                  f"{len(display_name)}.", reason="BAD_DISPLAY_NAME")
        if max_loss is not None and not math.isfinite(max_loss):
            raise InvalidArgument(f"Invalid monitor.max_loss. Expected a finite number. Received: {max_loss!r}.",
                                  reason="BAD_MAX_LOSS")
        record = MonitorRecord(ident, dict(loss), sorted(windows), keys, retention, display_name, caller.name,
                               self.clock(), max_loss=max_loss)
        return self.state.create(record, self.max_monitors)

    def get(self, name: str, caller: Caller = ANONYMOUS) -> MonitorRecord:
        """The monitor, if ``caller`` owns it; NOT_FOUND (MONITOR_NOT_FOUND) otherwise."""
        ident = monitor_id(name)
        record = self.state.get(ident)
        if record is None or not caller.owns(record.owner):
            raise NotFound(f"Monitor `monitors/{ident}` does not exist. Expected the name of one of your monitors "
                           f"(ListMonitors). Received: {name[:100]!r}.", reason="MONITOR_NOT_FOUND",
                           metadata={"monitor": f"monitors/{ident}"})
        return record

    def list(self, caller: Caller = ANONYMOUS, page_size: int = 0, page_token: str = ""
             ) -> tuple[list[MonitorRecord], str]:
        """A page of the monitors ``caller`` owns (an admin: all), by name."""
        size = 50 if page_size <= 0 else min(page_size, 1000)
        return self.state.list(None if caller.admin else caller.name, size, page_token)

    def delete(self, name: str, caller: Caller = ANONYMOUS) -> None:
        record = self.get(name, caller)
        self.state.delete(record.name)
        self._forget(record.name)

    # -- observations ------------------------------------------------------------

    def observe(self, name: str, ids: Sequence[str], y_pred: Optional[np.ndarray], y_true: Optional[np.ndarray] = None,
                segments: Optional[Mapping[str, str]] = None, caller: Caller = ANONYMOUS) -> Written:
        """Records predictions (and labels, when ``y_true`` is given) of ``ids``;
        with ``y_pred`` None, labels only (``label``). Returns what was paired,
        kept pending and skipped as already paired; the rows are stored when it
        returns.

        Raises:
            InvalidArgument: bad ids, rows or segments (nothing is stored).
            ResourceExhausted: past a bound (TOO_MANY_IDS, ROW_TOO_LARGE,
                TOO_MANY_PENDING_IDS, TOO_MANY_SEGMENTS), before any work.
        """
        record = self.get(name, caller)
        ids = list(ids)
        self._check_ids(ids)
        if y_pred is None and y_true is None:
            raise InvalidArgument("y_pred or y_true is required. Expected a Tensor with one row per id. Received: "
                                  "neither.", reason="BAD_TENSOR")
        halves = {}
        now = self.clock()
        for field, array in (("y_pred", y_pred), ("y_true", y_true)):
            if array is not None:
                halves[field] = self._rows(field, array, len(ids), now)
        if y_pred is None and segments:
            raise InvalidArgument("segments are set on a call without y_pred. Expected segments with the predictions "
                                  "(a label takes its prediction's segment). Received: labels only.",
                                  reason="BAD_SEGMENTS")
        segment = self._segment(record, segments or {})
        if y_pred is not None and y_true is not None:  # every id pairs, whatever is stored: nothing to read
            losses = dict(zip(ids, self._evaluate(record, y_pred, y_true, caller)))
            write = Write(ids, halves["y_pred"], halves["y_true"], segment, losses, None)
            return self.state.write(record, write, self.clock(), self.bounds)
        for _ in range(_WRITE_TRIES):
            stored = self.state.pending(record.name, ids)
            self._check_room(record, sum(1 for i in ids if i not in stored))
            losses = self._losses(record, ids, y_pred, y_true, stored, caller)
            write = Write(ids, halves.get("y_pred"), halves.get("y_true"), segment, losses,
                          {i: p.times for i, p in stored.items()})
            try:
                return self.state.write(record, write, self.clock(), self.bounds)
            except Changed:
                continue
        raise Unavailable(f"The ids of this call kept changing under concurrent calls to `monitors/{record.name}` "
                          f"({_WRITE_TRIES} tries). Expected them to settle; retry.", reason="MONITOR_CONTENDED",
                          retry_delay=0.1)

    def label(self, name: str, ids: Sequence[str], y_true: np.ndarray, caller: Caller = ANONYMOUS) -> Written:
        """Records labels of ``ids``, before or after their predictions."""
        if y_true is None:
            raise InvalidArgument("y_true is required. Expected a Tensor with one row per id. Received: none.",
                                  reason="BAD_TENSOR")
        return self.observe(name, ids, None, y_true, None, caller)

    def _check_ids(self, ids: list) -> None:
        if not ids:
            raise InvalidArgument("ids is empty. Expected one id per row. Received: no ids.", reason="BAD_IDS")
        if len(ids) > self.max_ids:
            raise ResourceExhausted(f"Too many ids in one call. Expected at most {self.max_ids} "
                                    f"(max_monitor_ids_per_call). Received: {len(ids)}. Split the rows over calls.",
                                    reason="TOO_MANY_IDS", metadata={"limit": str(self.max_ids),
                                                                     "setting": "max_monitor_ids_per_call"})
        bad = next((i for i in ids if not 1 <= len(i) <= MAX_ID), None)
        if bad is not None:
            raise InvalidArgument(f"Invalid id. Expected 1 to {MAX_ID} characters. Received: {bad[:MAX_ID + 8]!r}.",
                                  reason="BAD_IDS")
        if len(set(ids)) != len(ids):
            seen, twice = set(), None
            for i in ids:
                if i in seen:
                    twice = i
                    break
                seen.add(i)
            raise InvalidArgument(f"Repeated id {twice[:MAX_ID]!r}. Expected distinct ids in one call. Received: "
                                  f"{len(ids)} ids, {len(seen) + len(set(ids) - seen)} distinct.", reason="BAD_IDS")

    def _rows(self, field: str, array: np.ndarray, n: int, now: float) -> Rows:
        if array.ndim == 0 or array.shape[0] != n:
            raise InvalidArgument(f"{field} has {array.shape[0] if array.ndim else 'no'} rows. Expected one row per "
                                  f"id: shape ({n}, ...). Received: shape {list(array.shape)}.",
                                  reason="SHAPE_MISMATCH")
        row_bytes = array.nbytes // n if n else 0
        if row_bytes > self.max_row_bytes:
            raise ResourceExhausted(f"{field}: one row holds {row_bytes:,} bytes. Expected at most "
                                    f"{self.max_row_bytes:,} (max_monitor_row_bytes). Received: shape "
                                    f"{list(array.shape)} of {array.dtype}.", reason="ROW_TOO_LARGE",
                                    metadata={"limit": str(self.max_row_bytes), "setting": "max_monitor_row_bytes"})
        return Rows(wire.dtype_enum(array.dtype, field=field), array, now)

    def _segment(self, record: MonitorRecord, segments: Mapping[str, str]) -> str:
        unknown = sorted(set(segments) - set(record.segment_keys))
        if unknown:
            raise InvalidArgument(f"Unknown segment keys {unknown[:8]}. Expected some of the monitor's segment_keys "
                                  f"{record.segment_keys}. Received: {sorted(segments)[:8]}.", reason="BAD_SEGMENTS")
        long = next((v for v in segments.values() if len(v) > MAX_SEGMENT_VALUE or "," in v), None)
        if long is not None:
            raise InvalidArgument(f"Invalid segment value {long[:80]!r}. Expected at most {MAX_SEGMENT_VALUE} "
                                  "characters and no comma.", reason="BAD_SEGMENTS")
        return ",".join(f"{k}={segments.get(k, '')}" for k in record.segment_keys)

    def _check_room(self, record: MonitorRecord, new: int) -> None:
        """The pending-ids bound, before any evaluation (the transaction checks it again, exactly)."""
        current = self.state.get(record.name) or record
        held = current.pending_predictions + current.pending_labels
        if held + new > self.bounds.max_pending_ids:
            raise ResourceExhausted(
                f"Monitor `monitors/{record.name}` holds {held} ids waiting for their other half; {new} more would "
                f"pass max_pending_ids ({self.bounds.max_pending_ids}). Expected labels for the pending predictions "
                "(or a shorter retention).", reason="TOO_MANY_PENDING_IDS",
                metadata={"limit": str(self.bounds.max_pending_ids), "setting": "max_pending_ids",
                          "monitor": f"monitors/{record.name}"})

    def _losses(self, record: MonitorRecord, ids: list, y_pred, y_true, stored: Mapping[str, Pending],
                caller: Caller) -> dict[str, float]:
        """The per-sample loss of every id whose other half is stored, by id."""
        # One half in the request, the other stored: rows grouped by the stored half's dtype and shape.
        groups: dict[tuple, list[int]] = {}
        for i, ident in enumerate(ids):
            other = stored.get(ident)
            half = None if other is None else (other.label if y_true is None else other.prediction)
            if half is not None:
                groups.setdefault((half.dtype, half.shape), []).append(i)
        losses: dict[str, float] = {}
        for (dtype, _), rows in groups.items():
            numpy_dtype = wire.numpy_dtype(dtype)
            others = np.stack([(stored[ids[i]].label if y_true is None else stored[ids[i]].prediction
                                ).array(numpy_dtype) for i in rows])
            mine = (y_pred if y_true is None else y_true)[rows]
            values = self._evaluate(record, mine, others, caller) if y_true is None \
                else self._evaluate(record, others, mine, caller)
            losses.update({ids[i]: v for i, v in zip(rows, values)})
        return losses

    def _evaluate(self, record: MonitorRecord, y_pred: np.ndarray, y_true: np.ndarray, caller: Caller) -> list[float]:
        """Per-sample losses of rows through the evaluation service (reduction ``none``)."""
        request = EvaluationRequest(loss=record.loss, tensors={"y_true": Incoming.of(y_true),
                                                               "y_pred": Incoming.of(y_pred)}, reduction="none")
        values = np.asarray(self.evaluation.evaluate(request, caller).loss)
        n = y_pred.shape[0]
        if values.ndim == 0 or values.shape[0] != n:
            raise InvalidArgument(
                f"The monitor's loss gives no value per row for y_pred of shape {list(y_pred.shape)} and y_true of "
                f"shape {list(y_true.shape)}: reduction none returned shape {list(values.shape)}. Expected rows of "
                "a rank the loss reduces per sample (for example (n, 1) rather than (n,) for a regression).",
                reason="SHAPE_MISMATCH")
        if values.ndim > 1:  # per-element losses (an image's pixels): a sample's loss is their mean
            values = values.reshape(n, -1).mean(axis=1, dtype=np.float64)
        return [float(v) for v in values]

    # -- the reference and reports -------------------------------------------------

    def capture_reference(self, name: str, window: Optional[float] = None, caller: Caller = ANONYMOUS
                          ) -> MonitorRecord:
        """Freezes the losses of one of the monitor's windows (its longest
        by default) as the reference drift is measured against."""
        record = self.get(name, caller)
        window = max(record.windows) if window is None else float(window)
        if window not in record.windows:
            raise InvalidArgument(f"Invalid window {window:g} s. Expected one of the monitor's windows "
                                  f"{[int(w) for w in record.windows]} s.", reason="BAD_MONITOR_WINDOWS")
        self.state.capture_reference(record, window, self.clock())
        return self.state.get(record.name) or record

    def report(self, record: MonitorRecord, history_points: int = 0) -> Report:
        """Expires what is due, then summarises every window: over every
        segment together first, then each segment; with ``history_points``,
        also each window's mean loss at that many times over the longest
        window (``stats.history``)."""
        if not 0 <= history_points <= MAX_HISTORY_POINTS:
            raise InvalidArgument(f"Invalid history_points. Expected 0 to {MAX_HISTORY_POINTS}. Received: "
                                  f"{history_points}.", reason="BAD_HISTORY_POINTS")
        now = self.clock()
        self.state.expire(record, now)
        record = self.state.get(record.name) or record
        longest = max(record.windows)
        samples = self.state.samples(record.name, now - longest)
        pending = self.state.pending_observed(record.name, now - longest)
        reference = self.state.reference(record.name) if record.reference_time is not None else None
        segments = sorted(set(samples["segment"]) | set(pending["segment"]))
        if segments == [""] or not record.segment_keys:
            segments = []
        summaries = []
        for window in record.windows:
            since = now - window
            for segment in ["", *segments]:  # "": every segment together
                s_mask = samples["segment"] == segment if segment else np.ones(len(samples["time"]), bool)
                p_mask = pending["segment"] == segment if segment else np.ones(len(pending["observe_time"]), bool)
                labelled = ~np.isnan(samples["label_time"])
                done = s_mask & labelled & (samples["time"] >= since)
                losses = samples["loss"][done]
                delays = np.maximum(samples["label_time"][done] - samples["observe_time"][done], 0.0)
                in_window = s_mask & (samples["observe_time"] >= since)
                observed = int(in_window.sum() + (p_mask & (pending["observe_time"] >= since)).sum())
                ref = None
                if reference is not None:
                    ref = reference["loss"] if segment == "" else reference["loss"][reference["segment"] == segment]
                summaries.append(stats.summarize(window, segment, losses, delays, observed,
                                                 int((in_window & labelled).sum()), ref))
        history = ()
        if history_points:
            paired = ~np.isnan(samples["label_time"])
            times = now - longest + longest * np.arange(1, history_points + 1) / history_points
            history = stats.history(samples["time"][paired], samples["loss"][paired], times, record.windows)
        return Report(now, summaries, record, history)

    # -- the gauges ------------------------------------------------------------------

    def start(self) -> None:
        """Starts the thread that expires halves and sets the gauges every ``report_seconds``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lossd-monitors", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.report_seconds):
            try:
                self.publish()
                failing = False
            except (LossdError, OSError, ValueError) as exc:  # a database away: tried again next time
                if not failing:
                    log.warning("monitor reports failed (%s); trying again every %g s", exc, self.report_seconds)
                failing = True

    def publish(self) -> list[str]:
        """Reports every monitor into the gauges; returns their names."""
        records = self.state.all()
        names = []
        for record in records:
            report = self.report(record)
            names.append(record.name)
            if self.metrics is not None:
                self.metrics.set_monitor_report(record.name, [
                    (wire.window_label(s.window), s.segment, _gauge_values(s)) for s in report.windows],
                    pending=(report.pending_predictions, report.pending_labels),
                    expired=(report.expired_predictions, report.expired_labels), max_loss=record.max_loss)
        for gone in self._reported - set(names):
            self._forget(gone)
        self._reported = set(names)
        if self.metrics is not None:
            self.metrics.set_monitors(len(records))
        return names

    def _forget(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.remove_monitor(name)
        self._reported.discard(name)


def _gauge_values(summary: stats.Summary) -> dict[str, float]:
    values = {"mean": summary.mean, "count": float(summary.count), "labelled_fraction": summary.labelled_fraction,
              "label_delay": summary.median_label_delay,
              **{f"p{int(p)}": v for p, v in zip(stats.PERCENTILES, summary.percentiles)}}
    if summary.drift is not None:
        values["drift_statistic"] = summary.drift.statistic
        values["drift_p_value"] = summary.drift.p_value
    return values
