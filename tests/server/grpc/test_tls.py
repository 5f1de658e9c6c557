"""TLS and mTLS on the gRPC port (issue 12), with a CA and certificates the
test makes at run time: who gets refused during the handshake, and a
certificate rotated on disk serving new connections while an open stream
goes on."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

import lossd
from tests.certificates import Authority
from tests.servers import PATIENCE, free_port

pytest.importorskip("tensorflow")

Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)


@pytest.fixture
def start(tmp_path):
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []

    def run(**tls):
        settings = Settings(host="127.0.0.1", port=0, metrics_port=None, grace_seconds=0,
                            data_dir=tmp_path / f"data{len(servers)}", **tls)
        srv = create_server(settings, metrics_registry=CollectorRegistry())
        srv.start()
        servers.append(srv)
        return srv, f"127.0.0.1:{srv.port}"

    yield run
    for srv in servers:
        srv.stop(0)


def works(address: str, tls) -> bool:
    """Whether an evaluation over this channel succeeds; the handshake's
    refusals show as UNAVAILABLE."""
    with lossd.Client(address, tls=tls, timeout=10) as client:
        try:
            return client.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
        except lossd.LossdError as error:
            assert error.code == grpc.StatusCode.UNAVAILABLE, error
            return False


def test_tls_refuses_plain_text_a_wrong_ca_and_an_expired_certificate(tmp_path, start):
    ca, other = Authority(tmp_path, "ca"), Authority(tmp_path, "other-ca")
    cert, key = ca.issue("server")
    _, address = start(tls_cert=cert, tls_key=key)
    assert works(address, lossd.TLS(ca=ca.pem))
    assert not works(address, None)  # plain text against TLS
    assert not works(address, lossd.TLS(ca=other.pem))

    old_cert, old_key = ca.issue("expired", expired=True)
    _, expired_address = start(tls_cert=old_cert, tls_key=old_key)
    assert not works(expired_address, lossd.TLS(ca=ca.pem))


def failure(address: str, tls) -> lossd.LossdError:
    with lossd.Client(address, tls=tls, timeout=10) as client:
        with pytest.raises(lossd.LossdError) as caught:
            client.losses()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    return caught.value


def test_each_tls_mismatch_names_its_cause(tmp_path, start):
    # Plain text against TLS, TLS against plain text, a certificate for
    # another name and one from an untrusted CA: each message says which,
    # not "is lossd serve running there?", and keeps gRPC's own words.
    ca, other = Authority(tmp_path, "ca"), Authority(tmp_path, "other-ca")
    cert, key = ca.issue("server", hosts=("127.0.0.1",))
    _, tls_address = start(tls_cert=cert, tls_key=key)
    _, plain_address = start()
    port = tls_address.rsplit(":", 1)[1]
    cases = {
        "plain client": (failure(tls_address, None), "closed the connection during set-up, as a TLS server does"),
        "plain server": (failure(plain_address, lossd.TLS(ca=ca.pem)), "does not speak TLS"),
        "another name": (failure(f"localhost:{port}", lossd.TLS(ca=ca.pem)),
                         "presents a TLS certificate that does not name localhost"),
        "untrusted CA": (failure(tls_address, lossd.TLS(ca=other.pem)),
                         "presents a TLS certificate that the client does not trust"),
    }
    for case, (error, cause) in cases.items():
        assert cause in error.message, (case, error.message)
        assert "running there" not in error.message, (case, error.message)
        assert "Received: failed to connect" in error.message, (case, error.message)


def test_mtls_refuses_a_client_without_a_certificate_of_the_client_ca(tmp_path, start):
    ca, clients, strangers = Authority(tmp_path, "ca"), Authority(tmp_path, "clients"), Authority(tmp_path, "x")
    cert, key = ca.issue("server")
    _, address = start(tls_cert=cert, tls_key=key, tls_client_ca=clients.pem)
    alice_cert, alice_key = clients.issue("alice", client=True)
    eve_cert, eve_key = strangers.issue("eve", client=True)
    assert works(address, lossd.TLS(ca=ca.pem, cert=alice_cert, key=alice_key))
    assert not works(address, lossd.TLS(ca=ca.pem))
    assert not works(address, lossd.TLS(ca=ca.pem, cert=eve_cert, key=eve_key))


def test_a_rotated_certificate_serves_new_connections_and_an_open_stream_goes_on(tmp_path, start):
    first, second = Authority(tmp_path, "first"), Authority(tmp_path, "second")
    cert, key = first.issue("server")
    srv, address = start(tls_cert=cert, tls_key=key)
    rotated, more = threading.Event(), threading.Event()

    def requests():
        yield {"loss": "mse", "y_true": Y, "y_pred": Y + 1}
        rotated.wait(30)
        more.set()
        yield {"loss": "mse", "y_true": Y, "y_pred": Y + 2}

    with lossd.Client(address, tls=lossd.TLS(ca=first.pem), timeout=60) as streaming:
        results = streaming.evaluate_many(requests())
        assert next(results).loss == pytest.approx(1.0)
        second.issue("server", cert_path=cert, key_path=key)  # rotated in place, as Kubernetes does
        assert works(address, lossd.TLS(ca=second.pem))
        assert not works(address, lossd.TLS(ca=first.pem))
        rotated.set()
        assert next(results).loss == pytest.approx(4.0)  # the stream opened before the rotation
    assert more.is_set()
    assert srv.tls.loads == 2


def test_sighup_reloads_even_unchanged_files_and_a_bad_pair_keeps_the_old_one(tmp_path, start):
    ca, other = Authority(tmp_path, "ca"), Authority(tmp_path, "other")
    cert, key = ca.issue("server")
    srv, address = start(tls_cert=cert, tls_key=key)
    srv.tls.reload()
    assert works(address, lossd.TLS(ca=ca.pem))
    assert srv.tls.loads == 2
    # A key that does not match the certificate (a rotation caught half way): the old pair stays.
    _, stray_key = other.issue("stray")
    key.write_bytes(stray_key.read_bytes())
    assert works(address, lossd.TLS(ca=ca.pem))
    assert srv.tls.loads == 2


def test_a_bad_pair_at_start_is_a_startup_error_naming_the_settings(tmp_path):
    from lossd_server.app import create_server
    from lossd_server.config import Settings, StartupError

    ca = Authority(tmp_path, "ca")
    cert, _ = ca.issue("server")
    _, other_key = ca.issue("other")
    with pytest.raises(StartupError, match="LOSSD_TLS_CERT"):
        create_server(Settings(port=0, metrics_port=None, data_dir=tmp_path / "d", tls_cert=cert, tls_key=other_key))
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Settings(tls_cert=cert)


def test_the_command_line_serves_and_calls_over_tls(tmp_path):
    """`lossd serve --tls-cert/--tls-key` as a user types it, then client
    commands with --tls-ca, with LOSSD_TLS_CA, and without TLS (refused)."""
    import os
    import subprocess
    import sys
    import time

    ca = Authority(tmp_path, "ca")
    cert, key = ca.issue("server")
    port = free_port()  # not port 0's pick, which another worker's pick can take before the server binds it
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    lossd_cmd = [sys.executable, "-m", "lossd.cli"]
    server = subprocess.Popen([*lossd_cmd, "serve", "--port", str(port), "--metrics-port", "", "--data-dir",
                               str(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(key),
                               "--drain-seconds", "0", "--grace-seconds", "0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"

    def cli(*args, **extra_env):
        return subprocess.run([*lossd_cmd, *args, "--address", address, "--timeout", "10"],
                              env={**env, **extra_env}, capture_output=True, text=True, timeout=120)

    try:
        deadline = time.monotonic() + PATIENCE  # the start imports TensorFlow: minutes on a loaded machine
        while (health := cli("health", "--tls-ca", str(ca.pem))).returncode != 0:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, health.stderr
            time.sleep(0.5)
        assert health.stdout.strip() == "SERVING"
        plain = cli("health")
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain
        listed = cli("losses", LOSSD_TLS_CA=str(ca.pem))
        assert listed.returncode == 0, listed.stderr
        assert "mean_squared_error" in listed.stdout
    finally:
        server.terminate()
        server.wait(30)
