"""Which gRPC targets and hosts name this machine.

Public because both sides ask the same question: the client takes the
shared-memory path only to a server on this host, and the server warns at
start about an open (token-less) port unless it binds only loopback.
"""

from __future__ import annotations

import ipaddress


def is_local(target: str) -> bool:
    """Whether a gRPC target names this host: a unix socket, ``localhost``
    or one loopback address."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if "," in target or "/" in target:
        return False
    return loopback_host(target.rpartition(":")[0] if (target.count(":") == 1 or target.startswith("["))
                         else target)


def loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without
    brackets) is ``localhost`` or a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return (mapped or address).is_loopback
