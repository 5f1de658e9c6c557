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

Between the rate and the bytes, on a server with tokens, a fourth bound
shares the server **fairly between callers** (``FairSlots``, issue 23):

4. **Evaluation slots.** At most ``evaluation_slots`` evaluations run at
   once, and each caller at most its share of them: ``evaluation_slots``
   divided by the callers active now (holding or waiting for a slot, or
   done within the last ``FAIR_LINGER_SECONDS``), at least
   ``min_caller_slots``. A caller alone may use every slot; when another
   arrives, the first gets no new slot until it is back under its share,
   and every slot given back goes first to a waiting caller under its
   share, callers taken in turn (round robin), each caller's requests in
   arrival order. A caller at its share waits, at most
   ``max_caller_queued`` of its requests at a time and at most
   ``max_queue_seconds``; one more is RESOURCE_EXHAUSTED
   (``CALLER_SHARE_FULL``) with a retry delay, refused before its message is
   read where the transport can (``refuse_at_share``). The compile slots
   (requests waiting for a program to compile, ``max_pending_compiles``) are
   shared the same way (``COMPILE_BUSY``), by the evaluator.

Where the bytes' queue has several waiters that fit, the one whose caller
holds the fewest bytes goes first (arrival order among equals), so a caller
with many large requests queued cannot keep a light caller's waiting.

Waiting requests hold a server thread each, which is why the queue is
bounded, and why its wait is.

This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import threading
import time
from typing import Callable, Optional

from lossd_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

# Bounds of the retry delays the in-flight bound suggests, in seconds.
MIN_RETRY_DELAY = 0.01
MAX_RETRY_DELAY = 30.0
# A caller stays active (counted in everyone's share) this long after its
# last slot was given back: a light caller in a closed loop holds no slot
# between its calls, and without it a flooder would take that slot back in
# the gap.
FAIR_LINGER_SECONDS = 1.0
# How often a request waiting for a slot reads whether its call ended
# (``FairSlots.acquire(cancelled=)``): it leaves the queue within this.
CANCEL_POLL_SECONDS = 0.2

# The caller of the evaluation this context runs (``Admission.admit`` sets
# it), for the parts below the service that share their own slots by
# caller: the evaluator's compile slots. None: no caller known (one bucket).
_EVALUATION_CALLER: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "lossd_evaluation_caller", default=None)
# The caller whose evaluation slot the transport took before reading the
# request (``Admission.slot_first``): ``admit`` then takes no second one.
_SLOT_TAKEN: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lossd_slot_taken", default=None)


def evaluation_caller() -> str:
    """The caller of the evaluation running in this context ("" when none
    was admitted here, as on a server without tokens)."""
    return _EVALUATION_CALLER.get() or ""


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


