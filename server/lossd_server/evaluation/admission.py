"""Admission control for evaluations: the one owner of "may this evaluation
run now?". Evaluate, each EvaluateStream item and EvaluateChunked all ask it,
from the sizes their requests declare (dtype and shape), before any tensor
is decoded or handed to TensorFlow.

Three bounds, checked in this order:

1. **Size.** A request whose declared tensor bytes exceed the whole in-flight
   budget can never run here: INVALID_ARGUMENT (``REQUEST_TOO_LARGE``), no
   retry delay, since waiting would not help.
2. **Caller rate.** A caller whose token has ``elements_per_second`` has a
   token bucket of y_pred elements: it holds at most one second's worth, and
   refills at the rate. A request is admitted when the bucket holds its
   elements, or is full: a request larger than one second's worth is not
   refused forever, it waits for a full bucket and leaves the bucket in debt,
   so the sustained rate still holds. Otherwise RESOURCE_EXHAUSTED
   (``CALLER_RATE_LIMIT``) with the time until enough has refilled.
3. **Bytes in flight.** The declared bytes of all tensors of every running
   evaluation stay within ``max_inflight_bytes``. A request that fits runs at
   once, beside requests that wait (small requests are never held behind a
   large one). One that does not fit waits, at most ``max_queued_requests`` at
   a time and at most ``max_queue_seconds`` (or its deadline, if sooner); the
   first waiter that fits when bytes are given back goes. A full queue is
   RESOURCE_EXHAUSTED (``QUEUE_FULL``), a wait that runs out is
   RESOURCE_EXHAUSTED (``INFLIGHT_BYTES_FULL``); both carry a retry delay
   estimated from how long recent evaluations held their bytes.

A refused request costs its caller no rate: elements taken from the bucket
are given back when the in-flight bound refuses it.

Waiting requests hold a server thread each, which is why the queue is
bounded, and why its wait is.

This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Optional

from lossd_server.errors import InvalidArgument, ResourceExhausted

# Bounds of the retry delays the in-flight bound suggests, in seconds.
MIN_RETRY_DELAY = 0.01
MAX_RETRY_DELAY = 30.0


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f} MiB"


@dataclasses.dataclass
class TokenBucket:
    """Elements a caller may evaluate: at most ``capacity`` saved up,
    refilled at ``rate`` per second. ``tokens`` may go below zero: a request
    larger than the capacity is taken when the bucket is full, and the debt
    is paid back before the next one."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, elements: int, now: float) -> float:
        """Takes ``elements`` and returns 0, or takes nothing and returns the
        seconds until it could."""
        self._refill(now)
        needed = min(float(elements), self.capacity)
        if self.tokens >= needed:
            self.tokens -= elements
            return 0.0
        return (needed - self.tokens) / self.rate

    def give_back(self, elements: int) -> None:
        self.tokens = min(self.capacity, self.tokens + elements)

    def debt_seconds(self, now: float) -> float:
        """Seconds until a bucket in debt is out of it; 0 when it is not."""
        self._refill(now)
        return max(0.0, -self.tokens / self.rate)


