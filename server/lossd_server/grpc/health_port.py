"""The plain-text health port's servicer (``Settings.health_port``)."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2_grpc


class CheckOnlyHealth(health_pb2_grpc.HealthServicer):
    """Answers ``Check`` from the server's own health servicer, so both ports
    report the same statuses. ``Watch`` and ``List`` keep the generated
    UNIMPLEMENTED answers: the port has two threads, and a Watch stream would
    hold one for as long as its client liked, where the kubelet's probes only
    call Check."""

    def __init__(self, servicer: health.HealthServicer):
        self._servicer = servicer

    def Check(self, request, context):
        return self._servicer.Check(request, context)
