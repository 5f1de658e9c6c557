"""Shared memory for clients on the server's host (issue 13), against real
servers on 127.0.0.1 with real POSIX shared memory: the values equal the
gRPC path's and Keras's, every range is checked against its region, names
outside the ``lossd_`` prefix are refused, a client killed with SIGKILL
leaves no region behind, the ``evaluate`` scope is needed, the bounds hold,
and the client falls back to gRPC where shared memory cannot work."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from tests.grpc_errors import reason_of
from tests.shm_regions import region
import lossd
from lossd import _shm, addresses, wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2
from lossd.v1 import shared_memory_service_pb2 as pb
from lossd.v1 import shared_memory_service_pb2_grpc as pb_grpc
from tests.keras_reference import value_and_gradient

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

if not pathlib.Path("/dev/shm").is_dir():  # pragma: no cover - Linux is where the server maps regions
    pytest.skip("POSIX shared memory under /dev/shm is Linux only", allow_module_level=True)

RNG = np.random.default_rng(13)
SHM = pathlib.Path("/dev/shm")


def shm_client(address, **kwargs) -> lossd.Client:
    return lossd.Client(address, timeout=60, shared_memory=True, shared_memory_min_bytes=0, **kwargs)


def server_regions(server) -> tuple[int, int]:
    return server.shared_memory.regions.stats()


def wait_for(predicate, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@contextlib.contextmanager
def raw_session(address: str, metadata=None):
    """An OpenSession stream: the service's stub, the session's id, the
    channel and the session's name prefix; cancelled at the end."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SharedMemoryServiceStub(channel)
        call = stub.OpenSession(pb.OpenSessionRequest(), metadata=metadata)
        first = next(call)
        try:
            yield stub, first.session_id, channel, first.name_prefix
        finally:
            call.cancel()


