"""The secrets folder of a deployment, made in one step (``lossd secrets init``).

``init_secrets(folder, hosts)`` writes every file compose mounts from
``deploy/secrets`` (``deploy/compose.yaml``, top-level ``secrets:``):

- ``ca.pem`` / ``ca.key``: a CA made here, which clients trust. Its key stays
  in the folder (mode 0600); no container mounts it.
- ``server.pem`` / ``server.key``: the server's certificate, signed by that
  CA, for ``lossd`` (Prometheus scrapes ``lossd:9464``), ``localhost`` (the
  health check) and the names clients use (``hosts``).
- ``metrics-users`` / ``metrics-password``: the ``prometheus`` user of the
  metrics endpoint's basic auth, and its password for Prometheus.
- ``tokens.jsonl``: empty; ``lossd tokens create`` appends a token per person
  (it keeps the file's mode).

The folder gets mode 0700, which keeps the host's other users out; the files
mounted into the containers get 0644, because compose bind-mounts them as
they are and the containers' users (lossd's uid 10001, Prometheus's
``nobody``) must read them. Nothing existing is overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from dataclasses import dataclass
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lossd_server.security.basic_auth import create_user

# File name -> mode. The names are the ones deploy/compose.yaml mounts (and
# ca.key, which it must not).
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
METRICS_USERS, METRICS_PASSWORD = "metrics-users", "metrics-password"
TOKENS = "tokens.jsonl"
MODES = {CA_CERT: 0o644, CA_KEY: 0o600, SERVER_CERT: 0o644, SERVER_KEY: 0o644,
         METRICS_USERS: 0o644, METRICS_PASSWORD: 0o644, TOKENS: 0o644}
FOLDER_MODE = 0o700

# The names every deployment's certificate holds: "lossd" is the compose
# service Prometheus scrapes, "localhost" the health check's address.
DEFAULT_HOSTS = ("lossd", "localhost")
METRICS_USER = "prometheus"  # deploy/prometheus/prometheus.yml's basic_auth username
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity Apple's clients accept for a TLS server certificate
CLOCK_SKEW = datetime.timedelta(minutes=5)


class SecretsExistError(FileExistsError):
    """A file of the secrets folder exists already; it is never overwritten."""


@dataclass(frozen=True)
class MadeSecrets:
    """What ``init_secrets`` made."""
    folder: pathlib.Path
    hosts: tuple[str, ...]
    not_after: datetime.datetime  # the server certificate's end of validity

    def path(self, name: str) -> pathlib.Path:
        return self.folder / name


def subject_alternative_name(host: str) -> x509.GeneralName:
    """An IP address entry for an address, a DNS entry for anything else.

    Raises:
        ValueError: not an IP address nor an ASCII DNS name (internationalised
            names go in their ``xn--`` form).
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
        raise ValueError(f"--host expects a DNS name or an IP address (ASCII; IDNA names in their xn-- form). "
                         f"Received: {host!r}")
    return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "lossd-ca", days: int = CA_DAYS, now: datetime.datetime | None = None):
    """A self-signed CA that may sign server certificates only (path length 0):
    ``(certificate, private key)``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_server_certificate(ca_cert: x509.Certificate, ca_key, hosts: Iterable[str], days: int = SERVER_DAYS,
                             now: datetime.datetime | None = None):
    """A TLS server certificate for ``hosts`` (the first is its common name),
    signed by the CA: ``(certificate, private key)``.

    Raises:
        ValueError: no host, or one that is neither a DNS name nor an IP address.
    """
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise ValueError("a server certificate needs at least one host name")
    names = [subject_alternative_name(h) for h in hosts]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_new(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Writes a file that must not exist yet, with exactly ``mode`` (whatever the umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretsExistError(f"{path} exists; lossd secrets init never overwrites a secret") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)


def init_secrets(folder: pathlib.Path, hosts: Iterable[str] = ()) -> MadeSecrets:
    """Makes ``folder`` (mode 0700) and every secret a deployment mounts in it.

    Args:
        folder: the secrets folder (``deploy/secrets``). It may exist, empty
            or holding other files; its mode becomes 0700.
        hosts: names (or IP addresses) clients use to reach the server, added
            to ``lossd`` and ``localhost`` in its certificate.

    Raises:
        SecretsExistError: one of the files exists already (it is named;
            nothing was written).
        ValueError: a host is neither a DNS name nor an IP address.
        OSError: the folder cannot be made or written.
    """
    folder = pathlib.Path(folder)
    hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    for host in hosts:
        subject_alternative_name(host)  # refuse a bad name before anything is written
    existing = [name for name in MODES if os.path.lexists(folder / name)]
    if existing:
        more = f" (and {len(existing) - 1} more of its secrets)" if len(existing) > 1 else ""
        raise SecretsExistError(f"{folder / existing[0]} exists{more}; lossd secrets init never overwrites a "
                                "secret: remove them, or choose another folder, to make new ones")
    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    os.chmod(folder, FOLDER_MODE)  # mkdir's mode passes through the umask; an existing folder is tightened

    ca_cert, ca_key = make_ca()
    server_cert, server_key = issue_server_certificate(ca_cert, ca_key, hosts)
    _write_new(folder / CA_KEY, _key_pem(ca_key), MODES[CA_KEY])
    _write_new(folder / CA_CERT, _cert_pem(ca_cert), MODES[CA_CERT])
    _write_new(folder / SERVER_KEY, _key_pem(server_key), MODES[SERVER_KEY])
    _write_new(folder / SERVER_CERT, _cert_pem(server_cert), MODES[SERVER_CERT])
    _write_new(folder / TOKENS, b"", MODES[TOKENS])
    # create_user appends (making the file 0600); it does not exist yet, as checked above.
    password = create_user(folder / METRICS_USERS, METRICS_USER)
    os.chmod(folder / METRICS_USERS, MODES[METRICS_USERS])
    _write_new(folder / METRICS_PASSWORD, (password + "\n").encode(), MODES[METRICS_PASSWORD])
    return MadeSecrets(folder, hosts, server_cert.not_valid_after_utc)
