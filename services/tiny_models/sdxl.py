"""Tiny random-weight Stable Diffusion XL models (base and refiner) in diffusers' folder format.

Shapes are those of diffusers' own SDXL fast tests (get_dummy_components of tests/pipelines/
stable_diffusion_xl/test_stable_diffusion_xl.py; the refiner's addition embedding and cross
attention sized as in test_stable_diffusion_xl_img2img.py with skip_first_text_encoder): a
two-block UNet with SDXL's "text_time" added conditioning, CLIP-L-like and OpenCLIP-bigG-like
text towers (hidden size 32 each), a two-block VAE and SDXL's EulerDiscreteScheduler. The
tokenizers are our local CLIP tokenizer (the tests' hub tokenizer cannot be downloaded); the
second one pads with "!" as SDXL's tokenizer_2 does. Base and refiner share the VAE and the
bigG text encoder (same configs and seeds), as the real ones do, so base latents can be handed
to the refiner.
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .folder import save_pipeline_folder, seeded
from .tokenizer import build_clip_tokenizer

__all__ = ["create_tiny_sdxl"]

_TEXT_HIDDEN_SIZE = 32  # both text towers; their projection (pooled) size is 32 too
_ADDITION_TIME_EMBED_DIM = 8


def _scheduler() -> EulerDiscreteScheduler:
    # SDXL 1.0's scheduler_config.json (the fast tests use the same betas and spacing).
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def _unet(refiner: bool) -> UNet2DConditionModel:
    # add_time_ids: 6 numbers for the base (original size, crop, target size), 5 for the refiner
    # (original size, crop, aesthetic score), each embedded in 8, plus the pooled text embedding.
    time_ids = 5 if refiner else 6
    return UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * _ADDITION_TIME_EMBED_DIM + _TEXT_HIDDEN_SIZE,
        # The base attends to both towers' hidden states concatenated, the refiner to bigG's only.
        cross_attention_dim=_TEXT_HIDDEN_SIZE if refiner else 2 * _TEXT_HIDDEN_SIZE,
        norm_num_groups=1,
    )


def _vae() -> AutoencoderKL:
    # SDXL's VAE scaling factor and its float32 upcast (force_upcast), on the fast tests' shapes.
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=_TEXT_HIDDEN_SIZE,
    )


def _pipeline(seed: int, refiner: bool) -> StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline:
    components = {
        "unet": seeded(seed, lambda: _unet(refiner)),
        "vae": seeded(seed, _vae),
        # seed + 1: the fast tests seed both towers alike, which would make CLIP-L's and bigG's
        # shared weights equal and a mix-up between the two encoders invisible.
        "text_encoder_2": seeded(seed + 1, lambda: CLIPTextModelWithProjection(_text_config())),
        "tokenizer_2": build_clip_tokenizer(),
        "scheduler": _scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }
    # SDXL's tokenizer_2 pads with "!" where tokenizer pads with "<|endoftext|>".
    components["tokenizer_2"].pad_token = "!"
    if refiner:
        # As stabilityai/stable-diffusion-xl-refiner-1.0: bigG only, aesthetic-score conditioning.
        return StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, **components,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionXLPipeline(
        text_encoder=seeded(seed, lambda: CLIPTextModel(_text_config())),
        tokenizer=build_clip_tokenizer(),
        **components,
        force_zeros_for_empty_prompt=True,
    )


def create_tiny_sdxl(path: str | os.PathLike[str], *, seed: int = 0, refiner: bool = False) -> Path:
    """Write a tiny random-weight SDXL base (or refiner) diffusers folder to ``path``.

    The base loads with ``StableDiffusionXLPipeline.from_pretrained(path)`` (64x64 by default);
    the refiner (``refiner=True``: text_encoder_2 only, requires_aesthetics_score) with
    ``StableDiffusionXLImg2ImgPipeline``. About 3.5 MB; the same (seed, refiner) gives the same bytes.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    return save_pipeline_folder(lambda: _pipeline(seed, refiner), path)
