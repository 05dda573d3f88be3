"""The server side of transport security: listening credentials, outgoing identity, who may call what.

- A service's identity is ``--tls-cert``/``--tls-key``: it serves with it and presents it as its
  client certificate on every outgoing call (``latentwire certs`` gives each service certificate
  both the serverAuth and clientAuth usages). ``--tls-ca`` is the bundle peers are verified
  against: servers always, clients too with ``--tls-client-auth`` (mutual TLS). Outgoing channels
  use TLS when ``--tls-ca`` is set, plaintext otherwise; without any flag nothing changes.
- Identities (mutual TLS only): a client certificate says its kind (user, operator, service,
  orchestrator) in its URI SAN ``spiffe://latentwire/<kind>/<name>``; ALLOWED_KINDS says which
  kinds may call each RPC, closed for anything it does not list. A certificate of the CA without
  a kind counts as a user. Without ``--tls-client-auth`` every caller is "anonymous" and only
  tokens (if any) are checked.
- Bearer tokens (``--auth-tokens-file``, on any service): a missing or unknown token is
  UNAUTHENTICATED, a token without the scope the method needs PERMISSION_DENIED. Each token has a
  principal, the owner of the jobs it creates. Services and the orchestrator, identified by their
  certificates, send no tokens and need none.
- Health and reflection stay open. ``current_caller()`` tells a handler who called.

What clients share with services (ChannelSecurity, CertificateDir, BearerToken, certificate file
names, identity kinds) is the light side, ``latentwire/client/security.py`` in the client
distribution.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import grpc

from latentwire.client.security import (AUTHORIZATION, IDENTITY_KINDS, OPERATOR, ORCHESTRATOR, PLAINTEXT, SERVICE,
                                        USER, ChannelSecurity, kind_of_spiffe_id, read_pem)

from .errors import ConfigurationError, LatentwireError, PermissionDenied, Unauthenticated
from .interceptor import WrappingInterceptor, _wrap, to_status

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
# Who may call what (mutual TLS): the one table

#: Methods anyone may call: health checks (probes, load balancers) and reflection (discovery, no data).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: A caller the port cannot identify: plaintext, or TLS without client certificates.
ANONYMOUS_KIND = "anonymous"
#: Every kind a Caller can have.
KINDS = (*IDENTITY_KINDS, ANONYMOUS_KIND)

_CLIENT_API = frozenset({USER, OPERATOR})
_STAGE = frozenset({ORCHESTRATOR, OPERATOR})
_INTERNAL = frozenset({SERVICE, ORCHESTRATOR, OPERATOR})
_REGISTRY = "latentwire.registry.v1.RegistryService"
#: Registry methods that only read; every other registry method (a write, or one added later) is operator-only.
REGISTRY_READS = ("GetModel", "ListModels", "GetModelVersion", "ListModelVersions", "ResolveModel", "QueryBlob",
                  "ReadBlob")

#: The identity kinds allowed per gRPC service, or per ``service/Method`` where one service has two groups.
#: A method matches its ``service/Method`` key first, then its service; anything unlisted is closed
#: (no certificate may call it). docs/operations.md renders this table; tests/test_identity_matrix.py
#: calls every RPC with every kind against it.
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    # Client-facing: people and their programs.
    "latentwire.orchestrator.v1.OrchestratorService": _CLIENT_API,
    # The orchestrator forwards classification to the classifier (services/orchestrator/classification.py).
    "latentwire.classifier.v1.ClassifierService": _CLIENT_API | {ORCHESTRATOR},
    "inference.GRPCInferenceService": _CLIENT_API | {ORCHESTRATOR},
    # Loading and unloading models changes the classifier for everyone: operators (through the orchestrator too).
    "inference.GRPCInferenceService/RepositoryModelLoad": frozenset({OPERATOR, ORCHESTRATOR}),
    "inference.GRPCInferenceService/RepositoryModelUnload": frozenset({OPERATOR, ORCHESTRATOR}),
    # Stage work: the orchestrator drives it; the denoiser (a service) also streams with ControlNet.
    "latentwire.text_encoder.v1.TextEncoderService": _STAGE,
    "latentwire.denoiser.v1.DenoiserService": _STAGE,
    "latentwire.vae.v1.VaeService": _STAGE,
    "latentwire.controlnet.v1.ControlNetService": _STAGE | {SERVICE},
    # Every service's model loader and status.
    "latentwire.common.v1.ModelLoaderService": _INTERNAL,
    "latentwire.common.v1.StatusService": _INTERNAL,
    # The registry: stages and the orchestrator read models; only operators change them.
    **{f"{_REGISTRY}/{method}": _INTERNAL for method in REGISTRY_READS},
    _REGISTRY: frozenset({OPERATOR}),
}


def _split(method: str) -> tuple[str, str]:
    """``/package.Service/Method`` -> (``package.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def allowed_kinds(method: str) -> frozenset[str] | None:
    """The identity kinds that may call ``/package.Service/Method``; None when it is open to everyone."""
    if method.startswith(OPEN_PREFIXES):
        return None
    service, name = _split(method)
    found = ALLOWED_KINDS.get(f"{service}/{name}")
    return found if found is not None else ALLOWED_KINDS.get(service, frozenset())


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, str]:
    """(kind, common name) of the client certificate in a call's ``context.auth_context()``.

    The kind is the one ``spiffe://latentwire/<kind>/<name>`` URI SAN names; a certificate with
    none, or with URIs naming different kinds, counts as a user (least privilege). Only called on
    mutual TLS ports, where the handshake already verified the certificate against ``--tls-ca``.
    """
    names = [v.decode(errors="replace") for v in auth_context.get("x509_common_name", ())]
    uris = [v.decode(errors="replace") for v in auth_context.get("peer_uri", ())]
    kinds = {kind for kind in map(kind_of_spiffe_id, uris) if kind is not None}
    kind = kinds.pop() if len(kinds) == 1 else USER
    return kind, names[0] if names else ""


