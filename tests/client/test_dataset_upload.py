"""Uploading a dataset under a name already taken: refused with
ALREADY_EXISTS unless replace is set, as register_loss does. Both clients
and the command line, against the real server."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import lossd
import lossd.aio
from lossd import cli
from lossd.v1 import training_service_pb2 as pb


def npz(path, examples: int):
    rng = np.random.default_rng(examples)
    np.savez(path, x=rng.integers(0, 256, size=(examples, 8, 8), dtype=np.uint8),
             y=np.arange(examples) % 2)
    return path


def examples(client, name: str) -> int:
    return next(d.examples for d in client.list_datasets() if d.name == name)


def test_the_header_carries_replace():
    assert pb.DatasetHeader(replace=True).replace is True
    assert pb.DatasetHeader.DESCRIPTOR.fields_by_name["replace"].number == 4


def test_an_existing_name_is_refused_unless_replaced(client, tmp_path):
    first = client.upload_dataset(npz(tmp_path / "a.npz", 20), name="taken-sync")
    assert first.examples == 20
    with pytest.raises(lossd.LossdError) as caught:
        client.upload_dataset(npz(tmp_path / "b.npz", 30), name="taken-sync")
    error = caught.value
    assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "DATASET_EXISTS"
    assert error.metadata == {"dataset": "taken-sync"}
    assert "'taken-sync' already exists" in error.message and "replace=True" in error.message
    assert examples(client, "taken-sync") == 20, "the refused upload left the dataset as it was"
    replaced = client.upload_dataset(tmp_path / "b.npz", name="taken-sync", replace=True)
    assert replaced.examples == 30 and examples(client, "taken-sync") == 30


def test_replace_on_a_new_name_just_uploads(client, tmp_path):
    assert client.upload_dataset(npz(tmp_path / "c.npz", 12), name="fresh-replace", replace=True).examples == 12


def test_the_asyncio_client_refuses_and_replaces_the_same_way(address, tmp_path):
    npz(tmp_path / "a.npz", 20)
    npz(tmp_path / "b.npz", 30)

    async def main():
        async with lossd.aio.Client(address, timeout=60) as client:
            await client.upload_dataset(tmp_path / "a.npz", name="taken-aio")
            with pytest.raises(lossd.LossdError) as caught:
                await client.upload_dataset(tmp_path / "b.npz", name="taken-aio")
            replaced = await client.upload_dataset(tmp_path / "b.npz", name="taken-aio", replace=True)
            return caught.value, replaced

    error, replaced = asyncio.run(main())
    assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "DATASET_EXISTS"
    assert replaced.examples == 30


def test_the_command_line_takes_replace(address, tmp_path, capsys):
    path = str(npz(tmp_path / "cli.npz", 16))
    argv = ["datasets", "upload", path, "--name", "taken-cli", "--address", address]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ALREADY_EXISTS DATASET_EXISTS: Dataset 'taken-cli' already exists."), err
    assert "--replace" in err
    assert cli.main([*argv, "--replace"]) == 0
    assert "taken-cli: 16 images" in capsys.readouterr().out
