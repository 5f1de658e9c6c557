"""``lossd.v1.SharedMemoryService``: sessions and regions of clients on the
server's host. Thin: the table, its bounds and its checks are
``shared_memory.py``; Evaluate reads the regions through it."""

from __future__ import annotations

import threading
import time

from lossd.v1 import shared_memory_service_pb2 as pb
from lossd.v1 import shared_memory_service_pb2_grpc as pb_grpc
from lossd_server.errors import DeadlineExceeded
from lossd_server.shared_memory import SharedMemoryRegions
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Callers
from lossd_server.grpc.status import handle_errors


class SharedMemoryServicer(pb_grpc.SharedMemoryServiceServicer):
    def __init__(self, regions: SharedMemoryRegions, callers: Callers = Callers(None),
                 idle_seconds: float = float("inf")):
        self.regions = regions
        self.callers = callers
        # A session no call used (registering, unregistering, reading or
        # writing one of its regions) for this long ends, with its stream.
        self.idle_seconds = idle_seconds
        self._open: dict[str, threading.Event] = {}  # session id -> set to end its stream
        self._lock = threading.Lock()

    @handle_errors
    def OpenSession(self, request, context):
        session = self.regions.open_session(self.callers.of(context).name)
        ended = threading.Event()

        def end():  # gRPC calls it when the call ends: closed, cancelled, or the client's connection dropped
            self.regions.close_session(session)
            ended.set()

        with self._lock:
            self._open[session.id] = ended
        try:
            if not context.add_callback(end):  # over already
                return
            yield pb.OpenSessionResponse(session_id=session.id, name_prefix=session.prefix,
                                         max_regions=self.regions.max_regions, max_bytes=self.regions.max_bytes)
            while not ended.wait(min(self.idle_seconds - (time.monotonic() - session.used), 3600)):
                if time.monotonic() - session.used >= self.idle_seconds:
                    raise DeadlineExceeded(
                        f"No call used this shared-memory session for {self.idle_seconds:g} s. Expected a "
                        "RegisterRegion, UnregisterRegion or Evaluate with one of its regions within the server's "
                        "stream_idle_seconds (LOSSD_STREAM_IDLE_SECONDS); open a new session to go on.",
                        reason="STREAM_IDLE", metadata={"idle_seconds": f"{self.idle_seconds:g}"})
        finally:
            with self._lock:
                self._open.pop(session.id, None)
            self.regions.close_session(session)

    @handle_errors
    def RegisterRegion(self, request, context):
        prefix = self.regions.register(self.callers.of(context).name, request.session_id, request.name,
                                       request.byte_size)
        return pb.RegisterRegionResponse(prefix=prefix)

    @handle_errors
    def UnregisterRegion(self, request, context):
        self.regions.unregister(self.callers.of(context).name, request.session_id, request.name)
        return pb.UnregisterRegionResponse()

    @handle_errors
    def CloseSession(self, request, context):
        session = self.regions.session(self.callers.of(context).name, request.session_id)
        self.regions.close_session(session)
        with self._lock:
            ended = self._open.get(session.id)
        if ended is not None:
            ended.set()
        return pb.CloseSessionResponse()

    def close(self) -> None:
        """Ends every session and its stream (the server stops): regions are
        unlinked and streams return, so they do not hold the stop's grace."""
        self.regions.close()
        with self._lock:
            for ended in self._open.values():
                ended.set()


def add_shared_memory_service(server, regions: SharedMemoryRegions, callers: Callers,
                              idle_seconds: float = float("inf")) -> SharedMemoryServicer:
    servicer = SharedMemoryServicer(regions, callers, idle_seconds)
    parsing.add_tolerant(pb_grpc.add_SharedMemoryServiceServicer_to_server, servicer,
                         pb.DESCRIPTOR.services_by_name["SharedMemoryService"], server)
    return servicer
