"""The lossd wire format, in one module: the client, the CLI, the server and
the training service all encode and decode through it.

It owns:

* the tensor codec (``to_numpy`` / ``from_numpy``): row-major little-endian
  bytes with a dtype enum and a shape, as in Triton's raw contents. Decoding
  never copies (``numpy.frombuffer`` over the message's bytes) and checks the
  claimed shape against the bytes and a size limit *before* any array is
  built, so a hostile shape cannot make the receiver allocate. A tensor
  whose bytes lie in a shared-memory region (``Tensor.shared_memory``)
  decodes through the same function, given a resolver of region names; the
  range is checked against the region here (``region_range``), in one place,
  for the server reading requests and the client reading responses alike;
* the dtype table (``SUPPORTED_DTYPES``, ``FLOAT_DTYPES``);
* reduction names and their enum values (``REDUCTIONS``);
* ``LossSpec`` <-> dict, both ways, and ``google.protobuf.Struct`` <-> dict
  with the checks JSON cannot express (NaN, Inf, integers out of range).

Everything here raises ``WireError`` (a ``ValueError`` with an ``ErrorInfo``
reason) on bad input; the server answers it with INVALID_ARGUMENT and the
client raises it as a ``LossdError``. Imports numpy and protobuf only.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from google.protobuf import struct_pb2

from lossd.v1 import loss_pb2, tensor_pb2

DataType = tensor_pb2.DataType


class WireError(ValueError):
    """A message that cannot be encoded or decoded; ``reason`` is the ErrorInfo reason."""

    def __init__(self, message: str, reason: str = "BAD_TENSOR"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------
# dtypes

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
# bfloat16 comes with ml_dtypes (a TensorFlow dependency); the thin client may
# lack it. Importing it costs about a second, so it is only looked for here
# (find_spec reads no module) and imported when a bfloat16 tensor is first
# met, by ``_bfloat16``: ``import lossd`` and every CLI call stay fast.
_BFLOAT16_AVAILABLE = importlib.util.find_spec("ml_dtypes") is not None

# Short names, as numpy and Keras spell them, for every enum value.
_ENUM_BY_NAME: dict[str, int] = {
    DataType.Name(enum).removeprefix("DATA_TYPE_").lower(): enum
    for enum in DataType.values() if enum != DataType.DATA_TYPE_UNSPECIFIED
}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(sorted(
    name for name, enum in _ENUM_BY_NAME.items()
    if enum in _NUMPY_BY_ENUM or enum == DataType.DATA_TYPE_BFLOAT16 and _BFLOAT16_AVAILABLE))
# The dtypes a loss is computed in (y_pred's): Keras losses are floating-point.
FLOAT_DTYPES: tuple[str, ...] = tuple(name for name in ("float16", "bfloat16", "float32", "float64")
                                      if name in _ENUM_BY_NAME)
# Exact dtype -> enum, the fast path: ``dtype.name`` is rebuilt on each access.
_ENUM_BY_DTYPE: dict[np.dtype, int] = {dt: enum for enum, dt in _NUMPY_BY_ENUM.items()}
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _bfloat16(enum: int) -> Optional[np.dtype]:
    """Adds bfloat16 to the dtype tables the first time it is met (``enum``
    is BFLOAT16 and ml_dtypes is installed) and returns its numpy dtype;
    None for any other enum or without ml_dtypes."""
    if enum != DataType.DATA_TYPE_BFLOAT16 or not _BFLOAT16_AVAILABLE:
        return None
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16)
    _NUMPY_BY_ENUM[enum] = dt
    _ENUM_BY_DTYPE[dt] = enum
    return dt


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy builds the name on every access (about
    4 µs), and a request reads it several times."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = np.dtype(dtype).name
        if len(_DTYPE_NAMES) < 64:  # a handful in practice; never unbounded
            _DTYPE_NAMES[dtype] = name
    return name


def is_float(dtype: np.dtype) -> bool:
    """Whether a numpy dtype is one a loss can be computed in."""
    return dtype_name(dtype) in FLOAT_DTYPES


def enum_name(enum: int) -> str:
    """The short name of a DataType enum value, such as ``float32``."""
    try:
        return DataType.Name(enum).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return f"<unknown {enum}>"


def numpy_dtype(enum: int, *, field: str = "tensor") -> np.dtype:
    """The numpy dtype of a DataType enum value; raises WireError when unsupported."""
    dt = _NUMPY_BY_ENUM.get(enum) or _bfloat16(enum)
    if dt is None:
        raise WireError(
            f"{field}: unsupported dtype. Expected one of {', '.join(SUPPORTED_DTYPES)}. "
            f"Received: {enum_name(enum)}.", reason="UNSUPPORTED_DTYPE")
    return dt


def dtype_enum(dtype: np.dtype, *, field: str = "tensor") -> int:
    """The DataType enum value for a numpy dtype; raises WireError when unsupported."""
    enum = _ENUM_BY_DTYPE.get(dtype)
    if enum is None:
        enum = _ENUM_BY_NAME.get(np.dtype(dtype).name)
        if enum not in _NUMPY_BY_ENUM and _bfloat16(enum) is None:
            enum = None
    if enum is None:
        raise WireError(
            f"{field}: unsupported dtype. Expected one of {', '.join(SUPPORTED_DTYPES)}. "
            f"Received: {np.dtype(dtype).name}.", reason="UNSUPPORTED_DTYPE")
    return enum


# The Open Inference Protocol's (KServe v2) datatype names, for the server's
# OIP front end: the same dtypes under the protocol's spelling.
_OIP_BY_ENUM: dict[int, str] = {
    DataType.DATA_TYPE_FLOAT16: "FP16",
    DataType.DATA_TYPE_BFLOAT16: "BF16",
    DataType.DATA_TYPE_FLOAT32: "FP32",
    DataType.DATA_TYPE_FLOAT64: "FP64",
    DataType.DATA_TYPE_INT8: "INT8",
    DataType.DATA_TYPE_INT16: "INT16",
    DataType.DATA_TYPE_INT32: "INT32",
    DataType.DATA_TYPE_INT64: "INT64",
    DataType.DATA_TYPE_UINT8: "UINT8",
    DataType.DATA_TYPE_BOOL: "BOOL",
}
_ENUM_BY_OIP: dict[str, int] = {name: enum for enum, name in _OIP_BY_ENUM.items()}


def oip_datatype(enum: int) -> str:
    """The Open Inference Protocol's name (``FP32``) of a DataType enum value."""
    return _OIP_BY_ENUM[enum]


