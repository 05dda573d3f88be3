"""Live previews: every N steps the denoising loop's latents become a small JPEG or WebP image, made on the job's
compute thread and sent with that step's message (DenoiseStep.preview_image).

Method "approx" (the default) makes AUTOMATIC1111's "Approx cheap" preview (modules/sd_vae_approx.py
``cheap_approximation`` and modules/sd_samplers_common.py ``single_sample_to_image``): a fixed linear map of the
latent channels to RGB per model family, at the latents' size, then ``x * 0.5 + 0.5`` clamped to [0, 1] and
truncated to 8 bits. Method "tiny-vae" decodes with a tiny preview VAE (an AutoencoderTiny, preview_vae.py) as the
family's pipeline would. Flux's packed latents are unpacked first. A batch previews as one image, its latents side
by side.

The loop itself is not touched: ``emitter`` wraps the function the loop calls after each step, and passes every
other step's event on as it is (previews off, nothing is wrapped).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable

import numpy as np
import torch
from PIL import Image

from services.runtime import previews as preview_options
from services.runtime.errors import FailedPrecondition

from .preview_vae import to_pixels as tiny_vae_pixels

# Copied from AUTOMATIC1111's modules/sd_vae_approx.py cheap_approximation (coefficients [latent channel][R, G, B]).
_SD = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
         (-0.3730, -0.2499, -0.2088))
_SD3 = ((-0.0645, 0.0177, 0.1052), (0.0028, 0.0312, 0.0650), (0.1848, 0.0762, 0.0360), (0.0944, 0.0360, 0.0889),
        (0.0897, 0.0506, -0.0364), (-0.0020, 0.1203, 0.0284), (0.0855, 0.0118, 0.0283), (-0.0539, 0.0658, 0.1047),
        (-0.0057, 0.0116, 0.0700), (-0.0412, 0.0281, -0.0039), (0.1106, 0.1171, 0.1220), (-0.0248, 0.0682, -0.0481),
        (0.0815, 0.0846, 0.1207), (-0.0120, -0.0055, -0.0867), (-0.0749, -0.0634, -0.0456),
        (-0.1418, -0.1457, -0.1259))
_FLUX = ((-0.0404, 0.0159, 0.0609), (0.0043, 0.0298, 0.0850), (0.0328, -0.0749, -0.0503), (-0.0245, 0.0085, 0.0549),
         (0.0966, 0.0894, 0.0530), (0.0035, 0.0399, 0.0123), (0.0583, 0.1184, 0.1262), (-0.0191, -0.0206, -0.0306),
         (-0.0324, 0.0055, 0.1001), (0.0955, 0.0659, -0.0545), (-0.0504, 0.0231, -0.0013), (0.0500, -0.0008, -0.0088),
         (0.0982, 0.0941, 0.0976), (-0.1233, -0.0280, -0.0897), (-0.0005, -0.0530, -0.0020), (-0.1273, -0.0932, -0.0680))
#: The "Approx cheap" coefficients of each family (by services/runtime/families.py name).
COEFFICIENTS = {"sd": _SD, "sdxl": _SDXL, "sdxl-refiner": _SDXL, "sd3": _SD3, "flux": _FLUX}


def check_model(model) -> None:
    """Refuse previews for a model whose latents the family's map does not fit (a model with other latent channels)."""
    rows = COEFFICIENTS.get(model.family.name, ())
    if len(rows) != model.latent_channels:
        raise FailedPrecondition(f"this model's latents have {model.latent_channels} channels; the approx preview of "
                                 f"{model.family.title} maps {len(rows)}; leave previews unset",
                                 reason="PREVIEW_NOT_SUPPORTED", metadata={"field": "previews"})


def options(request, model) -> preview_options.Previews | None:
    """The checked preview options of a DenoiseRequest for ``model``; None when it asks for none. (Whether a
    "tiny-vae" preview VAE fits the model, preview_vae.PreviewVaes checks as it loads it.)"""
    if not request.HasField("previews"):
        return None
    previews = preview_options.from_proto(request.previews)
    if previews.method == "approx":
        check_model(model)
    return previews


def approximate(latents: torch.Tensor, family: str) -> torch.Tensor:
    """A1111's cheap_approximation: [batch, channels, h, w] latents -> [batch, 3, h, w] RGB in about [-1, 1]."""
    coefficients = torch.tensor(COEFFICIENTS[family], device=latents.device)
    return torch.einsum("...lxy,lr -> ...rxy", latents.float(), coefficients)


def to_pixels(latents: torch.Tensor, family: str) -> np.ndarray:
    """[batch, channels, h, w] latents -> one [h, w * batch, 3] uint8 image, as A1111's single_sample_to_image turns
    each sample into 8 bits (x * 0.5 + 0.5, clamped, times 255, truncated), samples side by side."""
    x = torch.clamp(approximate(latents, family) * 0.5 + 0.5, min=0.0, max=1.0)
    x = 255.0 * np.moveaxis(x.cpu().numpy(), 1, 3)  # [batch, h, w, 3]
    return np.concatenate(list(x.astype(np.uint8)), axis=1)


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    """A uint8 [h, w, 3] image as JPEG or WebP bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), quality=preview_options.QUALITY)
    return buffer.getvalue()


def preview(latents: torch.Tensor, family: str, image_format: str) -> bytes:
    """The preview image of a step's (unpacked) latents."""
    return encode(to_pixels(latents, family), image_format)


def render(latents: torch.Tensor, family: str, options: preview_options.Previews, preview_vae=None) -> bytes:
    """The preview image of a step's (unpacked) latents by ``options.method``: the approx map, or the decode of
    ``preview_vae`` (preview_vae.PreviewVae) for "tiny-vae"."""
    if options.method == "tiny-vae":
        return encode(tiny_vae_pixels(latents, family, preview_vae), options.format)
    return preview(latents, family, options.format)


def emitter(emit: Callable, options: preview_options.Previews | None, model, params, preview_vae=None) -> Callable:
    """``emit`` with a preview on the events of every ``options.interval``-th step; ``emit`` itself
    when ``options`` is None. Runs on the loop's thread: the event carries the step's latents (``latents``, as the
    loop holds them; Flux's packed, unpacked here). ``preview_vae`` (preview_vae.PreviewVae): the decoder of
    method "tiny-vae"."""
    if options is None:
        return emit
    family = model.family.name
    unpack = getattr(model, "_unpack", None) if getattr(model, "is_flux", False) else None
    def emit_with_preview(event):
        if event.latents is not None and event.step % options.interval == 0:
            latents = unpack(event.latents, params) if unpack is not None else event.latents
            event = dataclasses.replace(event, preview=render(latents, family, options, preview_vae),
                                        preview_format=options.format)
        emit(event)

    return emit_with_preview
