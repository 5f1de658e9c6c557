"""Builds the gRPC server (``create_server``) and runs it until a signal
(``serve``): health and reflection always on, metrics on their own port,
graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

import lossd_server
from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc
from lossd_server.evaluation import backend
from lossd_server.config import Settings
from lossd_server.evaluation.evaluator import Evaluator
from lossd_server.grpc.interceptors import ObservabilityInterceptor
from lossd_server.losses import custom
from lossd_server.losses.custom import full_registry
from lossd_server.losses.registry import LossRegistry
from lossd_server.observability.metrics import Metrics, start_metrics_server
from lossd_server.grpc.loss_servicer import LossServicer
from lossd_server.grpc.training_servicer import SERVICE_NAME as TRAINING_SERVICE_NAME
from lossd_server.grpc.training_servicer import add_training_service

log = logging.getLogger(__name__)

# Losses that bench/xla.py measured at least ~1.3x faster under XLA at 1e7
# elements with gradient on this project's 2-core CPU machine, and no slower at
# 1e6 (figures in bench/RESULTS.md). The others (MSE, MAE, log-cosh, dice, ...)
# gained little or lost, and run as plain compiled graphs.
XLA_LOSSES = ("binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
              "categorical_focal_crossentropy", "categorical_hinge", "cosine_similarity", "huber",
              "kl_divergence", "sparse_categorical_crossentropy", "squared_hinge")

SERVICE_NAMES = [
    loss_service_pb2.DESCRIPTOR.services_by_name["LossService"].full_name,
    TRAINING_SERVICE_NAME,
]


@dataclasses.dataclass
class Server:
    """A built server: call ``start()``, later ``stop(grace)``."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    evaluator: Evaluator
    metrics: Optional[Metrics]
    metrics_port: Optional[int]
    settings: Settings
    _metrics_http: object = None
    training: object = None  # the TrainingManager

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> None:
        self.grpc_server.start()
        if self.training is not None:
            self.training.start()
        for name in [*SERVICE_NAMES, ""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: Optional[float] = None) -> None:
        """Drains: health turns NOT_SERVING, new calls are refused, in-flight
        calls get ``grace`` seconds to finish."""
        grace = self.settings.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if self.training is not None:
            self.training.stop()
            self.training = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()  # shutdown() alone leaves the port accepting
            self._metrics_http = None


def create_server(settings: Optional[Settings] = None, *, registry: Optional[LossRegistry] = None,
                  metrics_registry: Optional[CollectorRegistry] = None) -> Server:
    """Builds (but does not start) a server from settings.

    Tests pass ``port=0`` and a fresh ``metrics_registry``; the bound ports
    are on the returned object. Without ``registry`` the server loads Keras's
    losses, lossd's built-in terms, the installed plugins and the losses
    registered in the data directory (and lets clients register more).
    """
    settings = settings or Settings()
    store = None
    if registry is None:
        registry = full_registry(plugins=True)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = custom.ExpressionStore(settings.data_dir, registry)
        loaded = store.load()
        if loaded:
            log.info("loaded %d registered losses: %s", len(loaded), ", ".join(loaded))
    backend.configure_threads(settings.inter_op_threads or None)
    device = backend.select_device(settings.device)

    metrics = None
    metrics_http, metrics_port = None, None
    if settings.metrics_port is not None:
        metrics = Metrics(metrics_registry if metrics_registry is not None else CollectorRegistry(),
                          loss_names=registry.names(), version=lossd_server.__version__)
        versions = backend.versions()
        metrics.set_build_info(lossd_server.__version__, versions["tensorflow"], versions["keras"])
        metrics.set_device_info([(device.device_type, device.physical)])
        metrics.set_gpu_memory_source(backend.gpu_memory)

    evaluator = Evaluator(registry, device, cache_size=settings.cache_size, metrics=metrics,
                          jit_compile=settings.jit_compile, xla_losses=XLA_LOSSES,
                          expression_compiler=custom.inline_entry)

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # One port per server: without this a second server could bind the same port.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
                         interceptors=[ObservabilityInterceptor(metrics)], options=options)
    loss_service_pb2_grpc.add_LossServiceServicer_to_server(
        LossServicer(evaluator, max_elements=settings.max_tensor_elements, metrics=metrics, store=store), server)
    training = add_training_service(server, settings, evaluator.planner, metrics, gpus=backend.gpu_count())
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
    if metrics is not None:
        for method in loss_service_pb2.DESCRIPTOR.services_by_name["LossService"].methods:
            kind = {(False, False): "unary", (True, True): "bidi_stream"}.get(
                (method.client_streaming, method.server_streaming), "bidi_stream")
            metrics.init_rpc_method(kind, SERVICE_NAMES[0], method.name)
        metrics_http, metrics_port = start_metrics_server(metrics, settings.metrics_host, settings.metrics_port)
    return Server(server, port, health_servicer, evaluator, metrics, metrics_port, settings, metrics_http, training)


def serve(settings: Settings) -> int:
    """Runs the server until SIGTERM or SIGINT, then drains; returns the exit code."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = create_server(settings)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: draining (grace %.1f s)", signal.Signals(signum).name, settings.grace_seconds)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.start()
    log.info("lossd %s listening on %s:%d (gRPC); metrics %s; evaluating on %s (%s); data dir %s",
             lossd_server.__version__, settings.host, server.port,
             f"on http://{settings.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else "off",
             server.evaluator.device.name, server.evaluator.device.physical, settings.data_dir)
    stop.wait()
    server.stop()
    log.info("stopped")
    return 0
