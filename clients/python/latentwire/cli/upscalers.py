"""`latentwire upscalers`: the hires fix upscalers, built in and in the model registry.

    latentwire upscalers [--builtin-only] [--registry ADDR]

Built-in: AUTOMATIC1111's latent modes and PIL filters (latentwire.client.hires). Registry: every model whose
default version (its "default" alias, else its latest) is an ESRGAN-type upscaler (kind MODEL_KIND_UPSCALER), run
on the VAE stage; name one in `latentwire generate --hires-upscaler NAME`.
"""
from __future__ import annotations

import argparse


def cmd_upscalers(args: argparse.Namespace) -> int:
    """Print the built-in upscalers, then the registry's upscaler models (unless --builtin-only)."""
    from latentwire.client import hires

    print("Built-in upscalers (latent: resized latents; pixel: decoded, resized with PIL, encoded)")
    for upscaler in hires.LATENT_UPSCALERS:
        print(f"  {upscaler.name}: latent, torch interpolate {upscaler.mode}"
              f"{' (antialiased)' if upscaler.antialias else ''}")
    for name, resample in hires.PIXEL_UPSCALERS.items():
        print(f"  {name}: pixel, PIL {resample}")
    if args.builtin_only:
        return 0
    from latentwire.client.registry import RegistryClient
    from latentwire.client.security import OPERATOR_NAME
    from latentwire.registry.v1 import registry_pb2

    from .connection import client_kwargs

    security = client_kwargs(args, identity=OPERATOR_NAME)["security"]
    found = []
    with RegistryClient(args.registry, timeout=args.timeout, security=security) as registry:
        for model in registry.iter_models():
            if not model.latest_version:
                continue
            version = registry.resolve(model.model_id)
            if version.kind == registry_pb2.MODEL_KIND_UPSCALER:
                size = sum(f.size_bytes for f in version.files)
                found.append(f"  {model.model_id}@{version.version}: ESRGAN-type model, {size / 1e6:.1f} MB")
    print(f"Registry upscaler models ({len(found)})")
    for line in found:
        print(line)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add `latentwire upscalers`."""
    from .connection import add_flags

    p = sub.add_parser("upscalers", help="list hires fix upscalers: built in, and the registry's upscaler models")
    p.add_argument("--builtin-only", action="store_true", help="only the built-in upscalers; asks no registry")
    p.add_argument("--registry", default=None,
                   help="registry address host:port (default: $LATENTWIRE_REGISTRY, else localhost:50055)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each registry call, in seconds")
    add_flags(p, token=False)
    p.set_defaults(func=cmd_upscalers)
