"""`latentwire certs DIR`: a development CA and one certificate per identity, for TLS and mutual TLS.

    latentwire certs ./certs [--hosts gpu-1,10.0.0.7] [--names orchestrator,denoiser,...]
                             [--users alice,bob] [--operators ops] [--days 365]

Writes ``ca.pem`` and ``ca-key.pem``, then ``<name>.pem`` and ``<name>-key.pem`` per identity.
Each certificate says what its holder is, in a SPIFFE-style URI SAN
``spiffe://latentwire/<kind>/<name>`` (and, for people reading it, the subject's OU):

- every service (kind ``service``; ``orchestrator`` gets kind ``orchestrator``): valid for serving
  and as a client certificate (it calls the other services with it), for localhost, 127.0.0.1,
  ::1, its own name as a host name (``text-encoder`` for text_encoder, as in docker-compose) and
  every ``--hosts`` entry;
- ``client`` (kind ``user``: what `latentwire generate`, `jobs` and `classify` present) and every
  ``--users`` name; ``operator`` (kind ``operator``: the launcher and `latentwire models`) and
  every ``--operators`` name. These are client certificates only.

Services allow each kind per RPC (docs/operations.md). An existing CA in DIR is kept, so
certificates made later (another host, a replica, a new user) are trusted by the running ones.
Keys are ECDSA P-256, written readable by the owner only. For development and tests: a production
deployment takes certificates from its own CA, with the same URI SAN.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

#: Every service `latentwire up` starts, the user identity "client" and the operator identity "operator".
DEFAULT_NAMES = ("orchestrator", "text_encoder", "denoiser", "vae", "controlnet", "classifier", "registry", "client",
                 "operator")
LOOPBACK = ("localhost", "127.0.0.1", "::1")
#: A certificate name: one path segment of the SPIFFE id and a file name, so letters, digits, '.', '_', '-'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def kind_of_name(name: str) -> str:
    """The identity kind ``--names`` gives a name: "client" is a user, "operator" an operator, "orchestrator"
    the orchestrator, anything else a service."""
    from latentwire.client.security import CLIENT_NAME, OPERATOR, OPERATOR_NAME, ORCHESTRATOR, SERVICE, USER

    return {CLIENT_NAME: USER, OPERATOR_NAME: OPERATOR, ORCHESTRATOR: ORCHESTRATOR}.get(name, SERVICE)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(hosts) -> list:
    from cryptography import x509

    names, seen = [], set()
    for host in hosts:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(common_name: str = "latentwire development CA", days: int = 3650):
    """A self-signed CA certificate and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(ca_cert, ca_key, name: str, hosts, *, kind: str | None = None, server: bool = True,
              client: bool = True, days: int = 365):
    """A certificate for ``name`` signed by the CA, valid for ``hosts`` (DNS names or IP addresses).

    ``kind`` (user, operator, service, orchestrator) goes into the URI SAN ``spiffe://latentwire/<kind>/<name>``
    and the subject's OU; without it the certificate carries no kind (services treat it as a user).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from latentwire.client.security import spiffe_id

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [usage for usage, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                          (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if wanted]
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if kind is not None:
        subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    # One URI SAN only: gRPC then also reports it as the peer's SPIFFE id.
    names = _subject_names(hosts) + ([x509.UniformResourceIdentifier(spiffe_id(kind, name))] if kind else [])
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_certificates(directory: str | Path, *, names=DEFAULT_NAMES, hosts=(), days: int = 365, users=(),
                       operators=()) -> Path:
    """Write (or reuse) the CA in ``directory`` and a certificate per identity; return the folder.

    ``names`` get the kind ``kind_of_name`` says (services, the orchestrator, "client" a user, "operator" an
    operator); ``users`` and ``operators`` are more client-only identities of those kinds.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from latentwire.client.security import (CA_CERT, CA_KEY, OPERATOR, ORCHESTRATOR, SERVICE, USER, cert_file,
                                            key_file)

    identities = {**{name: kind_of_name(name) for name in names}, **dict.fromkeys(users, USER),
                  **dict.fromkeys(operators, OPERATOR)}
    for name in identities:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{name!r} is not a certificate name: use 1 to 63 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    directory = Path(directory)
    ca_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if ca_path.is_file() and ca_key_path.is_file():
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_cert, ca_key = make_ca()
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    for name, kind in identities.items():
        serves = kind in (SERVICE, ORCHESTRATOR)
        leaf_hosts = [*LOOPBACK, name.replace("_", "-"), *hosts] if serves else []
        cert, key = make_leaf(ca_cert, ca_key, name, leaf_hosts, kind=kind, server=serves, client=True, days=days)
        _write(directory / key_file(name), _key_pem(key), private=True)
        _write(directory / cert_file(name), cert.public_bytes(serialization.Encoding.PEM))
    return directory


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else []


def cmd_certs(args: argparse.Namespace) -> int:
    names = _names(args.names) or list(DEFAULT_NAMES)
    users, operators = _names(args.users), _names(args.operators)
    hosts = _names(args.hosts)
    if args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        folder = write_certificates(args.dir, names=names, hosts=hosts, days=args.days, users=users,
                                    operators=operators)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = [f"{name} ({kind_of_name(name)})" for name in names]
    written += [f"{name} (user)" for name in users] + [f"{name} (operator)" for name in operators]
    print(f"wrote a CA and {len(written)} certificate(s) to {folder}: {', '.join(written)}")
    print(f"  start the suite with mutual TLS:  latentwire up --tls-dir {folder}")
    print(f"  call it as the user 'client':     latentwire generate --tls-dir {folder} \"a prompt\"")
    return 0


def add_command(sub) -> None:
    """Register `latentwire certs` on the top-level subparsers."""
    p = sub.add_parser("certs", help="write a development CA and certificates for services, users and operators",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder to write to (an existing CA there is reused)")
    p.add_argument("--hosts", default="",
                   help="more host names or IP addresses the service certificates are valid for, comma-separated "
                        "(always: localhost, 127.0.0.1, ::1 and the service's own name)")
    p.add_argument("--names", default="",
                   help=f"identities to make, comma-separated (default: {','.join(DEFAULT_NAMES)}); 'client' is a "
                        "user, 'operator' an operator, 'orchestrator' the orchestrator, any other name a service")
    p.add_argument("--users", default="", help="more user certificates (client API only), comma-separated names")
    p.add_argument("--operators", default="",
                   help="more operator certificates (every RPC: models, status), comma-separated names")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    p.set_defaults(func=cmd_certs)
