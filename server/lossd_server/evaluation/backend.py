"""Everything TensorFlow-specific lives here: device choice, compilation
(``tf.function`` with shape-polymorphic signatures, optional XLA) and
gradients. The loss code itself goes through ``keras.losses``/``keras.ops``,
so the core could run on another Keras backend by replacing this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

# TensorFlow's C++ start-up chatter is noise in a server log; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# XLA's CPU max and min reductions skip NaN by default ("fast min/max"):
# categorical_hinge of an Inf y_pred would be 0 under XLA where Keras says
# NaN. Read when TensorFlow loads; a flag the operator set is kept.
if "xla_cpu_enable_fast_min_max" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_min_max=false").strip()


@contextlib.contextmanager
def _without_lines(noise: re.Pattern) -> Iterator[None]:
    """Holds back what is written to file descriptor 2 (TensorFlow's C++ log
    writes there, not to ``sys.stderr``) and writes it out again afterwards,
    less the lines that match ``noise``. Everything else, errors included, still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not noise.search(line)]
            if kept:
                os.write(2, b"".join(kept))


# While TensorFlow loads, its C++ log is not set up yet and writes INFO lines
# (oneDNN, "Could not find cuda drivers") whatever TF_CPP_MIN_LOG_LEVEL says.
# Those lines are held back as that setting asks; warnings and errors show.
_EARLY_INFO = re.compile(rb"^(I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called)")

import numpy as np  # noqa: E402

if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() in ("1", "2", "3"):
    with _without_lines(_EARLY_INFO):
        import tensorflow as tf  # noqa: E402
else:
    import tensorflow as tf  # noqa: E402

from lossd_server.config import StartupError  # noqa: E402

log = logging.getLogger(__name__)

# Device nodes through which a process reaches an NVIDIA GPU: the driver's on
# Linux and in containers run with the NVIDIA runtime, /dev/dxg under WSL2.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")

# What TensorFlow's CUDA build logs at ERROR level when it probes for a GPU on
# a machine without a driver. CUDA_VISIBLE_DEVICES does not prevent it (cuInit
# runs first), and TF_CPP_MIN_LOG_LEVEL=3 would hide every real error too.
_NO_DRIVER_NOISE = re.compile(rb"failed call to cuInit")

# Where request tensors are wrapped: they arrive in host memory.
HOST_DEVICE = "/job:localhost/replica:0/task:0/device:CPU:0"


@dataclasses.dataclass(frozen=True)
class Device:
    """Where evaluation runs: a TensorFlow device name and its type."""

    name: str         # "/GPU:0" or "/CPU:0"
    device_type: str  # "GPU" or "CPU"
    physical: str     # e.g. "/physical_device:GPU:0"


def configure_threads(inter_op: Optional[int]) -> None:
    """Sets TensorFlow's inter-op thread pool size; must run before TensorFlow's
    first op (later calls are ignored, as in a test process with several servers).

    A loss graph is a short chain of ops with little to run side by side, and
    between requests an idle pool falls asleep: waking it costs more than a
    small loss takes (measured in bench/RESULTS.md). Intra-op threads, which
    split one large op, stay at TensorFlow's default.
    """
    if inter_op is None:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        log.debug("TensorFlow is already initialised; inter-op threads left as they are")


def gpu_expected(prefer: str = "auto") -> bool:
    """Whether a GPU may be there: ``prefer="gpu"`` asks for one, else a GPU
    device node must exist (none does on a CPU machine or container)."""
    return prefer == "gpu" or any(os.path.exists(node) for node in GPU_DEVICE_NODES)


def physical_gpus(prefer: str = "auto") -> list:
    """TensorFlow's GPUs. The first call probes CUDA; where no GPU is expected
    (``gpu_expected``), the probe's "failed call to cuInit" line is dropped."""
    if gpu_expected(prefer):
        return tf.config.list_physical_devices("GPU")
    with _without_lines(_NO_DRIVER_NOISE):
        return tf.config.list_physical_devices("GPU")