def oip_dtype_enum(datatype: str, *, field: str = "tensor") -> int:
    """The DataType enum value of an Open Inference Protocol datatype name;
    raises WireError (UNSUPPORTED_DTYPE) for one lossd does not take
    (``BYTES``, the unsigned types but ``UINT8``)."""
    enum = _ENUM_BY_OIP.get(datatype)
    if enum is None or enum not in _NUMPY_BY_ENUM and _bfloat16(enum) is None:
        supported = [name for e, name in _OIP_BY_ENUM.items() if enum_name(e) in SUPPORTED_DTYPES]
        raise WireError(f"{field}: unsupported datatype. Expected one of {', '.join(supported)}. "
                        f"Received: {datatype[:64]!r}.", reason="UNSUPPORTED_DTYPE")
    return enum


# ---------------------------------------------------------------------------
# Tensors

MAX_RANK = 64
"""Most dimensions a tensor may have: numpy's own limit (NPY_MAXDIMS, 64 in
numpy 2), so a decoded array can always be built. TensorFlow accepts up to
254 dimensions in a shape, but many kernels support far fewer (broadcasting
binary ops stop at 8); those refusals come back from evaluation as
INVALID_ARGUMENT, reason EVALUATION_FAILED."""


_PROTOBUF_SHAPE = type(tensor_pb2.Tensor().shape)


class _IntShape(tuple):
    """A shape whose dimensions are known to be Python ints (``int_shape``)."""

    __slots__ = ()


def int_shape(shape) -> tuple:
    """A tensor's shape as a tuple of Python ints, read once: a protobuf
    shape costs about as much to read again as to check, and a request's
    shape is checked where it is declared and again where it is decoded.
    ``check_shape`` counts such a tuple without converting each dimension
    again. A shape of more than ``MAX_RANK`` dimensions is returned as it
    is, unread, for ``check_shape`` to refuse; so is any shape that is not
    a protobuf message's."""
    if type(shape) is not _PROTOBUF_SHAPE or len(shape) > MAX_RANK:
        return shape
    return _IntShape(shape)


