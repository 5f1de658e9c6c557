"""numpy <-> ``lossd.v1.Tensor`` conversion, shared by the client and the server.

Decoding never copies (``numpy.frombuffer`` over the message's bytes) and
checks the claimed shape against the bytes and a size limit *before* any
array is built, so a hostile shape cannot make the receiver allocate.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from lossd.v1 import tensor_pb2

DataType = tensor_pb2.DataType

_NUMPY_BY_ENUM: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_INT16: np.dtype("<i2"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
try:  # bfloat16 comes with ml_dtypes (a TensorFlow dependency); the thin client may lack it.
    import ml_dtypes

    _NUMPY_BY_ENUM[DataType.DATA_TYPE_BFLOAT16] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    pass

_ENUM_BY_NAME = {dt.name: enum for enum, dt in _NUMPY_BY_ENUM.items()}
_ENUM_BY_NAME.update({"float16": DataType.DATA_TYPE_FLOAT16, "float32": DataType.DATA_TYPE_FLOAT32,
                      "float64": DataType.DATA_TYPE_FLOAT64, "int8": DataType.DATA_TYPE_INT8,
                      "int16": DataType.DATA_TYPE_INT16, "int32": DataType.DATA_TYPE_INT32,
                      "int64": DataType.DATA_TYPE_INT64, "uint8": DataType.DATA_TYPE_UINT8,
                      "bool": DataType.DATA_TYPE_BOOL})

SUPPORTED_DTYPES = tuple(sorted(_ENUM_BY_NAME))
# Exact dtype -> enum, the fast path: ``dtype.name`` is rebuilt on each access.
_ENUM_BY_DTYPE: dict[np.dtype, int] = {dt: enum for enum, dt in _NUMPY_BY_ENUM.items()}


class TensorError(ValueError):
    """A tensor cannot be encoded or decoded; ``reason`` is the ErrorInfo reason."""

    def __init__(self, message: str, reason: str = "BAD_TENSOR"):
        super().__init__(message)
        self.reason = reason


def dtype_name(enum: int) -> str:
    """The short name of a DataType enum value, such as ``float32``."""
    try:
        return DataType.Name(enum).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return f"<unknown {enum}>"


def numpy_dtype(enum: int, *, field: str = "tensor") -> np.dtype:
    """The numpy dtype of a DataType enum value; raises TensorError when unsupported."""
    dt = _NUMPY_BY_ENUM.get(enum)
    if dt is None:
        raise TensorError(
            f"{field}: unsupported dtype. Expected one of {', '.join(SUPPORTED_DTYPES)}. "
            f"Received: {dtype_name(enum)}.", reason="UNSUPPORTED_DTYPE")
    return dt


def dtype_enum(dtype: np.dtype, *, field: str = "tensor") -> int:
    """The DataType enum value for a numpy dtype; raises TensorError when unsupported."""
    enum = _ENUM_BY_DTYPE.get(dtype)
    if enum is None:
        enum = _ENUM_BY_NAME.get(np.dtype(dtype).name)
    if enum is None:
        raise TensorError(
            f"{field}: unsupported dtype. Expected one of {', '.join(SUPPORTED_DTYPES)}. "
            f"Received: {np.dtype(dtype).name}.", reason="UNSUPPORTED_DTYPE")
    return enum


def check_shape(shape, *, field: str, max_elements: Optional[int] = None) -> int:
    """Checks dimensions are non-negative and the count within the limit; returns the count."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise TensorError(f"{field}: negative dimension. Expected sizes >= 0. Received: shape={dims}.")
    count = math.prod(dims)  # Python ints: a hostile shape cannot overflow here
    if max_elements is not None and count > max_elements:
        raise TensorError(
            f"{field}: too many elements. Expected at most {max_elements:,} elements. "
            f"Received: shape={dims} ({count:,} elements).", reason="TENSOR_TOO_LARGE")
    return count


def to_numpy(tensor: tensor_pb2.Tensor, *, field: str = "tensor",
             max_elements: Optional[int] = None, allow_empty: bool = False) -> np.ndarray:
    """Decodes a Tensor message into a read-only numpy array without copying.

    Raises:
        TensorError: unsupported dtype, negative or oversized shape, content
            length that does not match the shape, or an empty tensor.
    """
    dt = numpy_dtype(tensor.dtype, field=field)
    count = check_shape(tensor.shape, field=field, max_elements=max_elements)
    if count == 0 and not allow_empty:
        raise TensorError(
            f"{field}: empty tensor. Expected at least one element. Received: shape={list(tensor.shape)}.",
            reason="EMPTY_TENSOR")
    expected = count * dt.itemsize
    if len(tensor.content) != expected:
        raise TensorError(
            f"{field}: content length does not match the shape. Expected {expected:,} bytes "
            f"(shape {list(tensor.shape)} x {dt.itemsize} bytes of {dt.name}). "
            f"Received: {len(tensor.content):,} bytes.")
    array = np.frombuffer(tensor.content, dtype=dt, count=count)
    return array.reshape(tuple(tensor.shape))


def from_numpy(array, *, field: str = "tensor") -> tensor_pb2.Tensor:
    """Encodes an array-like as a Tensor message (row-major, little-endian)."""
    array = np.asarray(array)
    enum = dtype_enum(array.dtype, field=field)
    dt = _NUMPY_BY_ENUM[enum]
    if array.dtype != dt or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dt)
    return tensor_pb2.Tensor(dtype=enum, shape=array.shape, content=array.tobytes())


def info(array: np.ndarray, *, field: str = "tensor") -> tensor_pb2.TensorInfo:
    """The TensorInfo (dtype and shape) of an array."""
    return tensor_pb2.TensorInfo(dtype=dtype_enum(array.dtype, field=field), shape=array.shape)
