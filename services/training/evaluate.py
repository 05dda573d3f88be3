"""Score images against the prompts that made them: shape by the trained classifier, colours by pixel statistics.

- Background colour: the median of the image's outer 2-pixel ring (the data set keeps a 4-pixel free
  margin around every shape), named by the nearest palette colour.
- Foreground colour: the median of the pixels far (> 80 in RGB distance) from that background colour,
  named by the nearest palette colour other than the background's; "none" when fewer than 12 pixels
  qualify (no shape drawn).
- Shape: the MobileViT classifier (its own processor) names one of the six shapes.

:func:`score_images` works on any images, so the suite's acceptance tests can score images it generated;
:func:`evaluate_pipeline` generates the held-out prompts in-process through diffusers'
StableDiffusionPipeline (the reference the suite is compared with) and scores them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .dataset import COLOURS, held_out_prompts, parse_caption

__all__ = ["background_colour", "evaluate_pipeline", "foreground_colour", "nearest_colour", "score_images"]

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)
#: RGB distance from the background colour beyond which a pixel counts as foreground.
FOREGROUND_DISTANCE = 80.0
#: Fewer foreground pixels than this: no shape was drawn.
MIN_FOREGROUND_PIXELS = 12


def nearest_colour(rgb: Sequence[float], exclude: str | None = None) -> str:
    """Name of the palette colour nearest (Euclidean RGB) to ``rgb``, optionally never ``exclude``."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(distances.argmin())]


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


def background_colour(image: Image.Image | np.ndarray) -> tuple[str, np.ndarray]:
    """(name, median RGB) of the image's outer 2-pixel ring."""
    pixels = _pixels(image)
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[2:-2, :2].reshape(-1, 3), pixels[2:-2, -2:].reshape(-1, 3)])
    median = np.median(ring, axis=0)
    return nearest_colour(median), median


def foreground_colour(image: Image.Image | np.ndarray) -> str:
    """Name of the dominant colour of the pixels that differ from the background, or "none"."""
    pixels = _pixels(image).reshape(-1, 3)
    name, median = background_colour(image)
    far = np.linalg.norm(pixels - median, axis=1) > FOREGROUND_DISTANCE
    if far.sum() < MIN_FOREGROUND_PIXELS:
        return "none"
    return nearest_colour(np.median(pixels[far], axis=0), exclude=name)


@torch.no_grad()
def classify_shapes(images: Sequence[Image.Image], classifier: str | Path) -> list[str]:
    """Shape names the classifier folder gives ``images`` (through its own saved processor)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(classifier).eval()
    processor = AutoImageProcessor.from_pretrained(classifier)
    pixel_values = processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    logits = torch.cat([model(pixel_values=chunk).logits for chunk in pixel_values.split(64)])
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def score_images(images: Sequence[Image.Image], prompts: Sequence[str], classifier: str | Path) -> dict:
    """Shares of ``images`` whose shape, foreground colour and background colour match their prompt.

    Returns {"shape": .., "colour": .., "background": .., "all": .., "count": .., "items": [...]} where
    items lists, per image, the prompt and what was seen.
    """
    shapes = classify_shapes(images, classifier)
    items = []
    for image, prompt, shape in zip(images, prompts, shapes):
        wanted = parse_caption(prompt)
        seen = {"shape": shape, "colour": foreground_colour(image), "background": background_colour(image)[0]}
        items.append({"prompt": prompt, **{f"seen_{k}": v for k, v in seen.items()},
                      **{f"{k}_ok": seen[k] == wanted[k] for k in seen}})
    count = len(items)

    def share(key: str) -> float:
        return sum(item[f"{key}_ok"] for item in items) / max(count, 1)

    all_ok = sum(all(item[f"{k}_ok"] for k in ("shape", "colour", "background")) for item in items) / max(count, 1)
    return {"shape": share("shape"), "colour": share("colour"), "background": share("background"), "all": all_ok,
            "count": count, "items": items}


def generate(pipeline_folder: str | Path, prompts: Sequence[str], *, seed: int = 0, steps: int = 25,
             guidance_scale: float = 7.5, batch_size: int = 16) -> list[Image.Image]:
    """Images for ``prompts`` from the pipeline folder, through diffusers' StableDiffusionPipeline (CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_folder, safety_checker=None, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generator = torch.Generator().manual_seed(seed + start)
        images += pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                           height=64, width=64).images
    return images


def grid(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """The images tiled in rows of ``columns``."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), (128, 128, 128))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def evaluate_pipeline(pipeline_folder: str | Path, classifier: str | Path, *, count: int = 48, seed: int = 0,
                      steps: int = 25, guidance_scale: float = 7.5, grid_path: str | Path | None = None) -> dict:
    """Generate ``count`` held-out prompts through StableDiffusionPipeline and score them (see :func:`score_images`)."""
    prompts = [prompt for prompt, _ in held_out_prompts(count, seed=seed)]
    images = generate(pipeline_folder, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
    if grid_path is not None:
        grid(images).save(grid_path)
    return {**score_images(images, prompts, classifier), "steps": steps, "guidance_scale": guidance_scale,
            "seed": seed}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.training.evaluate PIPELINE CLASSIFIER [--count N] [--grid PNG]``: print the scores."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pipeline")
    parser.add_argument("classifier")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--grid", default=None, help="write the images as one PNG grid here")
    parser.add_argument("--items", action="store_true", help="also print every image's result")
    args = parser.parse_args(argv)
    result = evaluate_pipeline(args.pipeline, args.classifier, count=args.count, seed=args.seed, steps=args.steps,
                               guidance_scale=args.guidance_scale, grid_path=args.grid)
    if not args.items:
        result.pop("items")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
