"""Shared-memory regions of clients on the server's host: the one table of
what is registered, by whom, within which bounds.

A client opens a session (``SharedMemoryService``), creates a POSIX
shared-memory object named under the session's own prefix
(``lossd_<random>_``, sent in OpenSessionResponse.name_prefix), registers it
in that session, and names ranges of it in its requests; ``lossd.wire``
checks each range against the region (``region_range``) and this module
reads and writes the bytes (``RegionAccess``).

Safety:

* names: the session's prefix followed by ``[A-Za-z0-9_-]`` (no path
  separators, no newline: the whole name is matched); opened with
  ``O_NOFOLLOW`` and refused unless a regular file owned by the server's own
  user;
* binding: a name can be registered only in the session whose prefix it
  carries, a session only by the caller that opened it, and a request
  resolves only regions its own caller registered. Another caller who learns
  a name can neither register it (so the server never maps, reads, writes
  or unlinks it for them) nor name it in a request;
* no signal from a region the client changes: the server never maps a
  region. It reads the bytes of each request with ``preadv`` into memory of
  its own (counted by admission, as gRPC bytes are; aligned so that
  TensorFlow computes on it without a second copy, ``host_buffer``) and
  writes outputs with ``pwrite`` straight from the result's buffer, so a region shrunk under the server gives a short read and the
  call is refused (``SHM_BAD_SIZE``) instead of a SIGBUS; the check cannot
  race, since it is the read itself. Each read and write uses its own
  duplicate of the region's descriptor, taken under the lock while the
  region is registered, so an unregistration meanwhile cannot make it read
  another file that reused the number;
* bounds before opening: regions and bytes per caller and in total
  (``max_regions``, ``max_bytes``, ``max_total_bytes``), reserved under the
  lock before anything is opened;
* lifetime: a region belongs to one session of one caller; the session ends
  with its gRPC stream (the client closed it, or died and its connection
  dropped), and then every region of it is closed and unlinked.

Named registrations (the Open Inference Protocol's system shared-memory
extension, as ``tritonclient.utils.shared_memory`` uses it) share these
bounds, the reads and writes and the per-caller binding, with three
differences the protocol asks for: the client names the region's object
(its ``key``; any strict-charset name outside lossd's own ``lossd_``
prefix) and the name requests use; a registration lasts until the caller
unregisters it, not as long as a stream; and the server never unlinks the
object, which the client created and destroys. A key one caller registered
cannot be registered by another.

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
import weakref
from typing import Optional

import numpy as np
from lossd import wire
from lossd.v1 import tensor_pb2
from lossd_server.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"
MAX_NAME = 200
NAME_PATTERN = re.compile(rf"{wire.SHM_PREFIX}[A-Za-z0-9_-]{{1,{MAX_NAME - len(wire.SHM_PREFIX)}}}")
"""What every region name fully matches (``fullmatch``: a trailing newline is no match)."""
REGISTRATION_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""What the name of a named registration (the one requests use) fully matches."""
KEY_PATTERN = re.compile(rf"/?([A-Za-z0-9_-]{{1,{MAX_NAME}}})")
"""A named registration's key: a POSIX shared-memory object name, one optional leading slash."""
PREFIX_BYTES = 16  # what RegisterRegion reads back from the region's start
_SESSION_PREFIX_HEX = 16  # random hex digits in a session's name prefix


@dataclasses.dataclass(eq=False)
class Region:
    name: str
    caller: str
    session: str
    size: int
    fd: int  # open while registered; read and written through duplicates (``SharedMemoryRegions.duplicate``)
    base: int = 0  # where the registered range starts in the object (a named registration's offset)
    label: str = ""  # a named registration's name, which requests use; "" for a session's region


