"""Ports: why one cannot be bound, said in one line that names the setting
to change. Imports neither gRPC nor TensorFlow, so ``lossd serve`` refuses a
port in use before anything heavy loads (``supervisor``), and ``app`` binds
with the same words."""

from __future__ import annotations

import errno
import os
import socket
from typing import Optional


def bind_errno(host: str, port: int) -> Optional[int]:
    """Why ``host:port`` cannot be bound, as an errno (None if it can be now)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.errno
    return None


def bind_failure(what: str, host: str, port: int, code: Optional[int], host_setting: str,
                 port_setting: str) -> str:
    """One line naming the port and the setting to change."""
    def flags(name: str) -> str:
        return f"LOSSD_{name.upper()} or --{name.replace('_', '-')}"

    if code == errno.EADDRINUSE:
        return f"{what} port {port} is in use on {host} (set {flags(port_setting)})"
    if code == errno.EACCES:
        return f"{what} port {port} needs privileges to bind (set {flags(port_setting)} to 1024 or above)"
    reason = os.strerror(code) if code else "the address cannot be bound"
    return f"cannot serve {what} on {host}:{port}: {reason} (set {flags(host_setting)}, {flags(port_setting)})"