@contextlib.contextmanager
def own_server(data_dir, **settings):
    """A server of this test's own (port 0 on 127.0.0.1), stopped at the end."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    srv = create_server(Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": None, "grace_seconds": 0,
                                    "data_dir": data_dir, **settings}), metrics_registry=CollectorRegistry())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(0)


# -- values ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none"])
def test_huber_equals_the_grpc_path_and_keras(address, server, reduction):
    y_true = RNG.normal(size=(300, 7)).astype(np.float32)
    y_pred = RNG.normal(size=(300, 7)).astype(np.float32)
    weights = RNG.uniform(size=(300,)).astype(np.float32)
    args = dict(params={"delta": 0.7}, sample_weight=weights, reduction=reduction, gradient=True)
    with shm_client(address) as client, lossd.Client(address, timeout=60) as plain:
        via_shm = client.evaluate("huber", y_true, y_pred, **args)
        assert client.shared_memory_active
        via_grpc = plain.evaluate("huber", y_true, y_pred, **args)
    np.testing.assert_array_equal(via_shm.loss, via_grpc.loss)
    np.testing.assert_array_equal(via_shm.gradient, via_grpc.gradient)
    assert via_shm.gradient.flags.writeable and via_shm.gradient.flags.owndata  # copied out of the region
    huber = keras.losses.Huber(delta=0.7, reduction=reduction)
    value, grad = value_and_gradient(lambda t, p: huber(t, p, sample_weight=weights), y_true, y_pred)
    np.testing.assert_allclose(via_shm.loss, value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(via_shm.gradient, grad, rtol=1e-5, atol=1e-8)


def test_other_dtypes_and_extra_tensors_equal_the_grpc_path(address):
    labels = RNG.integers(0, 5, size=(64,)).astype(np.int32)
    logits = RNG.normal(size=(64, 5))  # float64
    composite = {"terms": [{"name": "sparse_categorical_crossentropy", "params": {"from_logits": True}},
                           {"expression": "mean(z * z, axis=-1)", "inputs": ["z"], "weight": 0.5}]}
    z = RNG.normal(size=(64, 3))
    with shm_client(address) as client, lossd.Client(address, timeout=60) as plain:
        a = client.evaluate(composite, labels, logits, tensors={"z": z}, gradient=True)
        b = plain.evaluate(composite, labels, logits, tensors={"z": z}, gradient=True)
        assert client.shared_memory_active
    assert a.gradient.dtype == np.float64
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.gradient, b.gradient)
    assert a.terms.keys() == b.terms.keys()


def test_bytes_served_are_counted(address, server):
    counter = server.metrics.lossd_shared_memory_bytes_total
    read, written = counter.labels("read")._value.get(), counter.labels("written")._value.get()
    y = RNG.normal(size=(1000, 10)).astype(np.float32)
    with shm_client(address) as client:
        client.evaluate("mse", y, y + 1, gradient=True)
    assert counter.labels("read")._value.get() - read == 2 * y.nbytes
    assert counter.labels("written")._value.get() - written == y.nbytes


def test_small_requests_go_over_grpc(address, server):
    read = server.metrics.lossd_shared_memory_bytes_total.labels("read")._value.get()
    with lossd.Client(address, timeout=60, shared_memory=True) as client:  # the default threshold
        y = np.ones((4, 3), np.float32)
        assert client.evaluate("mse", y, y).loss == 0
        assert not client.shared_memory_active
    assert server.metrics.lossd_shared_memory_bytes_total.labels("read")._value.get() == read


# -- lifetime ----------------------------------------------------------------------------

def lossd_regions() -> set[str]:
    return {p.name for p in SHM.glob("lossd_*")}


def test_close_unregisters_and_unlinks(address, server):
    before, held = lossd_regions(), server_regions(server)[0]
    y = RNG.normal(size=(100, 10)).astype(np.float32)
    client = shm_client(address)
    client.evaluate("mse", y, y, gradient=True)
    mine = lossd_regions() - before
    assert len(mine) == 1 and next(iter(mine)).startswith(client._shared_memory._session.name_prefix)
    assert server_regions(server)[0] == held + 1
    assert server.metrics.lossd_shared_memory_regions._value.get() == held + 1
    ok = {"grpc_type": "server_stream", "grpc_service": "lossd.v1.SharedMemoryService",
          "grpc_method": "OpenSession", "grpc_code": "OK"}
    closed = server.metrics.registry.get_sample_value("grpc_server_handled_total", ok) or 0
    client.close()
    assert not (lossd_regions() & mine)
    assert wait_for(lambda: server_regions(server)[0] == held)
    # A client that closes ends its session with OK (CloseSession), not as a cancelled call.
    assert wait_for(lambda: server.metrics.registry.get_sample_value("grpc_server_handled_total", ok) == closed + 1)


def test_the_asyncio_client_says_it_has_no_shared_memory_yet(address):
    import lossd.aio

    with pytest.raises(lossd.LossdError, match="shared_memory is available on lossd.Client only"):
        lossd.aio.Client(address, shared_memory=True)


KILLED_CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import lossd
    client = lossd.Client(sys.argv[1], shared_memory=True, shared_memory_min_bytes=0, timeout=60)
    y = np.ones((1000, 10), np.float32)
    client.evaluate("mse", y, y, gradient=True)
    assert client.shared_memory_active
    print([r.name for r in client._shared_memory._session.regions][0], flush=True)
    time.sleep(600)
""")


def test_a_client_killed_with_sigkill_leaves_no_region(address, server):
    held = server_regions(server)[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, address], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        name = child.stdout.readline().strip()
        assert name.startswith("lossd_"), name
        assert (SHM / name).exists()
        assert server_regions(server)[0] == held + 1
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        # The connection drops with the process; the server ends the session,
        # unregisters the region and unlinks it (the client had no chance to).
        assert wait_for(lambda: not (SHM / name).exists()), f"/dev/shm/{name} is still there"
        assert wait_for(lambda: server_regions(server)[0] == held)
    finally:
        child.kill()
        child.wait()


# -- checks ------------------------------------------------------------------------------

def registered(stub, session_id, memory, size=None):
    return stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=memory.name,
                                                        byte_size=size or memory.size), timeout=10)


