"""The metrics endpoint over HTTPS and behind HTTP basic auth (issue 12): a
real server on a free loopback port, a CA made at run time, and real HTTP(S)
requests through urllib."""

from __future__ import annotations

import base64
import http.client
import os
import pathlib
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from tests.certificates import Authority
from lossd_server.observability.metrics import Metrics, start_metrics_server
from lossd_server.security.basic_auth import BasicAuth, create_user, hash_password
from lossd_server.security.certificates import ReloadingSSLContext
from lossd_server.security.reload import SecurityFileError


@pytest.fixture
def serve():
    servers = []

    def run(**security):
        metrics = Metrics(CollectorRegistry(), loss_names=["mean_squared_error"], version="t",
                          process_metrics=False)
        metrics.set_build_info("t")
        server, port = start_metrics_server(metrics, "127.0.0.1", 0, cache_seconds=0, **security)
        servers.append(server)
        return port

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str, *, ca: pathlib.Path | None = None, user: str | None = None, password: str = ""):
    """(status, headers, body) of a GET; HTTP errors are answers too."""
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def served_certificate_issuer(port: int, ca: pathlib.Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.connect()
        issuer = dict(x[0] for x in connection.sock.getpeercert()["issuer"])
        connection.request("GET", "/metrics")
        assert connection.getresponse().status == 200
        return issuer["commonName"]
    finally:
        connection.close()


def test_https_port_refuses_plain_http_and_a_wrong_ca(tmp_path, serve):
    ca, other = Authority(tmp_path, "ca"), Authority(tmp_path, "other")
    cert, key = ca.issue("metrics")
    port = serve(tls=ReloadingSSLContext(cert, key))
    status, headers, body = get(f"https://127.0.0.1:{port}/metrics", ca=ca.pem)
    assert status == 200 and b'lossd_build_info{' in body
    with pytest.raises((OSError, http.client.HTTPException)) as refused:
        get(f"http://127.0.0.1:{port}/metrics")
    assert not isinstance(refused.value, urllib.error.HTTPError), refused.value  # no HTTP answer at all
    with pytest.raises(urllib.error.URLError) as untrusted:
        get(f"https://127.0.0.1:{port}/metrics", ca=other.pem)
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError), untrusted.value
    # The refused clients cost nothing lasting: the port still serves.
    assert get(f"https://127.0.0.1:{port}/metrics", ca=ca.pem)[0] == 200


