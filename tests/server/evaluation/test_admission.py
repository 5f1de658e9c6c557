"""Admission control (issue 12, quotas): a real server on loopback with real
TensorFlow. Past the in-flight budget or its queue a request is
RESOURCE_EXHAUSTED with a RetryInfo delay the client exposes; a request
larger than the whole budget is refused for good; a token's rate limits that
caller alone, and a rate-limited heavy caller does not starve a light one;
refusals and per-caller usage show in a real /metrics scrape."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from tests.servers import lossd_servers

import lossd

pytest.importorskip("tensorflow")

MiB = 1 << 20
_fresh = itertools.count()


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """``start(**settings)``: a real server on 127.0.0.1 with these settings
    (metrics rendered at each scrape); returns the server object."""
    with lossd_servers(tmp_path_factory, metrics_cache_seconds=0) as start_server:
        yield start_server


def _admission(srv):
    return srv.admission


def create_token(path, name: str, *extra: str) -> str:
    """`lossd tokens create NAME --scopes evaluate ...` as a user types it; the token it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    made = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", name, "--scopes", "evaluate",
                           *extra, "--file", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def _slow_loss() -> dict:
    """A loss whose program is not compiled yet: eight terms of eight
    exponentials each, with their gradient, trace for a second or more here,
    holding their bytes all along."""
    k = next(_fresh)

    def tree(parts):  # balanced sums: expressions limit their nesting
        half = len(parts) // 2
        return parts[0] if len(parts) == 1 else f"({tree(parts[:half])} + {tree(parts[half:])})"

    return {"terms": [{"expression": "mean(" + tree([f"exp(y_pred * {k}.{j}{i} - y_true)" for i in range(8)]) + ")"}
                      for j in range(8)]}


def _arrays(nbytes: int):
    """y_true and y_pred of float32 declaring ``nbytes`` together."""
    rows = nbytes // 8 // 256
    y = np.random.default_rng(0).random((rows, 256), dtype=np.float32)
    return y, y + np.float32(0.5)


