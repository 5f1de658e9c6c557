"""Change detection for files that reload without a restart: certificates,
keys, the tokens file, the metrics' basic-auth file.

A file counts as changed when its modification time, size or inode differ
from the last load (an atomic replace, as Kubernetes does for mounted
secrets and as ``lossd tokens revoke`` does, gives a new inode). ``force()``
(SIGHUP) makes the next check report a change whatever the files say.

``FileWatch.changed`` stats the files at most once per ``every`` seconds, so
a check made on every call costs a clock read, not a system call: the tokens
file is checked that way on the hot path.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Iterable


def file_stamp(paths: Iterable[pathlib.Path]) -> tuple:
    """``(mtime_ns, size, inode)`` of each path, in order.

    Raises:
        OSError: a file is missing (for example while it is being replaced).
    """
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, paths))


class FileWatch:
    """Tells when any of ``paths`` changed since the last reported change.

    Not locked: the owner calls ``changed()`` under its own lock, the one it
    also reloads under. ``force()`` only sets two fields, so it is safe from
    a signal handler.

    Raises:
        OSError: a file is missing at construction.
    """

    def __init__(self, paths: Iterable[pathlib.Path], every: float = 0.0):
        self.paths = [pathlib.Path(p) for p in paths]
        self.every = every
        self._stamp = file_stamp(self.paths)
        self._next = time.monotonic() + every
        self._forced = False

    def force(self) -> None:
        """Reports a change at the next ``changed()``, files changed or not."""
        self._forced = True
        self._next = 0.0

    def due(self) -> bool:
        """Whether ``changed()`` would look at the files now (a clock read)."""
        return self._forced or time.monotonic() >= self._next

    def changed(self) -> bool:
        """True once per change (or ``force()``): the caller reloads then.

        A file that is missing is no change: it is likely being replaced, and
        the next check sees the new one. A reload that fails is not retried
        until the files change again (the owner keeps what it had).
        """
        now = time.monotonic()
        if not self._forced and now < self._next:
            return False
        self._next = now + self.every
        try:
            stamp = file_stamp(self.paths)
        except OSError:
            return False
        if stamp == self._stamp and not self._forced:
            return False
        self._stamp, self._forced = stamp, False
        return True