def _not_allowed(kind: str, allowed: frozenset[str], method: str) -> PermissionDenied:
    service, name = _split(method)
    short = f"{service.rpartition('.')[2]}/{name}"
    if not allowed:
        return PermissionDenied(f"{short} is closed to every certificate", reason="IDENTITY_NOT_ALLOWED",
                                metadata={"identity_kind": kind, "allowed_kinds": ""})
    kinds = ", ".join(sorted(allowed))
    return PermissionDenied(
        f"a {kind} certificate may not call {short}; it is open to {kinds} certificates "
        "(see docs/operations.md: who may call what)",
        reason="IDENTITY_NOT_ALLOWED", metadata={"identity_kind": kind, "allowed_kinds": ",".join(sorted(allowed))})


# ----------------------------------------------------------------------------------------------
# Bearer tokens

#: A scope that grants every other.
ADMIN_SCOPE = "admin"
#: The scopes a token line may list.
SCOPES = ("generate", "classify", ADMIN_SCOPE)
#: The scope each client-facing gRPC service needs; every other service (status, model loading, the
#: registry, the stage services) needs "admin", so a service not listed here is closed by default.
SERVICE_SCOPES = {
    "latentwire.orchestrator.v1.OrchestratorService": "generate",
    "latentwire.classifier.v1.ClassifierService": "classify",
    "inference.GRPCInferenceService": "classify",
}
#: Methods of those services that need more than their service's scope: loading and unloading models changes what
#: the server holds for every caller, so it is an operator's call, as the registry is.
METHOD_SCOPES = {
    "/inference.GRPCInferenceService/RepositoryModelLoad": ADMIN_SCOPE,
    "/inference.GRPCInferenceService/RepositoryModelUnload": ADMIN_SCOPE,
}
#: Callers that authenticate by certificate alone: services do not send tokens to each other.
MACHINE_KINDS = frozenset({SERVICE, ORCHESTRATOR})
#: What ``principal=NAME`` may be: no ':' so it never looks like a derived ``token:``/``cert:`` principal.
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_PRINCIPAL_KEY = "principal="


def required_scope(method: str) -> str | None:
    """The scope ``/package.Service/Method`` needs, or None when it is open."""
    if method.startswith(OPEN_PREFIXES):
        return None
    if method in METHOD_SCOPES:
        return METHOD_SCOPES[method]
    return SERVICE_SCOPES.get(_split(method)[0], ADMIN_SCOPE)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derived_principal(token: str) -> str:
    """The principal of a token line without ``principal=``: ``token:`` and 12 hex digits of its sha256."""
    return "token:" + _digest(token)[:12]


@dataclass(frozen=True)
class TokenEntry:
    """What a valid token grants: its scopes and the principal its calls act as."""

    scopes: frozenset[str]
    principal: str


