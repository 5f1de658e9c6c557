"""A client pointed at the wrong place says where it tried and what to check:
a closed port (no server), and lossd's own metrics port (HTTP, not gRPC);
tests/server/grpc/test_tls.py checks the TLS mismatches.
Both clients, sync and asyncio, over real sockets."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import lossd
import lossd.aio
from test_cli import dead_address as closed_address


@pytest.fixture(scope="module")
def metrics_address(server) -> str:
    assert server.metrics_port, "the test server serves metrics"
    return f"127.0.0.1:{server.metrics_port}"


def sync_failure(address: str, call: str) -> lossd.LossdError:
    with lossd.Client(address, timeout=10) as client:
        with pytest.raises(lossd.LossdError) as caught:
            if call == "losses":
                client.losses()
            elif call == "evaluate":
                client.evaluate("mse", np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
            elif call == "list_jobs":
                client.list_jobs()
            elif call == "evaluate_many":
                list(client.evaluate_many([{"loss": "mse", "y_true": np.zeros(3, np.float32),
                                            "y_pred": np.ones(3, np.float32)}]))
    return caught.value


def async_failure(address: str, call: str) -> lossd.LossdError:
    async def main():
        async with lossd.aio.Client(address, timeout=10) as client:
            with pytest.raises(lossd.LossdError) as caught:
                if call == "losses":
                    await client.losses()
                elif call == "evaluate":
                    await client.evaluate("mse", np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
                elif call == "list_jobs":
                    await client.list_jobs()
                elif call == "evaluate_many":
                    async for _ in client.evaluate_many([{"loss": "mse", "y_true": np.zeros(3, np.float32),
                                                          "y_pred": np.ones(3, np.float32)}]):
                        pass
            return caught.value
    return asyncio.run(main())


FAILURES = {"sync": sync_failure, "aio": async_failure}


@pytest.mark.parametrize("flavour", FAILURES)
@pytest.mark.parametrize("call", ["losses", "evaluate", "list_jobs", "evaluate_many"])
def test_no_server_names_the_address(flavour, call):
    address = closed_address()
    error = FAILURES[flavour](address, call)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == ""
    assert f"Nothing listens at {address} (connection refused). Expected `lossd serve` running there" \
        in error.message, error.message
    assert "Connection refused" in error.message, "gRPC's own words stay, after the hint"
    assert address in str(error)


@pytest.mark.parametrize("flavour", FAILURES)
def test_the_metrics_port_is_http_not_grpc(flavour, metrics_address):
    error = FAILURES[flavour](metrics_address, "losses")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.message.startswith(f"{metrics_address} answers in HTTP/1, not gRPC: it is probably the "
                                    "metrics port."), error.message
    assert "gRPC port" in error.message and "50051" in error.message
    assert "is `lossd serve` running" not in error.message


def test_a_plain_http_server_is_named_too():
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{httpd.server_address[1]}"
        error = sync_failure(address, "losses")
        assert error.message.startswith(f"{address} answers in HTTP/1, not gRPC"), error.message
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_working_server_is_unaffected(address):
    with lossd.Client(address, timeout=30) as client:
        assert any(info.name == "huber" for info in client.losses())
