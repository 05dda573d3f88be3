"""AUTOMATIC1111's seeds on the denoiser: variation seeds (a subseed's noise slerped into the seed's), seed resize
(the noise drawn for another size and placed in the middle), and image-to-image from latents (hires fix).

Written after A1111's modules/rng.py (ImageRNG.first) and slerp in modules/processing.py, on the diffusers draws
of this service: the run's torch.Generator("cpu") seeded with the seed draws the initial noise exactly as the
pipeline does (one draw for the whole batch), so with subseed_strength 0 and no seed resize nothing changes and
nothing else is drawn. The variation noise comes from its own generator seeded with the subseed, and a resized
seed's noise from a fresh generator seeded with the seed (A1111: ``randn(seed, noise_shape)``), both drawn for the
whole batch at once; the slerp runs per image, as A1111's does. The same applies to the noise an image-to-image
run adds to its init latents (A1111's img2img and hires second pass draw theirs the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from latentwire.client import hires
from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime import limits, tensors
from services.runtime.errors import InvalidArgument, quote


@dataclass(frozen=True)
class Variation:
    """A run's variation seed and seed resize (all zero: off)."""

    subseed: int = 0
    subseed_strength: float = 0.0
    #: Seed resize: the pixel size the noise is drawn for; 0: off.
    resize_from_width: int = 0
    resize_from_height: int = 0

    @property
    def resized(self) -> bool:
        return self.resize_from_width > 0 and self.resize_from_height > 0

    @property
    def active(self) -> bool:
        return self.subseed_strength > 0 or self.resized


def variation_of(request: denoiser_pb2.DenoiseRequest, max_image_size: int) -> Variation | None:
    """The request's variation seed and seed resize, checked; None when it sets neither."""
    limits.check_variation(request.subseed_strength, request.seed_resize_from_w, request.seed_resize_from_h,
                           max_image_size)
    variation = Variation(request.subseed, request.subseed_strength, request.seed_resize_from_w,
                          request.seed_resize_from_h)
    return variation if variation.active else None


# Copied from AUTOMATIC1111's modules/processing.py slerp (itself from the PyTorch forums): for one image's noise
# [channels, height, width], norms along dim 1 as A1111 takes them, and its linear branch (with val and 1 - val
# in A1111's order) for nearly parallel noises.
def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (val 0) to ``high`` (val 1), as AUTOMATIC1111 computes it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def initial_noise(shape, generator: torch.Generator, *, device, dtype, seed: int, variation: Variation | None,
                  from_latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The run's initial noise of ``shape`` [batch, channels, height, width]: the pipeline's draw from
    ``generator``, then (with ``variation``) A1111's ImageRNG.first on it. ``from_latent_size``: the latent
    (height, width) of the seed resize's pixel size, as the model computes latent sizes."""
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if variation is None or not variation.active:
        return noise
    batch, channels = shape[0], shape[1]
    noise_shape = (batch, channels, *from_latent_size) if variation.resized else tuple(shape)
    if variation.resized:
        base = randn_tensor(noise_shape, generator=torch.Generator("cpu").manual_seed(seed), device=device,
                            dtype=dtype)
    else:
        base = noise
    if variation.subseed_strength > 0:
        sub = randn_tensor(noise_shape, generator=torch.Generator("cpu").manual_seed(variation.subseed),
                           device=device, dtype=dtype)
        base = torch.stack([slerp(variation.subseed_strength, base[i], sub[i]) for i in range(batch)])
    if not variation.resized:
        return base
    return place(noise, base)


def place(noise: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
    """A1111's seed resize: ``resized`` [batch, channels, h, w] centred in (or cropped to the middle of) a copy of
    ``noise`` [batch, channels, H, W]."""
    x = noise.clone()
    dx = (noise.shape[3] - resized.shape[3]) // 2
    dy = (noise.shape[2] - resized.shape[2]) // 2
    w = resized.shape[3] if dx >= 0 else resized.shape[3] + 2 * dx
    h = resized.shape[2] if dy >= 0 else resized.shape[2] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    dx, dy = max(-dx, 0), max(-dy, 0)
    x[:, :, ty:ty + h, tx:tx + w] = resized[:, :, dy:dy + h, dx:dx + w]
    return x


def init_latents_of(request: denoiser_pb2.DenoiseRequest, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """DenoiseRequest.init_latents as a tensor, resized to ``latent_size`` by its latent_upscaler (A1111's hires
    fix: torch.nn.functional.interpolate with the mode's options); None when the request has none."""
    if not request.HasField("init_latents"):
        if request.latent_upscaler:
            raise InvalidArgument("latent_upscaler is set without init_latents; send the latents to resize",
                                  reason="MISSING_INIT_LATENTS", metadata={"field": "init_latents"})
        return None
    if request.HasField("image"):
        raise InvalidArgument("init_latents and image are both set; send one starting point",
                              reason="INVALID_TENSOR", metadata={"field": "init_latents"})
    latents = tensors.from_proto(request.init_latents, field="init_latents", rank=4,
                                 dtypes=(tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16,
                                         tensors.DataType.DATA_TYPE_BFLOAT16))
    if not request.latent_upscaler:
        return latents
    upscaler = hires.find_latent_upscaler(request.latent_upscaler)
    if upscaler is None:
        raise InvalidArgument(f"latent_upscaler {quote(request.latent_upscaler)} is not a latent upscale mode; use "
                              f"one of {', '.join(u.name for u in hires.LATENT_UPSCALERS)}",
                              reason="UNKNOWN_UPSCALER", metadata={"field": "latent_upscaler"})
    return upscale_latents(latents, latent_size, upscaler)


def upscale_latents(latents: torch.Tensor, latent_size: tuple[int, int], upscaler: hires.LatentUpscaler):
    """A1111's latent upscale: torch.nn.functional.interpolate to ``latent_size`` (float32 on the way, as
    interpolate's antialiased and bicubic modes want)."""
    dtype = latents.dtype
    resized = torch.nn.functional.interpolate(latents.float(), size=latent_size, mode=upscaler.mode,
                                              antialias=upscaler.antialias)
    return resized.to(dtype)


def check_init_latents(init_latents: torch.Tensor, latent_shape: list[int], batch: int, width: int, height: int,
                       denoiser: str) -> None:
    """Image-to-image from latents (hires fix): ``init_latents`` must have the model's latent shape
    (``latent_shape``, batch 1) for ``batch`` images, one per image or one for all."""
    shape = list(init_latents.shape)
    if shape[1:] != latent_shape[1:] or shape[0] < 1 or batch % shape[0]:
        raise InvalidArgument(
            f"init_latents have shape {shape}; for {batch} image(s) of {width}x{height} this {denoiser} needs "
            f"[{batch}, {', '.join(map(str, latent_shape[1:]))}] (or set latent_upscaler)",
            reason="INVALID_TENSOR", metadata={"field": "init_latents"})
