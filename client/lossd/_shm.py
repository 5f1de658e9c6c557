"""Shared memory for a client on the server's host (``Client(...,
shared_memory=True)``): tensors travel through POSIX shared-memory regions
instead of the socket, and the gradient comes back the same way.

The path is taken only when the server is local: the address is loopback
(or a unix socket) *and* a handshake proves the server maps the very memory
the client writes (the client writes a random nonce at the start of a new
region; RegisterRegion answers with the bytes the server read there).
Anything else, or any failure of the handshake, and the client uses gRPC.

The client holds one session (an OpenSession stream) while it has regions;
the server unregisters and unlinks them when that stream ends, so a client
that dies leaves nothing behind. ``close()`` unlinks them at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import secrets
import threading
from multiprocessing import resource_tracker, shared_memory
from typing import Mapping, Optional

import grpc

from lossd import _requests, wire
from lossd._errors import from_rpc_error
from lossd.addresses import is_local
from lossd.v1 import loss_pb2, loss_service_pb2, shared_memory_service_pb2 as pb
from lossd.v1 import shared_memory_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2

log = logging.getLogger("lossd")

DEFAULT_MIN_BYTES = 64 << 10
"""Requests with fewer tensor bytes than this go over gRPC: for them the
socket costs less than a shared-memory round trip's bookkeeping."""
MAX_REGIONS = 4  # regions a client keeps: one per evaluation running at once
_ALIGN = 64
_NONCE_BYTES = 16
# Errors after which the session is gone (the server restarted, or ended it):
# the call is answered over gRPC and the next one opens a new session.
_SESSION_LOST = {"SHM_REGION_NOT_FOUND", "SHM_SESSION_NOT_FOUND", "SHM_UNAVAILABLE"}
_TRACK_PARAMETER = "track" in inspect.signature(shared_memory.SharedMemory).parameters  # Python 3.13+


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclasses.dataclass(eq=False)
class _Region:
    memory: shared_memory.SharedMemory
    name: str
    size: int
    busy: bool = False

    def resolve(self, name: str) -> memoryview:
        if name != self.name:
            raise wire.WireError(f"The server referred to shared-memory region {name[:64]!r}. Expected "
                                 f"{self.name!r}, the region of this call.", reason="SHM_OUT_OF_RANGE")
        return self.memory.buf

    def destroy(self) -> None:
        try:
            self.memory.close()
        except BufferError:  # an array still views it; unmapped when collected
            pass
        try:
            if _TRACK_PARAMETER:
                self.memory.unlink()
            else:  # SharedMemory.unlink would unregister it from the resource tracker a second time
                shared_memory._posixshmem.shm_unlink(self.memory._name)  # noqa: SLF001
        except FileNotFoundError:  # the server unlinked it first
            pass


def _create(prefix: str, size: int) -> _Region:
    name = f"{prefix}{secrets.token_hex(16)}"  # the server registers only names under the session's prefix
    if _TRACK_PARAMETER:
        memory = shared_memory.SharedMemory(name=name, create=True, size=size, track=False)
    else:
        memory = shared_memory.SharedMemory(name=name, create=True, size=size)
        # The server unlinks the regions of a client that dies (its session
        # ends); Python's resource tracker would only warn of "leaks" at exit.
        resource_tracker.unregister(memory._name, "shared_memory")  # noqa: SLF001 - the name it registered
    return _Region(memory, memory.name, size)


class _Session:
    """One OpenSession stream and the regions registered in it."""

    def __init__(self, channel: grpc.Channel, metadata):
        self._stub = pb_grpc.SharedMemoryServiceStub(channel)
        self._metadata = metadata
        self._call = self._stub.OpenSession(pb.OpenSessionRequest(), metadata=metadata)
        first = next(self._call)
        self.id = first.session_id
        self.name_prefix = first.name_prefix
        self.max_bytes = first.max_bytes
        self.max_regions = min(MAX_REGIONS, first.max_regions)
        self.regions: list[_Region] = []
        self.ended = threading.Event()
        threading.Thread(target=self._watch, name="lossd-shm-session", daemon=True).start()

    def _watch(self) -> None:
        try:
            for _ in self._call:  # the server sends nothing more; this returns when the stream ends
                pass
        except grpc.RpcError:
            pass
        self.ended.set()

    def register(self, size: int) -> _Region:
        """A new region of ``size`` bytes, registered after the nonce check."""
        region = _create(self.name_prefix, size)
        try:
            nonce = secrets.token_bytes(_NONCE_BYTES)
            region.memory.buf[:_NONCE_BYTES] = nonce
            answer = self._stub.RegisterRegion(pb.RegisterRegionRequest(
                session_id=self.id, name=region.name, byte_size=size), metadata=self._metadata, timeout=30)
            if answer.prefix != nonce:
                raise ConnectionError("the server read other bytes from the region than the client wrote")
        except BaseException:
            region.destroy()
            raise
        self.regions.append(region)
        return region

    def unregister(self, region: _Region) -> None:
        self.regions.remove(region)
        try:
            self._stub.UnregisterRegion(pb.UnregisterRegionRequest(session_id=self.id, name=region.name),
                                        metadata=self._metadata, timeout=30)
        except grpc.RpcError:  # gone already; the unlink below is what matters
            pass
        region.destroy()

    def close(self) -> None:
        if not self.ended.is_set():
            try:  # ends the stream with OK; cancelling it would read as a failed call in the server's log
                self._stub.CloseSession(pb.CloseSessionRequest(session_id=self.id), metadata=self._metadata,
                                        timeout=5)
                self.ended.wait(1)
            except grpc.RpcError:
                pass
        self._call.cancel()  # in any case: then the server unregisters and unlinks the rest
        for region in self.regions:
            region.destroy()
        self.regions = []


