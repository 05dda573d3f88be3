"""Locally built tiny preview VAEs: diffusers ``AutoencoderTiny`` folders with random weights.

A preview VAE folder is a standalone ``AutoencoderTiny`` (config.json and diffusion_pytorch_model.safetensors), as
TAESD / TAESDXL / TAESD3 / TAEF1 come from the hub and as the registry imports them (MODEL_KIND_PREVIEW_VAE).
The tiny ones use the small config of diffusers' own AutoencoderTiny tests
(tests/models/autoencoders/test_models_autoencoder_tiny.py ``get_autoencoder_tiny_config``: two blocks of 32
channels, one tiny block each, so the decoder upsamples 2x) with the latent channels and the scaling and shift
factors of the preview VAE they stand for:

- "taesd": 4 latent channels, scaling factor 1 and no shift, as madebyollin/taesd (SD 1.x/2.x; TAESDXL alike);
- "taesd3": 16 channels, scaling 1.5305 and shift 0.0609, as madebyollin/taesd3;
- "taef1": 16 channels, scaling 0.3611 and shift 0.1159, as madebyollin/taef1 (Flux).

With ``full_size=True`` the architecture is TAESD's own (AutoencoderTiny's defaults: 64 channels, 1/3/3/3 encoder
and 3/3/3/1 decoder blocks, 8x), for benchmarks.

A freshly initialised decoder's last convolution puts almost every pixel near -1 (black after clamping), where a
preview test could not tell one decode from another; it is re-initialised with a seeded generator so the images
spread over the whole range.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from .folder import save_pipeline_folder

__all__ = ["PREVIEW_VAES", "create_tiny_preview_vae"]

#: Tiny preview VAEs by name: (latent channels, scaling factor, shift factor) of the preview VAE each stands for.
PREVIEW_VAES = {
    "taesd": (4, 1.0, 0.0),
    "taesd3": (16, 1.5305, 0.0609),
    "taef1": (16, 0.3611, 0.1159),
}


def _build(kind: str, full_size: bool, seed: int) -> AutoencoderTiny:
    if kind not in PREVIEW_VAES:
        raise ValueError(f"unknown tiny preview VAE {kind!r}; expected one of {', '.join(PREVIEW_VAES)}")
    channels, scaling_factor, shift_factor = PREVIEW_VAES[kind]
    # diffusers' test config (two 32-channel blocks, one tiny block each), or TAESD's architecture (the defaults).
    sizes = {} if full_size else dict(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                                      num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    with torch.random.fork_rng(devices=[]):  # our reseeding must not disturb the caller's global RNG stream
        torch.manual_seed(seed)
        vae = AutoencoderTiny(latent_channels=channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
                              **sizes)
    last = vae.decoder.layers[-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # pixels spread over [0, 1] (see the module docstring)
        torch.nn.init.normal_(last.weight, std=1.5 / math.sqrt(last.weight[0].numel()), generator=generator)
        torch.nn.init.constant_(last.bias, 0.5)
    if any(param.dtype != torch.float32 for param in vae.parameters()):  # whatever the default dtype
        vae = vae.to(torch.float32)
    return vae.eval()


def create_tiny_preview_vae(path: str | os.PathLike[str], kind: str = "taesd", *, full_size: bool = False,
                            seed: int = 0) -> Path:
    """Write a random-weight AutoencoderTiny folder (safetensors) of ``kind`` (one of :data:`PREVIEW_VAES`) to
    ``path``, atomically; the same arguments always give the same bytes.

    Raises:
        ValueError: ``kind`` is not one of :data:`PREVIEW_VAES`.
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    return save_pipeline_folder(lambda: _build(kind, full_size, seed), path)
