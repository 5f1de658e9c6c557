"""Fair sharing between callers (issue 23), on a real server on loopback
with real TensorFlow and a tokens file: a flooding caller (Alice) takes her
share of the evaluation slots and of the compile slots, waits past it or is
refused with RESOURCE_EXHAUSTED and a RetryInfo delay, and a light caller
(Bob) is still admitted within his. What the flood costs the light caller
in time is measured by bench/fairness.py, not here.

Who is active (and so each share) depends on recent activity; the tests
make the linger long, so it depends on the steps alone, not on how fast
this shared machine runs them.
"""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from tests.servers import lossd_servers
from test_admission import _slow_loss, create_token  # a new program that traces for a second or more

import lossd

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    with lossd_servers(tmp_path_factory, metrics_cache_seconds=0) as start_server:
        yield start_server


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.jsonl"
    return path, {"alice": create_token(path, "alice"), "bob": create_token(path, "bob")}


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _sample(srv, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class _Flood:
    """Alice's requests, each in a thread of its own: what each answered."""

    def __init__(self, client: lossd.Client):
        self.client = client
        self.answers: list = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def send(self, loss, y_true, y_pred, **kwargs) -> None:
        def run():
            try:
                self.client.evaluate(loss, y_true, y_pred, **kwargs)
                answer = "OK"
            except lossd.LossdError as exc:
                answer = exc
            with self.lock:
                self.answers.append(answer)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def refusals(self) -> list:
        with self.lock:
            return [a for a in self.answers if isinstance(a, lossd.LossdError)]

    def join(self) -> None:
        for thread in self.threads:
            thread.join(120)
            assert not thread.is_alive()


def test_a_flooder_gets_its_share_of_evaluation_slots_and_a_light_caller_is_admitted_at_once(start, tokens):
    path, token = tokens
    srv = start(tokens_file=path, evaluation_slots=2, max_caller_queued=1, max_queue_seconds=60)
    slots = srv.admission.slots
    slots.linger_seconds = 600
    y = np.zeros((4, 3), np.float32)
    with lossd.Client(srv.address, token=token["alice"], timeout=120) as alice, \
            lossd.Client(srv.address, token=token["bob"], timeout=120) as bob:
        bob.evaluate("mse", y, y)  # compiled, and Bob is an active caller from now on
        flood = _Flood(alice)
        # With Bob active, Alice's share is 1 of the 2 slots: her first
        # request runs, her second waits, her others are refused at once.
        flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: slots.held("alice") == 1, "Alice's first request never took a slot")
        flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: slots.queued("alice") == 1, "Alice's second request never waited")
        for _ in range(3):
            flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: len(flood.refusals()) == 3, "Alice's requests past her share were not refused")
        running = slots.held("alice")
        # Bob, under his share, is admitted at once, again and again, while
        # Alice holds her slot and her second request still waits.
        waits_before = _sample(srv, "lossd_fair_share_waits_total", caller="bob", slots="evaluation")
        for _ in range(20):
            assert bob.evaluate("mse", y, y + 1).loss == pytest.approx(1.0)
        assert running == 1 and slots.queued("alice") + slots.held("alice") >= 1
        assert _sample(srv, "lossd_fair_share_waits_total", caller="bob", slots="evaluation") == waits_before
        flood.join()
    for refusal in flood.refusals():
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refusal.reason == "CALLER_SHARE_FULL"
        assert refusal.retry_delay and 0 < refusal.retry_delay <= 30
        assert refusal.metadata["caller"] == "alice" and refusal.metadata["share"] == "1"
        assert refusal.metadata["setting"] == "evaluation_slots" and "retry in" in refusal.message
    assert flood.answers.count("OK") == 2  # the one that ran, and the one that waited its turn
    assert _sample(srv, "lossd_fair_share_refusals_total", caller="alice", slots="evaluation") == 3
    assert _sample(srv, "lossd_rejected_requests_total", reason="CALLER_SHARE_FULL") >= 3
    assert slots.held() == 0 and slots.queued() == 0


def test_a_slot_given_back_goes_to_the_waiting_light_caller_not_the_flooder(start, tokens):
    path, token = tokens
    srv = start(tokens_file=path, evaluation_slots=2, max_caller_queued=1, max_queue_seconds=60)
    slots = srv.admission.slots
    slots.linger_seconds = 600
    y = np.zeros((4, 3), np.float32)
    with lossd.Client(srv.address, token=token["alice"], timeout=120) as alice, \
            lossd.Client(srv.address, token=token["bob"], timeout=120) as bob:
        bob.evaluate("mse", y, y)  # compiled before Alice starts
        slots._seen.clear()  # Bob idle: Alice alone takes both slots
        flood = _Flood(alice)
        for _ in range(2):
            flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: slots.held("alice") == 2, "Alice never held both slots")
        flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: slots.queued("alice") == 1, "Alice's third request never waited")
        # Bob waits for the first slot Alice gives back, and gets it though
        # her third request waited before him.
        assert bob.evaluate("mse", y, y + 1).loss == pytest.approx(1.0)
        assert slots.queued("alice") == 1 or flood.answers.count("OK") >= 2
        flood.join()
    assert flood.answers == ["OK"] * 3
    assert _sample(srv, "lossd_fair_share_waits_total", caller="bob", slots="evaluation") == 1


def test_a_compile_flood_leaves_a_light_caller_its_compile_share(start, tokens):
    path, token = tokens
    srv = start(tokens_file=path, max_pending_compiles=2, max_caller_queued=1, max_queue_seconds=60)
    compile_slots = srv.evaluator.compile_slots
    compile_slots.linger_seconds = 600
    y = np.zeros((4, 3), np.float32)
    with lossd.Client(srv.address, token=token["alice"], timeout=120) as alice, \
            lossd.Client(srv.address, token=token["bob"], timeout=120) as bob:
        flood = _Flood(alice)
        for _ in range(2):
            flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: compile_slots.held("alice") == 2, "Alice never held both compile slots")
        for _ in range(3):
            flood.send(_slow_loss(), y, y, gradient=True)
        _wait_for(lambda: len(flood.refusals()) == 2, "Alice's compiles past her share were not refused")
        # Bob's new expression is not COMPILE_BUSY: it waits for the first
        # compile slot Alice gives back, ahead of her waiting request.
        result = bob.evaluate({"expression": "mean(square(y_true - y_pred)) * 3.0"}, y, y + 1)
        assert result.loss == pytest.approx(3.0)
        flood.join()
    for refusal in flood.refusals():
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refusal.reason == "COMPILE_BUSY"
        assert refusal.retry_delay and refusal.retry_delay > 0
        assert refusal.metadata["setting"] == "max_pending_compiles"
    assert flood.answers.count("OK") == 3
    assert _sample(srv, "lossd_fair_share_refusals_total", caller="alice", slots="compile") == 2


def test_a_server_without_tokens_shares_nothing(start):
    srv = start()
    assert srv.admission.slots is None and srv.evaluator.compile_slots is None