class Admission:
    """Admits evaluations against the in-flight budget, its queue, and each
    caller's rate (see the module docstring).

    Args:
        max_inflight_bytes: Declared tensor bytes all running evaluations may
            hold together.
        max_queued_requests: Most evaluations waiting for bytes at once.
        max_queue_seconds: Longest one waits.
        clock: Monotonic seconds; tests may pass their own.
    """

    def __init__(self, max_inflight_bytes: int, max_queued_requests: int, max_queue_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic):
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued_requests = max_queued_requests
        self.max_queue_seconds = max_queue_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waiters for bytes wait on it
        self._inflight = 0  # declared bytes of the running evaluations
        self._running = 0
        self._waiting: list[int] = []  # the waiters' byte counts, in arrival order (identity: a list per waiter)
        self._hold_seconds = 0.05  # moving average of how long an evaluation holds its bytes
        self._buckets: dict[tuple[str, float], TokenBucket] = {}
        self._buckets_lock = threading.Lock()

    # -- the three bounds ----------------------------------------------------

    def check_size(self, nbytes: int, what: str = "This request") -> None:
        """Refuses, for good, a request that could never fit in the budget."""
        if nbytes > self.max_inflight_bytes:
            raise InvalidArgument(
                f"{what} declares {nbytes:,} bytes of tensors ({_mib(nbytes)}), more than this server "
                f"evaluates at once. Expected at most {self.max_inflight_bytes:,} bytes (the server's "
                "max_inflight_bytes); send smaller batches, or EvaluateChunked with smaller chunks. "
                "Retrying the same request will not help.", reason="REQUEST_TOO_LARGE",
                metadata={"bytes": nbytes, "limit": self.max_inflight_bytes})

    def charge(self, caller: str, rate: Optional[float], elements: int) -> Callable[[], None]:
        """Takes ``elements`` from ``caller``'s bucket (none without a rate);
        returns what gives them back.

        Raises:
            ResourceExhausted: ``CALLER_RATE_LIMIT``, with the seconds until
                the bucket holds enough.
        """
        if not rate:
            return _nothing
        with self._buckets_lock:
            key = (caller, float(rate))
            bucket = self._buckets.get(key)
            now = self._clock()
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate, rate, rate, now)
            wait = bucket.take(elements, now)
        if wait > 0:
            raise _rate_limited(caller, rate, wait, f"this request's {elements:,} elements of y_pred to fit",
                                elements=elements)

        def give_back():
            with self._buckets_lock:
                bucket.give_back(elements)
        return give_back

    def refuse_in_debt(self, caller: str, rate: Optional[float]) -> None:
        """Refuses any request of a caller whose bucket is in debt (a request
        larger than one second's worth left it there): checked before the
        request's message is read, so a caller that ignores its retry delays
        costs the server no receiving or parsing.

        Raises:
            ResourceExhausted: ``CALLER_RATE_LIMIT``, with the seconds until
                the debt is paid.
        """
        if not rate:
            return
        with self._buckets_lock:
            bucket = self._buckets.get((caller, float(rate)))
            wait = 0.0 if bucket is None else bucket.debt_seconds(self._clock())
        if wait > 0:
            raise _rate_limited(caller, rate, wait, "its earlier requests' elements to be paid for")

    def hold(self, nbytes: int, *, wait_seconds: Optional[float] = None,
             what: str = "This request") -> "_Held":
        """Holds ``nbytes`` of the in-flight budget, waiting for them as the
        module docstring says, until the returned context exits (use it in a
        ``with`` at once).

        Args:
            nbytes: The declared bytes of the tensors the body decodes.
            wait_seconds: The most the call may still wait (its deadline);
                ``max_queue_seconds`` if sooner or None.
        """
        self.check_size(nbytes, what)
        self._acquire(nbytes, wait_seconds)
        return _Held(self, nbytes)

    def admit(self, caller: str, rate: Optional[float], *, elements: int, nbytes: int,
              wait_seconds: Optional[float] = None) -> "_Held":
        """All three bounds for one evaluation: its size, its caller's rate,
        then its bytes, held until the returned context exits (use it in a
        ``with`` at once)."""
        self.check_size(nbytes)
        give_back = self.charge(caller, rate, elements)
        try:
            self._acquire(nbytes, wait_seconds)
        except ResourceExhausted:
            give_back()
            raise
        return _Held(self, nbytes)

    # -- the in-flight budget ------------------------------------------------

    def _wait(self, wait_seconds: Optional[float]) -> float:
        if wait_seconds is None:
            return self.max_queue_seconds
        return max(0.0, min(wait_seconds, self.max_queue_seconds))

    def _fits(self, nbytes: int) -> bool:
        return self._inflight + nbytes <= self.max_inflight_bytes

    def _retry_delay(self) -> float:
        # Bytes come back as running evaluations end: about one hold time
        # away, more with others already waiting for them.
        delay = self._hold_seconds * (1 + len(self._waiting)) / max(1, self._running)
        return min(MAX_RETRY_DELAY, max(MIN_RETRY_DELAY, delay))

    def _acquire(self, nbytes: int, wait_seconds: Optional[float]) -> None:
        # The common path: the bytes fit. It takes the bare
        # lock (the condition's own, uncontended: one C call) and nothing else;
        # the budget check and the take are one step under it, so the bound
        # holds exactly whatever the threads do.
        with self._lock:
            if self._inflight + nbytes <= self.max_inflight_bytes:
                self._inflight += nbytes
                self._running += 1
                return
        wait_seconds = self._wait(wait_seconds)
        with self._cond:
            if self._fits(nbytes):
                self._take(nbytes)
                return
            if len(self._waiting) >= self.max_queued_requests:
                delay = self._retry_delay()
                reason = "QUEUE_FULL" if self.max_queued_requests else "INFLIGHT_BYTES_FULL"
                raise ResourceExhausted(
                    f"The server is evaluating {_mib(self._inflight)} of tensors, and this request's "
                    f"{_mib(nbytes)} would pass its budget of {_mib(self.max_inflight_bytes)} "
                    f"(max_inflight_bytes); {len(self._waiting)} requests already wait (max_queued_requests="
                    f"{self.max_queued_requests}). Expected room in the budget or the queue; retry in "
                    f"{delay:.3f} s.", reason=reason, retry_delay=delay,
                    metadata={"bytes": nbytes, "inflight_bytes": self._inflight,
                              "limit": self.max_inflight_bytes, "queued": len(self._waiting)})
            ticket = [nbytes]
            self._waiting.append(ticket)
            deadline = self._clock() + wait_seconds
            try:
                while True:
                    # The first waiter in arrival order that fits goes; the others wait on.
                    first = next((t for t in self._waiting if self._fits(t[0])), None)
                    if first is ticket:
                        self._take(nbytes)
                        return
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next waiter may fit now, or be first
            delay = self._retry_delay()
            raise ResourceExhausted(
                f"This request's {_mib(nbytes)} of tensors waited {wait_seconds:.2f} s for room in the "
                f"server's in-flight budget of {_mib(self.max_inflight_bytes)} (max_inflight_bytes; "
                f"{_mib(self._inflight)} in use) and found none. Expected room within max_queue_seconds or "
                f"the call's deadline; retry in {delay:.3f} s.", reason="INFLIGHT_BYTES_FULL",
                retry_delay=delay, metadata={"bytes": nbytes, "inflight_bytes": self._inflight,
                                             "limit": self.max_inflight_bytes})

    def _take(self, nbytes: int) -> None:
        self._inflight += nbytes
        self._running += 1

    def _release(self, nbytes: int, held_seconds: float) -> None:
        with self._lock:
            self._inflight -= nbytes
            self._running -= 1
            self._hold_seconds += 0.2 * (held_seconds - self._hold_seconds)
            if self._waiting:  # only waiters need waking; notify_all costs microseconds even without
                self._cond.notify_all()

    @property
    def inflight_bytes(self) -> int:
        """Declared bytes of the evaluations running now."""
        return self._inflight


class _Held:
    """Bytes of the in-flight budget that ``Admission.hold``/``admit`` took:
    given back when the ``with`` block exits, however it exits. A plain
    class rather than a generator context manager: it is entered on every
    request."""

    __slots__ = ("_admission", "_nbytes", "_start")

    def __init__(self, admission: Admission, nbytes: int):
        self._admission = admission
        self._nbytes = nbytes
        self._start = admission._clock()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        admission = self._admission
        admission._release(self._nbytes, admission._clock() - self._start)


def _rate_limited(caller: str, rate: float, wait: float, expected: str, **metadata) -> ResourceExhausted:
    return ResourceExhausted(
        f"Caller {caller!r} is past its rate of {rate:,.0f} elements per second (the token's limit; up to one "
        f"second's worth at once). Expected {expected}; retry in {wait:.3f} s.", reason="CALLER_RATE_LIMIT",
        retry_delay=wait, metadata={"caller": caller, "elements_per_second": f"{rate:g}", **metadata})


def _nothing() -> None:
    pass
