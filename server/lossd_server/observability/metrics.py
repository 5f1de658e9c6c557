"""Every Prometheus metric lossd exports, defined in one place.

Metrics live on a ``CollectorRegistry`` passed in, never on the global one, so
each test builds a fresh registry. Names follow the Prometheus naming practice
(base units, ``_total`` counters, ``_seconds``/``_bytes`` suffixes) and the
``lossd_`` prefix; RPC-level metrics reuse the names of go-grpc-prometheus and
py-grpc-prometheus so existing dashboards and alerts work unchanged.

The ``loss`` label is bounded: the fixed names given at construction (Keras's
losses, lossd's built-ins and plugins), ``"composite"``, ``"expression"``, and
at most ``max_registered_labels`` names of losses clients registered, first
come first served; anything else is counted as ``"other"``. Job ids and
request ids never become labels. The ``caller`` label is a token's name, which
the operator chose when making the token (``lossd tokens create NAME``), so
its values are as many as the tokens file has lines; ``"anonymous"`` stands
for every caller of a server without tokens. The ``reason`` label of
refusals is an ErrorInfo reason the server's code spells, never client text.

``/metrics`` is served from a rendering at most ``cache_seconds`` old (see
``start_metrics_server``), so many scrapers cost one rendering per interval,
not one each; optionally over TLS and behind HTTP basic auth
(``lossd_server.security.basic_auth``).

With ``lossd serve --processes N`` (N > 1) every serving process records
into prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``,
a fresh directory per start that the supervisor makes), and the supervisor
alone serves ``/metrics`` from them (``multiprocess_registry``). Counters and
histograms are summed over the processes, those that died included, so they
never go down. Each gauge says how its processes' values combine
(``multiprocess_mode``), and only live processes count:

- ``livesum`` for what each process holds on its own: RPCs and REST
  requests in flight (only the first process serves the REST port),
  compiled programs cached, shared-memory regions mapped, evaluations
  waiting for its heavy lane, training throughput (only the process that
  runs jobs sets it);
- ``livemostrecent`` for what every process reads from the shared store
  (jobs by state) and the last epoch's training loss: the newest reading;
- ``livemax`` for values every process sets alike: build and device info
  (always 1), and the items quarantined at start.

``lossd_gpu_memory_bytes`` and the ``process_*``/``python_*`` metrics are
read at scrape time inside one process, which the multiprocess files cannot
carry: with N > 1 they are not exported (docs/scaling.md).

This module imports neither gRPC nor TensorFlow: the transport passes status
code names as strings and the backend passes device and version strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from lossd_server.security.basic_auth import LIMITED, REALM, BasicAuth
from lossd_server.security.certificates import ReloadingSSLContext

logger = logging.getLogger(__name__)

# Label values of the ``loss`` label that are not loss names.
OTHER_LOSS = "other"
COMPOSITE_LOSS = "composite"
EXPRESSION_LOSS = "expression"  # an inline expression (LossSpec.expression)

EVALUATION_OUTCOMES = ("ok", "invalid_argument", "error")
CACHE_RESULTS = ("hit", "miss")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
TRAINING_SPLITS = ("train", "validation")
# The ``caller`` label of the caller on a server without tokens (Caller name "").
ANONYMOUS_CALLER = "anonymous"
SHARED_MEMORY_DIRECTIONS = ("read", "written")
# RESOURCE_EXHAUSTED reasons the server sends, pre-initialised at zero; a
# reason missing here is still counted when it happens.
REJECTION_REASONS = (
    "INFLIGHT_BYTES_FULL", "QUEUE_FULL", "CALLER_RATE_LIMIT", "CALLER_SHARE_FULL",  # evaluation admission
    "TOO_MANY_STREAMS", "COMPILE_BUSY", "COMPILE_TIMEOUT", "OUT_OF_MEMORY",  # evaluation
    "TOO_MANY_JOBS", "TOO_MANY_LOSSES", "DECODE_BUDGET_EXHAUSTED", "DATASET_STORAGE_FULL",  # training, storage
    "DISK_FULL",
    "SHM_TOO_MANY_REGIONS", "SHM_TOO_MANY_BYTES",  # shared memory
)

# The ``grpc_type`` label of a method, as go-grpc-prometheus spells it, by
# (client_streaming, server_streaming). See ``grpc_type``.
_GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}

# The canonical gRPC status code names (grpc/grpc doc/statuscodes.md). Anything
# else reaching RpcMethodMetrics.finished is a bug in the caller; it is counted
# as UNKNOWN rather than raising inside an interceptor's ``finally``.
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)

# From 100 µs (a cached unary call on loopback) to 60 s (a long upload).
RPC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# Finer at the low end: a compiled loss on a small tensor takes tens of µs,
# one on 1e7 elements a few ms, a first call that traces up to seconds.
EVALUATION_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)
# From 1 s (a job that fails at once) to 24 h.
JOB_DURATION_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
)

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_HTTP_LABELS = ("http_request_method", "http_route")
# The ``http_request_method`` values kept as they are; any other method a
# client sends is counted as ``_OTHER`` (as OpenTelemetry spells it).
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

# Micro-batching (lossd_server.evaluation.batching): requests and y_pred
# elements per batched call, and how long each request waited for company.
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
BATCH_ELEMENT_BUCKETS = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
BATCH_WAIT_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)

GpuMemorySource = Callable[[], Mapping[str, tuple[int, int]]]


class _GpuMemoryCollector(Collector):
    """Reads GPU memory at scrape time from a callback, so no thread polls it."""

    name = "lossd_gpu_memory_bytes"
    documentation = ("Memory held by TensorFlow on each GPU, in bytes: "
                     "kind=\"in_use\" now, kind=\"peak\" the most since start.")

    def __init__(self) -> None:
        self.source: GpuMemorySource | None = None

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation,
                                 labels=("device", "kind"))

    def describe(self) -> list[GaugeMetricFamily]:
        # Without describe() the registry would call collect() on register,
        # i.e. call the source before the backend is ready.
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        source = self.source
        if source is not None:
            try:
                readings = dict(source())
            except Exception:  # a failing probe must not break the whole scrape
                logger.warning("GPU memory source failed; exporting no samples",
                               exc_info=True)
                readings = {}
            for device, (in_use, peak) in sorted(readings.items()):
                family.add_metric((device, "in_use"), float(in_use))
                family.add_metric((device, "peak"), float(peak))
        yield family


@dataclasses.dataclass
class EvaluationRecord:
    """What a caller fills in while ``Metrics.time_evaluation`` times it."""

    outcome: str = "ok"
    elements: int = 0
    nbytes: int = 0


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The ``grpc_type`` label of a method: ``unary``, ``client_stream``,
    ``server_stream`` or ``bidi_stream``.

    Takes a method descriptor's ``client_streaming``/``server_streaming`` or a
    method handler's ``request_streaming``/``response_streaming``.
    """
    return _GRPC_TYPES[(bool(client_streaming), bool(server_streaming))]


