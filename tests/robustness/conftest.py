"""Fixtures for the robustness suite: real servers with small limits."""

from __future__ import annotations

import pytest
from tests.servers import lossd_servers


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """``start_server(**settings)``: a real server on a free loopback port with
    its own data directory and these settings; returns its address. Every
    server started is stopped at the end of the module."""
    with lossd_servers(tmp_path_factory) as start:
        yield lambda **settings: start(**settings).address