def select_device(prefer: str = "auto") -> Device:
    """Picks the best device: the first GPU when there is one (``prefer="auto"``).

    Turns on memory growth for every GPU, so the server does not take all
    GPU memory at start and training processes can share the card.
    """
    gpus = physical_gpus(prefer)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can only be set before first use
            pass
    if prefer == "cpu" or not gpus:
        if prefer == "gpu":
            raise StartupError("LOSSD_DEVICE=gpu but TensorFlow sees no GPU (set LOSSD_DEVICE or --device to "
                               "auto or cpu)")
        cpu = tf.config.list_physical_devices("CPU")[0]
        return Device("/CPU:0", "CPU", cpu.name)
    return Device("/GPU:0", "GPU", gpus[0].name)


def gpu_memory() -> dict[str, tuple[int, int]]:
    """Bytes in use and peak per GPU, where TensorFlow reports them."""
    out = {}
    for i, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        try:
            info = tf.config.experimental.get_memory_info(f"GPU:{i}")
        except (ValueError, RuntimeError):
            continue
        out[gpu.name] = (int(info["current"]), int(info["peak"]))
    return out


def versions() -> dict[str, str]:
    import keras

    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def signature_shape(shape: Sequence[int]) -> tuple[Optional[int], ...]:
    """The shape a compiled function is traced for: batch-like axes left
    unknown so a new batch size reuses the trace; the last axis of a rank >= 2
    tensor (classes, features) kept, and its other axes of size 1 but the
    first, because Keras reads them statically: to align a trailing axis of
    size 1 (``squeeze_or_expand_to_same_rank``). Left unknown, a sample weight
    of shape (N,) met per-sample values of shape (N, 1) (binary crossentropy
    of (N, 1, 1)) unaligned and broadcast rows against rows: (N, N) values,
    past the bound on their size, where Keras gives (N, 1)."""
    if len(shape) >= 2:
        return (None,) + tuple(1 if d == 1 else None for d in shape[1:-1]) + (int(shape[-1]),)
    return (None,) * len(shape)


# What TensorFlow and Keras raise when a request's inputs do not fit the loss
# (while tracing or while running); anything else is a bug of ours.
INPUT_ERRORS = (tf.errors.InvalidArgumentError, ValueError, TypeError)

# What TensorFlow and numpy raise when an allocation fails: the request asked
# for more memory than the device has free now (not a bug of ours).
MEMORY_ERRORS = (tf.errors.ResourceExhaustedError, MemoryError)

# What a compiled call raises once its Cancellation is cancelled.
CANCELLED = tf.errors.CancelledError


class Cancellation:
    """Stops a running compiled call (``Compiled.__call__(..., cancellation)``)
    from another thread: TensorFlow's cancellation manager, which its
    executor checks between operations, so a long graph (ctc's scans over
    time) stops within one operation of ``cancel`` and frees what it held.
    One operation still runs to its end (a single huge kernel cannot be
    interrupted; the cost limits bound those). Once cancelled it stays
    cancelled: use one per call (or per stream).

    The manager is made when a call first runs with it (``handle``), not
    with the switch: every RPC gets a switch, and most small requests run
    as XLA buckets that never take one, so they pay for no manager."""

    __slots__ = ("_manager", "_cancelled")

    def __init__(self):
        self._manager = None
        self._cancelled = False

    def cancel(self, *_) -> None:
        """Cancels the calls running with it and any later one (gRPC's
        ``context.add_callback`` calls it when the RPC ends)."""
        # The flag first: a manager made after this read sees it (``handle``).
        self._cancelled = True
        manager = self._manager
        if manager is not None:
            manager.start_cancel()

    def handle(self):
        """The TensorFlow cancellation manager's handle, for the C API's
        cancellable execute; made on first use, already cancelled where
        ``cancel`` came first."""
        manager = self._manager
        if manager is None:
            with _MANAGER_LOCK:  # two threads of one stream: one manager
                manager = self._manager
                if manager is None:
                    from tensorflow.python.eager import cancellation

                    manager = self._manager = cancellation.CancellationManager()
            if self._cancelled:  # ``cancel`` ran before the manager existed
                manager.start_cancel()
        return manager._impl

    @property
    def cancelled(self) -> bool:
        return self._cancelled


_MANAGER_LOCK = threading.Lock()


