"""grpc.health.v1 as lossd serves it: the main port's servicer (``Health``)
and the plain-text health port's (``CheckOnlyHealth``, ``Settings.health_port``)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Health(health.HealthServicer):
    """grpcio's health servicer with ``List``, the newest method of
    grpc.health.v1, which grpcio's leaves to the generated base class: that
    answers UNIMPLEMENTED by raising, and grpcio logs a traceback for each
    call, which any caller (health needs no token) could repeat without end
    (bench/fuzz.py: 788 tracebacks in 20 minutes)."""

    def List(self, request, context):
        # grpcio keeps the statuses in these two attributes (it has no public reader).
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()})


class CheckOnlyHealth(health_pb2_grpc.HealthServicer):
    """Answers ``Check`` and ``List`` from the server's own health servicer,
    so both ports report the same statuses. ``Watch`` is UNIMPLEMENTED (without
    the generated method's traceback in the log): the port has two threads, and
    a Watch stream would hold one for as long as its client liked, where the
    kubelet's probes only call Check."""

    def __init__(self, servicer: Health):
        self._servicer = servicer

    def Check(self, request, context):
        return self._servicer.Check(request, context)

    def List(self, request, context):
        return self._servicer.List(request, context)

    def Watch(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "The health port answers Check and List only; Watch on the "
                                                     "main port.")
