"""The cost of the evaluation core per request, one compiled call each
against micro-batched calls, in process (a benchmark, not a test).

The 16 ragged Huber requests of bench/concurrency.py (1-128 rows of 10
columns, each its own delta) are evaluated by ``Evaluator.evaluate`` one by
one (the anchor: the path a request takes alone) and by the batcher's rows
program in groups of 2, 4, 8 and 16 (``Batcher._run_together``, the call a
batch leader makes, request checks and slicing included). Groups of each size
alternate in blocks; the table gives microseconds per request (the median of
the blocks) and the ratio to the anchor.

Then ``--threads`` threads (8, as ``lossd serve``'s workers) call
``Evaluator.evaluate`` (the anchor) or ``Batcher.evaluate`` (500 µs delay) in
a loop, in alternating blocks of ``--block-seconds``: requests per second
with batching's own coordination (locks, waits, leaders) included. No gRPC:
this is what batching can save; bench/concurrency.py measures what it does
save through the server.

Usage: python bench/batching.py [--blocks 7] [--rounds 50] [--threads 8] [--block-seconds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.batching import Batcher  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses import custom  # noqa: E402

REDUCTION = "sum_over_batch_size"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=50, help="passes over the 16 requests per block")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--block-seconds", type=float, default=3.0)
    args = parser.parse_args()
    backend.configure_threads(1)  # as lossd serve does (LOSSD_INTER_OP_THREADS)
    evaluator = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"))
    batcher = Batcher(evaluator, max_delay_us=500, max_elements=1 << 20, max_requests=64)
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(16):
        rows = int(rng.integers(1, 129))
        plan = evaluator.planner.plan({"name": "huber", "params": {"delta": float(rng.uniform(0.5, 2.0))}})
        requests.append((plan, {"y_true": rng.normal(size=(rows, 10)).astype(np.float32),
                                "y_pred": rng.normal(size=(rows, 10)).astype(np.float32)}))

    def one_by_one() -> None:
        for plan, tensors in requests:
            evaluator.evaluate(plan, tensors, reduction=REDUCTION)

    def grouped(size: int):
        def run() -> None:
            items = []
            for plan, tensors in requests:
                evaluator.check(plan, tensors, None, REDUCTION)
                items.append(batcher._item(plan, tensors, None, REDUCTION, False))
            for start in range(0, len(items), size):
                batcher._run_together(items[start:start + size])
        return run

    sides = {"one by one": one_by_one, **{f"batches of {k}": grouped(k) for k in (2, 4, 8, 16)}}
    for run in sides.values():  # compile everything first (batched programs compile in the background)
        run()
    evaluator.wait_compiled()
    for run in sides.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.blocks):
        for name, run in sides.items():
            start = time.perf_counter()
            for _ in range(args.rounds):
                run()
            times[name].append((time.perf_counter() - start) / (args.rounds * len(requests)))
    print(f"# lossd bench/batching.py  cpus {os.cpu_count()}  16 ragged Huber requests (1-128 x 10, own delta)  "
          f"{args.blocks} blocks x {args.rounds} rounds")
    anchor = statistics.median(times["one by one"])
    print(f"{'':>16} {'us/request':>11} {'ratio':>6}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>16} {median * 1e6:>11.1f} {median / anchor:>6.2f}")

    def threaded(evaluate) -> float:
        done = [0] * args.threads
        stop = time.perf_counter() + args.block_seconds

        def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                plan, tensors = requests[i % len(requests)]
                evaluate(plan, tensors, reduction=REDUCTION)
                done[k] += 1
                i += 1

        workers = [threading.Thread(target=worker, args=(k,)) for k in range(args.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(done) / args.block_seconds

    loops = {"one by one": evaluator.evaluate, "batcher": batcher.evaluate}
    threaded(batcher.evaluate)  # batched programs for the groups that form
    evaluator.wait_compiled()
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(3):
        for name, evaluate in loops.items():
            rates[name].append(threaded(evaluate))
    print(f"# {args.threads} threads, 3 blocks x {args.block_seconds:g} s per side")
    print(f"{'':>16} {'requests/s':>11} {'ratio':>6}")
    anchor_rate = statistics.median(rates["one by one"])
    for name, values in rates.items():
        print(f"{name:>16} {statistics.median(values):>11,.0f} {statistics.median(values) / anchor_rate:>6.2f}")
    print(f"# batched calls of 2 or more requests: {batcher.batches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
