"""Gateway configuration: where the suite is, who may call the REST API and with which suite token.

The flags follow every service's conventions (services/runtime/config.py: each flag also as an
environment variable LATENTWIRE_<FLAG>); they are parsed once at start into a ``GatewaySettings``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.config import ADDRESS_PATTERN, add_flag, common_parser
from services.runtime.errors import ConfigurationError, quote
from services.runtime.security import PRINCIPAL_PATTERN

from .auth import parse_api_auth

#: Default port of the gateway, AUTOMATIC1111's.
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.gateway`."""
    parser = common_parser("latentwire gateway (AUTOMATIC1111's /sdapi/v1 REST API and the web page over the suite)",
                           DEFAULT_PORT, needs_model=False)
    add_flag(parser, "--orchestrator", default="127.0.0.1:50051", help="host:port of the orchestrator")
    add_flag(parser, "--registry", default=None,
             help="host:port of the model registry: sd-models, loras, embeddings, upscalers and sd-vae list its "
                  "models (unset: only the suite's own models)")
    add_flag(parser, "--checkpoint", action="append", default=[],
             help="name of a model the suite's stages serve, for sd-models and options (repeatable; the first is "
                  "the default; registry models are listed without it)")
    add_flag(parser, "--api-auth", default=None,
             help="HTTP basic credentials of the REST API and page, AUTOMATIC1111's user:password[,user:password...]"
                  " (unset: open to anyone who reaches the port)")
    add_flag(parser, "--suite-token", default=None,
             help="bearer token the gateway sends to the suite for callers without a token of their own "
                  "(the orchestrator's --auth-tokens-file lists it)")
    add_flag(parser, "--suite-tls-cert", default=None,
             help="PEM client certificate the gateway presents to the suite (mutual TLS; a user certificate, "
                  "`latentwire certs DIR --users NAME`); default: --tls-cert")
    add_flag(parser, "--suite-tls-key", default=None, help="PEM private key of --suite-tls-cert")
    add_flag(parser, "--preview-interval", default=2, type=int,
             help="steps between two live previews of a running job (/sdapi/v1/progress current_image); 0: none")
    add_flag(parser, "--request-timeout-s", default=600.0, type=float,
             help="seconds one REST generation may take, queueing included, before it is refused as timed out")
    return parser


@dataclass
class GatewaySettings:
    """Everything the gateway reads at start."""

    orchestrator: str
    registry: str | None = None
    #: ``--checkpoint``: names of the models the stages serve (the first is the default).
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: ``--api-auth``: user name -> password (empty: no auth).
    api_users: dict[str, str] = field(default_factory=dict)
    #: user name -> suite token, from ``--auth-tokens-file`` (the orchestrator's token file: the line whose
    #: ``principal=`` is the user's name).
    user_tokens: dict[str, str] = field(default_factory=dict)
    #: user name -> the principal its jobs carry.
    principals: dict[str, str] = field(default_factory=dict)
    suite_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: The client identity on the suite's channels (None: tls_cert/tls_key).
    suite_tls_cert: str | None = None
    suite_tls_key: str | None = None
    max_message_bytes: int = 256 * 1024 * 1024
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    grace_period_s: float = 10.0
    preview_interval: int = 2
    request_timeout_s: float = 600.0
    log_level: str = "INFO"


def read_user_tokens(path: str) -> dict[str, str]:
    """principal -> token from a token file in the orchestrator's ``--auth-tokens-file`` format
    (``TOKEN [SCOPES] principal=NAME`` a line); lines without ``principal=`` are skipped."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as error:
        raise ConfigurationError(f"--auth-tokens-file: cannot read it ({error.strerror or 'unreadable'})") from None
    tokens: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        for word in words[1:]:
            if word.startswith("principal="):
                tokens.setdefault(word[len("principal="):], words[0])
    return tokens


def settings_from_flags(argv: list[str] | None = None) -> GatewaySettings:
    """Parse the flags; ConfigurationError (or the parser's usage error) saying what to fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--orchestrator", args.orchestrator), ("--registry", args.registry)):
        if value and not ADDRESS_PATTERN.match(value):
            parser.error(f"{flag} {quote(value)}: give HOST:PORT")
    try:
        users = parse_api_auth(args.api_auth)
    except ValueError as error:
        parser.error(str(error))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together: give the gateway's certificate and its key")
    if bool(args.suite_tls_cert) != bool(args.suite_tls_key):
        parser.error("--suite-tls-cert and --suite-tls-key go together: give the client certificate and its key")
    user_tokens = read_user_tokens(args.auth_tokens_file) if args.auth_tokens_file else {}
    for name in users:
        if not PRINCIPAL_PATTERN.fullmatch(name):
            parser.error("--api-auth user names take 1 to 64 letters, digits, '.', '_', '@' or '-' (they are the "
                         "suite principals of the users' jobs)")
    return GatewaySettings(
        orchestrator=args.orchestrator, registry=args.registry, models=list(args.checkpoint or []), host=args.host,
        port=args.port, api_users=users,
        user_tokens=user_tokens, principals={name: name for name in users}, suite_token=args.suite_token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, suite_tls_cert=args.suite_tls_cert,
        suite_tls_key=args.suite_tls_key, max_message_bytes=args.max_message_bytes,
        keepalive_time_s=args.keepalive_time_s, keepalive_timeout_s=args.keepalive_timeout_s,
        grace_period_s=args.grace_period_s, preview_interval=args.preview_interval,
        request_timeout_s=args.request_timeout_s, log_level=args.log_level)
