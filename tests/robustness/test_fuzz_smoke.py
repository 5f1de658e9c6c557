"""Issue 11: the schema-driven fuzzer under ``make test``. The generators and
driver of ``bench/fuzz.py`` (``tests/fuzzing.py``) send a few hundred calls of
every RPC to a real server with small limits, and no answer may be INTERNAL
or UNKNOWN. The 100,000-call run is ``bench/fuzz.py`` (figures in
bench/RESULTS.md)."""

from __future__ import annotations

import collections
import json
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import status_pb2

from tests import fuzzing
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2

CALLS = 300


@pytest.fixture(scope="module")
def fuzz_address(start_server):
    return start_server(**fuzzing.SMALL_LIMITS)


def _context(address: str) -> fuzzing.Context:
    ctx = fuzzing.Context()
    with grpc.insecure_channel(address) as channel:
        losses = loss_service_pb2_grpc.LossServiceStub(channel).ListLosses(
            loss_service_pb2.ListLossesRequest(), timeout=60).losses
    ctx.loss_names[:] = sorted(d.name for d in losses)
    return ctx


def test_fuzzing_every_rpc_gives_no_internal(fuzz_address):
    tally = fuzzing.run(fuzz_address, _context(fuzz_address), CALLS, clients=2, timeout=30, seed_=11)
    report = "\n".join(f"{m}: {n} ({codes})" for m, n, codes in fuzzing.summary_rows(tally))
    assert tally.count == CALLS, report
    assert not tally.findings, "\n\n".join(
        f"{f.code} {f.details}\n{json.dumps(f.call.to_json(), ensure_ascii=False)[:2000]}" for f in tally.findings)
    # The draws reach past the first checks: most RPCs are called.
    assert len(tally.codes) >= 12, report
    assert sum(c["INVALID_ARGUMENT"] for c in tally.codes.values()) > 0, report


def test_fuzzed_evaluations_are_computed_not_only_refused(fuzz_address):
    """The evaluating methods alone (with 40-odd methods drawn above, one
    gets a handful of calls): near-valid draws compute answers, and still
    nothing is INTERNAL."""
    methods = [m for m in fuzzing.METHODS if m.name in ("Evaluate", "EvaluateStream", "ModelInfer")]
    assert len(methods) == 3
    tally = fuzzing.run(fuzz_address, _context(fuzz_address), CALLS // 3, clients=2, timeout=30, seed_=13,
                        methods=methods)
    report = "\n".join(f"{m}: {n} ({codes})" for m, n, codes in fuzzing.summary_rows(tally))
    assert not tally.findings, report
    computed = tally.codes["Evaluate"]["OK"] + tally.items["EvaluateStream"]["OK"] + tally.codes["ModelInfer"]["OK"]
    assert computed > 0, report


def test_fuzzing_with_tokens_gives_no_internal(serve_with_tokens):
    """As bench/fuzz.py runs: a server with tokens, each call sent with a
    drawn credential (a token with the scopes, one without, none, a forged one)."""
    address, tokens, _ = serve_with_tokens({"user": ("evaluate,train,monitor",), "admin": ("admin",),
                                            "evaluate": ("evaluate",)}, **fuzzing.SMALL_LIMITS)
    ctx = fuzzing.Context(tokens=tokens)
    tally = fuzzing.run(address, ctx, CALLS // 2, clients=2, timeout=30, seed_=12)
    report = "\n".join(f"{m}: {n} ({codes})" for m, n, codes in fuzzing.summary_rows(tally))
    assert tally.count == CALLS // 2, report
    assert not tally.findings, "\n\n".join(
        f"{f.code} {f.details}\n{json.dumps(f.call.to_json(), ensure_ascii=False)[:2000]}" for f in tally.findings)
    codes = collections.Counter()
    for counts in tally.codes.values():
        codes.update(counts)
    # Every kind of credential was drawn and answered as such, and tokens let calls through.
    assert codes["UNAUTHENTICATED"] and codes["PERMISSION_DENIED"] and codes["OK"], report


def test_a_reproducer_sends_the_same_bytes():
    seen = []
    fuzzing.draw_calls(fuzzing.Context(), 40, seen.append, seed_=3)
    assert len(seen) == 40
    for call in seen:
        again = fuzzing.Call.from_json(json.loads(json.dumps(call.to_json())))
        assert again.method.full_name == call.method.full_name
        # deterministic: map entries in key order (and NaN == NaN, which message equality lacks)
        assert [_deterministic(m) for m in again.requests] == [_deterministic(m) for m in call.requests]


def _deterministic(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)


def _internal_server():
    """A real gRPC server whose Evaluate answers INTERNAL and whose
    EvaluateStream answers OK with an INTERNAL status inside: the fuzzer
    must count both."""
    def evaluate(request, context):
        context.abort(grpc.StatusCode.INTERNAL, "boom")

    def stream(requests, context):
        for item in requests:
            detail = any_pb2.Any()
            yield loss_service_pb2.EvaluateStreamResponse(
                request_id=item.request_id, error=status_pb2.Status(code=13, message="boom", details=[detail]))

    handler = grpc.method_handlers_generic_handler("lossd.v1.LossService", {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            evaluate, request_deserializer=loss_service_pb2.EvaluateRequest.FromString,
            response_serializer=loss_service_pb2.EvaluateResponse.SerializeToString),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=loss_service_pb2.EvaluateStreamRequest.FromString,
            response_serializer=loss_service_pb2.EvaluateStreamResponse.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_the_fuzzer_reports_internal_answers():
    server, address = _internal_server()
    try:
        methods = [m for m in fuzzing.METHODS if m.name in ("Evaluate", "EvaluateStream")]
        tally = fuzzing.run(address, fuzzing.Context(), 30, clients=2, timeout=10, methods=methods)
    finally:
        server.stop(0)
    assert tally.codes["Evaluate"]["INTERNAL"] == sum(tally.codes["Evaluate"].values()) > 0
    # (Undecodable bytes get grpcio's own INTERNAL from this bare server, not "boom".)
    streams_with_items = [f for f in tally.findings if f.call.method.name == "EvaluateStream"
                          and f.call.how != "undecodable"]
    assert streams_with_items and all("boom" in f.details for f in streams_with_items)
    assert tally.bad() == len(tally.findings)


# -- what the 100,000-call run found ---------------------------------------------

@pytest.mark.parametrize("loss", ["mse", "cosine_similarity", "huber"])
def test_a_scalar_y_true_beside_a_one_element_y_pred_is_invalid_argument(fuzz_address, loss):
    """bench/fuzz.py: y_true of shape () and y_pred of shape (1,) align to two
    scalars, which left the axis check dividing by a rank of zero (INTERNAL)."""
    request = loss_service_pb2.EvaluateRequest(
        loss=loss_pb2.LossSpec(name=loss), y_true=tensor_pb2.Tensor(dtype=2, shape=[], content=bytes(4)),
        y_pred=tensor_pb2.Tensor(dtype=2, shape=[1], content=bytes(4)))
    with grpc.insecure_channel(fuzz_address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "rank" in error.value.details()
