"""The dataset catalog: the datasets a job can name (built-in, uploaded,
``folder:PATH`` under the dataset root), uploads into it and deletes.

Uploads are received into ``<data_dir>/datasets/.tmp/``, checked and
normalised by ``datasets`` before anything is kept, then stored as
``<data_dir>/datasets/<name>@<token>.npz`` and recorded in the store; the
record is the step that makes an upload (or a replace) visible, so a
failure before it leaves the previous dataset as it was, and a failure
anywhere leaves no file behind. What a crash left in ``.tmp`` is removed at
the next start.

Two server-wide budgets bound what uploads spend, each reserved before it
is spent: memory for decoding (``max_decoding_bytes``) and disk for stored
datasets plus uploads in progress (``max_dataset_bytes``). A token's
``max_upload_bytes`` limit bounds the same disk bytes for that caller alone
(its stored datasets plus its uploads in progress; CALLER_STORAGE_LIMIT).

An uploaded dataset belongs to the caller that stored it. A caller sees,
trains on, replaces and deletes only its own (``Caller.owns``: admins all of
them); another caller's dataset is answered as if it did not exist, except
that its name stays taken (DATASET_EXISTS). Built-in and folder datasets
belong to the operator and every caller may use them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import pathlib
import sqlite3
import tempfile
import threading
from typing import Iterator, Optional

from lossd_server.callers import ANONYMOUS, Caller
from lossd_server.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, disk_full,
                                 disk_full_error, require_free_space)
from lossd_server.observability.logs import audited
from lossd_server.training import datasets
from lossd_server.training.artifacts import artifacts_root
from lossd_server.state.store import CANCELLING, QUEUED, RUNNING, Store

log = logging.getLogger(__name__)


class DatasetCatalog:
    """Looks up, lists, receives and deletes datasets.

    Args:
        settings: ``lossd_server.config.Settings`` (``dataset_root``,
            ``max_upload_bytes``, ``max_decoding_bytes``,
            ``max_dataset_bytes``, ``max_archive_members``).
        store: Where uploaded datasets are recorded (and jobs, to tell
            whether a dataset is in use).
        datasets_dir: Where uploaded datasets are kept.

    Attributes:
        memory: The ``ByteBudget`` of memory for decoding.
        disk: The ``ByteBudget`` of disk for datasets.
    """

    def __init__(self, settings, store: Store, datasets_dir: pathlib.Path):
        self.settings = settings
        self.store = store
        self.datasets_dir = pathlib.Path(datasets_dir)
        self.tmp_dir = self.datasets_dir / datasets.TMP_DIR
        self.memory = datasets.ByteBudget(
            settings.max_decoding_bytes, setting="max_decoding_bytes", what="memory for decoding datasets",
            reason="DECODE_BUDGET_EXHAUSTED", advice="Retry once other uploads have been decoded.")
        self.disk = datasets.ByteBudget(
            settings.max_dataset_bytes, setting="max_dataset_bytes",
            what="disk for datasets (stored ones and uploads in progress)", reason="DATASET_STORAGE_FULL",
            advice="Delete datasets no longer needed (DeleteDataset), or retry once uploads in progress end.",
            spent=store.dataset_bytes)
        # Name checks with the commit of an upload, deletes, and the datasets
        # of jobs being created: each one step under this lock.
        self._lock = threading.Lock()
        self._creating: collections.Counter[str] = collections.Counter()
        self._quotas: dict[str, datasets.ByteBudget] = {}  # per caller name, for tokens with max_upload_bytes
        stored = {d["name"]: pathlib.Path(d.get("path", "")).name for d in store.list_datasets()}
        removed = datasets.sweep(self.datasets_dir, stored)
        if removed:
            log.warning("removed %d file(s) that interrupted uploads left in %s: %s", len(removed),
                        self.datasets_dir, ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))

    def info(self, ref: str, caller: Caller = ANONYMOUS) -> datasets.DatasetInfo:
        """What a job needs to know about a dataset reference; checks it
        exists and that ``caller`` may train on it (by default the server
        itself, an admin).

        Raises:
            InvalidArgument: UNKNOWN_DATASET (also another caller's upload),
                or a folder outside the root or
                with bad content.
            ResourceExhausted: DECODE_BUDGET_EXHAUSTED, a folder that cannot
                be decoded beside the uploads being decoded now.
        """
        if ref in datasets.BUILTIN:
            return datasets.builtin_info(ref)
        if isinstance(ref, str) and ref.startswith(datasets.FOLDER_PREFIX):
            rel = ref[len(datasets.FOLDER_PREFIX):]
            path = datasets.resolve_folder(self.settings.dataset_root, rel)
            with self.memory.reserve() as memory:
                x, _, class_names = datasets.parse_folder(
                    path, self.settings.max_upload_bytes, memory=memory,
                    max_members=self.settings.max_archive_members, where=ref[:200])
            return datasets.info_from_arrays(ref, "folder", x, class_names, str(path))
        stored = self.store.get_dataset(ref) if ref else None
        if stored is None or not caller.owns(stored["owner"]):
            raise datasets.DatasetError(
                f"Unknown dataset {str(ref)[:80]!r}. Expected a built-in dataset ({', '.join(datasets.BUILTIN)}), "
                "the name of an uploaded dataset (see ListDatasets) or folder:PATH.",
                reason="UNKNOWN_DATASET", metadata={"dataset": datasets.printable(str(ref)[:80])})
        return datasets.DatasetInfo.from_dict(stored)

    def list(self, caller: Caller) -> list[datasets.DatasetInfo]:
        """Built-in datasets and the uploaded ones ``caller`` owns, by name."""
        infos = [datasets.builtin_info(name) for name in datasets.BUILTIN]
        infos += [datasets.DatasetInfo.from_dict(d) for d in self.store.list_datasets() if caller.owns(d["owner"])]
        return sorted(infos, key=lambda i: i.name)

    @contextlib.contextmanager
    def using(self, ref: str) -> Iterator[None]:
        """Marks the dataset ``ref`` in use while a job on it is created, so it
        cannot be deleted or replaced between the job's checks and its record."""
        with self._lock:
            self._creating[ref] += 1
        try:
            yield
        finally:
            with self._lock:
                self._creating[ref] -= 1
                if not self._creating[ref]:
                    del self._creating[ref]

    def upload(self, name: str, fmt: str, size_bytes: int, chunks: Iterator[bytes], *, caller: Caller,
               replace: bool = False) -> datasets.DatasetInfo:
        """Receives an upload into a temporary file, checks and normalises it,
        then stores it as ``caller``'s.

        Args:
            caller: Who uploads: the dataset's owner.
            replace: Overwrite an uploaded dataset of the same name that
                ``caller`` owns; without it such an upload is refused, before
                its bytes are read.

        Raises:
            AlreadyExists: DATASET_EXISTS, the name is taken and ``replace``
                is not set, or it is another caller's (never overwritten,
                unless ``caller`` is an admin).
            FailedPrecondition: DATASET_IN_USE, a replace of a dataset that a
                queued or running job trains on.
            InvalidArgument: bad name or format, a size over a limit or
                unlike the header's (UPLOAD_TOO_LARGE, SIZE_MISMATCH,
                TOO_MANY_MEMBERS, IMAGE_TOO_LARGE), or content that fails the
                checks (BAD_DATASET, CORRUPT_IMAGE...).
            ResourceExhausted: DECODE_BUDGET_EXHAUSTED, DATASET_STORAGE_FULL,
                CALLER_STORAGE_LIMIT, DISK_NEARLY_FULL (checked before a
                byte is read) or DISK_FULL; nothing was kept.
        """
        datasets.check_name(name)
        with self._lock:
            self._writable(name, replace, caller)
        if fmt not in datasets.FORMATS:
            raise InvalidArgument(f"Invalid dataset format. Expected one of {list(datasets.FORMATS)}. "
                                  f"Received: {fmt!r}.", reason="BAD_DATASET_FORMAT")
        limit = self.settings.max_upload_bytes
        if size_bytes <= 0 or size_bytes > limit:
            raise InvalidArgument(f"Invalid upload size. Expected 1 to {limit:,} bytes (the server's "
                                  f"max_upload_bytes). Received: size_bytes={size_bytes:,}.",
                                  reason="UPLOAD_TOO_LARGE" if size_bytes > limit else "SIZE_MISMATCH")
        self.require_free_space(f"dataset {name!r}")
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._disk_full(f"dataset {name!r}"))
            disk, memory = stack.enter_context(self.disk.reserve()), stack.enter_context(self.memory.reserve())
            quota = stack.enter_context(self._quota(caller).reserve())
            for budget in (quota, disk):  # before a byte of it is written
                budget.take(size_bytes, f"Receiving dataset {name!r}")
            x, y, class_names = self._receive(name, fmt, size_bytes, chunks, memory)
            stored = datasets.stored_size(x, y, class_names)
            for budget in (quota, disk):
                budget.give_back(size_bytes)  # the received file is gone
                budget.take(stored, f"Storing dataset {name!r}")
            path = self.datasets_dir / datasets.stored_file_name(name)
            size = datasets.save_arrays(path, x, y, class_names, tmp_dir=self.tmp_dir)
            info = datasets.info_from_arrays(name, "upload", x, class_names, str(path), size, owner=caller.name)
            del x, y
            try:
                with self._lock:
                    old = self._writable(name, replace, caller)  # again: the name may have changed hands meanwhile
                    self.store.put_dataset(name, info.to_dict(), owner=caller.name)
            except BaseException:
                self._remove(str(path))
                raise
        if old is not None:
            self._remove(old)
        log.info("dataset %s uploaded: %d images of %s, %d classes", name, info.examples, info.image_shape,
                 len(class_names))
        return info

    def delete(self, name: str, caller: Caller) -> None:
        """Deletes an uploaded dataset ``caller`` owns: its record, then its
        file. An admin's delete of another caller's dataset is audited.

        Raises:
            InvalidArgument: DATASET_NOT_DELETABLE, a built-in or folder dataset.
            NotFound: DATASET_NOT_FOUND, also another caller's dataset
                (unless ``caller`` is an admin).
            FailedPrecondition: DATASET_IN_USE, a queued or running job (or
                one being created) trains on it; the message names the job.
        """
        if name in datasets.BUILTIN or name.startswith(datasets.FOLDER_PREFIX):
            raise InvalidArgument(f"Dataset {name[:80]!r} is {'built in' if name in datasets.BUILTIN else 'a folder'}"
                                  " and cannot be deleted. Expected the name of an uploaded dataset.",
                                  reason="DATASET_NOT_DELETABLE", metadata={"dataset": datasets.printable(name[:80])})
        owner = (self.store.get_dataset(name) or {}).get("owner", caller.name) if name else caller.name
        audit = audited(caller.name, "delete_dataset", f"datasets/{name[:200]}", owner=owner) \
            if owner != caller.name and caller.owns(owner) else contextlib.nullcontext()
        with audit, self._disk_full(f"the deletion of dataset {name[:80]!r}"), self._lock:
            stored = self.store.get_dataset(name) if name else None
            if stored is None or not caller.owns(stored["owner"]):
                raise NotFound(f"Dataset {name[:80]!r} does not exist. Expected the name of an uploaded dataset "
                               "(see ListDatasets).", reason="DATASET_NOT_FOUND",
                               metadata={"dataset": datasets.printable(name[:80])})
            self._check_unused(name, "deleted")
            self.store.delete_dataset(name)
        self._remove(stored.get("path", ""))
        log.info("dataset %s deleted", name)

    def require_free_space(self, what: str) -> None:
        """Refuses ``what`` (DISK_NEARLY_FULL) while the file system of the
        artifacts (jobs and datasets) has less free than ``min_free_disk_bytes``."""
        require_free_space(artifacts_root(self.settings), getattr(self.settings, "min_free_disk_bytes", 0), what)

    # -- helpers -----------------------------------------------------------------

    def _quota(self, caller: Caller) -> datasets.ByteBudget:
        """``caller``'s share of the datasets' disk: its token's
        ``max_upload_bytes``, or no limit."""
        limit = caller.limits.max_upload_bytes
        if limit is None:
            return datasets.ByteBudget(1 << 62, setting="", what="", reason="", advice="")
        with self._lock:
            budget = self._quotas.get(caller.name)
            if budget is None or budget.capacity != int(limit):
                budget = self._quotas[caller.name] = datasets.ByteBudget(
                    int(limit), setting=f"the max_upload_bytes of {caller.name!r}'s token",
                    what=f"disk for {caller.name!r}'s datasets (stored ones and uploads in progress)",
                    reason="CALLER_STORAGE_LIMIT", quota=True,
                    advice="Delete datasets of yours no longer needed (DeleteDataset), or ask for a larger limit.",
                    spent=lambda owner=caller.name: self.store.dataset_bytes(owner))
        return budget

    def _receive(self, name: str, fmt: str, size_bytes: int, chunks: Iterator[bytes], memory):
        """Writes the upload to a temporary file, then parses it; the file is
        removed however this ends."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="upload-", suffix=f".{fmt}") as tmp:
            received = 0
            for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise InvalidArgument(f"The upload is larger than its header said. Expected {size_bytes:,} "
                                          f"bytes. Received: more than that.", reason="SIZE_MISMATCH")
                datasets.write_chunk(tmp, chunk)
            if received != size_bytes:
                raise InvalidArgument(f"The upload ended early. Expected {size_bytes:,} bytes. "
                                      f"Received: {received:,}.", reason="SIZE_MISMATCH")
            tmp.flush()
            limits = dict(memory=memory, max_members=self.settings.max_archive_members, where=name)
            if fmt == "npz":
                return datasets.parse_npz(tmp.name, self.settings.max_upload_bytes, **limits)
            return datasets.parse_archive(tmp.name, fmt, self.settings.max_upload_bytes, **limits)

    def _writable(self, name: str, replace: bool, caller: Caller) -> Optional[str]:
        """Checks that ``caller``'s upload may be stored as ``name`` (call
        under the lock); returns the path of the file it replaces, if any."""
        stored = self.store.get_dataset(name)
        if stored is None:
            return None
        if not caller.owns(stored["owner"]):
            raise AlreadyExists(f"Dataset name {name!r} is taken by another caller's dataset. Expected a new "
                                "name (replace=True overwrites only your own datasets).",
                                reason="DATASET_EXISTS", metadata={"dataset": name})
        if not replace:
            raise AlreadyExists(f"Dataset {name!r} already exists. Expected a new name, or replace=True "
                                "(`lossd datasets upload --replace`) to overwrite it.",
                                reason="DATASET_EXISTS", metadata={"dataset": name})
        self._check_unused(name, "replaced")
        return stored.get("path", "")

    def _check_unused(self, name: str, change: str) -> None:
        """Refuses when a job that has not ended trains on ``name`` (call under the lock)."""
        users = [f"jobs/{job.id}" for job in self.store.jobs_in_states([QUEUED, RUNNING, CANCELLING])
                 if job.spec.get("dataset") == name]
        if users:
            listed = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise FailedPrecondition(
                f"Dataset {name!r} is in use by {listed}, which has not ended. Expected no queued or running job "
                f"on it: it can be {change} once the job ends or is cancelled.", reason="DATASET_IN_USE",
                metadata={"dataset": name, "job": users[0]})
        if self._creating[name]:
            raise FailedPrecondition(
                f"Dataset {name!r} is in use by a job being created. Expected no job on it: retry in a moment.",
                reason="DATASET_IN_USE", metadata={"dataset": name})

    def _remove(self, path: str) -> None:
        """Removes a stored file no record points at any more; a failure is
        logged (and ``datasets.sweep`` retries at the next start)."""
        if not path:
            return
        try:
            pathlib.Path(path).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the dataset file %s (%s)", path, exc.strerror)

    @contextlib.contextmanager
    def _disk_full(self, what: str) -> Iterator[None]:
        """Turns a write that failed for lack of space (a file, or the
        store's database) into RESOURCE_EXHAUSTED (DISK_FULL)."""
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            if disk_full(exc):
                log.warning("%s: the disk is full (%s)", what, exc)
                raise disk_full_error(what) from None
            raise