class FairSlots:
    """A fixed number of slots shared fairly between callers: the one
    implementation of "a caller's share" (module docstring, bound 4), used for
    evaluation slots (``Admission``) and compile slots (the evaluator).

    A caller's share is ``capacity // active`` (at least ``min_share``),
    where ``active`` counts the callers holding or waiting for a slot, or
    done within ``linger_seconds``. ``acquire`` takes a slot at once when
    fewer than ``capacity`` are held and the caller holds less than its
    share; otherwise it waits, unless the caller already has
    ``max_queued_per_caller`` waiting (then it is refused). Every slot given
    back goes to the next waiting caller under its share, callers taken in
    turn, each caller's waiters in arrival order. The slots held never exceed
    ``capacity``.

    Args:
        capacity: Slots in all.
        what: What a slot is, for messages ("evaluation slots").
        setting: The setting that sets ``capacity`` (named in refusals).
        reason: The ErrorInfo reason of a refusal.
        min_share: The least share of a caller however many are active.
        max_queued_per_caller: Most requests of one caller waiting at once.
        max_queued: Most requests waiting at once, all callers together
            (None: only the per-caller bound); one more is refused as one
            past ``max_queued_per_caller`` is.
        max_wait_seconds: Longest a request waits (less if its deadline is sooner).
        linger_seconds: How long a caller stays active after its last slot.
        metrics: Optional ``Metrics``: waits and refusals by caller.
        clock: Monotonic seconds; tests may pass their own.
    """

    def __init__(self, capacity: int, *, what: str, setting: str, reason: str, min_share: int = 1,
                 max_queued_per_caller: int = 1, max_queued: Optional[int] = None, max_wait_seconds: float = 2.0,
                 linger_seconds: float = FAIR_LINGER_SECONDS, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.what = what
        self.setting = setting
        self.reason = reason
        self.min_share = min_share
        self.max_queued_per_caller = max_queued_per_caller
        self.max_queued = max_queued
        self.max_wait_seconds = max_wait_seconds
        self.linger_seconds = linger_seconds
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: dict[str, int] = {}  # caller -> slots held (callers holding none are absent)
        self._total = 0
        self._queues: dict[str, collections.deque] = {}  # caller -> its waiters' tickets, in arrival order
        self._turns: collections.deque[str] = collections.deque()  # callers with waiters, in serving order
        self._waiters = 0  # tickets in every queue
        self._seen: dict[str, float] = {}  # caller -> when it last gave a slot back
        self._hold_seconds = 0.05  # moving average of how long a slot is held, for retry delays

    # -- shares ---------------------------------------------------------------

    def _active(self, now: float) -> int:
        seen = self._seen
        if seen:
            gone = [caller for caller, when in seen.items() if now - when > self.linger_seconds]
            for caller in gone:
                del seen[caller]
        return len(self._held.keys() | self._queues.keys() | seen.keys())

    def share(self, active: int) -> int:
        """A caller's share of the slots with ``active`` callers active."""
        return max(self.min_share, self.capacity // max(1, active))

    def _may_take(self, caller: str, share: int) -> bool:
        return self._total < self.capacity and self._held.get(caller, 0) < share

    def _take(self, caller: str) -> None:
        self._held[caller] = self._held.get(caller, 0) + 1
        self._total += 1

    def _serve(self, now: float) -> bool:
        """Gives free slots to waiters, callers in turn; whether any was given."""
        given = False
        turns = self._turns
        while turns and self._total < self.capacity:
            share = self.share(self._active(now))
            for _ in range(len(turns)):
                caller = turns[0]
                turns.rotate(-1)
                if self._may_take(caller, share):
                    queue = self._queues[caller]
                    ticket = queue.popleft()
                    self._waiters -= 1
                    ticket[0] = True
                    self._take(caller)
                    given = True
                    if not queue:
                        del self._queues[caller]
                        turns.remove(caller)
                    break
            else:
                break  # nobody waiting may take one now
        if given:
            self._cond.notify_all()
        return given

    # -- taking and giving back ------------------------------------------------

    def refuse_if_full(self, caller: str) -> None:
        """Raises the refusal ``acquire`` would raise at once for ``caller``
        now (at its share, with its queue full); checked before a request is
        read."""
        with self._lock:
            queued = self._queues.get(caller)
            if queued is None or len(queued) < self.max_queued_per_caller:
                return
            active = self._active(self._clock())
            share = self.share(active)
            if not self._may_take(caller, share):
                raise self._refusal(caller, share, active, waited=None)

    def acquire(self, caller: str, wait_seconds: Optional[float] = None,
                cancelled: Optional[Callable[[], bool]] = None) -> None:
        """Takes one slot for ``caller``, waiting for it as the class says.

        ``cancelled``: read while the request waits (at least every
        ``CANCEL_POLL_SECONDS``); once it is true the request leaves the queue.

        Raises:
            ResourceExhausted: ``reason``: the caller's queue is full, or its
                wait ran out; with a retry delay.
            DeadlineExceeded: ``EVALUATION_CANCELLED``: ``cancelled`` turned
                true while it waited (its call ended).
        """
        with self._lock:
            now = self._clock()
            active = self._active(now) + (caller not in self._held and caller not in self._queues
                                          and caller not in self._seen)
            share = self.share(active)
            queue = self._queues.get(caller)
            if queue is None and self._may_take(caller, share):
                self._take(caller)
                return
            if queue is not None and len(queue) >= self.max_queued_per_caller:
                raise self._refusal(caller, share, active, waited=None)
            if self.max_queued is not None and self._waiters >= self.max_queued:
                raise self._refusal(caller, share, active, waited=None, everyone=True)
            wait = self.max_wait_seconds if wait_seconds is None else max(0.0, min(wait_seconds,
                                                                                   self.max_wait_seconds))
            ticket = [False]
            if queue is None:
                queue = self._queues[caller] = collections.deque()
                self._turns.append(caller)
            queue.append(ticket)
            self._waiters += 1
            self._serve(now)
            deadline = now + wait
            # Woken by a slot given back, or after at most a linger: an idle
            # caller stops counting, which may raise the shares; sooner when
            # the call may end meanwhile.
            poll = self.linger_seconds if cancelled is None else min(self.linger_seconds, CANCEL_POLL_SECONDS)
            gone = False
            while not ticket[0]:
                left = deadline - self._clock()
                if left <= 0:
                    break
                if cancelled is not None and cancelled():
                    gone = True
                    break
                self._cond.wait(min(left, poll))
                if not ticket[0]:
                    self._serve(self._clock())
            if ticket[0]:
                if self.metrics is not None:
                    self.metrics.fair_share_wait(caller, self.what, self._clock() - now)
                return
            queue.remove(ticket)
            self._waiters -= 1
            if not queue:
                del self._queues[caller]
                self._turns.remove(caller)
            if gone:
                raise DeadlineExceeded(
                    f"The call ended while its request waited for one of the server's {self.what}. Expected a "
                    "call that waits for its answer. Received: a call that ended first.",
                    reason="EVALUATION_CANCELLED", metadata={"caller": caller, "setting": self.setting})
            active = self._active(self._clock())
            raise self._refusal(caller, self.share(active), active, waited=wait)

    def release(self, caller: str, held_seconds: Optional[float] = None) -> None:
        """Gives back one slot ``caller`` took."""
        with self._lock:
            held = self._held[caller] - 1
            if held:
                self._held[caller] = held
            else:
                del self._held[caller]
            self._total -= 1
            now = self._clock()
            self._seen[caller] = now
            if held_seconds is not None:
                self._hold_seconds += 0.2 * (held_seconds - self._hold_seconds)
            if self._turns:
                self._serve(now)

    def _refusal(self, caller: str, share: int, active: int, waited: Optional[float],
                 everyone: bool = False) -> ResourceExhausted:
        held = self._held.get(caller, 0)
        queued = len(self._queues.get(caller, ()))
        # A slot of this caller's comes back about one hold time away for
        # each slot it holds past its share, and for each of its waiters
        # (for a full queue: each waiter's turn, shared by the slots).
        ahead = self._waiters / self.capacity if everyone else max(0, held - share) + queued
        delay = self._hold_seconds * (1 + ahead)
        delay = min(MAX_RETRY_DELAY, max(MIN_RETRY_DELAY, delay))
        if self.metrics is not None:
            self.metrics.fair_share_refusal(caller, self.what)
        who = f"Caller {caller!r}" if caller else "The caller"
        why = (f"its request waited {waited:.2f} s for one and none came" if waited is not None else
               f"{self._waiters} requests of all callers already wait for one (at most {self.max_queued})"
               if everyone else
               f"{queued} of its requests already wait for one (at most {self.max_queued_per_caller})")
        return ResourceExhausted(
            f"{who} holds {held} of the server's {self.capacity} {self.what} ({self.setting}), and its fair "
            f"share is {share} while {active} callers are active; {why}. Expected at most its share at once, "
            f"so that other callers are served too; retry in {delay:.3f} s.", reason=self.reason,
            retry_delay=delay, metadata={"caller": caller, "held": held, "share": share, "capacity": self.capacity,
                                         "active_callers": active, "queued": queued, "setting": self.setting})

    # -- what tests and metrics read ------------------------------------------

    def held(self, caller: Optional[str] = None) -> int:
        """Slots held by ``caller``, or by everyone."""
        return self._total if caller is None else self._held.get(caller, 0)

    def queued(self, caller: Optional[str] = None) -> int:
        """Requests waiting, of ``caller`` or of everyone."""
        with self._lock:
            if caller is not None:
                return len(self._queues.get(caller, ()))
            return sum(len(q) for q in self._queues.values())


class Admission:
    """Admits evaluations against the in-flight budget, its queue, and each
    caller's rate (see the module docstring).

    Args:
        max_inflight_bytes: Declared tensor bytes all running evaluations may
            hold together.
        max_queued_requests: Most evaluations waiting for bytes at once.
        max_queue_seconds: Longest one waits.
        evaluation_slots: Evaluations running at once, shared fairly between
            callers (``FairSlots``); None (a server without tokens, where
            there is one caller) leaves them to the server's threads.
        min_caller_slots: The least share of a caller.
        max_caller_queued: Most evaluations of one caller waiting for a slot.
        metrics: Optional ``Metrics``: callers' waits and refusals for slots.
        clock: Monotonic seconds; tests may pass their own.
    """

    def __init__(self, max_inflight_bytes: int, max_queued_requests: int, max_queue_seconds: float, *,
                 evaluation_slots: Optional[int] = None, min_caller_slots: int = 1, max_caller_queued: int = 1,
                 metrics=None, clock: Callable[[], float] = time.monotonic):
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued_requests = max_queued_requests
        self.max_queue_seconds = max_queue_seconds
        self._clock = clock
        self.slots = None if evaluation_slots is None else FairSlots(
            evaluation_slots, what="evaluation slots", setting="evaluation_slots", reason="CALLER_SHARE_FULL",
            min_share=min_caller_slots, max_queued_per_caller=max_caller_queued,
            max_wait_seconds=max_queue_seconds, metrics=metrics, clock=clock)
        self._caller_bytes: dict[str, int] = {}  # caller -> declared bytes its running evaluations hold
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waiters for bytes wait on it
        self._inflight = 0  # declared bytes of the running evaluations
        self._running = 0
        self._waiting: list[list] = []  # the waiters' [bytes, caller], in arrival order (identity: a list per waiter)
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
        self._acquire(nbytes, wait_seconds, "")
        return _Held(self, nbytes, "", False)

    def admit(self, caller: str, rate: Optional[float], *, elements: int, nbytes: int,
              wait_seconds: Optional[float] = None) -> "_Held":
        """Every bound for one evaluation: its size, its caller's rate, its
        caller's share of the evaluation slots, then its bytes, held until the
        returned context exits (use it in a ``with`` at once). The context
        also names ``caller`` for ``evaluation_caller()`` (compile slots)."""
        self.check_size(nbytes)
        give_back = self.charge(caller, rate, elements)
        slots = self.slots
        if slots is not None and _SLOT_TAKEN.get() == caller:
            slots = None  # the transport holds this call's slot (slot_first)
        try:
            if slots is not None:
                start = self._clock()
                slots.acquire(caller, wait_seconds)
                if wait_seconds is not None:  # the slot's wait comes out of the call's deadline
                    wait_seconds -= self._clock() - start
            try:
                self._acquire(nbytes, wait_seconds, caller)
            except ResourceExhausted:
                if slots is not None:
                    slots.release(caller)
                raise
        except ResourceExhausted:
            give_back()
            raise
        _EVALUATION_CALLER.set(caller)
        return _Held(self, nbytes, caller, slots is not None)

    def refuse_at_share(self, caller: str) -> None:
        """Refuses at once a request that ``admit`` would refuse for its
        caller's share (``CALLER_SHARE_FULL``): the transport calls it before
        the request's message is read, so a caller flooding the server with
        large requests past its share costs it no receiving or parsing."""
        if self.slots is not None:
            self.slots.refuse_if_full(caller)

    def busy(self, caller: str) -> bool:
        """Whether ``caller`` holds or waits for an evaluation slot now (never
        on a server that shares none). A read without the lock: a hint for
        ``slot_first``, which the slots themselves keep exact."""
        slots = self.slots
        return slots is not None and (caller in slots._held or caller in slots._queues)

    def slot_first(self, caller: str, wait_seconds: Optional[float] = None) -> "_SlotFirst":
        """Takes ``caller``'s evaluation slot before its request is read, for
        the transport to hold around reading and evaluating it: a caller with
        evaluations in flight (``busy``) so has at most its share of requests
        being received and parsed, not only evaluated. ``admit`` inside the
        returned context takes no second slot.

        Raises:
            ResourceExhausted: ``CALLER_SHARE_FULL`` (``FairSlots.acquire``).
        """
        self.slots.acquire(caller, wait_seconds)
        return _SlotFirst(self, caller)

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

    def _acquire(self, nbytes: int, wait_seconds: Optional[float], caller: str) -> None:
        # The common path: the bytes fit. It takes the bare
        # lock (the condition's own, uncontended: one C call) and nothing else;
        # the budget check and the take are one step under it, so the bound
        # holds exactly whatever the threads do.
        with self._lock:
            if self._inflight + nbytes <= self.max_inflight_bytes:
                self._inflight += nbytes
                self._running += 1
                held = self._caller_bytes
                held[caller] = held.get(caller, 0) + nbytes
                return
        wait_seconds = self._wait(wait_seconds)
        with self._cond:
            if self._fits(nbytes):
                self._take(nbytes, caller)
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
            ticket = [nbytes, caller]
            self._waiting.append(ticket)
            deadline = self._clock() + wait_seconds
            try:
                while True:
                    if self._next_waiter() is ticket:
                        self._take(nbytes, caller)
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

    def _next_waiter(self) -> Optional[list]:
        # Of the waiters that fit, the one whose caller holds the fewest
        # bytes goes (the first to arrive among equals); the others wait on.
        fitting = [t for t in self._waiting if self._fits(t[0])]
        if not fitting:
            return None
        held = self._caller_bytes
        return min(fitting, key=lambda t: held.get(t[1], 0))  # min keeps the first of equals

    def _take(self, nbytes: int, caller: str) -> None:
        self._inflight += nbytes
        self._running += 1
        self._caller_bytes[caller] = self._caller_bytes.get(caller, 0) + nbytes

    def _release(self, nbytes: int, held_seconds: float, caller: str) -> None:
        with self._lock:
            self._inflight -= nbytes
            self._running -= 1
            left = self._caller_bytes[caller] - nbytes
            if left:
                self._caller_bytes[caller] = left
            else:
                del self._caller_bytes[caller]
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

    __slots__ = ("_admission", "_nbytes", "_start", "_caller", "_slot")

    def __init__(self, admission: Admission, nbytes: int, caller: str, slot: bool):
        self._admission = admission
        self._nbytes = nbytes
        self._start = admission._clock()
        self._caller = caller
        self._slot = slot  # whether a slot of admission.slots was taken

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        admission = self._admission
        held = admission._clock() - self._start
        admission._release(self._nbytes, held, self._caller)
        if self._slot:
            admission.slots.release(self._caller, held)


class _SlotFirst:
    """An evaluation slot ``Admission.slot_first`` took: marks the context so
    ``admit`` takes no other, and gives it back when the ``with`` exits."""

    __slots__ = ("_admission", "_caller", "_start", "_token")

    def __init__(self, admission: Admission, caller: str):
        self._admission = admission
        self._caller = caller
        self._start = admission._clock()
        self._token = None

    def __enter__(self) -> None:
        self._token = _SLOT_TAKEN.set(self._caller)

    def __exit__(self, *exc) -> None:
        _SLOT_TAKEN.reset(self._token)
        admission = self._admission
        admission.slots.release(self._caller, admission._clock() - self._start)


def _rate_limited(caller: str, rate: float, wait: float, expected: str, **metadata) -> ResourceExhausted:
    return ResourceExhausted(
        f"Caller {caller!r} is past its rate of {rate:,.0f} elements per second (the token's limit; up to one "
        f"second's worth at once). Expected {expected}; retry in {wait:.3f} s.", reason="CALLER_RATE_LIMIT",
        retry_delay=wait, metadata={"caller": caller, "elements_per_second": f"{rate:g}", **metadata})


def _nothing() -> None:
    pass
