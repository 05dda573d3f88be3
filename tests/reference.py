"""diffusers' own in-process pipeline on the same folder: the reference the suite must equal."""
from __future__ import annotations

import functools
from pathlib import Path

import diffusers
import numpy as np
import torch


@functools.lru_cache(maxsize=2)
def _pipeline(model: str) -> diffusers.StableDiffusionPipeline:
    return diffusers.StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )


def reference_pixels(
    model: Path,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    num_images: int = 1,
    width: int | None = None,
    height: int | None = None,
    scheduler: str | None = None,
) -> np.ndarray:
    """Float pixels [n, h, w, 3] from StableDiffusionPipeline with generator=torch.Generator("cpu").manual_seed(seed)."""
    pipe = _pipeline(str(model))
    original = pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        output = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    finally:
        pipe.scheduler = original
    return output.images
