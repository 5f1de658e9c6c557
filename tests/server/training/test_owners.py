"""Owners (issue 12): jobs and datasets belong to the token that made them.
A caller without admin sees, cancels, watches, downloads from and deletes
only its own, and someone else's is NOT_FOUND, worded as for one that does
not exist; admin sees and changes all. Against a real server with tokens made
by `lossd tokens create`; jobs are cancelled long before they train."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import grpc
import numpy as np
import pytest

import lossd

pytest.importorskip("tensorflow")

LONG = dict(epochs=10, steps_per_epoch=400)  # cancelled long before it ends


@pytest.fixture(scope="module")
def owned(serve_with_tokens):
    """A server with tokens alice and bob (train) and root (admin), one job
    slot: ``(address, {name: token}, folder)``."""
    return serve_with_tokens({"alice": ("train",), "bob": ("train",), "root": ("admin",)}, max_concurrent_jobs=1)


def clients(owned):
    address, tokens, _ = owned
    return {name: lossd.Client(address, token=token, timeout=60) for name, token in tokens.items()}


def refused(call, *args, **kwargs) -> lossd.LossdError:
    with pytest.raises(lossd.LossdError) as err:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    return err.value


def cli(owned, name: str, *command: str) -> list[str]:
    """``lossd COMMAND`` as ``name``, as a user types it; its output lines."""
    address, tokens, _ = owned
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}, "LOSSD_TOKEN": tokens[name]}
    done = subprocess.run([sys.executable, "-m", "lossd.cli", *command, "--address", address], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def npz(folder, name: str, n: int = 20) -> str:
    path = folder / f"{name}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), y=np.arange(n) % 2)
    return str(path)


def test_a_caller_sees_and_cancels_only_its_own_jobs(owned):
    c = clients(owned)
    job = c["alice"].create_job("mlp", "digits", **LONG)
    try:
        assert job.owner == "alice" and c["alice"].get_job(job).owner == "alice"
        assert job.id in [j.id for j in c["alice"].list_jobs()]
        missing = refused(c["bob"].get_job, "jobs/0000000000000000")
        for call, args in ((c["bob"].get_job, ()), (c["bob"].cancel_job, ()), (c["bob"].watch, ()),
                           (c["bob"].download, (owned[2],)), (c["bob"].predict, (np.zeros((1, 8, 8), np.uint8),)),
                           (c["bob"].generate, (1,))):
            err = refused(call, job, *args)
            assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "JOB_NOT_FOUND", (call, err)
            # Worded as for a job that does not exist: nothing tells bob it does.
            assert err.message == missing.message.replace("0000000000000000", job.id)
        assert job.id not in [j.id for j in c["bob"].list_jobs()]
        assert c["alice"].get_job(job).state in ("queued", "running")  # bob's cancel did nothing

        # admin sees every job, with its owner, and cancels it.
        assert {j.id: j.owner for j in c["root"].list_jobs()}[job.id] == "alice"
        assert any(line.startswith(job.name) and line.endswith("owner=alice")
                   for line in cli(owned, "root", "jobs", "list")), "lossd jobs list shows no owner"
        assert not any(job.name in line for line in cli(owned, "bob", "jobs", "list"))
        assert c["root"].get_job(job).owner == "alice"
        assert c["root"].cancel_job(job).state == "cancelled"
    finally:
        if not c["root"].get_job(job).done:
            c["root"].cancel_job(job)
        for client in c.values():
            client.close()


def test_paging_lists_only_the_callers_jobs(owned):
    c = clients(owned)
    mine = [c["bob"].create_job("mlp", "digits", **LONG) for _ in range(3)]
    theirs = c["alice"].create_job("mlp", "digits", **LONG)
    try:
        pages = list(c["bob"].list_jobs(page_size=1))
        assert [j.id for j in pages] == [j.id for j in reversed(mine)]
        assert {j.owner for j in pages} == {"bob"}
        assert theirs.id in {j.id for j in c["root"].list_jobs(page_size=1)}
    finally:
        for job in [*mine, theirs]:
            c["root"].cancel_job(job)
        for client in c.values():
            client.close()


def test_a_request_id_of_another_callers_job_is_refused_without_that_job(owned):
    c = clients(owned)
    job = c["alice"].create_job("mlp", "digits", request_id="alice-1", **LONG)
    try:
        assert c["alice"].create_job("mlp", "digits", request_id="alice-1", **LONG).id == job.id
        err = refused(c["bob"].create_job, "mlp", "digits", request_id="alice-1", **LONG)
        assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.reason == "REQUEST_ID_IN_USE"
        assert job.id not in err.message
        assert c["root"].create_job("mlp", "digits", request_id="alice-1", **LONG).id == job.id
    finally:
        c["root"].cancel_job(job)
        for client in c.values():
            client.close()


def test_a_caller_sees_trains_on_and_deletes_only_its_own_datasets(owned):
    c = clients(owned)
    folder = owned[2]
    try:
        stored = c["alice"].upload_dataset(npz(folder, "alice_set"))
        assert stored.owner == "alice"
        assert {d.name: d.owner for d in c["alice"].list_datasets()}["alice_set"] == "alice"
        bobs = {d.name for d in c["bob"].list_datasets()}
        assert "alice_set" not in bobs and "digits" in bobs  # built-ins are everyone's

        missing = refused(c["bob"].delete_dataset, "no_such_set")
        err = refused(c["bob"].delete_dataset, "alice_set")
        assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "DATASET_NOT_FOUND"
        assert err.message == missing.message.replace("no_such_set", "alice_set")

        err = refused(c["bob"].create_job, "mlp", "alice_set", **LONG)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "UNKNOWN_DATASET"

        # The name stays alice's: bob's upload of it, even with replace, changes nothing.
        for replace in (False, True):
            err = refused(c["bob"].upload_dataset, npz(folder, "alice_set", n=30), replace=replace)
            assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.reason == "DATASET_EXISTS"
        assert {d.name: d.examples for d in c["alice"].list_datasets()}["alice_set"] == 20
        assert "another caller" in err.message

        # admin sees it, trains on it and deletes it.
        assert {d.name: d.owner for d in c["root"].list_datasets()}["alice_set"] == "alice"
        listed = cli(owned, "root", "datasets", "list")
        assert any(line.startswith("alice_set ") and line.endswith("owner=alice") for line in listed), listed
        job = c["root"].create_job("mlp", "alice_set", **LONG)
        c["root"].cancel_job(job)
        c["root"].delete_dataset("alice_set")
        assert "alice_set" not in {d.name for d in c["alice"].list_datasets()}
    finally:
        for client in c.values():
            client.close()


def test_jobs_and_datasets_from_before_owners_are_seen_by_admins_only(tmp_path, create_token):
    """A data directory an older server wrote (no owner columns) opens with
    every row owned by nobody (""): admins see those rows, other callers do not."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    data = tmp_path / "data"

    def server(**settings):
        srv = create_server(Settings(host="127.0.0.1", port=0, metrics_port=None, grace_seconds=0, data_dir=data,
                                     max_concurrent_jobs=1, **settings), metrics_registry=CollectorRegistry())
        srv.start()
        return srv

    old = server()
    with lossd.Client(f"127.0.0.1:{old.port}", timeout=60) as anonymous:
        job = anonymous.create_job("mlp", "digits", **LONG)
        anonymous.cancel_job(job)
        anonymous.upload_dataset(npz(tmp_path, "old_set"))
    old.stop(0)
    with sqlite3.connect(data / "lossd.sqlite3") as db:  # the schema before owners (and schema versions)
        db.execute("ALTER TABLE jobs DROP COLUMN owner")
        db.execute("ALTER TABLE datasets DROP COLUMN owner")
        db.execute("ALTER TABLE jobs DROP COLUMN lease_owner")
        db.execute("ALTER TABLE jobs DROP COLUMN lease_expires")
        db.execute("DROP TABLE versions")
        db.execute("DROP TABLE schema_version")
        assert "owner" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}

    path = tmp_path / "tokens.jsonl"
    alice, root = create_token(path, "alice", "train"), create_token(path, "root", "admin")
    new = server(tokens_file=path)
    try:
        address = f"127.0.0.1:{new.port}"
        with lossd.Client(address, token=alice, timeout=60) as a, lossd.Client(address, token=root, timeout=60) as r:
            assert a.list_jobs() == [] and "old_set" not in {d.name for d in a.list_datasets()}
            assert refused(a.get_job, job).reason == "JOB_NOT_FOUND"
            assert refused(a.delete_dataset, "old_set").reason == "DATASET_NOT_FOUND"
            assert [(j.id, j.owner, j.state) for j in r.list_jobs()] == [(job.id, "", "cancelled")]
            assert {d.name: d.owner for d in r.list_datasets()}["old_set"] == ""
            # alice's new job is hers and the old rows stay nobody's.
            mine = a.create_job("mlp", "digits", **LONG)
            a.cancel_job(mine)
            assert [j.id for j in a.list_jobs()] == [mine.id]
            assert {j.id: j.owner for j in r.list_jobs()} == {mine.id: "alice", job.id: ""}
    finally:
        new.stop(0)
