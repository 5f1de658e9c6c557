"""Fair sharing between callers (issue 23), on the admission objects
themselves: ``FairSlots`` (evaluation and compile slots) and the bytes'
queue of ``Admission``. Real threads wait in them; hypothesis picks who
arrives and who finishes, in what order.

What must hold whatever the order:
* the slots held never exceed the capacity, nor the bytes the budget;
* a caller never holds more than its share while another caller waits
  under its own (shares add up to the capacity);
* no caller with waiting work starves: while it waits, every slot given
  back goes to a waiting caller under its share, and callers take turns,
  so between two of its grants each other caller gets at most one.
"""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd_server.errors import DeadlineExceeded, ResourceExhausted
from lossd_server.evaluation.admission import Admission, FairSlots

CALLERS = ("alice", "bob", "carol", "dave")


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the slots did not settle"
        time.sleep(0.001)


class _Run:
    """Requests in threads against one ``FairSlots``: ``arrive`` starts one
    (it takes a slot at once, waits, or is refused), ``finish`` gives back a
    slot a caller holds; ``grants`` records who got a slot, in order."""

    def __init__(self, slots: FairSlots):
        self.slots = slots
        self.lock = threading.Lock()
        self.grants: list[str] = []
        self.refused: list[str] = []
        self.threads: list[threading.Thread] = []
        self.pending = 0  # threads not yet granted or refused

    def arrive(self, caller: str) -> None:
        with self.lock:
            self.pending += 1

        def run():
            try:
                self.slots.acquire(caller, wait_seconds=60)
            except ResourceExhausted as exc:
                assert exc.reason == "CALLER_SHARE_FULL" and exc.retry_delay > 0
                with self.lock:
                    self.refused.append(caller)
                    self.pending -= 1
                return
            with self.lock:
                self.grants.append(caller)
                self.pending -= 1

        before = self._settled_count()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        # Settled: it holds a slot, was refused, or waits in the queue.
        _wait_until(lambda: self._settled_count() > before)

    def _settled_count(self) -> int:
        with self.lock:
            return len(self.grants) + len(self.refused) + self.slots.queued()

    def finish(self, caller: str) -> None:
        slots = self.slots
        waiting = slots.queued()
        with self.lock:
            granted = len(self.grants)
        before = {c: slots.held(c) for c in (*CALLERS, "zed")}
        waiters = [c for c in before if slots.queued(c)]
        active = len({c for c in before if before[c] or slots.queued(c)} | set(slots._seen) | {caller})
        share = slots.share(active)
        slots.release(caller)
        # A waiter that may take the slot now has taken it (and recorded it).
        _wait_until(lambda: slots.queued() == waiting or self._granted() > granted)
        _wait_until(lambda: self._granted() + slots.queued() >= granted + waiting)
        before[caller] -= 1
        gainers = [c for c in before if slots.held(c) > before[c]]
        under = [c for c in waiters if before[c] < share]
        for gainer in gainers:
            # The slot went to a caller under its share, if one was waiting.
            assert before[gainer] < share or not under, (gainer, before, share, under)

    def _granted(self) -> int:
        with self.lock:
            return len(self.grants)


def _check_shares(slots: FairSlots) -> None:
    assert 0 <= slots.held() <= slots.capacity
    waiting = [c for c in CALLERS if slots.queued(c)]
    active = len({c for c in CALLERS if slots.held(c) or slots.queued(c)} | set(slots._seen))
    share = slots.share(active)
    if slots.held() < slots.capacity:
        # A free slot is never left while a caller under its share waits.
        assert all(slots.held(c) >= share for c in waiting), (share, {c: slots.held(c) for c in CALLERS})


steps = st.lists(st.tuples(st.sampled_from(("arrive", "finish")), st.sampled_from(CALLERS)), min_size=1,
                 max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 6), queued=st.integers(1, 3), steps=steps)
