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


# ---- model families (issue 12): SDXL and its refiner, SD3, Flux --------------------------------------


@functools.lru_cache(maxsize=6)
def _family_pipeline(pipeline: str, model: str):
    """``pipeline`` (a diffusers class name, e.g. "StableDiffusionXLPipeline") loaded from the folder ``model``."""
    pipe = getattr(diffusers, pipeline).from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_family_pixels(pipeline: str, model: Path, prompt: str, *, seed: int, steps: int,
                            scheduler: str | None = None, **call_kwargs) -> np.ndarray:
    """Float pixels [n, h, w, 3] from the diffusers pipeline class ``pipeline`` on the folder ``model``, called with
    generator=torch.Generator("cpu").manual_seed(seed) and ``call_kwargs`` (guidance_scale, negative_prompt,
    num_images_per_prompt, height, width, image, mask_image, strength, ...: the pipeline's own defaults otherwise).
    ``scheduler`` swaps in that diffusers class, built from the model's scheduler config."""
    pipe = _family_pipeline(pipeline, str(model))
    original = _with_scheduler(pipe, scheduler)
    try:
        output = pipe(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", **call_kwargs)
    finally:
        pipe.scheduler = original
    return output.images


def reference_sdxl_refined(base: Path, refiner: Path, prompt: str, *, seed: int, steps: int, switch_at: float = 0.8,
                           scheduler: str | None = None, **call_kwargs) -> np.ndarray:
    """Float pixels of SDXL base + refiner as diffusers documents it ("ensemble of expert denoisers"):
    StableDiffusionXLPipeline(denoising_end=switch_at, output_type="latent"), then StableDiffusionXLImg2ImgPipeline on
    the refiner folder (image=those latents, denoising_start=switch_at); each call gets its own
    torch.Generator("cpu").manual_seed(seed), as each stage of a job is seeded with the job's seed."""
    base_pipe = _family_pipeline("StableDiffusionXLPipeline", str(base))
    refiner_pipe = _family_pipeline("StableDiffusionXLImg2ImgPipeline", str(refiner))
    originals = _with_scheduler(base_pipe, scheduler), _with_scheduler(refiner_pipe, scheduler)
    try:
        latents = base_pipe(prompt, num_inference_steps=steps, denoising_end=switch_at, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs).images
        output = refiner_pipe(prompt, image=latents, num_inference_steps=steps, denoising_start=switch_at,
                              output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs)
    finally:
        base_pipe.scheduler, refiner_pipe.scheduler = originals
    return output.images
