"""Real lossd servers for tests, in process: one factory for every suite."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def lossd_servers(tmp_path_factory, **defaults) -> Iterator:
    """Yields ``start(data_dir=None, **settings)``, which builds and starts a
    server on a free loopback port (metrics on a free port too) with its own
    data directory unless given, and returns the ``Server``. ``defaults``
    apply to every server; every server still running is stopped on exit."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []

    def start(data_dir=None, **overrides):
        settings = Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 0, **defaults,
                               "data_dir": data_dir or tmp_path_factory.mktemp("lossd-data"), **overrides})
        srv = create_server(settings, metrics_registry=CollectorRegistry())
        srv.start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.stop(0)
