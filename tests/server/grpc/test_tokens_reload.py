"""The tokens file reloads without a restart (issue 23): a token removed by
`lossd tokens revoke` (typed as a user types it) is refused on its next call
within a second, a scope changed in the file applies within a second, a
file that does not parse keeps the tokens loaded before, and no reload opens
the server. `lossd tokens list` shows names, scopes and limits, never a
secret. Real server on a real port; tokens made by `lossd tokens create`."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

import lossd

pytest.importorskip("tensorflow")

Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}


def _tokens(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", *args], env=ENV, capture_output=True,
                          text=True, timeout=60)


def _refused_within(call, code, seconds: float = 1.0) -> float:
    """Calls ``call`` until it fails with ``code``; returns how long that took
    (fails the test past ``seconds``)."""
    start = time.monotonic()
    while True:
        try:
            call()
        except lossd.LossdError as error:
            assert error.code == code, error
            return time.monotonic() - start
        assert time.monotonic() - start < seconds, f"still accepted {seconds} s after the change"
        time.sleep(0.02)


def _replace(path, lines) -> None:
    """Writes the tokens file as an editor saving it would: a new file moved over the old."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


@pytest.fixture
def secured(serve_with_tokens):
    address, tokens, folder = serve_with_tokens({"alice": ("evaluate",), "bob": ("evaluate",),
                                                 "carol": ("evaluate", "--max-jobs", "3")})
    return address, tokens, folder / "tokens.jsonl"


def test_a_revoked_token_is_refused_on_its_next_call_within_a_second(secured):
    address, tokens, path = secured
    with lossd.Client(address, token=tokens["alice"], timeout=10) as alice, \
            lossd.Client(address, token=tokens["bob"], timeout=10) as bob:
        assert alice.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
        revoked = _tokens("revoke", "alice", "--file", str(path))
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked 1 token(s) of 'alice'" in revoked.stderr
        took = _refused_within(lambda: alice.evaluate("mse", Y, Y + 1), grpc.StatusCode.UNAUTHENTICATED)
        assert took < 1.0
        with pytest.raises(lossd.LossdError) as error:
            alice.evaluate("mse", Y, Y + 1)
        assert error.value.reason == "BAD_TOKEN"
        assert bob.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)  # the others keep working
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    listed = _tokens("list", "--file", str(path))
    assert listed.returncode == 0 and "alice" not in listed.stdout and "bob" in listed.stdout


def test_a_scope_changed_in_the_file_applies_within_a_second(secured):
    address, tokens, path = secured
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    with lossd.Client(address, token=tokens["bob"], timeout=10) as bob:
        assert bob.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
        with pytest.raises(lossd.LossdError):
            bob.list_jobs()
        _replace(path, [{**line, "scopes": ["train"]} if line["name"] == "bob" else line for line in lines])
        _refused_within(lambda: bob.evaluate("mse", Y, Y + 1), grpc.StatusCode.PERMISSION_DENIED)
        bob.list_jobs()  # the new scope holds too


def test_a_bad_file_keeps_the_previous_tokens_and_an_empty_one_opens_nothing(secured, caplog):
    address, tokens, path = secured
    good = path.read_text()
    with lossd.Client(address, token=tokens["bob"], timeout=10) as bob, \
            caplog.at_level(logging.WARNING, logger="lossd_server.security.reload"):
        path.write_text(good + "{not json\n")
        time.sleep(0.6)  # two change checks
        assert bob.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
        assert any("tokens file not reloaded" in r.getMessage() and "line 4" in r.getMessage()
                   for r in caplog.records), caplog.text
        assert all(token not in caplog.text for token in tokens.values())
        path.write_text("")  # no tokens: everyone is refused, nobody is let in as anonymous
        _refused_within(lambda: bob.evaluate("mse", Y, Y + 1), grpc.StatusCode.UNAUTHENTICATED)
    with lossd.Client(address, timeout=10) as nobody, pytest.raises(lossd.LossdError) as error:
        nobody.evaluate("mse", Y, Y + 1)
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_sighup_reloads_an_unchanged_looking_file_and_checks_cost_no_stat_in_between(tmp_path, create_token):
    """``reload()`` (what SIGHUP calls) re-reads the file even when its stamp
    did not change; between checks a call does not stat the file."""
    from lossd_server.grpc.auth import Callers

    path = tmp_path / "tokens.jsonl"
    token = create_token(path, "dave", "evaluate")
    callers = Callers.from_file(path, check_seconds=3600)
    metadata = [("authorization", f"Bearer {token}")]
    assert callers.check(metadata).scopes == {"evaluate"}
    stamp = path.stat()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    _replace(path, [{**line, "scopes": ["admin"]} for line in lines])
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert callers.check(metadata).scopes == {"evaluate"}  # not looked at for an hour
    callers.reload()
    assert callers.check(metadata).scopes == {"admin"} and callers.reloads == 1


def test_tokens_list_shows_names_scopes_and_limits_never_a_secret(tmp_path, create_token):
    path = tmp_path / "tokens.jsonl"
    made = {"erin": create_token(path, "erin", "evaluate,train", "--max-jobs", "2", "--rate", "1e6"),
            "frank": create_token(path, "frank", "admin")}
    listed = _tokens("list", "--file", str(path))
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["NAME", "ID", "SCOPES", "LIMITS"]
    erin, frank = rows[1].split(), rows[2].split()
    assert erin[0] == "erin" and erin[2] == "evaluate,train" and set(erin[3:]) == {"elements_per_second=1e+06",
                                                                                     "max_jobs=2"}
    assert frank[0] == "frank" and frank[2] == "admin" and frank[3] == "-"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for secret in [*made.values(), *(t.split("_")[-1] for t in made.values()),
                   *(r["salt"] for r in records), *(r["sha256"] for r in records)]:
        assert secret not in listed.stdout + listed.stderr
    unknown = _tokens("revoke", "grace", "--file", str(path))
    assert unknown.returncode == 2 and "no token named 'grace'" in unknown.stderr and "erin, frank" in unknown.stderr
    missing = _tokens("list", "--file", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "cannot read the tokens file" in missing.stderr
    assert not (tmp_path / "none.jsonl").exists()


def test_creating_and_revoking_at_once_loses_no_token(tmp_path):
    """create_token appends under the lock revoke_tokens rewrites under, and
    follows the file revoke replaced: every token made survives."""
    from lossd_server.security.tokens import create_token, load_tokens, revoke_tokens

    path = tmp_path / "tokens.jsonl"
    for i in range(20):
        create_token(path, f"old{i}", ["evaluate"])

    def make(prefix):
        for i in range(20):
            create_token(path, f"{prefix}{i}", ["evaluate"])

    makers = [threading.Thread(target=make, args=(p,)) for p in ("a", "b")]
    for thread in makers:
        thread.start()
    for i in range(20):
        assert revoke_tokens(path, f"old{i}") == 1
    for thread in makers:
        thread.join()
    names = sorted(record.name for record in load_tokens(path).values())
    assert names == sorted([f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)])
