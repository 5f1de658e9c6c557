"""Observations per second of a loss monitor, paired and pending, against
Evaluate of the same rows and a bare gRPC echo (a benchmark, not a test).

Issue 26's scenario: batches of ``--rows`` (256) ids, float32 rows of 10
columns, scored with MSE, sent by one asyncio client process to ``lossd
serve`` in a separate process (SQLite store in a fresh data directory):

- echo: a bare ``grpc.server`` in its own process whose handler parses
  nothing, sent the same bytes as ``paired``;
- evaluate: ``Evaluate`` of the same rows with reduction ``none``: the loss
  computation a pair costs, over gRPC, with nothing stored;
- paired: ``Observe`` with ``y_pred`` and ``y_true`` at once: every row is
  paired, evaluated and committed to the store before the answer;
- late: ``Observe`` of the predictions, then ``Label`` of the same ids (the
  late-label path: each batch's rows are stored pending, then paired).

Every batch carries fresh ids (an id seen before would be skipped as a
retry). At each concurrency the sides run in alternating blocks of
``--block-seconds`` (echo, evaluate, paired, late, echo, ...), so the
machine's drift falls on all of them; the table gives rows per second (a
row: one pair; for ``late``, its two calls count once) and the ratios.

Then the memory of pending ids: ``--pending`` predictions observed and left
unlabelled, with the store's bytes in use (after a WAL checkpoint) per
pending id, and the server's resident memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from evaluate import ECHO_METHOD, free_port, process, wait_ready  # noqa: E402

import lossd  # noqa: E402
from lossd import _requests, wire  # noqa: E402
from lossd.v1 import loss_service_pb2, monitor_service_pb2 as pb  # noqa: E402

OBSERVE = "/lossd.v1.MonitorService/Observe"
LABEL = "/lossd.v1.MonitorService/Label"
EVALUATE = "/lossd.v1.LossService/Evaluate"
MONITOR = "bench"


class Batches:
    """Fresh ids for every batch; the same rows (their bytes encoded once)."""

    def __init__(self, rows: int, rng):
        self.rows = rows
        y_true = rng.normal(size=(rows, 10)).astype(np.float32)
        y_pred = rng.normal(size=(rows, 10)).astype(np.float32)
        self.y_true, self.y_pred = wire.from_numpy(y_true), wire.from_numpy(y_pred)
        self.evaluate = _requests.evaluate_request(wire.spec_from_dict("mse"), _requests.prepare(y_true, y_pred),
                                                   "none", False).SerializeToString()
        self._counter = itertools.count()

    def ids(self) -> list[str]:
        n = next(self._counter)
        return [f"{n}-{i}" for i in range(self.rows)]

    def paired(self) -> bytes:
        return pb.ObserveRequest(monitor=f"monitors/{MONITOR}", ids=self.ids(), y_pred=self.y_pred,
                                 y_true=self.y_true).SerializeToString()

    def late(self) -> tuple[bytes, bytes]:
        ids = self.ids()
        return (pb.ObserveRequest(monitor=f"monitors/{MONITOR}", ids=ids, y_pred=self.y_pred).SerializeToString(),
                pb.LabelRequest(monitor=f"monitors/{MONITOR}", ids=ids, y_true=self.y_true).SerializeToString())


async def run_block(unit, concurrency: int, seconds: float) -> int:
    """Runs ``unit()`` (one batch) from ``concurrency`` tasks for ``seconds``; batches done."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await unit()
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def measure(echo_address: str, lossd_address: str, levels: list[int], blocks: int, seconds: float,
                  batches: Batches) -> dict:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(echo_address, options=options) as echo_channel, \
            grpc.aio.insecure_channel(lossd_address, options=options) as channel:
        echo = echo_channel.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)
        evaluate = channel.unary_unary(EVALUATE, request_serializer=None, response_deserializer=None)
        observe = channel.unary_unary(OBSERVE, request_serializer=None, response_deserializer=pb.ObserveResponse.FromString)
        label = channel.unary_unary(LABEL, request_serializer=None, response_deserializer=pb.ObserveResponse.FromString)
        payload = batches.paired()  # the echo's bytes: one Observe's

        async def paired():
            answer = await observe(batches.paired())
            assert answer.paired == batches.rows, answer

        async def late():
            first, second = batches.late()
            await observe(first)
            answer = await label(second)
            assert answer.paired == batches.rows, answer

        async def evaluated():
            raw = await evaluate(batches.evaluate)
            assert loss_service_pb2.EvaluateResponse.FromString(raw).HasField("loss")

        sides = {"echo": lambda: echo(payload), "evaluate": evaluated, "paired": paired, "late": late}
        for unit in sides.values():  # warm-up: compiles, connections, the store's first pages
            for _ in range(5):
                await unit()
        results = {}
        print(f"{'concurrency':>11} {'echo rows/s':>12} {'evaluate':>10} {'paired':>10} {'late':>10} "
              f"{'paired/evaluate':>16} {'paired/echo':>12}", flush=True)
        for concurrency in levels:
            totals = dict.fromkeys(sides, 0)
            for _ in range(blocks):
                for name, unit in sides.items():
                    totals[name] += await run_block(unit, concurrency, seconds)
            rates = {name: totals[name] * batches.rows / (blocks * seconds) for name in sides}
            results[concurrency] = rates
            print(f"{concurrency:>11} {rates['echo']:>12,.0f} {rates['evaluate']:>10,.0f} {rates['paired']:>10,.0f} "
                  f"{rates['late']:>10,.0f} {rates['paired'] / rates['evaluate']:>16.2f} "
                  f"{rates['paired'] / rates['echo']:>12.3f}", flush=True)
        return results


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def store_bytes(data_dir: pathlib.Path) -> int:
    """The database's bytes with its write-ahead log folded in (a checkpoint
    from a connection of our own: the WAL's size says little, it is reused)."""
    import sqlite3

    path = data_dir / "lossd.sqlite3"
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, size, free = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size",
                                                                                "freelist_count"))
    return (pages - free) * size


