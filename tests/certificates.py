"""A certificate authority made at run time, for the tests of TLS on the gRPC
port, on the metrics port and in the deployment: tests import it as
``certificates`` (pytest puts ``tests/`` on the path for its conftest)."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def _alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Authority:
    """A CA that signs server and client certificates into PEM files."""

    def __init__(self, folder: pathlib.Path, name: str):
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - datetime.timedelta(days=1))
                     .not_valid_after(NOW + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = folder / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, expired: bool = False, client: bool = False,
              hosts: Iterable[str] = ("127.0.0.1",),
              cert_path: pathlib.Path | None = None, key_path: pathlib.Path | None = None):
        """Writes a certificate and key for ``hosts`` (IP addresses or DNS
        names; none for a client); returns their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = NOW - datetime.timedelta(days=10 if expired else 1)
        end = NOW - datetime.timedelta(days=2) if expired else NOW + datetime.timedelta(days=10)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end))
        if not client:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alternative_name(h) for h in hosts]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = cert_path or self.folder / f"{common_name}.crt"
        key_path = key_path or self.folder / f"{common_name}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path
