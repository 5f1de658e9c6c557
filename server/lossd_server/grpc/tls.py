"""TLS on the gRPC port, with certificates that rotate without a restart.

gRPC asks ``CertificateReloader`` for a new configuration at every
handshake. It answers with one only when the certificate, key or client CA
file changed since the last load (or after ``reload()``, which ``lossd
serve`` calls on SIGHUP), so a rotated certificate (as Kubernetes mounts
them) serves new connections at once while open connections and streams
keep the one they started with. A pair that does not load (a half-written
file, a key that does not match) is logged and the previous one kept.
"""

from __future__ import annotations

import logging
import pathlib
import ssl
import threading
from typing import Optional

import grpc

from lossd_server.config import StartupError
from lossd_server.security.reload import FileWatch

log = logging.getLogger(__name__)


class CertificateReloader:
    """Server credentials whose certificate and key are re-read when their
    files change.

    Args:
        cert: PEM certificate chain of the server.
        key: PEM private key of that certificate.
        client_ca: PEM CA certificates; when set, clients must present a
            certificate signed by one of them (mTLS), or the handshake fails.

    Raises:
        StartupError: a file is missing or the pair does not load.
    """

    def __init__(self, cert: pathlib.Path, key: pathlib.Path, client_ca: Optional[pathlib.Path] = None):
        self.cert, self.key, self.client_ca = pathlib.Path(cert), pathlib.Path(key), client_ca
        self._lock = threading.Lock()
        try:
            self._watch = FileWatch(self._paths())
            self.initial = self._configuration()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise StartupError(f"cannot load the TLS certificate {self.cert.name} and key {self.key.name}: "
                               f"{getattr(exc, 'strerror', None) or exc} (set LOSSD_TLS_CERT/--tls-cert, "
                               "LOSSD_TLS_KEY/--tls-key, LOSSD_TLS_CLIENT_CA/--tls-client-ca)") from exc
        self.loads = 1  # how many configurations were loaded (tests and logs read it)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that consult this reloader at every handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self, require_client_authentication=self.client_ca is not None)

    def reload(self) -> None:
        """Loads the files again at the next handshake, changed or not (SIGHUP)."""
        self._watch.force()

    def __call__(self) -> Optional[grpc.ServerCertificateConfiguration]:
        # gRPC's certificate_configuration_fetcher: None keeps the current one.
        with self._lock:
            if not self._watch.changed():  # unchanged, or a file is being replaced: keep what works
                return None
            try:
                configuration = self._configuration()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("TLS certificate not reloaded, the previous one stays: %s", exc)
                return None  # not retried until the files change again
            self.loads += 1
            log.info("TLS certificate %s reloaded", self.cert.name)
            return configuration

    def _paths(self) -> list[pathlib.Path]:
        return [self.cert, self.key] + ([pathlib.Path(self.client_ca)] if self.client_ca else [])

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        # The ssl module checks that the key belongs to the certificate: gRPC
        # would only find out at the next handshake, and fail it.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        client_ca = pathlib.Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=client_ca)
