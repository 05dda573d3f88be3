"""Entry point: python -m services.gateway --orchestrator H:P [--registry H:P] [--port 7860] [--api-auth u:p,...].

Serves the app with uvicorn on a socket bound here (port 0 picks a free one), prints the suite's
LATENTWIRE_LISTENING line once the suite's channels are open, and on SIGTERM/SIGINT lets in-flight
requests finish within --grace-period-s (uvicorn's graceful shutdown).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from types import SimpleNamespace

import uvicorn

from services.runtime import security
from services.runtime.errors import ConfigurationError
from services.runtime.server import LISTENING_PREFIX, configure_logging

from .app import create_app
from .config import settings_from_flags

log = logging.getLogger("services.gateway")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: uvicorn writes a response's head and body separately, and with Nagle's
    # algorithm the body waits for the client's delayed ACK (~40 ms on every keep-alive /progress poll).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigurationError(f"could not listen on {host}:{port} ({error.strerror or 'in use?'})") from None
    sock.listen(2048)  # connections made before uvicorn accepts wait in the backlog
    return sock


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_flags(argv)
        configure_logging(settings.log_level)
        # The outgoing gRPC channels verify the suite with --tls-ca, presenting --suite-tls-cert (else --tls-cert).
        security.set_default_channel_security(security.service_channel_security(SimpleNamespace(
            tls_ca=settings.tls_ca, tls_cert=settings.suite_tls_cert or settings.tls_cert,
            tls_key=settings.suite_tls_key or settings.tls_key)))
        sock = bind(settings.host, settings.port)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tls = bool(settings.tls_cert)

    def started() -> None:
        print(LISTENING_PREFIX + json.dumps({"service": "latentwire.gateway", "address": address,
                                             "url": f"{'https' if tls else 'http'}://{address}"}), flush=True)
        log.info("gateway listening on %s%s, suite at %s", address, " (TLS)" if tls else "", settings.orchestrator)

    config = uvicorn.Config(
        create_app(settings, on_started=started), log_level=settings.log_level.lower(), access_log=False,
        ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
        timeout_graceful_shutdown=int(max(1, settings.grace_period_s)), lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the handlers that were
    # there before it; handlers that do nothing let the process end with status 0 like every other service.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
