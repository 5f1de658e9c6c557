"""Loss monitors from the client: create, read, list and delete monitors,
observe predictions and labels, capture the reference. The requests and
answers are built here once; the methods are mixed into ``lossd.Client``
(``MonitorMixin``) and ``lossd.aio.Client`` (``AsyncMonitorMixin``), which
differ only in how they wait for the stub. Needs no TensorFlow."""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import grpc
from google.protobuf import duration_pb2

from lossd import wire
from lossd._errors import client_error, status_error, translate_errors, translate_errors_async
from lossd.v1 import monitor_service_pb2 as pb
from lossd.v1 import monitor_service_pb2_grpc as pb_grpc

Seconds = Union[int, float, datetime.timedelta]


def monitor_name(monitor: "Monitor | str") -> str:
    """``monitors/NAME`` from a Monitor, its name or its bare id."""
    name = monitor.name if isinstance(monitor, Monitor) else str(monitor)
    return name if name.startswith("monitors/") else f"monitors/{name}"


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


def _duration(value: Seconds, field: str) -> duration_pb2.Duration:
    seconds = _seconds(value)
    if not math.isfinite(seconds) or seconds != int(seconds) or seconds <= 0:
        raise client_error(f"Invalid {field}. Expected a positive whole number of seconds. Received: {value!r}.")
    return duration_pb2.Duration(seconds=int(seconds))


