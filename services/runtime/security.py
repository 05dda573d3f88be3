"""Transport security (TLS, mutual TLS) and bearer tokens, written once for every service and client.

- A service's identity is ``--tls-cert``/``--tls-key``: it serves with it and presents it as its
  client certificate on every outgoing call (``latentwire certs`` gives each certificate both the
  serverAuth and clientAuth usages). ``--tls-ca`` is the bundle peers are verified against:
  servers always, clients too with ``--tls-client-auth`` (mutual TLS). Outgoing channels use TLS
  when ``--tls-ca`` is set, plaintext otherwise; without any flag nothing changes.
- Bearer tokens guard the client-facing API (``--auth-tokens-file``): a missing or unknown token
  is UNAUTHENTICATED, a token without the scope the method needs PERMISSION_DENIED. Health and
  reflection stay open. Between services, mutual TLS is the authentication; no tokens travel.

Only grpc and the standard library are imported here: the client library uses this module too.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import grpc

log = logging.getLogger(__name__)

# Files `latentwire certs DIR` writes; CertificateDir reads the same names.
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
#: The identity `latentwire generate --tls-dir`, the launcher and the tests present as a client.
CLIENT_NAME = "client"


def cert_file(name: str) -> str:
    """``<name>.pem``: the certificate of a service (or of the client) in a certificate folder."""
    return f"{name}.pem"


def key_file(name: str) -> str:
    """``<name>-key.pem``: its private key."""
    return f"{name}-key.pem"


def read_pem(source: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes from a path (or the bytes themselves); ValueError saying which file when it cannot be read."""
    if source is None or isinstance(source, bytes):
        return source
    path = Path(source).expanduser()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


@contextlib.contextmanager
def _at_start():
    """Configuration read while a service starts: a problem ends the start with a message saying what to fix."""
    try:
        yield
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client channel protects itself: plaintext, or TLS with roots to verify the server and,
    for mutual TLS, a client identity (key and certificate chain).

    ``server_name`` verifies the server's certificate against this name instead of the target's
    host (gRPC's ``ssl_target_name_override``), for servers reached by an address their
    certificate does not name.
    """

    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, *, ca=None, cert=None, key=None, server_name: str | None = None) -> ChannelSecurity:
        """TLS when any of ``ca`` (roots; without it the system's), ``cert``/``key`` (client identity) is given.

        Each is a path or PEM bytes.
        """
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key and a key its certificate (give both)")
        if ca is None and cert is None:
            return cls()
        return cls(tls=True, root_certificates=read_pem(ca, "TLS CA bundle"), private_key=read_pem(key, "TLS key"),
                   certificate_chain=read_pem(cert, "TLS certificate"), server_name=server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []


PLAINTEXT = ChannelSecurity()


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
            raise SystemExit("error: --tls-client-auth needs --tls-cert and --tls-key (the server's identity) and "
                             "--tls-ca")
        return None
    if not (config.tls_cert and config.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together: give the server's certificate and its key")
    if config.tls_client_auth and not config.tls_ca:
        raise SystemExit("error: --tls-client-auth needs --tls-ca: the CA bundle client certificates are verified "
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


@dataclass(frozen=True)
class CertificateDir:
    """A folder written by ``latentwire certs``: ``ca.pem`` and ``<name>.pem``/``<name>-key.pem`` per identity."""

    path: Path

    def ca(self) -> Path:
        return self.path / CA_CERT

    def cert(self, name: str) -> Path:
        return self.path / cert_file(name)

    def key(self, name: str) -> Path:
        return self.path / key_file(name)

    def service_args(self, name: str, *, client_auth: bool = True) -> list[str]:
        """Flags that give service ``name`` its identity, the CA and (by default) mutual TLS."""
        cert = self.cert(name)
        if not cert.is_file():
            raise FileNotFoundError(f"{cert} is missing: make it with `latentwire certs {self.path} --names {name}`")
        args = ["--tls-cert", str(cert), "--tls-key", str(self.key(name)), "--tls-ca", str(self.ca())]
        return args + (["--tls-client-auth"] if client_auth else [])

    def client(self, name: str = CLIENT_NAME, server_name: str | None = None) -> ChannelSecurity:
        """Channel security presenting identity ``name`` (default the client certificate)."""
        return ChannelSecurity.from_files(ca=self.ca(), cert=self.cert(name), key=self.key(name),
                                          server_name=server_name)


# ----------------------------------------------------------------------------------------------
# Bearer tokens

#: Metadata key carrying ``Bearer TOKEN``.
AUTHORIZATION = "authorization"
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
        """Read ``--auth-tokens-file`` at start (SystemExit saying what to fix when it is unusable)."""
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


class _ClientCallDetails(collections.namedtuple(
        "_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    """A blocking call's details with other metadata (grpc gives interceptors no way to copy its own)."""


def replace_metadata(details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> grpc.ClientCallDetails:
    """``details`` of a blocking call with ``metadata`` instead of its own."""
    return _ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                              getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call of a blocking channel."""

    def __init__(self, token: str):
        self._entry = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details):
        return replace_metadata(details, [*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
