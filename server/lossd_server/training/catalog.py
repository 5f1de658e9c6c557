"""The dataset catalog: the datasets a job can name (built-in, uploaded,
``folder:PATH`` under the dataset root), and uploads into it.

Uploads are checked and normalised by ``datasets`` before anything is kept,
then stored as ``<data_dir>/datasets/<name>.npz`` and recorded in the store.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
import threading
from typing import Iterator

from lossd_server.errors import AlreadyExists, InvalidArgument
from lossd_server.training import datasets
from lossd_server.training.store import Store

log = logging.getLogger(__name__)


class DatasetCatalog:
    """Looks up, lists and receives datasets.

    Args:
        settings: ``lossd_server.config.Settings`` (``dataset_root``,
            ``max_upload_bytes``).
        store: Where uploaded datasets are recorded.
        datasets_dir: Where uploaded datasets are kept.
    """

    def __init__(self, settings, store: Store, datasets_dir: pathlib.Path):
        self.settings = settings
        self.store = store
        self.datasets_dir = pathlib.Path(datasets_dir)
        self._saving = threading.Lock()  # the existence check and the save, as one step

    def info(self, ref: str) -> datasets.DatasetInfo:
        """What a job needs to know about a dataset reference; checks it exists.

        Raises:
            InvalidArgument: UNKNOWN_DATASET, or a folder outside the root or
                with bad content.
        """
        if ref in datasets.BUILTIN:
            return datasets.builtin_info(ref)
        if isinstance(ref, str) and ref.startswith(datasets.FOLDER_PREFIX):
            rel = ref[len(datasets.FOLDER_PREFIX):]
            path = datasets.resolve_folder(self.settings.dataset_root, rel)
            x, _, class_names = datasets.parse_folder(path, self.settings.max_upload_bytes)
            return datasets.info_from_arrays(ref, "folder", x, class_names, str(path))
        stored = self.store.get_dataset(ref) if ref else None
        if stored is None:
            raise datasets.DatasetError(
                f"Unknown dataset {str(ref)[:80]!r}. Expected a built-in dataset ({', '.join(datasets.BUILTIN)}), "
                "the name of an uploaded dataset (see ListDatasets) or folder:PATH.",
                reason="UNKNOWN_DATASET", metadata={"dataset": str(ref)[:80]})
        return datasets.DatasetInfo.from_dict(stored)

    def list(self) -> list[datasets.DatasetInfo]:
        """Built-in and uploaded datasets, by name."""
        infos = [datasets.builtin_info(name) for name in datasets.BUILTIN]
        infos += [datasets.DatasetInfo.from_dict(d) for d in self.store.list_datasets()]
        return sorted(infos, key=lambda i: i.name)

    def upload(self, name: str, fmt: str, size_bytes: int, chunks: Iterator[bytes], *,
               replace: bool = False) -> datasets.DatasetInfo:
        """Receives an upload into a temporary file, checks and normalises it,
        then stores it.

        Args:
            replace: Overwrite an uploaded dataset of the same name; without
                it such an upload is refused, before its bytes are read.

        Raises:
            AlreadyExists: DATASET_EXISTS, the name is taken and ``replace``
                is not set.
            InvalidArgument: bad name or format, a size over the limit or
                unlike the header's (UPLOAD_TOO_LARGE, SIZE_MISMATCH), or
                content that fails the checks (BAD_DATASET, CORRUPT_IMAGE...).
        """
        datasets.check_name(name)
        if not replace:
            self._check_free(name)
        if fmt not in datasets.FORMATS:
            raise InvalidArgument(f"Invalid dataset format. Expected one of {list(datasets.FORMATS)}. "
                                  f"Received: {fmt!r}.", reason="BAD_DATASET_FORMAT")
        limit = self.settings.max_upload_bytes
        if size_bytes <= 0 or size_bytes > limit:
            raise InvalidArgument(f"Invalid upload size. Expected 1 to {limit:,} bytes (the server's "
                                  f"max_upload_bytes). Received: size_bytes={size_bytes:,}.",
                                  reason="UPLOAD_TOO_LARGE" if size_bytes > limit else "SIZE_MISMATCH")
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.datasets_dir, prefix=".upload-", suffix=f".{fmt}") as tmp:
            received = 0
            for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise InvalidArgument(f"The upload is larger than its header said. Expected {size_bytes:,} "
                                          f"bytes. Received: more than that.", reason="SIZE_MISMATCH")
                tmp.write(chunk)
            if received != size_bytes:
                raise InvalidArgument(f"The upload ended early. Expected {size_bytes:,} bytes. "
                                      f"Received: {received:,}.", reason="SIZE_MISMATCH")
            tmp.flush()
            if fmt == "npz":
                x, y, class_names = datasets.parse_npz(tmp.name, limit)
            else:
                x, y, class_names = datasets.parse_archive(tmp.name, fmt, limit)
        path = self.datasets_dir / f"{name}.npz"
        with self._saving:
            if not replace:  # again: another upload of this name may have finished meanwhile
                self._check_free(name)
            size = datasets.save_arrays(path, x, y, class_names)
            info = datasets.info_from_arrays(name, "upload", x, class_names, str(path), size)
            self.store.put_dataset(name, info.to_dict())
        log.info("dataset %s uploaded: %d images of %s, %d classes", name, info.examples, info.image_shape,
                 len(class_names))
        return info

    def _check_free(self, name: str) -> None:
        if self.store.get_dataset(name) is not None:
            raise AlreadyExists(f"Dataset {name!r} already exists. Expected a new name, or replace=True "
                                "(`lossd datasets upload --replace`) to overwrite it.",
                                reason="DATASET_EXISTS", metadata={"dataset": name})
