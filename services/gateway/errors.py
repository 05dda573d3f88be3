"""HTTP answers of errors: the suite's gRPC status mapped to an HTTP status, its ErrorInfo reason kept.

A failed call answers ``{"error": STATUS_NAME, "detail": message, "reason": REASON}``; bad bodies get
FastAPI's 422 with field errors, as A1111 answers them.
"""
from __future__ import annotations

import grpc

from services.runtime.errors import sanitize_message

#: gRPC status -> HTTP status (INVALID_ARGUMENT is 422 as A1111 answers a bad value).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def _details(error: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """The ErrorInfo reason ("" when there is none) and the RetryInfo delay in seconds (None) of the call's
    google.rpc.Status trailer."""
    from google.rpc import error_details_pb2, status_pb2

    reason, retry_after = "", None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, retry_after


class SuiteCallError(Exception):
    """A gRPC call to the suite failed: its status, message and reason, to answer over HTTP."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.message, self.reason, self.retry_after_s = code, message, reason, retry_after_s

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> SuiteCallError:
        code = error.code()
        reason, retry_after = _details(error)
        if code == grpc.StatusCode.UNAVAILABLE and not reason:  # no answer from the orchestrator at all
            return cls(code, "the suite cannot be reached; retry later", "STAGE_UNAVAILABLE")
        if code not in HTTP_STATUS:
            return cls(code, "the suite failed to answer this request", reason or code.name)
        return cls(code, sanitize_message(error.details() or code.name), reason or code.name, retry_after)

    def body(self) -> dict[str, str]:
        return {"error": self.code.name, "detail": self.message, "reason": self.reason}

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, at least 1) when the suite said how long to wait."""
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, round(self.retry_after_s)))}
