"""Server interceptors shared by every service.

- ErrorInterceptor: the one place that maps domain errors to status codes with google.rpc.Status details.
  It also answers request bytes that do not parse as the method's request message (corrupt wire data,
  invalid UTF-8 in a proto3 string field) with INVALID_ARGUMENT (reason MALFORMED_REQUEST): grpc.aio
  itself would run the deserializer outside any handler and answer UNKNOWN naming protobuf's exception
  class (unary requests), or raise it inside the handler (request streams).
- DrainInterceptor: counts in-flight calls so a graceful shutdown can refuse new work with a clear
  UNAVAILABLE (reason SHUTTING_DOWN) and know when the running calls have finished; when the grace
  period runs out, running jobs are cancelled at their next step instead of being cut mid-step.

Both wrap unary calls, server streams (async generators, or coroutines calling context.write()
as grpc's own Health/Watch does), client streams and bidi streams written as async generators
(ControlNet's ComputeResiduals); other bidi handlers (reflection) pass through.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, AsyncContextManager, Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import field_bounds, interrupt
from .errors import ERROR_DOMAIN, Internal, InvalidArgument, LatentwireError, Unavailable, Unimplemented, \
    sanitize_message, sanitize_metadata

log = logging.getLogger(__name__)

Guard = Callable[[str, grpc.aio.ServicerContext], AsyncContextManager[None]]


def to_status(error: LatentwireError) -> grpc.Status:
    """Build the rich status (code, message, ErrorInfo detail) for a domain error.

    The message and the metadata values are bounded and scrubbed of heap addresses, object reprs and
    absolute paths here, whatever raised them: a status travels in trailers (8 KiB by default), and an
    error that echoed a whole large input would reach the caller as a metadata-size RESOURCE_EXHAUSTED.
    """
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN,
                                       metadata=sanitize_metadata(error.metadata))
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if getattr(error, "retry_after_s", None) is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        retry_detail = any_pb2.Any()
        retry_detail.Pack(retry)
        details.append(retry_detail)
    status = status_pb2.Status(code=error.code.value[0], message=sanitize_message(error.message), details=details)
    return rpc_status.to_status(status)


class MalformedRequest:
    """What the request deserializer hands on instead of a message when the bytes do not parse.

    grpc.aio runs a handler's ``request_deserializer`` before the handler (unary requests), so an
    exception there never reaches an interceptor's wrapper: it becomes UNKNOWN with protobuf's class
    name in the message. The deserializer ``refuse_malformed`` installs returns this instead, and the
    wrapped handler refuses it with INVALID_ARGUMENT. A handler that reads a request stream with
    ``context.read()`` (none in latentwire does) would see it as it is.
    """

    __slots__ = ("message_type", "refusal")

    def __init__(self, message_type: str, refusal: InvalidArgument | None = None):
        #: Full name of the request message the bytes should have been (``latentwire.vae.v1.DecodeRequest``).
        self.message_type = message_type
        #: The answer when the message parsed but a field is past its bound (field_bounds); None: it did not parse.
        self.refusal = refusal

    def error(self) -> InvalidArgument:
        """The INVALID_ARGUMENT answer (reason MALFORMED_REQUEST, or the field bound that was passed)."""
        if self.refusal is not None:
            return self.refusal
        return InvalidArgument(
            f"the request is not a valid {self.message_type} message (invalid UTF-8 in a string field, or corrupt "
            "bytes?); send a message serialized from the service's .proto files", reason="MALFORMED_REQUEST",
            metadata={"message_type": self.message_type})


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    """The full proto name behind a generated ``FooRequest.FromString`` deserializer (or a generic word)."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_type = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except DecodeError:
            log.info("a request that is not a valid %s (%d bytes) was refused", message_type, len(data))
            return MalformedRequest(message_type)
        try:
            # Every string field bounded once, here at the edge, before any handler keeps or echoes it.
            field_bounds.check_request(message)
        except InvalidArgument as refusal:
            return MalformedRequest(message_type, refusal)
        return message

    return deserialize


