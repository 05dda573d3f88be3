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


def _with_scheduler(pipe, scheduler: str | None):
    """Swap in ``scheduler`` (built from the pipeline's config) and return the original to restore."""
    original = pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    return original


@functools.lru_cache(maxsize=4)
def _image_pipeline(kind: str, model: str, controlnets: tuple[str, ...] = ()):
    options = dict(safety_checker=None, requires_safety_checker=False, use_safetensors=True)
    if kind == "img2img":
        return diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(model, **options)
    if kind == "inpaint":
        return diffusers.StableDiffusionInpaintPipeline.from_pretrained(model, **options)
    nets = [diffusers.ControlNetModel.from_pretrained(path, use_safetensors=True) for path in controlnets]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    return diffusers.StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=controlnet, **options)


def reference_image_pixels(kind: str, model: Path, prompt: str, *, seed: int, steps: int, guidance_scale: float,
                           scheduler: str | None = None, controlnets: tuple[str, ...] = (),
                           **call_kwargs) -> np.ndarray:
    """Float pixels from StableDiffusionImg2ImgPipeline ("img2img"), StableDiffusionInpaintPipeline ("inpaint")
    or StableDiffusionControlNetPipeline ("controlnet", with the ControlNet folders ``controlnets``)."""
    pipe = _image_pipeline(kind, str(model), tuple(str(c) for c in controlnets))
    original = _with_scheduler(pipe, scheduler)
    try:
        output = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **call_kwargs,
        )
    finally:
        pipe.scheduler = original
    return output.images
