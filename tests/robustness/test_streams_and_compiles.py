"""Issue 11, items 4, 7, 8 and 9 (labels): what streams, new programs and
scrapes can take from the threads that serve evaluation.

* Streams (item 7): at most ``max_streams`` open at once, beyond it
  RESOURCE_EXHAUSTED ``TOO_MANY_STREAMS``; with every stream slot held by an
  idle stream, health and Evaluate still answer at once; an idle request
  stream ends with DEADLINE_EXCEEDED ``STREAM_IDLE`` and frees its slot, and
  so does a WatchJob with nothing to report; ``client.wait`` resumes after it.
* Compilation (item 4): a program compiles once however many requests ask
  for it; a slow compilation does not hold up a compiled program nor
  another new one; pending compilations are bounded (``COMPILE_BUSY``), so is
  the wait (``COMPILE_TIMEOUT``), the program size (``PROGRAM_TOO_LARGE``) and
  the cache's graph operations.
* Metrics (items 8, 9): ``/metrics`` renders at most once per interval
  however many scrapers; registered losses get at most ``max_loss_labels``
  label values.
"""
from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.grpc_errors import reason_of
from tests.held_streams import IdleChunked, open_idle_streams
from tests.servers import lossd_servers
import lossd
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2
from lossd.v1 import training_service_pb2 as tpb
from lossd.v1 import training_service_pb2_grpc as tpb_grpc

pytest.importorskip("tensorflow")

F32 = tensor_pb2.DATA_TYPE_FLOAT32
Y = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)


def health_seconds(channel) -> float:
    stub = health_pb2_grpc.HealthStub(channel)
    start = time.perf_counter()
    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return time.perf_counter() - start


def health_bound(channel) -> float:
    """How long a health check may take while streams or compilations keep
    the server busy: 0.1 s, or ten times the median of ten checks on the
    same server just before, where the machine's load (the other xdist
    worker) makes even those slow. Starved health, waiting for a thread that
    an idle stream or a compilation holds, takes seconds (the stream idle
    limit, a compilation) either way."""
    return max(0.1, 10 * statistics.median(health_seconds(channel) for _ in range(10)))


def evaluate_mse(stub) -> float:
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"), y_true=wire.from_numpy(Y),
                                               y_pred=wire.from_numpy(Y + 1))
    return float(wire.to_numpy(stub.Evaluate(request, timeout=10).loss))


@pytest.fixture(scope="module")
def small(start_server):
    """A server with 2 unary workers, 3 stream slots and a 5 s idle limit."""
    address = start_server(workers=2, max_streams=3, stream_idle_seconds=5)
    with grpc.insecure_channel(address) as channel:
        yield address, channel


def test_streams_beyond_the_limit_are_refused_and_idle_ones_cannot_starve_health(small):
    address, channel = small
    stub = loss_service_pb2_grpc.LossServiceStub(channel)
    evaluate_mse(stub)  # compiled before the streams open: the checks below take no compile time
    bound = health_bound(channel)
    held = [IdleChunked(stub) for _ in range(3)]
    try:
        time.sleep(0.3)  # the three hold their slots
        extra = IdleChunked(stub)
        assert extra.ended.wait(10), "a fourth stream was not refused"
        assert extra.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, extra.error
        assert reason_of(extra.error) == "TOO_MANY_STREAMS"
        assert "max_streams" in extra.error.details()
        # GenerateStream takes a slot like any stream (refused before it looks
        # the job up), while the unary Generate still answers.
        training = tpb_grpc.TrainingServiceStub(channel)
        request = tpb.GenerateRequest(name="jobs/none", count=1)
        with pytest.raises(grpc.RpcError) as refused:
            list(training.GenerateStream(request, timeout=10))
        assert reason_of(refused.value) == "TOO_MANY_STREAMS"
        with pytest.raises(grpc.RpcError) as unary:
            training.Generate(request, timeout=10)
        assert reason_of(unary.value) == "JOB_NOT_FOUND"
        # Every stream slot is taken by an idle stream: unary calls still answer.
        latencies = [health_seconds(channel) for _ in range(20)]
        assert evaluate_mse(stub) == pytest.approx(1.0)
        assert not any(h.ended.is_set() for h in held), "a held stream ended before the checks were done"
        assert statistics.median(latencies) < bound, (bound, latencies)
    finally:
        for h in held:
            h.close()


