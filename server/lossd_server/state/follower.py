"""``Follower``: how a replica learns what other replicas changed in the
shared store, by polling it (one ``Store.look`` query per interval)."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from lossd_server.errors import Unavailable
from lossd_server.state.store import Look, Store

log = logging.getLogger(__name__)


class Follower:
    """Polls a shared store for what other replicas changed: one ``look``
    (one query) every ``interval`` seconds on a thread of its own, handed to
    every listener (the registered losses, the training scheduler). A look
    or listener that fails is tried again at the next interval and logged
    once per run of failures; an unreachable database is left to the
    store, which logs each outage once."""

    def __init__(self, store: Store, interval: float):
        self.store = store
        self.interval = interval
        self._listeners: list[Callable[[Look], None]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def listen(self, listener: Callable[[Look], None]) -> None:
        """Calls ``listener(look)`` after every successful look."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Starts looking, the first look one interval from now."""
        self._thread = threading.Thread(target=self._follow, name="store-follower", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        failing: set = set()  # the look (None) and the listeners whose last try failed: logged once
        while not self._stop.wait(self.interval):
            for step in (None, *self._listeners):
                try:
                    if step is None:
                        look = self.store.look()
                    else:
                        step(look)
                    failing.discard(step)
                except Exception as exc:  # noqa: BLE001 - the next look may work
                    # An unreachable database is logged once per outage by the store itself.
                    if step not in failing and not isinstance(exc, Unavailable):
                        log.warning("could not %s: %s", "look for the changes of other replicas in the shared "
                                    "store" if step is None else f"follow them ({step.__qualname__})", exc)
                    failing.add(step)
                    if step is None:
                        break

    def stop(self) -> None:
        """Stops looking; returns once a look under way has ended (5 s at most)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
