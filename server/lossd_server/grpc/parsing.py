"""Requests parsed inside the handler: bytes that are not the method's
request message become INVALID_ARGUMENT (``BAD_REQUEST``), not grpcio's
INTERNAL "Exception deserializing request!".

grpcio calls a method's request deserializer before the handler runs, and
answers any exception it raises with INTERNAL, a status that says the server
is at fault. A message that parses but holds a NUL character in any text
(a job's or dataset's name, a display name, a loss name, a parameter) is
refused the same way (``NUL_CHARACTER``): no store keeps such text. ``tolerant`` wraps every method handler of a service so that
its deserializer never raises: it returns a ``Malformed`` marker instead,
and the handler refuses the call with a status that says what was expected
(for a request stream, at the message that does not parse). Evaluate's own
deserializer (``loss_servicer.receive``) does the same for its lifted
tensors.
"""

from __future__ import annotations

from typing import Optional

import grpc
from google.protobuf import message as message_lib
from lossd import wire

from lossd_server.errors import InvalidArgument
from lossd_server.grpc.status import abort


class BadRequest(InvalidArgument):
    """A request message that does not parse (reason ``BAD_REQUEST``)."""


class Malformed:
    """What a tolerant deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: BadRequest):
        self.error = error


def nul_in_text(message, prefix: str = "") -> Optional[tuple[str, str]]:
    """The first string of ``message`` (any field, list, map key or value,
    nested message or Struct) that holds a NUL character, as ``(field path,
    value)``; None when there is none. No store can keep such a name:
    PostgreSQL refuses NUL in text and in JSON."""
    for fd, value in message.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(key, str) and "\0" in key:
                    return f"{path} (a key)", key
                found = _nul_in_item(item, f"{path}[{key!r}]")
                if found:
                    return found
        elif fd.is_repeated:
            for i, item in enumerate(value):
                found = _nul_in_item(item, f"{path}[{i}]")
                if found:
                    return found
        else:
            found = _nul_in_item(value, path)
            if found:
                return found
    return None


def _nul_in_item(item, path: str) -> Optional[tuple[str, str]]:
    if isinstance(item, str):
        return (path, item) if "\0" in item else None
    if isinstance(item, message_lib.Message):
        return nul_in_text(item, f"{path}.")
    return None


class Lifted:
    """A request whose ``repeated bytes`` field's entries were lifted out of
    it as views of the received bytes (``wire.parse_lifted``), not copied:
    ``message`` without them, and ``entries``, or None where the request was
    small enough for protobuf to parse whole (the message holds them then)."""

    __slots__ = ("message", "entries")

    def __init__(self, message, entries: Optional[list] = None):
        self.message, self.entries = message, entries


def serialized(response) -> bytes:
    """A response serializer that passes bytes already serialized through."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def lifted_unary(behavior, message_class, bytes_field: str) -> grpc.RpcMethodHandler:
    """A unary method handler whose request arrives as ``Lifted`` (the
    entries of ``bytes_field`` lifted out), parsed inside the handler as
    ``tolerant`` parses, and whose answer may be bytes already serialized."""
    def deserialize(raw):
        message, contents = wire.parse_lifted(raw, message_class, bytes_field=bytes_field)
        return Lifted(message, contents.get(bytes_field))

    return grpc.unary_unary_rpc_method_handler(
        _unary(behavior), request_deserializer=_deserializer(deserialize, message_class.DESCRIPTOR.name),
        response_serializer=serialized)


def _deserializer(deserialize, message_name: str):
    def parse(raw: bytes):
        try:
            message = deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, and others for odd bytes
            return Malformed(BadRequest(
                f"The request is not a valid {message_name} message ({type(exc).__name__}). Expected the "
                f"serialized {message_name}. Received: {len(raw):,} bytes that do not parse.",
                reason="BAD_REQUEST"))
        found = nul_in_text(message.message if isinstance(message, Lifted) else message)
        if found is not None:
            path, value = found
            return Malformed(BadRequest(
                f"{path}: a NUL character (\\x00) at position {value.index(chr(0))}. Expected text without NUL "
                f"characters. Received: {value[:64]!r}.", reason="NUL_CHARACTER"))
        return message
    return parse


def _checked_stream(requests):
    # Raised inside the handler's own loop: its ``handle_errors`` makes the
    # status, as for any other refusal of a message of the stream.
    for request in requests:
        if isinstance(request, Malformed):
            raise request.error
        yield request


def _unary(behavior):
    def handle(request, context):
        if isinstance(request, Malformed):
            abort(context, request.error)
        return behavior(request, context)
    return handle


def _stream_unary(behavior):
    def handle(requests, context):
        try:
            return behavior(_checked_stream(requests), context)
        except BadRequest as error:  # a handler without handle_errors
            abort(context, error)
    return handle


def _stream_stream(behavior):
    def handle(requests, context):
        try:
            yield from behavior(_checked_stream(requests), context)
        except BadRequest as error:  # a handler without handle_errors
            abort(context, error)
    return handle


def tolerant(handler: grpc.RpcMethodHandler, message_name: str) -> grpc.RpcMethodHandler:
    """The same method handler, with a request deserializer that cannot make
    grpcio answer INTERNAL (``message_name`` names the request message in
    the refusal)."""
    if handler.request_deserializer is None:  # bytes in, bytes out: nothing to parse
        return handler
    parse = _deserializer(handler.request_deserializer, message_name)
    options = {"request_deserializer": parse, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_stream_stream(handler.stream_stream), **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_stream_unary(handler.stream_unary), **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_unary(handler.unary_stream), **options)
    return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **options)


class _Collected:
    """Stands in for a server to collect the method handlers a generated
    ``add_*_to_server`` function makes."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def handlers_of(add_to_server, servicer, service_descriptor) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The service's full name and its method handlers, as the generated
    ``add_<Service>Servicer_to_server`` makes them, each made ``tolerant``."""
    made = _Collected()
    add_to_server(servicer, made)
    methods = {m.name: m.input_type.name for m in service_descriptor.methods}
    return made.service, {name: tolerant(handler, methods[name]) for name, handler in made.handlers.items()}


def register(server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Adds a service's handlers to ``server``, as the generated code does."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_tolerant(add_to_server, servicer, service_descriptor, server) -> None:
    """``add_<Service>Servicer_to_server(servicer, server)`` with every
    method's request parsed inside the handler (``tolerant``)."""
    register(server, *handlers_of(add_to_server, servicer, service_descriptor))
