"""Locally built ControlNet model folders with random weights.

A ControlNet folder is a standalone diffusers ``ControlNetModel`` (config.json and
diffusion_pytorch_model.safetensors), as the ControlNet service loads it. The tiny one matches
the tiny Stable Diffusion model of ``stable_diffusion.py`` (same UNet blocks, cross-attention
width 8, control images downsampled by 2 like its VAE); the tiny SDXL one (``family="sdxl"``) matches
the tiny SDXL of ``sdxl.py`` (its UNet's blocks and "text_time" added conditioning, control images
downsampled by 2 like its VAE); the full-size one has SD 1.5's ControlNet architecture (361M
parameters, ~1.4 GB, for benchmarks).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import ControlNetModel

from .stable_diffusion import _apply_umask_permissions, _full_unet, _occupied, _tiny_unet

__all__ = ["create_tiny_controlnet", "default_controlnet_path", "ensure_default_controlnet"]

# The folder appears at its final path only by rename, so its config.json marks a complete model.
CONFIG = "config.json"


def _make_control_visible(controlnet: ControlNetModel, seed: int) -> None:
    """Re-initialise, with a seeded generator, the parts that would hide the control image and the residuals.

    A fresh ControlNet's output convolutions (controlnet_down_blocks, controlnet_mid_block and the
    conditioning embedding's conv_out) start at zero, as in training, so every residual would be
    exactly 0 whatever the control image: a conformance test on such a model could not fail.
    The output convolutions get N(0, (0.1 / sqrt(fan_in))^2) weights, so each residual is about a
    tenth of the feature it comes from: clearly non-zero, but not swamping the UNet's own features.
    The conditioning embedding gets He-normal weights and conv_out N(0, 1 / fan_in), so the
    embedded control image is about as large as the embedded latents it is added to (with
    torch's default init it is ~40 times smaller and the control image would barely matter).
    """
    generator = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            torch.nn.init.normal_(conv.weight, std=math.sqrt(2.0 / conv.weight[0].numel()), generator=generator)
            torch.nn.init.zeros_(conv.bias)
        torch.nn.init.normal_(embedding.conv_out.weight, std=1.0 / math.sqrt(embedding.conv_out.weight[0].numel()),
                              generator=generator)
        torch.nn.init.zeros_(embedding.conv_out.bias)
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            torch.nn.init.normal_(conv.weight, std=0.1 / math.sqrt(conv.weight[0].numel()), generator=generator)
            torch.nn.init.normal_(conv.bias, std=0.01, generator=generator)


#: Families a tiny ControlNet can be built for (the tiny model whose UNet it starts from).
CONTROLNET_FAMILIES = ("sd15", "sdxl")


def _build_controlnet(full_size: bool, seed: int, family: str = "sd15") -> ControlNetModel:
    if family not in CONTROLNET_FAMILIES:
        raise ValueError(f"no tiny ControlNet for family {family!r}; choose one of {', '.join(CONTROLNET_FAMILIES)}")
    # fork_rng: our reseeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            from .sdxl import _unet as _sdxl_unet

            # The tiny SDXL base's UNet (its "text_time" added embedding included); two conditioning blocks, as
            # its VAE downsamples by 2.
            controlnet = ControlNetModel.from_unet(_sdxl_unet(refiner=False),
                                                   conditioning_embedding_out_channels=(16, 32))
        elif full_size:
            controlnet = ControlNetModel.from_unet(_full_unet())
        else:
            # Two conditioning blocks: control images are downsampled by 2, as the tiny VAE does.
            controlnet = ControlNetModel.from_unet(_tiny_unet(), conditioning_embedding_out_channels=(16, 32))
    _make_control_visible(controlnet, seed)
    if any(param.dtype != torch.float32 for param in controlnet.parameters()):
        controlnet = controlnet.to(torch.float32)
    return controlnet.eval()


def create_tiny_controlnet(path: str | os.PathLike[str], *, full_size: bool = False, seed: int = 0,
                           family: str = "sd15") -> Path:
    """Write a diffusers ControlNetModel folder with random weights to ``path``.

    The folder holds config.json and diffusion_pytorch_model.safetensors; it loads with
    ``ControlNetModel.from_pretrained(path, use_safetensors=True)``.

    Args:
        path: Target folder. Must not exist, or be an empty folder.
        full_size: False builds the tiny ControlNet matching ``create_tiny_sd``'s tiny model (a few
            hundred KB; ``ControlNetModel.from_unet`` of its UNet with conditioning_embedding_out_channels
            (16, 32)); True builds SD 1.5's ControlNet architecture in float32 (~1.4 GB, for benchmarks).
        seed: Seeds the weights (the UNet it starts from, then the conditioning embedding and the
            output convolutions, which a fresh ControlNet has at zero: see _make_control_visible);
            the same (full_size, seed) gives the same bytes, seeds 0 and 1 two different ControlNets.
        family: "sd15" (the default) or "sdxl": a tiny ControlNet for the tiny SDXL base of
            ``create_tiny_model(path, "sdxl")`` (``ControlNetModel.from_unet`` of its UNet architecture, with
            the "text_time" added conditioning StableDiffusionXLControlNetPipeline feeds); full_size is
            ignored for "sdxl".

    Returns:
        ``path`` as a Path.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.
        ValueError: ``family`` is neither "sd15" nor "sdxl".

    Built in a temporary sibling and renamed into place, like ``create_tiny_sd``.
    """
    target = Path(path)
    if _occupied(target):
        raise FileExistsError(f"{target} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_controlnet(full_size, seed, family).save_pretrained(staging, safe_serialization=True)
        _apply_umask_permissions(staging)
        try:
            os.rename(staging, target)
        except OSError as error:
            if _occupied(target):
                raise FileExistsError(f"{target} appeared while building; left untouched") from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_controlnet_path() -> Path:
    """Where the shared tiny ControlNet lives: ``$LATENTWIRE_HOME/models/tiny-controlnet``."""
    from latentwire.client.home import default_home

    return default_home() / "models" / "tiny-controlnet"


def ensure_default_controlnet() -> Path:
    """Return :func:`default_controlnet_path`, building the tiny ControlNet (seed 0) there first if missing.

    Safe when several processes call it at once (same race handling as ``ensure_default_model``).
    """
    target = default_controlnet_path()
    if (target / CONFIG).is_file():
        return target
    try:
        create_tiny_controlnet(target)
    except FileExistsError:
        if not (target / CONFIG).is_file():
            raise
    return target