def _adder(child) -> Callable[[float], None]:
    """What adds to a resolved Counter or Gauge child (``labels(...)`` done
    once), for the per-request path: its value's own ``inc``.
    prometheus_client's ``inc`` checks on every call that the child is
    observable and the amount not negative (three more Python calls, about
    0.2 µs, up to ten times a request); a resolved child is observable and
    our amounts are counts. The samples scraped are the same (the same value
    object, in multiprocess mode too); where prometheus_client keeps no
    ``_value``, ``inc`` itself."""
    value = getattr(child, "_value", None)
    return child.inc if value is None else value.inc


class RpcMethodMetrics:
    """The RPC metrics of one method, its label children resolved once.

    Get it from ``Metrics.rpc_method``; the interceptor calls ``started()``,
    ``received()``/``sent()`` per message, and ``finished()`` once per call.
    """

    def __init__(self, metrics: "Metrics", kind: str, service: str, method: str):
        # labels() takes a lock and builds a key: per call it would cost more
        # than the updates themselves, so every child is looked up here.
        self._labels = (kind, service, method)
        self._handled_total = metrics.grpc_server_handled_total
        self._started = _adder(metrics.grpc_server_started_total.labels(*self._labels))
        self._in_flight = _adder(metrics.lossd_grpc_in_flight_requests.labels(service, method))
        self._received = _adder(metrics.grpc_server_msg_received_total.labels(*self._labels))
        self._sent = _adder(metrics.grpc_server_msg_sent_total.labels(*self._labels))
        self._handling = metrics.latency(metrics.grpc_server_handling_seconds.labels(*self._labels))
        self._handled = {"OK": _adder(self._handled_total.labels(*self._labels, "OK"))}

    def started(self) -> None:
        """Counts a call as started and in flight."""
        self._started(1)
        self._in_flight(1)

    def received(self) -> None:
        """Counts one request message."""
        self._received(1)

    def sent(self) -> None:
        """Counts one response message."""
        self._sent(1)

    def finished(self, code: str, seconds: float) -> None:
        """Records the end of a started call: its status code name (``"OK"``,
        ``"INVALID_ARGUMENT"``, ...) and how long it took."""
        self._in_flight(-1)
        handled = self._handled.get(code)
        if handled is None:
            if code not in GRPC_CODES:
                logger.warning("Unexpected gRPC code %r counted as UNKNOWN", code)
                code = "UNKNOWN"
            handled = self._handled.setdefault(code, _adder(self._handled_total.labels(*self._labels, code)))
        handled(1)
        self._handling.observe(seconds)


class _WithExemplar:
    """A histogram child whose observations carry the current trace as their exemplar."""

    __slots__ = ("_child", "_exemplar")

    def __init__(self, child, exemplar: Callable[[], Optional[dict]]):
        self._child, self._exemplar = child, exemplar

    def observe(self, amount: float) -> None:
        self._child.observe(amount, self._exemplar())


class HttpRouteMetrics:
    """The HTTP metrics of one (method, route template), children resolved once.

    Get it from ``Metrics.http_route``; the REST front end calls
    ``started()`` when a request arrives and ``finished()`` once it is answered.
    """

    def __init__(self, metrics: "Metrics", method: str, route: str):
        self._labels = (method, route)
        self._duration_family = metrics.http_server_request_duration_seconds
        self._latency = metrics.latency
        self._active = metrics.http_server_active_requests.labels(method, route)
        self._duration: dict[int, Histogram] = {}

    def started(self) -> None:
        """Counts a request as in flight."""
        self._active.inc()

    def finished(self, status: int, seconds: float) -> None:
        """Records the answer of a started request: its HTTP status (one the
        server chose, so the label stays bounded) and how long it took."""
        self._active.dec()
        duration = self._duration.get(status)
        if duration is None:
            duration = self._duration.setdefault(status, self._latency(
                self._duration_family.labels(*self._labels, str(status))))
        duration.observe(seconds)


class Metrics:
    """All of lossd's metrics, registered on one registry.

    Args:
        registry: Where to register; tests pass a fresh ``CollectorRegistry``.
        loss_names: Canonical names of the losses the server always has
            (Keras's, lossd's built-ins, plugins). They, ``"composite"``,
            ``"expression"`` and ``"other"`` are the fixed values of the
            ``loss`` label, initialised at zero. Resolve aliases such as
            ``"mse"`` before calling.
        version: The lossd version, exported by ``lossd_build_info``.
        tensorflow_version, keras_version: The backend's versions, exported
            by ``lossd_build_info`` too. Given here, the one sample is
            written once: in multiprocess mode a replaced sample would stay
            in the files.
        process_metrics: Also export ``process_*`` and ``python_*`` metrics.
        max_registered_labels: How many other names (losses clients
            registered) may become ``loss`` label values, the first ones
            evaluated; the rest count as ``"other"``. Registered names are
            client input: without this bound every registration would add
            series to every scrape.
    """

    def __init__(self, registry: CollectorRegistry, *, loss_names: Iterable[str],
                 version: str, tensorflow_version: str = "", keras_version: str = "",
                 process_metrics: bool = True, max_registered_labels: int = 0):
        self.registry = registry
        self._written: set = set()  # the info gauges set once (see _replace)
        self._evaluation_children: dict[tuple[str, str], tuple] = {}
        self._rpc_methods: dict[tuple[str, str], RpcMethodMetrics] = {}
        self._http_routes: dict[tuple[str, str], HttpRouteMetrics] = {}
        self._exemplar: Optional[Callable[[], Optional[dict]]] = None  # see exemplars_from
        self._loss_labels = frozenset(loss_names) | {COMPOSITE_LOSS, EXPRESSION_LOSS, OTHER_LOSS}
        self._registered_labels: set[str] = set()
        self._registered_lock = threading.Lock()
        self.max_registered_labels = max_registered_labels
        r = registry

        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # RPC level.
        self.grpc_server_started_total = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            _RPC_LABELS, registry=r)
        self.grpc_server_handled_total = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status code.",
            _RPC_LABELS + ("grpc_code",), registry=r)
        self.grpc_server_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status being sent, in seconds.",
            _RPC_LABELS, buckets=RPC_BUCKETS, registry=r)
        self.grpc_server_msg_received_total = Counter(
            "grpc_server_msg_received_total",
            "Request messages received on the server, counted per stream message.",
            _RPC_LABELS, registry=r)
        self.grpc_server_msg_sent_total = Counter(
            "grpc_server_msg_sent_total",
            "Response messages sent by the server, counted per stream message.",
            _RPC_LABELS, registry=r)
        self.lossd_grpc_in_flight_requests = Gauge(
            "lossd_grpc_in_flight_requests",
            "RPCs started and not yet finished.",
            ("grpc_service", "grpc_method"), registry=r, multiprocess_mode="livesum")
        # HTTP level (the Open Inference Protocol's REST port), named as
        # OpenTelemetry's HTTP semantic conventions export them to Prometheus.
        self.http_server_request_duration_seconds = Histogram(
            "http_server_request_duration_seconds",
            "Time from an HTTP request's arrival to its answer, by method, route template and status code; "
            "its _count counts the requests.",
            _HTTP_LABELS + ("http_response_status_code",), buckets=RPC_BUCKETS, registry=r)
        self.http_server_active_requests = Gauge(
            "http_server_active_requests",
            "HTTP requests started and not yet answered.",
            _HTTP_LABELS, registry=r, multiprocess_mode="livesum")

        # Loss evaluation.
        self.lossd_loss_evaluations_total = Counter(
            "lossd_loss_evaluations_total",
            "Loss evaluations, by loss and by outcome (ok, invalid_argument, error).",
            ("loss", "outcome"), registry=r)
        self.lossd_loss_evaluation_duration_seconds = Histogram(
            "lossd_loss_evaluation_duration_seconds",
            "Time spent evaluating a loss, failures included, in seconds.",
            ("loss",), buckets=EVALUATION_BUCKETS, registry=r)
        self.lossd_loss_evaluated_elements_total = Counter(
            "lossd_loss_evaluated_elements_total",
            "Elements of y_pred passed to loss evaluations.",
            ("loss",), registry=r)
        self.lossd_loss_evaluated_bytes_total = Counter(
            "lossd_loss_evaluated_bytes_total",
            "Bytes of all request tensors passed to loss evaluations.",
            ("loss",), registry=r)
        self.lossd_loss_compilations_total = Counter(
            "lossd_loss_compilations_total",
            "Traces of a compiled loss function (tf.function retracing included).",
            ("loss",), registry=r)
        self.lossd_loss_cache_lookups_total = Counter(
            "lossd_loss_cache_lookups_total",
            "Lookups in the cache of compiled losses, by result (hit or miss).",
            ("result",), registry=r)
        self.lossd_loss_cache_entries = Gauge(
            "lossd_loss_cache_entries",
            "Compiled loss functions held in the cache.",
            registry=r, multiprocess_mode="livesum")

        # Admission and per-caller usage.
        self.lossd_rejected_requests_total = Counter(
            "lossd_rejected_requests_total",
            "Requests (or EvaluateStream items) refused with RESOURCE_EXHAUSTED, by ErrorInfo reason: "
            "admission (INFLIGHT_BYTES_FULL, QUEUE_FULL, CALLER_RATE_LIMIT), stream, compile, job and "
            "storage limits.",
            ("reason",), registry=r)
        self.lossd_caller_requests_total = Counter(
            "lossd_caller_requests_total",
            "Evaluations admitted, by caller (the token's name; \"anonymous\" without tokens). "
            "An EvaluateChunked call counts once.",
            ("caller",), registry=r)
        self.lossd_caller_elements_total = Counter(
            "lossd_caller_elements_total",
            "Elements of y_pred in the evaluations admitted, by caller: what the caller's rate "
            "limit (elements per second) is charged.",
            ("caller",), registry=r)
        self.lossd_caller_upload_bytes_total = Counter(
            "lossd_caller_upload_bytes_total",
            "Bytes of datasets stored by UploadDataset, by caller: what the caller's storage limit "
            "(max_upload_bytes) counts.",
            ("caller",), registry=r)
        self._caller_children: dict[str, tuple] = {}
        # Fair sharing between callers (admission.FairSlots): the ``slots``
        # label is the kind of slot ("evaluation slots", "compile slots").
        self.lossd_fair_share_waits_total = Counter(
            "lossd_fair_share_waits_total",
            "Requests that waited for a slot shared fairly between callers and got one, by caller and kind "
            "of slot (evaluation or compile).",
            ("caller", "slots"), registry=r)
        self.lossd_fair_share_wait_seconds = Histogram(
            "lossd_fair_share_wait_seconds",
            "How long requests waited for a slot shared fairly between callers, by kind of slot.",
            ("slots",), buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0), registry=r)
        self.lossd_fair_share_refusals_total = Counter(
            "lossd_fair_share_refusals_total",
            "Requests refused (RESOURCE_EXHAUSTED: CALLER_SHARE_FULL, COMPILE_BUSY) because their caller was "
            "at its fair share of a kind of slot, by caller and kind of slot.",
            ("caller", "slots"), registry=r)
        # The heavy lane (evaluation/heavy.py): evaluations above the heavy
        # cost threshold, run in worker processes that can be killed.
        self.lossd_heavy_lane_queued = Gauge(
            "lossd_heavy_lane_queued",
            "Evaluations waiting for a heavy-lane worker process now.", registry=r, multiprocess_mode="livesum")
        self.lossd_heavy_lane_runs_total = Counter(
            "lossd_heavy_lane_runs_total",
            "Evaluations run in a heavy-lane worker process, by outcome: ok, error (refused by the worker), "
            "cancelled (the call ended first), memory (past its memory ceiling), died (the worker ended).",
            ("outcome",), registry=r)
        self.lossd_heavy_lane_kills_total = Counter(
            "lossd_heavy_lane_kills_total",
            "Heavy-lane worker processes killed (SIGKILL) or found dead while they held an evaluation, by "
            "reason: cancelled, memory, died.",
            ("reason",), registry=r)
        self.lossd_heavy_lane_starts_total = Counter(
            "lossd_heavy_lane_starts_total",
            "Heavy-lane worker processes started (the first, and each replacement of a killed one).",
            registry=r)

        # Micro-batching of evaluations.
        self.lossd_batch_size_requests = Histogram(
            "lossd_batch_size_requests",
            "Requests evaluated together in one batched call (1: a request that found no company).",
            buckets=BATCH_REQUEST_BUCKETS, registry=r)
        self.lossd_batch_size_elements = Histogram(
            "lossd_batch_size_elements",
            "Elements of y_pred, summed over the requests, evaluated in one batched call.",
            buckets=BATCH_ELEMENT_BUCKETS, registry=r)
        self.lossd_batch_wait_seconds = Histogram(
            "lossd_batch_wait_seconds",
            "Time a batched request waited for its batch to close, in seconds.",
            buckets=BATCH_WAIT_BUCKETS, registry=r)

        # Training.
        self.lossd_training_jobs = Gauge(
            "lossd_training_jobs",
            "Training jobs known to the server, by state.",
            ("state",), registry=r, multiprocess_mode="livemostrecent")
        self.lossd_training_job_duration_seconds = Histogram(
            "lossd_training_job_duration_seconds",
            "Wall-clock time of finished training jobs, by final state, in seconds.",
            ("state",), buckets=JOB_DURATION_BUCKETS, registry=r)
        self.lossd_training_epochs_total = Counter(
            "lossd_training_epochs_total",
            "Training epochs completed, over all jobs.",
            registry=r)
        self.lossd_training_examples_total = Counter(
            "lossd_training_examples_total",
            "Training examples processed, over all jobs.",
            registry=r)
        self.lossd_training_examples_per_second = Gauge(
            "lossd_training_examples_per_second",
            "Training throughput summed over running jobs, in examples per second.",
            registry=r, multiprocess_mode="livesum")
        self.lossd_generation_steps_total = Counter(
            "lossd_generation_steps_total",
            "Sampling steps run by Generate and GenerateStream (one per DDIM step; a vae counts one per call).",
            registry=r)
        self.lossd_training_loss = Gauge(
            "lossd_training_loss",
            "Loss of the last epoch reported by the most recent running job, by split.",
            ("split",), registry=r, multiprocess_mode="livemostrecent")

        # Shared memory (clients on the server's host, shared_memory.py).
        self.lossd_shared_memory_bytes_total = Counter(
            "lossd_shared_memory_bytes_total",
            "Tensor bytes served through shared-memory regions instead of the socket: read from requests, "
            "written as results.",
            ("direction",), registry=r)
        self.lossd_shared_memory_regions = Gauge(
            "lossd_shared_memory_regions",
            "Shared-memory regions registered by clients now.",
            registry=r, multiprocess_mode="livesum")
        self.lossd_shared_memory_mapped_bytes = Gauge(
            "lossd_shared_memory_mapped_bytes",
            "Bytes of the shared-memory regions registered now.",
            registry=r, multiprocess_mode="livesum")
        for direction in SHARED_MEMORY_DIRECTIONS:
            self.lossd_shared_memory_bytes_total.labels(direction)

        # Persisted state.
        self.lossd_state_quarantined_items = Gauge(
            "lossd_state_quarantined_items",
            "Files or rows of persisted state moved to the data directory's quarantine/ at start "
            "because they could not be read; 0 when all state loaded.",
            registry=r, multiprocess_mode="livemax")

        # Loss monitors (lossd_server.monitors): every process reads the same
        # reports from the store, so the newest reading stands. Labels are
        # bounded: monitors by max_monitors, windows by 8 a monitor, segments
        # by max_monitor_segments.
        monitor_labels = ("monitor", "window", "segment")
        self.lossd_monitors = Gauge(
            "lossd_monitors", "Loss monitors on the server.", registry=r, multiprocess_mode="livemostrecent")
        self._monitor_gauges = {
            "mean": Gauge("lossd_monitor_loss", "Mean per-sample loss of a monitor's pairs completed within the "
                          "window, by segment (empty: every segment).", monitor_labels, registry=r,
                          multiprocess_mode="livemostrecent"),
            "quantile": Gauge("lossd_monitor_loss_quantile", "Percentiles (0.5, 0.9, 0.99) of a monitor's "
                              "per-sample losses within the window.", (*monitor_labels, "quantile"), registry=r,
                              multiprocess_mode="livemostrecent"),
            "count": Gauge("lossd_monitor_pairs", "Pairs of prediction and label completed within the window.",
                           monitor_labels, registry=r, multiprocess_mode="livemostrecent"),
            "labelled_fraction": Gauge("lossd_monitor_labelled_fraction", "Of the predictions observed within the "
                                       "window, the fraction labelled so far.", monitor_labels, registry=r,
                                       multiprocess_mode="livemostrecent"),
            "label_delay": Gauge("lossd_monitor_label_delay_seconds", "Median time from a prediction to its label "
                                 "over the window's pairs, in seconds.", monitor_labels, registry=r,
                                 multiprocess_mode="livemostrecent"),
            "drift_statistic": Gauge("lossd_monitor_drift_statistic", "Two-sample Kolmogorov-Smirnov statistic of "
                                     "the window's losses against the monitor's reference.", monitor_labels,
                                     registry=r, multiprocess_mode="livemostrecent"),
            "drift_p_value": Gauge("lossd_monitor_drift_p_value", "The p-value of the drift test: small when the "
                                   "window's losses no longer look like the reference's.", monitor_labels,
                                   registry=r, multiprocess_mode="livemostrecent"),
        }
        self.lossd_monitor_pending_ids = Gauge(
            "lossd_monitor_pending_ids", "Ids of a monitor waiting for their other half, by the half held "
            "(prediction or label).", ("monitor", "half"), registry=r, multiprocess_mode="livemostrecent")
        self.lossd_monitor_expired = Gauge(
            "lossd_monitor_expired", "Halves of a monitor that expired without their other half since it was "
            "created, by half (a prediction never labelled, a label never predicted).", ("monitor", "half"),
            registry=r, multiprocess_mode="livemostrecent")
        self.lossd_monitor_max_loss = Gauge(
            "lossd_monitor_max_loss", "The mean loss above which a monitor's loss counts as too high (its "
            "max_loss; the alert LossdMonitorLossHigh compares lossd_monitor_loss with it); absent when unset.",
            ("monitor",), registry=r, multiprocess_mode="livemostrecent")
        self._monitor_series: dict[str, set[tuple]] = {}

        # Device and build.
        self.lossd_device_info = Gauge(
            "lossd_device_info",
            "Devices TensorFlow can place work on; the value is always 1.",
            ("device_type", "device"), registry=r, multiprocess_mode="livemax")
        self._gpu_memory = _GpuMemoryCollector()
        r.register(self._gpu_memory)
        self.lossd_build_info = Gauge(
            "lossd_build_info",
            "Versions lossd was built with; the value is always 1.",
            ("version", "tensorflow_version", "keras_version"), registry=r, multiprocess_mode="livemax")

        self._preinitialise()
        self._cache_hits = _adder(self.lossd_loss_cache_lookups_total.labels("hit"))
        self._cache_misses = _adder(self.lossd_loss_cache_lookups_total.labels("miss"))
        self.set_build_info(version, tensorflow_version, keras_version)

    def _preinitialise(self) -> None:
        # Known label values get a zero sample now, so rate() and increase()
        # see the first event. Histograms per loss are left out on purpose:
        # ~20 buckets times every loss is too many idle series. The training
        # loss is left out too: a 0 would read as a perfect loss.
        for loss in sorted(self._loss_labels):
            for outcome in EVALUATION_OUTCOMES:
                self.lossd_loss_evaluations_total.labels(loss, outcome)
        for result in CACHE_RESULTS:
            self.lossd_loss_cache_lookups_total.labels(result)
        for state in JOB_STATES:
            self.lossd_training_jobs.labels(state).set(0)
        for state in FINAL_JOB_STATES:
            self.lossd_training_job_duration_seconds.labels(state)
        for reason in REJECTION_REASONS:
            self.lossd_rejected_requests_total.labels(reason)

    # Exemplars: the latency histograms' link to traces.

    def exemplars_from(self, exemplar: Callable[[], Optional[dict]]) -> None:
        """Makes the latency histograms (``grpc_server_handling_seconds``,
        ``http_server_request_duration_seconds``,
        ``lossd_loss_evaluation_duration_seconds``) keep, with each bucket's
        latest observation, ``exemplar()``: the current span's
        ``{"trace_id", "span_id"}``, or None outside a sampled span. Served in
        the OpenMetrics format only (a scrape that asks for it).

        Call it before the histograms' children are made (``create_server``
        does, right after making the metrics, when tracing is on): only
        children made after it carry exemplars, so a server without tracing
        observes as before, at no cost. In multiprocess mode
        prometheus_client keeps no exemplars."""
        self._exemplar = exemplar

    def latency(self, child):
        """``child`` (a histogram's labelled child), observing with an
        exemplar when ``exemplars_from`` was called."""
        return child if self._exemplar is None else _WithExemplar(child, self._exemplar)

    # Loss evaluation.

    def loss_label(self, name: str) -> str:
        """The ``loss`` label for ``name``: a fixed name (see ``__init__``),
        one of the first ``max_registered_labels`` other names seen, else
        ``"other"``: clients cannot add label values past the bound.

        Callers pass canonical names of losses the registry knows (or
        ``"other"``), never raw request text."""
        if name in self._loss_labels or name in self._registered_labels:
            return name
        with self._registered_lock:
            if name in self._registered_labels or len(self._registered_labels) < self.max_registered_labels:
                self._registered_labels.add(name)
                return name
        return OTHER_LOSS

    def observe_evaluation(self, loss_name: str, outcome: str, seconds: float,
                           elements: int, nbytes: int) -> None:
        """Records one loss evaluation, successful or not.

        Args:
            loss_name: The loss evaluated; unknown names count as ``"other"``.
            outcome: One of ``"ok"``, ``"invalid_argument"``, ``"error"``.
            seconds: How long it took, failures included.
            elements: Elements of ``y_pred`` (0 when refused before decoding).
            nbytes: Bytes of all request tensors.
        """
        if outcome not in EVALUATION_OUTCOMES:
            raise ValueError(
                f"Invalid value for argument `outcome`. Expected one of "
                f"{EVALUATION_OUTCOMES}. Received: outcome={outcome!r}")
        # Children resolved once per (loss, outcome): a labels() lookup takes a
        # lock and builds a key, four of them per request add up.
        children = self._evaluation_children.get((loss_name, outcome))
        if children is None:
            loss = self.loss_label(loss_name)
            children = (_adder(self.lossd_loss_evaluations_total.labels(loss, outcome)),
                        self.latency(self.lossd_loss_evaluation_duration_seconds.labels(loss)),
                        _adder(self.lossd_loss_evaluated_elements_total.labels(loss)),
                        _adder(self.lossd_loss_evaluated_bytes_total.labels(loss)))
            if len(self._evaluation_children) < 4096:  # unknown names are many; "other" needs no cache
                self._evaluation_children[(loss_name, outcome)] = children
        count, duration, elements_total, bytes_total = children
        count(1)
        duration.observe(seconds)
        elements_total(elements)
        bytes_total(nbytes)

    @contextlib.contextmanager
    def time_evaluation(self, loss_name: str) -> Iterator[EvaluationRecord]:
        """Times the body and records it with ``observe_evaluation``.

        The body fills in ``elements``/``nbytes`` and, before raising a client
        error, sets ``outcome = "invalid_argument"``. Any other exception is
        recorded as ``"error"``. The clock starts when the body starts and
        stops when it ends, whether it returns or raises.
        """
        record = EvaluationRecord()
        start = time.perf_counter()
        try:
            yield record
        except BaseException:
            if record.outcome == "ok":
                record.outcome = "error"
            raise
        finally:
            self.observe_evaluation(loss_name, record.outcome,
                                    time.perf_counter() - start,
                                    record.elements, record.nbytes)

    def observe_compilation(self, loss_name: str) -> None:
        """Counts one trace of a compiled loss."""
        self.lossd_loss_compilations_total.labels(self.loss_label(loss_name)).inc()

    def observe_cache_lookup(self, hit: bool) -> None:
        """Counts one lookup in the compiled-loss cache."""
        (self._cache_hits if hit else self._cache_misses)(1)

    def set_cache_entries(self, entries: int) -> None:
        """Sets how many compiled losses the cache holds now."""
        self.lossd_loss_cache_entries.set(entries)

    # Admission and per-caller usage.

    def count_rejection(self, reason: str) -> None:
        """Counts one RESOURCE_EXHAUSTED refusal; ``grpc/status.py`` calls it
        for every such status it makes (the reason is the server's own)."""
        self.lossd_rejected_requests_total.labels(reason or "RESOURCE_EXHAUSTED").inc()

    def _caller(self, caller: str) -> tuple:
        children = self._caller_children.get(caller)
        if children is None:
            label = caller or ANONYMOUS_CALLER
            children = self._caller_children.setdefault(caller, (
                _adder(self.lossd_caller_requests_total.labels(label)),
                _adder(self.lossd_caller_elements_total.labels(label)),
                _adder(self.lossd_caller_upload_bytes_total.labels(label))))
        return children

    def known_callers(self, callers: Iterable[str]) -> None:
        """Gives each caller (token name) its zero samples now, so its first
        request shows up in ``rate()``."""
        for caller in callers:
            self._caller(caller)

    def caller_usage(self, caller: str, *, requests: int = 0, elements: int = 0, upload_bytes: int = 0) -> None:
        """Adds to a caller's usage counters.

        Args:
            caller: The caller's name (``Caller.name``: a token's name, or ""
                for the anonymous caller of a server without tokens). Only
                names from the tokens file reach here, never request text.
            requests: Evaluations admitted.
            elements: Elements of ``y_pred`` they carry.
            upload_bytes: Bytes of a dataset the caller stored.
        """
        count, element_total, upload_total = self._caller(caller)
        if requests:
            count(requests)
        if elements:
            element_total(elements)
        if upload_bytes:
            upload_total(upload_bytes)

    def fair_share_wait(self, caller: str, slots: str, seconds: float) -> None:
        """Records a request of ``caller`` (a token's name, or "") that waited
        ``seconds`` for one of ``slots`` ("evaluation slots", "compile
        slots") and got it."""
        kind = slots.partition(" ")[0]
        self.lossd_fair_share_waits_total.labels(caller or ANONYMOUS_CALLER, kind).inc()
        self.lossd_fair_share_wait_seconds.labels(kind).observe(seconds)

    def fair_share_refusal(self, caller: str, slots: str) -> None:
        """Counts a request of ``caller`` refused at its share of ``slots``."""
        self.lossd_fair_share_refusals_total.labels(caller or ANONYMOUS_CALLER, slots.partition(" ")[0]).inc()

    # The heavy lane.

    def heavy_lane_queued(self, waiting: int) -> None:
        """Sets how many evaluations wait for a heavy-lane worker."""
        self.lossd_heavy_lane_queued.set(waiting)

    def heavy_lane_run(self, outcome: str) -> None:
        """Counts one heavy-lane evaluation's ``outcome`` (ok, error,
        cancelled, memory, died)."""
        self.lossd_heavy_lane_runs_total.labels(outcome).inc()

    def heavy_lane_kill(self, reason: str) -> None:
        """Counts a heavy-lane worker killed or found dead (cancelled, memory, died)."""
        self.lossd_heavy_lane_kills_total.labels(reason).inc()

    def heavy_lane_started(self) -> None:
        """Counts a heavy-lane worker process that started."""
        self.lossd_heavy_lane_starts_total.inc()

    # Micro-batching.

    def observe_batch(self, requests: int, elements: int, waits: Iterable[float]) -> None:
        """Records one batch as it closes: its requests, their y_pred
        elements, and how long each request waited in it."""
        self.lossd_batch_size_requests.observe(requests)
        self.lossd_batch_size_elements.observe(elements)
        for seconds in waits:
            self.lossd_batch_wait_seconds.observe(seconds)

    # RPC level.

    def rpc_method(self, service: str, method: str, *, client_streaming: bool,
                   server_streaming: bool) -> RpcMethodMetrics:
        """The metrics of one RPC method, made on the first call and shared after.

        Making them creates the method's zero samples, as go-grpc-prometheus's
        ``InitializeMetrics`` does, so its first call shows up in ``rate()``.
        """
        key = (service, method)
        found = self._rpc_methods.get(key)
        if found is None:
            found = self._rpc_methods.setdefault(key, RpcMethodMetrics(
                self, grpc_type(client_streaming, server_streaming), service, method))
        return found

    def http_route(self, method: str, route: str) -> HttpRouteMetrics:
        """The metrics of one HTTP method on one route template (such as
        ``/v2/models/{name}/infer``, never a raw path: the caller bounds the
        routes), made on the first request and shared after. A method not in
        ``HTTP_METHODS`` is counted as ``_OTHER``."""
        key = (method if method in HTTP_METHODS else "_OTHER", route)  # a client's method never grows this
        found = self._http_routes.get(key)
        if found is None:
            found = self._http_routes.setdefault(key, HttpRouteMetrics(self, *key))
        return found

    # Training: recorded by the job scheduler (lossd_server.training.scheduler).

    def set_training_jobs(self, counts: Mapping[str, int]) -> None:
        """Sets the number of jobs in every state; states not given are 0."""
        unknown = set(counts) - set(JOB_STATES)
        if unknown:
            raise ValueError(f"Invalid job states. Expected some of {JOB_STATES}. "
                             f"Received: {sorted(unknown)}")
        for state in JOB_STATES:
            self.lossd_training_jobs.labels(state).set(counts.get(state, 0))

    def observe_job_finished(self, state: str, seconds: float) -> None:
        """Records the wall-clock time of a job that reached a final state."""
        if state not in FINAL_JOB_STATES:
            raise ValueError(
                f"Invalid value for argument `state`. Expected one of "
                f"{FINAL_JOB_STATES}. Received: state={state!r}")
        self.lossd_training_job_duration_seconds.labels(state).observe(seconds)

    def training_progress(self, examples: int, examples_per_second: float) -> None:
        """Counts ``examples`` more training examples and sets the throughput
        summed over the running jobs."""
        self.lossd_training_examples_total.inc(examples)
        self.lossd_training_examples_per_second.set(examples_per_second)

    def training_epoch_ended(self, examples: int, epoch_metrics: Mapping[str, float]) -> None:
        """Counts a finished epoch and its last ``examples``, and sets
        ``lossd_training_loss`` from the epoch's ``loss`` and ``val_loss``."""
        self.lossd_training_epochs_total.inc()
        self.lossd_training_examples_total.inc(examples)
        for split, key in zip(TRAINING_SPLITS, ("loss", "val_loss")):
            if key in epoch_metrics:
                self.lossd_training_loss.labels(split).set(epoch_metrics[key])

    def generation_step(self) -> None:
        """Counts one sampling step of a generation."""
        self.lossd_generation_steps_total.inc()

    def set_training_throughput(self, examples_per_second: float) -> None:
        """Sets the throughput summed over the running jobs (after one ends)."""
        self.lossd_training_examples_per_second.set(examples_per_second)

    # Shared memory.

    def shared_memory_bytes(self, direction: str, nbytes: int) -> None:
        """Counts tensor bytes served through shared memory (``read`` or ``written``)."""
        self.lossd_shared_memory_bytes_total.labels(direction).inc(nbytes)

    def set_shared_memory_regions(self, regions: int, nbytes: int) -> None:
        """Sets how many regions, of how many bytes in all, are registered now."""
        self.lossd_shared_memory_regions.set(regions)
        self.lossd_shared_memory_mapped_bytes.set(nbytes)

    # Device and build.

    def set_quarantined_items(self, count: int) -> None:
        """Sets how many items of persisted state the server quarantined at start."""
        self.lossd_state_quarantined_items.set(count)

    def _replace(self, gauge: Gauge) -> None:
        # Only a gauge written before is cleared: prometheus_client warns on
        # any clear() in multiprocess mode, where each is written once.
        if gauge in self._written:
            gauge.clear()
        self._written.add(gauge)

    def set_device_info(self, devices: Iterable[tuple[str, str]]) -> None:
        """Replaces the device list with ``(device_type, device)`` pairs,
        e.g. ``("GPU", "/physical_device:GPU:0")``."""
        self._replace(self.lossd_device_info)
        for device_type, device in devices:
            self.lossd_device_info.labels(device_type.upper(), device).set(1)

    def set_build_info(self, version: str, tensorflow_version: str = "",
                       keras_version: str = "") -> None:
        """Replaces the single ``lossd_build_info`` sample."""
        self._replace(self.lossd_build_info)
        self.lossd_build_info.labels(version, tensorflow_version, keras_version).set(1)

    def set_gpu_memory_source(self, fn: GpuMemorySource | None) -> None:
        """Sets the callback read at every scrape: device -> (in_use, peak) bytes.

        ``None`` removes it. A callback that raises yields no samples (and a
        logged warning) instead of failing the scrape.
        """
        self._gpu_memory.source = fn


    # Loss monitors: set by MonitorService.publish from each monitor's report.

    def set_monitors(self, count: int) -> None:
        """Sets how many monitors the server has."""
        self.lossd_monitors.set(count)

    def set_monitor_report(self, monitor: str, windows: Iterable[tuple[str, str, Mapping[str, float]]], *,
                           pending: tuple[int, int], expired: tuple[int, int],
                           max_loss: Optional[float] = None) -> None:
        """Sets a monitor's gauges from its report: ``(window, segment,
        values)`` per window and segment, where ``values`` holds ``mean``,
        ``count``, ``p50``/``p90``/``p99``, ``labelled_fraction``,
        ``label_delay`` and, once a reference exists, ``drift_statistic`` and
        ``drift_p_value``; and its pending and expired predictions and
        labels; and its ``max_loss`` (None: no series). Series of windows or
        segments no longer reported are removed."""
        series: set[tuple] = set()
        for window, segment, values in windows:
            for key, value in values.items():
                if key.startswith("p") and key[1:].isdigit():
                    quantile = str(int(key[1:]) / 100)
                    self._monitor_gauges["quantile"].labels(monitor, window, segment, quantile).set(value)
                    series.add(("quantile", monitor, window, segment, quantile))
                else:
                    self._monitor_gauges[key].labels(monitor, window, segment).set(value)
                    series.add((key, monitor, window, segment))
        for half, p, e in zip(("prediction", "label"), pending, expired):
            self.lossd_monitor_pending_ids.labels(monitor, half).set(p)
            self.lossd_monitor_expired.labels(monitor, half).set(e)
        if max_loss is not None:
            self.lossd_monitor_max_loss.labels(monitor).set(max_loss)
        else:
            with contextlib.suppress(KeyError):
                self.lossd_monitor_max_loss.remove(monitor)
        self._remove_monitor_series(self._monitor_series.get(monitor, set()) - series)
        self._monitor_series[monitor] = series

    def remove_monitor(self, monitor: str) -> None:
        """Removes every series of a deleted monitor."""
        self._remove_monitor_series(self._monitor_series.pop(monitor, set()))
        with contextlib.suppress(KeyError):
            self.lossd_monitor_max_loss.remove(monitor)
        for half in ("prediction", "label"):
            for gauge in (self.lossd_monitor_pending_ids, self.lossd_monitor_expired):
                with contextlib.suppress(KeyError):
                    gauge.remove(monitor, half)

    def _remove_monitor_series(self, series: Iterable[tuple]) -> None:
        for key, *labels in series:
            with contextlib.suppress(KeyError):
                self._monitor_gauges[key].remove(*labels)


