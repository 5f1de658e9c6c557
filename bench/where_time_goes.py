"""Where lossd's requests/s go under concurrency (a benchmark, not a test).

``bench/concurrency.py`` compares lossd with a bare gRPC echo. This splits
the gap into steps, each a server measured side by side in alternating
blocks, with the same pre-serialized requests (issue 13's ragged Huber
scenario) sent by the same asyncio client:

- ``echo``: the anchor (8 threads, TensorFlow not imported);
- ``echo aio``: the same echo on grpc.aio's server (one event loop, no
  thread pool): whether an asyncio server would carry more here;
- ``echo+tf+pool``: the same echo with TensorFlow imported and one op run,
  and lossd's default thread pool (``workers`` + ``max_streams`` threads):
  what lossd's process set-up alone costs a server that does nothing;
- ``plumbing``: ``lossd serve`` with its defaults, except that Evaluate
  answers each distinct request from a memo after evaluating it once: every
  interceptor, the request parse, the handler and the response serializer
  run; the evaluation (checks, admission, batching, TensorFlow) does not;
- ``lossd``: ``lossd serve`` with its defaults;
- ``lossd x2``: two ``lossd serve`` processes, the client's concurrency split
  between them (each gets half the requests in flight): what a second GIL
  buys, as replicas on one host would;
- ``--variant NAME:KEY=VALUE,...`` (repeatable): ``lossd serve`` with those
  settings in its environment, e.g. a smaller thread pool
  (``pool4:LOSSD_WORKERS=2,LOSSD_MAX_STREAMS=2``).

Each ratio is requests/s over the echo's. The memo exists only in this
benchmark's server process (``--plumbing-server``), patched in before
``lossd serve`` starts.

Usage: python bench/where_time_goes.py [--concurrency 1,64] [--blocks 3] [--block-seconds 4]
       [--variant NAME:KEY=VALUE,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from concurrency import EVALUATE_METHOD, requests, run_block, warm_crowd  # noqa: E402
from evaluate import ECHO_METHOD, free_port, process, wait_ready  # noqa: E402


def run_plumbing_server(argv: list[str]) -> int:
    """``lossd serve argv`` whose Evaluate answers repeated requests from a memo."""
    from lossd.cli import main as cli_main
    from lossd_server.grpc import loss_servicer

    evaluate = loss_servicer.LossServicer._evaluate
    memo: dict[bytes, object] = {}

    def memoized(self, request, caller, context, contents=None):
        key = request.SerializeToString() + b"".join(bytes(v) for v in (contents or {}).values())
        answer = memo.get(key)
        if answer is None:
            answer = memo[key] = evaluate(self, request, caller, context, contents)
        return answer

    loss_servicer.LossServicer._evaluate = memoized
    return cli_main(argv)


def split(calls: list, count: int):
    """One call that spreads ``count`` requests in flight over ``calls``."""
    async def run(payloads: list[bytes], concurrency: int, seconds: float) -> tuple[int, list[bytes]]:
        shares = [concurrency // count + (k < concurrency % count) for k in range(count)]
        done = await asyncio.gather(*(run_block(c, payloads, n, seconds) for c, n in zip(calls, shares) if n))
        return sum(d for d, _ in done), [a for _, kept in done for a in kept]
    return run


async def measure(sides: dict[str, list[tuple[str, str]]], levels: list[int], blocks: int, seconds: float,
                  payloads: list[bytes]) -> None:
    channels = {address: grpc.aio.insecure_channel(address) for targets in sides.values() for address, _ in targets}
    try:
        calls = {}
        for name, targets in sides.items():
            parts = [channels[address].unary_unary(method) for address, method in targets]
            for call in parts:
                for payload in payloads:
                    await call(payload)
                await warm_crowd(call, payloads)
            calls[name] = split(parts, len(parts))
        names = list(calls)
        print(f"{'concurrency':>11} " + " ".join(f"{n + ' req/s':>19}" for n in names) + " "
              + " ".join(f"{n + '/echo':>19}" for n in names[1:]))
        for concurrency in levels:
            totals = dict.fromkeys(names, 0)
            for _ in range(blocks):
                for name, run in calls.items():
                    done, _ = await run(payloads, concurrency, seconds)
                    totals[name] += done
            rates = {n: totals[n] / (blocks * seconds) for n in names}
            print(f"{concurrency:>11} " + " ".join(f"{rates[n]:>19,.0f}" for n in names) + " "
                  + " ".join(f"{rates[n] / rates['echo']:>19.2f}" for n in names[1:]), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,64", help="requests in flight, comma-separated")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per side and concurrency")
    parser.add_argument("--block-seconds", type=float, default=4.0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also lossd serve with these LOSSD_* settings in its environment (repeatable)")
    parser.add_argument("--plumbing-server", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plumbing_server is not None:
        return run_plumbing_server(args.plumbing_server)

    from lossd.cli import unknown_variables
    from lossd_server.config import Settings

    defaults = Settings()
    pool = defaults.workers + defaults.max_streams
    levels = [int(c) for c in args.concurrency.split(",")]
    payloads = requests(16, np.random.default_rng(0))
    variants = {}
    for text in args.variant:
        name, _, pairs = text.partition(":")
        settings = [pair.split("=", 1) for pair in pairs.split(",") if pair]
        if not name or not settings or any(len(pair) != 2 for pair in settings):
            parser.error(f"--variant expects NAME:KEY=VALUE,... Received: {text!r}")
        # The server would only warn on its stderr, which is not shown here.
        misspelt = unknown_variables(dict(settings), Settings.model_fields)
        if misspelt:
            parser.error(f"--variant {name}: {'; '.join(misspelt)}")
        variants[name] = dict(settings)
    ports = {name: free_port() for name in ("echo", "echo aio", "echo+tf+pool", "plumbing", "lossd", "lossd-b",
                                            *variants)}
    data_dir = os.path.join("/tmp", f"lossd-bench-{os.getpid()}")
    evaluate = os.path.join(os.path.dirname(__file__), "evaluate.py")
    print(f"# lossd bench/where_time_goes.py  cpus {os.cpu_count()}  16 ragged Huber requests (1-128 x 10, own "
          f"delta)  {args.blocks} blocks x {args.block_seconds:g} s per side  lossd's pool {pool} threads")

    def serve(name: str) -> list[str]:
        return ["serve", "--port", str(ports[name]), "--metrics-port", "", "--data-dir", f"{data_dir}-{name}",
                "--log-level", "WARNING"]

    def ready(name: str):
        return lambda: wait_ready(f"127.0.0.1:{ports[name]}")

    with process([sys.executable, evaluate, "--echo-server", str(ports["echo"])], wait_for=ready("echo")), \
            process([sys.executable, evaluate, "--echo-server", str(ports["echo aio"]), "--echo-asyncio"],
                    wait_for=ready("echo aio")), \
            process([sys.executable, evaluate, "--echo-server", str(ports["echo+tf+pool"]), "--echo-threads",
                     str(pool), "--echo-tensorflow"], wait_for=ready("echo+tf+pool")), \
            process([sys.executable, __file__, "--plumbing-server", *serve("plumbing")], wait_for=ready("plumbing")), \
            process([sys.executable, "-m", "lossd.cli", *serve("lossd")], wait_for=ready("lossd")), \
            process([sys.executable, "-m", "lossd.cli", *serve("lossd-b")], wait_for=ready("lossd-b")), \
            contextlib.ExitStack() as stack:
        for name, env in variants.items():
            stack.enter_context(process([sys.executable, "-m", "lossd.cli", *serve(name)], env=env,
                                        wait_for=ready(name)))

        def target(name: str) -> tuple[str, str]:
            return f"127.0.0.1:{ports[name]}", ECHO_METHOD if name.startswith("echo") else EVALUATE_METHOD
        sides = {name: [target(name)] for name in ("echo", "echo aio", "echo+tf+pool", "plumbing", "lossd")}
        sides["lossd x2"] = [target("lossd"), target("lossd-b")]
        sides.update({name: [target(name)] for name in variants})
        asyncio.run(measure(sides, levels, args.blocks, args.block_seconds, payloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