def test_an_idle_request_stream_ends_with_stream_idle_and_frees_its_slot(small):
    address, channel = small
    stub = loss_service_pb2_grpc.LossServiceStub(channel)
    readers_before = sum(t.name.startswith("stream-reader") for t in threading.enumerate())
    start = time.monotonic()
    idle = open_idle_streams(stub, 3)  # the previous test's cancelled streams may still hold slots
    for call in idle:
        assert call.ended.wait(30)
    waited = time.monotonic() - start
    for call in idle:
        assert call.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, call.error
        assert reason_of(call.error) == "STREAM_IDLE"
        assert "stream_idle_seconds" in call.error.details()
    assert 4.9 <= waited < 20, waited
    # The slots are free again: a chunked evaluation runs end to end.
    client = lossd.Client(address, max_message_bytes=2048, chunk_bytes=512)  # sends in chunks
    y_true = np.random.default_rng(0).random((256, 3), dtype=np.float32)
    result = client.evaluate("mse", y_true, y_true + 0.5)
    np.testing.assert_allclose(result.loss, 0.25, rtol=1e-5)
    client.close()
    # The reader threads of the ended streams are gone.
    deadline = time.monotonic() + 10
    while sum(t.name.startswith("stream-reader") for t in threading.enumerate()) > readers_before:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.1)


def test_an_idle_upload_ends_with_stream_idle(small):
    address, channel = small
    stub = tpb_grpc.TrainingServiceStub(channel)
    release = threading.Event()

    def requests():
        yield tpb.UploadDatasetRequest(header=tpb.DatasetHeader(name="idle", format=tpb.DatasetHeader.FORMAT_NPZ, size_bytes=100))
        release.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadDataset(requests(), timeout=30)
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert reason_of(err.value) == "STREAM_IDLE"
    names = [d.name for d in stub.ListDatasets(tpb.ListDatasetsRequest(), timeout=10).datasets]
    assert "idle" not in names


