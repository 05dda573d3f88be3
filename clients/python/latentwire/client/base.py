"""What every latentwire client shares: the address, the channel (message limits, keepalive, TLS,
bearer token), the per-call deadline, closing, and turning a failed call into a LatentwireError.

``Client`` (orchestrator), ``ClassifierClient`` and ``RegistryClient`` are this plus their stub
and their calls, so the three connect, secure and fail the same way.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import grpc
import grpc.experimental

from .addresses import server_address
from .channels import grpc_options, open_channel
from .errors import LatentwireError
from .security import ChannelSecurity


#: Server-streaming calls (Generate, WatchJob, ReadBlob) are read on the thread that iterates them instead of through
#: the channel's spin thread: one thread hand-off less per message (docs/benchmarks.md, "2026-12-03 (night)"). Such a
#: call's code(), details() and metadata are there once it has ended (asked earlier they raise instead of blocking);
#: iterating, cancel() from any thread, Ctrl-C and deadlines work as before.
SINGLE_THREADED_STREAMS = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)


class BaseClient:
    """One channel to one latentwire service.

    Subclasses set ``stub_class`` (the generated stub) and may override ``default_address``
    (how a missing address is resolved: $LATENTWIRE_SERVER by default).
    """

    stub_class: Callable[[grpc.Channel], object]
    default_address: Callable[[str | None], str] = staticmethod(server_address)

    def __init__(self, address: str | None = None, *, timeout: float | None = None, token: str | None = None,
                 tls_ca=None, tls_cert=None, tls_key=None, security: ChannelSecurity | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        """``address``: host:port (default: see ``default_address``). ``timeout``: deadline of each call in
        seconds (None: none). ``token``: bearer token, for a server started with --auth-tokens-file.
        ``tls_ca`` (the CA bundle to verify the server; TLS is on with it), ``tls_cert``/``tls_key`` (a
        client certificate, for mutual TLS): paths or PEM bytes; or pass a ready ``security``.
        ``options``: extra gRPC channel options (reconnect backoff, ...)."""
        if security is None:
            security = ChannelSecurity.from_files(ca=tls_ca, cert=tls_cert, key=tls_key)
        self.address = self.default_address(address)
        self.timeout = timeout
        self._channel = open_channel(self.address, [*grpc_options(), SINGLE_THREADED_STREAMS, *options],
                                     security=security, token=token)
        self._stub = self.stub_class(self._channel)

    def close(self) -> None:
        """Close the channel; calls still running on it end as CANCELLED."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, error: grpc.RpcError) -> LatentwireError:
        return LatentwireError.from_rpc(error, address=self.address)

    def _call(self, method, request, **kwargs):
        """A unary call under the client's deadline; a failure raises LatentwireError."""
        try:
            return method(request, timeout=self.timeout, **kwargs)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _stream(self, method, request, **kwargs) -> Iterator:
        """The responses of a server-streaming call; the call is cancelled if the caller stops early
        (an exception, Ctrl-C, or dropping the iterator). A failure raises LatentwireError."""
        call = method(request, timeout=self.timeout, **kwargs)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()  # a no-op once the call has ended
