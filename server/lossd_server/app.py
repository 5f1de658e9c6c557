"""Builds the server (``create_server``), starts and stops it (``Server``), and
runs it until a signal (``serve``): health and reflection always on, metrics
on their own port, and on SIGTERM/SIGINT a drain that load balancers can see
(health NOT_SERVING on an open port), then a grace period for in-flight calls."""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Any, Optional
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

import lossd_server
from lossd.addresses import loopback_host
from lossd.v1 import loss_service_pb2, shared_memory_service_pb2, training_service_pb2
from lossd_server.evaluation import backend
from lossd_server.config import Settings, StartupError
from lossd_server.errors import ResourceExhausted
from lossd_server.evaluation.admission import Admission, FairSlots
from lossd_server.evaluation.batching import Batcher
from lossd_server.evaluation.service import EvaluationService
from lossd_server.evaluation.evaluator import Evaluator
from lossd_server.evaluation.heavy import HeavyLane
from lossd_server.shared_memory import SharedMemoryRegions
from lossd_server.grpc.interceptors import ObservabilityInterceptor, StreamLimiter
from lossd_server.grpc.auth import AuthInterceptor, Callers
from lossd_server.grpc import parsing
from lossd_server.grpc.health_port import CheckOnlyHealth, Health
from lossd_server.grpc.tls import CertificateReloader
from lossd_server.losses import custom
from lossd_server.losses.cost import CostLimits
from lossd_server.losses.custom import full_registry
from lossd_server.losses.registry import LossRegistry
from lossd_server.observability import tracing as tracing_module
from lossd_server.observability.metrics import Metrics, start_metrics_server
from lossd_server.observability.tracing import Tracing
from lossd_server.security.basic_auth import BasicAuth
from lossd_server.security.certificates import ReloadingSSLContext
from lossd_server.security.reload import SecurityFileError
from lossd_server.ports import bind_errno, bind_failure
from lossd_server.supervisor import ProcessRole
from lossd_server.grpc import oip_servicer
from lossd_server.grpc.tracing import TracingInterceptor
from lossd_server.http.oip_rest import OipRestApp, start_oip_http
from lossd_server.grpc.loss_servicer import LossServicer, add_loss_service
from lossd_server.grpc.shm_servicer import add_shared_memory_service
from lossd_server.grpc.training_servicer import add_training_service
from lossd_server.training.manager import open_store
from lossd_server.state.follower import Follower

log = logging.getLogger(__name__)

# Losses that bench/xla.py measured at least ~1.3x faster under XLA at 1e7
# elements with gradient on this project's 2-core CPU machine, and no slower at
# 1e6 (figures in bench/RESULTS.md). The others (MSE, MAE, log-cosh, dice, ...)
# gained little or lost, and run as plain compiled graphs.
XLA_LOSSES = ("binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
              "categorical_focal_crossentropy", "categorical_hinge", "cosine_similarity", "huber",
              "kl_divergence", "sparse_categorical_crossentropy", "squared_hinge")

# Programs compiled before health turns SERVING (Settings.warmup): the
# regression and classification losses clients name most, float32, with and
# without gradient, for rank-1 values, one value per sample and ten classes
# (a program serves any batch size; see backend.signature_shape). Measured
# here: the first compilation in a process also pays TensorFlow's own start
# (about 0.8 s), and each program takes 20-130 ms, so a start takes 1-2 s more.
WARMUP = (("mean_squared_error", (2,)), ("mean_squared_error", (2, 1)), ("huber", (2, 1)),
          ("categorical_crossentropy", (2, 10)))

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
# The services lossd defines: health reports them, reflection lists them and
# metrics pre-initialise every one of their methods.
SERVICES = (
    loss_service_pb2.DESCRIPTOR.services_by_name["LossService"],
    training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    shared_memory_service_pb2.DESCRIPTOR.services_by_name["SharedMemoryService"],
    oip_servicer.SERVICE,
)
SERVICE_NAMES = [service.full_name for service in SERVICES]
SHARED_MEMORY_SERVICE = "lossd.v1.SharedMemoryService"  # offered only with settings.shm
# A health service name of its own for the persisted state: NOT_SERVING when
# something was moved to the quarantine at start. The server and its services
# stay SERVING (evaluation works), so probes on "" do not restart a pod for it.
STATE_HEALTH = "lossd.state"
# How often a drain begun by Ctrl-C looks whether calls are still in flight.
IDLE_POLL_SECONDS = 0.05


@dataclasses.dataclass
class Server:
    """A built server. Nothing listens or runs until ``start()``; ``stop()``
    ends whatever started."""

    grpc_server: grpc.Server
    executor: futures.ThreadPoolExecutor  # the gRPC server's handler threads
    health: health.HealthServicer
    evaluator: Evaluator
    metrics: Optional[Metrics]
    settings: Settings
    training: object = None  # the TrainingManager
    tls: Optional[CertificateReloader] = None  # with tls_cert set: the port's rotating certificate
    metrics_tls: Optional[ReloadingSSLContext] = None  # with metrics_tls_cert set
    metrics_auth: Optional[BasicAuth] = None  # with metrics_basic_auth_file set
    admission: Optional[Admission] = None  # what evaluations may run now (evaluation/admission.py)
    shared_memory: object = None  # the SharedMemoryServicer, with settings.shm
    callers: object = None  # grpc.auth.Callers: the tokens file, reloaded on change and on SIGHUP
    # The poller of a store shared with other replicas (store.Follower): one
    # query an interval tells the registered losses and the scheduler what
    # the others changed.
    follower: object = None
    services: list = dataclasses.field(default_factory=lambda: list(SERVICE_NAMES))  # offered: health reports them
    # What was moved to the quarantine at start (Quarantine.items); empty when healthy.
    quarantined: list = dataclasses.field(default_factory=list)
    # The bound ports, once started (metrics_port stays None with metrics off).
    port: Optional[int] = dataclasses.field(default=None, init=False)
    metrics_port: Optional[int] = dataclasses.field(default=None, init=False)
    health_port: Optional[int] = dataclasses.field(default=None, init=False)  # with settings.health_port
    health_server: Optional[grpc.Server] = None  # plain-text grpc.health.v1 only, with settings.health_port
    health_executor: Optional[futures.ThreadPoolExecutor] = None  # the health server's threads
    # The interceptor every call passes: it counts the calls in flight (drain).
    observer: Optional[ObservabilityInterceptor] = None
    # One of `lossd serve --processes N`'s processes (supervisor.py): it binds
    # its ports with SO_REUSEPORT and leaves /metrics to the supervisor.
    process: Optional[ProcessRole] = None
    oip_http: Optional[OipRestApp] = None  # the OIP REST app, with settings.http_port
    heavy: Optional[HeavyLane] = None  # the heavy lane's worker processes, with settings.heavy_workers
    tracing: Any = tracing_module.OFF  # observability.tracing: spans, when OTEL_* configures an exporter
    http_port: Optional[int] = dataclasses.field(default=None, init=False)  # its bound port, once started
    _oip_http_server: Optional[WSGIServer] = dataclasses.field(default=None, init=False)
    _metrics_http: Optional[WSGIServer] = dataclasses.field(default=None, init=False)
    _started: bool = dataclasses.field(default=False, init=False)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> None:
        """Serves metrics, binds and starts gRPC (and the health port), starts
        the training manager, compiles the common losses (``warmup``), then
        reports SERVING: until then health says NOT_SERVING on an open port,
        so a readiness probe sends no traffic to a replica still warming up.

        If a step fails, what already started is stopped again (no thread or
        port is left behind) and the error is raised.
        """
        if self._started:
            raise RuntimeError("The server was started already. Build a new one with create_server().")
        self._started = True
        try:
            if self.metrics is not None and self.process is None:
                self._start_metrics()
            self.port = self._bind(self.grpc_server, self.settings.port, "gRPC", "port",
                                   self.tls.credentials() if self.tls is not None else None)
            self.grpc_server.start()
            if self.health_server is not None:
                self.health_port = self._bind(self.health_server, self.settings.health_port, "health",
                                              "health_port")
                self.health_server.start()
            if self.oip_http is not None:
                self._start_oip_http()
            start_training = getattr(self.training, "start", None)
            if start_training is not None:
                start_training()
            if self.follower is not None:
                self.follower.start()
            if self.settings.warmup:
                self.evaluator.warm_up(WARMUP)
        except BaseException:
            self.stop(0)
            raise
        for name in [*self.services, ""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.health.set(STATE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING if self.quarantined
                        else health_pb2.HealthCheckResponse.SERVING)

    def _start_metrics(self) -> None:
        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            self._metrics_http, self.metrics_port = start_metrics_server(
                self.metrics, host, port, cache_seconds=self.settings.metrics_cache_seconds,
                tls=self.metrics_tls, basic_auth=self.metrics_auth,
                rate_per_address=self.settings.metrics_rate_per_address)
        except OSError as error:
            raise StartupError(bind_failure("metrics", host, port, error.errno, "metrics_host",
                                            "metrics_port")) from error

    def _start_oip_http(self) -> None:
        host, port = self.settings.host, self.settings.http_port
        tls = ReloadingSSLContext(self.settings.tls_cert, self.settings.tls_key) if self.tls is not None else None
        try:
            self._oip_http_server, self.http_port = start_oip_http(self.oip_http, host, port,
                                                                   threads=self.settings.workers, tls=tls)
        except OSError as error:
            raise StartupError(bind_failure("OIP REST", host, port, error.errno, "host", "http_port")) from error

    def _bind(self, server: grpc.Server, port: int, what: str, port_setting: str, credentials=None) -> int:
        """Binds ``server`` to ``port`` on ``host``; a StartupError naming
        ``port_setting`` when it cannot."""
        # gRPC holds a bound port until the server has started and stopped, so
        # start() binds only right before it starts the server.
        host = self.settings.host
        # A plain socket tries first: gRPC would log its own error line and
        # then say only "Failed to bind", not why.
        # Processes of one supervisor share the port, which it checked and holds.
        shared = self.process is not None and self.process.reuse_port
        code = bind_errno(host, port) if port and not shared else None
        if code in (errno.EADDRINUSE, errno.EACCES):
            raise StartupError(bind_failure(what, host, port, code, "host", port_setting))
        try:
            if credentials is not None:
                return server.add_secure_port(f"{host}:{port}", credentials)
            return server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as error:  # taken since the probe, or refused for a reason the probe missed
            raise StartupError(bind_failure(what, host, port, bind_errno(host, port), "host",
                                            port_setting)) from error

    def drain(self, seconds: float, interrupted: Optional[threading.Event] = None, until_idle: bool = False) -> None:
        """Health turns NOT_SERVING for every service while the port stays
        open and new calls are still served, for ``seconds`` (or until
        ``interrupted`` is set), so load balancers and Kubernetes probes see
        it and stop routing here before ``stop()`` closes the port.

        ``until_idle``: end as soon as no call is in flight, for a Ctrl-C at
        a terminal, where no load balancer routes and nothing would wait for
        the window but the user."""
        self.health.enter_graceful_shutdown()
        if seconds <= 0:
            return
        interrupted = interrupted or threading.Event()
        if not until_idle or self.observer is None:
            interrupted.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while self.observer.in_flight() and not interrupted.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            interrupted.wait(min(IDLE_POLL_SECONDS, left))

    def stop(self, grace: Optional[float] = None) -> None:
        """Stops: health turns NOT_SERVING (if ``drain()`` has not already
        turned it), new calls are refused, in-flight calls get ``grace``
        seconds to finish; then training and the metrics
        endpoint stop. Safe after a failed ``start()`` and when called twice."""
        grace = self.settings.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.shared_memory is not None:  # session streams would hold the grace; calls keep their mappings
            self.shared_memory.close()
        self.grpc_server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
            self.health_executor.shutdown(wait=False)
        if self.follower is not None:
            self.follower.stop()
        if self.training is not None:
            self.training.stop()
            self.training = None
        self.executor.shutdown(wait=False)  # grpc_server.stop() leaves its threads running
        self.evaluator.close()
        if self.heavy is not None:
            self.heavy.close()
        self.tracing.shutdown()  # exports the spans still buffered
        if tracing_module.current is self.tracing:
            tracing_module.current = tracing_module.OFF
        if self._oip_http_server is not None:
            self._oip_http_server.shutdown()
            self._oip_http_server.server_close()
            self._oip_http_server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()  # shutdown() alone leaves the port accepting
            self._metrics_http = None


def open_access_warning(settings: Settings, port: int) -> Optional[str]:
    """The warning a server without a tokens file logs at start, unless it
    binds only loopback (where only this machine's users reach it)."""
    if settings.tokens_file is not None or loopback_host(settings.host):
        return None
    return (f"no tokens file: any client that reaches {settings.host}:{port} may evaluate, train, register and "
            "delete (make tokens with `lossd tokens create` and set LOSSD_TOKENS_FILE)")


def create_server(settings: Optional[Settings] = None, *, registry: Optional[LossRegistry] = None,
                  metrics_registry: Optional[CollectorRegistry] = None,
                  process: Optional[ProcessRole] = None) -> Server:
    """Builds a server from settings; it binds and starts nothing (call
    ``start()`` on the result).

    Tests pass ``port=0``/``metrics_port=0`` and a fresh ``metrics_registry``;
    the bound ports are on the returned object once started. Without
    ``registry`` the server loads Keras's losses, lossd's built-in terms, the
    installed plugins and the losses registered in the data directory (and
    lets clients register more).

    ``process``: this server is one of ``lossd serve --processes N``'s
    (``supervisor``): it shares its ports and store with its siblings.
    """
    settings = settings or Settings()
    # Certificates are checked first: a bad one is a StartupError before anything is built.
    tls = (CertificateReloader(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
           if settings.tls_cert is not None else None)
    callers = Callers.from_file(settings.tokens_file) if settings.tokens_file is not None else Callers(None)
    metrics_tls = metrics_auth = None
    if settings.metrics_port is not None:
        try:
            if settings.metrics_tls_cert is not None:
                metrics_tls = ReloadingSSLContext(settings.metrics_tls_cert, settings.metrics_tls_key)
            if settings.metrics_basic_auth_file is not None:
                metrics_auth = BasicAuth(settings.metrics_basic_auth_file)
        except SecurityFileError as exc:
            raise StartupError(str(exc)) from exc
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    earlier = process.wait_for_store() if process is not None else []  # the first process opens it first
    state = open_store(settings)  # jobs, datasets and registered losses
    if process is not None and not process.runs_jobs:
        # The first process runs the jobs: this one queues them for it,
        # as a replica without job slots does on a shared database.
        state.shared = True
    store = None
    if registry is None:
        registry = full_registry(plugins=True)
        store = custom.ExpressionStore(state, registry, max_losses=settings.max_registered_losses)
        try:
            store.import_legacy(settings.data_dir)
        except ResourceExhausted as exc:  # the file stays; the next start imports it
            log.warning("could not import %s: %s", custom.LEGACY_FILE, exc.message)
        loaded = store.load()
        if loaded:
            log.info("loaded %d registered losses: %s", len(loaded), ", ".join(loaded))
    # Taken after the registered losses loaded: a bad losses.json or loss row
    # is quarantined there, and counts too.
    quarantined = list(state.quarantine.items) or earlier
    if process is not None:
        process.store_opened(quarantined)
    backend.configure_threads(settings.inter_op_threads or None)
    device = backend.select_device(settings.device)

    tracing = Tracing.from_environment()
    tracing_module.current = tracing
    metrics = None
    if settings.metrics_port is not None:
        # Registered losses are client input: they get label values of their
        # own only up to max_loss_labels (see Metrics.loss_label).
        fixed = [entry.name for entry in registry.entries() if entry.source != "expression"]
        versions = backend.versions()
        # With siblings, process and GC metrics are this process's alone,
        # which the supervisor's /metrics cannot read (metrics.py).
        metrics = Metrics(metrics_registry if metrics_registry is not None else CollectorRegistry(),
                          loss_names=fixed, version=lossd_server.__version__,
                          tensorflow_version=versions["tensorflow"], keras_version=versions["keras"],
                          process_metrics=process is None, max_registered_labels=settings.max_loss_labels)
        if tracing.enabled:  # before the RPC metrics are made: latency histograms link to traces
            metrics.exemplars_from(tracing.exemplar)
        metrics.set_device_info([(device.device_type, device.physical)])
        metrics.set_gpu_memory_source(backend.gpu_memory)
        metrics.set_quarantined_items(len(quarantined))
        metrics.known_callers(sorted({record.name for record in (callers.tokens or {}).values()})
                              if not callers.open else [""])
        for service in SERVICES:
            for method in service.methods:
                metrics.rpc_method(service.full_name, method.name, client_streaming=method.client_streaming,
                                   server_streaming=method.server_streaming)

    evaluator = Evaluator(registry, device, cache_size=settings.cache_size, metrics=metrics,
                          xla=settings.xla, xla_losses=XLA_LOSSES,
                          expression_compiler=custom.inline_entry,
                          max_broadcast_elements=settings.max_broadcast_elements,
                          max_composite_terms=settings.max_composite_terms,
                          max_program_nodes=settings.max_program_nodes, compile_workers=settings.compile_workers,
                          max_pending_compiles=settings.max_pending_compiles,
                          compile_timeout=settings.compile_timeout_seconds, cache_max_ops=settings.cache_max_ops,
                          cost_limits=CostLimits(settings.max_evaluation_cost, settings.max_evaluation_memory_bytes))

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # One port per server: without this a second server could bind the
        # same port. Only a supervisor's processes share theirs (it holds the
        # port against everyone else: supervisor.py).
        ("grpc.so_reuseport", int(process is not None and process.reuse_port)),
    ]
    # With tokens, evaluation and compile slots are shared fairly between
    # callers; without, there is one caller and no one to share with.
    fair = not callers.open
    admission = Admission(settings.max_inflight_bytes, settings.max_queued_requests, settings.max_queue_seconds,
                          evaluation_slots=settings.evaluation_slots if fair else None,
                          min_caller_slots=settings.min_caller_slots, max_caller_queued=settings.max_caller_queued,
                          metrics=metrics)
    if fair:
        evaluator.compile_slots = FairSlots(
            settings.max_pending_compiles, what="compile slots", setting="max_pending_compiles",
            reason="COMPILE_BUSY", min_share=settings.min_caller_slots,
            max_queued_per_caller=settings.max_caller_queued, max_wait_seconds=settings.max_queue_seconds,
            metrics=metrics)
    # Streams are capped at max_streams (StreamLimiter), so however many are
    # open, `workers` threads are left for unary calls and health checks.
    executor = futures.ThreadPoolExecutor(max_workers=settings.workers + settings.max_streams,
                                          thread_name_prefix="rpc")
    observer = ObservabilityInterceptor(metrics)  # Server.observer: the calls in flight, for the drain
    interceptors = [*([TracingInterceptor(tracing)] if tracing.enabled else []),  # first: the span holds the call
                    observer,
                    *([] if callers.open else [AuthInterceptor(callers, admission)]),
                    StreamLimiter(settings.max_streams, settings.stream_idle_seconds,
                                  per_caller=settings.max_streams_per_caller,
                                  unauthenticated=settings.max_unauthenticated_streams, open_server=callers.open)]
    server = grpc.server(executor, interceptors=interceptors, options=options)
    regions = (SharedMemoryRegions(max_regions=settings.shm_max_regions, max_bytes=settings.shm_max_bytes,
                                   max_total_bytes=settings.shm_max_total_bytes, metrics=metrics)
               if settings.shm else None)
    heavy = None
    if settings.heavy_workers:
        # A caller's waiters for the lane are bounded by its share of the
        # evaluation slots (each holds one) and by the lane's whole queue: a
        # tighter bound of its own would refuse them after their messages
        # were read, where waiting costs the server nothing.
        heavy = HeavyLane(
            evaluator, threshold=settings.heavy_evaluation_cost, processes=settings.heavy_workers,
            max_queued=settings.heavy_max_queued, max_caller_queued=max(1, settings.heavy_max_queued),
            min_caller_share=settings.min_caller_slots, queue_seconds=settings.heavy_queue_seconds,
            nice=settings.heavy_nice, metrics=metrics,
            worker_config={"device": settings.device, "inter_op_threads": settings.inter_op_threads,
                           "xla": settings.xla, "xla_losses": XLA_LOSSES,
                           "max_broadcast_elements": settings.max_broadcast_elements,
                           "max_composite_terms": settings.max_composite_terms,
                           "max_program_nodes": settings.max_program_nodes})
    evaluation = EvaluationService(
        evaluator, admission, max_elements=settings.max_tensor_elements, metrics=metrics, store=store, heavy=heavy,
        batcher=Batcher(evaluator, max_delay_us=settings.batch_max_delay_us, max_elements=settings.batch_max_elements,
                        max_requests=settings.batch_max_requests, metrics=metrics))
    add_loss_service(LossServicer(evaluation, callers=callers, store=store, shared_memory=regions), server)
    shared_memory = (add_shared_memory_service(server, regions, callers, idle_seconds=settings.stream_idle_seconds)
                     if regions is not None else None)
    training = add_training_service(server, settings, evaluator.planner, metrics, gpus=backend.gpu_count(),
                                    store=state, callers=callers, evaluator=evaluator)
    health_servicer = Health()

    def serving() -> bool:  # the Open Inference Protocol's readiness is health's
        check = health_servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        return check.status == health_pb2.HealthCheckResponse.SERVING

    oip_servicer.add_oip_service(oip_servicer.OipServicer(evaluation, ready=serving, callers=callers,
                                                          version=lossd_server.__version__, shared_memory=regions),
                                 server)
    services = [name for name in SERVICE_NAMES if shared_memory is not None or name != SHARED_MEMORY_SERVICE]
    for name in [*services, "", STATE_HEALTH]:  # until start() has started everything
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Health and reflection parse their requests inside the handler, as lossd's
    # services do: bytes that do not parse get INVALID_ARGUMENT, not grpcio's
    # INTERNAL "Exception deserializing request!" (found by bench/fuzz.py).
    parsing.add_tolerant(health_pb2_grpc.add_HealthServicer_to_server, health_servicer, HEALTH_SERVICE, server)
    follower = None
    if state.shared or process is not None:  # siblings register losses and queue jobs too
        follower = Follower(state, settings.shared_state_poll_seconds)
        if store is not None:
            follower.listen(store.follow)
        follower.listen(training.scheduler.heard)
    health_server = health_executor = None
    if settings.health_port is not None:
        # Kubernetes' native gRPC probes cannot speak TLS: this port answers
        # health in plain text, the same statuses, and nothing else.
        health_executor = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
        health_server = grpc.server(health_executor, options=[
            ("grpc.so_reuseport", int(process is not None and process.reuse_port))])
        parsing.add_tolerant(health_pb2_grpc.add_HealthServicer_to_server, CheckOnlyHealth(health_servicer),
                             HEALTH_SERVICE, health_server)
    # What reflection.enable_server_reflection does, parsing inside the handler.
    parsing.add_tolerant(reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                         reflection.ReflectionServicer([*services, HEALTH_SERVICE.full_name, reflection.SERVICE_NAME]),
                         reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], server)
    return Server(server, executor, health_servicer, evaluator, metrics, settings, training,
                  quarantined=quarantined, tls=tls, metrics_tls=metrics_tls,
                  metrics_auth=metrics_auth, admission=admission, shared_memory=shared_memory, services=services,
                  callers=callers,
                  health_server=health_server, health_executor=health_executor,
                  follower=follower, process=process, observer=observer,
                  tracing=tracing, heavy=heavy,
                  oip_http=OipRestApp(evaluation, ready=serving, callers=callers, tracing=tracing, metrics=metrics,
                                      admission=None if callers.open else admission,
                                      version=lossd_server.__version__, max_body_bytes=settings.max_message_bytes,
                                      shared_memory=regions)
                  if settings.http_port is not None and (process is None or process.index == 0) else None)


