"""The one server interceptor that maps domain errors to gRPC statuses with google.rpc.Status details."""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import ERROR_DOMAIN, Internal, LatentwireError

log = logging.getLogger(__name__)


def to_status(error: LatentwireError) -> grpc.Status:
    """Build the rich status (code, message, ErrorInfo detail) for a domain error."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, LatentwireError):
        error = exc
        log.info("%s -> %s %s: %s", method, error.code.name, error.reason, error.message)
    else:
        log.exception("%s failed with an unexpected error", method, exc_info=exc)
        error = Internal("internal error; see the service log", reason="INTERNAL")
    await context.abort_with_status(to_status(error))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: domain errors become their status code, anything else INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the one place that maps errors
                    await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext):
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            # A streaming handler written as a coroutine that calls context.write() (grpc's own Health/Watch).
            inner_writer = handler.unary_stream

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await inner_writer(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer, handler.request_deserializer, handler.response_serializer
            )
        # Client- and bidi-streaming handlers are passed through; wrap them here when a service adds one.
        return handler


# Exported so tests and docs can name the numeric codes.
CODES = code_pb2