class TokenTable:
    """Tokens, their scopes and principals, read from a file: one ``TOKEN [SCOPE[,SCOPE...]] [principal=NAME]``
    a line.

    A token with no scope may call everything (as "admin"). A line without ``principal=`` acts as
    ``token:<12 hex digits of the token's sha256>``; several tokens may share a principal (rotation).
    Blank lines and ``#`` comments are skipped. Only sha256 digests are kept in memory, and a token
    is found by its digest, so the comparison leaks nothing about how much of a wrong token matched.
    """

    def __init__(self, entries: dict[str, TokenEntry]):
        self._entries = {_digest(token): entry for token, entry in entries.items()}

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "tokens") -> TokenTable:
        entries: dict[str, TokenEntry] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            token, *words = text.split()
            if token in entries:
                raise ValueError(f"{source}:{number}: this token is listed twice")
            principal, scopes = derived_principal(token), set()
            for word in words:
                if word.startswith(_PRINCIPAL_KEY):
                    principal = word[len(_PRINCIPAL_KEY):]
                    if not PRINCIPAL_PATTERN.fullmatch(principal):
                        raise ValueError(f"{source}:{number}: principal= takes 1 to 64 letters, digits, '.', '_', "
                                         "'@' or '-'")
                    continue
                for scope in filter(None, word.split(",")):
                    if scope not in SCOPES:
                        raise ValueError(f"{source}:{number}: unknown scope {scope[:40]!r}; the scopes are "
                                         f"{', '.join(SCOPES)} (and principal=NAME names the token's principal)")
                    scopes.add(scope)
            entries[token] = TokenEntry(frozenset(scopes or {ADMIN_SCOPE}), principal)
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

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], scope: str) -> TokenEntry:
        """The entry of the call's bearer token when it has ``scope``; else raises the domain error to answer."""
        values = [v for k, v in metadata if k == AUTHORIZATION]
        if not values:
            raise Unauthenticated("this service needs a bearer token: send metadata 'authorization: Bearer TOKEN' "
                                  "(latentwire generate --token, or LATENTWIRE_TOKEN)", reason="MISSING_TOKEN")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        kind, _, token = value.strip().partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer TOKEN'", reason="INVALID_TOKEN")
        entry = self._entries.get(_digest(token.strip()))
        if entry is None:
            raise Unauthenticated("the bearer token is not valid here", reason="INVALID_TOKEN")
        if scope not in entry.scopes and ADMIN_SCOPE not in entry.scopes:
            raise PermissionDenied(f"the bearer token lacks the {scope!r} scope this method needs",
                                   reason="INSUFFICIENT_SCOPE", metadata={"required_scope": scope})
        return entry

    def check(self, metadata: Iterable[tuple[str, str | bytes]], scope: str) -> LatentwireError | None:
        """None when the call's bearer token has ``scope``; else the domain error to answer with."""
        try:
            self.authenticate(metadata, scope)
        except (Unauthenticated, PermissionDenied) as error:
            return error
        return None


# ----------------------------------------------------------------------------------------------
# Who is calling: set for every handled call by AccessInterceptor, read by handlers


@dataclass(frozen=True)
class Caller:
    """The caller of the RPC being handled.

    ``principal`` owns the jobs the call creates: the token's principal when a valid bearer token
    came with the call, else the certificate's (``cert:<common name>``), else ``anonymous``.
    ``kind`` is the certificate's identity kind (one of KINDS; ``anonymous`` on a port without
    mutual TLS). ``scopes`` are the token's scopes (empty without a token).
    """

    principal: str = ANONYMOUS_KIND
    kind: str = ANONYMOUS_KIND
    scopes: frozenset = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        """Operators (by certificate) and tokens with the admin scope see and manage every job, and see paths."""
        return self.kind == OPERATOR or ADMIN_SCOPE in self.scopes


ANONYMOUS = Caller()
_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("latentwire_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The caller of the RPC this code runs for (ANONYMOUS outside a call or when nothing identifies it).

    Set in the handler's task, so worker threads started with a copy of its context (Worker.run) see it too.
    """
    return _current_caller.get()


def set_current_caller(caller: Caller) -> contextvars.Token:
    """Set the caller for the running handler; returns the token for ``_current_caller.reset``."""
    return _current_caller.set(caller)


class AccessInterceptor(WrappingInterceptor):
    """Decides who may call, before the handler runs, and sets ``current_caller()`` for it.

    On a mutual TLS port (``client_auth``) the certificate's kind must be in ALLOWED_KINDS for the
    method (else PERMISSION_DENIED, reason IDENTITY_NOT_ALLOWED). With ``tokens`` every caller but
    a service or the orchestrator also needs a bearer token with the method's scope. Health and
    reflection stay open. The certificate is only in the call's context (``auth_context``), so the
    check runs inside the wrapped handler.
    """

    def __init__(self, *, client_auth: bool, tokens: TokenTable | None = None):
        super().__init__()
        self._client_auth = client_auth
        self._tokens = tokens

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(OPEN_PREFIXES):
            return handler
        return _wrap(handler, method, self._guard)

    def authorize(self, method: str, auth_context: Mapping[str, Iterable[bytes]],
                  metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        """The Caller of a call to ``method``; raises the domain error to answer when it may not call."""
        kind, name = ANONYMOUS_KIND, ""
        if self._client_auth:
            kind, name = certificate_identity(auth_context)
            allowed = allowed_kinds(method)
            if allowed is not None and kind not in allowed:
                raise _not_allowed(kind, allowed, method)
        principal = f"cert:{name}" if name else ANONYMOUS_KIND
        if self._tokens is None or kind in MACHINE_KINDS:
            return Caller(principal=principal, kind=kind)
        entry = self._tokens.authenticate(metadata, required_scope(method) or ADMIN_SCOPE)
        return Caller(principal=entry.principal, kind=kind, scopes=entry.scopes)

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, context: grpc.aio.ServicerContext):
        try:
            caller = self.authorize(method, context.auth_context(), context.invocation_metadata() or ())
        except LatentwireError as error:
            log.info("%s refused: %s %s", method, error.code.name, error.reason)
            await context.abort_with_status(to_status(error))
        token = set_current_caller(caller)
        try:
            yield
        finally:
            # A stream closed by the loop's async-generator finalizer runs in another context: nothing to undo.
            with contextlib.suppress(ValueError):
                _current_caller.reset(token)
