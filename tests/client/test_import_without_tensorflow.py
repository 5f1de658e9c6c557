"""The thin client works without TensorFlow or Keras, and checks inputs locally.

``pip install lossd`` installs gRPC, protobuf and numpy only, so ``import
lossd`` must never reach for TensorFlow or Keras. A fresh interpreter with
those imports blocked proves it; this test process has TensorFlow loaded by
other tests, so it cannot.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

import lossd
from lossd import _requests

BLOCKED_CHECK = textwrap.dedent('''
    import sys

    BLOCKED = ("tensorflow", "keras", "tf_keras", "lossd_server")
    attempts = []

    class Block:
        """Refuses (and records) every import of a blocked top-level package."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked: the thin client must not import it")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np

    import lossd
    from lossd import _requests, wire

    arrays = _requests.prepare(np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32),
                               sample_weight=np.ones(4, np.float32))
    assert sorted(arrays) == ["sample_weight", "y_pred", "y_true"], arrays
    spec = wire.spec_from_dict({"name": "huber", "params": {"delta": 2.0}}, params={"reduction_hint": 1})
    assert spec.name == "huber" and dict(spec.params) == {"delta": 2.0, "reduction_hint": 1.0}, spec
    request = _requests.evaluate_request(spec, arrays, "sum", True)
    assert request.y_pred.shape == [4, 3] and request.gradient

    with lossd.Client(sys.argv[1], timeout=5) as client:
        try:
            client.evaluate("huber", np.zeros(3, np.float32), np.zeros(3, np.int32))
        except lossd.LossdError as error:
            assert error.reason == "UNSUPPORTED_DTYPE", error
        else:
            raise AssertionError("integer y_pred was not refused locally")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, f"imported: {loaded}"
    assert not attempts, f"tried to import: {attempts}"
    print("OK", lossd.__version__)
''')


def dead_address() -> str:
    """A loopback address nothing listens on (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


def test_client_imports_and_works_without_tensorflow_or_keras():
    done = subprocess.run([sys.executable, "-c", BLOCKED_CHECK, dead_address()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the thin client needs a blocked package:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip() == f"OK {lossd.__version__}"


def test_the_blocker_works():
    """The check above can fail: importing keras under the blocker is refused."""
    script = BLOCKED_CHECK.split("import numpy as np")[0] + "import keras\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "keras is blocked" in done.stderr


# -- local checks, before anything is sent ------------------------------------------

@pytest.fixture(scope="module")
def offline_client():
    # Nothing listens here: a call that reached the network would fail with
    # UNAVAILABLE (or DEADLINE_EXCEEDED), not with the client's own reasons.
    with lossd.Client(dead_address(), timeout=5) as client:
        yield client


GOOD = np.zeros((4, 3), np.float32)


@pytest.mark.parametrize("kwargs, reason, fragments", [
    ({"y_true": np.array([[1, "a"]], dtype=object)}, "CLIENT", ["y_true", "Received: dtype=object"]),
    ({"y_pred": np.array([[None, 1.0]], dtype=object)}, "CLIENT", ["y_pred", "Received: dtype=object"]),
    ({"y_true": np.zeros((0, 3), np.float32), "y_pred": np.zeros((0, 3), np.float32)}, "CLIENT",
     ["empty tensor", "Expected at least one element", "Received: shape=[0, 3]"]),
    ({"y_pred": np.zeros((4, 0), np.float32)}, "CLIENT", ["y_pred", "empty tensor", "shape=[4, 0]"]),
    ({"sample_weight": np.zeros(0, np.float32)}, "CLIENT", ["sample_weight", "empty tensor"]),
    ({"y_pred": np.ones((4, 3), np.int32)}, "UNSUPPORTED_DTYPE", ["expected a floating dtype", "Received: int32"]),
    ({"y_pred": np.ones((4, 3), np.bool_)}, "UNSUPPORTED_DTYPE", ["Received: bool"]),
    ({"y_true": np.ones((4, 3), np.complex64)}, "UNSUPPORTED_DTYPE", ["y_true", "Received: complex64"]),
    ({"y_true": np.array(["a", "b"])}, "UNSUPPORTED_DTYPE", ["y_true", "Expected one of"]),
    ({"reduction": "average"}, "BAD_REDUCTION", ["Invalid reduction", "Expected one of", "Received: 'average'"]),
    ({"reduction": None}, "BAD_REDUCTION", ["Invalid reduction", "Received: None"]),
    ({"loss": 3}, "BAD_LOSS_SPEC", ["loss must be a name or a dict", "Received: int"]),
    ({"loss": {"nam": "huber"}}, "BAD_LOSS_SPEC", ["Unknown loss keys ['nam']"]),
    ({"params": {"delta": object()}}, "BAD_PARAMETER", ["params.delta", "expected a JSON-like value"]),
    ({"params": {"delta": float("nan")}}, "BAD_PARAMETER", ["params.delta", "expected a finite number"]),
    ({"tensors": {"y_true": GOOD}}, "CLIENT", ["'y_true' is reserved"]),
])
def test_local_checks_refuse_without_contacting_a_server(offline_client, kwargs, reason, fragments):
    args = {"loss": "huber", "y_true": GOOD, "y_pred": GOOD, **kwargs}
    loss, y_true, y_pred = args.pop("loss"), args.pop("y_true"), args.pop("y_pred")
    start = time.perf_counter()
    with pytest.raises(lossd.LossdError) as exc:
        offline_client.evaluate(loss, y_true, y_pred, **args)
    assert time.perf_counter() - start < 1.0
    error = exc.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == reason, error
    for fragment in fragments:
        assert fragment in error.message, f"{fragment!r} not in {error.message!r}"
    assert str(error).startswith(f"INVALID_ARGUMENT {reason}: ")


def test_a_server_that_is_not_there_is_unavailable(offline_client):
    """The control for the tests above: a well-formed call does reach for the network."""
    with pytest.raises(lossd.LossdError) as exc:
        offline_client.evaluate("huber", GOOD, GOOD, timeout=5)
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert exc.value.reason == ""


def test_float128_is_sent_as_float64():
    if not hasattr(np, "float128"):
        pytest.skip("numpy has no float128 on this platform")
    arrays = _requests.prepare(GOOD, GOOD.astype(np.float128))
    assert arrays["y_pred"].dtype == np.float64
