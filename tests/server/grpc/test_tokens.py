"""Bearer tokens with scopes (issue 12): tokens made by `lossd tokens
create` as a user types it, checked by a real server: none is
UNAUTHENTICATED, an unknown one too, a token without the method's scope is
PERMISSION_DENIED MISSING_SCOPE naming it, admin holds every scope, and
health stays open."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd

pytest.importorskip("tensorflow")

Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)


@pytest.fixture(scope="module")
def secured(serve_with_tokens):
    address, tokens, folder = serve_with_tokens({"alice": ("evaluate",), "bob": ("train",), "root": ("admin",)})
    return address, tokens, folder / "tokens.jsonl"


def test_the_file_holds_salted_hashes_never_the_tokens(secured):
    _, tokens, path = secured
    text = path.read_text()
    # A token is lsd_<id>_<secret>, and the secret (token_urlsafe) may hold
    # "_" itself: the whole secret, never a chance fragment of it, is sought.
    assert all(token not in text and token.split("_", 2)[2] not in text for token in tokens.values())
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_no_token_or_an_unknown_one_is_unauthenticated(secured):
    address, tokens, _ = secured
    for token, reason in ((None, "UNAUTHENTICATED"), ("lsd_000000000000_nope", "BAD_TOKEN"),
                          (tokens["alice"][:-2] + "xx", "BAD_TOKEN")):
        with lossd.Client(address, token=token, timeout=10) as client, pytest.raises(lossd.LossdError) as err:
            client.evaluate("mse", Y, Y + 1)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, err.value
        assert err.value.reason == reason


def test_a_token_without_the_scope_is_permission_denied_naming_it(secured):
    address, tokens, _ = secured
    with lossd.Client(address, token=tokens["alice"], timeout=10) as alice:
        assert alice.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
        with pytest.raises(lossd.LossdError) as err:
            alice.register_loss("mine", "mean(abs(y_true - y_pred))")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.reason == "MISSING_SCOPE" and err.value.metadata["scope"] == "admin"
        with pytest.raises(lossd.LossdError) as err:
            alice.list_jobs()
        assert err.value.reason == "MISSING_SCOPE" and err.value.metadata["scope"] == "train"
    with lossd.Client(address, token=tokens["bob"], timeout=10) as bob:
        bob.list_jobs()
        with pytest.raises(lossd.LossdError) as err:
            bob.evaluate("mse", Y, Y + 1)
        assert err.value.metadata["scope"] == "evaluate"
    with lossd.Client(address, token=tokens["root"], timeout=10) as root:
        root.register_loss("mine", "mean(abs(y_true - y_pred))")
        assert root.evaluate("mine", Y, Y + 1).loss == pytest.approx(1.0)
        root.list_jobs()


def test_health_stays_open(secured):
    address, _, _ = secured
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_command_line_sends_the_token(secured):
    address, tokens, _ = secured
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}

    def losses(**extra):
        return subprocess.run([sys.executable, "-m", "lossd.cli", "losses", "--address", address],
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)

    refused = losses()
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    listed = losses(LOSSD_TOKEN=tokens["alice"])
    assert listed.returncode == 0 and "mean_squared_error" in listed.stdout, listed.stderr


def test_a_token_carries_the_limits_it_was_made_with(tmp_path):
    from lossd_server.callers import Limits
    from lossd_server.grpc.auth import Callers
    from lossd_server.security.tokens import load_tokens

    path = tmp_path / "tokens.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    made = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", "carol", "--scopes", "evaluate,train",
                           "--rate", "1e6", "--max-jobs", "2", "--max-upload-bytes", "1000000", "--file", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    caller = Callers(load_tokens(path)).check([("authorization", f"Bearer {made.stdout.strip()}")])
    assert caller.name == "carol" and caller.scopes == {"evaluate", "train"} and not caller.admin
    assert caller.limits == Limits(elements_per_second=1e6, max_jobs=2, max_upload_bytes=1_000_000)
    assert caller.owns("carol") and not caller.owns("dave")

    bad = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", "eve", "--scopes", "train",
                          "--max-jobs", "0", "--file", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "max_jobs must be a positive number" in bad.stderr


def test_a_server_without_tokens_treats_every_caller_as_an_anonymous_admin():
    from lossd_server.callers import ANONYMOUS
    from lossd_server.grpc.auth import Callers

    caller = Callers(None).check([])
    assert caller is ANONYMOUS and caller.admin and caller.owns("anyone")


@pytest.mark.parametrize("host, warns", [("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("lossd.internal", True),
                                         ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
                                         ("[::1]", False), ("::ffff:127.0.0.1", False), ("localhost", False)])
def test_without_tokens_the_server_warns_unless_it_binds_only_loopback(tmp_path, host, warns):
    from lossd_server.app import open_access_warning
    from lossd_server.config import Settings

    open_server = Settings(host=host, data_dir=tmp_path)
    warning = open_access_warning(open_server, 50051)
    assert (warning is not None) == warns
    if warns:
        assert f"{host}:50051" in warning and "LOSSD_TOKENS_FILE" in warning
    tokens = tmp_path / "tokens.jsonl"
    tokens.touch()
    assert open_access_warning(Settings(host=host, data_dir=tmp_path, tokens_file=tokens), 50051) is None


def test_lossd_serve_on_loopback_without_tokens_starts_without_the_warning(tmp_path):
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "", "--data-dir", str(tmp_path / "data")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in line for line in lines), "".join(lines)
        assert not any("no tokens file" in line for line in lines), "".join(lines)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_call_hashes_its_token_once(secured, monkeypatch):
    """The interceptor's check is the only one: handlers that ask who calls
    (evaluation, streams, training, registering) get the caller it found."""
    from lossd_server.security import tokens as token_records

    hashed = []
    real = token_records.token_digest
    monkeypatch.setattr(token_records, "token_digest", lambda salt, token: hashed.append(token) or real(salt, token))
    address, tokens, _ = secured

    def hashes(call) -> int:
        before = len(hashed)
        call()
        return len(hashed) - before

    with lossd.Client(address, token=tokens["alice"], timeout=10) as alice, \
            lossd.Client(address, token=tokens["bob"], timeout=10) as bob, \
            lossd.Client(address, token=tokens["root"], timeout=10) as root:
        assert hashes(lambda: alice.evaluate("mse", Y, Y + 1)) == 1
        assert hashes(lambda: list(alice.evaluate_many([{"loss": "mse", "y_true": Y, "y_pred": Y + 1}] * 3))) == 1
        assert hashes(lambda: bob.list_jobs()) == 1
        assert hashes(lambda: root.register_loss("once", "mean(abs(y_true - y_pred))")) == 1
        refused = []
        assert hashes(lambda: refused.append(pytest.raises(lossd.LossdError, alice.list_jobs))) == 1
        assert refused[0].value.code == grpc.StatusCode.PERMISSION_DENIED
    with lossd.Client(address, token=tokens["alice"][:-2] + "xx", timeout=10) as forged:
        assert hashes(lambda: refused.append(pytest.raises(lossd.LossdError, forged.evaluate, "mse", Y, Y + 1))) == 1
        assert refused[1].value.code == grpc.StatusCode.UNAUTHENTICATED
    assert hashed and set(hashed) <= set(tokens.values()) | {tokens["alice"][:-2] + "xx"}


def test_a_caller_found_for_one_call_never_answers_for_another(secured):
    """``Callers.of`` takes the interceptor's caller only with the metadata
    object of the call it was found for; any other call's metadata (another
    token, or an equal copy) is checked on its own. So a caller cannot pass
    from one call to the next, whatever grpcio does with contexts."""
    from lossd_server.grpc import auth
    from lossd_server.security.tokens import load_tokens

    _, tokens, path = secured
    callers = auth.Callers(load_tokens(path))

    class Call:  # the one method of a servicer context that Callers.of reads
        def __init__(self, metadata):
            self.metadata = metadata

        def invocation_metadata(self):
            return self.metadata

    alice = (("authorization", f"Bearer {tokens['alice']}"),)
    bob = (("authorization", f"Bearer {tokens['bob']}"),)
    found = auth._CALLER.set((alice, callers.check(alice)))
    try:
        assert callers.of(Call(alice)).name == "alice"
        assert callers.of(Call(bob)).name == "bob"
        assert callers.of(Call(tuple(list(alice)))).name == "alice"
        with pytest.raises(auth.Unauthenticated):
            callers.of(Call(()))
    finally:
        auth._CALLER.reset(found)
