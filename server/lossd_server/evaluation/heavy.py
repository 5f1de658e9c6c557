"""The heavy lane: evaluations whose declared cost is high run in worker
processes that can be abandoned (issue 23, "A cost model before work").

A loss such as ``ctc`` is one TensorFlow operation per time step whose
kernels no cancellation manager interrupts, and on a small machine a few of
them take every core from every other caller. So an evaluation whose cost,
as the cost model declares it from the request's shapes before any work
(``lossd_server.losses.cost``), is above ``threshold`` units does not run in
the server's process: it runs in one of a few worker processes, at a lower
CPU priority (``os.nice``), and when its call is cancelled or passes its
deadline the worker is killed (SIGKILL) and replaced, so the CPU and memory
it held go back to the operating system at once. docs/limits.md, "The heavy
lane", says why and what it costs.

One truth: a worker builds the same ``Evaluator`` as the server (the full
registry, the inline expression compiler) and plans the request's
``Plan.to_spec()`` (the self-contained spec training jobs store) with
``Planner.plan``; the server has already checked the request with its own
evaluator (``Evaluator.check``: shapes, labels, cost limits), so bad input is
refused here and never reaches a worker.

Bounds: ``processes`` workers (each at most one evaluation at a time), a
fair queue for them shared by caller (``admission.FairSlots``: each caller's
share, at most ``max_caller_queued`` of one caller's requests and
``max_queued`` in all waiting, each at most ``queue_seconds``; past that
RESOURCE_EXHAUSTED ``HEAVY_LANE_FULL`` with a retry delay), and each
worker's memory, watched while it runs against a ceiling from the cost
model's memory estimate (killed past it: RESOURCE_EXHAUSTED
``HEAVY_MEMORY_EXCEEDED``).

The wire between server and worker is a Unix socket pair: a small pickled
header (the spec, each tensor's ``lossd.wire`` dtype and shape, the
reduction, the gradient flag), then each tensor's raw bytes, written from
and read into numpy buffers (no pickling of tensors, no copy on either
side). Results come back the same way.

This module imports neither gRPC nor TensorFlow (the worker does, in its own
process).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Optional

import numpy as np

from lossd import wire
from lossd_server import errors
from lossd_server.errors import DeadlineExceeded, LossdError, ResourceExhausted, Unavailable
from lossd_server.evaluation.admission import FairSlots, evaluation_caller
from lossd_server.losses.cost import estimate

log = logging.getLogger(__name__)

# How often a running evaluation's server thread looks at its call's
# cancellation and its worker's memory: a cancelled call's worker is killed
# within this (plus the kill itself), well inside issue 23's second.
POLL_SECONDS = 0.05
# A worker may hold this many times the cost model's memory estimate on top
# of what it held idle, plus the slack (a new program's trace, TensorFlow's
# allocator caches). The model's estimates held the measured peaks within
# 1.8x (docs/limits.md, "Calibration").
MEMORY_FACTOR = 2.0
MEMORY_SLACK_BYTES = 512 << 20
# Longest a worker may take to import TensorFlow and build its evaluator.
START_SECONDS = 120.0
# The retry delay of a refusal while a worker is being started or replaced.
START_RETRY_SECONDS = 5.0
_LENGTH = struct.Struct("<Q")
_REQUIRED = ("y_true", "y_pred")


class WorkerDied(Exception):
    """The worker process ended while it held an evaluation."""


# -- the wire between server and worker ---------------------------------------

def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if not got:
            raise WorkerDied("the other end closed the socket")
        view = view[got:]


def _send_header(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_header(sock: socket.socket) -> Any:
    length = bytearray(_LENGTH.size)
    _recv_exact_into(sock, memoryview(length))
    data = bytearray(_LENGTH.unpack(length)[0])
    _recv_exact_into(sock, memoryview(data))
    return pickle.loads(data)


def _describe(array: np.ndarray) -> tuple[int, tuple[int, ...]]:
    return wire.dtype_enum(array.dtype), tuple(int(d) for d in array.shape)


def _send_array(sock: socket.socket, array: np.ndarray) -> None:
    """Writes an array's bytes as they lie in memory (a copy only where the
    array is not C-contiguous)."""
    if array.size:
        sock.sendall(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def _recv_array(sock: socket.socket, description: tuple[int, tuple[int, ...]]) -> np.ndarray:
    """Reads an array described by ``_describe`` straight into its buffer."""
    enum, shape = description
    out = np.empty(shape, dtype=wire.numpy_dtype(enum))
    if out.size:
        _recv_exact_into(sock, memoryview(out.reshape(-1).view(np.uint8)))
    return out


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


# -- the server's side ---------------------------------------------------------

class _Worker:
    """One worker process and the server's end of its socket."""

    def __init__(self, config: Mapping[str, Any]):
        parent, child = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lossd_server.evaluation.heavy", str(child.fileno()), repr(dict(config))],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            child.close()
        self.sock = parent
        self.pid = self.process.pid
        self.idle_rss = 0
        self.dead = False

    def wait_ready(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise WorkerDied(f"it did not start within {timeout:g} s")
        message = _recv_header(self.sock)
        if message[0] != "ready":
            raise WorkerDied(f"it failed to start: {message[1]}")
        self.idle_rss = _rss(self.pid)

    def kill(self) -> Optional[int]:
        """SIGKILL, then reaps it (its memory is the system's again); its exit status."""
        self.dead = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(5)
        return None

    def alive(self) -> bool:
        return self.process.poll() is None


class HeavyLane:
    """Runs evaluations whose declared cost is above ``threshold`` in worker
    processes (module docstring).

    Args:
        evaluator: The server's ``Evaluator``: checks requests and estimates
            their cost before they go to a worker.
        threshold: Cost units (``losses.cost``) above which an evaluation
            takes the lane.
        processes: Worker processes (evaluations running at once in the lane).
        max_queued: Most evaluations waiting for a worker, all callers together.
        max_caller_queued: Most of one caller's evaluations waiting.
        min_caller_share: The least share of the workers a caller has.
        queue_seconds: Longest an evaluation waits for a worker (or less, to
            its deadline).
        nice: What each worker adds to its CPU niceness (``os.nice``).
        worker_config: What a worker builds its evaluator with (``device``,
            ``inter_op_threads``, ``xla``, ``max_broadcast_elements``,
            ``max_composite_terms``, ``max_program_nodes``).
        metrics: Optional ``Metrics``: queue length, runs, kills.
        memory_slack_bytes: What a worker may hold past its idle memory and
            ``MEMORY_FACTOR`` times the cost model's estimate before it is
            killed.

    Workers start on the first evaluation that needs one (most servers never
    see a heavy request), and a killed worker is replaced at once.
    """

    def __init__(self, evaluator, *, threshold: float, processes: int = 1, max_queued: int = 4,
                 max_caller_queued: int = 1, min_caller_share: int = 1, queue_seconds: float = 30.0,
                 nice: int = 10, worker_config: Optional[Mapping[str, Any]] = None, metrics=None,
                 memory_slack_bytes: int = MEMORY_SLACK_BYTES):
        self.evaluator = evaluator
        self.threshold = threshold
        self.processes = processes
        self.queue_seconds = queue_seconds
        self.metrics = metrics
        self.memory_slack_bytes = memory_slack_bytes
        self.config = {"nice": nice, **(worker_config or {})}
        self.slots = FairSlots(processes, what="heavy lane workers", setting="heavy_workers",
                               reason="HEAVY_LANE_FULL", min_share=min_caller_share,
                               max_queued_per_caller=max_caller_queued, max_queued=max_queued,
                               max_wait_seconds=queue_seconds, metrics=metrics)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0
        self._start_error: Optional[str] = None
        self._start_failures = 0
        self._closed = False
        self._waiting = 0
        # Whether a kind of request takes the lane, by its plan, gradient flag
        # and declared dtypes and shapes: the cost is estimated once per kind.
        self._claims: dict[tuple, bool] = {}

    # -- routing ----------------------------------------------------------------

    def claims(self, plan, tensors: Mapping[str, Any], gradient: bool) -> bool:
        """Whether a request of ``plan`` on tensors of these declared dtypes
        and shapes (``service.Incoming``: ``dtype``, ``shape``) takes the lane:
        its estimated work (``losses.cost.estimate``) is above the threshold.
        Shapes the cost model cannot read stay in the server, whose checks
        refuse them."""
        key = (plan.key, gradient, tuple([(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]))
        claimed = self._claims.get(key)
        if claimed is None:
            try:
                itemsize = wire.numpy_dtype(tensors["y_pred"].dtype).itemsize
                work = estimate(plan, {name: tuple(t.shape) for name, t in tensors.items()}, itemsize,
                                gradient).work
            except (LossdError, wire.WireError, KeyError, TypeError, ValueError, IndexError):
                work = 0.0
            claimed = work > self.threshold
            if len(self._claims) >= 4096:  # bounded: a flood of new shapes starts over
                self._claims.clear()
            self._claims[key] = claimed
        return claimed

    # -- evaluation ---------------------------------------------------------------

    def evaluate(self, plan, tensors: Mapping[str, np.ndarray], *, sample_weight: Optional[np.ndarray] = None,
                 reduction: str = wire.DEFAULT_REDUCTION, gradient: bool = False, cancellation=None,
                 wait_seconds: Optional[float] = None):
        """Evaluates in a worker what ``Evaluator.evaluate`` would in process,
        and returns the same ``Result``.

        Raises:
            InvalidArgument, ResourceExhausted: as ``Evaluator.evaluate``
                (checked here, before a worker is taken), and
                ``HEAVY_LANE_FULL`` (the queue, with a retry delay) or
                ``HEAVY_MEMORY_EXCEEDED`` (the worker passed its ceiling).
            DeadlineExceeded: ``EVALUATION_CANCELLED``: the call ended first;
                its worker was killed.
            Unavailable: ``HEAVY_WORKER_DIED``/``HEAVY_LANE_STARTING``: the
                worker ended without an answer, or none could be started.
        """
        evaluator = self.evaluator
        evaluator.check(plan, tensors, sample_weight, reduction, gradient)
        cost = estimate(plan, {name: a.shape for name, a in tensors.items()}, tensors["y_pred"].dtype.itemsize,
                        gradient)
        caller = evaluation_caller()
        start = time.monotonic()
        wait = self.queue_seconds if wait_seconds is None else min(self.queue_seconds, max(0.0, wait_seconds))
        self._queued(+1)
        try:
            self.slots.acquire(caller, wait, None if cancellation is None else lambda: cancellation.cancelled)
        finally:
            self._queued(-1)
        try:
            worker = self._take(cancellation, plan)
            try:
                result = self._run(worker, plan, tensors, sample_weight, reduction, gradient, cancellation, cost)
            except BaseException:
                if worker.dead:  # killed: a replacement starts now, for the next evaluation
                    self._replace(worker)
                else:  # an error the worker reported itself: it is still good
                    self._count_run("error")
                    self._give_back(worker)
                raise
            self._give_back(worker)
            self._count_run("ok")
            return result
        finally:
            self.slots.release(caller, time.monotonic() - start)

    def _run(self, worker: _Worker, plan, tensors, sample_weight, reduction, gradient, cancellation, cost):
        names = _REQUIRED + tuple(sorted(name for name in tensors if name not in _REQUIRED))
        arrays = [tensors[name] for name in names]
        if sample_weight is not None:
            arrays.append(sample_weight)
        header = (plan.to_spec(), names, [_describe(a) for a in arrays], sample_weight is not None,
                  reduction, gradient)
        sock = worker.sock
        ceiling = worker.idle_rss + MEMORY_FACTOR * cost.memory + self.memory_slack_bytes
        try:
            _send_header(sock, header)
            for array in arrays:
                _send_array(sock, array)
            while True:
                ready, _, _ = select.select([sock], [], [], POLL_SECONDS)
                if ready:
                    break
                if cancellation is not None and cancellation.cancelled:
                    self._kill(worker, "cancelled")
                    raise DeadlineExceeded(
                        f"Loss `{plan.metric_name}` was stopped before it finished: its call was cancelled or "
                        "passed its deadline, and the worker process running it was killed. Expected a call that "
                        "waits for its answer. Received: a call that ended first.",
                        reason="EVALUATION_CANCELLED", metadata={"loss": plan.metric_name})
                rss = _rss(worker.pid)
                if rss > ceiling:
                    self._kill(worker, "memory")
                    raise ResourceExhausted(
                        f"Loss `{plan.metric_name}` took its worker process past {ceiling / 2 ** 20:,.0f} MiB "
                        f"({rss / 2 ** 20:,.0f} MiB; the cost model estimated {cost.memory / 2 ** 20:,.0f} MiB of "
                        "intermediates), and the worker was killed. Expected an evaluation within its memory "
                        "estimate: send smaller batches, shorter sequences or fewer classes.",
                        reason="HEAVY_MEMORY_EXCEEDED",
                        metadata={"loss": plan.metric_name, "rss": rss, "limit": int(ceiling)})
            reply = _recv_header(sock)
            if reply[0] == "error":
                _, kind, message, reason, metadata, retry_delay = reply
                cls = getattr(errors, kind, None)
                if not (isinstance(cls, type) and issubclass(cls, LossdError)):
                    cls = Unavailable
                raise cls(message, reason=reason, metadata=metadata, retry_delay=retry_delay)
            _, loss, grad, terms, non_finite, outputs = reply
            # Imported here: the evaluator imports TensorFlow, which this
            # module leaves to the worker (and to the server, which has it).
            from lossd_server.evaluation.evaluator import Result

            return Result(
                _recv_array(sock, loss), None if grad is None else _recv_array(sock, grad),
                [(label, _recv_array(sock, d), weight) for label, d, weight in terms], non_finite,
                {name: _recv_array(sock, d) for name, d in outputs})
        except (WorkerDied, OSError, EOFError, ValueError, pickle.UnpicklingError):
            # ValueError: select on a socket ``close`` shut meanwhile.
            status = self._kill(worker, "died")
            raise self._died(plan, status) from None

    def _died(self, plan, status: Optional[int]) -> LossdError:
        if status == -signal.SIGKILL:
            return ResourceExhausted(
                f"The worker process evaluating loss `{plan.metric_name}` was killed (SIGKILL, as the kernel's "
                "out-of-memory killer does) before it answered. Expected an evaluation that fits in the memory "
                "free now: send smaller batches, or retry later.", reason="HEAVY_WORKER_KILLED",
                metadata={"loss": plan.metric_name, "exit_status": status})
        return Unavailable(
            f"The worker process evaluating loss `{plan.metric_name}` ended (exit status {status}) before it "
            f"answered; it is being replaced. Expected an answer; retry in {START_RETRY_SECONDS:g} s.",
            reason="HEAVY_WORKER_DIED", retry_delay=START_RETRY_SECONDS,
            metadata={"loss": plan.metric_name, "exit_status": status})

    # -- the workers ----------------------------------------------------------------

    def _take(self, cancellation, plan) -> _Worker:
        """An idle worker, starting one if the lane has fewer than
        ``processes``; waits for it (a slot holder always gets one: there are
        as many slots as workers), until its call ends, a start fails, or
        ``START_SECONDS``."""
        deadline = time.monotonic() + START_SECONDS
        with self._ready:
            failures = self._start_failures
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        self._busy.add(worker)
                        return worker
                    worker.kill()
                if len(self._busy) + self._starting < self.processes and not self._closed:
                    self._starting += 1
                    threading.Thread(target=self._start, name="heavy-start", daemon=True).start()
                left = deadline - time.monotonic()
                if (left <= 0 or self._closed or self._start_failures != failures
                        or (cancellation is not None and cancellation.cancelled)):
                    why = self._start_error or "none was ready in time"
                    raise Unavailable(
                        f"No heavy-lane worker process could take loss `{plan.metric_name}`: {why}. Expected a "
                        f"worker within the call's deadline; retry in {START_RETRY_SECONDS:g} s.",
                        reason="HEAVY_LANE_STARTING", retry_delay=START_RETRY_SECONDS,
                        metadata={"loss": plan.metric_name})
                self._ready.wait(min(left, POLL_SECONDS * 4))

    def _start(self) -> None:
        worker = None
        error = None
        try:
            worker = _Worker(self.config)
            worker.wait_ready(START_SECONDS)
        except (OSError, WorkerDied, EOFError, pickle.UnpicklingError) as exc:
            error = f"a worker failed to start ({exc})"
            log.error("heavy lane: %s", error)
            if worker is not None:
                worker.kill()
            worker = None
        with self._ready:
            self._starting -= 1
            self._start_error = error
            self._start_failures += error is not None
            if worker is not None:
                if self._closed:
                    worker.kill()
                else:
                    self._idle.append(worker)
                    if self.metrics is not None:
                        self.metrics.heavy_lane_started()
            self._ready.notify_all()

    def _give_back(self, worker: _Worker) -> None:
        with self._ready:
            self._busy.discard(worker)
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
            self._ready.notify_all()

    def _replace(self, worker: _Worker) -> None:
        """Forgets a killed worker and starts its replacement, so the next
        evaluation finds one soon."""
        with self._ready:
            self._busy.discard(worker)
            if not self._closed and len(self._busy) + len(self._idle) + self._starting < self.processes:
                self._starting += 1
                threading.Thread(target=self._start, name="heavy-start", daemon=True).start()
            self._ready.notify_all()

    def _kill(self, worker: _Worker, reason: str) -> Optional[int]:
        status = worker.kill()
        self._count_run(reason)
        if self.metrics is not None:
            self.metrics.heavy_lane_kill(reason)
        if reason != "died":
            log.info("heavy lane: killed worker %d (%s)", worker.pid, reason)
        else:
            log.warning("heavy lane: worker %d ended with status %s", worker.pid, status)
        return status

    def _count_run(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.heavy_lane_run(outcome)

    def _queued(self, delta: int) -> None:
        with self._lock:
            self._waiting += delta
            waiting = self._waiting
        if self.metrics is not None:
            self.metrics.heavy_lane_queued(waiting)

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes alive now (idle or busy)."""
        with self._lock:
            return [w.pid for w in [*self._idle, *self._busy] if w.alive()]

    def close(self) -> None:
        """Kills every worker; evaluations running in them end as died."""
        with self._ready:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
            self._ready.notify_all()
        for worker in workers:
            worker.kill()


# -- the worker's side -----------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """Exits when the server is gone (killed with SIGKILL, it closes nothing)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _build_evaluator(config: Mapping[str, Any]):
    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses import custom

    backend.configure_threads(config.get("inter_op_threads") or None)
    device = backend.select_device(config.get("device", "auto"))
    # Cost limits are the server's: it checked the request before sending it.
    return Evaluator(custom.full_registry(plugins=True), device, xla=config.get("xla", "off"),
                     xla_losses=config.get("xla_losses", ()), expression_compiler=custom.inline_entry,
                     max_broadcast_elements=config.get("max_broadcast_elements"),
                     max_composite_terms=config.get("max_composite_terms"),
                     max_program_nodes=config.get("max_program_nodes"), compile_workers=1,
                     compile_timeout=3600.0)


def _serve(sock: socket.socket, evaluator) -> None:
    plans: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
    while True:
        try:
            spec, names, descriptions, has_weight, reduction, gradient = _recv_header(sock)
        except WorkerDied:
            return  # the server closed its end
        arrays = [_recv_array(sock, d) for d in descriptions]
        tensors = dict(zip(names, arrays))
        weight = arrays[-1] if has_weight else None
        try:
            key = (repr(spec), names)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = evaluator.planner.plan(spec, names)
                if len(plans) > 256:
                    plans.popitem(last=False)
            result = evaluator.evaluate(plan, tensors, sample_weight=weight, reduction=reduction, gradient=gradient)
        except LossdError as exc:
            _send_header(sock, ("error", type(exc).__name__, exc.message, exc.reason, exc.metadata,
                                exc.retry_delay))
            continue
        except Exception as exc:  # noqa: BLE001 - reported to the server, which maps it to a status
            _send_header(sock, ("error", "Unavailable", f"The heavy-lane worker failed: {exc!r}"[:500],
                                "HEAVY_WORKER_FAILED", {}, None))
            continue
        grad = result.gradient
        terms = [(label, np.asarray(value), weight) for label, value, weight in result.terms]
        outputs = [(name, np.asarray(value)) for name, value in result.outputs.items()]
        loss = np.asarray(result.loss)
        _send_header(sock, ("ok", _describe(loss), None if grad is None else _describe(grad),
                            [(label, _describe(v), w) for label, v, w in terms], bool(result.non_finite),
                            [(name, _describe(v)) for name, v in outputs]))
        for array in [loss, *([] if grad is None else [grad]), *(v for _, v, _ in terms), *(v for _, v in outputs)]:
            _send_array(sock, array)


def _worker_main(fd: int, config: Mapping[str, Any]) -> None:
    sock = socket.socket(fileno=fd)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    os.nice(int(config.get("nice", 0)))
    try:
        evaluator = _build_evaluator(config)
    except Exception as exc:  # noqa: BLE001 - told to the server, which refuses with it
        _send_header(sock, ("failed", f"{exc!r}"[:500]))
        return
    _send_header(sock, ("ready", os.getpid()))
    _serve(sock, evaluator)


if __name__ == "__main__":
    import ast

    logging.basicConfig(level=logging.WARNING)
    _worker_main(int(sys.argv[1]), ast.literal_eval(sys.argv[2]))