def serve(settings: Settings, process: Optional[ProcessRole] = None) -> int:
    """Runs the server until SIGTERM or SIGINT, then drains: health says
    NOT_SERVING on the open port for ``drain_seconds``, in-flight calls get
    ``grace_seconds``; returns the exit code. A second signal ends the drain early.

    ``process``: one of ``lossd serve --processes N``'s processes, which its
    supervisor drains with SIGTERM (another SIGTERM changes nothing: it may
    be a copy sent to the whole process group) and hurries with SIGUSR1;
    SIGINT is the supervisor's to answer.

    Raises ``StartupError`` when a setting keeps the server from starting.
    """
    server = create_server(settings, process=process)
    stop = threading.Event()
    hurry = threading.Event()
    first = []  # the signal that began the drain

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if process is not None and stop.is_set() and signum == signal.SIGTERM:
            return  # the supervisor's copy of a SIGTERM sent to the whole group (systemd does): one drain
        if stop.is_set() or signum == signal.SIGUSR1:  # SIGUSR1: the supervisor's second signal
            log.info("received %s again: ending the drain", name)
            hurry.set()
            return
        log.info("received %s: draining (health NOT_SERVING for %.1f s, then grace %.1f s)", name,
                 settings.drain_seconds, settings.grace_seconds)
        if signum == signal.SIGINT and settings.drain_seconds > 0:
            log.info("SIGINT: the drain ends as soon as no call is in flight")
        first.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGUSR1) if process is not None else (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    reloaders = [r for r in (server.tls, server.metrics_tls, server.callers) if r is not None]
    if reloaders or process is not None:  # SIGHUP: the certificates for new connections, the tokens for new calls
        signal.signal(signal.SIGHUP, lambda signum, frame: [r.reload() for r in reloaders])
    server.start()
    if process is not None:
        process.serving(server.port)
    warning = open_access_warning(settings, server.port)
    if warning and (process is None or process.index == 0):  # once per server, not once per process
        log.warning("%s", warning)
    log.info("lossd %s%s listening on %s:%d (gRPC)%s; metrics %s; evaluating on %s (%s); data dir %s",
             lossd_server.__version__, f" process {process.index}" if process is not None else "",
             settings.host, server.port,
             f", health on {settings.host}:{server.health_port} (plain text)" if server.health_port else "",
             f"on {'https' if server.metrics_tls else 'http'}://{settings.metrics_host}:{server.metrics_port}/metrics"
             f"{' (basic auth)' if server.metrics_auth else ''}" if server.metrics_port
             else "from the supervisor" if process is not None and settings.metrics_port is not None else "off",
             server.evaluator.device.name, server.evaluator.device.physical, settings.data_dir)
    stop.wait()
    # SIGINT is Ctrl-C at a terminal: no load balancer needs the window.
    # SIGTERM (an orchestrator's stop) keeps all of it, whatever is in flight.
    server.drain(settings.drain_seconds, hurry, until_idle=first[:1] == [signal.SIGINT])
    server.stop()
    log.info("stopped")
    # Interpreter shutdown would collect TensorFlow's and Keras's objects one
    # by one before the process ends (2.5 s here, after "stopped"), which an
    # orchestrator waiting for the exit sees as a slow stop. Frozen objects
    # are left to the operating system; finalizers and atexit still run.
    gc.freeze()
    return 0