def test_basic_auth_answers_401_with_a_challenge_without_the_right_credentials(tmp_path, serve):
    users = tmp_path / "metrics-users"
    password = create_user(users, "prometheus")
    port = serve(basic_auth=BasicAuth(users))
    url = f"http://127.0.0.1:{port}/metrics"
    for credentials in ({}, {"user": "prometheus", "password": password + "x"},
                        {"user": "nobody", "password": password}, {"user": "prometheus", "password": ""}):
        status, headers, body = get(url, **credentials)
        assert status == 401, credentials
        assert headers["WWW-Authenticate"] == 'Basic realm="lossd metrics", charset="UTF-8"'
        assert b"lossd_" not in body
    status, _, body = get(url, user="prometheus", password=password)
    assert status == 200 and b"lossd_build_info" in body
    # Twice: the second scrape takes the remembered path.
    assert get(url, user="prometheus", password=password)[0] == 200
    # Not basic, or not base64: refused too.
    for value in ("Bearer " + password, "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        request = urllib.request.Request(url, headers={"Authorization": value})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, value


def test_https_and_basic_auth_together(tmp_path, serve):
    ca = Authority(tmp_path, "ca")
    cert, key = ca.issue("metrics")
    users = tmp_path / "users"
    password = create_user(users, "prometheus")
    port = serve(tls=ReloadingSSLContext(cert, key), basic_auth=BasicAuth(users))
    url = f"https://127.0.0.1:{port}/metrics"
    assert get(url, ca=ca.pem)[0] == 401
    assert get(url, ca=ca.pem, user="prometheus", password=password)[0] == 200


def test_a_rotated_certificate_serves_new_connections_and_a_bad_pair_keeps_the_previous(tmp_path, serve):
    first, second = Authority(tmp_path, "first"), Authority(tmp_path, "second")
    cert, key = first.issue("metrics")
    tls = ReloadingSSLContext(cert, key)
    port = serve(tls=tls)
    assert served_certificate_issuer(port, first.pem) == "first"
    second.issue("metrics", cert_path=cert, key_path=key)  # rotated in place, as Kubernetes does
    assert served_certificate_issuer(port, second.pem) == "second"
    assert tls.loads == 2
    # A key that does not belong to the certificate: logged, and the previous pair serves on.
    _, stray_key = first.issue("stray")
    key.write_bytes(stray_key.read_bytes())
    assert served_certificate_issuer(port, second.pem) == "second"
    assert tls.loads == 2
    # SIGHUP's reload() loads unchanged files again.
    second.issue("metrics", cert_path=cert, key_path=key)
    served_certificate_issuer(port, second.pem)
    tls.reload()
    assert served_certificate_issuer(port, second.pem) == "second" and tls.loads == 4


def test_the_basic_auth_file_is_read_again_when_it_changes(tmp_path, serve):
    users = tmp_path / "users"
    first = create_user(users, "prometheus")
    port = serve(basic_auth=BasicAuth(users))
    url = f"http://127.0.0.1:{port}/metrics"
    assert get(url, user="prometheus", password=first)[0] == 200
    second = create_user(users, "grafana-agent")
    assert get(url, user="grafana-agent", password=second)[0] == 200
    # A replaced password: the old one, verified and remembered before, no longer works.
    users.write_text(f"prometheus:{hash_password('new password', iterations=1000)}\n")
    assert get(url, user="prometheus", password=first)[0] == 401
    assert get(url, user="prometheus", password="new password")[0] == 200
    # A malformed file keeps the previous users.
    users.write_text("prometheus:plain-text-password\n")
    assert get(url, user="prometheus", password="new password")[0] == 200


@pytest.mark.parametrize("line, expected", [
    ("prometheus:hunter2", "expected user:pbkdf2_sha256$<iterations>$<salt>$<hash>, received something else"),
    ("prometheus:pa$$word", "received something else"),
    ("prometheus:$2b$12$abcdefghijklmnopqrstuv", "received a bcrypt hash (not supported)"),
    ("prometheus:sha256$1$c2FsdA$aGFzaA", "received a sha256 hash (not supported)"),
    ("prometheus:pbkdf2_sha256$many$c2FsdA$aGFzaA", "invalid literal for int"),
    ("prometheus:pbkdf2_sha256$0$c2FsdA$aGFzaA", "iterations must be positive, received 0"),
    ("prometheus:pbkdf2_sha256$10$c2FsdA$aGFzaA", "a SHA-256 hash has 32 bytes, received 4"),
    (":pbkdf2_sha256$10$c2FsdA$aGFzaA", "a metrics user name is 1 to 64 printable characters"),
])
def test_a_malformed_basic_auth_file_names_the_line_and_what_was_expected(tmp_path, line, expected):
    users = tmp_path / "users"
    users.write_text(f"# scrapers\n\n{line}\n")
    with pytest.raises(SecurityFileError) as error:
        BasicAuth(users)
    message = str(error.value)
    assert message.startswith("line 3 of the metrics basic-auth file users is not a user: ")
    assert expected in message and "lossd metrics-auth create" in message
    for secret in ("hunter2", "abcdefghij", "pa$", "c2FsdA"):  # what the line holds is not shown
        assert secret not in message


def test_an_empty_or_missing_basic_auth_file_is_refused(tmp_path):
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(SecurityFileError, match="has no user; make one with `lossd metrics-auth create"):
        BasicAuth(tmp_path / "empty")
    with pytest.raises(SecurityFileError, match="cannot read the metrics basic-auth file missing: No such file"):
        BasicAuth(tmp_path / "missing")


def test_create_user_writes_a_private_file_and_refuses_a_second_user_of_the_same_name(tmp_path):
    users = tmp_path / "users"
    password = create_user(users, "prometheus")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    text = users.read_text()
    assert password not in text and text.startswith("prometheus:pbkdf2_sha256$600000$")
    with pytest.raises(ValueError, match="already has a user 'prometheus'"):
        create_user(users, "prometheus")
    with pytest.raises(ValueError, match="without ':'"):
        create_user(users, "a:b")


def lossd_command() -> str:
    return str(pathlib.Path(sys.executable).parent / "lossd")


def test_lossd_metrics_auth_create_prints_the_password_once(tmp_path, serve):
    users = tmp_path / "users"
    result = subprocess.run([lossd_command(), "metrics-auth", "create", "prometheus", "--file", str(users)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    password = result.stdout.strip()
    assert len(password) >= 32 and password not in users.read_text() and password not in result.stderr
    port = serve(basic_auth=BasicAuth(users))
    assert get(f"http://127.0.0.1:{port}/metrics", user="prometheus", password=password)[0] == 200
    again = subprocess.run([lossd_command(), "metrics-auth", "create", "prometheus", "--file", str(users)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already has a user 'prometheus'" in again.stderr
    unset = subprocess.run([lossd_command(), "metrics-auth", "create", "prometheus"], capture_output=True,
                           text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                       if k != "LOSSD_METRICS_BASIC_AUTH_FILE"})
    assert unset.returncode == 2 and "set --file or LOSSD_METRICS_BASIC_AUTH_FILE" in unset.stderr


# Through the settings: what `lossd serve` builds.

def test_settings_pair_the_certificate_and_key_and_read_the_environment(tmp_path, monkeypatch):
    import pydantic

    from lossd_server.config import Settings

    with pytest.raises(pydantic.ValidationError, match="metrics_tls_cert and metrics_tls_key go together"):
        Settings(metrics_tls_cert=tmp_path / "c.pem")
    monkeypatch.setenv("LOSSD_METRICS_TLS_CERT", "/run/secrets/server.pem")
    monkeypatch.setenv("LOSSD_METRICS_TLS_KEY", "/run/secrets/server.key")
    monkeypatch.setenv("LOSSD_METRICS_BASIC_AUTH_FILE", "")
    settings = Settings()
    assert settings.metrics_tls_cert == pathlib.Path("/run/secrets/server.pem")
    assert settings.metrics_basic_auth_file is None


def test_create_server_refuses_a_bad_metrics_certificate_naming_the_setting(tmp_path):
    pytest.importorskip("tensorflow")
    from lossd_server.app import create_server
    from lossd_server.config import Settings, StartupError

    ca = Authority(tmp_path, "ca")
    cert, _ = ca.issue("metrics")
    _, other_key = ca.issue("other")
    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "data", metrics_tls_cert=cert,
                        metrics_tls_key=other_key)
    with pytest.raises(StartupError, match="cannot load the metrics TLS certificate metrics.crt and key "
                                           "other.key: .*LOSSD_METRICS_TLS_CERT"):
        create_server(settings, metrics_registry=CollectorRegistry())
    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "data",
                        metrics_basic_auth_file=tmp_path / "absent")
    with pytest.raises(StartupError, match="LOSSD_METRICS_BASIC_AUTH_FILE"):
        create_server(settings, metrics_registry=CollectorRegistry())
