"""Certificate and key pairs that rotate without a restart.

``load_pair`` reads a certificate chain and its key into a server-side
``ssl.SSLContext``; the ssl module checks there that the key belongs to the
certificate, so a mismatched pair fails when it is loaded, not at the next
handshake. The gRPC port (``lossd_server.grpc.tls``) loads its pair with it
too, before handing the bytes to gRPC.

``ReloadingSSLContext`` gives each new connection of the metrics endpoint a
context for the pair on disk, loaded anew (``security.reload.Reloader``)
when a file changes or after ``reload()`` (SIGHUP): a pair that does not
load is logged and the previous one kept.
"""

from __future__ import annotations

import pathlib
import ssl

from lossd_server.security.reload import Reloader, SecurityFileError

# What a pair that cannot be loaded raises: a missing file, a bad PEM, a key of another certificate.
PAIR_ERRORS = (OSError, ssl.SSLError, ValueError)


def load_pair(cert: pathlib.Path, key: pathlib.Path) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) for the certificate chain
    ``cert`` and its private key ``key``.

    Raises:
        OSError, ssl.SSLError: a file is missing or unreadable, or the key
            does not belong to the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def pair_error(what: str, cert: pathlib.Path, key: pathlib.Path, exc: BaseException, settings: str) -> str:
    """The message for a pair that does not load at start: the files (by
    name), the cause and the ``settings`` that choose them."""
    return (f"cannot load the {what} {pathlib.Path(cert).name} and key {pathlib.Path(key).name}: "
            f"{getattr(exc, 'strerror', None) or exc} (set {settings})")


class ReloadingSSLContext:
    """A server-side ``SSLContext`` for ``cert``/``key``, built anew when
    either file changes (checked at each ``context()``) or after ``reload()``.

    Raises:
        SecurityFileError: the pair does not load at construction.
    """

    def __init__(self, cert: pathlib.Path, key: pathlib.Path):
        self.cert, self.key = pathlib.Path(cert), pathlib.Path(key)
        try:
            self._pair = Reloader((self.cert, self.key), lambda: load_pair(self.cert, self.key),
                                  what="metrics TLS certificate", errors=PAIR_ERRORS)
        except PAIR_ERRORS as exc:
            raise SecurityFileError(pair_error(
                "metrics TLS certificate", self.cert, self.key, exc,
                "LOSSD_METRICS_TLS_CERT/--metrics-tls-cert and LOSSD_METRICS_TLS_KEY/--metrics-tls-key")) from exc

    @property
    def loads(self) -> int:
        """How many contexts were built (tests read it)."""
        return self._pair.loads

    def reload(self) -> None:
        """Loads the files again for the next connection, changed or not."""
        self._pair.reload()

    def context(self) -> ssl.SSLContext:
        """The context for a new connection."""
        return self._pair.current()
