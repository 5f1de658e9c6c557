"""Requests per second under concurrency, lossd against a bare gRPC echo
(a benchmark, not a test).

The scenario of issue 13: one asyncio client process sends small Huber
evaluations, each request with its own row count (1-128 rows of 10 columns)
and its own ``delta``; 16 different requests are sent round-robin. Every
request is serialized before the clock starts, and both servers get the same
bytes through the same generic asyncio stub, so the client's cost is the same
for both and none of lossd's client code runs while timing.

- echo: a separate process with a bare ``grpc.server`` of 8 threads whose
  handler parses nothing and answers 8 bytes;
- lossd: ``lossd serve`` in a separate process with its defaults (8 workers,
  micro-batching on: ``LOSSD_BATCH_MAX_DELAY_US`` 500);
- lossd-off: the same with batching off (``--batch-max-delay-us 0``), beside it.

For each concurrency (requests in flight at once) the three run in alternating
blocks of ``--block-seconds`` (echo, lossd, lossd-off, echo, ...), and the
table gives requests/s of each and the ratios lossd/echo, lossd-off/echo and
lossd/lossd-off (at concurrency 1 the last is the latency cost of batching,
inverted: 1.00 is none). An error fails the run (gRPC raises it), and kept
answers are parsed after each level.

Usage: python bench/concurrency.py [--concurrency 1,8,64,256] [--blocks 3] [--block-seconds 5]
                                   [--batch-max-delay-us 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from evaluate import ECHO_METHOD, free_port, process, wait_ready  # noqa: E402

from lossd import _requests, wire  # noqa: E402
from lossd.v1 import loss_service_pb2  # noqa: E402

EVALUATE_METHOD = "/lossd.v1.LossService/Evaluate"


def requests(count: int, rng) -> list[bytes]:
    """``count`` serialized Huber requests: 1-128 rows of 10 columns, each with its own delta."""
    out = []
    for _ in range(count):
        rows = int(rng.integers(1, 129))
        y_true = rng.normal(size=(rows, 10)).astype("float32")
        y_pred = rng.normal(size=(rows, 10)).astype("float32")
        spec = wire.spec_from_dict("huber", {"delta": float(rng.uniform(0.5, 2.0))})
        out.append(_requests.evaluate_request(spec, _requests.prepare(y_true, y_pred), "sum_over_batch_size",
                                              False).SerializeToString())
    return out


async def run_block(call, payloads: list[bytes], concurrency: int, seconds: float,
                    latencies: list[float] | None = None) -> tuple[int, list[bytes]]:
    """Calls ``call`` from ``concurrency`` tasks for ``seconds`` (each task at
    least once); the number of answers, and a few of them to check. Each
    call's seconds are appended to ``latencies`` when it is given."""
    done = 0
    kept: list[bytes] = []
    stop = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while True:
            start = time.perf_counter()
            answer = await call(payloads[i % len(payloads)])
            end = time.perf_counter()
            if latencies is not None:
                latencies.append(end - start)
            done += 1
            if len(kept) < 64:
                kept.append(answer)
            i += 1
            if end >= stop:
                return

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done, kept


async def warm_crowd(call, payloads: list[bytes]) -> None:
    """Sends the requests 16 at a time until none is refused: batched
    programs compile when requests first arrive together, and while they do,
    requests past max_pending_compiles are refused (COMPILE_BUSY)."""
    for _ in range(50):
        answers = await asyncio.gather(*(call(p) for p in payloads), return_exceptions=True)
        errors = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        if any(e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors):
            raise errors[0]
        if not errors:
            return
        await asyncio.sleep(0.2)
    raise SystemExit("requests still refused after the warm-up")


async def alternate(calls: dict, payloads: list[bytes], concurrency: int, blocks: int,
                    seconds: float) -> dict[str, float]:
    """Requests/s of each side of ``calls`` (name -> a ``run_block``-like
    coroutine function), measured in ``blocks`` rounds that visit every side
    in turn, so drift in the machine's speed falls on all of them alike."""
    totals = dict.fromkeys(calls, 0)
    for _ in range(blocks):
        for name, run in calls.items():
            done, _ = await run(payloads, concurrency, seconds)
            totals[name] += done
    return {name: totals[name] / (blocks * seconds) for name in calls}


