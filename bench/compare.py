"""A/B benchmark of two lossd versions on small tensors (a benchmark, not a test).

Runs the working tree's server and a baseline checkout's server at the same
time, with the anchors of ``bench/evaluate.py`` ((a) Keras in-process under
``tf.function``, (b) a bare gRPC echo), and alternates blocks of calls
between all four, so drift in this shared machine's speed hits every side
alike. Prints the medians, c / (a + b) for both versions and new / base.

Make a baseline with ``git worktree add /tmp/lossd-base <commit>``.

Usage: python bench/compare.py --base /tmp/lossd-base [--loss mse|cce] [--rounds 8] [--elements 640]

With ``--elements 1e7`` each block is a few calls instead of 250, and the
anchors are left out: at that size the question is only whether the new
version moves the same bytes as fast as the old one (new / base).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate as bench  # noqa: E402

import lossd  # noqa: E402
from lossd import _requests, wire  # noqa: E402


def base_pythonpath(checkout: str, root: str) -> str:
    """Fills ``root`` so that its ``lossd`` and ``lossd_server`` are the
    baseline's sources: ``client/lossd`` and ``server/lossd_server`` today, or
    ``client/`` and ``server/`` in checkouts from before the layout change."""
    for folder, package in (("client", "lossd"), ("server", "lossd_server")):
        nested = os.path.join(checkout, folder, package)
        source = nested if os.path.isdir(nested) else os.path.join(checkout, folder)
        if not os.path.isfile(os.path.join(source, "__init__.py")):
            # Without it the base server would import the working tree: an A/A run, silently.
            raise SystemExit(f"--base {checkout}: no {package} package in {folder}/ (git worktree add it first)")
        os.symlink(source, os.path.join(root, package))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a checkout of the baseline version")
    parser.add_argument("--loss", choices=sorted(bench.LOSSES), default="mse")
    parser.add_argument("--rounds", type=int, default=8, help="blocks of calls per side")
    parser.add_argument("--elements", type=float, default=640, help="elements per tensor (640 or e.g. 1e7)")
    args = parser.parse_args()

    name = bench.LOSSES[args.loss]
    in_process = bench.anchor_function(args.loss)
    elements = int(args.elements)
    large = elements > 100_000
    calls, warmup = (3, 2) if large else (250, 300)
    y_true, y_pred = bench.inputs(args.loss, elements, np.random.default_rng(0))
    ports = {k: bench.free_port() for k in ("echo", "base", "new", "base_metrics", "new_metrics")}

    def serve(which):
        return [sys.executable, "-m", "lossd.cli", "serve", "--port", str(ports[which]), "--metrics-port",
                str(ports[f"{which}_metrics"]), "--data-dir", os.path.join(scratch, which),
                "--log-level", "WARNING"]

    def ready(which):
        return lambda: bench.wait_ready(f"127.0.0.1:{ports[which]}")

    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="lossd-compare-"))
        for sub in ("path", "base", "new"):
            os.mkdir(os.path.join(scratch, sub))
        stack.enter_context(bench.process([sys.executable, bench.__file__, "--echo-server", str(ports["echo"])],
                                          wait_for=ready("echo")))
        # PYTHONPATH comes before the editable install's finder, so the base
        # server imports the baseline's sources.
        base_path = base_pythonpath(args.base, os.path.join(scratch, "path"))
        stack.enter_context(bench.process(serve("base"), env={"PYTHONPATH": base_path}, wait_for=ready("base")))
        stack.enter_context(bench.process(serve("new"), wait_for=ready("new")))
        base = stack.enter_context(lossd.Client(f"127.0.0.1:{ports['base']}", timeout=600))
        new = stack.enter_context(lossd.Client(f"127.0.0.1:{ports['new']}", timeout=600))
        echo = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{ports['echo']}"))
        echo_call = echo.unary_unary(bench.ECHO_METHOD, request_serializer=None, response_deserializer=None)
        # The echo's bytes are prepared before the clock starts: the anchor runs none of our code.
        payload = _requests.evaluate_request(wire.spec_from_dict(name), _requests.prepare(y_true, y_pred),
                                             "sum_over_batch_size", False).SerializeToString()
        sides = {
            "a": lambda: in_process(y_true, y_pred).numpy(),
            "b": lambda: echo_call(payload),
            "base": lambda: base.evaluate(name, y_true, y_pred),
            "new": lambda: new.evaluate(name, y_true, y_pred),
        }
        if large:
            sides = {k: v for k, v in sides.items() if k in ("base", "new")}
        for client in (base, new):
            np.testing.assert_allclose(client.evaluate(name, y_true, y_pred).loss,
                                       in_process(y_true, y_pred).numpy(), rtol=1e-4)
        for fn in sides.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for key, fn in sides.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    fn()
                    samples[key].append(time.perf_counter() - start)
    m = {k: statistics.median(v) for k, v in samples.items()}
    if large:
        mb = 2 * y_pred.nbytes / 1e6
        print(f"{args.loss} {elements:.0e} elements: base {m['base'] * 1e3:.0f} ms ({mb / m['base']:.0f} MB/s), "
              f"new {m['new'] * 1e3:.0f} ms ({mb / m['new']:.0f} MB/s); new/base {m['new'] / m['base']:.3f}")
        return 0
    anchor = m["a"] + m["b"]
    print(f"{args.loss} 640 elements: (a) {m['a'] * 1e6:.0f} µs, (b) {m['b'] * 1e6:.0f} µs, "
          f"base {m['base'] * 1e6:.0f} µs, new {m['new'] * 1e6:.0f} µs")
    print(f"c/(a+b): base {m['base'] / anchor:.2f}, new {m['new'] / anchor:.2f}; new/base {m['new'] / m['base']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