async def _checked_stream(requests: Any):
    """A request stream that ends the call with MALFORMED_REQUEST at its first message that did not parse."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise request.error()
        yield request


def refuse_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, answering request bytes that do not parse with INVALID_ARGUMENT (MALFORMED_REQUEST).

    It raises the domain error from inside the handler, so wrap the result in the error guard (see
    ErrorInterceptor); unary and streaming requests alike.
    """
    deserializer = _safe_deserializer(handler.request_deserializer)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                raise request.error()
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, handler.response_serializer)
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, MalformedRequest):
                raise request.error()
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_writer = handler.unary_stream

        async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, MalformedRequest):
                raise request.error()
            await inner_writer(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream_writer, deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        inner_client_stream = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner_client_stream(_checked_stream(request_iterator), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, handler.response_serializer)
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        inner_bidi = handler.stream_stream

        async def stream_stream(request_iterator: Any, context: grpc.aio.ServicerContext):
            async for response in inner_bidi(_checked_stream(request_iterator), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, handler.response_serializer)
    # A bidi handler written as a coroutine reads with context.read(): it keeps grpc's own deserializer.
    return handler


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Guard) -> grpc.RpcMethodHandler:
    """Run every call of ``handler`` inside ``guard(method, context)``."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(method, context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext):
            async with guard(method, context):
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.unary_stream is not None:
        inner_writer = handler.unary_stream

        async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with guard(method, context):
                await inner_writer(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream_writer, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary is not None:
        inner_client_stream = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(method, context):
                return await inner_client_stream(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        inner_bidi = handler.stream_stream

        async def stream_stream(request_iterator: Any, context: grpc.aio.ServicerContext):
            async with guard(method, context):
                async for response in inner_bidi(request_iterator, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                     handler.response_serializer)
    # Other bidi handlers (reflection's) pass through.
    return handler


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once, not on every call.

    grpc.aio asks every interceptor for the handler of each call; building the wrapped handler
    (closures, a new RpcMethodHandler, metric series lookups) each time cost as much CPU as the call's
    own Python work. Here the wrapped handler is kept per method, and reused while the next
    interceptor (or the server) answers with the same handler object, as registered handlers do.
    What a call needs of its own (metadata, peer identity, deadline) its guard reads from the call's
    context. Subclasses say what to wrap with in ``wrap_handler``.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: the server answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ErrorInterceptor(WrappingInterceptor):
    """Domain errors become their status code; anything else INTERNAL with a generic message."""

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrap(refuse_malformed(handler), method, self._guard)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _guard(method: str, context: grpc.aio.ServicerContext):
        try:
            yield
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except LatentwireError as error:
            # str(error) may say more than the caller's message (a model folder's path, for the operator).
            log.info("%s -> %s %s: %s", method, error.code.name, error.reason, error)
            await context.abort_with_status(to_status(error))
        except NotImplementedError:
            if not _stub_refused(context):
                log.exception("%s failed with an unexpected error", method)
                await context.abort_with_status(to_status(Internal("internal error; see the service log")))
            # A generated servicer's stub (grpc's aio HealthServicer has no List): the method is not served here.
            log.info("%s -> UNIMPLEMENTED", method)
            await context.abort_with_status(to_status(Unimplemented(
                f"{method.rsplit('/', 1)[-1]} is not implemented by this service", reason="METHOD_NOT_IMPLEMENTED")))
        except Exception:  # noqa: BLE001 - this is the one place that maps errors
            log.exception("%s failed with an unexpected error", method)
            await context.abort_with_status(to_status(Internal("internal error; see the service log")))


def _stub_refused(context: grpc.aio.ServicerContext) -> bool:
    """Whether the handler set UNIMPLEMENTED before raising NotImplementedError, as generated stubs do (a
    NotImplementedError from deeper down, torch's for instance, is a bug like any other)."""
    code = context.code()
    return code == grpc.StatusCode.UNIMPLEMENTED or code == grpc.StatusCode.UNIMPLEMENTED.value[0]


#: Long-lived or bookkeeping streams that must not hold a shutdown open.
_NOT_DRAINED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class DrainInterceptor(WrappingInterceptor):
    """Counts in-flight calls; once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(_NOT_DRAINED):
            return handler
        return _wrap(handler, method, self._guard)

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, context: grpc.aio.ServicerContext):
        if self.draining:
            await context.abort_with_status(to_status(
                Unavailable("the service is shutting down; retry on another replica", reason="SHUTTING_DOWN")))
        self.active += 1
        self._event().clear()
        # What the handler's jobs stop at (interrupt.py): the deadline of the direct caller.
        interrupt.set_call_deadline(context.time_remaining())
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._event().set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls, then wait up to ``timeout`` seconds for running ones; True if all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._event().wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
