"""/metrics under abuse (issue 23): the registry is rendered on one
background thread, at most once per interval, never on a scrape's thread;
the HTTP server answers on a fixed number of threads whatever the number of
clients; one client address is answered at most ``rate`` times a second
while another address is answered at once; and a wrong-password flood is
refused without hashing past its budget, while a valid scrape that repeats
a verified password (also after the users file was re-read) is answered at
once. Real HTTP server on a loopback port, real requests; the flood comes
from 127.0.0.2, another address than the valid scrapes' 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import http.client
import threading
import time
from concurrent import futures

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lossd_server.security import basic_auth
from lossd_server.observability.metrics import Metrics, start_metrics_server
from lossd_server.security.basic_auth import BasicAuth, hash_password


class _ThreadRecorder(Collector):
    """A collector that notes which threads rendered it."""

    def __init__(self):
        self.threads: list[str] = []

    def collect(self):
        self.threads.append(threading.current_thread().name)
        yield GaugeMetricFamily("test_rendered", "renderings", value=len(self.threads))


@pytest.fixture
def serve():
    servers = []

    def run(cache_seconds=1.0, **options):
        metrics = Metrics(CollectorRegistry(), loss_names=["mean_squared_error"], version="t",
                          process_metrics=False)
        recorder = _ThreadRecorder()
        metrics.registry.register(recorder)
        server, port = start_metrics_server(metrics, "127.0.0.1", 0, cache_seconds=cache_seconds, **options)
        servers.append(server)
        return port, recorder, server

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def request(port: int, *, source: str = "127.0.0.1", user: str | None = None, password: str = "") -> tuple:
    """(status, body, seconds) of a GET /metrics from the address ``source``."""
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    start = time.monotonic()
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - start
    finally:
        connection.close()


def test_scrapes_never_render_and_share_one_rendering_per_interval(serve):
    port, recorder, server = serve(cache_seconds=30, rate_per_address=1000)
    with futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: request(port), range(48)))
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, body, _ in answers}) == 1
    assert recorder.threads == ["metrics-render"] and server.exposition.renders == 1
    server.exposition.cache_seconds = 0  # a fresh rendering for each scrape, still on the render thread
    assert request(port)[1] != answers[0][1]
    assert set(recorder.threads) == {"metrics-render"} and len(recorder.threads) == 2


def test_many_clients_get_a_fixed_number_of_threads(serve):
    port, _, _ = serve(rate_per_address=1000)
    # By thread, not by name: another server of this test process (the
    # session's) may run threads of the same names.
    before = {(t.name, t.ident) for t in threading.enumerate()}
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update((t.name, t.ident) for t in threading.enumerate())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, name="watcher")
    watcher.start()
    try:
        with futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: request(port), range(128)))
    finally:
        stop.set()
        watcher.join()
    assert {status for status, _, _ in answers} == {200}
    server_threads = {name for name, _ in seen - before if not name.startswith("ThreadPoolExecutor")} - {"watcher"}
    assert server_threads == {"metrics-render"}, server_threads  # the handler threads were there before
    assert len([n for n, _ in before if n.startswith("metrics-http-")]) >= 2


def test_one_address_is_answered_at_its_rate_while_another_is_answered_at_once(serve):
    port, _, _ = serve(rate_per_address=10)
    start = time.monotonic()
    with futures.ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(request, port, source="127.0.0.2") for _ in range(24)]
        time.sleep(0.3)  # the flood is queued
        status, _, seconds = request(port, source="127.0.0.1")
        flooded = [f.result() for f in flood]
    assert status == 200 and seconds < 0.5, seconds
    assert {s for s, _, _ in flooded} == {200}
    assert time.monotonic() - start >= 23 / 10 - 0.05  # 24 answers at 10 a second


def test_a_wrong_password_flood_is_refused_without_hashing_and_valid_scrapes_stay_fast(tmp_path, serve,
                                                                                        monkeypatch):
    users = tmp_path / "users"
    users.write_text(f"prometheus:{hash_password('right', iterations=20_000)}\n")
    grafana = f"grafana:{hash_password('other', iterations=20_000)}\n"
    port, _, _ = serve(basic_auth=BasicAuth(users), rate_per_address=1000)
    hashed = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(basic_auth.hashlib, "pbkdf2_hmac", lambda *a: hashed.append(a[1]) or real(*a))
    assert request(port, user="prometheus", password="right")[0] == 200  # verified once: one PBKDF2
    assert len(hashed) == 1
    statuses = [request(port, source="127.0.0.2", user="prometheus", password=f"guess{i}")[0] for i in range(40)]
    assert statuses[:basic_auth.FAILURE_BURST] == [401] * basic_auth.FAILURE_BURST
    assert set(statuses[basic_auth.FAILURE_BURST:]) == {429}
    assert len(hashed) == 1 + basic_auth.FAILURE_BURST  # the 429s hashed nothing
    users.write_text(users.read_text() + grafana)  # the server re-reads the file
    for _ in range(3):
        status, _, seconds = request(port, user="prometheus", password="right")
        assert status == 200 and seconds < 0.5
    assert len(hashed) == 1 + basic_auth.FAILURE_BURST  # still verified after the reload: no PBKDF2
    # Another address keeps its own budget: a wrong password there is checked (401), not refused.
    assert request(port, source="127.0.0.3", user="prometheus", password="wrong")[0] == 401
    # The 429 says how long the address's wait is (FAILURE_SECONDS after its last failure), not "1".
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0))
    try:
        connection.request("GET", "/metrics", headers={
            "Authorization": "Basic " + base64.b64encode(b"prometheus:again").decode()})
        response = connection.getresponse()
        assert response.status == 429
        assert 1 <= int(response.getheader("Retry-After")) <= basic_auth.FAILURE_SECONDS
    finally:
        connection.close()


def test_an_address_that_keeps_failing_waits_twice_as_long_each_time_until_it_logs_in():
    """bench/scrapes.py: one PBKDF2 per 10 s for a flooding address still cost
    Evaluate a tenth of its rate; the waits now double up to FAILURE_MAX_SECONDS."""
    now = [1000.0]
    budget = basic_auth._FailureBudget(clock=lambda: now[0])
    for _ in range(basic_auth.FAILURE_BURST):
        assert budget.allows("a")
        budget.failed("a")
    assert not budget.allows("a") and budget.wait("a") == basic_auth.FAILURE_SECONDS
    waits = []
    for _ in range(7):
        now[0] += budget.wait("a") - 0.5
        assert not budget.allows("a")  # not a moment early
        now[0] += 0.5
        assert budget.allows("a")
        budget.failed("a")
        waits.append(budget.wait("a"))
    assert waits == [20, 40, 80, 160, basic_auth.FAILURE_MAX_SECONDS, basic_auth.FAILURE_MAX_SECONDS,
                     basic_auth.FAILURE_MAX_SECONDS]
    assert budget.allows("b")  # another address has its own budget
    budget.succeeded("a")  # a verified password forgives the address
    assert budget.wait("a") == 0
    for _ in range(basic_auth.FAILURE_BURST + 3):
        budget.failed("a")
    now[0] += basic_auth.FAILURE_FORGET_SECONDS  # an hour without a failure: afresh
    assert budget.wait("a") == 0
    budget.failed("a")
    assert budget.allows("a")  # the fresh burst, not one more step of the old waits