def test_slots_never_exceed_capacity_and_free_slots_go_to_waiting_callers(capacity, queued, steps):
    # A linger that never runs out during an example: who is active depends
    # only on the steps, not on this machine's speed.
    slots = FairSlots(capacity, what="evaluation slots", setting="evaluation_slots", reason="CALLER_SHARE_FULL",
                      max_queued_per_caller=queued, max_wait_seconds=60, linger_seconds=3600)
    run = _Run(slots)
    for action, caller in steps:
        if action == "arrive":
            run.arrive(caller)
        elif slots.held(caller):
            run.finish(caller)
        _check_shares(slots)
        for c in CALLERS:
            assert slots.queued(c) <= queued
    # Everyone finishes: every waiter is served in the end, none starves.
    while slots.held():
        holder = next(c for c in CALLERS if slots.held(c))
        run.finish(holder)
        _check_shares(slots)
    assert slots.queued() == 0
    for thread in run.threads:
        thread.join(10)
    assert run.pending == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 4), backlog=st.lists(st.integers(1, 3), min_size=2, max_size=4))
def test_callers_with_waiting_work_take_turns(capacity, backlog):
    """Every caller has requests waiting (``backlog[i]`` of them, as its
    queue allows); as slots come back one at a time, the grants go round the
    waiting callers: between two grants of one caller, each other caller
    still waiting gets at most one, and each waiting caller gets one within
    as many grants as callers wait."""
    callers = CALLERS[:len(backlog)]
    slots = FairSlots(capacity, what="evaluation slots", setting="evaluation_slots", reason="CALLER_SHARE_FULL",
                      max_queued_per_caller=max(backlog), max_wait_seconds=60, linger_seconds=3600)
    run = _Run(slots)
    filler = "zed"  # holds every slot first, so everyone else waits
    for _ in range(capacity):
        slots.acquire(filler)
    for caller, n in zip(callers, backlog):
        for _ in range(n):
            run.arrive(caller)
    assert run.grants == [] and slots.queued() == sum(backlog)
    # Give back the filler's slots, then each granted slot at once, one by one.
    order = []
    holders = [filler] * capacity
    while holders:
        run.finish(holders.pop(0))
        while len(order) < len(run.grants):
            order.append(run.grants[len(order)])
            holders.append(order[-1])
    assert len(order) == sum(backlog)
    left = dict(zip(callers, backlog))
    for i in range(len(order)):
        waiting = [c for c in callers if left[c]]
        # Each caller still waiting is served within one turn of everyone
        # waiting (a turn may skip a caller at its share, for at most
        # ``capacity`` grants).
        window = order[i:i + len(waiting) * capacity]
        assert all(c in window for c in waiting), (order, backlog, capacity)
        if capacity == 1:  # one slot: strict turns
            assert set(order[i:i + len(waiting)]) == set(order[i:i + len(waiting)]) & set(waiting)
            assert len(set(order[i:i + len(waiting)])) == min(len(waiting), len(order) - i)
        left[order[i]] -= 1
    for thread in run.threads:
        thread.join(10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(4, 64), requests=st.lists(st.tuples(st.sampled_from(CALLERS), st.integers(1, 64)),
                                                     min_size=1, max_size=12))
def test_bytes_never_exceed_the_budget_and_the_lightest_caller_goes_first(budget, requests):
    admission = Admission(budget, max_queued_requests=len(requests), max_queue_seconds=60)
    observed = []
    lock = threading.Lock()
    held = []
    go = threading.Event()

    def run(caller, nbytes):
        try:
            with admission.admit(caller, None, elements=1, nbytes=nbytes):
                with lock:
                    observed.append(admission.inflight_bytes)
                    held.append(caller)
                go.wait(30)
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            with lock:
                observed.append(exc)

    fits = [(c, n) for c, n in requests if n <= budget]
    threads = [threading.Thread(target=run, args=r, daemon=True) for r in fits]
    for t in threads:
        t.start()
    _wait_until(lambda: len(observed) + len(admission._waiting) == len(fits) or go.is_set())
    go.set()
    for t in threads:
        t.join(60)
    assert not [o for o in observed if isinstance(o, Exception)], observed
    assert all(o <= budget for o in observed)
    assert admission.inflight_bytes == 0 and not admission._caller_bytes


