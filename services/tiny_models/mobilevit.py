"""Locally built MobileViT image classifiers with random weights (transformers format, safetensors).

- create_tiny_classifier(path): the configuration transformers' own MobileViT tests use
  (image_size=32, hidden_sizes=[12, 16, 20], 10 labels; about 114 thousand parameters), with a
  MobileViTImageProcessor config for 32x32 inputs and CIFAR-10 label names.
- create_tiny_classifier(path, full_size=True): the apple/mobilevit-small architecture
  (MobileViTConfig() defaults, 1000 labels, 5.6 million parameters) and its processor settings
  (shortest edge 288, center crop 256x256), for benchmarks.
- default_classifier_path() / ensure_default_classifier(): the tiny one under $LATENTWIRE_HOME.

Weights are random but seeded, so a given (size, seed) always gives the same bytes. One
adjustment makes a random network usable for tests: transformers initialises MobileViT's
BatchNorm scales from N(0, 0.02), and at this depth the activations then shrink until every
logit is exactly 0.0 (every image ties on every label, so no comparison could ever fail). The
builder gives the norm layers PyTorch's standard initialisation, estimates each BatchNorm's
running statistics on seeded random images (a data-dependent initialisation), and draws the
classification head with a 1/sqrt(fan-in) scale, so logits spread out (std about 1) and differ
from image to image.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
# The PIL processor, chosen explicitly (no torchvision here); it saves the same preprocessor_config.json as
# MobileViTImageProcessor (image_processor_type included), so the folder is the usual transformers format.
from transformers import MobileViTConfig, MobileViTForImageClassification, MobileViTImageProcessorPil

__all__ = ["CIFAR10_LABELS", "create_tiny_classifier", "default_classifier_path", "ensure_default_classifier"]

#: Label names of the tiny classifier (its 10 outputs), CIFAR-10's.
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: Name of the embedded default classifier (its folder under $LATENTWIRE_HOME/models and its registry name).
DEFAULT_CLASSIFIER_NAME = "tiny-mobilevit"


def _tiny_config() -> MobileViTConfig:
    # transformers' MobileViTModelTester sizes (tests/models/mobilevit/test_modeling_mobilevit.py).
    return MobileViTConfig(
        image_size=32,
        patch_size=2,
        num_attention_heads=4,
        hidden_sizes=[12, 16, 20],
        neck_hidden_sizes=[8, 8, 16, 16, 32, 32, 32],
        num_labels=len(CIFAR10_LABELS),
        id2label=dict(enumerate(CIFAR10_LABELS)),
        label2id={label: i for i, label in enumerate(CIFAR10_LABELS)},
    )


def _full_config() -> MobileViTConfig:
    # MobileViTConfig() defaults are apple/mobilevit-small's architecture; 1000 ImageNet-sized outputs.
    labels = {i: f"class_{i}" for i in range(1000)}
    return MobileViTConfig(num_labels=1000, id2label=labels, label2id={v: k for k, v in labels.items()})


def _processor(full_size: bool) -> MobileViTImageProcessorPil:
    if full_size:  # apple/mobilevit-small's preprocessor_config.json
        size, crop = {"shortest_edge": 288}, {"height": 256, "width": 256}
    else:
        size, crop = {"shortest_edge": 32}, {"height": 32, "width": 32}
    return MobileViTImageProcessorPil(do_resize=True, size=size, do_center_crop=True, crop_size=crop,
                                   do_rescale=True, do_flip_channel_order=True)


def _build(full_size: bool, seed: int) -> MobileViTForImageClassification:
    config = _full_config() if full_size else _tiny_config()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG stream alone
        torch.manual_seed(seed)
        model = MobileViTForImageClassification(config)
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration batches
        side = config.image_size
        calibration = 2 if full_size else 4
        model.train()
        with torch.no_grad():
            for _ in range(calibration):
                model(pixel_values=torch.rand(8, 3, side, side, generator=generator) * 2 - 1)
            head = model.classifier
            torch.nn.init.normal_(head.weight, std=head.in_features ** -0.5, generator=generator)
            torch.nn.init.zeros_(head.bias)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1  # PyTorch's default, for anyone fine-tuning the result
    return model.eval()


def create_tiny_classifier(path: str | os.PathLike[str], *, full_size: bool = False, seed: int = 0) -> Path:
    """Write a transformers MobileViT image-classification folder with random weights to ``path``.

    The folder holds config.json (MobileViTForImageClassification, id2label), model.safetensors
    and preprocessor_config.json (MobileViTImageProcessor); it loads with
    ``AutoModelForImageClassification.from_pretrained(path)`` and ``AutoImageProcessor.from_pretrained(path)``,
    and with ``pipeline("image-classification", model=path)``.

    Args:
        path: Target folder; must not exist, or be empty.
        full_size: False builds the tiny test model (32x32 inputs, 10 labels, ~0.5 MB); True the
            mobilevit-small architecture (256x256 inputs, 1000 labels, 5.6M parameters, ~22 MB).
        seed: Seeds the weights; the same (full_size, seed) gives the same bytes.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.

    Built in a temporary sibling and renamed into place, so ``path`` either does not exist or
    holds a complete model.
    """
    target = Path(path)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build(full_size, seed).save_pretrained(staging, safe_serialization=True)
        _processor(full_size).save_pretrained(staging)
        for item in [staging, *staging.rglob("*")]:  # mkdtemp makes 0700: give ordinary permissions
            item.chmod(0o755 if item.is_dir() else 0o644)
        try:
            os.rename(staging, target)
        except OSError as error:
            if target.exists() and any(target.iterdir()):
                raise FileExistsError(f"{target} appeared while building; left untouched") from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_classifier_path() -> Path:
    """Where the shared tiny classifier lives: ``$LATENTWIRE_HOME/models/tiny-mobilevit``."""
    from latentwire.client.home import default_home

    return default_home() / "models" / DEFAULT_CLASSIFIER_NAME


def ensure_default_classifier() -> Path:
    """Return :func:`default_classifier_path`, building the tiny classifier there first if missing.

    Safe when several processes call it at once (the build is deterministic; the first rename wins).
    """
    target = default_classifier_path()
    if (target / "config.json").is_file():
        return target
    try:
        create_tiny_classifier(target)
    except FileExistsError:
        if not (target / "config.json").is_file():
            raise
    return target


# ----------------------------------------------------------------------------------------------
# Images made locally, for tests and benchmarks


def synthetic_image(rng, size: int = 48):
    """A random picture (background, one to three filled ellipses or rectangles, pixel noise) as a PIL image."""
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        box = [x0, y0, x0 + int(rng.integers(6, size)), y0 + int(rng.integers(6, size))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def synthetic_images(count: int, *, seed: int = 0, size: int = 48, format: str = "PNG") -> list[bytes]:
    """``count`` encoded synthetic pictures (PNG by default); the same (count, seed, size) gives the same bytes."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        synthetic_image(rng, size).save(buffer, format=format)
        encoded.append(buffer.getvalue())
    return encoded


def stripes_image(rng, vertical: bool, size: int = 40):
    """Stripes of two distinct random colours, vertical or horizontal, at a random period and phase, with noise."""
    import numpy as np
    from PIL import Image

    period = int(rng.integers(6, 14))
    phase = int(rng.integers(0, period))
    on = (np.arange(size) + phase) % period < period // 2
    mask = np.broadcast_to(on[None, :] if vertical else on[:, None], (size, size))
    a, b = rng.integers(0, 256, (2, 3))
    while np.abs(a - b).sum() < 200:  # two colours that can be told apart, or the orientation is invisible
        a, b = rng.integers(0, 256, (2, 3))
    pixels = np.where(mask[..., None], a, b).astype(np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_stripes_dataset(root: str | os.PathLike[str], per_label: int, *, seed: int = 0) -> Path:
    """A two-label image folder (``horizontal/``, ``vertical/``) of ``per_label`` PNG stripe images each."""
    import numpy as np

    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in ("horizontal", "vertical"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for index in range(per_label):
        for label in ("horizontal", "vertical"):
            stripes_image(rng, vertical=label == "vertical").save(root / label / f"{index:04d}.png")
    return root
