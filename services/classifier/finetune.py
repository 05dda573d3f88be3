"""Fine-tuning an image classifier on an image folder (one sub-folder per label).

The base model's head is replaced by a freshly initialised one for the new labels; by default
only the head trains (the backbone is frozen and kept in eval mode, so its BatchNorm statistics
stay), or with ``unfreeze_backbone`` everything trains, the backbone at its own, lower learning
rate. Images are preprocessed by the base model's own image processor, exactly as the
classifier service will preprocess them, so what was measured here is what the service sees.
The held-out set is either a separate folder or a stratified, seeded split of the data.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

#: File suffixes read as images from a data folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class FinetuneSettings:
    """How to train."""

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-2
    backbone_learning_rate: float = 3e-3
    weight_decay: float = 0.01
    unfreeze_backbone: bool = False
    heldout_fraction: float = 0.2
    seed: int = 0


@dataclass
class Progress:
    """One training step (``heldout_accuracy`` is set on the last step of an epoch)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    elapsed_seconds: float
    heldout_accuracy: float | None = None


@dataclass
class FinetuneResult:
    """The trained model folder and how well it does."""

    folder: Path
    labels: list[str]
    train_count: int
    heldout_count: int
    heldout_accuracy: float
    trainable_parameters: int
    history: list[float] = field(default_factory=list)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Labels (sorted sub-folder names) and (image path, label index) pairs of an image folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one sub-folder of images per label")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [(path, index) for index, label in enumerate(labels)
               for path in sorted((root / label).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if len(labels) < 2:
        raise ValueError(f"{root} has {len(labels)} label folder(s); a classifier needs at least 2")
    empty = [label for index, label in enumerate(labels) if not any(i == index for _, i in samples)]
    if empty:
        raise ValueError(f"{root}: label folder(s) {', '.join(empty)} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return labels, samples


def split_heldout(samples: list[tuple[Path, int]], fraction: float, seed: int
                  ) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """A stratified, seeded split: about ``fraction`` of each label's images are held out (at least one)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    train, heldout = [], []
    for label in sorted({i for _, i in samples}):
        items = [s for s in samples if s[1] == label]
        rng.shuffle(items)
        count = max(1, round(len(items) * fraction))
        if count >= len(items):
            raise ValueError(f"label {label} has {len(items)} image(s): too few to hold any out for evaluation")
        heldout += items[:count]
        train += items[count:]
    return train, heldout


def _load_images(paths: list[Path]) -> list[Image.Image]:
    from transformers.image_utils import load_image

    return [load_image(Image.open(path)) for path in paths]


def _pixel_values(processor, paths: list[Path]) -> torch.Tensor:
    return processor(images=_load_images(paths), return_tensors="pt")["pixel_values"]


def _head_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    prefix = model.base_model_prefix + "."
    return [(name, p) for name, p in model.named_parameters() if not name.startswith(prefix)]


def evaluate(model: torch.nn.Module, processor, samples: list[tuple[Path, int]], batch_size: int = 32) -> float:
    """Top-1 accuracy of ``model`` on (image path, label index) samples."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            logits = model(pixel_values=_pixel_values(processor, [p for p, _ in chunk])).logits
            correct += int((logits.argmax(-1) == torch.tensor([i for _, i in chunk])).sum())
    return correct / max(1, len(samples))


def finetune(base: str | os.PathLike, data_dir: str | os.PathLike, output: str | os.PathLike,
             settings: FinetuneSettings | None = None, *, heldout_dir: str | os.PathLike | None = None,
             on_progress: Callable[[Progress], None] | None = None, allow_pickle: bool = False) -> FinetuneResult:
    """Fine-tune the classifier folder ``base`` on ``data_dir`` and save the result to ``output`` (new folder).

    ``output`` is written atomically (built beside it, then renamed) in transformers format
    (safetensors, config.json with the new id2label, the base's preprocessor_config.json).
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    settings = settings or FinetuneSettings()
    if settings.epochs < 1 or settings.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty")
    labels, samples = scan_image_folder(data_dir)
    if heldout_dir is not None:
        heldout_labels, heldout = scan_image_folder(heldout_dir)
        if heldout_labels != labels:
            raise ValueError(f"the held-out folder's labels {heldout_labels} differ from the data's {labels}")
        train = samples
    else:
        train, heldout = split_heldout(samples, settings.heldout_fraction, settings.seed)

    torch.manual_seed(settings.seed)
    processor = AutoImageProcessor.from_pretrained(base, backend="pil")  # as the service (model.py) preprocesses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new head's "newly initialized weights" notice is the point here
        model = AutoModelForImageClassification.from_pretrained(
            base, id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True,
            use_safetensors=None if allow_pickle else True)
    model.config.problem_type = "single_label_classification"
    head = _head_parameters(model)
    # A fresh head even when the label count matches the base's (from_pretrained would keep the old one).
    head_names = {name.rsplit(".", 1)[0] for name, _ in head}
    for name, module in model.named_modules():
        if name in head_names and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    backbone = model.base_model
    for parameter in backbone.parameters():
        parameter.requires_grad = settings.unfreeze_backbone
    groups = [{"params": [p for _, p in head], "lr": settings.learning_rate}]
    if settings.unfreeze_backbone:
        groups.append({"params": list(backbone.parameters()), "lr": settings.backbone_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps = math.ceil(len(train) / settings.batch_size)
    # Linear decay to 0 over the run (transformers Trainer's default schedule), without warm-up.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / (steps * settings.epochs))
    trainable = sum(p.numel() for group in groups for p in group["params"])

    generator = torch.Generator().manual_seed(settings.seed)
    history: list[float] = []
    started = time.perf_counter()
    accuracy = 0.0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        if not settings.unfreeze_backbone:
            backbone.eval()  # frozen: keep its BatchNorm statistics and switch its dropout off
        order = torch.randperm(len(train), generator=generator).tolist()
        for step in range(1, steps + 1):
            chunk = [train[i] for i in order[(step - 1) * settings.batch_size:step * settings.batch_size]]
            pixel_values = _pixel_values(processor, [p for p, _ in chunk])
            targets = torch.tensor([i for _, i in chunk])
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixel_values).logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress = Progress(epoch=epoch, epochs=settings.epochs, step=step, steps=steps, loss=loss.item(),
                                elapsed_seconds=time.perf_counter() - started)
            if step == steps:
                accuracy = evaluate(model, processor, heldout)
                history.append(accuracy)
                progress.heldout_accuracy = accuracy
            if on_progress is not None:
                on_progress(progress)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.eval()
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        for item in [staging, *staging.rglob("*")]:
            item.chmod(0o755 if item.is_dir() else 0o644)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FinetuneResult(folder=output, labels=labels, train_count=len(train), heldout_count=len(heldout),
                          heldout_accuracy=accuracy, trainable_parameters=trainable, history=history)
