"""Locally built Stable Diffusion model folders with random weights.

Nothing can be downloaded from a model hub, yet the services, tests and benchmarks need a real
diffusers folder to load. These builders write one from scratch: a tiny model (a few hundred
KB, for tests) and an SD 1.5-shaped one (~4 GB, for benchmarks). Weights are random but
seeded, so a given (size, seed) always produces the same bytes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import build_clip_tokenizer

__all__ = ["create_tiny_sd", "default_model_path", "ensure_default_model"]

# The file every complete diffusers pipeline folder has; its presence is our "model is ready"
# marker, which is sound because folders only ever appear at their final path by rename.
MODEL_INDEX = "model_index.json"


def _scheduler() -> DDIMScheduler:
    # SD 1.5's betas; DDIM instead of its default PNDM keeps things simple and fast to step.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_unet() -> UNet2DConditionModel:
    # Shapes from diffusers' StableDiffusion fast tests, with cross_attention_dim matched to the
    # text encoder's hidden_size (8) so the UNet can attend to its output.
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    # bos/eos/pad ids differ from the tokenizer's; harmless, as the pipeline only reads
    # last_hidden_state, and every tokenizer id stays below vocab_size.
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=8,
            intermediate_size=16,
            layer_norm_eps=1e-05,
            num_attention_heads=2,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )


def _full_unet() -> UNet2DConditionModel:
    # UNet2DConditionModel's defaults are SD 1.x's; only these three differ.
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def _full_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )


def _full_text_encoder() -> CLIPTextModel:
    # CLIP ViT-L/14's text tower, as used by SD 1.5. Its 49408 embeddings exceed our tokenizer's
    # ids, which is fine: the extra rows are simply never looked up.
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )


_BUILDERS: dict[bool, dict[str, Callable[[], torch.nn.Module]]] = {
    False: {"unet": _tiny_unet, "vae": _tiny_vae, "text_encoder": _tiny_text_encoder},
    True: {"unet": _full_unet, "vae": _full_vae, "text_encoder": _full_text_encoder},
}


def _build_pipeline(full_size: bool, seed: int, inpainting: bool = False) -> StableDiffusionPipeline:
    models: dict[str, torch.nn.Module] = {}
    # fork_rng: our reseeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        for name, build in _BUILDERS[full_size].items():
            # Reseed before each component (as diffusers' fast tests do) so each one's weights
            # depend only on the seed, not on how many random numbers the others consumed.
            torch.manual_seed(seed)
            model = build()
            if name == "unet" and inpainting:
                # A dedicated inpainting UNet takes latents, mask and masked-image latents: 4 + 1 + 4 channels.
                torch.manual_seed(seed)
                model = UNet2DConditionModel.from_config({**model.config, "in_channels": 9})
            # Benchmarks and parity checks assume float32 weights, whatever the default dtype.
            # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
            if any(param.dtype != torch.float32 for param in model.parameters()):
                model = model.to(torch.float32)
            models[name] = model.eval()
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return pipeline_class(
        **models,
        tokenizer=build_clip_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def create_tiny_sd(path: str | os.PathLike[str], *, full_size: bool = False, seed: int = 0,
                   inpainting: bool = False) -> Path:
    """Write a complete diffusers Stable Diffusion folder with random weights to ``path``.

    The folder holds model_index.json (StableDiffusionPipeline, no safety checker or feature
    extractor) and text_encoder/, tokenizer/, unet/, vae/, scheduler/, with weights as
    safetensors only. It loads with ``StableDiffusionPipeline.from_pretrained(path,
    safety_checker=None, use_safetensors=True)``.

    Args:
        path: Target folder. Must not exist, or be an empty folder.
        full_size: False builds the tiny test model (a few hundred KB, 64x64 images by
            default); True builds SD 1.5's architecture in float32 (~4 GB, for benchmarks).
        seed: Seeds every component's weights; the same (full_size, seed) gives the same bytes.
        inpainting: build a dedicated inpainting model instead: its UNet takes 9 input channels
            (latents, mask, masked-image latents) and model_index.json names
            StableDiffusionInpaintPipeline.

    Returns:
        ``path`` as a Path.

    Raises:
        FileExistsError: ``path`` already holds something (possibly another process's model,
            if two builds raced); it is never overwritten.

    The folder is built in a temporary sibling and renamed into place, so ``path`` either does
    not exist or holds a complete model, even if the build is interrupted. A hard kill may leave
    a hidden ``.<name>.tmp-*`` sibling behind, which is safe to delete.
    """
    target = Path(path)
    # Fail before minutes of building (full size) if the answer is already known.
    if _occupied(target):
        raise FileExistsError(f"{target} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)

    # Same parent directory, so the final rename stays on one filesystem and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        pipe = _build_pipeline(full_size, seed, inpainting)
        pipe.save_pretrained(staging, safe_serialization=True)
        _apply_umask_permissions(staging)
        try:
            # rename (not shutil.move): atomic, and refuses to replace a non-empty folder,
            # which is exactly the "someone else won the race" signal.
            os.rename(staging, target)
        except OSError as error:
            if _occupied(target):
                raise FileExistsError(f"{target} appeared while building; left untouched") from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """Where the shared tiny model lives: ``$LATENTWIRE_HOME/models/tiny-sd``.

    LATENTWIRE_HOME defaults to ``~/.cache/latentwire``.
    """
    from latentwire.client.home import default_home

    return default_home() / "models" / "tiny-sd"


def ensure_default_model() -> Path:
    """Return :func:`default_model_path`, building the tiny model there first if missing.

    Safe when several processes call it at once: each builds in its own temporary folder and
    renames it into place; the losers of the race discard theirs and use the winner's, which is
    identical anyway since the build is deterministic.
    """
    target = default_model_path()
    if (target / MODEL_INDEX).is_file():
        return target
    try:
        create_tiny_sd(target)
    except FileExistsError:
        # Another process finished first. Anything else at that path is not ours to judge
        # usable, so only a real model folder is accepted.
        if not (target / MODEL_INDEX).is_file():
            raise
    return target


def _occupied(path: Path) -> bool:
    """True if ``path`` exists and is not an empty directory (os.rename can't replace it)."""
    if not path.exists() and not path.is_symlink():
        return False
    return not (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


def _apply_umask_permissions(root: Path) -> None:
    """Give ``root`` and everything in it ordinary permissions (0777/0666 minus the umask).

    mkdtemp creates the folder 0700 and safetensors writes its files 0600, which would make a
    shared model (e.g. the default one under ~/.cache) unreadable to other users or containers.
    """
    umask = _current_umask()
    root.chmod(0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~umask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


def _current_umask() -> int:
    # Linux reports the umask read-only; elsewhere the only way to read it is to set it, which
    # briefly changes it for every thread of the process, so that is the fallback.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
