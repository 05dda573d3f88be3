"""How the CLI reaches a suite that uses TLS, mutual TLS or bearer tokens: flags and the Client arguments."""
from __future__ import annotations

import argparse
import os


#: Help of every --server flag (the address itself is resolved in latentwire.client.addresses).
SERVER_HELP = "orchestrator address host:port (default: $LATENTWIRE_SERVER, else localhost:50051)"


class ConnectionFlagsError(ValueError):
    """The TLS flags name files that cannot be used (unreadable, not PEM, a certificate without its key)."""


def add_flags(p: argparse.ArgumentParser, *, token: bool = True) -> None:
    """--token, --tls-ca, --tls-cert, --tls-key and --tls-dir, with LATENTWIRE_* environment fallbacks."""
    if token:
        p.add_argument("--token", default=os.environ.get("LATENTWIRE_TOKEN"),
                       help="bearer token, for an orchestrator started with --auth-tokens-file (env LATENTWIRE_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("LATENTWIRE_TLS_CA"),
                   help="CA bundle (PEM) to verify the server with; turns TLS on (env LATENTWIRE_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("LATENTWIRE_TLS_CERT"),
                   help="client certificate (PEM) for mutual TLS (env LATENTWIRE_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("LATENTWIRE_TLS_KEY"),
                   help="key of --tls-cert (env LATENTWIRE_TLS_KEY)")
    p.add_argument("--tls-dir", default=None,
                   help="a `latentwire certs` folder: its ca.pem and the certificate this command presents "
                        "(client.pem, a user; operator.pem for `latentwire models`)")


def client_kwargs(args: argparse.Namespace, identity: str | None = None) -> dict:
    """Keyword arguments for Client/ClassifierClient from the flags (plaintext and no token when none is given).

    ``identity``: the certificate of a --tls-dir folder to present, by default the user "client"; operator
    commands (`latentwire models`) pass "operator".
    """
    from latentwire.client.security import CLIENT_NAME, CertificateDir, ChannelSecurity

    tls_dir = getattr(args, "tls_dir", None)
    try:
        if tls_dir:
            security = CertificateDir(_path(tls_dir)).client(identity or CLIENT_NAME)
        else:
            flags = {name: getattr(args, f"tls_{name}", None) for name in ("ca", "cert", "key")}
            security = ChannelSecurity.from_files(**flags)
    except ValueError as error:
        raise ConnectionFlagsError(str(error)) from None
    return {"token": getattr(args, "token", None), "security": security}


def _path(value: str):
    from pathlib import Path

    return Path(value).expanduser()
