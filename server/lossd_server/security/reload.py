"""Files that reload without a restart: certificates, keys, the tokens
file, the metrics' basic-auth file. ``Reloader`` is the one reloader all of
them use; ``FileWatch`` is its change detection.

A file counts as changed when its modification time, size or inode differ
from the last load (an atomic replace, as Kubernetes does for mounted
secrets and as ``lossd tokens revoke`` does, gives a new inode). ``force()``
(SIGHUP) makes the next check report a change whatever the files say.

``FileWatch.changed`` stats the files at most once per ``every`` seconds, so
a check made on every call costs a clock read, not a system call: the tokens
file is checked that way on the hot path.

A reload that fails (a half-written file, a key that does not match its
certificate, a malformed line) logs one error line and keeps what was
loaded before; it is not tried again until the files change again.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from typing import Callable, Generic, Iterable, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class SecurityFileError(ValueError):
    """A certificate, key, basic-auth or tokens file that cannot be used; the
    message names the file and the setting, never a secret."""


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


class Reloader(Generic[T]):
    """A value loaded from files (a certificate pair, the metrics' users, the
    tokens), loaded again when the files change or after ``reload()``.

    Args:
        paths: The files; a change of any of them reloads.
        load: Reads them and returns the value; raises one of ``errors`` for
            files that cannot be used.
        what: What the files are, for the log lines (``TLS certificate``).
        errors: What ``load`` raises for files that cannot be used: such a
            reload is logged and the previous value kept. Anything else
            propagates.
        every: Look at the files at most this often (``FileWatch.every``).
        describe: A few words on a loaded value for the log line
            (`` (3 users)``).

    Attributes:
        value: The value loaded last.
        loads: How many values were loaded, the first included (tests and
            logs read it).

    Raises:
        Whatever ``load`` raises at construction; a missing file is reported
        by ``load`` in its own words (it is called, and raises).
    """

    def __init__(self, paths: Iterable[pathlib.Path], load: Callable[[], T], *, what: str,
                 errors: tuple[type[BaseException], ...], every: float = 0.0,
                 describe: Callable[[T], str] = lambda value: ""):
        self.paths = [pathlib.Path(p) for p in paths]
        self.what = what
        self._load, self._errors, self._describe = load, errors, describe
        self._lock = threading.Lock()
        try:
            self._watch = FileWatch(self.paths, every)  # stamped before the load: a change meanwhile is seen
        except OSError:
            load()  # says which file is missing, as the owner words it
            raise
        self.value: T = load()
        self.loads = 1

    def reload(self) -> None:
        """Loads the files again at the next ``refresh``, changed or not
        (SIGHUP). Safe from a signal handler."""
        self._watch.force()

    def refresh(self, wait: bool = True) -> Optional[T]:
        """Loads the files again if they changed; returns the new value, or
        None when the current one stays (unchanged, a file being replaced,
        a load that failed).

        Args:
            wait: Whether to wait for a reload another thread is making;
                False keeps the current value meanwhile (the hot path).
        """
        if not self._watch.due():  # a clock read, no lock
            return None
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            if not self._watch.changed():
                return None
            try:
                value = self._load()
            except self._errors as exc:
                log.error("%s not reloaded, the previous one stays: %s", self.what, exc)
                return None
            self.value = value
            self.loads += 1
            log.info("%s %s reloaded%s", self.what, self.paths[0].name, self._describe(value))
            return value
        finally:
            self._lock.release()

    def current(self, wait: bool = True) -> T:
        """The value, loaded again first if the files changed."""
        self.refresh(wait)
        return self.value