class SupervisorMetrics:
    """The registry ``/metrics`` serves with ``lossd serve --processes N``:
    every serving process's metrics from the multiprocess files in ``path``
    (see the module's docstring), and the supervisor's own two, kept in this
    process and read at scrape time."""

    def __init__(self, path: str, processes: int):
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)
        self._collector = _SupervisorCollector(processes)
        self.registry.register(self._collector)

    def set_serving_processes(self, serving: int) -> None:
        """Sets how many processes serve now: started, SERVING and alive (of ``--processes``)."""
        self._collector.serving = serving

    def process_restarted(self) -> None:
        """Counts one serving process that died and was started again."""
        with self._collector.lock:
            self._collector.restarts += 1


class _SupervisorCollector(Collector):
    def __init__(self, processes: int):
        self.processes = processes
        self.serving = 0
        self.restarts = 0
        self.lock = threading.Lock()

    def collect(self) -> Iterator:
        processes = GaugeMetricFamily(
            "lossd_serving_processes", "Serving processes: state=\"serving\" those that started, report SERVING "
            "and live now; state=\"configured\" as many as --processes (LOSSD_PROCESSES) asks for.",
            labels=("state",))
        processes.add_metric(("serving",), self.serving)
        processes.add_metric(("configured",), self.processes)
        yield processes
        restarts = CounterMetricFamily("lossd_serving_process_restarts", "Serving processes that died "
                                       "(killed, out of memory, a crash) and were started again by the supervisor.")
        restarts.add_metric((), self.restarts)
        yield restarts


