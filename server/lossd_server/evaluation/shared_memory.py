"""Shared-memory regions of clients on the server's host: the one table of
what is mapped, by whom, within which bounds.

A client creates a POSIX shared-memory object named under ``lossd_``,
registers it in a session (``SharedMemoryService``), and names ranges of it
in its requests; ``lossd.wire`` reads and writes those ranges through the
resolver this table hands out (``access``), after checking each range
against the region.

Safety:

* names: only ``lossd_`` followed by ``[A-Za-z0-9_-]`` (no path
  separators); opened with ``O_NOFOLLOW`` and refused unless a regular file
  owned by the server's own user. A process of that user could stop the
  server with a signal anyway, so nothing a region's owner can do to it
  (such as shrinking it under the server, which the size check before each
  use narrows to a race) gives a client more than it had;
* bounds before mapping: regions and bytes per caller and in total
  (``max_regions``, ``max_bytes``, ``max_total_bytes``), reserved under the
  lock before anything is opened;
* lifetime: a region belongs to one session of one caller; the session ends
  with its gRPC stream (the client closed it, or died and its connection
  dropped), and then every region of it is unmapped and unlinked;
* access: a request resolves only regions its own caller registered.

Arrays decoded from a region are views of the mapping; an unregistered
region's mapping is closed at once when no view is left, else when the last
one is collected. Its name is unlinked at once either way.

Linux only (``/dev/shm``); elsewhere registration fails and clients fall
back to gRPC. This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
from typing import Optional

import numpy as np
from lossd import wire
from lossd.v1 import tensor_pb2
from lossd_server.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"
NAME_PATTERN = re.compile(rf"^{wire.SHM_PREFIX}[A-Za-z0-9_-]{{1,{200 - len(wire.SHM_PREFIX)}}}$")
PREFIX_BYTES = 16  # what RegisterRegion reads back from the region's start


@dataclasses.dataclass(eq=False)
class Region:
    name: str
    caller: str
    session: str
    size: int
    fd: int
    mapping: mmap.mmap
    buffer: memoryview


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    caller: str
    regions: dict[str, Region] = dataclasses.field(default_factory=dict)
    closed: bool = False
    used: float = dataclasses.field(default_factory=time.monotonic)  # last call that used it (the idle limit)


class SharedMemoryRegions:
    """The regions registered on this server, by name and by session."""

    def __init__(self, *, max_regions: int, max_bytes: int, max_total_bytes: int, metrics=None,
                 directory: str = SHM_DIRECTORY):
        self.max_regions = max_regions  # per caller
        self.max_bytes = max_bytes  # per caller
        self.max_total_bytes = max_total_bytes
        self.metrics = metrics
        self.directory = directory
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._regions: dict[str, Region] = {}
        self._reserved: dict[str, list[int]] = {}  # caller -> [regions, bytes], registered or being registered
        self._total = 0

    # -- sessions ------------------------------------------------------------

    def open_session(self, caller: str) -> Session:
        session = Session(secrets.token_hex(16), caller)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        """Unregisters and unlinks every region of the session (idempotent)."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
            self._sessions.pop(session.id, None)
            regions = list(session.regions.values())
        for region in regions:
            self._remove(region)
        if regions:
            log.info("shared-memory session ended: unregistered and unlinked %d region(s)", len(regions))

    def session(self, caller: str, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.caller != caller:
            raise NotFound(f"No open shared-memory session {session_id[:64]!r} of this caller. Expected the id "
                           "OpenSession sent, on a stream that is still open.", reason="SHM_SESSION_NOT_FOUND")
        session.used = time.monotonic()
        return session

    # -- regions -------------------------------------------------------------

    def register(self, caller: str, session_id: str, name: str, byte_size: int) -> bytes:
        """Maps ``byte_size`` bytes of the region ``name`` into the server for
        the session; returns the region's first bytes."""
        if not NAME_PATTERN.match(name):
            raise InvalidArgument(
                f"Invalid shared-memory region name {name[:64]!r}. Expected {wire.SHM_PREFIX!r} followed by "
                f"letters, digits, '_' or '-', at most 200 characters.", reason="SHM_BAD_NAME")
        if byte_size <= 0:
            raise InvalidArgument(f"byte_size must be positive. Received: {byte_size}.", reason="SHM_BAD_SIZE")
        self._reserve(caller, session_id, name, byte_size)
        try:
            region = self._open(caller, session_id, name, byte_size)
        except BaseException:
            self._release(caller, byte_size)
            raise
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.closed:  # the stream ended meanwhile
                self._release_locked(caller, byte_size)
                self._close(region, unlink=True)
                raise NotFound("The shared-memory session ended during the registration.",
                               reason="SHM_SESSION_NOT_FOUND")
            self._regions[name] = region
            session.regions[name] = region
        self._gauges()
        return bytes(region.buffer[:PREFIX_BYTES])

    def unregister(self, caller: str, session_id: str, name: str) -> None:
        with self._lock:
            session = self.session(caller, session_id)
            region = session.regions.get(name)
            if region is None:
                raise NotFound(f"No shared-memory region {name[:64]!r} in this session.",
                               reason="SHM_REGION_NOT_FOUND")
        self._remove(region)

    def _reserve(self, caller: str, session_id: str, name: str, byte_size: int) -> None:
        with self._lock:
            self.session(caller, session_id)
            if name in self._regions:
                raise AlreadyExists(f"The shared-memory region {name[:64]!r} is registered already.",
                                    reason="SHM_REGION_EXISTS")
            held = self._reserved.setdefault(caller, [0, 0])
            if held[0] + 1 > self.max_regions:
                raise ResourceExhausted(
                    f"Too many shared-memory regions. Expected at most {self.max_regions} per caller "
                    f"(LOSSD_SHM_MAX_REGIONS). Received: one more beside {held[0]}.", reason="SHM_TOO_MANY_REGIONS")
            if held[1] + byte_size > self.max_bytes:
                raise ResourceExhausted(
                    f"Too many shared-memory bytes. Expected at most {self.max_bytes:,} per caller "
                    f"(LOSSD_SHM_MAX_BYTES). Received: {byte_size:,} more beside {held[1]:,}.",
                    reason="SHM_TOO_MANY_BYTES")
            if self._total + byte_size > self.max_total_bytes:
                raise ResourceExhausted(
                    f"The server maps too many shared-memory bytes. Expected at most {self.max_total_bytes:,} "
                    f"in all (LOSSD_SHM_MAX_TOTAL_BYTES). Received: {byte_size:,} more beside {self._total:,}.",
                    reason="SHM_TOO_MANY_BYTES")
            held[0] += 1
            held[1] += byte_size
            self._total += byte_size

    def _release(self, caller: str, byte_size: int) -> None:
        with self._lock:
            self._release_locked(caller, byte_size)

    def _release_locked(self, caller: str, byte_size: int) -> None:
        held = self._reserved[caller]
        held[0] -= 1
        held[1] -= byte_size
        self._total -= byte_size
        if held[0] == 0:
            del self._reserved[caller]

    def _open(self, caller: str, session_id: str, name: str, byte_size: int) -> Region:
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFound(f"No shared-memory region {name!r} on the server's host. Expected a region the client "
                           "created on the same host (and not in another container).",
                           reason="SHM_REGION_NOT_FOUND") from None
        except OSError as error:
            raise PermissionDenied(f"The server cannot open the shared-memory region {name!r}: "
                                   f"{os.strerror(error.errno)}.", reason="SHM_REGION_DENIED") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise PermissionDenied(f"The shared-memory region {name!r} is not a region of the server's own "
                                       "user. Expected a client running as the same user.",
                                       reason="SHM_REGION_DENIED")
            if info.st_size < byte_size:
                raise InvalidArgument(f"The shared-memory region {name!r} is smaller than byte_size. Expected at "
                                      f"least {byte_size:,} bytes. Received: a region of {info.st_size:,} bytes.",
                                      reason="SHM_BAD_SIZE")
            mapping = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return Region(name, caller, session_id, byte_size, fd, mapping, memoryview(mapping))

    def _remove(self, region: Region) -> None:
        with self._lock:
            if self._regions.get(region.name) is not region:
                return
            del self._regions[region.name]
            self._sessions.get(region.session, Session("", "")).regions.pop(region.name, None)
            self._release_locked(region.caller, region.size)
        self._close(region, unlink=True)
        self._gauges()

    def _close(self, region: Region, *, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(os.path.join(self.directory, region.name))
            except FileNotFoundError:  # the client unlinked it first
                pass
        os.close(region.fd)
        region.buffer.release()
        try:
            region.mapping.close()
        except BufferError:  # arrays of a running evaluation still view it; they unmap it when collected
            pass

    def close(self) -> None:
        """Ends every session (the server stops)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self.close_session(session)

    # -- use -------------------------------------------------------------------

    def access(self, caller: str) -> "RegionAccess":
        return RegionAccess(self, caller)

    def _resolve(self, caller: str, name: str) -> Region:
        region = self._regions.get(name)
        if region is None or region.caller != caller:
            raise NotFound(f"No shared-memory region {name[:64]!r} registered by this caller. Expected a region "
                           "registered with RegisterRegion in an open session.", reason="SHM_REGION_NOT_FOUND")
        # A region shrunk under the mapping would fault on access (SIGBUS).
        try:
            size = os.fstat(region.fd).st_size
        except OSError:  # closed since it was looked up: unregistered meanwhile
            size = -1
        if size < 0 or self._regions.get(name) is not region:
            raise NotFound(f"The shared-memory region {name[:64]!r} was unregistered during the call.",
                           reason="SHM_REGION_NOT_FOUND")
        session = self._sessions.get(region.session)
        if session is not None:
            session.used = time.monotonic()  # an evaluation uses the session: not idle
        if size < region.size:
            raise InvalidArgument(f"The shared-memory region {name!r} shrank below its registered "
                                  f"{region.size:,} bytes.", reason="SHM_BAD_SIZE")
        return region

    def stats(self) -> tuple[int, int]:
        """(regions, bytes) registered now."""
        with self._lock:
            return len(self._regions), self._total

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_shared_memory_regions(*self.stats())


class RegionAccess:
    """One call's way into its caller's regions: the resolver ``lossd.wire``
    reads and writes ranges through, counting the bytes served."""

    def __init__(self, regions: SharedMemoryRegions, caller: str):
        self._regions = regions
        self._caller = caller
        self._views: dict[str, memoryview] = {}

    def __call__(self, name: str) -> memoryview:
        # One view per region for the whole call: it (and the arrays made
        # from it) keeps the mapping alive, so a call that has read its
        # inputs also writes its outputs even if the session ends meanwhile.
        view = self._views.get(name)
        if view is None:
            region = self._regions._resolve(self._caller, name)
            try:
                view = memoryview(region.mapping)
            except ValueError:  # closed since it was resolved: unregistered meanwhile
                raise NotFound(f"The shared-memory region {name[:64]!r} was unregistered during the call.",
                               reason="SHM_REGION_NOT_FOUND") from None
            self._views[name] = view
        return view

    def read(self, tensor: tensor_pb2.Tensor, *, field: str, max_elements: Optional[int],
             content=None) -> np.ndarray:
        """``wire.to_numpy`` of a tensor, from a region where it refers to one
        (``content``: its bytes where they were lifted out of the message)."""
        array = wire.to_numpy(tensor, field=field, max_elements=max_elements, regions=self, content=content)
        if tensor.HasField("shared_memory") and self._regions.metrics is not None:
            self._regions.metrics.shared_memory_bytes("read", array.nbytes)
        return array

    def check_output(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> None:
        """Checks, before any work, that the range exists and holds ``nbytes``."""
        available = len(wire.region_range(ref, self, field=field))
        if available < nbytes:
            raise InvalidArgument(f"{field}: shared-memory range too small. Expected at least {nbytes:,} bytes. "
                                  f"Received: byte_size={available:,}.", reason="SHM_OUT_OF_RANGE")

    def write(self, array: np.ndarray, ref: tensor_pb2.SharedMemoryRef, *, field: str) -> tensor_pb2.Tensor:
        tensor = wire.to_region(array, ref, self, field=field)
        if self._regions.metrics is not None:
            self._regions.metrics.shared_memory_bytes("written", tensor.shared_memory.byte_size)
        return tensor
