"""Live preview options (PreviewOptions): their defaults and the one check the orchestrator and the denoiser share.

The pixels are made in the denoiser (services/denoiser/preview.py); nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument, quote

#: Steps between two previews when a request asks for previews without an interval (AUTOMATIC1111's default
#: "show new live preview image every N sampling steps" is 10; latentwire's runs are shorter).
DEFAULT_INTERVAL = 5
#: Preview image formats (Pillow format names, lower case).
FORMATS = ("jpeg", "webp")
#: How latents become preview pixels: "approx" (A1111's "Approx cheap") or "tiny-vae" (a tiny preview VAE,
#: services/denoiser/preview_vae.py).
METHODS = ("approx", "tiny-vae")
#: JPEG / WebP quality of a preview (small images, seen for a moment).
QUALITY = 80

#: The reason of a PreviewOptions value out of range.
INVALID_PREVIEW_OPTIONS = "INVALID_PREVIEW_OPTIONS"


@dataclass(frozen=True)
class Previews:
    """Resolved preview options of one run."""

    #: A preview after every ``interval`` steps.
    interval: int = DEFAULT_INTERVAL
    #: "jpeg" or "webp".
    format: str = "jpeg"
    #: "approx" or "tiny-vae".
    method: str = "approx"
    #: The preview VAE (a registry reference) of method "tiny-vae"; "": the denoiser's configured one for the
    #: model's family. Always "" for "approx".
    preview_vae: str = ""


def from_proto(message, field: str = "previews") -> Previews:
    """Check a set PreviewOptions message and fill its defaults (interval 0: 5; format and method empty: jpeg,
    approx). Which preview VAE "tiny-vae" uses, and whether it fits the model, the denoiser decides."""
    if message.interval < 0:
        raise InvalidArgument(f"{field}.interval is {message.interval}; use a positive number of steps (0: every "
                              f"{DEFAULT_INTERVAL} steps) or leave {field} unset for no previews",
                              reason=INVALID_PREVIEW_OPTIONS, metadata={"field": f"{field}.interval"})
    image_format = message.format.lower() or "jpeg"
    if image_format not in FORMATS:
        raise InvalidArgument(f"{field}.format is {quote(message.format)}; use one of {', '.join(FORMATS)}",
                              reason=INVALID_PREVIEW_OPTIONS, metadata={"field": f"{field}.format"})
    method = message.method.lower() or "approx"
    if method not in METHODS:
        raise InvalidArgument(f"{field}.method is {quote(message.method)}; use one of {', '.join(METHODS)}",
                              reason=INVALID_PREVIEW_OPTIONS, metadata={"field": f"{field}.method"})
    preview_vae = message.preview_vae.name if method == "tiny-vae" else ""
    return Previews(message.interval or DEFAULT_INTERVAL, image_format, method, preview_vae)


def to_proto(previews: Previews, message):
    """Fill a PreviewOptions ``message`` with resolved options (every default explicit); returns it."""
    message.interval, message.format, message.method = previews.interval, previews.format, previews.method
    if previews.preview_vae:
        message.preview_vae.name = previews.preview_vae
    return message


def check_vae_tiling(value: int, field: str = "vae_tiling") -> int:
    """A VaeTiling value this version knows (0 automatic, 1 on, 2 off)."""
    if value not in (0, 1, 2):
        raise InvalidArgument(f"{field} is {value}; use VAE_TILING_UNSPECIFIED (automatic), VAE_TILING_ON or "
                              "VAE_TILING_OFF", reason="INVALID_VAE_TILING", metadata={"field": field})
    return value
