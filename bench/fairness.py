"""What one heavy caller does to a light one (issue 23, "Fair sharing").

A real ``lossd serve`` process with a tokens file: Alice and Bob are two
callers with evaluate tokens. Bob sends a small Evaluate (MSE, 32x10
float32, its program compiled before the clock) in a closed loop, and a
probe asks grpc.health.v1 Check every 50 ms on a channel of its own. Blocks
alternate, ``--rounds`` times: Bob quiet, then Bob while Alice floods one
way, for each way:

* ``big``: 8 threads, each on its own channel, send 60 MiB Evaluate
  requests (MSE on two 7.5M-element float32 tensors) back to back;
* ``compile``: 8 threads send new expressions (a constant changed each
  time, so each is a new program) back to back; Bob also sends a new
  expression of his own every 0.5 s, counted by outcome;
* ``expensive``: 8 threads send ``ctc`` evaluations just under the cost
  limit (``LOSSD_MAX_EVALUATION_COST``, about 4 s of CPU each here).

Alice runs in a process of her own (as another client would): her 60 MiB
requests' copies into gRPC then hold her interpreter's lock, not the one
Bob's loop and the health probe measure in.

Reported per way: Bob's p50 and p99 against his quiet p99 (the quiet blocks
of the same run, pooled), his failures by status, health's p50, p99 and
max, Alice's answers by status. The issue's goal: Bob's p99 within 3x of
quiet, health under 100 ms. Every request's bytes are built before the
clock starts.

    .venv/bin/python bench/fairness.py [--seconds 10] [--rounds 2] [--ways big,compile,expensive]
        [--env LOSSD_NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc

ALICE_THREADS = 8
BIG_ELEMENTS = 60 * 2 ** 20 // 8  # two float32 tensors: 60 MiB a request
CTC_SHAPE = (1, 1300, 3)  # with 300 labels: about 4.7e9 units, under the 5e9 default
CTC_LABELS = 300
OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token(tokens: pathlib.Path, name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    done = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", name, "--scopes", "evaluate",
                           "--file", str(tokens)], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@contextlib.contextmanager
def serve(workdir: pathlib.Path, tokens: pathlib.Path, env: dict):
    port = _free_port()
    lossd = pathlib.Path(sys.executable).with_name("lossd")
    log = open(workdir / "server.log", "ab")
    proc = subprocess.Popen([str(lossd), "serve", "--port", str(port), "--metrics-port", "off", "--data-dir",
                             str(workdir / "data"), "--tokens-file", str(tokens), "--grace-seconds", "0"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lossd serve did not start: {(workdir / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield address, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _request(spec: loss_pb2.LossSpec, y_true: np.ndarray, y_pred: np.ndarray) -> bytes:
    return loss_service_pb2.EvaluateRequest(loss=spec, y_true=wire.from_numpy(y_true),
                                            y_pred=wire.from_numpy(y_pred)).SerializeToString()


def _expression(i: int) -> bytes:
    spec = loss_pb2.LossSpec(expression=f"mean(square(y_true - y_pred)) * {1 + i * 1e-6!r}")
    return _request(spec, np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32))


def _code(exc: grpc.RpcError) -> str:
    """The status code, with the ErrorInfo reason where the server gave one."""
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return f"{exc.code().name}:{info.reason}"
    return exc.code().name


class Caller:
    """One caller's raw Evaluate (pre-serialized requests) on its own channel."""

    def __init__(self, address: str, token: str):
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.evaluate = self.channel.unary_unary("/lossd.v1.LossService/Evaluate",
                                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def call(self, request: bytes, timeout: float = 60) -> str:
        try:
            self.evaluate(request, metadata=self.metadata, timeout=timeout)
            return "OK"
        except grpc.RpcError as exc:
            return _code(exc)

    def close(self) -> None:
        self.channel.close()


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _alice(address: str, token: str, way: str, payload: Optional[bytes], first: int, ready, stop, answers) -> None:
    """Alice's flood, in a process of her own: ``ALICE_THREADS`` threads
    sending ``payload`` (or, for ``compile``, new expressions numbered from
    ``first``) back to back from when she sets ``ready`` until ``stop`` is
    set; puts her answers by status on ``answers``."""
    codes, lock = collections.Counter(), threading.Lock()
    counter = iter(range(first, first + 10 ** 7))

    def loop():
        me = Caller(address, token)
        try:
            while not stop.is_set():
                if way == "compile":
                    with lock:
                        request = _expression(next(counter))
                else:
                    request = payload
                code = me.call(request, timeout=120)
                with lock:
                    codes[code] += 1
        finally:
            me.close()

    threads = [threading.Thread(target=loop) for _ in range(ALICE_THREADS)]
    ready.set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers.put(dict(codes))


_blocks = iter(range(1, 10 ** 6))


def block(address: str, bob_token: str, alice_token: str, way: str, seconds: float, payloads: dict) -> dict:
    """One block: Bob's loop and the health probe for ``seconds``, with
    Alice flooding ``way`` (or nobody, for ``quiet``)."""
    stop = threading.Event()
    bob, health_ms, bob_codes, alice_codes, bob_new = [], [], collections.Counter(), collections.Counter(), \
        collections.Counter()
    base = next(_blocks) * 10 ** 7  # new expressions' numbers: Alice's from base, Bob's from base + 5e6
    counter = iter(range(base + 5 * 10 ** 6, base + 10 ** 7))
    lock = threading.Lock()

    def bob_loop():
        me = Caller(address, bob_token)
        try:
            while not stop.is_set():
                start = time.perf_counter()
                code = me.call(payloads["small"], timeout=30)
                elapsed = time.perf_counter() - start
                bob_codes[code] += 1
                if code == "OK":
                    bob.append(elapsed)
        finally:
            me.close()

    def bob_new_expressions():
        me = Caller(address, bob_token)
        try:
            while not stop.wait(0.5):
                with lock:
                    i = next(counter)
                bob_new[me.call(_expression(i), timeout=30)] += 1
        finally:
            me.close()

    def health_loop():
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.wait(0.05):
                start = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    health_ms.append((time.perf_counter() - start) * 1e3)
                except grpc.RpcError:
                    health_ms.append(float("inf"))

    threads = [threading.Thread(target=bob_loop), threading.Thread(target=health_loop)]
    if way == "compile":
        threads.append(threading.Thread(target=bob_new_expressions))
    alice = None
    if way != "quiet":
        spawn = multiprocessing.get_context("spawn")
        ready, alice_stop, answers = spawn.Event(), spawn.Event(), spawn.Queue()
        alice = spawn.Process(target=_alice, args=(address, alice_token, way, payloads.get(way),
                                                   base, ready, alice_stop, answers))
        alice.start()
        if not ready.wait(300):  # her imports, before the clock
            raise SystemExit("Alice's process did not start")
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    if alice is not None:
        alice_stop.set()
        alice_codes.update(answers.get(timeout=300))
        alice.join(60)
    for t in threads:
        t.join()
    return {"bob": bob, "health": health_ms, "bob_codes": bob_codes, "alice": alice_codes, "bob_new": bob_new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each block")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default="big,compile,expensive")
    parser.add_argument("--env", action="append", default=[], metavar="LOSSD_NAME=VALUE",
                        help="a server setting for this run (repeatable), e.g. LOSSD_INTER_OP_THREADS=4")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    unknown = sorted(k for k in env if not k.startswith("LOSSD_"))
    if unknown:
        parser.error(f"--env takes LOSSD_* settings; received {unknown[0]}")
    ways = [w for w in args.ways.split(",") if w]

    rng = np.random.default_rng(0)
    labels = rng.integers(1, 3, (1, CTC_LABELS)).astype(np.int32)
    big = rng.random(BIG_ELEMENTS, dtype=np.float32)
    payloads = {
        "small": _request(loss_pb2.LossSpec(name="mse"), np.zeros((32, 10), np.float32),
                          np.ones((32, 10), np.float32)),
        "big": _request(loss_pb2.LossSpec(name="mse"), big, big),
        "expensive": _request(loss_pb2.LossSpec(name="ctc"), labels,
                              rng.standard_normal(CTC_SHAPE).astype(np.float32)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        tokens = workdir / "tokens"
        alice, bob = _token(tokens, "alice"), _token(tokens, "bob")
        with serve(workdir, tokens, {"LOSSD_WARMUP": "false", **env}) as (address, _):
            warm = Caller(address, alice)
            # Compile Bob's program and the ctc program before the clock.
            for name in ("small", "expensive"):
                code = warm.call(payloads[name], timeout=300)
                if code != "OK":
                    raise SystemExit(f"warm-up of {name} failed: {code}")
            warm.close()
            results: dict[str, list[dict]] = collections.defaultdict(list)
            for r in range(args.rounds):
                for way in ways:
                    results["quiet"].append(block(address, bob, alice, "quiet", args.seconds, payloads))
                    results[way].append(block(address, bob, alice, way, args.seconds, payloads))
                    print(f"# round {r + 1}: {way} done", file=sys.stderr, flush=True)

    def pooled(name: str, key: str) -> list:
        return [x for b in results[name] for x in b[key]]

    quiet_p99 = _percentile(pooled("quiet", "bob"), 99) * 1e3
    print(f"# lossd bench/fairness.py  {args.rounds} rounds x {args.seconds:g} s blocks  cpus {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.1f}  {' '.join(args.env)}")
    print(f"{'way':10} {'bob n':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99/quiet':>9} {'bob failed':>12} "
          f"{'health p50':>10} {'p99':>8} {'max ms':>8}  alice answers, bob's new expressions, bob's failures")
    for name in ["quiet", *ways]:
        bob_ms = [x * 1e3 for x in pooled(name, "bob")]
        health = pooled(name, "health")
        codes = sum((b["bob_codes"] for b in results[name]), collections.Counter())
        failed = {code: n for code, n in codes.items() if code != "OK"}
        alice = sum((b["alice"] for b in results[name]), collections.Counter())
        new = sum((b["bob_new"] for b in results[name]), collections.Counter())
        p99 = _percentile(bob_ms, 99)
        extra = (f"alice {dict(alice)}" if alice else "") + (f"  bob new {dict(new)}" if new else "") + (
            f"  bob failed {failed}" if failed else "")
        print(f"{name:10} {len(bob_ms):6d} {_percentile(bob_ms, 50):8.1f} {p99:8.1f} {p99 / quiet_p99:9.2f} "
              f"{sum(failed.values()):12d} {_percentile(health, 50):10.1f} {_percentile(health, 99):8.1f} "
              f"{max(health, default=float('nan')):8.1f}  {extra}")


if __name__ == "__main__":
    main()