def test_a_caller_at_its_share_is_refused_with_figures_and_a_retry_delay():
    slots = FairSlots(4, what="evaluation slots", setting="evaluation_slots", reason="CALLER_SHARE_FULL",
                      max_queued_per_caller=1, max_wait_seconds=60, linger_seconds=3600)
    for _ in range(4):
        slots.acquire("alice")
    run = _Run(slots)
    run.arrive("alice")  # waits first: every slot is held
    run.arrive("bob")  # waits too
    run.finish("alice")  # the slot goes to bob, under his share, though alice waited first
    assert (slots.held("alice"), slots.held("bob"), slots.queued("alice")) == (3, 1, 1)
    run.finish("bob")  # bob gone: still active (lingering), so alice stays past her share: no slot
    assert (slots.held("alice"), slots.held("bob"), slots.queued("alice")) == (3, 0, 1)
    run.arrive("bob")  # takes the free slot at once, under his share
    assert slots.held("bob") == 1 and slots.queued("bob") == 0
    with pytest.raises(ResourceExhausted) as refused:
        slots.refuse_if_full("alice")  # what the transport asks before reading a request
    with pytest.raises(ResourceExhausted) as at_once:
        slots.acquire("alice")  # at 3 of a share of 2, its one waiter already waiting
    for error in (refused.value, at_once.value):
        assert error.reason == "CALLER_SHARE_FULL" and error.retry_delay > 0
        assert (error.metadata["share"], error.metadata["held"], error.metadata["capacity"],
                error.metadata["queued"]) == ("2", "3", "4", "1")
        assert "evaluation_slots" in error.message and "'alice'" in error.message
    slots.refuse_if_full("bob")  # bob, under his share, is not refused
    for holder in ("alice", "alice", "alice", "bob"):
        run.finish(holder)  # alice's waiter gets its slot in the end
    assert slots.queued() == 0 and slots.held("alice") == 1
    for thread in run.threads:
        thread.join(10)


def test_a_wait_that_runs_out_is_refused_and_leaves_the_queue():
    slots = FairSlots(1, what="compile slots", setting="max_pending_compiles", reason="COMPILE_BUSY")
    slots.acquire("alice")
    with pytest.raises(ResourceExhausted) as waited:
        slots.acquire("bob", wait_seconds=0.05)
    assert waited.value.reason == "COMPILE_BUSY" and "waited 0.05 s" in waited.value.message
    assert slots.queued() == 0
    slots.release("alice")
    slots.acquire("bob", wait_seconds=0)  # free now: taken at once


def test_the_queue_of_all_callers_is_bounded_and_refused_with_a_retry_delay():
    """``max_queued`` (the heavy lane's ``LOSSD_HEAVY_MAX_QUEUED``) bounds the
    waiters of every caller together, beside each caller's own bound."""
    slots = FairSlots(1, what="heavy lane workers", setting="heavy_workers", reason="HEAVY_LANE_FULL",
                      max_queued_per_caller=5, max_queued=2, max_wait_seconds=60, linger_seconds=3600)
    slots.acquire("alice")
    run = _Run(slots)
    run.arrive("alice")
    run.arrive("bob")
    assert slots.queued() == 2
    with pytest.raises(ResourceExhausted) as refused:
        slots.acquire("carol")  # under her share and her own bound, but the queue is full
    assert refused.value.reason == "HEAVY_LANE_FULL" and refused.value.retry_delay > 0
    assert "2 requests of all callers already wait" in refused.value.message
    run.finish("alice")  # the slot goes to a waiter; one place in the queue is free again
    assert slots.queued() == 1
    run.arrive("carol")
    assert slots.queued() == 2
    while slots.held():  # each waiter gets the slot in turn
        run.finish(next(c for c in ("alice", "bob", "carol") if slots.held(c)))
    assert slots.queued() == 0
    for thread in run.threads:
        thread.join(10)


def test_a_waiter_whose_call_ends_leaves_the_queue():
    slots = FairSlots(1, what="heavy lane workers", setting="heavy_workers", reason="HEAVY_LANE_FULL",
                      max_wait_seconds=60, linger_seconds=3600)
    slots.acquire("alice")
    ended = threading.Event()
    outcome = []

    def wait():
        try:
            slots.acquire("bob", cancelled=ended.is_set)
            outcome.append("granted")
        except DeadlineExceeded as exc:
            outcome.append(exc.reason)

    thread = threading.Thread(target=wait)
    thread.start()
    _wait_until(lambda: slots.queued("bob") == 1)
    ended.set()
    thread.join(10)  # within CANCEL_POLL_SECONDS, not the 60 s wait
    assert outcome == ["EVALUATION_CANCELLED"] and slots.queued() == 0
    slots.release("alice")
    slots.acquire("bob", wait_seconds=0)  # the slot was not given to the one that left
