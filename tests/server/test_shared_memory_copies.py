"""Shared memory moves each tensor once per direction: the server reads a
region's bytes with ``preadv`` into memory that TensorFlow then computes on
without copying it (aligned: ``host_buffer``), and writes a result with
``pwrite`` from the very buffer TensorFlow produced (``backend.host_array``).
Against real POSIX shared memory and real TensorFlow; a truncated region
still gives SHM_BAD_SIZE on both kinds of buffer, never a signal."""

from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402
from tests.shm_regions import region  # noqa: E402

from lossd.v1 import tensor_pb2  # noqa: E402
from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.shared_memory import TENSOR_ALIGNMENT, SharedMemoryRegions  # noqa: E402

if not pathlib.Path("/dev/shm").is_dir():  # pragma: no cover - Linux only
    pytest.skip("POSIX shared memory under /dev/shm is Linux only", allow_module_level=True)

CALLER = "alice"


@contextlib.contextmanager
def registered(size: int):
    """(RegionAccess of CALLER, the region's SharedMemory) for a region of ``size`` bytes."""
    regions = SharedMemoryRegions(max_regions=4, max_bytes=1 << 30, max_total_bytes=1 << 30)
    session = regions.open_session(CALLER)
    with region(size, f"{session.prefix}copies") as memory:
        regions.register(CALLER, session.id, memory.name, size)
        try:
            yield regions.access(CALLER), memory
        finally:
            regions.close_session(session)


def tensor(name: str, offset: int, shape, dtype=tensor_pb2.DATA_TYPE_FLOAT32) -> tensor_pb2.Tensor:
    nbytes = int(np.prod(shape)) * 4
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, shared_memory=tensor_pb2.SharedMemoryRef(
        region=name, offset=offset, byte_size=nbytes))


def wrapped_without_copy(array: np.ndarray) -> bool:
    """Whether TensorFlow wraps ``array`` as a host tensor (as ``backend``'s
    direct call does) on the same bytes."""
    from tensorflow.python.eager import context
    from tensorflow.python.framework import ops

    context.context().ensure_initialized()
    wrapped = ops.EagerTensor(array, backend.HOST_DEVICE, None)
    return wrapped._numpy().ctypes.data == array.ctypes.data


# Below and above host_buffer's 2 MiB switch to a mapping of its own; odd
# offsets, so the region's own alignment is no help.
@pytest.mark.parametrize("rows", [1000, 300_000])
@pytest.mark.parametrize("offset", [0, 4, 68])
def test_a_read_is_one_copy_that_tensorflow_computes_on(rows, offset):
    values = np.random.default_rng(rows + offset).normal(size=(rows, 4)).astype(np.float32)
    with registered(offset + values.nbytes) as (access, memory):
        memory.buf[offset:offset + values.nbytes] = values.tobytes()
        array = access.read(tensor(memory.name, offset, values.shape), field="y_pred", max_elements=None)
        np.testing.assert_array_equal(array, values)
        assert not array.flags.writeable
        assert array.ctypes.data % TENSOR_ALIGNMENT == 0
        assert wrapped_without_copy(array)
        assert not np.shares_memory(array, np.frombuffer(memory.buf, np.uint8))  # the server's own memory
        del array


@pytest.mark.parametrize("rows", [1000, 300_000])
def test_a_region_truncated_before_the_read_is_bad_size(rows):
    with registered(rows * 16) as (access, memory):
        os.truncate(f"/dev/shm/{memory.name}", 64)
        with pytest.raises(InvalidArgument) as refused:
            access.read(tensor(memory.name, 0, (rows, 4)), field="y_pred", max_elements=None)
        assert refused.value.reason == "SHM_BAD_SIZE"


def test_results_share_the_tensors_buffer_and_are_read_only():
    result = tf.random.normal([1000, 4]) * 2.0
    array = backend.host_array(result)
    assert array.ctypes.data == result._numpy().ctypes.data  # no copy
    assert not array.flags.writeable  # the runtime's buffer: never changed through it
    np.testing.assert_array_equal(array, result.numpy())


def test_a_compiled_gradient_is_written_to_the_region_from_its_own_buffer():
    def program(tensors, sample_weight):
        value = keras.losses.MeanSquaredError()(tensors["y_true"], tensors["y_pred"])
        return value, [value], {}

    specs = [backend.InputSpec("y_pred", "float32", (None, 4)), backend.InputSpec("y_true", "float32", (None, 4))]
    compiled = backend.Compiled(program, specs, has_sample_weight=False, gradient=True,
                                device=backend.select_device("cpu"))
    rng = np.random.default_rng(5)
    y_pred, y_true = rng.normal(size=(300_000, 4)).astype(np.float32), rng.normal(size=(300_000, 4)).astype(np.float32)
    _, _, grad, _ = compiled([y_pred, y_true])
    assert not grad.flags.writeable  # host_array's view, not numpy()'s copy
    _, keras_grad = value_and_gradient(lambda t, p: keras.losses.MeanSquaredError()(t, p), y_true, y_pred)
    np.testing.assert_allclose(grad, keras_grad, rtol=1e-6)
    with registered(grad.nbytes) as (access, memory):
        out = access.write(grad, tensor_pb2.SharedMemoryRef(region=memory.name, offset=0, byte_size=grad.nbytes),
                           field="gradient_output")
        assert list(out.shape) == list(grad.shape)
        np.testing.assert_array_equal(np.frombuffer(memory.buf, np.float32, grad.size).reshape(grad.shape), grad)


def test_read_memory_is_reused_only_once_released():
    rows = 300_000  # 4.8 MB a tensor: the pooled size
    first_values = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    with registered(2 * first_values.nbytes) as (access, memory):
        memory.buf[:first_values.nbytes] = first_values.tobytes()
        memory.buf[first_values.nbytes:] = (-first_values).tobytes()
        first = access.read(tensor(memory.name, 0, (rows, 4)), field="y_true", max_elements=None)
        second = access.read(tensor(memory.name, first_values.nbytes, (rows, 4)), field="y_pred",
                             max_elements=None)
        assert not np.shares_memory(first, second)  # both alive: two mappings
        np.testing.assert_array_equal(first, first_values)
        address = first.ctypes.data
        del first
        again = access.read(tensor(memory.name, first_values.nbytes, (rows, 4)), field="y_pred",
                            max_elements=None)
        assert again.ctypes.data == address  # the released mapping, faulted in already
        np.testing.assert_array_equal(again, -first_values)  # and every byte of it read anew
        np.testing.assert_array_equal(second, -first_values)  # the live one untouched
        del second, again