class _CachedExposition:
    """A WSGI app serving the registry from a rendering at most
    ``cache_seconds`` old, one per exposition format asked for (Prometheus
    asks for OpenMetrics, curl gets the classic text format).

    Rendering walks every series under the registry's locks while holding the
    GIL: sixteen scrapers rendering at once took Evaluate's p50 from 0.9 ms to
    33 ms. So scrapes never render: one background thread does, at most once
    per interval and only when a scrape asked for a fresher body than the one
    it has; every scrape waiting meanwhile gets that one rendering's bytes.
    """

    def __init__(self, registry: CollectorRegistry, cache_seconds: float):
        self.registry = registry
        self.cache_seconds = cache_seconds  # read at each scrape (tests change it)
        self.renders = 0  # how many times the registry was rendered (tests read it)
        self._changed = threading.Condition()
        # content type -> (monotonic time its rendering started, body or None when it failed)
        self._cache: dict[str, tuple[float, Optional[bytes]]] = {}
        self._wanted: dict[str, Callable] = {}  # content type -> encoder, asked for a fresher body
        self._renderer: Optional[threading.Thread] = None
        self._closed = False

    def body(self, accept: str = "") -> tuple[str, bytes]:
        """``(content type, body)`` for an Accept header: a rendering that
        started at most ``cache_seconds`` before this call (0: after it).

        Raises:
            RuntimeError: the rendering failed (a collector raised), or the
                exposition is closed.
        """
        encoder, content_type = choose_encoder(accept)
        asked = time.monotonic()
        with self._changed:
            while True:
                started, body = self._cache.get(content_type, (float("-inf"), None))
                if started >= asked - self.cache_seconds and (started > asked or self.cache_seconds > 0):
                    if body is None:
                        raise RuntimeError("rendering the registry failed")
                    return content_type, body
                if self._closed:
                    raise RuntimeError("the metrics server is closed")
                self._wanted[content_type] = encoder
                if self._renderer is None:
                    self._renderer = threading.Thread(target=self._render, name="metrics-render", daemon=True)
                    self._renderer.start()
                self._changed.notify_all()
                self._changed.wait()

    def _render(self) -> None:
        while True:
            with self._changed:
                while not self._wanted and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                content_type, encoder = self._wanted.popitem()
            started = time.monotonic()
            try:
                body = encoder(self.registry)
            except Exception:  # noqa: BLE001 - a broken collector fails the scrape, not the renderer
                logger.exception("rendering /metrics failed")
                body = None
            with self._changed:
                self._cache[content_type] = (started, body)
                self.renders += 1
                self._changed.notify_all()

    def close(self) -> None:
        """Stops the rendering thread; waiting scrapes fail."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        if environ.get("PATH_INFO", "/") == "/favicon.ico":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not Found"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        content_type, body = self.body(environ.get("HTTP_ACCEPT", ""))
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]


class _BasicAuthGate:
    """The WSGI app behind HTTP basic auth: without credentials the file
    holds, 401 with a ``WWW-Authenticate`` challenge, before anything renders;
    an address over its budget of failed checks gets 429 without its
    password being hashed (``BasicAuth.check``)."""

    def __init__(self, app, auth: BasicAuth):
        self.app, self.auth = app, auth

    def __call__(self, environ, start_response):
        address = environ.get("REMOTE_ADDR", "")
        user = self.auth.check(environ.get("HTTP_AUTHORIZATION", ""), address)
        if user is LIMITED:
            body = b"Too Many Requests: too many failed logins from this address; retry later\n"
            start_response("429 Too Many Requests", [
                ("Retry-After", str(self.auth.retry_after(address))), ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body)))])
            return [body]
        if user is None:
            body = b"Unauthorized: this endpoint needs HTTP basic auth (LOSSD_METRICS_BASIC_AUTH_FILE)\n"
            start_response("401 Unauthorized", [
                ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


class _QuietHandler(WSGIRequestHandler):
    # A client that connects and sends nothing (or never finishes the TLS
    # handshake) gives its thread back after this many seconds.
    timeout = 10

    def log_message(self, format, *args):  # noqa: A002 - scrapes are not worth a log line each
        pass


class _FairConnections:
    """Accepted connections waiting for a handler thread, by client address.

    ``get`` takes them round robin across addresses, one connection at a
    time per address, and at most ``rate`` per second from one address; the
    others wait in the queue (their clients wait too, so a client looping on
    requests adds no load beyond its rate). At most ``backlog`` wait in all:
    ``put`` refuses one more.
    """

    def __init__(self, backlog: int, rate: float):
        self.backlog, self.rate = backlog, rate
        self._changed = threading.Condition()
        self._waiting: dict[str, list] = {}  # address -> its connections, addresses in round-robin order
        self._next: dict[str, float] = {}  # address -> when it may be served again
        self._serving: set[str] = set()
        self._held = 0
        self._closed = False

    def put(self, item, address: str) -> bool:
        with self._changed:
            if self._held >= self.backlog:
                return False
            self._waiting.setdefault(address, []).append(item)
            self._held += 1
            self._changed.notify()
            return True

    def get(self) -> Optional[tuple]:
        """The next ``(connection, address)`` to serve (call ``done(address)``
        after), or None once closed."""
        with self._changed:
            while not self._closed:
                now, wait = time.monotonic(), None
                for address, items in self._waiting.items():
                    if address in self._serving:
                        continue
                    ready = self._next.get(address, now)
                    if ready <= now:
                        del self._waiting[address]
                        if len(items) > 1:
                            self._waiting[address] = items[1:]  # to the end of the round
                        self._held -= 1
                        self._serving.add(address)
                        self._next[address] = max(ready, now - 1.0 / self.rate) + 1.0 / self.rate
                        return items[0], address
                    wait = ready - now if wait is None else min(wait, ready - now)
                self._changed.wait(wait)
            return None

    def done(self, address: str) -> None:
        with self._changed:
            self._serving.discard(address)
            if len(self._next) > 4 * self.backlog:  # forget addresses that may be served now
                now = time.monotonic()
                self._next = {a: t for a, t in self._next.items() if t > now or a in self._waiting}
            self._changed.notify()

    def close(self) -> list:
        """Ends every ``get``; returns the connections still waiting."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            left = [item for items in self._waiting.values() for item in items]
            self._waiting.clear()
            return left


