"""Issue 23: concurrent valid expressions are never refused. CPython 3.11's
AST constructor keeps its recursion depth in interpreter-wide state set from
the calling thread's stack depth, so parses on threads at different depths
that interleave could fail with SystemError ("AST constructor recursion
depth mismatch") and a valid expression came back BAD_EXPRESSION. Here 8
threads, each at its own stack depth, compile 2,000 expressions each while
the collector runs often (a collection is where a parse lets another thread
run): every one must compile."""

from __future__ import annotations

import gc
import sys
import threading

from lossd_server.losses import expressions

THREADS = 8
EXPRESSIONS = 2000


def _expression(i: int) -> str:
    return (f"mean(square(y_true - y_pred) * {i % 97}.5 + abs(y_true - {i % 13}) / (1 + square(y_pred)), "
            f"axis=-1)")


def test_eight_threads_compiling_2000_expressions_each_refuse_none():
    failures: list[str] = []
    sources = [_expression(i) for i in range(EXPRESSIONS)]

    def compile_all(depth: int) -> None:
        if depth:  # each thread parses from its own stack depth
            return compile_all(depth - 1)
        for source in sources:
            try:
                expressions.compile_expression(source, tensors=("y_true", "y_pred"), params=())
            except Exception as exc:  # noqa: BLE001 - any refusal of a valid expression is the failure
                failures.append(f"{type(exc).__name__}: {exc}")

    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(100, 5, 5)
    sys.setswitchinterval(1e-4)
    try:
        threads = [threading.Thread(target=compile_all, args=(7 * k,)) for k in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)
    assert failures == [], f"{len(failures)} of {THREADS * EXPRESSIONS} refused, e.g. {failures[:3]}"


def test_parse_still_reports_syntax_errors():
    import pytest

    with pytest.raises(SyntaxError):
        expressions.parse("y_true +")
