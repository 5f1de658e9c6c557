"""Client channel options (issue 13): options pass through to gRPC, and
several addresses spread calls over replicas (round_robin), checked on two
real servers' own counters."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

import lossd
from lossd._client import channel_target

pytest.importorskip("tensorflow")

Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)


def handled(srv) -> float:
    return srv.metrics.registry.get_sample_value(
        "grpc_server_handled_total", {"grpc_service": "lossd.v1.LossService", "grpc_method": "Evaluate",
                                      "grpc_type": "unary", "grpc_code": "OK"}) or 0.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []
    try:
        for _ in range(2):
            srv = create_server(Settings(host="127.0.0.1", port=0, metrics_port=0, metrics_cache_seconds=0,
                                         grace_seconds=0, data_dir=tmp_path_factory.mktemp("replica")),
                                metrics_registry=CollectorRegistry())
            srv.start()
            servers.append(srv)
        yield servers
    finally:
        for srv in servers:
            srv.stop(0)


def test_several_addresses_spread_calls_over_every_replica(replicas):
    before = [handled(srv) for srv in replicas]
    with lossd.Client([f"127.0.0.1:{srv.port}" for srv in replicas], timeout=60) as client:
        for _ in range(20):
            assert client.evaluate("mse", Y, Y[::-1]).loss > 0
    served = [handled(srv) - b for srv, b in zip(replicas, before)]
    assert sum(served) == 20 and min(served) >= 5, served


def test_options_pass_through_and_win_over_lossds_own(replicas):
    # A retry policy as a service config: gRPC rejects a malformed one when
    # the channel connects, so a typo in it would fail this call.
    config = {"methodConfig": [{"name": [{"service": "lossd.v1.LossService"}],
                                "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}
    address = f"127.0.0.1:{replicas[0].port}"
    with lossd.Client(address, timeout=60, options=[("grpc.service_config", json.dumps(config))]) as client:
        assert client.evaluate("mse", Y, Y[::-1]).loss > 0
    # The caller's receive limit overrides lossd's: an answer larger than 1 KiB (a 16 KiB gradient) is refused.
    with lossd.Client(address, timeout=60, options=[("grpc.max_receive_message_length", 1024)]) as client:
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate("mse", np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32), gradient=True)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_addresses_that_cannot_share_a_channel_are_refused_before_connecting():
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"], 100, None)[0] == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["[::1]:1", "[::1]:2"], 100, None)[0] == "ipv6:[::1]:1,[::1]:2"
    for bad, says in ((["lossd-a:1", "lossd-b:1"], "IP literals"), (["10.0.0.1:1", "[::1]:2"], "one IP family"),
                      (["10.0.0.1", "10.0.0.2:1"], "host:port")):
        with pytest.raises(lossd.LossdError, match=says):
            lossd.Client(bad)