def _time(ts) -> Optional[datetime.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class WindowReport:
    """One window of one segment of a monitor's report.

    Attributes:
        window: The window, in seconds.
        segment: ``key=value`` pairs joined by commas; "" for every segment together.
        count: Pairs whose loss became known within the window.
        mean_loss, p50_loss, p90_loss, p99_loss: Of their per-sample losses (NaN with none).
        labelled_fraction: Of the predictions observed within the window, the fraction labelled so far.
        median_label_delay: Seconds from a prediction to its label (median).
        drift: ``{"statistic", "p_value", "reference_count"}`` against the
            reference; None before one is captured.
    """

    window: float
    segment: str
    count: int
    mean_loss: float
    p50_loss: float
    p90_loss: float
    p99_loss: float
    labelled_fraction: float
    median_label_delay: float
    drift: Optional[dict] = None

    @classmethod
    def from_proto(cls, message: pb.WindowReport) -> "WindowReport":
        drift = None
        if message.HasField("drift"):
            drift = {"statistic": message.drift.statistic, "p_value": message.drift.p_value,
                     "reference_count": message.drift.reference_count}
        return cls(message.window.ToTimedelta().total_seconds(), message.segment, message.count, message.mean_loss,
                   message.p50_loss, message.p90_loss, message.p99_loss, message.labelled_fraction,
                   message.median_label_delay_seconds, drift)


@dataclasses.dataclass(frozen=True)
class Monitor:
    """A loss monitor, with its report when it came from ``monitor()``.

    Attributes:
        name: ``monitors/NAME``.
        loss: The LossSpec as a dict (``lossd.wire.spec_to_dict``).
        windows: In seconds, shortest first.
        segment_keys: The keys observations' segments may set.
        retention: Seconds a half waits for its other half.
        max_loss: The mean loss the LossdMonitorLossHigh alert compares with; None: unset.
        owner: The token that created it ("" on a server without tokens).
        reference_time, reference_window: When the reference was captured,
            and from which window; None before.
        report: One ``WindowReport`` per window and segment (empty from
            ``monitors()``), and ``pending``/``expired`` predictions and labels.
        history: ``(time, window, count, mean_loss)`` of each window at each
            point ``monitor(name, history_points=N)`` asked for.
    """

    name: str
    loss: dict
    windows: tuple
    segment_keys: tuple
    retention: float
    display_name: str = ""
    owner: str = ""
    create_time: Optional[datetime.datetime] = None
    reference_time: Optional[datetime.datetime] = None
    reference_window: Optional[float] = None
    windows_report: tuple = ()
    max_loss: Optional[float] = None
    history: tuple = ()
    pending: dict = dataclasses.field(default_factory=dict)
    expired: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_proto(cls, message: pb.Monitor) -> "Monitor":
        report = message.report
        return cls(
            name=message.name, loss=wire.spec_to_dict(message.loss),
            windows=tuple(w.ToTimedelta().total_seconds() for w in message.windows),
            segment_keys=tuple(message.segment_keys), retention=message.retention.ToTimedelta().total_seconds(),
            display_name=message.display_name, owner=message.owner, create_time=_time(message.create_time),
            reference_time=_time(message.reference_time),
            reference_window=message.reference_window.ToTimedelta().total_seconds()
            if message.HasField("reference_window") else None,
            windows_report=tuple(WindowReport.from_proto(w) for w in report.windows),
            max_loss=message.max_loss if message.HasField("max_loss") else None,
            pending={"predictions": report.pending_predictions, "labels": report.pending_labels},
            expired={"predictions": report.expired_predictions, "labels": report.expired_labels},
            history=tuple((_time(p.time), p.window.ToTimedelta().total_seconds(), p.count, p.mean_loss)
                          for p in report.history))

    def window(self, seconds: Seconds, segment: str = "") -> WindowReport:
        """The report of one window and segment."""
        wanted = _seconds(seconds)
        for entry in self.windows_report:
            if entry.window == wanted and entry.segment == segment:
                return entry
        raise KeyError(f"no report for window {wanted:g} s and segment {segment!r}")


@dataclasses.dataclass(frozen=True)
class Observed:
    """What an ``observe`` or ``label`` did: rows ``paired`` now, kept
    ``pending`` for their other half, and ``duplicates`` (ids already
    settled, ignored)."""

    accepted: int
    paired: int
    pending: int
    duplicates: int

    @classmethod
    def from_proto(cls, message: pb.ObserveResponse) -> "Observed":
        if message.HasField("error"):
            raise status_error(message.error)
        return cls(message.accepted, message.paired, message.pending, message.duplicates)


def create_monitor_request(name: str, loss: Any, windows: Sequence[Seconds], *, loss_params=None,
                           segment_keys: Sequence[str] = (), retention: Optional[Seconds] = None,
                           display_name: str = "", max_loss: Optional[float] = None) -> pb.CreateMonitorRequest:
    monitor = pb.Monitor(loss=wire.spec_from_dict(loss, loss_params), display_name=display_name,
                         windows=[_duration(w, "windows") for w in windows], segment_keys=list(segment_keys))
    if retention is not None:
        monitor.retention.CopyFrom(_duration(retention, "retention"))
    if max_loss is not None:
        monitor.max_loss = max_loss
    ident = name.removeprefix("monitors/")
    return pb.CreateMonitorRequest(monitor_id=ident, monitor=monitor)


def observe_request(monitor, ids: Sequence[str], y_pred=None, y_true=None,
                    segments: Optional[Mapping[str, str]] = None) -> pb.ObserveRequest:
    request = pb.ObserveRequest(monitor=monitor_name(monitor), ids=[str(i) for i in ids], segments=segments or {})
    if y_pred is not None:
        request.y_pred.CopyFrom(wire.from_numpy(y_pred, field="y_pred"))
    if y_true is not None:
        request.y_true.CopyFrom(wire.from_numpy(y_true, field="y_true"))
    return request


def capture_request(monitor, window: Optional[Seconds]) -> pb.CaptureReferenceRequest:
    request = pb.CaptureReferenceRequest(name=monitor_name(monitor))
    if window is not None:
        request.window.CopyFrom(_duration(window, "window"))
    return request


class _MonitorStub:
    """The monitor stub, made on first use from the client's channel."""

    _channel: grpc.Channel

    @property
    def _monitors(self) -> pb_grpc.MonitorServiceStub:
        stub = self.__dict__.get("_monitor_stub")
        if stub is None:
            stub = self.__dict__["_monitor_stub"] = pb_grpc.MonitorServiceStub(self._channel)
        return stub


class MonitorMixin(_MonitorStub):
    """Loss-monitor methods of ``lossd.Client`` (docs/monitors.md)."""

    @translate_errors
    def create_monitor(self, name: str, loss: Any, windows: Sequence[Seconds] = (300, 3600), *,
                       loss_params: Optional[Mapping[str, Any]] = None, segment_keys: Sequence[str] = (),
                       retention: Optional[Seconds] = None, display_name: str = "",
                       max_loss: Optional[float] = None, timeout: Optional[float] = None) -> Monitor:
        """Creates the monitor ``monitors/NAME``.

        Args:
            name: Its id (lower-case letters, digits and ``-``), or ``monitors/NAME``.
            loss: The loss, as for ``evaluate``: a name, ``{"name", "params"}``,
                an expression or a composite.
            windows: Durations (seconds or ``timedelta``) the loss is reported over.
            segment_keys: Keys observations' ``segments`` may set, such as ``model_version``.
            retention: How long a half waits for its other half; None: one day.
            max_loss: The mean loss above which the LossdMonitorLossHigh alert fires.

        Raises:
            LossdError: ALREADY_EXISTS (MONITOR_EXISTS), RESOURCE_EXHAUSTED
                (TOO_MANY_MONITORS), INVALID_ARGUMENT for a bad field.
        """
        request = create_monitor_request(name, loss, windows, loss_params=loss_params, segment_keys=segment_keys,
                                         retention=retention, display_name=display_name, max_loss=max_loss)
        return Monitor.from_proto(self._monitors.CreateMonitor(request, **self._call_args(timeout)))

    @translate_errors
    def monitor(self, name: "Monitor | str", *, history_points: int = 0,
                timeout: Optional[float] = None) -> Monitor:
        """The monitor with its report now (``Monitor.window(seconds, segment)``),
        and with ``history_points``, each window's mean loss at that many
        times over the longest window (``Monitor.history``)."""
        request = pb.GetMonitorRequest(name=monitor_name(name), history_points=history_points)
        return Monitor.from_proto(self._monitors.GetMonitor(request, **self._call_args(timeout)))

    @translate_errors
    def monitors(self, *, page_size: int = 100, timeout: Optional[float] = None) -> list[Monitor]:
        """Every monitor this caller may see, by name (without reports)."""
        found, token = [], ""
        while True:
            page = self._monitors.ListMonitors(pb.ListMonitorsRequest(page_size=page_size, page_token=token),
                                               **self._call_args(timeout))
            found += [Monitor.from_proto(m) for m in page.monitors]
            token = page.next_page_token
            if not token:
                return found

    @translate_errors
    def delete_monitor(self, name: "Monitor | str", *, timeout: Optional[float] = None) -> None:
        """Deletes a monitor with everything it holds."""
        self._monitors.DeleteMonitor(pb.DeleteMonitorRequest(name=monitor_name(name)), **self._call_args(timeout))

    @translate_errors
    def observe(self, monitor: "Monitor | str", ids: Sequence[str], y_pred, y_true=None, *,
                segments: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None) -> Observed:
        """Records predictions by id (one row each), and their labels when
        ``y_true`` is given; returns once the server has stored them."""
        request = observe_request(monitor, ids, y_pred, y_true, segments)
        return Observed.from_proto(self._monitors.Observe(request, **self._call_args(timeout)))

    @translate_errors
    def label(self, monitor: "Monitor | str", ids: Sequence[str], y_true, *,
              timeout: Optional[float] = None) -> Observed:
        """Records labels by id, before or after their predictions."""
        request = pb.LabelRequest(monitor=monitor_name(monitor), ids=[str(i) for i in ids],
                                  y_true=wire.from_numpy(y_true, field="y_true"))
        return Observed.from_proto(self._monitors.Label(request, **self._call_args(timeout)))

    @translate_errors
    def observe_many(self, monitor: "Monitor | str", batches: Iterable[Mapping[str, Any]], *,
                     timeout: Optional[float] = None) -> list[Observed]:
        """Many ``observe``/``label`` calls on one stream: each batch is a dict
        with ``ids`` and ``y_pred`` and/or ``y_true`` (and ``segments``).
        Raises the first refused batch's error after the stream ends."""
        requests = (observe_request(monitor, b["ids"], b.get("y_pred"), b.get("y_true"), b.get("segments"))
                    for b in batches)
        answers = list(self._monitors.ObserveStream(requests, **self._call_args(timeout)))
        return [Observed.from_proto(a) for a in answers]

    @translate_errors
    def capture_reference(self, monitor: "Monitor | str", window: Optional[Seconds] = None, *,
                          timeout: Optional[float] = None) -> Monitor:
        """Freezes one window's losses (the longest by default) as the reference drift is measured against."""
        return Monitor.from_proto(self._monitors.CaptureReference(capture_request(monitor, window),
                                                                  **self._call_args(timeout)))


class AsyncMonitorMixin(_MonitorStub):
    """Loss-monitor methods of ``lossd.aio.Client``: those of ``lossd.Client`` as coroutines."""

    @translate_errors_async
    async def create_monitor(self, name: str, loss: Any, windows: Sequence[Seconds] = (300, 3600), *,
                             loss_params: Optional[Mapping[str, Any]] = None, segment_keys: Sequence[str] = (),
                             retention: Optional[Seconds] = None, display_name: str = "",
                             max_loss: Optional[float] = None, timeout: Optional[float] = None) -> Monitor:
        """Refer to ``lossd.Client.create_monitor``."""
        request = create_monitor_request(name, loss, windows, loss_params=loss_params, segment_keys=segment_keys,
                                         retention=retention, display_name=display_name, max_loss=max_loss)
        return Monitor.from_proto(await self._monitors.CreateMonitor(request, **self._call_args(timeout)))

    @translate_errors_async
    async def monitor(self, name: "Monitor | str", *, history_points: int = 0,
                      timeout: Optional[float] = None) -> Monitor:
        """Refer to ``lossd.Client.monitor``."""
        request = pb.GetMonitorRequest(name=monitor_name(name), history_points=history_points)
        return Monitor.from_proto(await self._monitors.GetMonitor(request, **self._call_args(timeout)))

    @translate_errors_async
    async def monitors(self, *, page_size: int = 100, timeout: Optional[float] = None) -> list[Monitor]:
        """Refer to ``lossd.Client.monitors``."""
        found, token = [], ""
        while True:
            page = await self._monitors.ListMonitors(pb.ListMonitorsRequest(page_size=page_size, page_token=token),
                                                     **self._call_args(timeout))
            found += [Monitor.from_proto(m) for m in page.monitors]
            token = page.next_page_token
            if not token:
                return found

    @translate_errors_async
    async def delete_monitor(self, name: "Monitor | str", *, timeout: Optional[float] = None) -> None:
        """Refer to ``lossd.Client.delete_monitor``."""
        await self._monitors.DeleteMonitor(pb.DeleteMonitorRequest(name=monitor_name(name)),
                                           **self._call_args(timeout))

    @translate_errors_async
    async def observe(self, monitor: "Monitor | str", ids: Sequence[str], y_pred, y_true=None, *,
                      segments: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None) -> Observed:
        """Refer to ``lossd.Client.observe``."""
        request = observe_request(monitor, ids, y_pred, y_true, segments)
        return Observed.from_proto(await self._monitors.Observe(request, **self._call_args(timeout)))

    @translate_errors_async
    async def label(self, monitor: "Monitor | str", ids: Sequence[str], y_true, *,
                    timeout: Optional[float] = None) -> Observed:
        """Refer to ``lossd.Client.label``."""
        request = pb.LabelRequest(monitor=monitor_name(monitor), ids=[str(i) for i in ids],
                                  y_true=wire.from_numpy(y_true, field="y_true"))
        return Observed.from_proto(await self._monitors.Label(request, **self._call_args(timeout)))

    @translate_errors_async
    async def observe_many(self, monitor: "Monitor | str", batches: Iterable[Mapping[str, Any]], *,
                           timeout: Optional[float] = None) -> list[Observed]:
        """Refer to ``lossd.Client.observe_many``."""
        requests = [observe_request(monitor, b["ids"], b.get("y_pred"), b.get("y_true"), b.get("segments"))
                    for b in batches]
        answers = [a async for a in self._monitors.ObserveStream(iter(requests), **self._call_args(timeout))]
        return [Observed.from_proto(a) for a in answers]

    @translate_errors_async
    async def capture_reference(self, monitor: "Monitor | str", window: Optional[Seconds] = None, *,
                                timeout: Optional[float] = None) -> Monitor:
        """Refer to ``lossd.Client.capture_reference``."""
        return Monitor.from_proto(await self._monitors.CaptureReference(capture_request(monitor, window),
                                                                        **self._call_args(timeout)))
