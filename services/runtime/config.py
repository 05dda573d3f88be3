"""Configuration shared by every service: command-line flags, each with an environment variable.

Every flag ``--some-name`` can also be set as ``LATENTWIRE_SOME_NAME``; the flag wins. Defaults
are documented in ``--help`` and docs/configuration.md.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentwire.client.channels import DEFAULT_MAX_MESSAGE_BYTES
from latentwire.client.home import default_home  # noqa: F401 - the one LATENTWIRE_HOME resolver, re-exported

from . import limits
from .errors import ConfigurationError, quote


def env_name(flag: str) -> str:
    """The environment variable behind a flag: --max-message-bytes -> LATENTWIRE_MAX_MESSAGE_BYTES."""
    return "LATENTWIRE_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse.ArgumentParser, flag: str, *, default=None, help: str, **kwargs) -> None:
    """Add a flag whose default comes from its environment variable, then from ``default``."""
    env = env_name(flag)
    value = os.environ.get(env)
    if value is not None and kwargs.get("action") == "store_true":
        default = value.strip().lower() in ("1", "true", "yes", "on")
    elif value is not None and kwargs.get("action") == "append":
        default = [v for v in value.split(",") if v]
    elif value is not None:
        default = kwargs["type"](value) if "type" in kwargs else value
    shown = f" (env {env}; default: {default})"
    parser.add_argument(flag, default=default, help=help + shown, **kwargs)


def add_limit_flag(parser: argparse.ArgumentParser, flag: str, *, hard_limit: int, default: int | None = None,
                   minimum: int = 1, help: str) -> None:
    """Add a flag that may only lower one of the hard limits in limits.py (default: the hard limit itself).

    A larger value is lowered to the hard limit rather than refused, so a deployment written for a looser
    bound still starts; the help says so.
    """
    add_flag(parser, flag, default=hard_limit if default is None else default,
             type=limits.flag_at_most(hard_limit, minimum),
             help=f"{help}; at most {hard_limit} (a larger value is lowered to it)")


#: A service address as flags and placement files give it: HOST:PORT, [IPv6]:PORT or unix:PATH.
ADDRESS_PATTERN = re.compile(r"^(unix:.+|\[[0-9A-Fa-f:.]+\]:\d{1,5}|[A-Za-z0-9_.\-]+:\d{1,5})$")


@dataclass(frozen=True)
class ModelSpec:
    """A model a service can load: the name requests use and, for a local model, its folder.

    ``path`` is None for a registry reference ("name", "name@3", "name@alias"), resolved and
    fetched from the registry when first needed.
    """

    name: str
    path: Path | None
    is_default: bool = False


def parse_model_specs(values: list[str] | None, *, registry: str | None = None) -> list[ModelSpec]:
    """Parse ``--model`` values; the first is the default model.

    ``NAME=PATH`` and anything with a '/' name a local diffusers folder. A bare name is a
    registry reference when ``--registry`` is given, else a folder in the working directory.
    Raises ConfigurationError saying what to fix.
    """
    specs: list[ModelSpec] = []
    for index, value in enumerate(values or []):
        name, sep, path = value.partition("=")
        if not sep:
            path, name = value, Path(value).name
        name = name.strip()
        if not name:
            raise ConfigurationError(f"--model {quote(value)}: the model name is empty; use NAME=PATH")
        if any(s.name == name for s in specs):
            raise ConfigurationError(f"--model {quote(value)}: the name {quote(name)} is given twice")
        folder = Path(path).expanduser()
        if sep or "/" in value or (not registry and folder.exists()):
            specs.append(ModelSpec(name=name, path=folder, is_default=index == 0))
        elif registry:
            specs.append(ModelSpec(name=value, path=None, is_default=index == 0))
        else:
            raise ConfigurationError(f"--model {quote(value)}: no such folder; pass a model folder, or --registry "
                                     "ADDRESS to fetch models by reference from the registry")
    return specs


@dataclass
class ServiceConfig:
    """What every service is configured with; service-specific settings stay in ``extra``."""

    host: str
    port: int
    models: list[ModelSpec]
    device: str
    dtype: str
    allow_pickle: bool
    max_message_bytes: int
    keepalive_time_s: float
    keepalive_timeout_s: float
    grace_period_s: float
    max_concurrent_jobs: int
    log_level: str
    registry: str | None = None
    cache_dir: Path | None = None
    max_model_bytes: int = 0
    #: TLS (services/runtime/security.py): this service's certificate and key, the CA bundle peers are
    #: verified against, and whether clients must present a certificate (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: bool = False
    #: Bearer tokens, their scopes and principals (None: no token needed).
    auth_tokens_file: str | None = None
    #: Port of the Prometheus /metrics endpoint (None: off; 0 picks a free one).
    metrics_port: int | None = None
    extra: argparse.Namespace = field(default_factory=argparse.Namespace)


def common_parser(description: str, default_port: int, *, needs_model: bool = True, max_concurrent_jobs: int = 4,
                  max_concurrent_jobs_help: str = "jobs run at once; more get RESOURCE_EXHAUSTED"
                  ) -> argparse.ArgumentParser:
    """An argument parser holding the flags every service takes."""
    parser = argparse.ArgumentParser(description=description)
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every interface)")
    add_flag(parser, "--port", default=default_port, type=int, help="TCP port to listen on; 0 picks a free port")
    if needs_model:
        add_flag(
            parser,
            "--model",
            action="append",
            help="model folder in diffusers format, as PATH or NAME=PATH; repeatable, the first is the default",
        )
        add_flag(parser, "--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
        add_flag(parser, "--dtype", default="float32", choices=limits.DTYPES, help="weight dtype")
        add_flag(parser, "--registry", default=None,
                 help="host:port of the model registry; --model and requests may then name registry models "
                      "(name, name@VERSION, name@ALIAS)")
        add_flag(parser, "--cache-dir", default=None,
                 help="where registry files are cached, keyed by sha256 (default $LATENTWIRE_HOME/cache)")
        add_flag(parser, "--max-model-bytes", default=0, type=int,
                 help="memory bound for loaded models in bytes; the least recently used are unloaded first "
                      "(0: no bound)")
        add_flag(
            parser,
            "--allow-pickle",
            action="store_true",
            default=False,
            help="also load pickle-based weights (.bin/.ckpt); off by default since unpickling runs code",
        )
    add_flag(parser, "--max-message-bytes", default=DEFAULT_MAX_MESSAGE_BYTES, type=int,
             help="largest gRPC message sent or received, in bytes")
    add_flag(parser, "--keepalive-time-s", default=30.0, type=float,
             help="seconds between keepalive pings on idle connections; clients must not ping more often")
    add_flag(parser, "--keepalive-timeout-s", default=10.0, type=float,
             help="seconds to wait for a keepalive ack before closing the connection")
    add_flag(parser, "--grace-period-s", default=10.0, type=float,
             help="on SIGTERM, seconds in-flight calls get to finish before they are aborted")
    add_flag(parser, "--max-concurrent-jobs", default=max_concurrent_jobs, type=int, help=max_concurrent_jobs_help)
    add_flag(parser, "--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING, ERROR")
    add_flag(parser, "--tls-cert", default=None,
             help="PEM certificate (chain) of this service: serve TLS with it, and present it as the client "
                  "certificate on outgoing calls")
    add_flag(parser, "--tls-key", default=None, help="PEM private key of --tls-cert")
    add_flag(parser, "--tls-ca", default=None,
             help="PEM CA bundle peers are verified against; also turns on TLS for every outgoing channel")
    add_flag(parser, "--tls-client-auth", action="store_true", default=False,
             help="mutual TLS: refuse clients without a certificate signed by --tls-ca, and let each RPC be "
                  "called only by the identity kinds (user, operator, service, orchestrator) allowed to "
                  "(docs/operations.md)")
    add_flag(parser, "--auth-tokens-file", default=None,
             help="file of accepted bearer tokens, one 'TOKEN [SCOPE,...] [principal=NAME]' a line (scopes: "
                  "generate, classify, admin; none listed: all); calls without a valid token are refused, except "
                  "those of service and orchestrator certificates (health and reflection stay open)")
    add_flag(parser, "--metrics-port", default=None, type=int,
             help="serve Prometheus metrics over HTTP at /metrics on this port (0 picks a free one; unset: off)")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None, *, needs_model: bool = True) -> ServiceConfig:
    """Parse flags into a ServiceConfig; refuses to go on, with a clear message, when a needed model is missing."""
    args = parser.parse_args(argv)
    registry = getattr(args, "registry", None)
    models = parse_model_specs(getattr(args, "model", None), registry=registry) if needs_model else []
    if needs_model and not models:
        parser.error("no model configured: pass --model PATH (a diffusers model folder), --model NAME with "
                     "--registry ADDRESS, or set LATENTWIRE_MODEL")
    if args.max_concurrent_jobs < 1:
        parser.error("--max-concurrent-jobs must be at least 1")
    common = {"host", "port", "model", "device", "dtype", "allow_pickle", "max_message_bytes", "keepalive_time_s",
              "keepalive_timeout_s", "grace_period_s", "max_concurrent_jobs", "log_level", "registry", "cache_dir",
              "max_model_bytes", "tls_cert", "tls_key", "tls_ca", "tls_client_auth", "auth_tokens_file",
              "metrics_port"}
    extra = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in common})
    return ServiceConfig(
        host=args.host,
        port=args.port,
        models=models,
        device=getattr(args, "device", "cpu"),
        dtype=getattr(args, "dtype", "float32"),
        allow_pickle=getattr(args, "allow_pickle", False),
        max_message_bytes=args.max_message_bytes,
        keepalive_time_s=args.keepalive_time_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
        grace_period_s=args.grace_period_s,
        max_concurrent_jobs=args.max_concurrent_jobs,
        log_level=args.log_level,
        registry=registry,
        cache_dir=Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else default_home() / "cache",
        max_model_bytes=getattr(args, "max_model_bytes", 0),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_client_auth=args.tls_client_auth,
        auth_tokens_file=args.auth_tokens_file,
        metrics_port=args.metrics_port,
        extra=extra,
    )
