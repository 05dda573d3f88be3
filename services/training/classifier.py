"""Train the shape classifier: a small transformers MobileViTForImageClassification on the data set's shapes.

It names the shape of an image (six labels); colour is judged by pixel statistics instead (evaluate.py).
Trained on training combinations only, scored on held-out ones. Images are augmented with pixel noise,
blur and brightness jitter so the classifier also judges the slightly soft pictures the diffusion model draws.
The folder is the usual transformers format: config.json (id2label), model.safetensors and a
MobileViTImageProcessor config (64x64 images resized to 32x32) beside it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import MobileViTConfig, MobileViTForImageClassification, MobileViTImageProcessorPil

from .common import Checkpointer, batch_tensors, fast_forward, save_folder, seed_everything
from .dataset import SHAPES, draw_batch

__all__ = ["build_classifier", "build_processor", "preprocess", "train_classifier"]

STAGE = "classifier"
#: The classifier sees images at 32x32 (its processor resizes): shapes stay clear, and a step costs a quarter.
INPUT_SIZE = 32


def build_classifier() -> MobileViTForImageClassification:
    """A MobileViT small enough to train in minutes on two cores (0.22 M parameters), six shape labels."""
    config = MobileViTConfig(
        image_size=INPUT_SIZE,
        patch_size=2,
        num_attention_heads=4,
        hidden_sizes=[24, 32, 40],
        neck_hidden_sizes=[16, 16, 24, 24, 32, 40, 64],
        num_labels=len(SHAPES),
        id2label=dict(enumerate(SHAPES)),
        label2id={label: i for i, label in enumerate(SHAPES)},
    )
    model = MobileViTForImageClassification(config)
    # transformers draws MobileViT's norm scales from N(0, 0.02); at this depth the activations then vanish
    # and training never starts (loss stays at ln 6). PyTorch's standard init (scale 1, bias 0) trains.
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()
    return model


def build_processor() -> MobileViTImageProcessorPil:
    """The processor saved beside the model: resized to 32x32, scaled to [0, 1], RGB flipped to BGR (MobileViT's habit)."""
    return MobileViTImageProcessorPil(do_resize=True, size={"shortest_edge": INPUT_SIZE}, do_center_crop=True,
                                      crop_size={"height": INPUT_SIZE, "width": INPUT_SIZE}, do_rescale=True,
                                      do_flip_channel_order=True)


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """About what the processor does, on a float (B, 3, 64, 64) batch in [0, 1]: resize to 32x32, RGB to BGR.

    Training uses this (fast, batched); the reported accuracy goes through the saved processor itself.
    """
    return F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True).flip(1)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b = pixels.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=generator) < 0.4
    soft = F.interpolate(F.interpolate(pixels, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=pixels.shape[-2:], mode="bilinear")
    pixels = torch.where(blur, soft, pixels)
    pixels = pixels * (1 + 0.15 * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5))
    noise = torch.randn(pixels.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    return (pixels + noise).clamp(0, 1)


@torch.no_grad()
def accuracy(model: MobileViTForImageClassification, seed: int, count: int = 512) -> float:
    """Share of ``count`` held-out data-set images whose shape the model names, through the saved processor."""
    model.eval()
    images, samples = draw_batch([seed, 7919], count, held_out=True)
    processor = build_processor()
    pixel_values = processor([Image.fromarray(image) for image in images], return_tensors="pt")["pixel_values"]
    logits = torch.cat([model(pixel_values=chunk).logits for chunk in pixel_values.split(128)])
    labels = torch.tensor([SHAPES.index(s.shape) for s in samples])
    return float((logits.argmax(-1) == labels).float().mean())


def train_classifier(out: Path, *, seed: int = 0, steps: int = 1500, batch_size: int = 48, lr: float = 2e-3,
                     progress: bool = True) -> dict:
    """Train and save the classifier to ``out/classifier``; resumes from ``out/checkpoints/classifier.pt``.

    Returns {"classifier_held_out_accuracy": ..., "steps": ...}.
    """
    out = Path(out)
    seed_everything(seed)
    model = build_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    checkpoints = Checkpointer(out / "checkpoints" / f"{STAGE}.pt", {"model": model}, optimizer)
    start, _ = checkpoints.restore()
    fast_forward(schedule, start)
    model.train()
    bar = tqdm(range(start, steps), desc="classifier", initial=start, total=steps, disable=not progress)
    for step in bar:
        pixels, samples = batch_tensors(seed, STAGE, step, batch_size)
        labels = torch.tensor([SHAPES.index(s.shape) for s in samples])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = F.cross_entropy(model(pixel_values=preprocess(_augment(pixels, generator))).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        checkpoints.maybe_save(step + 1)
    checkpoints.maybe_save(steps, force=True)
    score = accuracy(model, seed)
    model.eval()

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        build_processor().save_pretrained(folder)

    save_folder(out / STAGE, write)
    return {"classifier_held_out_accuracy": score, "classifier_steps": steps}
