"""Hires fix upscalers by their AUTOMATIC1111 names, shared by the orchestrator (which checks a request), the
denoiser (which resizes latents) and the CLI. Light: no torch here, only the names and what they stand for."""
from __future__ import annotations

from dataclasses import dataclass

from latentwire.orchestrator.v1 import orchestrator_pb2


@dataclass(frozen=True)
class LatentUpscaler:
    """An AUTOMATIC1111 latent upscale mode: torch.nn.functional.interpolate(latents, size, mode, antialias)."""

    name: str
    mode: str
    antialias: bool = False


#: AUTOMATIC1111's shared.latent_upscale_modes, in its order.
LATENT_UPSCALERS = (
    LatentUpscaler("Latent", "bilinear"),
    LatentUpscaler("Latent (antialiased)", "bilinear", antialias=True),
    LatentUpscaler("Latent (bicubic)", "bicubic"),
    LatentUpscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    LatentUpscaler("Latent (nearest)", "nearest"),
    LatentUpscaler("Latent (nearest-exact)", "nearest-exact"),
)
#: Upscalers that resize decoded pixels with PIL (AUTOMATIC1111's "Lanczos" and "Nearest"): name -> PIL resample
#: filter name (PIL.Image.Resampling member).
PIXEL_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
#: The upscaler a hires fix uses when the request names none (AUTOMATIC1111's default).
DEFAULT_UPSCALER = "Latent"
#: Second-pass denoising strength when the request sets none (AUTOMATIC1111's default).
DEFAULT_DENOISING_STRENGTH = 0.7
#: Upscale factor when the request sets neither a scale nor a size (AUTOMATIC1111's default).
DEFAULT_SCALE = 2.0


def find_latent_upscaler(name: str) -> LatentUpscaler | None:
    """The latent upscaler of this name (case-insensitive), or None."""
    for upscaler in LATENT_UPSCALERS:
        if upscaler.name.lower() == name.strip().lower():
            return upscaler
    return None


def canonical_upscaler(name: str) -> str | None:
    """The upscaler's name as the table spells it ("" means the default), or None for an unknown name."""
    name = name.strip() or DEFAULT_UPSCALER
    latent = find_latent_upscaler(name)
    if latent is not None:
        return latent.name
    for pixel in PIXEL_UPSCALERS:
        if pixel.lower() == name.lower():
            return pixel
    return None


def upscaler_names() -> list[str]:
    """Every upscaler name a hires fix accepts, latent modes first."""
    return [u.name for u in LATENT_UPSCALERS] + list(PIXEL_UPSCALERS)


def target_size(width: int, height: int, scale: float, resize_width: int, resize_height: int) -> tuple[int, int]:
    """The second pass's size in pixels: resize_width x resize_height (one of them 0: the other from the aspect
    ratio), else the first pass's size times ``scale``; rounded down to multiples of 8."""
    if resize_width or resize_height:
        target_w = resize_width or resize_height * width / height
        target_h = resize_height or resize_width * height / width
    else:
        target_w, target_h = width * scale, height * scale
    return int(target_w) // 8 * 8, int(target_h) // 8 * 8


def hires_fix(upscaler: str = "", *, scale: float = 0.0, resize: tuple[int, int] = (0, 0), steps: int = 0,
              denoising_strength: float | None = None, sampler: str = "", refiner_pass: str = ""):
    """A GenerateRequest.hires message; 0, "" and None leave a setting to its default (scale 2, upscaler "Latent",
    the first pass's steps and sampler, denoising strength 0.7)."""
    fix = orchestrator_pb2.HiresFix(upscaler=upscaler, scale=scale, resize_width=resize[0], resize_height=resize[1],
                                    steps=steps, sampler=sampler)
    if denoising_strength is not None:
        fix.denoising_strength = denoising_strength
    if refiner_pass:  # with a refiner: "first pass", "second pass" or "both passes" (hires_refiner.py)
        from . import hires_refiner

        choice = hires_refiner.find(refiner_pass)
        if choice is None:
            raise ValueError(f"hires refiner pass {refiner_pass!r} is not one of {', '.join(hires_refiner.names())}")
        fix.refiner_pass = hires_refiner.to_proto(choice)
    return fix
