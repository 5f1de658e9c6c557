"""Issue 23: request bytes that do not parse are INVALID_ARGUMENT from the
handler (``grpc/parsing.py``), on every method of every lossd service, and
of health and reflection (bench/fuzz.py found grpcio's INTERNAL there), not
grpcio's INTERNAL "Exception deserializing request!". Sent as raw bytes
through a real channel to a real server; the methods are read from the
services' descriptors, so a method added later is covered too."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.grpc_errors import reason_of
from tests.servers import lossd_servers

from lossd.v1 import loss_service_pb2, monitor_service_pb2, shared_memory_service_pb2, training_service_pb2
from lossd_server.grpc import oip_servicer

SERVICES = [loss_service_pb2.DESCRIPTOR.services_by_name["LossService"],
            training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
            shared_memory_service_pb2.DESCRIPTOR.services_by_name["SharedMemoryService"],
            monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"],
            oip_servicer.SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
METHODS = [(service, method) for service in SERVICES for method in service.methods]
# Bytes no protobuf message parses: a field key whose varint never ends, a
# length past the end, and a key with the reserved wire type 7.
GARBAGE = [b"\xff" * 11, b"\x0a\x7f\x01", b"\x0f"]


@pytest.fixture(scope="module")
def channel(start_server):
    with grpc.insecure_channel(start_server(shm=True)) as channel:
        yield channel


def call_raw(channel: grpc.Channel, service, method, raw: bytes):
    """Calls ``method`` with ``raw`` as its (first) request message; returns what it answered."""
    path = f"/{service.full_name}/{method.name}"
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path)(iter([raw]), timeout=30))
    if method.client_streaming:
        return channel.stream_unary(path)(iter([raw]), timeout=30)
    if method.server_streaming:
        return list(channel.unary_stream(path)(raw, timeout=30))
    return channel.unary_unary(path)(raw, timeout=30)


def test_every_method_is_covered():
    assert len(METHODS) >= 26, [m.full_name for _, m in METHODS]


@pytest.mark.parametrize("raw", GARBAGE, ids=["endless-varint", "length-past-end", "wire-type-7"])
@pytest.mark.parametrize("service, method", METHODS, ids=[m.full_name for _, m in METHODS])
def test_undecodable_bytes_are_invalid_argument(channel, service, method, raw):
    if method.name == "EvaluateStream":
        # Per-item failures travel in the stream's answers, and the stream
        # goes on (loss_servicer.receive_stream_item): the item's answer
        # carries the INVALID_ARGUMENT.
        answers = [loss_service_pb2.EvaluateStreamResponse.FromString(a) for a in call_raw(channel, service, method, raw)]
        assert len(answers) == 1 and answers[0].HasField("error") and not answers[0].HasField("response"), answers
        assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answers[0].error
        assert "deserializing" not in answers[0].error.message
        return
    with pytest.raises(grpc.RpcError) as err:
        call_raw(channel, service, method, raw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    assert "deserializing" not in err.value.details()
    if method.name != "Evaluate":  # Evaluate parses with the tensor codec, which names the field at fault
        assert reason_of(err.value) == "BAD_REQUEST"
        assert f"not a valid {method.input_type.name} message" in err.value.details()


def test_a_good_request_still_works(channel):
    answer = channel.unary_unary("/lossd.v1.LossService/ListLosses")(
        loss_service_pb2.ListLossesRequest().SerializeToString(), timeout=30)
    assert loss_service_pb2.ListLossesResponse.FromString(answer).losses
    health = channel.unary_unary("/grpc.health.v1.Health/Check")(
        health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=30)
    assert health_pb2.HealthCheckResponse.FromString(health).status == health_pb2.HealthCheckResponse.SERVING
    listed = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
        iter([reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()]), timeout=30)
    names = {s.name for a in listed for s in reflection_pb2.ServerReflectionResponse.FromString(a)
             .list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names, names


def test_health_list_answers_every_status_without_a_traceback(channel, caplog):
    """bench/fuzz.py: grpcio's health servicer left List to the generated
    base class, which answered UNIMPLEMENTED by raising: a traceback in the
    log for each call, which any caller (health needs no token) could repeat."""
    with caplog.at_level("ERROR", logger="grpc._server"):
        answer = health_pb2.HealthListResponse.FromString(channel.unary_unary("/grpc.health.v1.Health/List")(
            health_pb2.HealthListRequest().SerializeToString(), timeout=30))
    assert answer.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    assert answer.statuses["lossd.v1.LossService"].status == health_pb2.HealthCheckResponse.SERVING
    assert not [r for r in caplog.records if r.name == "grpc._server"], caplog.text


def test_the_plain_health_port_refuses_undecodable_bytes(tmp_path_factory):
    """The plain-text health port (``health_port``, for Kubernetes probes)
    parses in the handler too, answers List, and refuses Watch."""
    with lossd_servers(tmp_path_factory) as start:
        server = start(health_port=0)
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.RpcError) as err:
                check(GARBAGE[0], timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
            assert reason_of(err.value) == "BAD_REQUEST"
            answer = health_pb2.HealthCheckResponse.FromString(
                check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=30))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            listed = health_pb2.HealthListResponse.FromString(channel.unary_unary("/grpc.health.v1.Health/List")(
                health_pb2.HealthListRequest().SerializeToString(), timeout=30))
            assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as watch:
                list(channel.unary_stream("/grpc.health.v1.Health/Watch")(
                    health_pb2.HealthCheckRequest().SerializeToString(), timeout=30))
            assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
