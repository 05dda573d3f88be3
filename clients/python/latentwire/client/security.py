"""Transport security that latentwire clients and services share: TLS, mutual TLS, bearer tokens.

- ``ChannelSecurity`` says how a channel protects itself: plaintext, TLS, or mutual TLS.
- ``CertificateDir`` reads a folder written by ``latentwire certs``.
- Identity kinds (user, operator, service, orchestrator) and the ``spiffe://latentwire/<kind>/<name>``
  URI SAN that carries one in a certificate (``latentwire certs`` writes it, services read it).
- ``BearerToken`` adds ``authorization: Bearer TOKEN`` to every call of a blocking channel.

Only grpc and the standard library: this is the light side, used by the client library and by
every service. The server side (listening credentials, the token table, who may call what, the
authorization interceptor) is ``services/runtime/security.py``.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

# Files `latentwire certs DIR` writes; CertificateDir reads the same names.
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
#: The user identity `latentwire generate --tls-dir` (and jobs, classify) presents as a client.
CLIENT_NAME = "client"
#: The operator identity the launcher and the operator commands (`latentwire models ...`) present.
OPERATOR_NAME = "operator"

# ----------------------------------------------------------------------------------------------
# Identity kinds: what a certificate says its holder is (docs/operations.md, "Who may call what")

#: A person or program using the client-facing API (the orchestrator, the classifier).
USER = "user"
#: A person running the suite: models, status, every RPC.
OPERATOR = "operator"
#: A stage or the registry calling another service (the denoiser calls ControlNet, stages read the registry).
SERVICE = "service"
#: The orchestrator, which calls the stages and the classifier.
ORCHESTRATOR = "orchestrator"
#: The kinds a certificate can carry.
IDENTITY_KINDS = (USER, OPERATOR, SERVICE, ORCHESTRATOR)
#: Trust domain of the SPIFFE-style URI SAN that carries the kind: ``spiffe://latentwire/<kind>/<name>``.
SPIFFE_TRUST_DOMAIN = "latentwire"
_SPIFFE_PREFIX = f"spiffe://{SPIFFE_TRUST_DOMAIN}/"


def spiffe_id(kind: str, name: str) -> str:
    """The URI SAN that says a certificate's holder is ``name`` of ``kind``."""
    if kind not in IDENTITY_KINDS:
        raise ValueError(f"unknown identity kind {kind!r}; one of {', '.join(IDENTITY_KINDS)}")
    return f"{_SPIFFE_PREFIX}{kind}/{name}"


def kind_of_spiffe_id(uri: str) -> str | None:
    """The identity kind a ``spiffe://latentwire/<kind>/<name>`` URI names; None for any other URI."""
    if not uri.startswith(_SPIFFE_PREFIX):
        return None
    kind, sep, name = uri[len(_SPIFFE_PREFIX):].partition("/")
    return kind if sep and name and kind in IDENTITY_KINDS else None


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
        """Channel security presenting identity ``name`` (default the user certificate "client")."""
        return ChannelSecurity.from_files(ca=self.ca(), cert=self.cert(name), key=self.key(name),
                                          server_name=server_name)

    def operator(self, server_name: str | None = None) -> ChannelSecurity:
        """Channel security presenting the operator certificate (registry writes, status, model loading)."""
        return self.client(OPERATOR_NAME, server_name)


# ----------------------------------------------------------------------------------------------
# Bearer tokens

#: Metadata key carrying ``Bearer TOKEN``.
AUTHORIZATION = "authorization"


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
