"""Train a ControlNet on canny edges for the text-to-image model: the edges decide the shape, the prompt the colours.

- Model: diffusers' ``ControlNetModel.from_unet`` of the pipeline's own UNet (its down and mid blocks, weights
  copied), with a two-stage conditioning embedding (channels 16/32/64: the control image is downsampled by 4,
  as the VAE downsamples 64x64 images to 16x16 latents). The UNet, text encoder and VAE stay frozen.
- Conditioning: the canny edges of the data-set image, made by the suite's own ControlNet preprocessor
  (services/controlnet/preprocessors.py, ``canny`` with its default thresholds), as RGB in [0, 1], the way
  StableDiffusionControlNetPipeline hands a control image to the ControlNet; so serving sees what training saw.
- Edges win over the prompt: for :data:`MISMATCH_SHARE` of the images the caption names another shape than the
  image's (colours, size and position unchanged); the target is still the image, so the model learns that the
  shape comes from the edges.
- Objective: unet.py's (epsilon prediction, SD 1.5's DDPM noise schedule, min-SNR-5 weighting, the same share
  of empty captions for classifier-free guidance), AdamW, EMA weights saved.
- Seeded, resumable (``checkpoints/controlnet.pt``), saved as a diffusers ControlNetModel folder (safetensors).

:func:`evaluate_controlnet` measures what the issue asks: the canny edges of a square with prompts naming a
circle make a square, judged by the shape classifier.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from tqdm import tqdm

from .common import Checkpointer, base_unet_sha256, batch_tensors, fast_forward, save_folder, seed_everything
from .dataset import COLOUR_NAMES, POSITIONS, SHAPES, Sample, caption, render
from .unet import (UNCONDITIONAL_SHARE, _ema_update, _tokens, frozen_parts, min_snr_weights, noised_batch,
                   scheduler_config, weighted_loss)

__all__ = ["MISMATCH_SHARE", "build_controlnet", "canny_edges", "evaluate_controlnet", "square_circle_cases",
           "train_controlnet"]

STAGE = "controlnet"
#: Share of training captions that name another shape than the image (and its edges) show.
MISMATCH_SHARE = 0.5
#: The conditioning embedding's channels: two stride-2 stages, a factor 4 like the VAE's.
CONDITIONING_CHANNELS = (16, 32, 64)


def canny_edges(image: Image.Image) -> Image.Image:
    """The suite's ``canny`` preprocessor with its default options: white edges on black, 8-bit RGB."""
    from services.controlnet import preprocessors

    canny = preprocessors.lookup("canny")
    return preprocessors.apply(canny, image, preprocessors.resolve_options(canny, {}))


def _edge_tensor(images: torch.Tensor) -> torch.Tensor:
    """Float (B, 3, H, W) images in [0, 1] -> their canny edges as float (B, 3, H, W) in [0, 1]."""
    pixels = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    edges = np.stack([np.asarray(canny_edges(Image.fromarray(p))) for p in pixels])
    return torch.from_numpy(edges).permute(0, 3, 1, 2).float().div_(255.0)


def build_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """The ControlNet of ``unet``: its down and mid blocks (weights copied), zero-initialised outputs."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


def _mismatched(samples: list[Sample], generator: torch.Generator) -> list[str]:
    """Captions, a MISMATCH_SHARE of them naming another (random) shape than their sample's."""
    captions = []
    swap = (torch.rand(len(samples), generator=generator) < MISMATCH_SHARE).tolist()
    others = torch.randint(0, len(SHAPES) - 1, (len(samples),), generator=generator).tolist()
    for sample, do_swap, other in zip(samples, swap, others):
        if do_swap:
            shapes = [s for s in SHAPES if s != sample.shape]
            sample = Sample(**{**sample.__dict__, "shape": shapes[other]})
        captions.append(sample.caption)
    return captions


