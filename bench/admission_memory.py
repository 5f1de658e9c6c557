"""Peak server RSS under eight concurrent near-maximum Evaluate calls:
``lossd serve`` with the in-flight bound (LOSSD_MAX_INFLIGHT_BYTES = 64 MiB,
requests of 60 MiB) and without it (a budget of 8 GiB, so all eight evaluate
at once), beside the anchor: a bare gRPC server that receives the same
request bytes and does nothing with them.

- echo (the anchor): a separate process with a bare ``grpc.server`` of 8
  threads and a 256 MiB message limit, as ``lossd serve``'s defaults
  (``LOSSD_WORKERS``, ``LOSSD_MAX_MESSAGE_BYTES``); its handler parses
  nothing and answers 8 bytes (bench/evaluate.py ``run_echo_server``). It
  gets the serialized bytes of the very request lossd gets, prepared before
  any server starts, through a generic stub: what a plain gRPC server needs
  in memory to receive that traffic;
- lossd bounded / lossd unbounded: ``lossd serve`` as a user types it.

Every server is measured the same way (``tests/inflight_memory.py``, shared
with ``tests/robustness/test_inflight_memory.py``): two warm-up calls, the
peak-RSS mark reset, the RSS as baseline, eight calls at once, the peak
(``VmHWM``). A server whose RSS passes ``--ceiling-mib`` is killed and its
line says so. The three run in alternating blocks (echo, bounded, unbounded,
echo, ...); the output gives each run, each side's median growth and peak,
and the ratios of lossd's to the echo's.

Usage: python -m bench.admission_memory [--rounds 2] [--ceiling-mib 6144]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

import grpc

from bench.evaluate import ECHO_METHOD, free_port, process, wait_ready
from lossd import _requests, wire
from tests import inflight_memory

MiB = inflight_memory.MiB
REQUEST = 60 * MiB
BOUNDED, UNBOUNDED, ECHO = "lossd bounded (64 MiB)", "lossd unbounded (8 GiB)", "echo (anchor)"
BUDGETS = {BOUNDED: 64 * MiB, UNBOUNDED: 8192 * MiB}


def request_bytes() -> bytes:
    """The bytes lossd's client sends for the driver's request (MSE of its arrays, no gradient)."""
    y_true, y_pred = inflight_memory.arrays(REQUEST)
    return _requests.evaluate_request_bytes(wire.spec_from_dict("mse"), _requests.prepare(y_true, y_pred),
                                            "sum_over_batch_size", False)


def measure_echo(payload: bytes, ceiling_bytes: int) -> inflight_memory.Reading:
    """The anchor's reading: a fresh echo server, the same measurement as lossd's."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    evaluate = os.path.join(os.path.dirname(__file__), "evaluate.py")
    with process([sys.executable, evaluate, "--echo-server", str(port)], wait_for=lambda: wait_ready(address)) as srv, \
            grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 * MiB),
                                                    ("grpc.max_receive_message_length", 256 * MiB)]) as channel:
        stub = channel.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)

        def call() -> str:
            try:
                stub(payload, timeout=120)
                return "OK"
            except grpc.RpcError as error:
                return error.code().name

        return inflight_memory.measure_running(srv.pid, call, concurrent=8, ceiling_bytes=ceiling_bytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ceiling-mib", type=int, default=6144, help="kill a server whose RSS passes it")
    args = parser.parse_args()
    ceiling = args.ceiling_mib * MiB
    payload = request_bytes()
    print(f"request: {len(payload) / MiB:.1f} MiB serialized, the same bytes for every side", flush=True)
    readings: dict[str, list[inflight_memory.Reading]] = {ECHO: [], BOUNDED: [], UNBOUNDED: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for side in readings:
                if side == ECHO:
                    reading = measure_echo(payload, ceiling)
                else:
                    reading = inflight_memory.measure(pathlib.Path(tmp) / f"{round_}-{BUDGETS[side]}",
                                                      inflight_bytes=BUDGETS[side], request_bytes=REQUEST,
                                                      ceiling_bytes=ceiling)
                readings[side].append(reading)
                print(f"round {round_} {side}: baseline {reading.baseline_bytes / MiB:.0f} MiB, peak "
                      f"{reading.peak_bytes / MiB:.0f} MiB, growth {reading.growth_bytes / MiB:.0f} MiB; "
                      f"admitted {reading.admitted}, refused {reading.refused}"
                      + (f"; KILLED past {args.ceiling_mib} MiB" if reading.killed else ""), flush=True)
    growth = {side: statistics.median(r.growth_bytes for r in rs) / MiB for side, rs in readings.items()}
    peak = {side: statistics.median(r.peak_bytes for r in rs) / MiB for side, rs in readings.items()}
    for side in readings:
        killed = sum(r.killed for r in readings[side])
        print(f"{side}: median growth {growth[side]:.0f} MiB, median peak {peak[side]:.0f} MiB "
              f"over {len(readings[side])} runs" + (f" ({killed} KILLED: cut short)" if killed else ""))
    for side in (BOUNDED, UNBOUNDED):
        print(f"{side} / echo: growth x{growth[side] / growth[ECHO]:.2f}, peak x{peak[side] / peak[ECHO]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
