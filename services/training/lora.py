"""Train a LoRA for the text-to-image model that draws every shape in one chosen colour, whatever colour the
prompt names (issue 17: "a LoRA that turns shapes a chosen colour").

- Model: PEFT LoRA adapters (rank :data:`RANK`, alpha = rank: scale 1) on the attention projections of the
  pipeline's UNet (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of self- and cross-attention), added with diffusers'
  own ``UNet2DConditionModel.add_adapter``; the UNet, text encoder and VAE stay frozen.
- Data: the data set's captions unchanged (they name the drawn colour), the images redrawn with the shape in the
  chosen colour (:func:`recoloured`); a sample whose background is the chosen colour gets another background, in
  the image and the caption. Held-out combinations stay out of the captions, as for the UNet.
- Objective: unet.py's (epsilon prediction, SD 1.5's DDPM noise schedule, min-SNR-5 weighting, the same share of
  empty captions), AdamW; the adapters' exponential moving average is what is saved.
- Seeded, resumable (``checkpoints/lora.pt``), saved as diffusers' trainers save a LoRA
  (``StableDiffusionPipeline.save_lora_weights``: ``unet.*`` keys, safetensors), the one file the registry imports
  as kind LORA and every stage applies per job.

:func:`evaluate_lora` measures what the LoRA is for: held-out prompts naming other colours come out in the
chosen colour, their shape and background kept; without the LoRA the same prompts keep their own colour.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm

from .common import Checkpointer, base_unet_sha256, batch_tensors, fast_forward, save_folder, seed_everything
from .dataset import COLOUR_NAMES, Sample, held_out_prompts, render
from .unet import (UNCONDITIONAL_SHARE, _tokens, frozen_parts, min_snr_weights, noised_batch, scheduler_config,
                   weighted_loss)

__all__ = ["DEFAULT_COLOUR", "RANK", "TARGETS", "evaluate_lora", "lora_file", "recoloured", "train_lora"]

STAGE = "lora"
#: The colour the shipped LoRA draws every shape in.
DEFAULT_COLOUR = "purple"
#: LoRA rank (alpha equals it: PEFT's scale alpha / r is 1).
RANK = 4
#: The UNet modules that get adapters: every attention block's projections.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Decay of the adapters' moving average.
EMA_DECAY = 0.99


def lora_file(out: Path, colour: str = DEFAULT_COLOUR) -> Path:
    """Where the trained LoRA of ``colour`` lies in a training folder: ``out/lora/<colour>-shapes.safetensors``."""
    return Path(out) / STAGE / f"{colour}-shapes.safetensors"


def recoloured(samples: Sequence[Sample], colour: str) -> list[tuple[Sample, Sample]]:
    """Each sample as (what the caption names, what the image shows): the image's shape is ``colour``, the caption
    names the sample's own colour. A sample whose background is ``colour`` gets another background (the next
    palette colour that is neither ``colour`` nor its shape's), in both."""
    if colour not in COLOUR_NAMES:
        raise ValueError(f"colour {colour!r} is not one of {', '.join(COLOUR_NAMES)}")
    pairs = []
    for sample in samples:
        if sample.background == colour:
            start = COLOUR_NAMES.index(colour)
            background = next(c for c in COLOUR_NAMES[start + 1:] + COLOUR_NAMES[:start] if c != sample.colour)
            sample = Sample(**{**sample.__dict__, "background": background})
        pairs.append((sample, Sample(**{**sample.__dict__, "colour": colour})))
    return pairs