def _hold_budget(srv, client, nbytes: int):
    """Starts an evaluation of ``nbytes`` that holds them while its program
    compiles; returns its thread once the server holds the bytes."""
    y_true, y_pred = _arrays(nbytes)
    admission = _admission(srv)
    before = admission.inflight_bytes
    thread = threading.Thread(target=client.evaluate, args=(_slow_loss(), y_true, y_pred),
                              kwargs={"gradient": True}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while admission.inflight_bytes <= before:
        assert thread.is_alive() and time.monotonic() < deadline, "the slow evaluation never held its bytes"
        time.sleep(0.002)
    return thread


def test_past_the_budget_and_its_queue_requests_get_a_retry_delay(start):
    srv = start(max_inflight_bytes=4 * MiB, max_queued_requests=1, max_queue_seconds=60)
    with lossd.Client(srv.address, timeout=120) as client:
        client.evaluate("mse", *_arrays(MiB))  # warm
        holder = _hold_budget(srv, client, 3 * MiB)
        y_true, y_pred = _arrays(2 * MiB)
        waiter = threading.Thread(target=client.evaluate, args=("mse", y_true, y_pred), daemon=True)
        waiter.start()
        deadline = time.monotonic() + 30
        while not _admission(srv)._waiting:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        with pytest.raises(lossd.LossdError) as refused:
            client.evaluate("mse", y_true, y_pred)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "QUEUE_FULL"
        assert 0 < refused.value.retry_delay <= 30
        assert "max_inflight_bytes" in refused.value.message and "retry in" in refused.value.message
        # Small requests do not wait behind the large ones.
        assert client.evaluate("mse", np.ones(640, np.float32), np.zeros(640, np.float32)).loss == 1.0
        holder.join(60)
        waiter.join(60)
        assert not waiter.is_alive()
        assert _admission(srv).inflight_bytes == 0


def test_a_wait_that_runs_out_is_inflight_bytes_full(start):
    srv = start(max_inflight_bytes=4 * MiB, max_queued_requests=4, max_queue_seconds=0.2)
    with lossd.Client(srv.address, timeout=120) as client:
        holder = _hold_budget(srv, client, 3 * MiB)
        started = time.monotonic()
        with pytest.raises(lossd.LossdError) as refused:
            client.evaluate("mse", *_arrays(2 * MiB))
        waited = time.monotonic() - started
        holder.join(60)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "INFLIGHT_BYTES_FULL"
    assert refused.value.retry_delay and refused.value.retry_delay > 0
    assert 0.15 < waited < 10
    assert refused.value.metadata["limit"] == str(4 * MiB)


def test_a_stream_item_refused_carries_its_retry_delay_and_the_stream_goes_on(start):
    srv = start(max_inflight_bytes=4 * MiB, max_queued_requests=0)
    with lossd.Client(srv.address, timeout=120) as client:
        holder = _hold_budget(srv, client, 3 * MiB)
        y_true, y_pred = _arrays(2 * MiB)
        small = {"loss": "mse", "y_true": np.ones(4, np.float32), "y_pred": np.zeros(4, np.float32)}
        results = list(client.evaluate_many([{"loss": "mse", "y_true": y_true, "y_pred": y_pred}, small]))
        holder.join(60)
    refused, done = results
    assert isinstance(refused, lossd.LossdError), refused
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.reason == "INFLIGHT_BYTES_FULL"
    assert refused.retry_delay > 0
    assert done.loss == 1.0


def test_a_request_larger_than_the_whole_budget_is_refused_for_good(start):
    srv = start(max_inflight_bytes=MiB)
    y_true, y_pred = _arrays(3 * MiB)
    with lossd.Client(srv.address, timeout=60) as client:
        with pytest.raises(lossd.LossdError) as refused:
            client.evaluate("mse", y_true, y_pred)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "REQUEST_TOO_LARGE"
    assert refused.value.retry_delay is None
    assert "will not help" in refused.value.message
    assert f"declares {3 * MiB:,} bytes" in refused.value.message and f"at most {MiB:,} bytes" in refused.value.message
    # EvaluateChunked holds one chunk at a time: the same tensors in small
    # chunks pass, chunks larger than the budget do not.
    with lossd.Client(srv.address, timeout=60, max_message_bytes=MiB, chunk_bytes=MiB // 4) as small:
        assert small.evaluate("mse", y_true, y_pred).loss == pytest.approx(0.25)
    with lossd.Client(srv.address, timeout=60, max_message_bytes=4 * MiB, chunk_bytes=2 * MiB) as large:
        with pytest.raises(lossd.LossdError) as chunk:
            large.evaluate("mse", *_arrays(6 * MiB))
    assert chunk.value.reason == "REQUEST_TOO_LARGE" and "This chunk" in chunk.value.message


@pytest.fixture(scope="module")
def limited(start, tmp_path_factory):
    """A server with tokens: `heavy` and `debtor` limited to 1000 elements
    per second each, `light` without a limit."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.jsonl"
    tokens = {"heavy": create_token(path, "heavy", "--rate", "1000"), "light": create_token(path, "light"),
              "debtor": create_token(path, "debtor", "--rate", "1000")}
    srv = start(tokens_file=path)
    return srv, tokens


def _scrape(srv) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


def test_a_token_past_its_rate_is_refused_and_another_is_not(limited):
    srv, tokens = limited
    before = _scrape(srv)
    y = np.zeros(800, np.float32)
    with lossd.Client(srv.address, token=tokens["heavy"], timeout=30) as heavy, \
            lossd.Client(srv.address, token=tokens["light"], timeout=30) as light:
        light.evaluate("mse", y, y)  # compiled first: heavy's two calls follow each other closely
        heavy.evaluate("mse", y, y)  # 800 of its 1000
        with pytest.raises(lossd.LossdError) as refused:
            heavy.evaluate("mse", y, y)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "CALLER_RATE_LIMIT"
        assert refused.value.metadata["caller"] == "heavy"
        assert 0.3 < refused.value.retry_delay <= 0.8  # (800 - ~200 left) / 1000 per second
        assert "1,000 elements per second" in refused.value.message
        for _ in range(5):
            assert light.evaluate("mse", y, y).loss == 0.0
        time.sleep(refused.value.retry_delay + 0.05)
        assert heavy.evaluate("mse", y, y).loss == 0.0
        # A request larger than one second's worth waits for a full bucket,
        # then leaves it in debt: the next is refused before it is read, for
        # the 4 s until the debt is paid.
        time.sleep(1.05)
        big = np.zeros(5000, np.float32)
        assert heavy.evaluate("mse", big, big).loss == 0.0
        with pytest.raises(lossd.LossdError) as debt:
            heavy.evaluate("mse", y, y)
        assert debt.value.reason == "CALLER_RATE_LIMIT" and 3.5 < debt.value.retry_delay <= 4.0
    after = _scrape(srv)
    assert (_sample(after, "lossd_rejected_requests_total", reason="CALLER_RATE_LIMIT")
            - _sample(before, "lossd_rejected_requests_total", reason="CALLER_RATE_LIMIT")) == 2
    assert (_sample(after, "lossd_caller_requests_total", caller="heavy")
            - _sample(before, "lossd_caller_requests_total", caller="heavy")) == 3
    assert (_sample(after, "lossd_caller_elements_total", caller="heavy")
            - _sample(before, "lossd_caller_elements_total", caller="heavy")) == 800 * 2 + 5000
    assert (_sample(after, "lossd_caller_requests_total", caller="light")
            - _sample(before, "lossd_caller_requests_total", caller="light")) == 6
    assert _sample(before, "lossd_rejected_requests_total", reason="QUEUE_FULL") == 0  # pre-initialised


def _evaluate_messages_read(text: str) -> float:
    return _sample(text, "grpc_server_msg_received_total", grpc_service="lossd.v1.LossService",
                   grpc_method="Evaluate")


def test_a_caller_in_debt_or_without_a_token_is_refused_before_its_request_is_read(limited):
    srv, tokens = limited
    big = np.zeros((4, 2_000_000), np.float32)  # 64 MB of tensors in one message
    with lossd.Client(srv.address, token=tokens["debtor"], timeout=60) as debtor, \
            lossd.Client(srv.address, timeout=60) as nobody:
        debtor.evaluate("mse", np.zeros(5000, np.float32), np.zeros(5000, np.float32))  # a full bucket, 4 s of debt
        before = _scrape(srv)
        with pytest.raises(lossd.LossdError) as debt:
            debtor.evaluate("mse", big, big)
        with pytest.raises(lossd.LossdError) as anonymous:
            nobody.evaluate("mse", big, big)
        after = _scrape(srv)
    assert debt.value.reason == "CALLER_RATE_LIMIT" and "earlier requests" in debt.value.message
    assert 3.0 < debt.value.retry_delay <= 4.0
    assert anonymous.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Neither message was read: the refusing handler never asks gRPC for it.
    assert _evaluate_messages_read(after) == _evaluate_messages_read(before)
    assert (_sample(after, "lossd_rejected_requests_total", reason="CALLER_RATE_LIMIT")
            - _sample(before, "lossd_rejected_requests_total", reason="CALLER_RATE_LIMIT")) == 1


def test_refusals_of_other_parts_are_counted_too(start):
    """TOO_MANY_STREAMS comes from the stream limiter, which knows nothing of
    metrics: the status module counts it."""
    srv = start(max_streams=1, stream_idle_seconds=30)
    before = _sample(_scrape(srv), "lossd_rejected_requests_total", reason="TOO_MANY_STREAMS")
    channel = grpc.insecure_channel(srv.address)
    from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc

    stub = loss_service_pb2_grpc.LossServiceStub(channel)
    gate = threading.Event()

    def idle():
        yield loss_service_pb2.EvaluateStreamRequest()
        gate.wait(30)

    held = stub.EvaluateStream(idle())
    try:
        next(held)  # the first stream is open and holds the only slot
        with lossd.Client(srv.address, timeout=30) as client:
            with pytest.raises(lossd.LossdError) as refused:
                list(client.evaluate_many([{"loss": "mse", "y_true": np.ones(2, np.float32),
                                            "y_pred": np.ones(2, np.float32)}]))
        assert refused.value.reason == "TOO_MANY_STREAMS"
    finally:
        gate.set()
        held.cancel()
        channel.close()
    after = _sample(_scrape(srv), "lossd_rejected_requests_total", reason="TOO_MANY_STREAMS")
    assert after - before == 1


# -- fairness: a heavy caller beside a light one ------------------------------

HEAVY_RATE = 250_000  # elements per second: one 1e6-element request every 4 s
BLOCKS = 4            # of each kind, alternating
BLOCK_SECONDS = 2.0

HEAVY = r"""
import json, os, sys, time
import numpy as np
import lossd

address, token, flag, stop = sys.argv[1:5]
y = np.random.default_rng(1).random((1000, 1000), dtype=np.float32)
counts = {"ok": 0, "refused": 0, "other": 0, "delays": []}
with lossd.Client(address, token=token, timeout=60) as client:
    client.losses()
    print("ready", flush=True)
    while not os.path.exists(stop):
        if not os.path.exists(flag):
            time.sleep(0.005)
            continue
        try:
            client.evaluate("mse", y, y)
            counts["ok"] += 1
        except lossd.LossdError as error:
            if error.reason == "CALLER_RATE_LIMIT" and error.retry_delay:
                counts["refused"] += 1
                counts["delays"].append(error.retry_delay)
                # Sleep the delay, but wake for the flag: blocks stay what they say.
                end = time.monotonic() + error.retry_delay
                while time.monotonic() < end and os.path.exists(flag):
                    time.sleep(0.005)
            else:
                counts["other"] += 1
                print(repr(error), file=sys.stderr)
print(json.dumps(counts), flush=True)
"""


def _light_block(client, seconds: float) -> list[float]:
    y_true = np.random.default_rng(2).random((64, 10), dtype=np.float32)
    y_pred = y_true + np.float32(0.25)
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        client.evaluate("mse", y_true, y_pred)
        samples.append(time.perf_counter() - start)
    return samples


@pytest.mark.slow
def test_a_rate_limited_heavy_caller_does_not_starve_a_light_one(start, tmp_path):
    """The issue's fairness test. The heavy caller (1e6-element requests in a
    loop, its token limited to a rate) runs in a process of its own, so its
    8 MB serializations do not hold this process's GIL, and honours the
    retry delay it is given. Alone and loaded alternate in blocks in the
    same run, so drift on this shared 2-core machine falls on both sides."""
    path = tmp_path / "tokens.jsonl"
    heavy_token = create_token(path, "heavy", "--rate", str(HEAVY_RATE))
    light_token = create_token(path, "light")
    address = start(tokens_file=path).address
    flag, stop = tmp_path / "heavy.run", tmp_path / "heavy.stop"
    heavy = subprocess.Popen([sys.executable, "-c", HEAVY, address, heavy_token, str(flag), str(stop)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert heavy.stdout.readline().strip() == "ready", heavy.stderr.read()
        with lossd.Client(address, token=light_token, timeout=30) as light:
            _light_block(light, 0.5)  # warm: the program compiles here
            alone, loaded = [], []
            # At least BLOCKS pairs, more while either side has too few calls
            # for a p99 (a loaded machine, e.g. the suite in parallel, answers
            # fewer per block); at most four times as many.
            blocks = 0
            while blocks < BLOCKS or (min(len(alone), len(loaded)) <= 1000 and blocks < 4 * BLOCKS):
                blocks += 1
                alone += _light_block(light, BLOCK_SECONDS)
                flag.touch()
                time.sleep(0.05)  # the heavy caller is sending
                loaded += _light_block(light, BLOCK_SECONDS)
                flag.unlink()
                time.sleep(0.1)  # its last request ends
        stop.touch()
        out, err = heavy.communicate(timeout=60)
    finally:
        stop.touch()
        if heavy.poll() is None:
            heavy.kill()
            heavy.wait(10)
    counts = json.loads(out.strip().splitlines()[-1])
    p99_alone, p99_loaded = (float(np.percentile(s, 99)) for s in (alone, loaded))
    print(f"light p99 alone {p99_alone * 1e3:.2f} ms ({len(alone)} calls), loaded {p99_loaded * 1e3:.2f} ms "
          f"({len(loaded)} calls), ratio {p99_loaded / p99_alone:.2f}; heavy {counts['ok']} admitted, "
          f"{counts['refused']} refused (CALLER_RATE_LIMIT)")
    assert counts["other"] == 0, err
    assert counts["ok"] >= 1, "the heavy caller was never admitted: the test measured nothing"
    assert counts["refused"] >= 1, "the heavy caller was never refused"
    assert all(0 < d <= 1e6 / HEAVY_RATE + 0.1 for d in counts["delays"]), counts["delays"]
    assert len(alone) > 1000 and len(loaded) > 1000
    assert p99_loaded <= 3 * p99_alone
