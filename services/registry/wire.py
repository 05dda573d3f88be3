"""Blob chunks on the wire without protobuf's copies: ReadBlob responses pre-encoded, WriteBlob requests viewed.

A ``ReadBlobResponse`` built from a chunk copies the chunk into the message and serializing it
copies it again, both on the event loop thread that also runs gRPC's sending path. The registry
instead encodes the response's wire bytes (the same bytes ``SerializeToString`` gives: fields in
number order, default values omitted) next to the disk read, and the ReadBlob handler's
serializer hands such bytes to gRPC unchanged (a message still goes through SerializeToString).
Likewise a ``WriteBlobRequest`` is decoded into ``WriteBlobChunk``, whose ``data`` is a view of
the received bytes; any request that is not the plain encoding of the contract's five fields goes
through protobuf's own parser (so malformed requests fail exactly as before). Clients see the
ordinary messages; tests/test_registry_wire.py checks both against protobuf's own encoding.
"""
from __future__ import annotations

from typing import Any

import grpc

from latentwire.registry.v1 import registry_pb2

_PASSTHROUGH_METHODS = ("ReadBlob",)
#: WriteBlobRequest.sha256 longer than this goes through protobuf (and the field bounds of the interceptor).
_MAX_SHA256_FIELD = 64
_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes, as protobuf encodes it
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_read_blob_response(offset: int, data: bytes, size_bytes: int) -> bytes:
    """``ReadBlobResponse(offset=offset, data=data, size_bytes=size_bytes).SerializeToString()``, one copy of data."""
    head = b"\x08" + _varint(offset) if offset else b""
    if data:
        head += b"\x12" + _varint(len(data))
    tail = b"\x18" + _varint(size_bytes) if size_bytes else b""
    return b"".join((head, data, tail))


class WriteBlobChunk:
    """The fields of one WriteBlobRequest, ``data`` a memoryview of the received message (no copy)."""

    __slots__ = ("sha256", "size_bytes", "offset", "data", "finish_write")

    def __init__(self, sha256: str, size_bytes: int, offset: int, data, finish_write: bool):
        self.sha256, self.size_bytes, self.offset, self.data, self.finish_write = (
            sha256, size_bytes, offset, data, finish_write)


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class WriteBlobDecoder:
    """WriteBlob's request deserializer (a bound method of a class carrying WriteBlobRequest's descriptor,
    so the interceptor names the message type in MALFORMED_REQUEST as it does for generated classes)."""

    DESCRIPTOR = registry_pb2.WriteBlobRequest.DESCRIPTOR

    @classmethod
    def FromString(cls, message: bytes):  # noqa: N802 - the name generated deserializers have
        view = memoryview(message)
        sha256, size, offset, data, finish = "", 0, 0, view[0:0], False
        position = 0
        try:
            while position < len(view):
                tag = view[position]
                position += 1
                if tag == 0x0A:  # 1: sha256
                    length, position = _read_varint(view, position)
                    if length > _MAX_SHA256_FIELD or position + length > len(view):
                        raise ValueError("sha256 field too long")
                    sha256 = str(view[position:position + length], "utf-8")
                    position += length
                elif tag == 0x10:  # 2: size_bytes
                    size, position = _read_varint(view, position)
                elif tag == 0x18:  # 3: offset
                    offset, position = _read_varint(view, position)
                elif tag == 0x22:  # 4: data
                    length, position = _read_varint(view, position)
                    if position + length > len(view):
                        raise ValueError("truncated data")
                    data = view[position:position + length]
                    position += length
                elif tag == 0x28:  # 5: finish_write
                    value, position = _read_varint(view, position)
                    finish = value != 0
                else:
                    raise ValueError("not one of the contract's fields")
        except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
            return registry_pb2.WriteBlobRequest.FromString(message)  # protobuf decides (DecodeError when malformed)
        return WriteBlobChunk(sha256, _int64(size), _int64(offset), data, finish)


def _serialize(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _fast(method: str, handler):
    if method in _PASSTHROUGH_METHODS:
        return handler._replace(response_serializer=_serialize)
    if method == "WriteBlob":
        return handler._replace(request_deserializer=WriteBlobDecoder.FromString)
    return handler


class _PassthroughHandlers(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler):
        self._inner = inner

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return _fast(method, handler) if handler is not None else None


class PreEncodedServer:
    """Stands in for the grpc.aio server while the generated ``add_..._to_server`` registers the servicer,
    giving the handlers in ``_PASSTHROUGH_METHODS`` a serializer that passes pre-encoded bytes through."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_PassthroughHandlers(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        if service_name == _SERVICE:
            handlers = {name: _fast(name, handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service_name, handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
