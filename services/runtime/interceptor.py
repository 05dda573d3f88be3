"""Server interceptors shared by every service.

- ErrorInterceptor: the one place that maps domain errors to status codes with google.rpc.Status details.
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
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import ERROR_DOMAIN, Internal, LatentwireError, Unavailable

log = logging.getLogger(__name__)

Guard = Callable[[str, grpc.aio.ServicerContext], AsyncContextManager[None]]


def to_status(error: LatentwireError) -> grpc.Status:
    """Build the rich status (code, message, ErrorInfo detail) for a domain error."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if getattr(error, "retry_after_s", None) is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        retry_detail = any_pb2.Any()
        retry_detail.Pack(retry)
        details.append(retry_detail)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Domain errors become their status code; anything else INTERNAL with a generic message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(handler, handler_call_details.method, self._guard)

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
        except Exception:  # noqa: BLE001 - this is the one place that maps errors
            log.exception("%s failed with an unexpected error", method)
            await context.abort_with_status(to_status(Internal("internal error; see the service log")))


#: Long-lived or bookkeeping streams that must not hold a shutdown open.
_NOT_DRAINED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts in-flight calls; once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_NOT_DRAINED):
            return handler
        return _wrap(handler, handler_call_details.method, self._guard)

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
