"""``lossd serve --processes 2`` against one process (a benchmark, not a test).

The same pre-serialized requests as ``bench/where_time_goes.py`` (issue 13's
ragged Huber: 1-128 rows of 10 float32, each request its own delta), sent by
one asyncio client, side by side in alternating blocks:

- ``echo``: the anchor, a bare threaded grpcio echo (8 threads);
- ``p1``: ``lossd serve`` with its defaults (one process, metrics on, as on
  every side), one connection;
- ``p2 k1``: ``lossd serve --processes 2``, one connection: it stays with
  one process, so this should read as ``p1``;
- ``p2 k4``, ``p2 k8``: the same server, four or eight connections (what
  ``lossd.Client(..., connections=K)`` opens: channels with a local
  subchannel pool each), the requests in flight spread over them. The
  kernel hashes each connection to a process, so four may well split 3:1
  or 4:0; eight even out more often;
- ``2 ports``: two one-process ``lossd serve`` on two ports, the requests in
  flight split between them: the earlier measurement of a second GIL that
  ``--processes 2`` is meant to match on one port.

Each ratio is requests/s over the echo's, and ``k4/p1``, ``k8/p1`` the gain
of the second process.

``--metric-costs`` measures instead what one metric update costs in memory
(one process) and in prometheus_client's multiprocess files (several), each
in a fresh interpreter, 100,000 calls.

Usage: python bench/processes.py [--concurrency 1,8,64] [--blocks 3] [--block-seconds 4]
       python bench/processes.py --metric-costs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from concurrency import EVALUATE_METHOD, alternate, requests, warm_crowd  # noqa: E402
from evaluate import ECHO_METHOD, free_port, process, wait_ready  # noqa: E402
from where_time_goes import split  # noqa: E402


def wait_all_serving(metrics_port: int, processes: int, timeout: float = 300.0) -> None:
    """Waits until the supervisor's /metrics says that ``processes`` serve."""
    deadline = time.monotonic() + timeout
    line = f'lossd_serving_processes{{state="serving"}} {float(processes)}'
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if line in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{processes} processes did not come up")


async def measure(sides: dict[str, list[tuple[str, str]]], levels: list[int], blocks: int, seconds: float,
                  payloads: list[bytes]) -> None:
    # One channel per (side, target): a local subchannel pool each, so that
    # targets with the same address are connections of their own.
    channels = []
    calls = {}
    for name, targets in sides.items():
        parts = []
        for address, method in targets:
            channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            parts.append(channel.unary_unary(method))
        for call in parts:
            for payload in payloads:
                await call(payload)
            await warm_crowd(call, payloads)
        calls[name] = split(parts, len(parts))
    try:
        names = list(calls)
        print(f"{'concurrency':>11} " + " ".join(f"{n + ' req/s':>15}" for n in names) + " "
              + " ".join(f"{n + '/echo':>14}" for n in names[1:]) + f" {'k4/p1':>6} {'k8/p1':>6}")
        for concurrency in levels:
            rates = await alternate(calls, payloads, concurrency, blocks, seconds)
            print(f"{concurrency:>11} " + " ".join(f"{rates[n]:>15,.0f}" for n in names) + " "
                  + " ".join(f"{rates[n] / rates['echo']:>14.2f}" for n in names[1:])
                  + f" {rates['p2 k4'] / rates['p1']:>6.2f} {rates['p2 k8'] / rates['p1']:>6.2f}", flush=True)
    finally:
        for channel in channels:
            await channel.close()


METRIC_COSTS = """
import time
from prometheus_client import CollectorRegistry, Counter, Histogram
registry = CollectorRegistry()
counter = Counter("c", "c", ["a"], registry=registry).labels("b")
histogram = Histogram("h", "h", registry=registry)
for name, update in (("Counter.inc", counter.inc), ("Histogram.observe", lambda: histogram.observe(0.001))):
    start = time.perf_counter()
    for _ in range(100_000):
        update()
    print(f"  {name}: {(time.perf_counter() - start) * 10:.1f} us")
"""


def metric_costs() -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for what, env in (("in memory", {}), ("multiprocess files", {"PROMETHEUS_MULTIPROC_DIR": folder})):
            print(what, flush=True)
            environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            subprocess.run([sys.executable, "-c", METRIC_COSTS], env={**environ, **env}, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,64", help="requests in flight, comma-separated")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per side and concurrency")
    parser.add_argument("--block-seconds", type=float, default=4.0)
    parser.add_argument("--metric-costs", action="store_true", help="measure one metric update's cost instead")
    args = parser.parse_args()
    if args.metric_costs:
        metric_costs()
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    payloads = requests(16, np.random.default_rng(0))
    ports = {name: free_port() for name in ("echo", "p1", "p2", "p2 metrics", "a", "b")}
    data_dir = os.path.join("/tmp", f"lossd-bench-processes-{os.getpid()}")
    evaluate = os.path.join(os.path.dirname(__file__), "evaluate.py")
    print(f"# lossd bench/processes.py  cpus {os.cpu_count()}  16 ragged Huber requests (1-128 x 10, own delta)  "
          f"{args.blocks} blocks x {args.block_seconds:g} s per side")

    # Metrics on, as by default, on every side: with several processes they
    # go through prometheus_client's multiprocess files, a cost of their own.
    def serve(name: str, *more: str) -> list[str]:
        return [sys.executable, "-m", "lossd.cli", "serve", "--port", str(ports[name]), "--metrics-port", "0",
                "--data-dir", f"{data_dir}-{name}", "--log-level", "WARNING", "--drain-seconds", "0",
                "--grace-seconds", "0", *more]

    def ready(name: str):
        return lambda: wait_ready(f"127.0.0.1:{ports[name]}", timeout=300)

    def target(name: str) -> tuple[str, str]:
        return f"127.0.0.1:{ports[name]}", ECHO_METHOD if name == "echo" else EVALUATE_METHOD

    with process([sys.executable, evaluate, "--echo-server", str(ports["echo"])], wait_for=ready("echo")), \
            process(serve("p1"), wait_for=ready("p1")), \
            process(serve("p2", "--processes", "2", "--metrics-port", str(ports["p2 metrics"])),
                    wait_for=lambda: wait_all_serving(ports["p2 metrics"], 2)), \
            process(serve("a"), wait_for=ready("a")), process(serve("b"), wait_for=ready("b")):
        sides = {"echo": [target("echo")], "p1": [target("p1")], "p2 k1": [target("p2")],
                 "p2 k4": [target("p2")] * 4, "p2 k8": [target("p2")] * 8, "2 ports": [target("a"), target("b")]}
        asyncio.run(measure(sides, levels, args.blocks, args.block_seconds, payloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
