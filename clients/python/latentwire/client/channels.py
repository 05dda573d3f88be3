"""Channels to latentwire services, with the message limits and keepalive every end agrees on.

The client library and every service open their channels through here (the services add their
trace context on top, in ``services/runtime/channels.py``), so limits and keepalive agree on both
ends: a keepalive mismatch ends in GOAWAY ``too_many_pings``.
"""
from __future__ import annotations

from typing import Sequence

import grpc

from .security import PLAINTEXT, BearerToken, ChannelSecurity

#: Largest message a latentwire channel sends or receives, in bytes (gRPC's receive default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_time_s: float = 30.0,
                 keepalive_timeout_s: float = 10.0) -> list[tuple[str, int]]:
    """Channel/server options used on both ends, so limits and keepalive agree (a mismatch ends in GOAWAY)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_time_s * 1000) // 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def open_channel(address: str, options: Sequence[tuple] = (), *, security: ChannelSecurity | None = None,
                 token: str | None = None) -> grpc.Channel:
    """A blocking channel to ``address``, secure when ``security`` says so, sending ``token`` as a bearer token.

    ``security`` None means plaintext (the client library's default); services pass theirs.
    """
    security = security or PLAINTEXT
    options = [*options, *security.options()]
    if security.tls:
        channel = grpc.secure_channel(address, security.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if token:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


def open_aio_channel(address: str, options: Sequence[tuple] = (), *, security: ChannelSecurity | None = None,
                     interceptors: Sequence = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``, secure when ``security`` says so."""
    security = security or PLAINTEXT
    options = [*options, *security.options()]
    interceptors = list(interceptors) or None
    if security.tls:
        return grpc.aio.secure_channel(address, security.credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


