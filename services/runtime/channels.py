"""Client channels between services, with the same message limits and keepalive as the servers.

Every channel a service opens comes from here, so each one carries the trace context
(telemetry.py) and uses the service's TLS identity when it has one (security.py).
"""
from __future__ import annotations

import grpc

from latentwire.client.channels import DEFAULT_MAX_MESSAGE_BYTES, grpc_options, open_aio_channel, open_channel
from latentwire.client.security import ChannelSecurity

from . import security as _security
from . import telemetry


def aio_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
    security: ChannelSecurity | None = None,
    extra_options: list[tuple] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to another latentwire service (``security`` None: this service's own, see security.py).

    ``extra_options`` are added to the ones built from the limits and keepalive (reconnect backoff, ...).
    """
    return open_aio_channel(
        address, grpc_options(max_message_bytes, keepalive_time_s, keepalive_timeout_s) + list(extra_options or ()),
        security=security or _security.default_channel_security(),
        interceptors=telemetry.aio_client_interceptors(),
    )


def sync_channel(
    address: str,
    *,
    options: list[tuple] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
    security: ChannelSecurity | None = None,
) -> grpc.Channel:
    """A blocking channel to another latentwire service, for calls made from worker threads.

    ``options`` replaces the ones built from the limits and keepalive.
    """
    channel = open_channel(
        address, options if options is not None else grpc_options(max_message_bytes, keepalive_time_s,
                                                                  keepalive_timeout_s),
        security=security or _security.default_channel_security(),
    )
    interceptors = telemetry.sync_client_interceptors()
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel
