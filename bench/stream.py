"""EvaluateStream with big tensors against Evaluate (a benchmark, not a test).

Sides, each a ``lossd serve`` process, measured side by side in alternating
blocks with the same pre-serialized requests:

- ``evaluate``: the requests as unary Evaluate calls, one at a time: the
  anchor (its codec lifts each tensor out of the request and writes each
  result tensor once);
- ``stream``: the same requests as items of one EvaluateStream, one in
  flight at a time (the item's answer is read before the next is sent), so
  the two differ only in the codec and the stream's per-item work;
- with ``--baseline-tree DIR``, ``stream@base`` and ``evaluate@base``: the
  same two on a server run from another checkout (its ``client`` and
  ``server`` folders on PYTHONPATH), e.g. the tree before a change.

Each request is MSE of two float32 tensors of ``--elements`` elements with
the gradient, so each answer carries a gradient as large as y_pred.
Printed: MB/s of request tensors, and each side's ratio to ``evaluate``.

Usage: python bench/stream.py [--elements 1000000] [--blocks 4] [--block-seconds 3] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from evaluate import free_port, process, wait_ready  # noqa: E402

EVALUATE = "/lossd.v1.LossService/Evaluate"
STREAM = "/lossd.v1.LossService/EvaluateStream"


def payloads(elements: int, count: int = 4) -> tuple[list[bytes], list[bytes]]:
    """``count`` requests as Evaluate bodies and as EvaluateStream items."""
    from lossd import _requests, wire
    from lossd.v1 import loss_service_pb2

    rng = np.random.default_rng(0)
    unary, items = [], []
    for i in range(count):
        y_true = rng.normal(size=(elements // 100, 100)).astype("float32")
        y_pred = rng.normal(size=(elements // 100, 100)).astype("float32")
        request = _requests.evaluate_request(wire.spec_from_dict("mse"), {"y_true": y_true, "y_pred": y_pred},
                                             "sum_over_batch_size", True)
        unary.append(request.SerializeToString())
        items.append(loss_service_pb2.EvaluateStreamRequest(request=request, request_id=str(i)).SerializeToString())
    return unary, items


class Unary:
    def __init__(self, channel: grpc.Channel, bodies: list[bytes]):
        self.call = channel.unary_unary(EVALUATE)
        self.bodies = bodies

    def run(self, seconds: float) -> int:
        done, stop = 0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            self.call(self.bodies[done % len(self.bodies)], timeout=60)
            done += 1
        return done

    def close(self) -> None:
        pass


class Stream:
    """One open EvaluateStream, fed one item at a time."""

    def __init__(self, channel: grpc.Channel, items: list[bytes]):
        import queue

        self.items = items
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = channel.stream_stream(STREAM)(iter(self.queue.get, None), timeout=3600)

    def run(self, seconds: float) -> int:
        done, stop = 0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            self.queue.put(self.items[done % len(self.items)])
            answer = next(self.responses)
            assert len(answer) > 100, answer  # a gradient, not an error
            done += 1
        return done

    def close(self) -> None:
        self.queue.put(None)
        for _ in self.responses:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1_000_000, help="elements of each tensor")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-seconds", type=float, default=3.0)
    parser.add_argument("--baseline-tree", help="a checkout to run a second server from (its client and server)")
    args = parser.parse_args()

    unary, items = payloads(args.elements)
    trees = {"": None}
    if args.baseline_tree:
        base = os.path.abspath(args.baseline_tree)
        trees["@base"] = {"PYTHONPATH": os.pathsep.join([os.path.join(base, "client"), os.path.join(base, "server")])}
    ports = {name: free_port() for name in trees}
    data_dir = os.path.join("/tmp", f"lossd-bench-stream-{os.getpid()}")
    options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    mb = 2 * args.elements * 4 / 1e6
    print(f"# lossd bench/stream.py  cpus {os.cpu_count()}  MSE of 2 x {args.elements:,} float32 with gradient "
          f"({mb:.0f} MB of request tensors)  {args.blocks} blocks x {args.block_seconds:g} s per side")
    with contextlib.ExitStack() as stack:
        sides = {}
        for name, env in trees.items():
            port = ports[name]
            stack.enter_context(process(
                [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port", "",
                 "--data-dir", f"{data_dir}{name}", "--log-level", "WARNING"],
                env=env, wait_for=lambda p=port: wait_ready(f"127.0.0.1:{p}")))
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}", options=options))
            sides[f"evaluate{name}"] = Unary(channel, unary)
            sides[f"stream{name}"] = Stream(channel, items)
        for side in sides.values():
            side.run(0.5)  # compiles, opens the stream
        totals = dict.fromkeys(sides, 0)
        for _ in range(args.blocks):
            for name, side in sides.items():
                totals[name] += side.run(args.block_seconds)
        for side in sides.values():
            side.close()
    seconds = args.blocks * args.block_seconds
    print(f"{'side':<16} {'requests/s':>11} {'MB/s':>9} {'/evaluate':>10}")
    for name, count in totals.items():
        print(f"{name:<16} {count / seconds:>11.2f} {count * mb / seconds:>9.0f} {count / totals['evaluate']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