def evaluate_request(name: str, y_true_ref, y_pred_ref, shape=(4, 4), gradient_output=None):
    """An MSE request whose float32 tensors are ranges ``(offset, byte_size)`` of region ``name``."""
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                               gradient=gradient_output is not None)
    for field, (offset, size) in (("y_true", y_true_ref), ("y_pred", y_pred_ref)):
        getattr(request, field).CopyFrom(tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=shape,
            shared_memory=tensor_pb2.SharedMemoryRef(region=name, offset=offset, byte_size=size)))
    if gradient_output is not None:
        request.gradient_output.CopyFrom(tensor_pb2.SharedMemoryRef(region=name, offset=gradient_output[0],
                                                                    byte_size=gradient_output[1]))
    return request


@pytest.mark.parametrize("y_pred_ref, expected", [
    ((4096 - 32, 64), "offset=4,064, byte_size=64"),      # runs past the end
    ((-8, 64), "offset=-8, byte_size=64"),                # negative offset
    ((0, -64), "offset=0, byte_size=-64"),                # negative size
    ((4097, 0), "offset=4,097, byte_size=0"),             # starts past the end
    ((2 ** 62, 2 ** 62), "offset=4,611,686,018,427,387,904"),  # would overflow a C int64 sum
])
def test_ranges_out_of_the_region_are_invalid_argument(address, y_pred_ref, expected):
    with raw_session(address) as (stub, session_id, channel, prefix), region(4096, f"{prefix}test_r") as memory:
        registered(stub, session_id, memory)
        losses = loss_service_pb2_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            losses.Evaluate(evaluate_request(memory.name, (0, 64), y_pred_ref), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert reason_of(err.value) == "SHM_OUT_OF_RANGE"
    assert "y_pred: shared-memory range out of bounds" in err.value.details()
    assert "(the size of region" in err.value.details() and expected in err.value.details()


def test_a_range_that_does_not_match_the_shape_is_invalid_argument(address):
    with raw_session(address) as (stub, session_id, channel, prefix), region(4096, f"{prefix}test_s") as memory:
        registered(stub, session_id, memory)
        with pytest.raises(grpc.RpcError) as err:
            loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(
                evaluate_request(memory.name, (0, 64), (64, 60)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "y_pred: content length does not match the shape. Expected 64 bytes" in err.value.details()


def test_a_gradient_output_too_small_is_refused_before_evaluating(address, server):
    evaluations = server.metrics.lossd_loss_evaluated_elements_total.labels("mean_squared_error")._value.get()
    with raw_session(address) as (stub, session_id, channel, prefix), region(4096, f"{prefix}test_g") as memory:
        registered(stub, session_id, memory)
        losses = loss_service_pb2_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            losses.Evaluate(evaluate_request(memory.name, (0, 64), (64, 64), gradient_output=(128, 60)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err.value) == "SHM_OUT_OF_RANGE"
        assert "gradient_output: shared-memory range too small. Expected at least 64 bytes" in err.value.details()
        # A range that fits is written, and the response refers to it.
        y = np.arange(16, dtype=np.float32).reshape(4, 4)
        memory.buf[:64] = y.tobytes()
        memory.buf[64:128] = (y + 2).tobytes()
        response = losses.Evaluate(evaluate_request(memory.name, (0, 64), (64, 64), gradient_output=(128, 64)),
                                   timeout=30)
        assert response.gradient.shared_memory.byte_size == 64 and not response.gradient.content
        np.testing.assert_allclose(np.frombuffer(memory.buf[128:192], np.float32), np.full(16, 2 * 2 / 16))
    assert server.metrics.lossd_loss_evaluated_elements_total.labels(
        "mean_squared_error")._value.get() == evaluations + 16


@pytest.mark.parametrize("name", ["psm_0123abcd", "lossd", "lossd_../etc/passwd", "lossd_a/b", "/lossd_abc",
                                  "lossd_" + "x" * 200, "LOSSD_abc", "lossd_nl\n", "lossd_a b", "lossd_\x00"])
def test_a_name_without_the_lossd_prefix_is_refused(address, name):
    with raw_session(address) as (stub, session_id, _, prefix), pytest.raises(grpc.RpcError) as err:
        stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=name, byte_size=4096), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if "\0" in name:  # refused as the request is parsed, before any name rule (grpc/parsing.py)
        assert reason_of(err.value) == "NUL_CHARACTER", err.value.details()
        return
    assert reason_of(err.value) == "SHM_BAD_NAME"
    assert "Expected 'lossd_' followed by letters, digits" in err.value.details()


def test_a_region_outside_the_prefix_is_neither_mapped_nor_unlinked(address, server):
    with region(4096) as memory:  # Python names it psm_...
        with raw_session(address) as (stub, session_id, _, prefix), pytest.raises(grpc.RpcError) as err:
            registered(stub, session_id, memory)
        assert reason_of(err.value) == "SHM_BAD_NAME"
        assert (SHM / memory.name).exists()


def test_a_symlink_under_the_prefix_is_refused(address, tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"x" * 4096)
    with raw_session(address) as (stub, session_id, _, prefix):
        link = SHM / f"{prefix}test_link"
        link.symlink_to(target)
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=link.name,
                                                             byte_size=4096), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(err.value) == "SHM_REGION_DENIED"
        finally:
            link.unlink()
    assert target.read_bytes() == b"x" * 4096


def test_missing_and_too_small_regions(address):
    with raw_session(address) as (stub, session_id, _, prefix):
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=f"{prefix}nothing_here",
                                                         byte_size=4096), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.value) == "SHM_REGION_NOT_FOUND"
        with region(4096, f"{prefix}test_small") as memory, pytest.raises(grpc.RpcError) as err:
            registered(stub, session_id, memory, size=8192)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(err.value) == "SHM_BAD_SIZE"
        assert "Expected at least 8,192 bytes. Received: a region of 4,096 bytes" in err.value.details()


