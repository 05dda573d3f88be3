"""The server side of transport security: listening credentials, outgoing identity, bearer-token checks.

- A service's identity is ``--tls-cert``/``--tls-key``: it serves with it and presents it as its
  client certificate on every outgoing call (``latentwire certs`` gives each certificate both the
  serverAuth and clientAuth usages). ``--tls-ca`` is the bundle peers are verified against:
  servers always, clients too with ``--tls-client-auth`` (mutual TLS). Outgoing channels use TLS
  when ``--tls-ca`` is set, plaintext otherwise; without any flag nothing changes.
- Bearer tokens guard the client-facing API (``--auth-tokens-file``): a missing or unknown token
  is UNAUTHENTICATED, a token without the scope the method needs PERMISSION_DENIED. Health and
  reflection stay open. Between services, mutual TLS is the authentication; no tokens travel.

What clients share with services (ChannelSecurity, CertificateDir, BearerToken, certificate file
names) is the light side, ``latentwire/client/security.py`` in the client distribution.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import grpc

from latentwire.client.security import AUTHORIZATION, PLAINTEXT, ChannelSecurity, read_pem

from .errors import ConfigurationError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _at_start():
    """Configuration read while a service starts: a problem becomes a ConfigurationError saying what to fix,
    which the service's main turns into its one "error: ..." line."""
    try:
        yield
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def service_channel_security(config) -> ChannelSecurity:
    """A service's outgoing channels: TLS with ``--tls-ca`` as roots, presenting its ``--tls-cert``/``--tls-key``."""
    if not config.tls_ca:
        return PLAINTEXT
    with _at_start():
        return ChannelSecurity.from_files(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key)


def server_credentials(config) -> grpc.ServerCredentials | None:
    """The listening port's credentials from ``--tls-cert/--tls-key/--tls-ca/--tls-client-auth``; None: plaintext."""
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_auth:
            raise ConfigurationError("--tls-client-auth needs --tls-cert and --tls-key (the server's identity) and "
                                     "--tls-ca")
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigurationError("--tls-cert and --tls-key go together: give the server's certificate and its key")
    if config.tls_client_auth and not config.tls_ca:
        raise ConfigurationError("--tls-client-auth needs --tls-ca: the CA bundle client certificates are verified "
                                 "against")
    with _at_start():
        return grpc.ssl_server_credentials(
            [(read_pem(config.tls_key, "--tls-key"), read_pem(config.tls_cert, "--tls-cert"))],
            root_certificates=read_pem(config.tls_ca, "--tls-ca"),
            require_client_auth=bool(config.tls_client_auth),
        )


# The process-wide default for outgoing channels: a service sets it once from its flags (server.run),
# so every channel it opens, in whatever module, presents the same identity.
_default = PLAINTEXT


def set_default_channel_security(security: ChannelSecurity) -> None:
    global _default
    _default = security


def default_channel_security() -> ChannelSecurity:
    """The channel security this process's service was configured with (plaintext unless set)."""
    return _default


# ----------------------------------------------------------------------------------------------
# Bearer tokens

#: A scope that grants every other.
ADMIN_SCOPE = "admin"
#: Methods anyone may call: health checks (probes, load balancers) and reflection (discovery, no data).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: The scope each client-facing gRPC service needs; every other service (status, model loading, the
#: registry, the stage services) needs "admin", so a service not listed here is closed by default.
SERVICE_SCOPES = {
    "latentwire.orchestrator.v1.OrchestratorService": "generate",
    "latentwire.classifier.v1.ClassifierService": "classify",
    "inference.GRPCInferenceService": "classify",
}


def required_scope(method: str) -> str | None:
    """The scope ``/package.Service/Method`` needs, or None when it is open."""
    if method.startswith(OPEN_PREFIXES):
        return None
    service = method.lstrip("/").partition("/")[0]
    return SERVICE_SCOPES.get(service, ADMIN_SCOPE)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """Tokens and their scopes, read from a file: one ``TOKEN [SCOPE[,SCOPE...]]`` a line.

    A token with no scope may call everything (as "admin"). Blank lines and ``#`` comments are
    skipped. Only sha256 digests are kept in memory, and a token is found by its digest, so the
    comparison leaks nothing about how much of a wrong token matched.
    """

    def __init__(self, entries: dict[str, frozenset[str]]):
        self._scopes = {_digest(token): scopes for token, scopes in entries.items()}

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "tokens") -> TokenTable:
        entries: dict[str, frozenset[str]] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            token, _, rest = text.partition(" ")
            scopes = frozenset(s for s in rest.replace(",", " ").split() if s)
            if token in entries:
                raise ValueError(f"{source}:{number}: this token is listed twice")
            entries[token] = scopes or frozenset({ADMIN_SCOPE})
        if not entries:
            raise ValueError(f"{source} lists no token: every call would be refused")
        return cls(entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenTable:
        """Read ``--auth-tokens-file`` at start (ConfigurationError saying what to fix when it is unusable)."""
        path = Path(path).expanduser()
        with _at_start():
            try:
                text = path.read_text()
            except OSError as error:
                raise ValueError(f"--auth-tokens-file {path}: cannot read it ({error.strerror or error})") from None
            return cls.parse(text.splitlines(), str(path))

    def check(self, metadata: Iterable[tuple[str, str | bytes]], scope: str):
        """None when the call's bearer token has ``scope``; else the domain error to answer with."""
        from .errors import PermissionDenied, Unauthenticated

        values = [v for k, v in metadata if k == AUTHORIZATION]
        if not values:
            return Unauthenticated("this service needs a bearer token: send metadata 'authorization: Bearer TOKEN' "
                                   "(latentwire generate --token, or LATENTWIRE_TOKEN)", reason="MISSING_TOKEN")
        value = values[0].decode() if isinstance(values[0], bytes) else values[0]
        kind, _, token = value.strip().partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return Unauthenticated("the authorization metadata must be 'Bearer TOKEN'", reason="INVALID_TOKEN")
        scopes = self._scopes.get(_digest(token.strip()))
        if scopes is None:
            return Unauthenticated("the bearer token is not valid here", reason="INVALID_TOKEN")
        if scope not in scopes and ADMIN_SCOPE not in scopes:
            return PermissionDenied(f"the bearer token lacks the {scope!r} scope this method needs",
                                    reason="INSUFFICIENT_SCOPE", metadata={"required_scope": scope})
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose bearer token is missing, unknown or lacks the method's scope, before the handler runs."""

    def __init__(self, tokens: TokenTable):
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        from .interceptor import _wrap

        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        scope = required_scope(method)
        if handler is None or scope is None:
            return handler
        error = self._tokens.check(handler_call_details.invocation_metadata or (), scope)
        if error is None:
            return handler
        log.info("%s refused: %s %s", method, error.code.name, error.reason)
        return _wrap(handler, method, _refusal(error))


def _refusal(error):
    from .interceptor import to_status

    @contextlib.asynccontextmanager
    async def refuse(method: str, context: grpc.aio.ServicerContext):
        await context.abort_with_status(to_status(error))
        yield  # never reached: abort raises

    return refuse


