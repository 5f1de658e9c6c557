"""Fixtures for the robustness suite: real servers with small limits."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """``start_server(**settings)``: a real server on a free loopback port with
    its own data directory and these settings; returns its address. Every
    server started is stopped at the end of the module."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []

    def start(**overrides) -> str:
        settings = Settings(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0,
                            data_dir=tmp_path_factory.mktemp("robustness-data"), **overrides)
        srv = create_server(settings, metrics_registry=CollectorRegistry())
        srv.start()
        servers.append(srv)
        return f"127.0.0.1:{srv.port}"

    yield start
    for srv in servers:
        srv.stop(0)
