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

``--steps`` prints instead where one small Huber request's time goes in
process, single-threaded, with no network: microseconds per step, each
step timed alone (the least of 7 rounds; wall time and the calling
thread's CPU time, which a busy machine disturbs less), then the whole
Evaluate handler from the request's bytes to the answer's, and what of it
is lossd's own work around the compiled TensorFlow call: the whole less
the call timed alone, and the whole again with TensorFlow's execute
answered from a memo of the request's outputs (lossd's Python alone; the
first figure also holds what the TensorFlow runtime's threads cost the
calling thread inside the whole, which grows with the machine's load).
It runs against whichever lossd the
PYTHONPATH names, so the same command measures a tree before and after a
change.

Each ratio is requests/s over the echo's. The memo exists only in this
benchmark's server process (``--plumbing-server``), patched in before
``lossd serve`` starts.

Usage: python bench/where_time_goes.py [--concurrency 1,64] [--blocks 3] [--block-seconds 4]
       [--variant NAME:KEY=VALUE,...]
       python bench/where_time_goes.py --steps [--rows 16]
"""

from __future__ import annotations

import argparse
import collections
import asyncio
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from concurrency import EVALUATE_METHOD, alternate, requests, run_block, warm_crowd  # noqa: E402
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


class _Context:
    """The servicer context of a call with no metadata and no deadline,
    still active: what the in-process step table hands the handler."""

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback) -> bool:
        return True  # the call goes on: the callback would run when it ends

    def code(self):
        return None

    def details(self):
        return None

    def abort_with_status(self, status):
        raise RuntimeError(f"the handler failed: {status}")


def _timed(step, repeats: int, rounds: int = 7) -> tuple[float, float]:
    """Microseconds one call of ``step`` takes: wall time and this thread's
    CPU time, each the least over ``rounds`` (as timeit advises: on a shared
    machine, slower rounds measure the neighbours; the CPU time leaves out
    the time other processes hold the cores)."""
    import time

    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(repeats):
            step()
        cpu.append((time.thread_time() - start_cpu) / repeats * 1e6)
        wall.append((time.perf_counter() - start) / repeats * 1e6)
    return min(wall), min(cpu)


def step_table(rows: int, repeats: int) -> None:
    """Prints where one small Huber request's time goes, in process (``--steps``)."""
    import tempfile

    from prometheus_client import CollectorRegistry

    from lossd import _requests, wire
    from lossd_server.app import create_server
    from lossd_server.config import Settings
    from lossd_server.evaluation.evaluator import any_non_finite
    from lossd_server.grpc import loss_servicer
    from lossd_server.grpc.interceptors import _wrap

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, data_dir=tempfile.mkdtemp(prefix="lossd-steps-"),
                        warmup=False)
    server = create_server(settings, metrics_registry=CollectorRegistry())
    evaluator, metrics, admission = server.evaluator, server.metrics, server.admission
    try:
        from lossd_server.evaluation.service import EvaluationService
        service = EvaluationService(evaluator, admission, max_elements=settings.max_tensor_elements, metrics=metrics)
        servicer, plans, tree = loss_servicer.LossServicer(service), service.plans, "evaluation service"
    except ImportError:  # a tree from before evaluation/service.py
        servicer = loss_servicer.LossServicer(evaluator, max_elements=settings.max_tensor_elements,
                                              admission=admission, metrics=metrics)
        plans, service, tree = servicer.plans, None, "servicer with its own plan cache"
    from lossd_server.grpc import parsing
    # A tree from before grpc/parsing.py's `serialized` has loss_servicer's own.
    serialize = getattr(parsing, "serialized", None) or getattr(loss_servicer, "_serialize")
    handler = grpc.unary_unary_rpc_method_handler(servicer.Evaluate, request_deserializer=loss_servicer.receive,
                                                  response_serializer=serialize)
    method = "/lossd.v1.LossService/Evaluate"
    wrapped = _wrap(handler, method, metrics, collections.deque())
    bare = _wrap(grpc.unary_unary_rpc_method_handler(lambda request, context: b""), method, metrics, collections.deque())
    context = _Context()

    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(rows, 10)).astype("float32")
    y_pred = rng.normal(size=(rows, 10)).astype("float32")
    spec = wire.spec_from_dict("huber", {"delta": 1.5})
    message = _requests.evaluate_request(spec, {"y_true": y_true, "y_pred": y_pred}, "sum_over_batch_size", False)
    raw = message.SerializeToString()

    def whole():
        return wrapped.response_serializer(wrapped.unary_unary(wrapped.request_deserializer(raw), context))

    for _ in range(50):  # compiles the program, fills the caches
        whole()
    assert evaluator.wait_compiled()
    plan = plans.get(message.loss, ("y_true", "y_pred"))
    tensors = {"y_true": y_true, "y_pred": y_pred}
    # The program this request runs: its XLA bucket's where the server
    # buckets it (LOSSD_XLA=auto, Huber), else the graph program.
    buckets = evaluator.buckets
    served = buckets.calls if buckets is not None else 0
    whole()
    bucketed = buckets is not None and buckets.calls > served
    if bucketed:
        from lossd_server.evaluation import batching
        from lossd_server.evaluation.buckets import MIN_ROWS, bucket

        template = batching.row_item(plan, tensors, None, "sum_over_batch_size", False, buckets.max_elements)
        reused = {}  # a tree with reused bucket buffers (batching.RowsBuffers) pads as Buckets.run does

        def call_inputs(given):
            # The request's item as Buckets.evaluate builds it (from its kind's template), padded.
            item = template.like(given, None, rows, template.values_shape)
            if hasattr(batching, "RowsBuffers"):
                into = reused.get("buffers")
                if into is None:
                    fresh = batching.rows_arrays([item], bucket(rows, MIN_ROWS), 2)
                    into = reused["buffers"] = batching.RowsBuffers({n: np.array(a) for n, a in fresh.items()})
                batching.rows_arrays([item], bucket(rows, MIN_ROWS), 2, into=into)
                return into.ordered
            padded = batching.rows_arrays([item], bucket(rows, MIN_ROWS), 2)
            return [padded[n] for n in sorted(padded)]
        compiled = next(c for k, c in evaluator._cache.items() if k[0] == "rows" and k[4])
    else:
        def call_inputs(given):
            return [given[n] for n in sorted(given)]  # the order evaluate_checked passes them in
        compiled = next(c for k, c in evaluator._cache.items() if k[0] != "rows")
    arrays = call_inputs(tensors)
    total, terms, grad, outputs = compiled(arrays)
    if bucketed:
        total, terms, grad, outputs = np.asarray(terms[0][0]), [], None, {}  # the request's reduced loss

    def metering():
        if service is not None:  # one point: the evaluation and the caller's usage
            metrics.observe_evaluation("huber", "ok", 1e-4, y_pred.size, y_pred.nbytes * 2)
            metrics.caller_usage("", requests=1, elements=y_pred.size)
        else:
            with metrics.time_evaluation("huber") as record:
                record.elements, record.nbytes = y_pred.size, y_pred.nbytes * 2
            metrics.caller_usage("", requests=1, elements=y_pred.size)

    def admit():
        with admission.admit("", None, elements=y_pred.size, nbytes=y_pred.nbytes * 2, wait_seconds=None):
            pass

    # The request's own tensors: views of the message's bytes, as the handler decodes them.
    decoded = {"y_true": wire.to_numpy(message.y_true, field="y_true"),
               "y_pred": wire.to_numpy(message.y_pred, field="y_pred")}
    if hasattr(wire, "int_shape"):  # a tree whose servicer reads each shape once, for both checks
        def decode_two():
            return (wire.to_numpy(message.y_true, field="y_true", shape=wire.int_shape(message.y_true.shape)),
                    wire.to_numpy(message.y_pred, field="y_pred", shape=wire.int_shape(message.y_pred.shape)))
    else:
        def decode_two():
            return (wire.to_numpy(message.y_true, field="y_true"), wire.to_numpy(message.y_pred, field="y_pred"))
    # What the NaN/Inf flag reads: a bucket's request, its loss and inputs
    # (batching.split_results); the graph path, every output and input.
    flagged = [total, None, decoded["y_true"], decoded["y_pred"], None] if bucketed else \
        [total, *terms, grad, *outputs.values(), *arrays]
    decoded_arrays = call_inputs(decoded)
    steps = [
        ("the compiled TensorFlow call" + (" (XLA bucket)" if bucketed else ""), lambda: compiled(decoded_arrays)),
        ("the same on fresh numpy arrays", lambda: compiled(arrays)),
        ("parse the request (deserializer)", lambda: loss_servicer.receive(raw)),
        ("interceptor wrapper around a no-op handler", lambda: bare.unary_unary(b"", context)),
        ("plan cache lookup", lambda: plans.get(message.loss, ("y_true", "y_pred"))),
        ("admission enter + exit", admit),
        ("decode two tensors (shapes read once)", decode_two),
        ("evaluator.check", lambda: evaluator.check(plan, tensors, None, "sum_over_batch_size")),
        ("evaluate_checked (program lookup, call, NaN flags)",
         lambda: evaluator.evaluate_checked(plan, decoded, reduction="sum_over_batch_size")),
        *([("bucket padding (item + rows_arrays)", lambda: call_inputs(decoded))] if bucketed else []),
        ("NaN/Inf flags", lambda: any_non_finite(flagged)),
        ("metering", metering),
        ("encode the answer", lambda: loss_servicer.Answer(
            loss_servicer.loss_service_pb2.EvaluateResponse(non_finite=False), {"loss": total}).serialized()),
    ]
    print(f"# lossd bench/where_time_goes.py --steps  {tree}  Huber {rows} x 10 float32, reduced, no gradient, "
          f"metrics on, no tokens, batching off  µs per step (least of 7 rounds of {repeats}; CPU: this "
          "thread's, TensorFlow's own threads left out)")
    print(f"{'step':<52} {'wall µs':>8} {'CPU µs':>8}")
    measured = {}
    for name, step in steps:
        measured[name] = _timed(step, repeats)
        print(f"{name:<52} {measured[name][0]:>8.1f} {measured[name][1]:>8.1f}")
    whole_us = _timed(whole, repeats)
    print(f"{'whole Evaluate handler, request bytes to answer bytes':<52} {whole_us[0]:>8.1f} {whole_us[1]:>8.1f}")
    call = measured[steps[0][0]]
    print(f"{'whole less the compiled call: lossd around TensorFlow':<52} {whole_us[0] - call[0]:>8.1f} "
          f"{whole_us[1] - call[1]:>8.1f}")
    if getattr(compiled, "_direct", None) is not None:
        # The same handler with TensorFlow's execute answered from a memo of
        # this request's outputs: lossd's own Python alone, without the
        # TensorFlow runtime's threads, which a loaded machine makes spin.
        outputs = compiled._direct(decoded_arrays)
        compiled._direct = lambda arrays, cancellation=None: outputs
        ours = _timed(whole, repeats)
        print(f"{'whole, TensorFlow execute memoized: lossd Python':<52} {ours[0]:>8.1f} {ours[1]:>8.1f}")
    evaluator.close()


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
            rates = await alternate(calls, payloads, concurrency, blocks, seconds)
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
    parser.add_argument("--steps", action="store_true",
                        help="print the in-process per-step table of one small request instead")
    parser.add_argument("--rows", type=int, default=16, help="rows of the --steps request (x 10 columns)")
    parser.add_argument("--repeats", type=int, default=2000, help="calls per round of each --steps step")
    parser.add_argument("--plumbing-server", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plumbing_server is not None:
        return run_plumbing_server(args.plumbing_server)
    if args.steps:
        step_table(args.rows, args.repeats)
        return 0

    from lossd_server.cli import unknown_variables
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
