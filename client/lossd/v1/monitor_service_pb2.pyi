import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from lossd.v1 import loss_pb2 as _loss_pb2
from lossd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Monitor(_message.Message):
    __slots__ = ("name", "display_name", "loss", "windows", "segment_keys", "retention", "owner", "create_time", "reference_time", "reference_window", "report", "max_loss")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TIME_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    MAX_LOSS_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    loss: _loss_pb2.LossSpec
    windows: _containers.RepeatedCompositeFieldContainer[_duration_pb2.Duration]
    segment_keys: _containers.RepeatedScalarFieldContainer[str]
    retention: _duration_pb2.Duration
    owner: str
    create_time: _timestamp_pb2.Timestamp
    reference_time: _timestamp_pb2.Timestamp
    reference_window: _duration_pb2.Duration
    report: MonitorReport
    max_loss: float
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., loss: _Optional[_Union[_loss_pb2.LossSpec, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]]] = ..., segment_keys: _Optional[_Iterable[str]] = ..., retention: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reference_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reference_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., report: _Optional[_Union[MonitorReport, _Mapping]] = ..., max_loss: _Optional[float] = ...) -> None: ...

class MonitorReport(_message.Message):
    __slots__ = ("time", "windows", "pending_predictions", "pending_labels", "expired_predictions", "expired_labels", "history")
    TIME_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_LABELS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LABELS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    windows: _containers.RepeatedCompositeFieldContainer[WindowReport]
    pending_predictions: int
    pending_labels: int
    expired_predictions: int
    expired_labels: int
    history: _containers.RepeatedCompositeFieldContainer[HistoryPoint]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[WindowReport, _Mapping]]] = ..., pending_predictions: _Optional[int] = ..., pending_labels: _Optional[int] = ..., expired_predictions: _Optional[int] = ..., expired_labels: _Optional[int] = ..., history: _Optional[_Iterable[_Union[HistoryPoint, _Mapping]]] = ...) -> None: ...

class HistoryPoint(_message.Message):
    __slots__ = ("time", "window", "count", "mean_loss")
    TIME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    window: _duration_pb2.Duration
    count: int
    mean_loss: float
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., count: _Optional[int] = ..., mean_loss: _Optional[float] = ...) -> None: ...

class WindowReport(_message.Message):
    __slots__ = ("window", "segment", "count", "mean_loss", "p50_loss", "p90_loss", "p99_loss", "labelled_fraction", "median_label_delay_seconds", "drift")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    P50_LOSS_FIELD_NUMBER: _ClassVar[int]
    P90_LOSS_FIELD_NUMBER: _ClassVar[int]
    P99_LOSS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_LABEL_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    window: _duration_pb2.Duration
    segment: str
    count: int
    mean_loss: float
    p50_loss: float
    p90_loss: float
    p99_loss: float
    labelled_fraction: float
    median_label_delay_seconds: float
    drift: Drift
    def __init__(self, window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., segment: _Optional[str] = ..., count: _Optional[int] = ..., mean_loss: _Optional[float] = ..., p50_loss: _Optional[float] = ..., p90_loss: _Optional[float] = ..., p99_loss: _Optional[float] = ..., labelled_fraction: _Optional[float] = ..., median_label_delay_seconds: _Optional[float] = ..., drift: _Optional[_Union[Drift, _Mapping]] = ...) -> None: ...

class Drift(_message.Message):
    __slots__ = ("statistic", "p_value", "reference_count")
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    statistic: float
    p_value: float
    reference_count: int
    def __init__(self, statistic: _Optional[float] = ..., p_value: _Optional[float] = ..., reference_count: _Optional[int] = ...) -> None: ...

class CreateMonitorRequest(_message.Message):
    __slots__ = ("monitor_id", "monitor")
    MONITOR_ID_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    monitor_id: str
    monitor: Monitor
    def __init__(self, monitor_id: _Optional[str] = ..., monitor: _Optional[_Union[Monitor, _Mapping]] = ...) -> None: ...

class GetMonitorRequest(_message.Message):
    __slots__ = ("name", "history_points")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HISTORY_POINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    history_points: int
    def __init__(self, name: _Optional[str] = ..., history_points: _Optional[int] = ...) -> None: ...

class ListMonitorsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMonitorsResponse(_message.Message):
    __slots__ = ("monitors", "next_page_token")
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    monitors: _containers.RepeatedCompositeFieldContainer[Monitor]
    next_page_token: str
    def __init__(self, monitors: _Optional[_Iterable[_Union[Monitor, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteMonitorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("monitor", "ids", "y_pred", "y_true", "segments")
    class SegmentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    Y_PRED_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    y_pred: _tensor_pb2.Tensor
    y_true: _tensor_pb2.Tensor
    segments: _containers.ScalarMap[str, str]
    def __init__(self, monitor: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., y_pred: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., y_true: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., segments: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LabelRequest(_message.Message):
    __slots__ = ("monitor", "ids", "y_true")
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_FIELD_NUMBER: _ClassVar[int]
    monitor: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    y_true: _tensor_pb2.Tensor
    def __init__(self, monitor: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., y_true: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ("accepted", "paired", "pending", "duplicates", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PAIRED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    paired: int
    pending: int
    duplicates: int
    error: _status_pb2.Status
    def __init__(self, accepted: _Optional[int] = ..., paired: _Optional[int] = ..., pending: _Optional[int] = ..., duplicates: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class CaptureReferenceRequest(_message.Message):
    __slots__ = ("name", "window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    window: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