@dataclasses.dataclass(eq=False)
class Session:
    id: str  # secret: whoever holds it may register in the session (with its caller's credentials)
    caller: str
    prefix: str  # every region of the session is named under it
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
        self._named: dict[tuple[str, str], Region] = {}  # (caller, name) -> a named registration
        self._reserved: dict[str, list[int]] = {}  # caller -> [regions, bytes], registered or being registered
        self._total = 0

    # -- sessions ------------------------------------------------------------

    def open_session(self, caller: str) -> Session:
        session = Session(secrets.token_hex(16), caller,
                          f"{wire.SHM_PREFIX}{secrets.token_hex(_SESSION_PREFIX_HEX // 2)}_")
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
        """Opens the region ``name`` for the session, after checking that it
        holds ``byte_size`` bytes; returns the region's first bytes."""
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(
                f"Invalid shared-memory region name {name[:64]!r}. Expected {wire.SHM_PREFIX!r} followed by "
                f"letters, digits, '_' or '-', at most {MAX_NAME} characters.", reason="SHM_BAD_NAME")
        if byte_size <= 0:
            raise InvalidArgument(f"byte_size must be positive. Received: {byte_size}.", reason="SHM_BAD_SIZE")
        self._reserve(caller, session_id, name, byte_size)
        try:
            region, prefix = self._open(caller, session_id, name, byte_size)
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
        return prefix

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
            session = self.session(caller, session_id)
            if not name.startswith(session.prefix):
                raise PermissionDenied(
                    f"The shared-memory region {name[:64]!r} is not named under this session's prefix. Expected "
                    f"a name starting with {session.prefix!r} (OpenSessionResponse.name_prefix): a region can be "
                    "registered only in the session it was created for.", reason="SHM_NOT_IN_SESSION")
            if name in self._regions:
                raise AlreadyExists(f"The shared-memory region {name[:64]!r} is registered already.",
                                    reason="SHM_REGION_EXISTS")
            self._reserve_locked(caller, byte_size)

    def _reserve_locked(self, caller: str, byte_size: int) -> None:
        """Counts one more region of ``byte_size`` against the bounds, or refuses it."""
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

    def _open(self, caller: str, session_id: str, name: str, byte_size: int) -> tuple[Region, bytes]:
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
            prefix = os.pread(fd, min(PREFIX_BYTES, byte_size), 0)
        except BaseException:
            os.close(fd)
            raise
        return Region(name, caller, session_id, byte_size, fd), prefix

    def _remove(self, region: Region) -> None:
        with self._lock:
            if region.label:
                if self._named.get((region.caller, region.label)) is not region:
                    return
                del self._named[(region.caller, region.label)]
            else:
                if self._regions.get(region.name) is not region:
                    return
                del self._regions[region.name]
                self._sessions.get(region.session, Session("", "", "")).regions.pop(region.name, None)
            self._release_locked(region.caller, region.size)
        self._close(region, unlink=not region.label)  # a named registration's object is its client's
        self._gauges()

    def _close(self, region: Region, *, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(os.path.join(self.directory, region.name))
            except FileNotFoundError:  # the client unlinked it first
                pass
        os.close(region.fd)  # reads and writes in progress hold duplicates of their own

    def close(self) -> None:
        """Ends every session and named registration (the server stops)."""
        with self._lock:
            sessions = list(self._sessions.values())
            named = list(self._named.values())
        for session in sessions:
            self.close_session(session)
        for region in named:
            self._remove(region)

    # -- named registrations (the Open Inference Protocol's extension) ---------

    def register_named(self, caller: str, name: str, key: str, offset: int, byte_size: int) -> None:
        """Registers ``byte_size`` bytes from ``offset`` of the object ``key``
        under ``name`` for ``caller``, after checking the object holds them."""
        if not REGISTRATION_NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(f"Invalid shared-memory region name {name[:64]!r}. Expected 1 to 128 letters, "
                                  "digits, '_', '.' or '-'.", reason="SHM_BAD_NAME")
        match = KEY_PATTERN.fullmatch(key)
        if match is None or match.group(1).startswith(wire.SHM_PREFIX):
            raise InvalidArgument(
                f"Invalid shared-memory key {key[:64]!r}. Expected a POSIX shared-memory name: an optional '/' "
                f"then letters, digits, '_' or '-', at most {MAX_NAME} characters, not starting with "
                f"{wire.SHM_PREFIX!r} (lossd's own sessions' names).", reason="SHM_BAD_NAME")
        if offset < 0 or byte_size <= 0:
            raise InvalidArgument(f"A region is byte_size > 0 bytes from offset >= 0. Received: offset={offset}, "
                                  f"byte_size={byte_size}.", reason="SHM_BAD_SIZE")
        target = match.group(1)
        with self._lock:
            self._check_named_locked(caller, name, target)
            self._reserve_locked(caller, byte_size)
        try:
            region, _ = self._open(caller, "", target, offset + byte_size)
        except BaseException:
            self._release(caller, byte_size)
            raise
        region.size, region.base, region.label = byte_size, offset, name
        with self._lock:
            try:
                self._check_named_locked(caller, name, target)  # another registration won the race
            except BaseException:
                self._release_locked(caller, byte_size)
                self._close(region, unlink=False)
                raise
            self._named[(caller, name)] = region
        self._gauges()

    def _check_named_locked(self, caller: str, name: str, target: str) -> None:
        if (caller, name) in self._named:
            raise AlreadyExists(f"The shared-memory region {name!r} is registered already. Expected a new name, "
                                "or unregister it first.", reason="SHM_REGION_EXISTS")
        if any(r.name == target and r.caller != caller for r in self._named.values()):
            raise PermissionDenied(f"The shared-memory object {target!r} is registered by another caller. "
                                   "Expected an object of your own.", reason="SHM_REGION_DENIED")

    def unregister_named(self, caller: str, name: str) -> None:
        """Unregisters ``caller``'s registration ``name``, or all of them for
        "" (the object stays: its client destroys it)."""
        with self._lock:
            if name:
                regions = [self._named.get((caller, name))]
                if regions[0] is None:
                    raise self._not_found(name, named=True)
            else:
                regions = [r for (owner, _), r in self._named.items() if owner == caller]
        for region in regions:
            self._remove(region)

    def named(self, caller: str, name: str = "") -> list[Region]:
        """``caller``'s named registrations (just ``name``'s, or all for "")."""
        with self._lock:
            if name:
                region = self._named.get((caller, name))
                if region is None:
                    raise self._not_found(name, named=True)
                return [region]
            return [r for (owner, _), r in sorted(self._named.items()) if owner == caller]

    # -- use -------------------------------------------------------------------

    def access(self, caller: str, *, named: bool = False) -> "RegionAccess":
        """``caller``'s way into its regions: those of its sessions, or
        (``named``) its named registrations."""
        return RegionAccess(self, caller, named=named)

    def _not_found(self, name: str, *, named: bool = False) -> NotFound:
        how = "with SystemSharedMemoryRegister" if named else "with RegisterRegion in an open session"
        return NotFound(f"No shared-memory region {name[:64]!r} registered by this caller. Expected a region "
                        f"registered {how}.", reason="SHM_REGION_NOT_FOUND")

    def _resolve(self, caller: str, name: str, *, named: bool = False) -> Region:
        if named:
            region = self._named.get((caller, name))
            if region is None:
                raise self._not_found(name, named=True)
            return region
        region = self._regions.get(name)
        if region is None or region.caller != caller:
            raise self._not_found(name)
        session = self._sessions.get(region.session)
        if session is not None:
            session.used = time.monotonic()  # an evaluation uses the session: not idle
        return region

    def duplicate(self, region: Region) -> int:
        """A descriptor of its own for one read or write of ``region`` (the
        caller closes it), taken while the region is still registered."""
        with self._lock:
            table, key = (self._named, (region.caller, region.label)) if region.label else (self._regions, region.name)
            if table.get(key) is not region:
                raise NotFound(f"The shared-memory region {region.name[:64]!r} was unregistered during the call.",
                               reason="SHM_REGION_NOT_FOUND")
            return os.dup(region.fd)

    def stats(self) -> tuple[int, int]:
        """(regions, bytes) registered now."""
        with self._lock:
            return len(self._regions) + len(self._named), self._total

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_shared_memory_regions(*self.stats())


TENSOR_ALIGNMENT = 64
"""TensorFlow wraps a numpy array aligned to this many bytes (Eigen's
``EIGEN_MAX_ALIGN_BYTES``) as a tensor without copying it, and copies any
other; numpy's own allocations of a few MB start 16 bytes past a page."""
_HUGE_PAGE = 2 << 20
POOL_MAX_BYTES = 256 << 20
"""Most idle read memory ``host_buffer`` keeps for reuse (two 1e7-float32
pairs' worth); more is unmapped at once."""
POOL_IDLE_SECONDS = 30.0
"""Idle read memory older than this is unmapped at the next read or release."""


class _BufferPool:
    """Anonymous mappings that earlier reads faulted in, kept for the next
    read of a similar size: faulting fresh memory (the kernel zeroing each
    page) cost as much as the copy itself, and several times more on a busy
    host (40 MB: 220-320 ms at load 30, with huge pages or without). A
    mapping comes back when the last array over it (and the tensor wrapping
    it) is collected, so it is never handed out while in use."""

    def __init__(self, max_bytes: int = POOL_MAX_BYTES, idle_seconds: float = POOL_IDLE_SECONDS):
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        # A finalizer may run on any thread, including one inside take():
        # re-entrant, and take() works on a snapshot.
        self._lock = threading.RLock()
        self._idle: list[tuple[float, mmap.mmap]] = []  # (released at, mapping)
        self._bytes = 0

    def take(self, nbytes: int) -> np.ndarray:
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        with self._lock:
            self._expire()
            fits = [entry for entry in list(self._idle) if size <= len(entry[1]) <= 2 * size]
            memory = None
            if fits:
                entry = min(fits, key=lambda e: len(e[1]))
                self._idle.remove(entry)
                self._bytes -= len(entry[1])
                memory = entry[1]
        if memory is None:
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer faults where the kernel allows them
                memory.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(memory, np.uint8)
        weakref.finalize(whole, self._give_back, memory)
        return whole[:nbytes]

    def _give_back(self, memory: mmap.mmap) -> None:
        with self._lock:
            self._expire()
            if self._bytes + len(memory) <= self.max_bytes:
                self._idle.append((time.monotonic(), memory))
                self._bytes += len(memory)
                return
        # Not kept: unmapped once its last export (being collected now) is gone.

    def _expire(self) -> None:
        limit = time.monotonic() - self.idle_seconds
        for entry in [e for e in self._idle if e[0] < limit]:
            self._idle.remove(entry)
            self._bytes -= len(entry[1])


_POOL = _BufferPool()


def host_buffer(nbytes: int) -> np.ndarray:
    """Uninitialised memory of ``nbytes`` for a region's bytes, aligned to
    ``TENSOR_ALIGNMENT``, so that the ``preadv`` into it is the read's only
    copy (TensorFlow computes on these very bytes).

    From 2 MiB on, memory an earlier read faulted in where there is some
    (``_BufferPool``), else an anonymous mapping of its own with transparent
    huge pages asked for (``MADV_HUGEPAGE``; a no-op where the kernel has
    them off)."""
    if nbytes < _HUGE_PAGE:
        raw = np.empty(nbytes + TENSOR_ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % TENSOR_ALIGNMENT
        return raw[start:start + nbytes]
    return _POOL.take(nbytes)


class Extent:
    """A range of a region as ``wire.region_range`` sees it: a length, and
    slicing to a sub-range. It holds no bytes: ``RegionAccess`` reads and
    writes them with ``preadv`` and ``pwrite``."""

    __slots__ = ("region", "offset", "size")

    def __init__(self, region: Region, offset: int, size: int):
        self.region, self.offset, self.size = region, offset, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> "Extent":
        start, stop, step = index.indices(self.size)
        if step != 1:
            raise TypeError("an Extent slices with step 1 only")
        return Extent(self.region, self.offset + start, max(0, stop - start))


def _shrank(region: Region, got: int, wanted: int) -> InvalidArgument:
    return InvalidArgument(
        f"The shared-memory region {region.name[:64]!r} shrank below its registered {region.size:,} bytes during "
        f"the call. Expected {wanted:,} bytes of the range. Received: {got:,}.", reason="SHM_BAD_SIZE")


class RegionAccess:
    """One call's way into its caller's regions: the resolver ``lossd.wire``
    checks ranges through, and the reads and writes of those ranges,
    counting the bytes served."""

    def __init__(self, regions: SharedMemoryRegions, caller: str, *, named: bool = False):
        self._regions = regions
        self._caller = caller
        self._named = named

    def __call__(self, name: str) -> Extent:
        region = self._regions._resolve(self._caller, name, named=self._named)
        return Extent(region, region.base, region.size)

    def read(self, tensor: tensor_pb2.Tensor, *, field: str, max_elements: Optional[int],
             content=None) -> np.ndarray:
        """``wire.to_numpy`` of a tensor; where it refers to a region, its
        bytes are read (copied) from there (``content``: its bytes where they
        were lifted out of the message)."""
        if not tensor.HasField("shared_memory"):
            return wire.to_numpy(tensor, field=field, max_elements=max_elements, content=content)
        if tensor.content:  # wire refuses content and a region together, before resolving the region
            wire.to_numpy(tensor, field=field, max_elements=max_elements, regions=self)
        extent = wire.region_range(tensor.shared_memory, self, field=field)
        # Untouched pages cost nothing: checking the shape against the range
        # on the buffer before reading leaves a refused request free.
        buffer = host_buffer(extent.size)
        array = wire.from_bytes(buffer, tensor.dtype, tensor.shape, field=field, max_elements=max_elements)
        self._transfer(extent, buffer, write=False)
        array.flags.writeable = False  # as the bytes path is
        if self._regions.metrics is not None:
            self._regions.metrics.shared_memory_bytes("read", array.nbytes)
        return array

    def check_output(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> None:
        """Checks, before any work, that the range exists and holds ``nbytes``."""
        available = len(wire.region_range(ref, self, field=field))
        if available < nbytes:
            raise InvalidArgument(f"{field}: shared-memory range too small. Expected at least {nbytes:,} bytes. "
                                  f"Received: byte_size={available:,}.", reason="SHM_OUT_OF_RANGE")

    def write(self, array: np.ndarray, ref: tensor_pb2.SharedMemoryRef, *, field: str) -> tensor_pb2.Tensor:
        """Writes ``array`` (row-major, little-endian) at the start of the range
        and returns the Tensor that refers to the bytes written."""
        enum = wire.dtype_enum(np.asarray(array).dtype, field=field)
        array = np.ascontiguousarray(array, dtype=wire.numpy_dtype(enum, field=field))
        self.check_output(ref, array.nbytes, field=field)
        extent = wire.region_range(ref, self, field=field)
        self._transfer(extent, array.reshape(-1).view(np.uint8), write=True)
        if self._regions.metrics is not None:
            self._regions.metrics.shared_memory_bytes("written", array.nbytes)
        return tensor_pb2.Tensor(dtype=enum, shape=array.shape, shared_memory=tensor_pb2.SharedMemoryRef(
            region=ref.region, offset=ref.offset, byte_size=array.nbytes))

    def _transfer(self, extent: Extent, buffer: np.ndarray, *, write: bool) -> None:
        """Reads the extent into ``buffer`` or writes ``buffer`` at it, with
        the file calls: a region shrunk meanwhile gives a short read (an
        error here), never a signal; a write past its end grows it back
        within the registered size."""
        view = memoryview(buffer).cast("B")
        fd = self._regions.duplicate(extent.region)
        try:
            done, wanted = 0, len(view)
            while done < wanted:
                if write:
                    n = os.pwrite(fd, view[done:], extent.offset + done)
                else:
                    n = os.preadv(fd, [view[done:]], extent.offset + done)
                if n <= 0:
                    raise _shrank(extent.region, done, wanted)
                done += n
        finally:
            os.close(fd)

