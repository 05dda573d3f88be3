"""Tiny random-weight Stable Diffusion 3 models in diffusers' folder format.

Shapes are those of diffusers' own SD3 fast test (get_dummy_components of tests/pipelines/
stable_diffusion_3/test_pipeline_stable_diffusion_3.py): a one-layer SD3Transformer2DModel,
CLIP-L and CLIP-G as two CLIPTextModelWithProjection towers (hidden and projection size 32),
a T5 encoder shaped like hf-internal-testing/tiny-random-t5 (d_model 32), a one-block VAE with
SD3's shift and scaling factors, and SD3's FlowMatchEulerDiscreteScheduler (shift 3.0). One
change: the latents have SD3's 16 channels instead of the test's 4, so the 16-channel path is
the one exercised. Tokenizers are built locally (the test's hub tokenizers cannot be downloaded).
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .folder import save_pipeline_folder, seeded
from .t5_tokenizer import T5_VOCAB_SIZE, build_t5_tokenizer
from .tokenizer import build_clip_tokenizer

__all__ = ["create_tiny_sd3", "tiny_clip_config", "tiny_t5_encoder"]

LATENT_CHANNELS = 16


def tiny_clip_config() -> CLIPTextConfig:
    """The CLIP text tower of diffusers' SD3 and Flux fast tests (hidden and projection size 32)."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )


def tiny_t5_encoder() -> T5EncoderModel:
    """A T5 encoder shaped like hf-internal-testing/tiny-random-t5 (transformers' T5 model tester)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=5,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.1,
            feed_forward_proj="relu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        # The pipeline pads or cuts the concatenated CLIP states (2 x 32) to T5's width (32).
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections concatenated
        out_channels=LATENT_CHANNELS,
    )


def tiny_vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """The one-block, 16-latent-channel VAE of diffusers' SD3 and Flux fast tests, with the family's own latent
    shift and scaling factors (SD3 and Flux share everything else)."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _vae() -> AutoencoderKL:
    return tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)


def _pipeline(seed: int) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=seeded(seed, _transformer),
        # Reseeded per tower as in the fast test, so CLIP-L and CLIP-G start identical there;
        # here G gets seed + 1 so the two encoders (and a mix-up between them) can be told apart.
        text_encoder=seeded(seed, lambda: CLIPTextModelWithProjection(tiny_clip_config())),
        text_encoder_2=seeded(seed + 1, lambda: CLIPTextModelWithProjection(tiny_clip_config())),
        text_encoder_3=seeded(seed, tiny_t5_encoder),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=build_t5_tokenizer(),
        vae=seeded(seed, _vae),
        # stabilityai/stable-diffusion-3-medium-diffusers' scheduler_config.json.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def create_tiny_sd3(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random-weight SD3 diffusers folder to ``path``.

    Loads with ``StableDiffusion3Pipeline.from_pretrained(path)`` (32x32 by default: the VAE does
    not downsample). About 2 MB; the same seed gives the same bytes.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    return save_pipeline_folder(lambda: _pipeline(seed), path)