def check_shape(shape, *, field: str, max_elements: Optional[int] = None) -> int:
    """Checks the rank is at most ``MAX_RANK``, dimensions are non-negative
    and the count within the limit; returns the count."""
    if len(shape) > MAX_RANK:
        raise WireError(f"{field}: too many dimensions. Expected a rank of at most {MAX_RANK}. "
                        f"Received: rank {len(shape)}.", reason="BAD_TENSOR")
    # A shape of Python ints (``int_shape``) is counted as it is: other
    # shapes may hold numpy integers, whose product could overflow.
    if type(shape) is _IntShape and (not shape or min(shape) >= 0):
        count = math.prod(shape)
        if max_elements is None or count <= max_elements:
            return count
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise WireError(f"{field}: negative dimension. Expected sizes >= 0. Received: shape={dims}.")
    count = math.prod(dims)  # Python ints: a hostile shape cannot overflow here
    if max_elements is not None and count > max_elements:
        raise WireError(
            f"{field}: too many elements. Expected at most {max_elements:,} elements. "
            f"Received: shape={dims} ({count:,} elements).", reason="TENSOR_TOO_LARGE")
    return count


def to_numpy(tensor: tensor_pb2.Tensor, *, field: str = "tensor", max_elements: Optional[int] = None,
             allow_empty: bool = False, regions: Optional["Regions"] = None, content=None,
             shape=None) -> np.ndarray:
    """Decodes a Tensor message into a read-only numpy array without copying.

    ``content`` is the tensor's bytes where ``parse_lifted`` took them out of
    the message (a view of the received bytes); None reads ``tensor.content``.
    ``shape`` is ``int_shape(tensor.shape)`` where the caller read it
    already; None reads it here.

    A tensor whose bytes lie in shared memory (``shared_memory`` set) is
    read in place from the range ``regions`` resolves, after
    ``region_range`` has checked it.

    Raises:
        WireError: unsupported dtype, negative or oversized shape, content
            length that does not match the shape, an empty tensor, or a
            shared-memory range that is out of bounds or not available.
    """
    if shape is None:
        shape = int_shape(tensor.shape)
    if not tensor.HasField("shared_memory"):
        return from_bytes(tensor.content if content is None else content, tensor.dtype, shape, field=field,
                          max_elements=max_elements, allow_empty=allow_empty)
    ref = tensor.shared_memory
    if tensor.content:
        raise WireError(f"{field}: both content and shared_memory are set. Expected one of them. Received: "
                        f"{len(tensor.content):,} bytes of content and a range of region {ref.region[:64]!r}.")
    array = from_bytes(region_range(ref, regions, field=field), tensor.dtype, shape, field=field,
                       max_elements=max_elements, allow_empty=allow_empty)
    array.flags.writeable = False  # a view of the region: read-only, as the bytes path is
    return array


def from_bytes(content: bytes, dtype: int, shape, *, field: str = "tensor", max_elements: Optional[int] = None,
               allow_empty: bool = False) -> np.ndarray:
    """Decodes raw row-major bytes of a dtype enum and shape (a Tensor's
    fields, or a chunk's slice of one) into a read-only array without copying."""
    dt = numpy_dtype(dtype, field=field)
    count = check_shape(shape, field=field, max_elements=max_elements)
    if count == 0 and not allow_empty:
        raise WireError(
            f"{field}: empty tensor. Expected at least one element. Received: shape={list(shape)}.",
            reason="EMPTY_TENSOR")
    expected = count * dt.itemsize
    if len(content) != expected:
        raise WireError(
            f"{field}: content length does not match the shape. Expected {expected:,} bytes "
            f"(shape {list(shape)} x {dt.itemsize} bytes of {dt.name}). "
            f"Received: {len(content):,} bytes.")
    if count:  # one call where frombuffer then reshape take two: the same view, as writable as the bytes
        return np.ndarray(tuple(shape), dt, content)
    return np.frombuffer(content, dtype=dt, count=count).reshape(tuple(shape))


def _wire_array(array, field: str) -> tuple[int, np.ndarray]:
    """An array-like's dtype enum, and the array as it travels: row-major,
    little-endian (copied only where it is not already)."""
    array = np.asarray(array)
    enum = dtype_enum(array.dtype, field=field)
    dt = _NUMPY_BY_ENUM[enum]
    if array.dtype != dt or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dt)
    return enum, array


def from_numpy(array, *, field: str = "tensor") -> tensor_pb2.Tensor:
    """Encodes an array-like as a Tensor message (row-major, little-endian)."""
    enum, array = _wire_array(array, field)
    return tensor_pb2.Tensor(dtype=enum, shape=array.shape, content=array.tobytes())


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, length: int) -> bytes:
    """The key and length of field ``number`` (wire type 2) holding ``length`` bytes."""
    return _varint(number << 3 | 2) + _varint(length)


