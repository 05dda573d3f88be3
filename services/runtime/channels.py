"""Client channels between services, with the same message limits and keepalive as the servers."""
from __future__ import annotations

import grpc

from .config import DEFAULT_MAX_MESSAGE_BYTES, grpc_options


def aio_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to another latentwire service."""
    return grpc.aio.insecure_channel(
        address, options=grpc_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s)
    )