def train_controlnet(out: Path, *, seed: int = 0, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
                     max_seconds: float | None = None, pipeline: Path | None = None, progress: bool = True) -> dict:
    """Train a ControlNet for ``pipeline`` (default ``out/pipeline``) and save it to ``out/controlnet``.

    Resumes from ``out/checkpoints/controlnet.pt``. ``max_seconds`` ends training early (the ControlNet is then
    saved from the steps done; the returned ``controlnet_steps`` says how many).
    """
    out = Path(out)
    pipeline = Path(pipeline) if pipeline is not None else out / "pipeline"
    seed_everything(seed)
    vae, unet, text_encoder, tokenizer = frozen_parts(pipeline)
    controlnet = build_controlnet(unet)
    ema = copy.deepcopy(controlnet).requires_grad_(False)
    parameters = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    noise_schedule = DDPMScheduler.from_config(scheduler_config())
    loss_weight = min_snr_weights(noise_schedule)  # as unet.py
    checkpoints = Checkpointer(out / "checkpoints" / f"{STAGE}.pt", {"controlnet": controlnet, "ema": ema}, optimizer)
    start, extra = checkpoints.restore()
    fast_forward(schedule, start)
    trained_seconds = float(extra.get("seconds", 0.0))
    began = time.monotonic()
    controlnet.train()
    step = start
    bar = tqdm(range(start, steps), desc="controlnet", initial=start, total=steps, disable=not progress)
    for step in bar:
        if max_seconds is not None and trained_seconds + time.monotonic() - began >= max_seconds:
            break
        pixels, samples = batch_tensors(seed, STAGE, step, batch_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        captions = _mismatched(samples, generator)
        drop = torch.rand(len(captions), generator=generator) < UNCONDITIONAL_SHARE
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        edges = _edge_tensor(pixels)
        noisy, noise, timesteps = noised_batch(vae, pixels, noise_schedule, generator)
        with torch.no_grad():
            hidden = text_encoder(_tokens(tokenizer, captions))[0]
        down, mid = controlnet(noisy, timesteps, hidden, controlnet_cond=edges, return_dict=False)
        prediction = unet(noisy, timesteps, hidden, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = weighted_loss(prediction, noise, timesteps, loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        _ema_update(ema, controlnet, min(0.995, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        checkpoints.maybe_save(step + 1, {"seconds": trained_seconds + time.monotonic() - began})
    else:
        step = steps
    seconds = trained_seconds + time.monotonic() - began
    checkpoints.maybe_save(step, {"seconds": seconds}, force=True)
    save_folder(out / STAGE, lambda folder: ema.eval().save_pretrained(folder, safe_serialization=True))
    return {"controlnet_steps": step, "controlnet_seconds": round(seconds, 1), "controlnet_batch_size": batch_size,
            "controlnet_mismatch_share": MISMATCH_SHARE,
            "base_unet_sha256": base_unet_sha256(pipeline)}


def square_circle_cases(count: int = 12, *, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``count`` (image of a square, prompt naming a circle) pairs, colours, backgrounds, sizes and positions varied.

    The image is what a user would hand the ``canny`` preprocessor; the prompt's colours differ from the image's.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        colour, background = (COLOUR_NAMES[int(i)] for i in rng.choice(len(COLOUR_NAMES), 2, replace=False))
        square = Sample("square", colour, background, ("small", "large")[index % 2],
                        POSITIONS[int(rng.integers(len(POSITIONS)))], False, False)
        want, want_background = (COLOUR_NAMES[int(i)] for i in rng.choice(len(COLOUR_NAMES), 2, replace=False))
        cases.append((render(square), caption("circle", want, want_background)))
    return cases


def evaluate_controlnet(pipeline: str | Path, controlnet: str | Path, classifier: str | Path, *, count: int = 24,
                        seed: int = 0, steps: int = 25, guidance_scale: float = 7.5) -> dict:
    """Generate :func:`square_circle_cases` through StableDiffusionControlNetPipeline (CPU, float32) and score them.

    Returns {"square_share": share the classifier calls a square, "colour_share": share whose foreground colour
    is the prompt's, "count", "items"}.
    """
    from diffusers import StableDiffusionControlNetPipeline

    from .evaluate import classify_shapes, foreground_colour
    from .dataset import parse_caption

    net = ControlNetModel.from_pretrained(controlnet, use_safetensors=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(pipeline, controlnet=net, safety_checker=None,
                                                             requires_safety_checker=False, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    cases = square_circle_cases(count, seed=seed)
    images = []
    for index, (image, prompt) in enumerate(cases):
        images += pipe(prompt, image=canny_edges(image), num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(seed + index), height=64, width=64).images
    shapes = classify_shapes(images, classifier)
    colours = [foreground_colour(image) for image in images]
    items = [{"prompt": prompt, "seen_shape": shape, "seen_colour": colour}
             for (_, prompt), shape, colour in zip(cases, shapes, colours)]
    return {"square_share": sum(s == "square" for s in shapes) / count,
            "colour_share": sum(c == parse_caption(p)["colour"] for (_, p), c in zip(cases, colours)) / count,
            "count": count, "steps": steps, "guidance_scale": guidance_scale, "items": items}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.training.controlnet PIPELINE CONTROLNET CLASSIFIER [--count N]``: print the scores."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pipeline")
    parser.add_argument("controlnet")
    parser.add_argument("classifier")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", action="store_true", help="also print every image's result")
    args = parser.parse_args(argv)
    result = evaluate_controlnet(args.pipeline, args.controlnet, args.classifier, count=args.count, seed=args.seed)
    if not args.items:
        result.pop("items")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