def _tensor_parts(array, field: str) -> tuple[bytes, np.ndarray]:
    """A Tensor message as two parts: its dtype, shape and content key, then
    the content itself (the array's bytes, not copied)."""
    enum, array = _wire_array(array, field)
    shape = b"".join(_varint(int(d)) for d in array.shape)
    head = (b"\x08" + _varint(enum) if enum else b"") + (_length_delimited(2, len(shape)) + shape if shape else b"")
    if array.nbytes:
        head += _length_delimited(3, array.nbytes)
    return head, array.reshape(-1).view(np.uint8)


def serialize_with_tensors(message, tensors: Mapping[str, Any] = {}, entries: Mapping[str, Mapping[str, Any]] = {},
                           *, within: Optional[tuple[Any, str]] = None,
                           raw: Mapping[str, Sequence[Any]] = {}) -> bytes:
    """``message`` serialized with ``tensors`` as its Tensor fields and
    ``entries`` as its ``map<string, Tensor>`` fields, encoded by hand so
    that each tensor's bytes are copied once, into the result. ``raw``:
    arrays whose bytes (row-major, little-endian) are the entries of a
    ``repeated bytes`` field, after any ``message`` holds (the Open
    Inference Protocol's ``raw_output_contents``), copied once too.

    With ``within=(outer, field)``, the result is ``outer`` serialized with
    all that as its message field ``field`` (an EvaluateStreamResponse's
    ``response``), still one copy of each tensor.

    Building the Tensor messages and serializing them would copy each
    tensor three times (``tobytes``, into the message, into the serialized
    string). Protobuf parses fields in any order, so the tensor fields are
    written after ``message``'s own serialization; the result parses to the
    message protobuf would build (tested in tests/client/test_wire_encoding.py).
    """
    fields = message.DESCRIPTOR.fields_by_name
    parts: list = [message.SerializeToString()]

    for name, array in tensors.items():
        head, content = _tensor_parts(array, name)
        parts.extend((_length_delimited(fields[name].number, len(head) + content.nbytes), head, content))
    for map_name, items in entries.items():
        for key, array in items.items():
            encoded = key.encode()
            key_field = _length_delimited(1, len(encoded)) + encoded
            head, content = _tensor_parts(array, key)
            value = _length_delimited(2, len(head) + content.nbytes)
            parts.extend((_length_delimited(fields[map_name].number, len(key_field) + len(value) + len(head)
                                            + content.nbytes), key_field, value, head, content))
    for name, arrays in raw.items():
        for array in arrays:
            content = _wire_array(array, name)[1].reshape(-1).view(np.uint8)
            parts.extend((_length_delimited(fields[name].number, content.nbytes), content))
    if within is not None:
        outer, field = within
        length = sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in parts)
        parts[:0] = (outer.SerializeToString(), _length_delimited(outer.DESCRIPTOR.fields_by_name[field].number,
                                                                  length))
    return b"".join(parts)


# ---------------------------------------------------------------------------
# Shared memory

Regions = Callable[[str], memoryview]
"""Resolves a region name to the whole region's bytes (a writable
memoryview); raises for a name its caller may not use."""

SHM_PREFIX = "lossd_"
"""Every shared-memory region lossd uses is named under this prefix."""


def region_range(ref: tensor_pb2.SharedMemoryRef, regions: Optional[Regions], *, field: str = "tensor"
                 ) -> memoryview:
    """The bytes ``ref`` names, after checking that its offset and size lie
    inside the region: the one bound check of every shared-memory read and
    write, on both sides of the wire.

    Raises:
        WireError: ``SHM_UNAVAILABLE`` where no resolver is given,
            ``SHM_OUT_OF_RANGE`` for a range outside the region (and what
            ``regions`` raises for an unknown name).
    """
    if regions is None:
        raise WireError(f"{field}: refers to shared-memory region {ref.region[:64]!r}, but shared memory is not "
                        "available here. Expected the tensor's bytes in content.", reason="SHM_UNAVAILABLE")
    buffer = regions(ref.region)
    size = len(buffer)
    offset, byte_size = int(ref.offset), int(ref.byte_size)
    if offset < 0 or byte_size < 0 or offset > size or byte_size > size - offset:
        raise WireError(f"{field}: shared-memory range out of bounds. Expected 0 <= offset and offset + byte_size "
                        f"<= {size:,} (the size of region {ref.region[:64]!r}). Received: offset={offset:,}, "
                        f"byte_size={byte_size:,}.", reason="SHM_OUT_OF_RANGE")
    return buffer[offset:offset + byte_size]