class _PooledWSGIServer(WSGIServer):
    """Answers requests on ``handler_threads`` threads, whatever the number
    of clients, from ``_FairConnections``: each client address is answered
    at most ``rate`` times a second, one request at a time, round robin with
    the others. A thread per connection (``ThreadingMixIn``) let 32 scrapers
    run 32 Python threads against evaluation, about 650 scrapes a second."""

    handler_threads = 2
    backlog = 256
    rate = 10.0
    tls: Optional[ReloadingSSLContext] = None

    def server_activate(self):
        super().server_activate()
        self._connections = _FairConnections(self.backlog, self.rate)
        self._handlers = [threading.Thread(target=self._handle, name=f"metrics-http-{i}", daemon=True)
                          for i in range(self.handler_threads)]
        for thread in self._handlers:
            thread.start()

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake runs on a handler thread (at its first read), so a
        # slow or silent client never holds up accept().
        return self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request(self, request, client_address):
        if not self._connections.put((request, client_address), client_address[0]):
            self.shutdown_request(request)  # too many waiting: closed at once, nothing read

    def _handle(self) -> None:
        while (item := self._connections.get()) is not None:
            (request, client_address), address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one failed request never ends a handler thread
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._connections.done(address)

    def server_close(self):
        super().server_close()
        self.exposition.close()
        if hasattr(self, "_connections"):  # not when binding failed
            for request, _ in self._connections.close():
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        # A plain-HTTP client on a TLS port, or one that hangs up mid-handshake:
        # its request fails, and a traceback on stderr would say nothing more.
        logger.debug("metrics request from %s failed", client_address[0], exc_info=True)


