"""lossd: a thin client for the lossd loss-evaluation and training service.

Imports without TensorFlow: gRPC, protobuf and numpy only.

>>> import lossd
>>> with lossd.Client("localhost:50051") as client:
...     r = client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)

The names below are loaded on first use (PEP 562), so ``import lossd``
imports neither gRPC nor numpy. That lets the ``lossd`` command set
``GRPC_VERBOSITY`` before gRPC's C core reads it (``lossd.cli``) and keeps
the command's start-up short.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Client": "lossd._client", "TLS": "lossd._client",
    "LossdError": "lossd._errors",
    "EvaluateResult": "lossd._requests", "LossInfo": "lossd._requests", "LossParameter": "lossd._requests",
    "Dataset": "lossd._jobs", "GenerateProgress": "lossd._jobs", "Job": "lossd._jobs",
    "JobEvent": "lossd._jobs", "save_image_grid": "lossd._images",
}

__all__ = ["Client", "TLS", "LossdError", "EvaluateResult", "LossInfo", "LossParameter", "Job", "JobEvent", "GenerateProgress", "Dataset",
           "save_image_grid", "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs read; at run time __getattr__ loads them
    from lossd._client import TLS, Client
    from lossd._errors import LossdError
    from lossd._requests import EvaluateResult, LossInfo, LossParameter
    from lossd._images import save_image_grid
    from lossd._jobs import Dataset, GenerateProgress, Job, JobEvent


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        # lossd.wire, lossd.aio, lossd._shm ...: a submodule, as if it had been imported
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'lossd' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