def pending_memory(client: lossd.Client, pid: int, data_dir: pathlib.Path, count: int, rows: int, rng) -> None:
    client.create_monitor("pending", "mse", [3600])
    y_pred = rng.normal(size=(rows, 10)).astype(np.float32)
    client.observe("pending", [f"warm-{i}" for i in range(rows)], y_pred)
    before_disk, before_rss = store_bytes(data_dir), rss_bytes(pid)
    for start in range(0, count, rows):
        client.observe("pending", [f"p{start + i}" for i in range(rows)], y_pred)
    after_disk, after_rss = store_bytes(data_dir), rss_bytes(pid)
    pending = client.monitor("pending").pending["predictions"]
    row_bytes = y_pred[0].nbytes
    # The server's resident memory moves with TensorFlow's and the allocator's
    # own pools by tens of MB either way; it is shown, not divided.
    print(f"# pending ids: {pending:,} ({row_bytes} bytes of prediction each); store +{after_disk - before_disk:,} B "
          f"= {(after_disk - before_disk) / count:,.0f} B per pending id; server RSS {before_rss / 2**20:,.0f} MiB "
          f"before, {after_rss / 2**20:,.0f} MiB after (the pending rows live in the store)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="ids per batch [256]")
    parser.add_argument("--concurrency", default="1,64", help="batches in flight at once [1,64]")
    parser.add_argument("--blocks", type=int, default=3, help="rounds of alternating blocks [3]")
    parser.add_argument("--block-seconds", type=float, default=3.0, help="[3]")
    parser.add_argument("--pending", type=int, default=25_600, help="pending ids for the memory figure [25600]")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lossd_cmd = str(pathlib.Path(sys.executable).with_name("lossd"))
    echo_port, lossd_port = free_port(), free_port()
    echo_address, lossd_address = f"127.0.0.1:{echo_port}", f"127.0.0.1:{lossd_port}"
    with tempfile.TemporaryDirectory() as folder:
        data_dir = pathlib.Path(folder) / "data"
        with process([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                      f"from evaluate import run_echo_server; run_echo_server({echo_port})"],
                     wait_for=lambda: wait_ready(echo_address)), \
                process([lossd_cmd, "serve", "--port", str(lossd_port), "--metrics-port", "off", "--data-dir",
                         str(data_dir), "--warmup", "false", "--max-pending-ids", str(args.pending + 80 * args.rows),
                         "--max-monitor-samples", "10000000"],
                        wait_for=lambda: wait_ready(lossd_address, 600), log=pathlib.Path(folder) / "serve.log") as server:
            import tensorflow as tf  # noqa: F401 - only for the header's version
            print(f"# lossd bench/monitors.py  tensorflow {tf.__version__}  cpus {os.cpu_count()}  rows {args.rows}  "
                  f"blocks {args.blocks} x {args.block_seconds:g} s", flush=True)
            with lossd.Client(lossd_address, timeout=600) as client:
                client.create_monitor(MONITOR, "mse", [3600])
                levels = [int(c) for c in args.concurrency.split(",")]
                asyncio.run(measure(echo_address, lossd_address, levels, args.blocks, args.block_seconds,
                                    Batches(args.rows, rng)))
                pending_memory(client, server.pid, data_dir, args.pending, args.rows, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
