"""Side-by-side benchmark of loss evaluation (a benchmark, not a test).

In one run, for each loss and size, it times:

  (a) the same Keras loss in this process under ``tf.function``;
  (b) a bare gRPC round trip on loopback carrying the same request bytes
      (a generic handler that parses nothing and answers 8 bytes, as
      Evaluate answers a scalar), served by a separate process with the same
      gRPC server set-up as lossd;
  (c) lossd ``Evaluate`` through the thin client, the server in a separate
      process (as deployed);

and prints medians and the ratio c / (a + b). The three run in alternating
blocks (a, b, c, a, b, c, ...), so a slow spell of this shared machine hits
all three alike instead of whichever ran during it. For the largest size it also
prints request bytes per second of (c) as a share of (b). It then checks that
varying batch sizes after warm-up compile nothing new, and with
``--metrics-compare`` runs (c) for small tensors with metrics on and off.

Usage: python bench/evaluate.py [--quick] [--metrics-compare] [--sizes 640,1e6,1e7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent import futures

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import lossd  # noqa: E402
from lossd import _requests, wire  # noqa: E402

ECHO_METHOD = "/bench.Echo/Call"
LOSSES = {"mse": "mean_squared_error", "cce": "categorical_crossentropy"}
KERAS_CLASSES = {"mse": "MeanSquaredError", "cce": "CategoricalCrossentropy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_echo_server(port: int, threads: int = 8, tensorflow: bool = False, asyncio_server: bool = False,
                    answer_bytes: int = 8) -> None:
    """The anchor server: lossd's gRPC set-up, a handler that does no work.

    ``threads``, ``tensorflow`` (imported, one op run) and ``asyncio_server``
    (grpc.aio's server, one event loop instead of a thread pool) exist for
    bench/where_time_goes.py, which measures what each costs the echo;
    ``answer_bytes`` 0 makes it bench/peers.py's sink (answers empty)."""
    answer = b"\0" * answer_bytes
    if tensorflow:
        import tensorflow as tf
        tf.constant(1.0) + 1.0
    if asyncio_server:
        asyncio.run(_run_asyncio_echo(port))
        return
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: answer,
                                                    request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         options=[("grpc.max_receive_message_length", 256 << 20),
                                  ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def _run_asyncio_echo(port: int) -> None:
    async def call(request, context):
        return b"\0" * 8

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=None)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@contextlib.contextmanager
def process(args, env=None, wait_for=None, log=None):
    """Runs ``args`` as a server for the ``with`` block, then stops it and
    every process it started (its own process group), also on errors and
    Ctrl-C. ``log``: a file for its stdout and stderr (a server that logs
    every request would block on a pipe nobody reads)."""
    out = open(log, "w") if log else None
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=out or subprocess.DEVNULL,
                            stderr=out or subprocess.PIPE, text=True, start_new_session=True)
    try:
        if wait_for:
            wait_for()
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what ignored SIGTERM, children included
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out:
            out.close()