@pytest.fixture(scope="module")
def queued_server(tmp_path_factory):
    """A server whose training scheduler never starts: its jobs stay queued,
    as behind a long job on a busy machine."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, metrics_port=None, grace_seconds=0, stream_idle_seconds=1.0,
                        data_dir=tmp_path_factory.mktemp("queued"))
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.training.start = lambda: None
    srv.start()
    yield f"127.0.0.1:{srv.port}"
    srv.stop(0)


def test_a_watch_with_nothing_to_report_ends_with_stream_idle_and_wait_resumes(queued_server):
    client = lossd.Client(queued_server)
    job = client.create_job(model="mlp", dataset="digits", loss="sparse_categorical_crossentropy", epochs=1)
    stub = tpb_grpc.TrainingServiceStub(grpc.insecure_channel(queued_server))
    start = time.monotonic()
    events = []
    with pytest.raises(grpc.RpcError) as err:
        for event in stub.WatchJob(tpb.WatchJobRequest(name=job.name), timeout=30):
            events.append(event)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert reason_of(err.value) == "STREAM_IDLE"
    assert 0.9 <= time.monotonic() - start < 10
    last = events[-1].sequence if events else 0
    assert f"after_sequence={last}" in err.value.details()
    # client.wait resumes after each STREAM_IDLE and gives up only at its own deadline.
    start = time.monotonic()
    with pytest.raises(lossd.LossdError) as waited:
        client.wait(job, progress=False, timeout=3.5)
    assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start >= 3.4
    client.close()


# -- item 4: compilation ------------------------------------------------------------


def big_expression(seed: int, parts: int = 12) -> str:
    """An expression of about 10 parts per term, different for each seed."""
    term = "mean(square(y_true - y_pred) * {c} + abs(y_true - y_pred))"
    return " + ".join(term.format(c=seed * 1000 + i + 0.5) for i in range(parts))


def big_composite(seed: int, terms: int = 8) -> dict:
    return {"terms": [{"loss": {"expression": big_expression(seed * 100 + k)}, "label": f"t{k}"}
                      for k in range(terms)]}


@pytest.fixture
def evaluator():
    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses.custom import full_registry, inline_entry

    made = []

    def make(**options):
        ev = Evaluator(full_registry(plugins=False), backend.select_device("cpu"),
                       expression_compiler=inline_entry, **options)
        made.append(ev)
        return ev

    yield make
    for ev in made:
        ev.close()


def run(ev, spec, gradient=True):
    return ev.evaluate(ev.planner.plan(spec), {"y_true": Y, "y_pred": Y + 1}, gradient=gradient)


def test_a_program_compiles_once_however_many_requests_ask_for_it(evaluator):
    ev = evaluator(compile_workers=2, max_pending_compiles=8)
    spec = {"expression": big_expression(1, parts=6)}
    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: run(ev, spec), range(8)))
    assert ev.compilations == 1
    assert len({float(r.loss) for r in results}) == 1


def test_a_slow_compilation_holds_up_neither_compiled_programs_nor_another_new_one(evaluator):
    ev = evaluator(compile_workers=2)
    run(ev, {"name": "mse"})  # compiled before the slow one starts
    # The same calls with nothing compiling, as baselines: the machine's load
    # (the other xdist worker) can make them slow too.
    start = time.perf_counter()
    run(ev, {"name": "mse"})
    compiled_alone = time.perf_counter() - start
    run(ev, {"expression": "mean(abs(y_true - y_pred)) * 2"})
    new_alone = time.perf_counter() - start - compiled_alone
    with futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(run, ev, big_composite(2))
        while ev.compilations < 2:  # the composite's trace has started
            time.sleep(0.005)
        start = time.perf_counter()
        run(ev, {"name": "mse"})
        compiled_seconds = time.perf_counter() - start
        run(ev, {"expression": "mean(abs(y_true - y_pred)) * 3"})
        new_seconds = time.perf_counter() - start
        assert not slow.done(), "the composite compiled too fast to show anything; make it larger"
        slow.result()
    # The composite took seconds to trace, and was still tracing when both
    # returned; the compiled program and the small new one did not queue
    # behind it: each took about what it takes alone.
    assert compiled_seconds < max(0.5, 10 * compiled_alone), (compiled_seconds, compiled_alone)
    assert new_seconds < max(2.0, 4 * (compiled_alone + new_alone)), (new_seconds, compiled_alone, new_alone)


def test_pending_compilations_are_bounded(tmp_path_factory):
    with lossd_servers(tmp_path_factory) as start:
        srv = start(compile_workers=1, max_pending_compiles=1)
        address = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(address) as channel:
            stub = loss_service_pb2_grpc.LossServiceStub(channel)
            client = lossd.Client(address)
            traced = srv.evaluator.compilations
            with futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(client.evaluate, big_composite(3, terms=5), Y, Y + 1, gradient=True)
                # The composite's trace has started (seconds, with its
                # gradient): counted when it starts, however late its request
                # reaches a loaded server.
                while srv.evaluator.compilations == traced:
                    assert not slow.done(), slow.exception()
                    time.sleep(0.005)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Evaluate(loss_service_pb2.EvaluateRequest(
                        loss=loss_pb2.LossSpec(expression="mean(abs(y_true - y_pred)) * 7"),
                        y_true=wire.from_numpy(Y), y_pred=wire.from_numpy(Y + 1)), timeout=30)
                assert not slow.done()
                slow.result()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert reason_of(err.value) == "COMPILE_BUSY"
            assert "max_pending_compiles" in err.value.details()
            client.close()


def test_requests_piling_up_on_one_compilation_leave_threads_for_health(start_server):
    address = start_server(workers=4, max_pending_compiles=2)
    spec = big_composite(6, terms=5)
    client = lossd.Client(address)
    with grpc.insecure_channel(address) as channel, futures.ThreadPoolExecutor(8) as pool:
        bound = health_bound(channel)
        calls = [pool.submit(client.evaluate, spec, Y, Y + 1, gradient=True) for _ in range(8)]
        time.sleep(0.5)
        latencies = [health_seconds(channel) for _ in range(10)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(np.isfinite(call.result().loss))
            except lossd.LossdError as error:
                outcomes.append(error.reason)
    assert statistics.median(latencies) < bound, (bound, latencies)
    assert outcomes.count("COMPILE_BUSY") >= 6 - 2, outcomes  # at most 2 waited (plus any after it finished)
    assert True in outcomes
    client.close()


def test_a_request_waits_for_its_compilation_at_most_the_timeout_and_a_retry_finds_it(evaluator):
    from lossd_server.errors import ResourceExhausted

    ev = evaluator(compile_timeout=0.2)
    spec = big_composite(4)
    with pytest.raises(ResourceExhausted) as err:
        run(ev, spec)
    assert err.value.reason == "COMPILE_TIMEOUT"
    assert "compile_timeout_seconds" in err.value.message
    deadline = time.monotonic() + 60
    while ev._pending:  # the compilation went on
        assert time.monotonic() < deadline
        time.sleep(0.05)
    compilations = ev.compilations
    result = run(ev, spec)
    assert ev.compilations == compilations  # the retry used the finished program
    assert np.isfinite(result.loss)


def test_a_program_past_max_program_nodes_is_refused_before_tracing(start_server):
    address = start_server(max_program_nodes=100)
    client = lossd.Client(address)
    with pytest.raises(lossd.LossdError) as err:
        client.evaluate(big_composite(5, terms=2), Y, Y + 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == "PROGRAM_TOO_LARGE"
    assert err.value.metadata["limit"] == "100"
    assert int(err.value.metadata["received"]) > 100
    # Jobs plan through the same planner: the same refusal at CreateJob.
    with pytest.raises(lossd.LossdError) as job_err:
        client.create_job(model="mlp", dataset="digits", loss=big_composite(5, terms=2), epochs=1)
    assert job_err.value.reason == "PROGRAM_TOO_LARGE"
    assert client.evaluate({"expression": "mean(square(y_true - y_pred))"}, Y, Y + 1).loss == pytest.approx(1.0)
    client.close()


def test_the_cache_is_bounded_by_graph_operations(evaluator):
    ev = evaluator()
    run(ev, {"expression": big_expression(10, parts=4)})
    ops = next(iter(ev._cache.values())).ops
    ev.cache_max_ops = int(ops * 2.5)  # room for two programs of this size
    for seed in range(1, 4):
        run(ev, {"expression": big_expression(10 + seed, parts=4)})
    held = sum(program.ops for program in ev._cache.values())
    assert held <= ev.cache_max_ops, (held, ev.cache_max_ops)
    assert len(ev._cache) == 2
    # The most recent program stays, even when it alone is above the bound.
    big = {"expression": big_expression(20, parts=12)}
    run(ev, big)
    assert len(ev._cache) == 1
    compilations = ev.compilations
    run(ev, big)
    assert ev.compilations == compilations


# -- items 8 and 9: metrics -------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_render_at_most_once_per_interval_however_many_scrapers(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0, metrics_cache_seconds=30,
                        data_dir=tmp_path_factory.mktemp("scrapes"))
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    try:
        exposition = srv._metrics_http.exposition
        first = scrape(srv.metrics_port)
        renders = exposition.renders
        with futures.ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(lambda _: scrape(srv.metrics_port), range(64)))
        assert exposition.renders == renders
        assert set(bodies) == {first}
        # A fresh scrape after the interval sees new values: the cache ages.
        exposition.cache_seconds = 0
        client = lossd.Client(f"127.0.0.1:{srv.port}")
        client.evaluate("mse", Y, Y + 1)
        client.close()
        assert scrape(srv.metrics_port) != first
    finally:
        srv.stop(0)


def loss_label_values(text: str) -> set[str]:
    return {sample.labels["loss"] for family in text_string_to_metric_families(text)
            if family.name == "lossd_loss_evaluations" for sample in family.samples}


def test_registered_losses_get_at_most_max_loss_labels_label_values(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0, metrics_cache_seconds=0,
                        max_loss_labels=2, data_dir=tmp_path_factory.mktemp("labels"))
    names = [f"mine_{i}" for i in range(5)]
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    client = lossd.Client(f"127.0.0.1:{srv.port}")
    for name in names:
        client.register_loss(name, "mean(square(y_true - y_pred))")
    client.close()
    srv.stop(0)

    # After a restart the registered losses are loaded but add no series.
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    try:
        before = loss_label_values(scrape(srv.metrics_port))
        assert not before & set(names)
        assert {"mean_squared_error", "composite", "expression", "other"} <= before
        client = lossd.Client(f"127.0.0.1:{srv.port}")
        for name in names:
            assert client.evaluate(name, Y, Y + 1).loss == pytest.approx(1.0)
        client.close()
        after = loss_label_values(scrape(srv.metrics_port))
        assert after & set(names) == set(names[:2])
        assert after - before == set(names[:2])
        text = scrape(srv.metrics_port)
        other = [s.value for f in text_string_to_metric_families(text) if f.name == "lossd_loss_evaluations"
                 for s in f.samples if s.name.endswith("_total") and s.labels == {"loss": "other", "outcome": "ok"}]
        assert other == [3.0]
    finally:
        srv.stop(0)


# -- item 14: TensorFlow running out of memory --------------------------------------------


def test_an_allocation_tensorflow_cannot_make_is_resource_exhausted_not_internal(start_server):
    # With the broadcast and cost bounds lifted (they refuse this request
    # before any work: tests/robustness/test_cost_bounds.py), (N, 1) - (1, N)
    # asks TensorFlow for N*N*4 = 144 TB: more than any process's address
    # space, so the allocation fails at once on every machine (after
    # TensorFlow's own retry wait of about 10 s) instead of paging anything in.
    address = start_server(max_broadcast_elements=10**15, max_evaluation_cost=10**30,
                           max_evaluation_memory_bytes=10**30)
    n = 6_000_000
    client = lossd.Client(address)
    with pytest.raises(lossd.LossdError) as err:
        client.evaluate({"expression": "mean(square(y_true - y_pred))"}, np.zeros((n, 1), np.float32),
                        np.zeros((1, n), np.float32), timeout=120)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert err.value.reason == "OUT_OF_MEMORY"
    assert "[1, 6000000]" in err.value.message
    assert client.evaluate("mse", Y, Y + 1).loss == pytest.approx(1.0)
    client.close()
