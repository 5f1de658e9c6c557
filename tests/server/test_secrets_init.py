"""`lossd secrets init FOLDER --host NAME` (issue 12, "a CA and tokens for a
small team in four commands"): as a user types it, it makes every secret
deploy/compose.yaml mounts, with the modes the containers need, and refuses
to overwrite any. What it made is proven by a real server: TLS with its
certificate, tokens appended to its tokens file by `lossd tokens create`,
and metrics over HTTPS with its Prometheus password; a client trusting
another CA is refused."""
from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

import lossd
from tests.certificates import Authority

x509 = pytest.importorskip("cryptography.x509")

ROOT = Path(__file__).resolve().parents[2]
Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)
MOUNTED = {"server.pem", "server.key", "ca.pem", "tokens.jsonl", "metrics-users", "metrics-password"}


def lossd_cli(*argv: str, umask: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    return subprocess.run([sys.executable, "-m", "lossd.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """deploy/secrets as `lossd secrets init` makes it, under a strict umask."""
    folder = tmp_path_factory.mktemp("checkout") / "deploy" / "secrets"
    done = lossd_cli("secrets", "init", str(folder), "--host", "lossd.example.com", "--host", "10.1.2.3",
                     umask=0o077)
    assert done.returncode == 0, done.stderr
    return folder, done.stdout


def test_it_makes_what_compose_mounts_and_the_ca_key_beside_it(made):
    folder, _ = made
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    assert set(re.findall(r"^ +file: \./secrets/(\S+)$", compose, flags=re.M)) == MOUNTED
    assert {p.name for p in folder.iterdir()} == MOUNTED | {"ca.key"}


def test_the_folder_is_private_and_the_mounted_files_readable_by_the_containers_users(made):
    folder, _ = made
    assert mode(folder) == 0o700
    assert mode(folder / "ca.key") == 0o600
    for name in MOUNTED:
        assert mode(folder / name) == 0o644, name   # even under umask 077: compose mounts them as they are


def test_it_prints_no_secret(made):
    folder, stdout = made
    password = (folder / "metrics-password").read_text().strip()
    assert len(password) >= 32 and password not in stdout and password not in (folder / "metrics-users").read_text()
    assert "PRIVATE KEY" not in stdout
    assert "lossd tokens create" in stdout and "lossd.example.com" in stdout


def test_the_certificates(made):
    folder, _ = made
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["lossd", "localhost", "lossd.example.com"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert server.not_valid_before_utc <= now
    assert abs(server.not_valid_after_utc - now - datetime.timedelta(days=825)) < datetime.timedelta(hours=1)
    assert ca.not_valid_after_utc > server.not_valid_after_utc


def test_it_refuses_to_overwrite_a_secret_and_writes_nothing(made, tmp_path):
    folder, _ = made
    before = contents(folder)
    again = lossd_cli("secrets", "init", str(folder))
    assert again.returncode == 2 and f"{folder / 'ca.pem'} exists" in again.stderr, again.stderr
    assert contents(folder) == before

    # One secret already there (say, a tokens file kept from before): named, nothing else written.
    other = tmp_path / "secrets"
    other.mkdir(mode=0o755)
    (other / "tokens.jsonl").write_text("")
    again = lossd_cli("secrets", "init", str(other))
    assert again.returncode == 2 and f"{other / 'tokens.jsonl'} exists" in again.stderr, again.stderr
    assert [p.name for p in other.iterdir()] == ["tokens.jsonl"]


def test_an_existing_empty_folder_is_used_and_made_private(tmp_path):
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    done = lossd_cli("secrets", "init", str(folder))
    assert done.returncode == 0, done.stderr
    assert mode(folder) == 0o700 and {p.name for p in folder.iterdir()} == MOUNTED | {"ca.key"}


def test_a_bad_host_is_refused_before_anything_is_made(tmp_path):
    done = lossd_cli("secrets", "init", str(tmp_path / "secrets"), "--host", "lossd example")
    assert done.returncode == 2 and "--host expects a DNS name or an IP address" in done.stderr, done.stderr
    assert not (tmp_path / "secrets").exists()


# -- what it made, served ---------------------------------------------------------

@pytest.fixture(scope="module")
def served(made):
    """A server with the made certificate, tokens file and metrics secrets
    (as compose configures lossd), after `lossd tokens create` added two tokens."""
    pytest.importorskip("tensorflow")
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    folder, _ = made
    tokens = folder / "tokens.jsonl"
    team = {}
    for name, scopes in (("alice", "evaluate,train"), ("bob", "evaluate,train,admin")):
        done = lossd_cli("tokens", "create", name, "--scopes", scopes, "--file", str(tokens))
        assert done.returncode == 0, done.stderr
        team[name] = done.stdout.strip()
    srv = create_server(Settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                                 grace_seconds=0, data_dir=folder.parent / "data",
                                 tls_cert=folder / "server.pem", tls_key=folder / "server.key", tokens_file=tokens,
                                 metrics_tls_cert=folder / "server.pem", metrics_tls_key=folder / "server.key",
                                 metrics_basic_auth_file=folder / "metrics-users"),
                        metrics_registry=CollectorRegistry())
    srv.start()
    yield folder, team, srv
    srv.stop(0)


def test_tokens_create_appends_to_the_made_file_and_keeps_its_mode(served):
    folder, team, _ = served
    assert mode(folder / "tokens.jsonl") == 0o644
    assert len((folder / "tokens.jsonl").read_text().splitlines()) == len(team)


def evaluate(address: str, tls, token: str | None) -> float:
    with lossd.Client(address, tls=tls, token=token, timeout=10) as client:
        return client.evaluate("mse", Y, Y + 1).loss


def test_a_client_trusting_the_ca_connects_over_localhost_with_a_token(served):
    folder, team, srv = served
    address = f"localhost:{srv.port}"   # "localhost" is one of the certificate's names
    assert evaluate(address, lossd.TLS(ca=folder / "ca.pem"), team["alice"]) == pytest.approx(1.0)
    with pytest.raises(lossd.LossdError) as refused:
        evaluate(address, lossd.TLS(ca=folder / "ca.pem"), None)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_trusting_another_ca_or_none_is_refused(served, tmp_path):
    folder, team, srv = served
    address = f"localhost:{srv.port}"
    stranger = Authority(tmp_path, "stranger")
    for tls in (lossd.TLS(ca=stranger.pem), None):   # another CA; plain text
        with pytest.raises(lossd.LossdError) as refused:
            evaluate(address, tls, team["alice"])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_prometheus_password_scrapes_the_metrics_over_https(served):
    folder, _, srv = served
    password = (folder / "metrics-password").read_text().strip()
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    url = f"https://localhost:{srv.metrics_port}/metrics"

    def scrape(secret: str) -> int:
        request = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(f"prometheus:{secret}".encode()).decode()})
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert scrape(password) == 200
    assert scrape(password + "x") == 401
