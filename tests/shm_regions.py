"""POSIX shared-memory regions made by a test, as a client makes them."""

from __future__ import annotations

import contextlib
import pathlib
from multiprocessing import resource_tracker, shared_memory

SHM = pathlib.Path("/dev/shm")


@contextlib.contextmanager
def region(size: int, name: str | None = None):
    """A POSIX shared-memory region made here, unlinked at the end if still there."""
    memory = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        yield memory
    finally:
        memory.close()
        if (SHM / memory.name).exists():
            memory.unlink()
        else:  # the server unlinked it, as it does when a session ends
            resource_tracker.unregister(memory._name, "shared_memory")