class SharedMemoryPath:
    """Evaluates through shared memory when it can (``evaluate`` returns
    None when it cannot, and the caller uses gRPC)."""

    def __init__(self, channel: grpc.Channel, target: str, metadata, min_bytes: int = DEFAULT_MIN_BYTES):
        self._channel = channel
        self._metadata = metadata
        self.min_bytes = min_bytes
        self.local = is_local(target)
        self.available = self.local  # False once a handshake failed
        self._session: Optional[_Session] = None
        self._lock = threading.Lock()
        self._evaluate = channel.unary_unary(
            "/lossd.v1.LossService/Evaluate", request_serializer=loss_service_pb2.EvaluateRequest.SerializeToString,
            response_deserializer=loss_service_pb2.EvaluateResponse.FromString)

    @property
    def active(self) -> bool:
        """Whether a session is open now (the handshake succeeded)."""
        return self._session is not None and not self._session.ended.is_set()

    def _acquire(self, nbytes: int) -> Optional[_Region]:
        with self._lock:
            if not self.available:
                return None
            session = self._session
            if session is not None and session.ended.is_set():  # the server ended it: start over
                session.close()
                session = self._session = None
            try:
                if session is None:
                    session = self._session = _Session(self._channel, self._metadata)
                if nbytes > session.max_bytes:
                    return None
                free = [r for r in session.regions if not r.busy]
                fits = [r for r in free if r.size >= nbytes]
                if fits:
                    region = min(fits, key=lambda r: r.size)
                else:
                    if len(session.regions) >= session.max_regions:
                        if not free:
                            return None  # every region is in use: this call goes over gRPC
                        session.unregister(max(free, key=lambda r: r.size))
                    # Pages of a region cost memory only once written, so round up generously.
                    region = session.register(min(max(1 << 20, 1 << (nbytes - 1).bit_length()), session.max_bytes))
            except (grpc.RpcError, OSError, ConnectionError, StopIteration) as error:
                self._give_up(error)
                return None
            region.busy = True
            return region

    def _give_up(self, error: BaseException) -> None:
        detail = from_rpc_error(error).message if isinstance(error, grpc.RpcError) else str(error)
        log.info("shared memory is not available with this server (%s); using gRPC", detail)
        self.available = False
        if self._session is not None:
            self._session.close()
            self._session = None

    def evaluate(self, spec: loss_pb2.LossSpec, arrays: Mapping[str, "object"], reduction: str, gradient: bool,
                 call_args: dict) -> Optional[_requests.EvaluateResult]:
        layout, offset = {}, 0
        for name, array in arrays.items():
            layout[name] = offset
            offset += _aligned(array.nbytes)
        gradient_offset = offset
        total = offset + (arrays["y_pred"].nbytes if gradient else 0)
        if sum(a.nbytes for a in arrays.values()) < self.min_bytes:
            return None
        region = self._acquire(total)
        if region is None:
            return None
        try:
            return self._call(region, spec, arrays, layout, reduction, gradient, gradient_offset, call_args)
        except grpc.RpcError as error:
            reason = from_rpc_error(error).reason
            if reason == "REQUEST_TOO_LARGE":  # over gRPC, a request this large travels in admitted chunks
                return None
            if reason not in _SESSION_LOST:
                raise
            with self._lock:  # answered over gRPC; the next call opens a new session
                if self._session is not None:
                    self._session.close()
                    self._session = None
            return None
        finally:
            region.busy = False

    def _call(self, region: _Region, spec, arrays, layout, reduction, gradient, gradient_offset, call_args):
        request = loss_service_pb2.EvaluateRequest(loss=spec, reduction=wire.reduction_enum(reduction),
                                                   gradient=gradient)
        for name, array in arrays.items():
            ref = tensor_pb2.SharedMemoryRef(region=region.name, offset=layout[name], byte_size=array.nbytes)
            tensor = wire.to_region(array, ref, region.resolve, field=name)
            (getattr(request, name) if name in _requests.OWN_FIELDS else request.tensors[name]).CopyFrom(tensor)
        if gradient:
            request.gradient_output.CopyFrom(tensor_pb2.SharedMemoryRef(
                region=region.name, offset=gradient_offset, byte_size=arrays["y_pred"].nbytes))
        response = self._evaluate(request, **call_args)
        return _requests.parse_response(response, regions=region.resolve)

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
            self.available = False

