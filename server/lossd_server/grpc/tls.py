"""TLS on the gRPC port, with certificates that rotate without a restart.

gRPC asks ``CertificateReloader`` for a new configuration at every
handshake. It answers with one only when the certificate, key or client CA
file changed since the last load (or after ``reload()``, which ``lossd
serve`` calls on SIGHUP), so a rotated certificate (as Kubernetes mounts
them) serves new connections at once while open connections and streams
keep the one they started with. A pair that does not load (a half-written
file, a key that does not match) is logged and the previous one kept: the
reloading is ``security.reload.Reloader``, the one the metrics endpoint's
certificate uses too.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import grpc

from lossd_server.config import StartupError
from lossd_server.security.certificates import PAIR_ERRORS, load_pair, pair_error
from lossd_server.security.reload import Reloader


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
        self.cert, self.key = pathlib.Path(cert), pathlib.Path(key)
        self.client_ca = pathlib.Path(client_ca) if client_ca else None
        paths = [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])
        try:
            self._configuration = Reloader(paths, self._load, what="TLS certificate", errors=PAIR_ERRORS)
        except PAIR_ERRORS as exc:
            raise StartupError(pair_error("TLS certificate", self.cert, self.key, exc,
                                          "LOSSD_TLS_CERT/--tls-cert, LOSSD_TLS_KEY/--tls-key, "
                                          "LOSSD_TLS_CLIENT_CA/--tls-client-ca")) from exc
        self.initial = self._configuration.value

    @property
    def loads(self) -> int:
        """How many configurations were loaded (tests and logs read it)."""
        return self._configuration.loads

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that consult this reloader at every handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self, require_client_authentication=self.client_ca is not None)

    def reload(self) -> None:
        """Loads the files again at the next handshake, changed or not (SIGHUP)."""
        self._configuration.reload()

    def __call__(self) -> Optional[grpc.ServerCertificateConfiguration]:
        # gRPC's certificate_configuration_fetcher: None keeps the current one.
        return self._configuration.refresh()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        # Loaded by the ssl module first, which checks that the key belongs to
        # the certificate: gRPC would only find out at the next handshake, and fail it.
        load_pair(self.cert, self.key)
        client_ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=client_ca)