def wait_ready(address: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                pass
    raise RuntimeError(f"{address} did not come up")


def timed_side_by_side(fns, iterations: int, blocks: int, warmup: int = 5) -> list[float]:
    """Median seconds per call of each function, run in alternating blocks."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    per_block = max(1, iterations // blocks)
    for _ in range(blocks):
        for fn, out in zip(fns, samples):
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def inputs(loss: str, elements: int, rng):
    classes = 10
    rows = max(1, elements // classes)
    if loss == "cce":
        labels = rng.integers(0, classes, size=rows)
        y_true = np.eye(classes, dtype="float32")[labels]
        logits = rng.normal(size=(rows, classes)).astype("float32")
        y_pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return y_true, y_pred.astype("float32")
    return rng.normal(size=(rows, classes)).astype("float32"), rng.normal(size=(rows, classes)).astype("float32")


def anchor_function(short: str):
    """(a): the Keras loss object, reduced as lossd reduces by default, under tf.function."""
    import keras
    import tensorflow as tf

    loss = keras.losses.get({"class_name": KERAS_CLASSES[short], "config": {}})
    return tf.function(lambda y_true, y_pred: loss(y_true, y_pred))


def iterations_for(elements: int, quick: bool) -> tuple[int, int]:
    """Calls per side and the number of blocks they are split into."""
    n, blocks = (2000, 10) if elements < 10_000 else (60, 6) if elements <= 1_000_000 else (12, 4)
    return (max(blocks, n // 5), blocks) if quick else (n, blocks)


def metric_value(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def metrics_work_seconds(repeats: int = 20_000) -> float:
    """Times, in this process, every metric update the server makes for one
    small Evaluate (interceptor, evaluation and compile-cache metrics): a
    direct measure of their cost, free of the noise between two servers."""
    from prometheus_client import CollectorRegistry

    from lossd_server.observability.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), loss_names=["mean_squared_error"], version="bench")
    rpc = metrics.rpc_method("lossd.v1.LossService", "Evaluate", client_streaming=False, server_streaming=False)

    def one_request():
        rpc.started()
        rpc.received()
        with metrics.time_evaluation("mean_squared_error") as record:
            metrics.observe_cache_lookup(True)
            record.elements, record.nbytes = 640, 5120
        rpc.sent()
        rpc.finished("OK", 0.001)

    for _ in range(1000):
        one_request()
    start = time.perf_counter()
    for _ in range(repeats):
        one_request()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--sizes", default="640,1e6,1e7", help="elements per tensor, comma-separated")
    parser.add_argument("--metrics-compare", action="store_true", help="also time small tensors with metrics off")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-threads", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--echo-tensorflow", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-asyncio", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-answer-bytes", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        run_echo_server(args.echo_server, args.echo_threads, args.echo_tensorflow, args.echo_asyncio,
                        args.echo_answer_bytes)
        return 0

    import tensorflow as tf

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    echo_port, lossd_port, metrics_port = free_port(), free_port(), free_port()
    data_dir = os.path.join("/tmp", f"lossd-bench-{os.getpid()}")
    lossd_cmd = [sys.executable, "-m", "lossd.cli", "serve", "--port", str(lossd_port), "--metrics-port",
                 str(metrics_port), "--data-dir", data_dir, "--log-level", "WARNING"]
    print(f"# lossd bench/evaluate.py  tensorflow {tf.__version__}  cpus {os.cpu_count()}")
    print(f"{'loss':<5} {'elements':>9} {'(a) tf.function':>16} {'(b) grpc echo':>14} {'(c) lossd':>11} "
          f"{'c/(a+b)':>8}")
    results = {}
    with process([sys.executable, __file__, "--echo-server", str(echo_port)],
                 wait_for=lambda: wait_ready(f"127.0.0.1:{echo_port}")), \
            process(lossd_cmd, wait_for=lambda: wait_ready(f"127.0.0.1:{lossd_port}")), \
            lossd.Client(f"127.0.0.1:{lossd_port}") as client, \
            grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=[
                ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]) as echo:
        echo_call = echo.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)
        for short, name in LOSSES.items():
            in_process = anchor_function(short)
            for elements in sizes:
                y_true, y_pred = inputs(short, elements, rng)
                n, blocks = iterations_for(elements, args.quick)
                # The echo carries exactly the bytes the client would send for (c),
                # prepared before the clock starts: the anchor runs none of our code.
                payload = _requests.evaluate_request(wire.spec_from_dict(name), _requests.prepare(y_true, y_pred),
                                                     "sum_over_batch_size", False).SerializeToString()
                a, b, c = timed_side_by_side([
                    lambda: in_process(y_true, y_pred).numpy(),
                    lambda: echo_call(payload),
                    lambda: client.evaluate(name, y_true, y_pred),
                ], n, blocks)
                np.testing.assert_allclose(client.evaluate(name, y_true, y_pred).loss,
                                           in_process(y_true, y_pred).numpy(), rtol=1e-4)
                results[(short, elements)] = (a, b, c, y_true.nbytes + y_pred.nbytes)
                print(f"{short:<5} {elements:>9.0e} {a * 1e6:>13.0f} µs {b * 1e6:>11.0f} µs {c * 1e6:>8.0f} µs "
                      f"{c / (a + b):>8.2f}")
        largest = max(sizes)
        for short in LOSSES:
            a, b, c, nbytes = results[(short, largest)]
            print(f"# {short} {largest:.0e}: lossd {nbytes / c / 1e6:.0f} MB/s, echo {nbytes / b / 1e6:.0f} MB/s "
                  f"-> {b / c:.0%} of the echo's bytes per second")

        # Compilations after warm-up, batch sizes varying.
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = metric_value(url, "lossd_loss_compilations_total")
        for batch in (3, 17, 64, 129, 1000, 4096, 5, 77):
            for short, name in LOSSES.items():
                y_true, y_pred = inputs(short, batch * 10, rng)
                client.evaluate(name, y_true, y_pred)
        after = metric_value(url, "lossd_loss_compilations_total")
        print(f"# compilations while batch sizes varied (3..4096 rows): {after - before:.0f}")

    if args.metrics_compare:
        # Both servers run at once and the calls alternate between them in
        # blocks, so drift in the machine's load hits both sides alike.
        print("# metrics overhead, small tensors (640 elements), two servers, calls alternating in blocks")
        on_port, off_port = free_port(), free_port()
        on_cmd = [str(on_port) if x == str(lossd_port) else x for x in lossd_cmd]
        if os.environ.get("BENCH_AA"):  # an A/A run: both servers without metrics, to see the noise floor
            on_cmd = [str(on_port) if x == str(lossd_port) else "" if x == str(metrics_port) else x for x in lossd_cmd]
        off_cmd = [str(off_port) if x == str(lossd_port) else "" if x == str(metrics_port) else x for x in lossd_cmd]
        with process(on_cmd, wait_for=lambda: wait_ready(f"127.0.0.1:{on_port}")), \
                process(off_cmd, wait_for=lambda: wait_ready(f"127.0.0.1:{off_port}")), \
                lossd.Client(f"127.0.0.1:{on_port}") as on, lossd.Client(f"127.0.0.1:{off_port}") as off:
            y_true, y_pred = inputs("mse", 640, rng)
            samples = {"on": [], "off": []}
            block = 200 if args.quick else 500
            for client in (on, off):
                for _ in range(100):
                    client.evaluate("mse", y_true, y_pred)
            for _ in range(6):
                for label, client in (("on", on), ("off", off)):
                    for _ in range(block):
                        start = time.perf_counter()
                        client.evaluate("mse", y_true, y_pred)
                        samples[label].append(time.perf_counter() - start)
        on_median, off_median = statistics.median(samples["on"]), statistics.median(samples["off"])
        print(f"# metrics on {on_median * 1e6:.0f} µs, off {off_median * 1e6:.0f} µs per call: throughput with "
              f"metrics on {off_median / on_median - 1:+.1%}")
        per_request = metrics_work_seconds()
        print(f"# the metric updates of one request, timed in-process: {per_request * 1e6:.1f} µs, "
              f"{per_request / off_median:.1%} of a small request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
