"""Readiness for replicas (issue 15): health turns SERVING only after the
common losses are compiled (``warmup``), and a plain-text health port answers
Kubernetes' native gRPC probes, which cannot speak TLS, beside a TLS port."""
from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from tests.certificates import Authority

pytest.importorskip("tensorflow")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def build(tmp_path):
    """``build(**settings)``: a server built (not started) on free loopback
    ports with its own data directory; every one is stopped at the end."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []

    def make(**overrides):
        settings = Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": None, "grace_seconds": 0,
                               "data_dir": tmp_path / f"data{len(servers)}", **overrides})
        srv = create_server(settings, metrics_registry=CollectorRegistry())
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop(0)


def check(address: str, service: str = "", timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout).status


def test_health_turns_serving_only_after_the_common_losses_are_compiled(build):
    from lossd_server.app import WARMUP

    srv = build(warmup=True)
    starting = threading.Thread(target=srv.start, daemon=True)
    starting.start()
    deadline = time.monotonic() + 60
    while srv.port is None:  # bound; the server starts right after
        assert time.monotonic() < deadline and starting.is_alive()
        time.sleep(0.002)
    address = f"127.0.0.1:{srv.port}"
    while True:  # the first answer, as soon as the port accepts
        try:
            first = check(address, timeout=1)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error
            time.sleep(0.002)
    assert first == NOT_SERVING, "health said SERVING before the warm-up compiled anything"
    # Follow health until it turns SERVING: by then every warm-up program is compiled.
    seen = []
    with grpc.insecure_channel(address) as channel:
        for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
            seen.append((response.status, srv.evaluator.compilations))
            if response.status == SERVING:
                break
    starting.join(10)
    assert seen[-1] == (SERVING, 2 * len(WARMUP)), seen   # with and without gradient
    assert all(status == NOT_SERVING for status, _ in seen[:-1]), seen
    # The first requests of these losses, at other batch sizes, compile nothing.
    rng = np.random.default_rng(0)
    with lossd.Client(address, timeout=30) as client:
        for loss, shape in (("mse", (64,)), ("mse", (5, 1)), ("huber", (33, 1)),
                            ("categorical_crossentropy", (7, 10))):
            y_true, y_pred = (rng.random(shape, dtype=np.float32) for _ in range(2))
            for gradient in (False, True):
                assert np.isfinite(client.evaluate(loss, y_true, y_pred, gradient=gradient).loss)
    assert srv.evaluator.compilations == 2 * len(WARMUP)


def test_without_warmup_health_is_serving_at_once_and_nothing_is_compiled(build):
    srv = build(warmup=False)
    srv.start()
    assert check(f"127.0.0.1:{srv.port}") == SERVING
    assert srv.evaluator.compilations == 0


def test_the_health_port_answers_in_plain_text_beside_a_tls_port_with_the_same_statuses(build, tmp_path):
    from lossd_server.app import STATE_HEALTH

    ca = Authority(tmp_path, "ca")
    cert, key = ca.issue("localhost")
    srv = build(tls_cert=cert, tls_key=key, health_port=0, warmup=False)
    srv.start()
    assert srv.health_port not in (None, 0, srv.port)
    health = f"127.0.0.1:{srv.health_port}"
    for service in ("", "lossd.v1.LossService", STATE_HEALTH):
        assert check(health, service) == SERVING, service
    # The gRPC port itself refuses plain text, and the health port serves nothing but health.
    with pytest.raises(grpc.RpcError) as refused:
        check(f"127.0.0.1:{srv.port}", timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    y = np.zeros((2, 1), np.float32)
    with lossd.Client(health, timeout=5) as client, pytest.raises(lossd.LossdError) as error:
        client.evaluate("mse", y, y)
    assert error.value.code == grpc.StatusCode.UNIMPLEMENTED
    # Check only: a Watch stream would hold one of the port's two threads for as long as it liked.
    with grpc.insecure_channel(health) as channel, pytest.raises(grpc.RpcError) as watch:
        next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5))
    assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # A drain turns it NOT_SERVING too: a readiness probe on it stops traffic.
    srv.drain(0)
    assert check(health) == NOT_SERVING


def test_a_health_port_in_use_is_a_startup_error_naming_the_setting(build):
    from lossd_server.config import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        srv = build(health_port=taken.getsockname()[1], warmup=False)
        with pytest.raises(StartupError, match="LOSSD_HEALTH_PORT"):
            srv.start()