def to_region(array, ref: tensor_pb2.SharedMemoryRef, regions: Optional[Regions], *, field: str = "tensor"
              ) -> tensor_pb2.Tensor:
    """Writes an array (row-major, little-endian) at the start of the range
    ``ref`` names and returns the Tensor that refers to the bytes written.

    Raises:
        WireError: as ``region_range``, and ``SHM_OUT_OF_RANGE`` when the
            range is smaller than the array.
    """
    enum, array = _wire_array(array, field)
    target = region_range(ref, regions, field=field)
    if array.nbytes > len(target):
        raise WireError(f"{field}: shared-memory range too small. Expected at least {array.nbytes:,} bytes (shape "
                        f"{list(array.shape)} of {array.dtype.name}). Received: byte_size={len(target):,}.",
                        reason="SHM_OUT_OF_RANGE")
    np.frombuffer(target, dtype=np.uint8, count=array.nbytes)[:] = array.reshape(-1).view(np.uint8)
    return tensor_pb2.Tensor(dtype=enum, shape=array.shape, shared_memory=tensor_pb2.SharedMemoryRef(
        region=ref.region, offset=ref.offset, byte_size=array.nbytes))


def _varint_at(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise WireError("Malformed message: a varint is truncated or longer than 10 bytes.", reason="BAD_MESSAGE")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, field start, field end, value start, value end)`` of each
    field in ``buf[pos:end]``; the value is a length-delimited field's payload."""
    while pos < end:
        start = pos
        key, pos = _varint_at(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        value = pos
        if wire_type == 0:
            _, pos = _varint_at(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, value = _varint_at(buf, pos, end)
            pos = value + length
        else:
            raise WireError(f"Malformed message: wire type {wire_type} of field {number} is not supported.",
                            reason="BAD_MESSAGE")
        if pos > end or number == 0:
            raise WireError("Malformed message: a field runs past its end.", reason="BAD_MESSAGE")
        yield number, start, pos, value, pos


def _lift_tensor(buf: memoryview, start: int, end: int, field: str) -> tuple[bytes, Optional[memoryview]]:
    """A Tensor's fields without its content, and its content (a view)."""
    rest, content = [], None
    for number, f_start, f_end, v_start, v_end in _fields(buf, start, end):
        if number == 3:
            if content is not None:
                raise WireError(f"{field}: content appears twice. Expected it once.", reason="BAD_MESSAGE")
            content = buf[v_start:v_end]
        else:
            rest.append(buf[f_start:f_end])
    return b"".join(rest), content


# Below this many bytes a tensor's content is not worth lifting out of its
# message (or writing by hand): protobuf's own C parser and serializer are
# faster for small messages than a field walk in Python (0.6 us against 9 us
# to parse a 64 x 10 request here).
LIFT_MIN_BYTES = 1 << 16


def parse_lifted(raw, message_class, tensor_fields: tuple[str, ...] = (), map_field: Optional[str] = None,
                 min_bytes: int = LIFT_MIN_BYTES, bytes_field: Optional[str] = None):
    """Parses ``raw`` into a ``message_class`` whose Tensor fields (named in
    ``tensor_fields``, and the values of the ``map<string, Tensor>`` field
    ``map_field``) keep their dtype and shape but not contents of at least
    ``min_bytes``: those are returned as views of ``raw``, by field name
    (``tensors[key]`` for the map), for ``to_numpy(..., content=...)``.
    ``bytes_field`` names a ``repeated bytes`` field (the Open Inference
    Protocol's ``raw_input_contents``): when ``raw`` is ``min_bytes`` or
    more, every entry of it is lifted, in order, as a list of views under
    that name, and the message holds none.

    Parsing the message whole would copy each tensor twice (into the message,
    then out of it); this copies none. The message parses from the other
    fields' bytes, so it is what protobuf would build, less the contents
    (tested in tests/client/test_wire_encoding.py).

    Raises:
        WireError: bytes that are not such a message, or a tensor field or
            map key that appears twice.
    """
    if len(raw) < min_bytes:  # no content can be lifted: protobuf parses it faster
        try:
            return message_class.FromString(raw), {}
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a bad UTF-8 string
            raise WireError(f"Malformed message: {exc}", reason="BAD_MESSAGE") from None
    buf = memoryview(raw)
    numbers = {message_class.DESCRIPTOR.fields_by_name[name].number: name for name in tensor_fields}
    map_number = message_class.DESCRIPTOR.fields_by_name[map_field].number if map_field else None
    bytes_number = message_class.DESCRIPTOR.fields_by_name[bytes_field].number if bytes_field else None
    rest: list = []
    contents: dict = {}
    entries: list[memoryview] = []

    def lifted(name: str, start: int, end: int) -> Optional[bytes]:
        head, content = _lift_tensor(buf, start, end, name)
        if content is None or len(content) < min_bytes:
            return None
        if name in contents:
            raise WireError(f"{name} appears twice. Expected it once.", reason="BAD_MESSAGE")
        contents[name] = content
        return head

    for number, f_start, f_end, v_start, v_end in _fields(buf, 0, len(buf)):
        head = None
        if number == bytes_number:
            if _varint_at(buf, f_start, f_end)[0] & 7 != 2:  # its key's wire type: not length-delimited
                raise WireError(f"{bytes_field}: an entry is not bytes.", reason="BAD_MESSAGE")
            entries.append(buf[v_start:v_end])
            continue
        if number in numbers:
            head = lifted(numbers[number], v_start, v_end)
            if head is not None:
                rest.append(_length_delimited(number, len(head)) + head)
        elif number == map_number:
            key, value = None, None
            for entry_number, e_start, e_end, ev_start, ev_end in _fields(buf, v_start, v_end):
                if entry_number == 1:
                    try:
                        key = bytes(buf[ev_start:ev_end]).decode("utf-8")
                    except UnicodeDecodeError:
                        raise WireError(f"{map_field}: a key is not UTF-8.", reason="BAD_MESSAGE") from None
                elif entry_number == 2:
                    value = (ev_start, ev_end)
            if key is not None and value is not None:
                head = lifted(f"{map_field}[{key}]", *value)
                if head is not None:
                    entry = _length_delimited(1, len(key.encode())) + key.encode() + _length_delimited(2, len(head))
                    rest.append(_length_delimited(number, len(entry) + len(head)) + entry + head)
        if head is None:
            rest.append(buf[f_start:f_end])
    # Nothing lifted (a big request of typed contents): the bytes as received, not a joined copy.
    whole = not contents and not entries and isinstance(raw, bytes)
    try:
        message = message_class.FromString(raw if whole else b"".join(rest))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a bad UTF-8 string
        raise WireError(f"Malformed message: {exc}", reason="BAD_MESSAGE") from None
    if bytes_field:
        contents[bytes_field] = entries
    return message, contents


def parse_lifted_within(raw, outer_class, field: str, message_class, tensor_fields: tuple[str, ...] = (),
                        map_field: Optional[str] = None, min_bytes: int = LIFT_MIN_BYTES):
    """``parse_lifted`` for a message nested in the message field ``field``
    of an ``outer_class`` (an EvaluateStreamRequest's ``request``): returns
    the outer message without that field, the inner message without its
    large tensors' contents, and those contents (views of ``raw``).

    Raises:
        WireError: as ``parse_lifted``.
    """
    def whole():
        try:
            outer = outer_class.FromString(bytes(raw))
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a bad UTF-8 string
            raise WireError(f"Malformed message: {exc}", reason="BAD_MESSAGE") from None
        inner = getattr(outer, field) if outer.HasField(field) else None
        outer.ClearField(field)
        return outer, inner, {}

    if len(raw) < min_bytes:  # nothing to lift: protobuf parses it faster
        return whole()
    buf = memoryview(raw)
    number = outer_class.DESCRIPTOR.fields_by_name[field].number
    rest: list = []
    found = None
    for field_number, f_start, f_end, v_start, v_end in _fields(buf, 0, len(buf)):
        if field_number != number:
            rest.append(buf[f_start:f_end])
        elif found is None:
            found = (v_start, v_end)
        else:  # protobuf merges a repeated message field; rare enough to parse whole
            return whole()
    try:
        outer = outer_class.FromString(b"".join(rest))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a bad UTF-8 string
        raise WireError(f"Malformed message: {exc}", reason="BAD_MESSAGE") from None
    if found is None:
        return outer, None, {}
    inner, contents = parse_lifted(buf[found[0]:found[1]], message_class, tensor_fields, map_field, min_bytes)
    return outer, inner, contents


def info(array: np.ndarray, *, field: str = "tensor") -> tensor_pb2.TensorInfo:
    """The TensorInfo (dtype and shape) of an array."""
    return tensor_pb2.TensorInfo(dtype=dtype_enum(array.dtype, field=field), shape=array.shape)


# ---------------------------------------------------------------------------
# Reductions

#: The reduction that leaves the per-sample values unreduced (the loss is a tensor, not a scalar).
REDUCTION_NONE = "none"
#: The sum of the weighted per-sample values.
REDUCTION_SUM = "sum"
#: Their sum over the number of values (Keras's default).
REDUCTION_SUM_OVER_BATCH_SIZE = "sum_over_batch_size"
#: The same as ``sum_over_batch_size`` in Keras 3.
REDUCTION_MEAN = "mean"
#: Their sum over the sum of the sample weights (over the number of values without weights).
REDUCTION_MEAN_WITH_SAMPLE_WEIGHT = "mean_with_sample_weight"
#: Keras's reduction names, in the order of their enum values.
REDUCTIONS: tuple[str, ...] = (REDUCTION_NONE, REDUCTION_SUM, REDUCTION_SUM_OVER_BATCH_SIZE, REDUCTION_MEAN,
                               REDUCTION_MEAN_WITH_SAMPLE_WEIGHT)
DEFAULT_REDUCTION = REDUCTION_SUM_OVER_BATCH_SIZE
_REDUCTION_BY_NAME: dict[str, int] = {
    name: loss_pb2.Reduction.Value(f"REDUCTION_{name.upper()}") for name in REDUCTIONS}
_NAME_BY_REDUCTION: dict[int, str] = {
    **{enum: name for name, enum in _REDUCTION_BY_NAME.items()},
    loss_pb2.REDUCTION_UNSPECIFIED: DEFAULT_REDUCTION,
}


def reduction_enum(name: str, *, field: str = "reduction") -> int:
    """The Reduction enum value of a Keras reduction name."""
    enum = _REDUCTION_BY_NAME.get(name) if isinstance(name, str) else None
    if enum is None:
        raise WireError(f"Invalid {field}. Expected one of {list(REDUCTIONS)}. Received: {name!r}.",
                        reason="BAD_REDUCTION")
    return enum


def reduction_name(enum: int, *, field: str = "reduction") -> str:
    """The Keras name of a Reduction enum value (unspecified: Keras's default)."""
    name = _NAME_BY_REDUCTION.get(enum)
    if name is None:
        raise WireError(f"Invalid {field}. Expected a Reduction value 0-{len(REDUCTIONS)}. Received: {enum}.",
                        reason="BAD_REDUCTION")
    return name


def check_reduction(name: str, *, field: str = "reduction") -> str:
    """Returns a reduction name after checking it is one of ``REDUCTIONS``."""
    reduction_enum(name, field=field)
    return name


# ---------------------------------------------------------------------------
# google.protobuf.Struct <-> dict

# JSON numbers that name an integer must fit in a signed 64-bit integer; a
# Struct carries every number as a double, so larger ones are refused here
# rather than overflowing somewhere deeper.
_INT_LIMIT = 2 ** 63


def _value_to_python(value: struct_pb2.Value, field: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise WireError(f"{field}: expected a finite number. Received: {number}.", reason="BAD_PARAMETER")
        if number.is_integer() and abs(number) >= _INT_LIMIT:
            raise WireError(f"{field}: number out of range. Expected a magnitude below 2^63. "
                            f"Received: {number:g}.", reason="BAD_PARAMETER")
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value, field=field)
    if kind == "list_value":
        return [_value_to_python(v, f"{field}[{i}]") for i, v in enumerate(value.list_value.values)]
    return None  # null_value, or no kind set


def struct_to_dict(struct: struct_pb2.Struct, *, field: str = "params") -> dict[str, Any]:
    """A Struct as a plain dict; refuses NaN, Inf and integers past 2^63 with
    ``BAD_PARAMETER`` (protobuf's own ``MessageToDict`` raises a bare
    ValueError on NaN)."""
    return {key: _value_to_python(value, f"{field}.{key}") for key, value in struct.fields.items()}


def _check_python(value: Any, field: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise WireError(f"{field}: expected a finite number. Received: {value}.", reason="BAD_PARAMETER")
        if abs(value) >= _INT_LIMIT:
            raise WireError(f"{field}: number out of range. Expected a magnitude below 2^63. "
                            f"Received: {value:g}.", reason="BAD_PARAMETER")
        return value
    if isinstance(value, Mapping):
        return {str(k): _check_python(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_check_python(v, f"{field}[{i}]") for i, v in enumerate(value)]
    raise WireError(f"{field}: expected a JSON-like value (number, boolean, string, list, object or null). "
                    f"Received: {type(value).__name__}.", reason="BAD_PARAMETER")


def dict_to_struct(params: Optional[Mapping[str, Any]], *, field: str = "params") -> Optional[struct_pb2.Struct]:
    """A dict of JSON-like values as a Struct (None when empty); refuses what
    ``struct_to_dict`` would refuse on the other side."""
    if not params:
        return None
    if not isinstance(params, Mapping):
        raise WireError(f"{field}: expected a dict. Received: {type(params).__name__}.", reason="BAD_PARAMETER")
    struct = struct_pb2.Struct()
    struct.update(_check_python(params, field))
    return struct


# ---------------------------------------------------------------------------
# LossSpec <-> dict

LossLike = Union[str, Mapping[str, Any], loss_pb2.LossSpec]
_SPEC_KEYS = ("name", "params", "expression", "terms")
_TERM_KEYS = ("label", "loss", "weight", "reduction", "inputs", "name", "params", "expression")


def spec_to_dict(spec: loss_pb2.LossSpec) -> dict[str, Any]:
    """A LossSpec message as the plain dict the server's planner takes.

    The dict has ``name``, ``expression``, ``params`` and, for composites,
    ``terms``: each ``{"label", "loss", "weight", "reduction", "inputs"}`` with
    ``weight`` and ``reduction`` None where the message leaves them unset.
    """
    out: dict[str, Any] = {"name": spec.name, "expression": spec.expression,
                           "params": struct_to_dict(spec.params) if spec.HasField("params") else {}}
    if spec.terms:
        out["terms"] = [{
            "label": t.label,
            "loss": spec_to_dict(t.loss),
            "weight": t.weight if t.HasField("weight") else None,
            "reduction": None if t.reduction == loss_pb2.REDUCTION_UNSPECIFIED
            else reduction_name(t.reduction, field=f"terms[{i}].reduction"),
            "inputs": list(t.inputs),
        } for i, t in enumerate(spec.terms)]
    return out


def spec_from_dict(loss: LossLike, params: Optional[Mapping[str, Any]] = None) -> loss_pb2.LossSpec:
    """Builds a LossSpec from a name, a ``{"name", "params"}`` dict, an
    ``{"expression", "params"}`` dict or a ``{"terms": [...]}`` composite
    (each term ``{"loss": {...}}`` or a flat ``{"name": ...}``, with optional
    ``label``, ``weight``, ``reduction`` and ``inputs``). ``params`` are
    merged into the top-level loss's parameters.
    """
    if isinstance(loss, loss_pb2.LossSpec):
        return loss
    if isinstance(loss, str):
        loss = {"name": loss}
    if not isinstance(loss, Mapping):
        raise WireError(f"loss must be a name or a dict like {{'name': 'huber', 'params': {{...}}}}. "
                        f"Received: {type(loss).__name__}.", reason="BAD_LOSS_SPEC")
    unknown = set(loss) - set(_SPEC_KEYS)
    if unknown:
        raise WireError(f"Unknown loss keys {sorted(unknown)}. Expected {', '.join(_SPEC_KEYS)}.",
                        reason="BAD_LOSS_SPEC")
    spec = loss_pb2.LossSpec(name=loss.get("name") or "", expression=loss.get("expression") or "")
    struct = dict_to_struct({**(loss.get("params") or {}), **(params or {})})
    if struct is not None:
        spec.params.CopyFrom(struct)
    for i, term in enumerate(loss.get("terms") or ()):
        if not isinstance(term, Mapping):
            raise WireError(f"terms[{i}]: expected a dict. Received: {type(term).__name__}.", reason="BAD_LOSS_SPEC")
        unknown = set(term) - set(_TERM_KEYS)
        if unknown:
            raise WireError(f"terms[{i}]: unknown keys {sorted(unknown)}. Expected {', '.join(_TERM_KEYS)}.",
                            reason="BAD_LOSS_SPEC")
        t = spec.terms.add(label=term.get("label") or "")
        inner = term["loss"] if "loss" in term else {k: term[k] for k in ("name", "params", "expression") if k in term}
        t.loss.CopyFrom(spec_from_dict(inner))
        if term.get("weight") is not None:
            t.weight = float(term["weight"])
        if term.get("reduction"):
            t.reduction = reduction_enum(term["reduction"], field=f"terms[{i}].reduction")
        t.inputs.extend(term.get("inputs") or ())
    return spec


# ---------------------------------------------------------------------------
# Monitor windows

def window_label(seconds: float) -> str:
    """A window as Prometheus writes durations (``5m``, ``1h``, ``90s``): the
    server's ``window`` label values and the command line's tables alike."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
