"""What tracing costs: off (the default) against the tree before tracing
existed, and on, side by side (a benchmark, not a test).

Sides, each a ``lossd serve`` of its own, measured in alternating blocks
(``concurrency.alternate``) at each concurrency on the same prebuilt
requests (16 ragged mixed-delta Huber requests, bench/concurrency.py):

- ``before``: the tree given by ``--baseline-tree`` (a checkout from before
  tracing), no OTEL variables;
- ``off``: this tree, no OTEL variables (the default: nothing of
  OpenTelemetry imported, no tracing interceptor);
- ``on``: this tree exporting every span over OTLP/gRPC to a receiver in
  this process that counts and drops them (``OTEL_BSP_SCHEDULE_DELAY`` 200 ms).

Prints requests/s and each side's ratio to ``before``.

Usage: python bench/tracing.py --baseline-tree /tmp/base [--concurrency 1,64] [--blocks 3] [--block-seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from concurrent import futures

sys.path.insert(0, os.path.dirname(__file__))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from concurrency import EVALUATE_METHOD, alternate, requests, run_block, warm_crowd  # noqa: E402
from evaluate import free_port, process, wait_ready  # noqa: E402


def receiver() -> tuple[grpc.Server, int, list]:
    """An OTLP trace receiver that counts the spans it gets."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    counted = [0]

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            counted[0] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, counted


async def measure(addresses: dict[str, str], levels: list[int], blocks: int, seconds: float, payloads) -> None:
    async with contextlib.AsyncExitStack() as stack:
        calls = {}
        for name, address in addresses.items():
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            call = channel.unary_unary(EVALUATE_METHOD)
            for payload in payloads:
                await call(payload)
            await warm_crowd(call, payloads)
            calls[name] = lambda p, c, s, call=call: run_block(call, p, c, s)
        for level in levels:
            rates = await alternate(calls, payloads, level, blocks, seconds)
            base = rates["before"]
            print(f"concurrency {level:>3}: " + "  ".join(f"{name} {rate:7.0f} req/s ({rate / base:.3f})"
                                                          for name, rate in rates.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", required=True, help="a checkout of lossd from before tracing")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=3.0)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.abspath(args.baseline_tree)
    sink, sink_port, counted = receiver()
    sides = {
        "before": {"PYTHONPATH": f"{base}/client:{base}/server"},
        "off": {"PYTHONPATH": f"{here}/client:{here}/server"},
        "on": {"PYTHONPATH": f"{here}/client:{here}/server", "OTEL_EXPORTER_OTLP_ENDPOINT":
               f"http://127.0.0.1:{sink_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
               "OTEL_BSP_SCHEDULE_DELAY": "200"},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    ports = {name: free_port() for name in sides}
    print(f"# lossd bench/tracing.py  cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}  "
          f"{args.blocks} blocks x {args.block_seconds:g} s per side  baseline {base}", flush=True)
    with contextlib.ExitStack() as stack:
        for name, extra in sides.items():
            command = [sys.executable, "-m", "lossd.cli", "serve", "--port", str(ports[name]), "--metrics-port", "",
                       "--data-dir", f"/tmp/lossd-bench-tracing-{os.getpid()}-{name}", "--log-level", "WARNING"]
            stack.enter_context(process(command, env={**env, **extra},
                                        wait_for=lambda p=ports[name]: wait_ready(f"127.0.0.1:{p}")))
        payloads = requests(16, np.random.default_rng(0))
        asyncio.run(measure({name: f"127.0.0.1:{port}" for name, port in ports.items()},
                            [int(c) for c in args.concurrency.split(",")], args.blocks, args.block_seconds,
                            payloads))
    sink.stop(0)
    print(f"# spans received from the `on` side: {counted[0]:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
