"""The one error every latentwire client raises: a call the suite refused or could not finish.

It keeps what the server said in the ``google.rpc.Status`` it attached (the trailer
``grpc-status-details-bin``): the canonical code, the message, and the ErrorInfo ``reason``
(UPPER_SNAKE, stable, docs/errors.md) with its ``metadata``, so a caller branches on the reason
rather than on the wording. The server side has its own error types (services/runtime/errors.py)
that become these statuses; this module is the client's view of them.
"""
from __future__ import annotations

import grpc

#: What grpc's details say when no server accepted the connection (the wording varies by platform).
_REFUSED_MARKERS = ("failed to connect", "connection refused")


class LatentwireError(Exception):
    """A call the suite refused or could not finish: gRPC status code, message, ErrorInfo reason and metadata.

    ``address`` is the server the client called, when the client knows it.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "",
                 metadata: dict[str, str] | None = None, address: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.address = address

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, *, address: str = "") -> LatentwireError:
        """The code, message and ErrorInfo reason/metadata of a failed call."""
        reason, metadata = _error_info(error)
        return cls(error.code(), error.details() or "", reason=reason, metadata=metadata, address=address)

    @property
    def connection_refused(self) -> bool:
        """True when nothing accepted the connection (no server listens at the address)."""
        text = self.message.lower()
        return self.code == grpc.StatusCode.UNAVAILABLE and any(marker in text for marker in _REFUSED_MARKERS)


def _error_info(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the call's ErrorInfo detail; empty when it carries none."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):  # no trailer, or one that disagrees with the call's status
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    return "", {}