def test_a_region_not_registered_is_not_found(address):
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(
            evaluate_request("lossd_never_registered", (0, 64), (64, 64)), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(err.value) == "SHM_REGION_NOT_FOUND"


# -- scopes, callers and bounds ------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from lossd_server.security.tokens import create_token

    folder = tmp_path_factory.mktemp("shm-tokens")
    path = folder / "tokens.jsonl"
    tokens = {name: create_token(path, name, scopes) for name, scopes in
              (("alice", ["evaluate"]), ("carol", ["evaluate"]), ("bob", ["train"]))}
    with own_server(folder / "data", tokens_file=path, shm_max_regions=2, shm_max_bytes=3 << 20) as srv:
        yield f"127.0.0.1:{srv.port}", tokens, srv


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def test_without_the_evaluate_scope_shared_memory_is_permission_denied(secured):
    address, tokens, _ = secured
    for call in ("OpenSession", "RegisterRegion", "UnregisterRegion", "CloseSession"):
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            stub = pb_grpc.SharedMemoryServiceStub(channel)
            request = {"OpenSession": pb.OpenSessionRequest(), "RegisterRegion": pb.RegisterRegionRequest(),
                       "UnregisterRegion": pb.UnregisterRegionRequest(), "CloseSession": pb.CloseSessionRequest()}[call]
            answer = getattr(stub, call)(request, metadata=bearer(tokens["bob"]), timeout=10)
            if call == "OpenSession":
                next(answer)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
        assert reason_of(err.value) == "MISSING_SCOPE"
    y = np.ones((100, 10), np.float32)
    with shm_client(address, token=tokens["bob"]) as client, pytest.raises(lossd.LossdError) as err:
        client.evaluate("mse", y, y)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert not client.shared_memory_active


def test_a_caller_reaches_only_its_own_regions(secured):
    address, tokens, _ = secured
    y = RNG.normal(size=(100, 10)).astype(np.float32)
    with shm_client(address, token=tokens["alice"]) as alice:
        expected = alice.evaluate("mse", y, y + 1, gradient=True)
        assert alice.shared_memory_active
        name = alice._shared_memory._session.regions[0].name
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(
                evaluate_request(name, (0, 64), (64, 64)), metadata=bearer(tokens["carol"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.value) == "SHM_REGION_NOT_FOUND"
        # ... nor register another caller's region, or use its session.
        with raw_session(address, bearer(tokens["carol"])) as (stub, session_id, _, prefix), \
                pytest.raises(grpc.RpcError) as err:
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=name, byte_size=4096),
                                metadata=bearer(tokens["carol"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err.value) == "SHM_NOT_IN_SESSION"
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SharedMemoryServiceStub(alice._channel).UnregisterRegion(
                pb.UnregisterRegionRequest(session_id=alice._shared_memory._session.id, name=name),
                metadata=bearer(tokens["carol"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.value) == "SHM_SESSION_NOT_FOUND"
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SharedMemoryServiceStub(alice._channel).CloseSession(
                pb.CloseSessionRequest(session_id=alice._shared_memory._session.id),
                metadata=bearer(tokens["carol"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.value) == "SHM_SESSION_NOT_FOUND"
        np.testing.assert_array_equal(alice.evaluate("mse", y, y + 1, gradient=True).gradient, expected.gradient)


def test_regions_and_bytes_per_caller_are_bounded(secured):
    address, tokens, srv = secured
    metadata = bearer(tokens["carol"])
    with raw_session(address, metadata) as (stub, session_id, _, prefix), \
            region(1 << 20, f"{prefix}test_b1") as one, \
            region(1 << 20, f"{prefix}test_b2") as two, \
            region(4 << 20, f"{prefix}test_b3") as big:
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=big.name, byte_size=4 << 20),
                                metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(err.value) == "SHM_TOO_MANY_BYTES"
        assert "at most 3,145,728 per caller (LOSSD_SHM_MAX_BYTES)" in err.value.details()
        for memory in (one, two):
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=memory.name,
                                                         byte_size=memory.size), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=big.name, byte_size=4096),
                                metadata=metadata, timeout=10)
        assert reason_of(err.value) == "SHM_TOO_MANY_REGIONS"
        assert "at most 2 per caller (LOSSD_SHM_MAX_REGIONS)" in err.value.details()
        assert srv.shared_memory.regions.stats() == (2, 2 << 20)
        # Unregistering frees the caller's room and unlinks the region.
        stub.UnregisterRegion(pb.UnregisterRegionRequest(session_id=session_id, name=one.name),
                              metadata=metadata, timeout=10)
        assert not (SHM / one.name).exists()
        stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=big.name, byte_size=2 << 20),
                            metadata=metadata, timeout=10)
    assert wait_for(lambda: srv.shared_memory.regions.stats() == (0, 0))
    assert not (SHM / two.name).exists() and not (SHM / big.name).exists()


# -- falling back to gRPC --------------------------------------------------------------------

@pytest.mark.parametrize("target, local", [
    ("localhost:50051", True), ("127.0.0.1:50051", True), ("127.3.4.5:1", True), ("[::1]:50051", True),
    ("unix:/tmp/lossd.sock", True), ("ipv4:127.0.0.1:50051", True), ("dns:///localhost:50051", True),
    ("10.1.2.3:50051", False), ("lossd.example.com:50051", False), ("[2001:db8::1]:50051", False),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", False), ("dns:///lossd:50051", False), ("192.168.0.10", False),
])
def test_only_loopback_and_unix_addresses_count_as_local(target, local):
    assert addresses.is_local(target) is local


def test_a_remote_looking_address_uses_grpc(address, server):
    port = address.rpartition(":")[2]
    y = RNG.normal(size=(100, 10)).astype(np.float32)
    held = server_regions(server)
    # Two addresses (a round_robin target over replicas) are not "this host",
    # even when both are loopback: the client does not even try.
    with shm_client([f"127.0.0.1:{port}", f"127.0.0.1:{port}"]) as client:
        result = client.evaluate("mse", y, y + 1, gradient=True)
        assert not client.shared_memory_active and not client._shared_memory.local
    assert result.loss == pytest.approx(1.0)
    assert server_regions(server) == held


def test_two_replicas_with_shared_memory_are_used_over_grpc_and_every_call_is_right(tmp_path):
    """docs/scaling-out.md: shared-memory regions are each replica's own. A
    client given two replicas' addresses (one round_robin channel) with
    shared_memory=True opens no session on either: its calls spread over
    both over gRPC, each answer right, and no region is registered or read,
    though each replica alone does take the client's shared memory."""
    def handled(srv) -> dict:
        """Calls the replica answered, by (service, method, code)."""
        return {(sample.labels["grpc_service"], sample.labels["grpc_method"], sample.labels["grpc_code"]):
                sample.value for metric in srv.metrics.registry.collect() for sample in metric.samples
                if sample.name == "grpc_server_handled_total"}

    def new_calls(srv, before: dict) -> dict:
        return {key: n - before.get(key, 0) for key, n in handled(srv).items() if n != before.get(key, 0)}

    def shm_read(srv) -> float:
        return srv.metrics.lossd_shared_memory_bytes_total.labels("read")._value.get()

    settings = dict(metrics_port=0, metrics_cache_seconds=0)
    with own_server(tmp_path / "a", **settings) as a, own_server(tmp_path / "b", **settings) as b:
        y = RNG.normal(size=(64, 32)).astype(np.float32)
        for srv in (a, b):  # the control: alone, each replica is reached through shared memory
            with shm_client(f"127.0.0.1:{srv.port}") as alone:
                alone.evaluate("mse", y, y + 1)
                assert alone.shared_memory_active and shm_read(srv) == 2 * y.nbytes
        assert wait_for(lambda: server_regions(a) == server_regions(b) == (0, 0))  # the controls' closed
        before = [(handled(srv), shm_read(srv)) for srv in (a, b)]
        calls = 24
        with shm_client([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as client:
            for _ in range(calls):
                y_true = RNG.normal(size=(64, 32)).astype(np.float32)
                y_pred = RNG.normal(size=(64, 32)).astype(np.float32)
                result = client.evaluate("mse", y_true, y_pred, gradient=True)
                t, p = y_true.astype(np.float64), y_pred.astype(np.float64)
                assert result.loss == pytest.approx(np.mean((t - p) ** 2), rel=1e-5)
                np.testing.assert_allclose(result.gradient, 2 * (p - t) / t.size, rtol=1e-4, atol=1e-9)
            assert not client.shared_memory_active and client._shared_memory._session is None
            assert server_regions(a) == server_regions(b) == (0, 0)
        # Only Evaluate calls, all OK (none named a region the replica does not
        # have), on both replicas; not one SharedMemoryService call.
        served = [new_calls(srv, calls_before) for srv, (calls_before, _) in zip((a, b), before)]
        for calls_there in served:
            assert set(calls_there) == {("lossd.v1.LossService", "Evaluate", "OK")}, served
        counts = [calls_there[("lossd.v1.LossService", "Evaluate", "OK")] for calls_there in served]
        assert sum(counts) == calls and min(counts) >= calls // 4, counts  # round_robin reached both
        assert [shm_read(srv) for srv in (a, b)] == [read for _, read in before]


def test_a_server_without_shared_memory_is_used_over_grpc(tmp_path):
    with own_server(tmp_path, shm=False) as srv:
        before = lossd_regions()
        y = RNG.normal(size=(100, 10)).astype(np.float32)
        with shm_client(f"127.0.0.1:{srv.port}") as client:
            assert client.evaluate("mse", y, y + 1, gradient=True).loss == pytest.approx(1.0)
            assert not client.shared_memory_active and not client._shared_memory.available
            np.testing.assert_allclose(client.evaluate("mse", y, y + 1, gradient=True).gradient, 2 / y.size, rtol=1e-5)
        assert lossd_regions() == before  # the region of the failed handshake was unlinked


def test_a_server_without_shared_memory_does_not_report_the_service(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for shm, expected in ((False, grpc.StatusCode.NOT_FOUND), (True, None)):
        with own_server(tmp_path / str(shm), shm=shm) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            request = health_pb2.HealthCheckRequest(service="lossd.v1.SharedMemoryService")
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
                assert expected is None and status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as error:
                assert error.code() == expected


def test_a_request_too_large_for_admission_goes_over_grpc_in_chunks(tmp_path):
    with own_server(tmp_path, metrics_port=0, max_inflight_bytes=1 << 20) as srv:
        y = RNG.normal(size=(2 << 16, 4)).astype(np.float32)  # 2 MiB a tensor: twice the in-flight budget
        with shm_client(f"127.0.0.1:{srv.port}", max_message_bytes=1 << 20) as client:
            result = client.evaluate("mse", y, y + 1, gradient=True)
            assert client.shared_memory_active  # the session stays for calls that fit
        assert result.loss == pytest.approx(1.0, rel=1e-5)
        np.testing.assert_allclose(result.gradient, 2 / y.size, rtol=1e-4)
        chunked = srv.metrics.registry.get_sample_value("grpc_server_handled_total", {
            "grpc_type": "bidi_stream", "grpc_service": "lossd.v1.LossService", "grpc_method": "EvaluateChunked",
            "grpc_code": "OK"})
        assert chunked == 1


# -- the codec's one bound check ---------------------------------------------------------------

def test_region_range_checks_offset_and_size_against_the_region():
    buffer = memoryview(bytearray(100))
    regions = {"lossd_a": buffer}.__getitem__
    ref = tensor_pb2.SharedMemoryRef
    assert len(wire.region_range(ref(region="lossd_a", offset=10, byte_size=90), regions)) == 90
    assert len(wire.region_range(ref(region="lossd_a", offset=100, byte_size=0), regions)) == 0
    for offset, size in ((0, 101), (91, 10), (-1, 1), (1, -1), (2 ** 63 - 1, 2 ** 63 - 1)):
        with pytest.raises(wire.WireError, match="out of bounds") as err:
            wire.region_range(ref(region="lossd_a", offset=offset, byte_size=size), regions, field="y_true")
        assert err.value.reason == "SHM_OUT_OF_RANGE"
    with pytest.raises(wire.WireError, match="not available here") as err:
        wire.to_numpy(tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1],
                                        shared_memory=ref(region="lossd_a", byte_size=4)))
    assert err.value.reason == "SHM_UNAVAILABLE"


def test_to_region_round_trips_through_to_numpy():
    buffer = memoryview(bytearray(256))
    regions = {"lossd_a": buffer}.__getitem__
    for array in (np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2], np.float64(2.5), np.array([True, False])):
        tensor = wire.to_region(array, tensor_pb2.SharedMemoryRef(region="lossd_a", offset=64, byte_size=192),
                                regions)
        decoded = wire.to_numpy(tensor, regions=regions, allow_empty=True)
        np.testing.assert_array_equal(decoded, array)
        assert not decoded.flags.writeable
    with pytest.raises(wire.WireError, match="range too small"):
        wire.to_region(np.zeros(100), tensor_pb2.SharedMemoryRef(region="lossd_a", byte_size=256), regions)


# -- sessions the server ends, and threads ------------------------------------------------------

def test_a_session_the_server_ended_is_replaced_and_no_call_fails(tmp_path):
    with own_server(tmp_path) as srv:
        y = RNG.normal(size=(200, 10)).astype(np.float32)
        with shm_client(f"127.0.0.1:{srv.port}") as client, lossd.Client(f"127.0.0.1:{srv.port}") as plain:
            expected = plain.evaluate("huber", y, y * 2, gradient=True)
            first = client.evaluate("huber", y, y * 2, gradient=True)
            old = client._shared_memory._session.regions[0].name
            srv.shared_memory.close()  # what a stopping server does: every session ends, regions are unlinked
            assert not (SHM / old).exists()
            for _ in range(3):  # at once (the region is gone: this call goes over gRPC) and later (a new session)
                again = client.evaluate("huber", y, y * 2, gradient=True)
                np.testing.assert_array_equal(again.gradient, expected.gradient)
            assert client.shared_memory_active and client._shared_memory._session.regions[0].name != old
            np.testing.assert_array_equal(first.gradient, expected.gradient)


def test_threads_sharing_a_client_get_their_own_results(address, server):
    from concurrent import futures

    inputs = [RNG.normal(size=(500 + 10 * i, 10)).astype(np.float32) for i in range(12)]
    with shm_client(address) as client, lossd.Client(address, timeout=60) as plain:
        expected = [plain.evaluate("mse", y, y * 0.5, gradient=True) for y in inputs]
        with futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda y: client.evaluate("mse", y, y * 0.5, gradient=True), inputs * 3))
        assert client.shared_memory_active
        assert len(client._shared_memory._session.regions) <= _shm.MAX_REGIONS
    for result, want in zip(results, expected * 3):
        np.testing.assert_array_equal(result.loss, want.loss)
        np.testing.assert_array_equal(result.gradient, want.gradient)