def start_metrics_server(metrics: "Metrics | SupervisorMetrics", host: str, port: int, cache_seconds: float = 1.0, *,
                         tls: Optional[ReloadingSSLContext] = None,
                         basic_auth: Optional[BasicAuth] = None,
                         rate_per_address: float = 10.0) -> tuple[WSGIServer, int]:
    """Serves ``metrics.registry`` over HTTP on two handler threads, rendered
    at most once per ``cache_seconds`` (0 renders every scrape) on a thread of
    its own; one client address is answered at most ``rate_per_address``
    times a second (the rest wait their turn).

    ``port`` 0 picks a free port. With ``tls`` the port speaks HTTPS only,
    with the certificate ``tls`` holds for each new connection; with
    ``basic_auth`` every request needs credentials it accepts (else 401).
    Returns ``(server, bound_port)``; call ``server.shutdown()`` and then
    ``server.server_close()`` to stop it. The exposition app is
    ``server.exposition``.
    """
    exposition = _CachedExposition(metrics.registry, cache_seconds)
    app = _BasicAuthGate(exposition, basic_auth) if basic_auth is not None else exposition
    try:
        # The address family follows the host ("::" needs AF_INET6).
        family = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsHTTPServer", (_PooledWSGIServer,),
                            {"address_family": family, "tls": tls, "exposition": exposition,
                             "rate": rate_per_address})
        server = make_server(host.strip("[]"), port, app, server_class, handler_class=_QuietHandler)
    except socket.gaierror as error:
        raise OSError(error.errno, f"Could not serve metrics on {host}:{port} (LOSSD_METRICS_HOST, "
                                   f"LOSSD_METRICS_PORT): {error.strerror}") from error
    except OSError as error:
        raise OSError(error.errno, f"Could not serve metrics on {host}:{port} (LOSSD_METRICS_HOST, "
                                   f"LOSSD_METRICS_PORT): {error.strerror}") from error
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, server.server_port