async def measure(echo_address: str, lossd_address: str, off_address: str, levels: list[int], blocks: int,
                  seconds: float, payloads: list[bytes]) -> None:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(echo_address, options=options) as echo_channel, \
            grpc.aio.insecure_channel(lossd_address, options=options) as lossd_channel, \
            grpc.aio.insecure_channel(off_address, options=options) as off_channel:
        calls = {"echo": echo_channel.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None),
                 "lossd": lossd_channel.unary_unary(EVALUATE_METHOD, request_serializer=None,
                                                    response_deserializer=None),
                 "lossd-off": off_channel.unary_unary(EVALUATE_METHOD, request_serializer=None,
                                                      response_deserializer=None)}
        # Warm-up: each request once, one at a time, so every program (one
        # per delta today) compiles before a crowd waits for it (past
        # max_pending_compiles waiting requests are refused); then the crowd.
        for call in calls.values():
            for payload in payloads:
                await call(payload)
            await warm_crowd(call, payloads)
        print(f"{'concurrency':>11} {'echo req/s':>11} {'lossd req/s':>12} {'off req/s':>10} {'lossd/echo':>11} "
              f"{'off/echo':>9} {'lossd/off':>10}")
        for concurrency in levels:
            totals = {name: 0 for name in calls}
            answers: list[bytes] = []
            for _ in range(blocks):
                for name, call in calls.items():
                    done, kept = await run_block(call, payloads, concurrency, seconds)
                    totals[name] += done
                    if name != "echo":
                        answers += kept
            for raw in answers:
                if not loss_service_pb2.EvaluateResponse.FromString(raw).HasField("loss"):
                    raise SystemExit("lossd answered without a loss")
            echo, on, off = (totals[k] / (blocks * seconds) for k in ("echo", "lossd", "lossd-off"))
            print(f"{concurrency:>11} {echo:>11,.0f} {on:>12,.0f} {off:>10,.0f} {on / echo:>11.2f} "
                  f"{off / echo:>9.2f} {on / off:>10.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,64,256", help="requests in flight, comma-separated")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per side and concurrency")
    parser.add_argument("--block-seconds", type=float, default=5.0)
    parser.add_argument("--batch-max-delay-us", type=int, default=500, help="the batching server's delay")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    payloads = requests(16, np.random.default_rng(0))
    echo_port, lossd_port, off_port = free_port(), free_port(), free_port()
    data_dir = os.path.join("/tmp", f"lossd-bench-{os.getpid()}")
    print(f"# lossd bench/concurrency.py  cpus {os.cpu_count()}  16 ragged Huber requests (1-128 x 10, "
          f"own delta)  {args.blocks} blocks x {args.block_seconds:g} s per side  batching delay "
          f"{args.batch_max_delay_us} us")
    evaluate = os.path.join(os.path.dirname(__file__), "evaluate.py")
    def serve(port: int, delay_us: int) -> list[str]:
        return [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port", "",
                "--data-dir", f"{data_dir}-{port}", "--log-level", "WARNING", "--batch-max-delay-us", str(delay_us)]

    with process([sys.executable, evaluate, "--echo-server", str(echo_port)],
                 wait_for=lambda: wait_ready(f"127.0.0.1:{echo_port}")), \
            process(serve(lossd_port, args.batch_max_delay_us),
                    wait_for=lambda: wait_ready(f"127.0.0.1:{lossd_port}")), \
            process(serve(off_port, 0), wait_for=lambda: wait_ready(f"127.0.0.1:{off_port}")):
        asyncio.run(measure(f"127.0.0.1:{echo_port}", f"127.0.0.1:{lossd_port}", f"127.0.0.1:{off_port}", levels,
                            args.blocks, args.block_seconds, payloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
