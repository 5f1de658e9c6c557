import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from lossd.v1 import loss_pb2 as _loss_pb2
from lossd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Artifact(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_UNSPECIFIED: _ClassVar[Artifact]
    ARTIFACT_MODEL: _ClassVar[Artifact]
    ARTIFACT_HISTORY: _ClassVar[Artifact]
    ARTIFACT_TENSORBOARD: _ClassVar[Artifact]
ARTIFACT_UNSPECIFIED: Artifact
ARTIFACT_MODEL: Artifact
ARTIFACT_HISTORY: Artifact
ARTIFACT_TENSORBOARD: Artifact

class JobSpec(_message.Message):
    __slots__ = ("model", "dataset", "loss", "optimizer", "epochs", "batch_size", "validation_split", "metrics", "seed", "steps_per_epoch", "workers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    dataset: str
    loss: _loss_pb2.LossSpec
    optimizer: OptimizerSpec
    epochs: int
    batch_size: int
    validation_split: float
    metrics: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    steps_per_epoch: int
    workers: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., dataset: _Optional[str] = ..., loss: _Optional[_Union[_loss_pb2.LossSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., validation_split: _Optional[float] = ..., metrics: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("preset", "params")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    preset: str
    params: _struct_pb2.Struct
    def __init__(self, preset: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "learning_rate", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    params: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "display_name", "spec", "state", "create_time", "start_time", "end_time", "error", "progress", "request_id", "model_kind", "owner")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        STATE_QUEUED: _ClassVar[Job.State]
        STATE_RUNNING: _ClassVar[Job.State]
        STATE_SUCCEEDED: _ClassVar[Job.State]
        STATE_FAILED: _ClassVar[Job.State]
        STATE_CANCELLING: _ClassVar[Job.State]
        STATE_CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    STATE_QUEUED: Job.State
    STATE_RUNNING: Job.State
    STATE_SUCCEEDED: Job.State
    STATE_FAILED: Job.State
    STATE_CANCELLING: Job.State
    STATE_CANCELLED: Job.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    spec: JobSpec
    state: Job.State
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    error: _status_pb2.Status
    progress: JobProgress
    request_id: str
    model_kind: str
    owner: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[Job.State, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., request_id: _Optional[str] = ..., model_kind: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("epochs_completed", "epochs", "step", "steps_per_epoch", "examples_per_second", "eta_seconds", "metrics", "loss_state")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LossStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    EPOCHS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOSS_STATE_FIELD_NUMBER: _ClassVar[int]
    epochs_completed: int
    epochs: int
    step: int
    steps_per_epoch: int
    examples_per_second: float
    eta_seconds: float
    metrics: _containers.ScalarMap[str, float]
    loss_state: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, epochs_completed: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., examples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., loss_state: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "state_changed", "epoch_ended", "progress", "message")
    class StateChanged(_message.Message):
        __slots__ = ("state", "error")
        STATE_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        state: Job.State
        error: _status_pb2.Status
        def __init__(self, state: _Optional[_Union[Job.State, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
    class EpochEnded(_message.Message):
        __slots__ = ("epoch", "epochs", "metrics", "seconds", "examples", "examples_per_second")
        class MetricsEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: float
            def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
        EPOCH_FIELD_NUMBER: _ClassVar[int]
        EPOCHS_FIELD_NUMBER: _ClassVar[int]
        METRICS_FIELD_NUMBER: _ClassVar[int]
        SECONDS_FIELD_NUMBER: _ClassVar[int]
        EXAMPLES_FIELD_NUMBER: _ClassVar[int]
        EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
        epoch: int
        epochs: int
        metrics: _containers.ScalarMap[str, float]
        seconds: float
        examples: int
        examples_per_second: float
        def __init__(self, epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., seconds: _Optional[float] = ..., examples: _Optional[int] = ..., examples_per_second: _Optional[float] = ...) -> None: ...
    class Progress(_message.Message):
        __slots__ = ("epoch", "epochs", "step", "steps_per_epoch", "loss", "examples_per_second", "eta_seconds", "loss_state")
        class LossStateEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: _tensor_pb2.Tensor
            def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
        EPOCH_FIELD_NUMBER: _ClassVar[int]
        EPOCHS_FIELD_NUMBER: _ClassVar[int]
        STEP_FIELD_NUMBER: _ClassVar[int]
        STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
        LOSS_FIELD_NUMBER: _ClassVar[int]
        EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
        ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
        LOSS_STATE_FIELD_NUMBER: _ClassVar[int]
        epoch: int
        epochs: int
        step: int
        steps_per_epoch: int
        loss: float
        examples_per_second: float
        eta_seconds: float
        loss_state: _containers.MessageMap[str, _tensor_pb2.Tensor]
        def __init__(self, epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., loss: _Optional[float] = ..., examples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., loss_state: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_ENDED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state_changed: JobEvent.StateChanged
    epoch_ended: JobEvent.EpochEnded
    progress: JobEvent.Progress
    message: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_changed: _Optional[_Union[JobEvent.StateChanged, _Mapping]] = ..., epoch_ended: _Optional[_Union[JobEvent.EpochEnded, _Mapping]] = ..., progress: _Optional[_Union[JobEvent.Progress, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "display_name", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    display_name: str
    request_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., display_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[Job.State]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[Job.State, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "source", "examples", "image_shape", "class_names", "create_time", "size_bytes", "owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    examples: int
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    size_bytes: int
    owner: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., examples: _Optional[int] = ..., image_shape: _Optional[_Iterable[int]] = ..., class_names: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class DatasetHeader(_message.Message):
    __slots__ = ("name", "format", "size_bytes", "replace")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[DatasetHeader.Format]
        FORMAT_NPZ: _ClassVar[DatasetHeader.Format]
        FORMAT_ZIP: _ClassVar[DatasetHeader.Format]
        FORMAT_TAR: _ClassVar[DatasetHeader.Format]
    FORMAT_UNSPECIFIED: DatasetHeader.Format
    FORMAT_NPZ: DatasetHeader.Format
    FORMAT_ZIP: DatasetHeader.Format
    FORMAT_TAR: DatasetHeader.Format
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: DatasetHeader.Format
    size_bytes: int
    replace: bool
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[DatasetHeader.Format, str]] = ..., size_bytes: _Optional[int] = ..., replace: _Optional[bool] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DatasetHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("name", "artifact")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    name: str
    artifact: Artifact
    def __init__(self, name: _Optional[str] = ..., artifact: _Optional[_Union[Artifact, str]] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("filename", "size_bytes", "data")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    filename: str
    size_bytes: int
    data: bytes
    def __init__(self, filename: _Optional[str] = ..., size_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("name", "images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    images: _tensor_pb2.Tensor
    def __init__(self, name: _Optional[str] = ..., images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("probabilities", "class_names")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    probabilities: _tensor_pb2.Tensor
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, probabilities: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("name", "count", "seed", "prompt", "steps", "guidance", "guidance_scale", "init_images", "init_weight", "classifier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INIT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    seed: int
    prompt: str
    steps: int
    guidance: _loss_pb2.LossSpec
    guidance_scale: float
    init_images: _tensor_pb2.Tensor
    init_weight: float
    classifier: str
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., seed: _Optional[int] = ..., prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Union[_loss_pb2.LossSpec, _Mapping]] = ..., guidance_scale: _Optional[float] = ..., init_images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., init_weight: _Optional[float] = ..., classifier: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    class Progress(_message.Message):
        __slots__ = ("step", "steps", "elapsed_seconds", "eta_seconds")
        STEP_FIELD_NUMBER: _ClassVar[int]
        STEPS_FIELD_NUMBER: _ClassVar[int]
        ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
        ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
        step: int
        steps: int
        elapsed_seconds: float
        eta_seconds: float
        def __init__(self, step: _Optional[int] = ..., steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GenerateStreamResponse.Progress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[GenerateStreamResponse.Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
