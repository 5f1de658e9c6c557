"""lossd: a thin client for the lossd loss-evaluation and training service.

Imports without TensorFlow: gRPC, protobuf and numpy only.

>>> import lossd
>>> with lossd.Client("localhost:50051") as client:
...     r = client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)
"""

from lossd._client import TLS, Client
from lossd._errors import LossdError
from lossd._requests import EvaluateResult, LossInfo, LossParameter
from lossd._training import Dataset, GenerateProgress, Job, JobEvent, save_image_grid

__version__ = "0.1.0"

__all__ = ["Client", "TLS", "LossdError", "EvaluateResult", "LossInfo", "LossParameter", "Job", "JobEvent", "GenerateProgress", "Dataset",
           "save_image_grid", "__version__"]