def error_text(exc: BaseException) -> str:
    """The first line of an input error, without TensorFlow's graph context."""
    if isinstance(exc, tf.errors.InvalidArgumentError):
        text = (getattr(exc, "message", "") or str(exc)).strip()
    else:
        text = str(exc).strip()
        if text.startswith("in user code:"):  # a tf.function trace: the cause is the last line
            text = text.splitlines()[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputSpec(NamedTuple):
    """A compiled function's argument: name, dtype name and traced shape.

    A tuple, not a dataclass: specs are built and hashed into the cache key
    on every request, and a tuple hashes several times faster.
    """

    name: str
    dtype: str
    shape: tuple[Optional[int], ...]


# A loss program: takes the named tensors (and optionally sample_weight),
# returns (total, term values, named outputs). Built from keras.losses objects by the core.
Program = Callable[[Mapping[str, tf.Tensor], Optional[tf.Tensor]], tuple[tf.Tensor, list, dict]]


class _DirectCall:
    """Runs a traced function with one call into TensorFlow's C API.

    ``tf.function``'s dispatch, the concrete function's argument binding and
    ``AtomicFunction.call_flat``'s Python (context managers, attribute
    building, output shape bookkeeping) add up to more than a small loss's
    own kernels; so do ``tf.convert_to_tensor``'s conversion registry and
    device lookup for each input. This class builds the call's attributes
    once and, per call, only wraps the numpy inputs as host tensors and
    executes the function: 260 µs down to 120 µs for MSE on 64×10 with its
    gradient, measured in-process (bench/RESULTS.md).

    It uses TensorFlow's private Python bindings (the layer its generated op
    wrappers call). ``make`` returns None when they are missing, and
    ``Compiled`` then falls back to the public concrete function;
    tests/server/evaluation/test_backend.py fails if the fast path is ever lost.
    """

    def __init__(self, concrete, host_device: str):
        from tensorflow.python import pywrap_tfe
        from tensorflow.python.eager import context, core
        from tensorflow.python.framework import ops

        atomic = concrete._inference_function
        # The runtime drops a function once its Python object is collected:
        # holding it keeps the name below callable.
        self._function = atomic
        ctx = context.context()
        ctx.ensure_initialized()
        self._execute = pywrap_tfe.TFE_Py_Execute
        self._execute_cancelable = pywrap_tfe.TFE_Py_ExecuteCancelable
        self._handle = ctx._handle
        self._name = atomic.name.decode() if isinstance(atomic.name, bytes) else atomic.name
        self._num_outputs = len(atomic.function_type.flat_outputs)
        # The same attributes call_flat sends (config and executor type); they
        # are fixed once the context is initialised.
        self._attrs = tuple(x for item in ctx.function_call_options.as_attrs().items() for x in item)
        self._tensor = ops.EagerTensor
        self._host = host_device
        self._status_error = core._NotOkStatusException
        self._to_exception = core._status_to_exception

    @classmethod
    def make(cls, concrete, host_device: str) -> Optional["_DirectCall"]:
        try:
            return cls(concrete, host_device)
        except (ImportError, AttributeError, TypeError) as exc:  # private API moved: use the public path
            log.warning("TensorFlow's direct call path is unavailable (%s); using concrete functions", exc)
            return None

    def __call__(self, arrays: Sequence[np.ndarray], cancellation: Optional[Cancellation] = None):
        # Inputs are wrapped on the host, where the request's bytes already
        # are; the runtime copies them to the device the ops were placed on.
        tensors = [self._tensor(a, self._host, None) for a in arrays]
        try:
            if cancellation is not None:
                return self._execute_cancelable(self._handle, None, self._name, tensors, self._attrs,
                                                cancellation.handle(), self._num_outputs)
            return self._execute(self._handle, None, self._name, tensors, self._attrs, self._num_outputs)
        except self._status_error as exc:
            raise self._to_exception(exc) from None


class Compiled:
    """A loss program compiled once for one input signature.

    Calling it runs one TensorFlow graph that returns the total, each term's
    value, the gradient with respect to ``y_pred`` (when asked for) and the
    program's named ``outputs`` (a stateful loss's updated state).

    The graph is traced once, when the object is built, and each call
    executes it directly (see ``_DirectCall``): ``tf.function``'s per-call
    dispatch alone costs about 200 µs here, more than a small loss itself.
    """

    def __init__(self, program: Program, specs: Sequence[InputSpec], *, has_sample_weight: bool,
                 gradient: bool, device: Device, jit_compile: bool = False,
                 on_trace: Optional[Callable[[], None]] = None, outputs: Sequence[str] = ()):
        self.gradient = gradient
        self.outputs = tuple(outputs)
        output_names = self.outputs
        names = [s.name for s in specs]
        signature = [tf.TensorSpec(s.shape, tf.dtypes.as_dtype(s.dtype), name=s.name) for s in specs]
        on_trace = on_trace or (lambda: None)

        def run(*args):
            on_trace()  # Python side effect: runs once per trace, never per call
            tensors = dict(zip(names, args))
            sample_weight = tensors.pop("sample_weight", None) if has_sample_weight else None
            y_pred = tensors["y_pred"]
            if gradient:
                with tf.GradientTape() as tape:
                    tape.watch(y_pred)
                    total, terms, named = program(tensors, sample_weight)
                grad = tape.gradient(total, y_pred, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            else:
                total, terms, named = program(tensors, sample_weight)
                grad = tf.zeros((0,), dtype=total.dtype)
            # A flat tuple: the fast path below gets the outputs in this order.
            return (total, grad, *terms, *[named[name] for name in output_names])

        function = tf.function(run, input_signature=signature, jit_compile=jit_compile)
        with tf.device(device.name):
            self._concrete = function.get_concrete_function()
        # The graph's size: the evaluator bounds its cache by it, since a
        # program's memory grows with its operations.
        self.ops = len(self._concrete.graph.get_operations())
        self._direct = _DirectCall.make(self._concrete, HOST_DEVICE)
        if jit_compile and all(None not in s.shape for s in specs):
            # XLA compiles on a function's first call, not when it is traced:
            # with every shape known, that call is made here (on zeros), so
            # the compile thread pays it and no request does. An op XLA lacks
            # raises here too.
            self([np.zeros(s.shape, tf.dtypes.as_dtype(s.dtype).as_numpy_dtype) for s in specs])

    def __call__(self, arrays: Sequence[np.ndarray], cancellation: Optional[Cancellation] = None):
        """Runs on numpy arrays (in ``specs`` order); returns numpy results:
        ``(total, term values, gradient or None, {output name: value})``.

        Raises:
            CANCELLED: ``cancellation`` was cancelled before or while it ran
                (on the direct call path; the public fallback cannot be).
        """
        # The ops were placed on the device when the graph was traced; the
        # inputs start on the host and the runtime copies them where needed.
        if self._direct is not None:
            outputs = self._direct(arrays, cancellation)
        else:
            outputs = self._concrete(*[tf.convert_to_tensor(a) for a in arrays])
        total, grad, *rest = outputs
        split = len(rest) - len(self.outputs)
        terms, named = rest[:split], rest[split:]
        return (host_array(total), [host_array(t) for t in terms], host_array(grad) if self.gradient else None,
                {name: host_array(value) for name, value in zip(self.outputs, named)})


def host_array(tensor: tf.Tensor) -> np.ndarray:
    """A result tensor's values as a read-only numpy array that shares the
    tensor's host buffer: ``Tensor.numpy()`` copies it (40 MB for a gradient
    of 1e7 float32), and the answer is written from it once anyway (into the
    response, or into shared memory). Read-only, since the buffer may be one
    the runtime hands out again (a constant output); a tensor on a GPU is
    copied to the host once, as ``numpy()`` does."""
    view = getattr(tensor, "_numpy", None)  # what numpy() returns before its copy (private: may move)
    array = view() if view is not None else tensor.numpy()
    if isinstance(array, np.ndarray):
        array.flags.writeable = False
    return array


def gpu_count() -> int:
    """How many GPUs TensorFlow sees (the training scheduler runs one job per GPU by default)."""
    return len(physical_gpus())


def input_gradient(model, inputs: np.ndarray, output_gradient: np.ndarray, *, softmax: bool = False) -> np.ndarray:
    """The vector-Jacobian product of a Keras model at ``inputs``: the
    gradient with respect to ``inputs`` of ``sum(output_gradient * f(inputs))``,
    ``f`` the model (then a softmax, for a model that outputs logits). Loss
    guidance uses it to carry a loss's gradient with respect to a
    classifier's probabilities back to the image."""
    x = tf.convert_to_tensor(inputs)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x, training=False)
        if softmax:
            out = tf.nn.softmax(out, axis=-1)
        total = tf.reduce_sum(out * tf.convert_to_tensor(output_gradient, dtype=out.dtype))
    return tape.gradient(total, x).numpy()
