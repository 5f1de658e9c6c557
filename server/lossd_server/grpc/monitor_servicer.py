"""The MonitorService servicer: converts messages to and from the plain
records of ``lossd_server.monitors``; everything else happens there."""

from __future__ import annotations

from google.protobuf import duration_pb2, empty_pb2

from lossd import wire
from lossd.v1 import monitor_service_pb2 as pb
from lossd.v1 import monitor_service_pb2_grpc as pb_grpc
from lossd_server.errors import InvalidArgument
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Callers
from lossd_server.grpc.status import handle_errors, to_status
from lossd_server.grpc.timestamps import timestamp
from lossd_server.monitors.service import MonitorService, Report
from lossd_server.monitors.state import MonitorRecord, Written

SERVICE = pb.DESCRIPTOR.services_by_name["MonitorService"]


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def _seconds(duration: duration_pb2.Duration, field: str) -> float:
    if duration.nanos or duration.seconds <= 0:
        raise InvalidArgument(f"Invalid {field}. Expected a positive whole number of seconds. Received: "
                              f"{duration.seconds} s and {duration.nanos} ns.", reason="BAD_MONITOR_WINDOWS"
                              if "window" in field else "BAD_RETENTION")
    return float(duration.seconds)


def monitor_to_proto(record: MonitorRecord, report: Report | None = None) -> pb.Monitor:
    message = pb.Monitor(
        name=f"monitors/{record.name}", display_name=record.display_name, loss=wire.spec_from_dict(record.loss),
        windows=[_duration(w) for w in record.windows], segment_keys=record.segment_keys,
        retention=_duration(record.retention), owner=record.owner, create_time=timestamp(record.create_time),
        reference_time=timestamp(record.reference_time),
        reference_window=_duration(record.reference_window) if record.reference_window else None,
        max_loss=record.max_loss)
    if report is not None:
        message.report.CopyFrom(report_to_proto(report))
    return message


def report_to_proto(report: Report) -> pb.MonitorReport:
    message = pb.MonitorReport(time=timestamp(report.time), pending_predictions=report.pending_predictions,
                               pending_labels=report.pending_labels,
                               expired_predictions=report.expired_predictions,
                               expired_labels=report.expired_labels)
    for s in report.windows:
        entry = message.windows.add(window=_duration(s.window), segment=s.segment, count=s.count, mean_loss=s.mean,
                                    p50_loss=s.percentiles[0], p90_loss=s.percentiles[1], p99_loss=s.percentiles[2],
                                    labelled_fraction=s.labelled_fraction,
                                    median_label_delay_seconds=s.median_label_delay)
        if s.drift is not None:
            entry.drift.statistic = s.drift.statistic
            entry.drift.p_value = s.drift.p_value
            entry.drift.reference_count = s.drift.reference_count
    for when, window, count, mean in report.history:
        message.history.add(time=timestamp(when), window=_duration(window), count=count, mean_loss=mean)
    return message


def _written(written: Written) -> pb.ObserveResponse:
    return pb.ObserveResponse(accepted=written.paired + written.pending + written.duplicates, paired=written.paired,
                              pending=written.pending, duplicates=written.duplicates)


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    def __init__(self, service: MonitorService, *, callers: Callers = Callers(None)):
        self.service = service
        self.callers = callers  # who calls: Callers.of(context)

    @handle_errors
    def CreateMonitor(self, request, context):
        monitor = request.monitor
        windows = [_seconds(w, "monitor.windows") for w in monitor.windows]
        retention = _seconds(monitor.retention, "monitor.retention") if monitor.HasField("retention") else None
        record = self.service.create(
            request.monitor_id, loss=wire.spec_to_dict(monitor.loss) if monitor.HasField("loss") else None,
            windows=windows, segment_keys=list(monitor.segment_keys), retention=retention,
            display_name=monitor.display_name,
            max_loss=monitor.max_loss if monitor.HasField("max_loss") else None, caller=self.callers.of(context))
        return monitor_to_proto(record)

    @handle_errors
    def GetMonitor(self, request, context):
        record = self.service.get(request.name, self.callers.of(context))
        return monitor_to_proto(record, self.service.report(record, request.history_points))

    @handle_errors
    def ListMonitors(self, request, context):
        records, token = self.service.list(self.callers.of(context), request.page_size, request.page_token)
        return pb.ListMonitorsResponse(monitors=[monitor_to_proto(r) for r in records], next_page_token=token)

    @handle_errors
    def DeleteMonitor(self, request, context):
        self.service.delete(request.name, self.callers.of(context))
        return empty_pb2.Empty()

    @handle_errors
    def Observe(self, request, context):
        return _written(self._observe(request, self.callers.of(context), require_predictions=True))

    @handle_errors
    def Label(self, request, context):
        y_true = self._tensor(request, "y_true")
        if y_true is None:
            raise InvalidArgument("y_true is required. Expected a Tensor with one row per id. Received: none.",
                                  reason="BAD_TENSOR")
        return _written(self.service.label(request.monitor, list(request.ids), y_true, self.callers.of(context)))

    @handle_errors
    def ObserveStream(self, request_iterator, context):
        caller = self.callers.of(context)
        for request in request_iterator:
            try:
                yield _written(self._observe(request, caller, require_predictions=False))
            except Exception as exc:  # noqa: BLE001 - to_status logs unexpected ones; the stream goes on
                yield pb.ObserveResponse(error=to_status(exc))

    @handle_errors
    def CaptureReference(self, request, context):
        window = _seconds(request.window, "window") if request.HasField("window") else None
        record = self.service.capture_reference(request.name, window, self.callers.of(context))
        return monitor_to_proto(record, self.service.report(record))

    def _observe(self, request, caller, *, require_predictions: bool) -> Written:
        y_pred, y_true = self._tensor(request, "y_pred"), self._tensor(request, "y_true")
        if y_pred is None and (require_predictions or y_true is None):
            raise InvalidArgument("y_pred is required. Expected a Tensor with one row per id. Received: none.",
                                  reason="BAD_TENSOR")
        return self.service.observe(request.monitor, list(request.ids), y_pred, y_true, dict(request.segments),
                                    caller)

    def _tensor(self, request, field: str):
        if not request.HasField(field):
            return None
        return wire.to_numpy(getattr(request, field), field=field, max_elements=self.service.max_elements)


def add_monitor_service(server, service: MonitorService, callers: Callers) -> MonitorServicer:
    """Adds MonitorService to a ``grpc.Server`` not yet started."""
    servicer = MonitorServicer(service, callers=callers)
    parsing.add_tolerant(pb_grpc.add_MonitorServiceServicer_to_server, servicer, SERVICE, server)
    return servicer
