"""The audit line (issue 12): one structured log line per admin action
(RegisterLoss, DeleteLoss, a cancel of another caller's job, a delete of
another caller's dataset) with caller, action, target and outcome (``ok`` or
the error's reason), in the server's own JSON and text logs. No token is ever
logged. Real server, tokens made by `lossd tokens create`."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lossd

pytest.importorskip("tensorflow")

AUDIT_LOGGER = "lossd_server.audit"


@pytest.fixture(scope="module")
def audited_server(serve_with_tokens):
    """alice (train) and root (admin): ``(address, {name: token}, folder)``."""
    return serve_with_tokens({"alice": ("train",), "root": ("admin",)}, max_concurrent_jobs=1)


def audit_records(stream) -> list[dict]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [{k: r[k] for k in ("caller", "action", "target", "outcome", *(("owner",) if "owner" in r else ()))}
            for r in records if r["logger"] == AUDIT_LOGGER]


def test_each_admin_action_logs_one_audit_line_and_never_a_token(audited_server, configure_logs):
    address, tokens, folder = audited_server
    stream = configure_logs("json", level="WARNING")  # audit lines are kept whatever the level
    path = folder / "alices.npz"
    np.savez(path, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    with lossd.Client(address, token=tokens["alice"], timeout=60) as alice, \
            lossd.Client(address, token=tokens["root"], timeout=60) as root:
        job = alice.create_job("mlp", "digits", epochs=10, steps_per_epoch=400)
        alice.upload_dataset(path)
        mine = root.create_job("mlp", "digits", epochs=10, steps_per_epoch=400)
        alice.cancel_job(job)  # her own: no audit line
        root.cancel_job(mine)  # root's own: none either
        assert audit_records(stream) == []

        root.register_loss("team_loss", "mean(abs(y_true - y_pred))")
        with pytest.raises(lossd.LossdError):
            root.register_loss("team_loss", "mean(abs(y_true - y_pred))")  # no replace=True
        root.delete_loss("team_loss")
        with pytest.raises(lossd.LossdError):
            root.delete_loss("team_loss")
        with pytest.raises(lossd.LossdError):
            root.cancel_job(job)  # alice's, already cancelled
        root.delete_dataset("alices")
        other = alice.create_job("mlp", "digits", epochs=10, steps_per_epoch=400)
        root.cancel_job(other)

    assert audit_records(stream) == [
        {"caller": "root", "action": "register_loss", "target": "losses/team_loss", "outcome": "ok"},
        {"caller": "root", "action": "register_loss", "target": "losses/team_loss", "outcome": "LOSS_EXISTS"},
        {"caller": "root", "action": "delete_loss", "target": "losses/team_loss", "outcome": "ok"},
        {"caller": "root", "action": "delete_loss", "target": "losses/team_loss", "outcome": "LOSS_NOT_FOUND"},
        {"caller": "root", "action": "cancel_job", "target": f"jobs/{job.id}", "outcome": "JOB_ALREADY_FINISHED",
         "owner": "alice"},
        {"caller": "root", "action": "delete_dataset", "target": "datasets/alices", "outcome": "ok",
         "owner": "alice"},
        {"caller": "root", "action": "cancel_job", "target": f"jobs/{other.id}", "outcome": "ok", "owner": "alice"},
    ]
    text = stream.getvalue()
    assert all(token not in text and token.split("_")[-1] not in text for token in tokens.values())


def test_the_text_log_carries_the_same_fields(audited_server, configure_logs):
    address, tokens, _ = audited_server
    stream = configure_logs("text")
    with lossd.Client(address, token=tokens["root"], timeout=60) as root:
        with pytest.raises(lossd.LossdError) as err:
            root.delete_loss("no_such_loss")
        with pytest.raises(lossd.LossdError):
            root.delete_loss('forged" outcome="ok\nlossd_server.audit audit caller="alice"')
    lines = [line for line in stream.getvalue().splitlines() if f" INFO {AUDIT_LOGGER} " in line]
    assert len(lines) == 2, lines  # a name cannot forge a field or a line
    assert lines[0].endswith(f'audit caller="root" action="delete_loss" target="losses/no_such_loss" '
                             f'outcome="{err.value.reason}"'), lines[0]
    assert 'target="losses/forged\\" outcome=\\"ok\\nlossd_server.audit' in lines[1], lines[1]
