"""Per-token training quotas (issue 12): a token's max_jobs bounds its jobs
queued or running, its max_upload_bytes the bytes of its stored datasets
plus the upload in progress. Past them RESOURCE_EXHAUSTED (CALLER_JOB_LIMIT,
CALLER_STORAGE_LIMIT), other callers unaffected, nothing stored damaged and
no partial upload left. Real server, tokens made by `lossd tokens create`."""

from __future__ import annotations

import grpc
import pytest

import lossd
from test_owners import LONG, npz, refused

pytest.importorskip("tensorflow")

UPLOAD_LIMIT = 40_000


@pytest.fixture(scope="module")
def limited(serve_with_tokens):
    """alice: train, at most 2 jobs and UPLOAD_LIMIT bytes of datasets; bob:
    train, no limits; root: admin. Yields ``(clients by name, data dir, folder)``."""
    address, tokens, folder = serve_with_tokens(
        {"alice": ("train", "--max-jobs", "2", "--max-upload-bytes", str(UPLOAD_LIMIT)), "bob": ("train",),
         "root": ("admin",)}, max_concurrent_jobs=1, metrics_port=0)
    clients = {name: lossd.Client(address, token=token, timeout=60) for name, token in tokens.items()}
    yield clients, folder / "data", folder, serve_with_tokens.server(address).metrics
    for client in clients.values():
        client.close()


def test_a_caller_at_its_job_limit_is_refused_and_others_are_not(limited):
    c, _, _, _ = limited
    jobs = [c["alice"].create_job("mlp", "digits", request_id=f"a-{i}", **LONG) for i in range(2)]
    try:
        err = refused(c["alice"].create_job, "mlp", "digits", **LONG)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "CALLER_JOB_LIMIT"
        assert "Expected at most 2" in err.message and "while 2 are queued or running" in err.message
        assert err.metadata == {"active": "2", "limit": "2", "caller": "alice"}
        assert len(c["alice"].list_jobs()) == 2, "a refused job was stored"
        # A retry of a create that was stored still gets its job.
        assert c["alice"].create_job("mlp", "digits", request_id="a-1", **LONG).id == jobs[1].id
        jobs.append(c["bob"].create_job("mlp", "digits", **LONG))  # bob has no limit
        c["alice"].cancel_job(jobs[0])  # a finished job no longer counts
        jobs.append(c["alice"].create_job("mlp", "digits", **LONG))
        assert jobs[-1].owner == "alice"
    finally:
        for job in jobs:
            if not c["root"].get_job(job).done:
                c["root"].cancel_job(job)


def _files(data):
    return sorted(p.name for p in (data / "datasets").rglob("*") if p.is_file())


def test_a_caller_past_its_upload_bytes_is_refused_and_nothing_stored_is_damaged(limited):
    c, data, folder, metrics = limited
    # One upload larger than the whole limit: refused from its header, before a byte is written.
    err = refused(c["alice"].upload_dataset, npz(folder, "huge", n=1000))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "CALLER_STORAGE_LIMIT"
    assert f"Expected at most {UPLOAD_LIMIT:,} in all" in err.message and "alice" in err.message
    assert _files(data) == []

    stored = []
    for i in range(20):
        try:
            stored.append(c["alice"].upload_dataset(npz(folder, f"part{i}", n=40)))
        except lossd.LossdError as exc:
            err = exc
            break
    assert 1 <= len(stored) < 20
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "CALLER_STORAGE_LIMIT"
    assert int(err.metadata["used_bytes"]) == sum(d.size_bytes for d in stored)
    mine = {d.name: d for d in c["alice"].list_datasets() if d.owner == "alice"}
    assert sorted(mine) == sorted(d.name for d in stored), "a refused upload was stored"
    assert sum(d.size_bytes for d in mine.values()) <= UPLOAD_LIMIT
    assert len(_files(data)) == len(stored), "a refused upload left a file"  # nothing in .tmp either
    # Each token's stored bytes are counted under its name, refused uploads not at all.
    assert metrics.registry.get_sample_value("lossd_caller_upload_bytes_total", {"caller": "alice"}) == \
        sum(d.size_bytes for d in stored)

    # The stored datasets still train; other callers are not limited by alice's bytes.
    job = c["alice"].create_job("mlp", stored[0].name, **LONG)
    c["alice"].cancel_job(job)
    c["bob"].upload_dataset(npz(folder, "bobs", n=400))

    # Deleting frees alice's share.
    c["alice"].delete_dataset(stored[0].name)
    c["alice"].upload_dataset(npz(folder, "again", n=40))
