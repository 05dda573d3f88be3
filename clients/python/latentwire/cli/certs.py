"""`latentwire certs DIR`: a development CA and one certificate per service, for TLS and mutual TLS.

    latentwire certs ./certs [--hosts gpu-1,10.0.0.7] [--names orchestrator,denoiser,...] [--days 365]

Writes ``ca.pem`` and ``ca-key.pem``, then ``<name>.pem`` and ``<name>-key.pem`` for every service
and for ``client`` (the identity the CLI, the launcher and the tests present). Each service
certificate is valid for serving and as a client certificate (it calls the other services with
it), for localhost, 127.0.0.1, ::1, its own name as a host name (``text-encoder`` for
text_encoder, as in docker-compose) and every ``--hosts`` entry. An existing CA in DIR is kept, so
certificates made later (another host, another replica name) are trusted by the running ones.
Keys are ECDSA P-256, written readable by the owner only. For development and tests: a
production deployment takes certificates from its own CA.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

#: Every service `latentwire up` starts, and the client identity.
DEFAULT_NAMES = ("orchestrator", "text_encoder", "denoiser", "vae", "controlnet", "classifier", "registry", "client")
LOOPBACK = ("localhost", "127.0.0.1", "::1")


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


def make_leaf(ca_cert, ca_key, name: str, hosts, *, server: bool = True, client: bool = True, days: int = 365):
    """A certificate for ``name`` signed by the CA, valid for ``hosts`` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [usage for usage, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                          (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if wanted]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
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
    names = _subject_names(hosts)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_certificates(directory: str | Path, *, names=DEFAULT_NAMES, hosts=(), days: int = 365) -> Path:
    """Write (or reuse) the CA in ``directory`` and a certificate per name; return the folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from latentwire.client.security import CA_CERT, CA_KEY, CLIENT_NAME, cert_file, key_file

    directory = Path(directory)
    ca_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if ca_path.is_file() and ca_key_path.is_file():
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_cert, ca_key = make_ca()
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in names:
        is_client = name == CLIENT_NAME
        leaf_hosts = [*LOOPBACK, *hosts] if is_client else [*LOOPBACK, name.replace("_", "-"), *hosts]
        cert, key = make_leaf(ca_cert, ca_key, name, leaf_hosts, server=not is_client, client=True, days=days)
        _write(directory / key_file(name), _key_pem(key), private=True)
        _write(directory / cert_file(name), cert.public_bytes(serialization.Encoding.PEM))
    return directory


def cmd_certs(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else list(DEFAULT_NAMES)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else []
    if args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return 2
    folder = write_certificates(args.dir, names=names, hosts=hosts, days=args.days)
    print(f"wrote a CA and {len(names)} certificate(s) to {folder}: {', '.join(names)}")
    print(f"  start the suite with mutual TLS:  latentwire up --tls-dir {folder}")
    print(f"  call it:                          latentwire generate --tls-dir {folder} \"a prompt\"")
    return 0


def add_command(sub) -> None:
    """Register `latentwire certs` on the top-level subparsers."""
    p = sub.add_parser("certs", help="write a development CA and a certificate per service (TLS, mutual TLS)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder to write to (an existing CA there is reused)")
    p.add_argument("--hosts", default="",
                   help="more host names or IP addresses the certificates are valid for, comma-separated "
                        "(always: localhost, 127.0.0.1, ::1 and the service's own name)")
    p.add_argument("--names", default="",
                   help=f"identities to make, comma-separated (default: {','.join(DEFAULT_NAMES)})")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    p.set_defaults(func=cmd_certs)