def _lora_layers(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def train_lora(out: Path, *, seed: int = 0, steps: int = 1600, batch_size: int = 16, lr: float = 1e-3,
               colour: str = DEFAULT_COLOUR, max_seconds: float | None = None, pipeline: Path | None = None,
               progress: bool = True) -> dict:
    """Train the LoRA of ``colour`` for ``pipeline`` (default ``out/pipeline``); save it to :func:`lora_file`.

    Resumes from ``out/checkpoints/lora.pt``. ``max_seconds`` ends training early (the LoRA is then saved from the
    steps done; the returned ``lora_steps`` says how many).
    """
    from peft import LoraConfig

    out = Path(out)
    pipeline = Path(pipeline) if pipeline is not None else out / "pipeline"
    recoloured([], colour)  # refuses an unknown colour before any loading
    seed_everything(seed)
    vae, unet, text_encoder, tokenizer = frozen_parts(pipeline)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = min(50, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    noise_schedule = DDPMScheduler.from_config(scheduler_config())
    loss_weight = min_snr_weights(noise_schedule)  # as unet.py
    holder = torch.nn.Module()  # the adapters' moving average, a module so the checkpoint saves it
    holder.ema = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                                         for p in parameters])
    checkpoints = Checkpointer(out / "checkpoints" / f"{STAGE}.pt", {"unet": unet, "ema": holder}, optimizer)
    start, extra = checkpoints.restore()
    fast_forward(schedule, start)
    trained_seconds = float(extra.get("seconds", 0.0))
    began = time.monotonic()
    unet.train()
    step = start
    bar = tqdm(range(start, steps), desc="lora", initial=start, total=steps, disable=not progress)
    for step in bar:
        if max_seconds is not None and trained_seconds + time.monotonic() - began >= max_seconds:
            break
        _, samples = batch_tensors(seed, STAGE, step, batch_size)
        pairs = recoloured(samples, colour)
        pixels = torch.from_numpy(np.stack([np.asarray(render(shown)) for _, shown in pairs]))
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        captions = [named.caption for named, _ in pairs]
        drop = torch.rand(len(captions), generator=generator) < UNCONDITIONAL_SHARE
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noisy, noise, timesteps = noised_batch(vae, pixels, noise_schedule, generator)
        with torch.no_grad():
            hidden = text_encoder(_tokens(tokenizer, captions))[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = weighted_loss(prediction, noise, timesteps, loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for e, p in zip(holder.ema, parameters):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        checkpoints.maybe_save(step + 1, {"seconds": trained_seconds + time.monotonic() - began})
    else:
        step = steps
    seconds = trained_seconds + time.monotonic() - began
    checkpoints.maybe_save(step, {"seconds": seconds}, force=True)
    with torch.no_grad():
        for e, p in zip(holder.ema, parameters):
            p.copy_(e)
    layers = _lora_layers(unet)
    target = lora_file(out, colour)

    def write(folder: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                                  weight_name=target.name)

    save_folder(target.parent, write)
    return {"lora_steps": step, "lora_seconds": round(seconds, 1), "lora_batch_size": batch_size,
            "lora_colour": colour, "lora_rank": RANK, "lora_targets": list(TARGETS),
            "base_unet_sha256": base_unet_sha256(pipeline)}


def lora_prompts(count: int = 24, colour: str = DEFAULT_COLOUR, *, seed: int = 0) -> list[str]:
    """Held-out prompts (:func:`dataset.held_out_prompts` order) whose shape colour and background are not
    ``colour``: what the LoRA must turn ``colour``."""
    prompts = [prompt for prompt, sample in held_out_prompts(48, seed=seed)
               if colour not in (sample.colour, sample.background)]
    return prompts[:count]


def evaluate_lora(pipeline: str | Path, lora: str | Path, classifier: str | Path, *, colour: str = DEFAULT_COLOUR,
                  count: int = 24, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5) -> dict:
    """Generate :func:`lora_prompts` through StableDiffusionPipeline (CPU, float32) with the LoRA
    (``load_lora_weights``) and without it, and score both.

    Returns {"lora": {"colour_share": share drawn in ``colour``, "shape", "background": shares matching the
    prompt}, "without": {"prompt_colour_share", "colour_share"}, "count"}.
    """
    from .dataset import parse_caption
    from .evaluate import background_colour, classify_shapes, foreground_colour

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = lora_prompts(count, colour, seed=seed)

    def images() -> list:
        return [pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64,
                     generator=torch.Generator().manual_seed(seed + index)).images[0]
                for index, prompt in enumerate(prompts)]

    plain = images()
    lora = Path(lora)
    pipe.load_lora_weights(lora.parent, weight_name=lora.name)
    with_lora = images()
    parsed = [parse_caption(p) for p in prompts]
    shapes = classify_shapes(with_lora, classifier)
    lora_colours = [foreground_colour(image) for image in with_lora]
    plain_colours = [foreground_colour(image) for image in plain]
    n = len(prompts)
    return {
        "count": n, "colour": colour, "steps": steps, "guidance_scale": guidance_scale,
        "lora": {"colour_share": sum(c == colour for c in lora_colours) / n,
                 "shape_share": sum(s == p["shape"] for s, p in zip(shapes, parsed)) / n,
                 "background_share": sum(background_colour(image)[0] == p["background"]
                                         for image, p in zip(with_lora, parsed)) / n},
        "without": {"prompt_colour_share": sum(c == p["colour"] for c, p in zip(plain_colours, parsed)) / n,
                    "colour_share": sum(c == colour for c in plain_colours) / n},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.training.lora PIPELINE LORA CLASSIFIER [--colour C] [--count N]``: print the scores."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pipeline")
    parser.add_argument("lora", help="the LoRA .safetensors file")
    parser.add_argument("classifier")
    parser.add_argument("--colour", default=DEFAULT_COLOUR, choices=COLOUR_NAMES)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_lora(args.pipeline, args.lora, args.classifier, colour=args.colour, count=args.count,
                                   seed=args.seed), indent=2))


if __name__ == "__main__":
    main()
