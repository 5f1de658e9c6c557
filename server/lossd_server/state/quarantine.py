"""``<data_dir>/quarantine/``: persisted state the server could not read.

State that cannot be read never stops the server: at open, a damaged SQLite
file (or a directory where the file should be) is moved whole into the
quarantine and a fresh one created, a missing table is created again
(empty), and a malformed row of jobs, events or datasets is copied there as
JSON and removed. ``lossd_state_quarantined_items`` counts what moved.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Iterable

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


class Quarantine:
    """``<data_dir>/quarantine/``: persisted state the server could not read.

    Nothing unreadable is deleted: a damaged file is moved here whole, a
    malformed row is written here as JSON before it leaves its table. Each
    item logs one WARNING line saying what moved and why (no traceback), and
    ``items`` lists them for health and metrics.
    """

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.items: list[str] = []

    def _target(self, name: str) -> pathlib.Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.folder / f"{stamp}-{name}"
        n = 1
        while target.exists():
            n += 1
            target = self.folder / f"{stamp}-{n}-{name}"
        return target

    def move(self, path: pathlib.Path, why: str, *, companions: Iterable[pathlib.Path] = ()) -> pathlib.Path:
        """Moves ``path`` (and the ``companions`` that exist, such as SQLite's
        -wal and -shm files, beside it under the same stamp) here."""
        target = self._target(path.name)
        os.replace(path, target)
        for extra in companions:
            if extra.exists():
                os.replace(extra, target.with_name(target.name + extra.name[len(path.name):]))
        self._note(f"moved {path} to {target}: {why}")
        return target

    def save(self, name: str, data: Any, why: str) -> pathlib.Path:
        """Writes ``data`` as ``<stamp>-<name>.json`` here."""
        target = self._target(f"{name}.json")
        target.write_text(json.dumps(data, indent=2, default=str))
        self._note(f"moved {name} to {target}: {why}")
        return target

    def note(self, line: str) -> None:
        """Records (and logs) something repaired in place, such as a missing table made again."""
        self._note(line)

    def _note(self, line: str) -> None:
        self.items.append(line)
        log.warning("quarantine: %s; the server goes on without it", line)
