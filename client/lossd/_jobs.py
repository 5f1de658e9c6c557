"""Training jobs as the client sees them: ``Job``, ``JobEvent``, ``Dataset``
and ``GenerateProgress``, made from the training service's messages. Shared by
the sync and asyncio clients and the CLI; needs no TensorFlow."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from lossd import wire
from lossd._errors import LossdError, status_error
from lossd.v1 import training_service_pb2 as pb


UPLOAD_CHUNK_BYTES = 1 << 20
FINAL_STATES = ("succeeded", "failed", "cancelled")
ARTIFACTS = {"model": pb.ARTIFACT_MODEL, "history": pb.ARTIFACT_HISTORY, "tensorboard": pb.ARTIFACT_TENSORBOARD}


def state_name(value: int) -> str:
    return pb.Job.State.Name(value).removeprefix("STATE_").lower()


def _time(ts) -> Optional[datetime.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)



# protobuf's JSON mapping writes 64-bit integers as strings (seed "1"), and a
# Struct holds every number as a double (filters 32.0).
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _integral_as_int(value):
    """A Struct's value with whole numbers as ints, as a user writes them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_as_int(v) for k, v in value.items()}
    return value


def message_to_plain_dict(message) -> dict:
    """``message`` as protobuf's JSON mapping gives it (field names as in
    the .proto), but with 64-bit integers as ints and the whole numbers of
    its Structs (a preset's or a loss's params) as ints: ``"seed": 1``,
    ``"filters": [32, 64]``, not ``"1"`` and ``[32.0, 64.0]``. Other
    numbers are unchanged (``"dropout": 0.25``)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _plain_fields(message, data)
    return data


def _plain_fields(message, data: dict) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = getattr(message, field.name)
        repeated = field.is_repeated
        kind = field.message_type
        if kind is not None and kind.full_name == "google.protobuf.Struct":
            data[field.name] = _integral_as_int(data[field.name])
        elif kind is not None and not kind.GetOptions().map_entry:
            for item, item_data in zip(value, data[field.name]) if repeated else [(value, data[field.name])]:
                _plain_fields(item, item_data)
        elif field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in data[field.name]] if repeated else int(data[field.name])


@dataclasses.dataclass
class Job:
    """A training job.

    Attributes:
        name: ``jobs/{id}``.
        state: ``queued``, ``running``, ``cancelling``, ``succeeded``,
            ``failed`` or ``cancelled``.
        spec: The spec the server normalised (defaults filled in), as a dict.
        error: Why the job failed (a LossdError with ``reason`` such as
            ``NON_FINITE_LOSS``), or None.
        progress: ``epochs_completed``, ``epochs``, ``step``,
            ``examples_per_second``, ``eta_seconds``, the latest ``metrics`` and
            ``loss_state`` (a stateful loss's state by name, numpy arrays).
        model_kind: ``classifier`` (use ``predict``) or ``generator`` (use ``generate``).
        owner: The name of the token that created it ("" for jobs from
            before owners, or on a server without tokens).
    """

    name: str
    state: str
    spec: dict
    create_time: Optional[datetime.datetime]
    start_time: Optional[datetime.datetime]
    end_time: Optional[datetime.datetime]
    error: Optional[LossdError]
    progress: dict
    model_kind: str
    display_name: str = ""
    request_id: str = ""
    owner: str = ""

    @property
    def id(self) -> str:
        return self.name.split("/", 1)[-1]

    @property
    def done(self) -> bool:
        """Whether the job has reached a final state."""
        return self.state in FINAL_STATES

    @classmethod
    def from_proto(cls, message: pb.Job) -> "Job":
        p = message.progress
        return cls(
            name=message.name, state=state_name(message.state),
            spec=message_to_plain_dict(message.spec),
            create_time=_time(message.create_time), start_time=_time(message.start_time),
            end_time=_time(message.end_time),
            error=status_error(message.error) if message.HasField("error") else None,
            progress={"epochs_completed": p.epochs_completed, "epochs": p.epochs, "step": p.step,
                      "steps_per_epoch": p.steps_per_epoch, "examples_per_second": p.examples_per_second,
                      "eta_seconds": p.eta_seconds, "metrics": dict(p.metrics),
                      "loss_state": loss_state(p.loss_state)},
            model_kind=message.model_kind, display_name=message.display_name, request_id=message.request_id,
            owner=message.owner)


def loss_state(tensors) -> dict[str, np.ndarray]:
    """A ``map<string, Tensor>`` of a stateful loss's state as numpy arrays."""
    return {name: wire.to_numpy(t, field=f"loss_state[{name}]") for name, t in tensors.items()}


@dataclasses.dataclass
class JobEvent:
    """One event of a job, as ``watch`` yields it.

    ``kind`` says which fields are set: ``state`` (``state``, ``error``),
    ``epoch`` (``epoch``, ``epochs``, ``metrics``, ``seconds``,
    ``examples_per_second``), ``progress`` (``epoch``, ``epochs``, ``step``,
    ``steps_per_epoch``, ``loss``, ``examples_per_second``, ``eta_seconds``,
    and ``loss_state``: a stateful loss's state by name, such as
    ``matrix_crossentropy``'s ``matrix``) or ``message`` (``message``).
    """

    sequence: int
    time: Optional[datetime.datetime]
    kind: str
    state: str = ""
    error: Optional[LossdError] = None
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    loss: float = float("nan")
    metrics: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    examples: int = 0
    examples_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""
    loss_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_proto(cls, m: pb.JobEvent) -> "JobEvent":
        kind = m.WhichOneof("kind")
        base = {"sequence": m.sequence, "time": _time(m.time)}
        if kind == "state_changed":
            s = m.state_changed
            return cls(kind="state", state=state_name(s.state),
                       error=status_error(s.error) if s.HasField("error") else None, **base)
        if kind == "epoch_ended":
            e = m.epoch_ended
            return cls(kind="epoch", epoch=e.epoch, epochs=e.epochs, metrics=dict(e.metrics), seconds=e.seconds,
                       examples=e.examples, examples_per_second=e.examples_per_second,
                       loss=e.metrics.get("loss", float("nan")), **base)
        if kind == "progress":
            p = m.progress
            return cls(kind="progress", epoch=p.epoch, epochs=p.epochs, step=p.step,
                       steps_per_epoch=p.steps_per_epoch, loss=p.loss, examples_per_second=p.examples_per_second,
                       eta_seconds=p.eta_seconds, loss_state=loss_state(p.loss_state), **base)
        return cls(kind="message", message=m.message, **base)


@dataclasses.dataclass
class Dataset:
    """A dataset the server can train on; ``owner`` is the name of the token
    that uploaded it ("" for built-in and folder datasets)."""

    name: str
    source: str
    examples: int
    image_shape: tuple[int, ...]
    class_names: list[str]
    create_time: Optional[datetime.datetime] = None
    size_bytes: int = 0
    owner: str = ""

    @classmethod
    def from_proto(cls, m: pb.Dataset) -> "Dataset":
        return cls(m.name, m.source, m.examples, tuple(m.image_shape), list(m.class_names), _time(m.create_time),
                   m.size_bytes, m.owner)


@dataclasses.dataclass
class GenerateProgress:
    """One step of a generation, as ``generate_stream`` yields it: ``step``
    of ``steps`` done, ``elapsed_seconds`` since the server began, and its
    estimate of the seconds left. The last one (``step == steps``) holds the
    ``images`` (float32 N x H x W x C in [0, 1]); the others hold None."""

    step: int
    steps: int
    elapsed_seconds: float
    eta_seconds: float
    images: Optional[np.ndarray] = None

    @property
    def done(self) -> bool:
        """Whether this is the last step, with the images."""
        return self.images is not None
