"""Tiny random-weight Flux models in diffusers' folder format.

Shapes are those of diffusers' own Flux fast test (get_dummy_components of tests/pipelines/
flux/test_pipeline_flux.py): a FluxTransformer2DModel with one double and one single block, a
CLIPTextModel (pooled prompt) and a T5 encoder shaped like hf-internal-testing/tiny-random-t5,
a one-block VAE, and a FlowMatchEulerDiscreteScheduler. Changed to be Flux.1-dev-like rather
than test-like: 16 latent channels (the transformer sees 2x2-packed latents, 64 channels), the
distilled-guidance embedding (guidance_embeds), Flux's VAE shift/scaling factors and
FLUX.1-dev's scheduler config (use_dynamic_shifting). Tokenizers are built locally.
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from .folder import save_pipeline_folder, seeded
from .sd3 import tiny_clip_config, tiny_t5_encoder, tiny_vae
from .t5_tokenizer import build_t5_tokenizer
from .tokenizer import build_clip_tokenizer

__all__ = ["create_tiny_flux"]

LATENT_CHANNELS = 16


def _transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # latents are packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
    )


def _vae() -> AutoencoderKL:
    # black-forest-labs/FLUX.1-dev's vae/config.json factors.
    return tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # black-forest-labs/FLUX.1-dev's scheduler/scheduler_config.json.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _pipeline(seed: int) -> FluxPipeline:
    return FluxPipeline(
        transformer=seeded(seed, _transformer),
        text_encoder=seeded(seed, lambda: CLIPTextModel(tiny_clip_config())),
        text_encoder_2=seeded(seed, tiny_t5_encoder),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_t5_tokenizer(),
        vae=seeded(seed, _vae),
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )


def create_tiny_flux(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random-weight Flux (dev-like, guidance-distilled) diffusers folder to ``path``.

    Loads with ``FluxPipeline.from_pretrained(path)``; height and width must be multiples of 2
    (the VAE does not downsample; latents are packed 2x2). Under 1 MB; the same seed gives the
    same bytes.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    return save_pipeline_folder(lambda: _pipeline(seed), path)
