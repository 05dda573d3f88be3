"""The default models the project trained itself (issue 17), shipped in the repository.

- ``shapes-sd/``: a diffusers StableDiffusionPipeline folder (64x64 images of one shape in one colour
  on a plain background, prompted as "a red circle on a white background"; see docs/models.md);
- ``shapes-classifier/``: a transformers MobileViTForImageClassification folder naming the six shapes;
- ``shapes-controlnet/``: a diffusers ControlNetModel folder for ``shapes-sd`` on canny edges (the suite's
  ``canny`` preprocessor): the edges decide the shape, the prompt the colours;
- ``shapes-lora/purple-shapes.safetensors``: a LoRA for ``shapes-sd`` (diffusers' LoRA format) that draws every
  shape purple whatever colour the prompt names;
- ``RECORD.json``: the command, seed, commit and library versions that made them, their held-out scores.

They are made by ``python -m services.training all --out DIR --seed 0`` and copied here. The tiny random-weight
models of services.tiny_models stay the fixtures of tests that only need a valid folder.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["classifier_path", "controlnet_path", "lora_path", "pipeline_path", "record", "record_path"]

_ROOT = Path(__file__).resolve().parent


def pipeline_path() -> Path:
    """The trained Stable Diffusion folder (loads with ``StableDiffusionPipeline.from_pretrained``)."""
    return _ROOT / "shapes-sd"


def classifier_path() -> Path:
    """The trained shape classifier folder (loads with ``AutoModelForImageClassification.from_pretrained``)."""
    return _ROOT / "shapes-classifier"


def controlnet_path() -> Path:
    """The trained canny ControlNet for :func:`pipeline_path` (loads with ``ControlNetModel.from_pretrained``)."""
    return _ROOT / "shapes-controlnet"


def lora_path() -> Path:
    """The trained LoRA for :func:`pipeline_path` that draws every shape purple (one safetensors file; loads with
    ``load_lora_weights``; the registry imports it as the LoRA "purple-shapes")."""
    return _ROOT / "shapes-lora" / "purple-shapes.safetensors"


def record_path() -> Path:
    """RECORD.json: how the shipped weights were made (command, seed, commit, durations, scores)."""
    return _ROOT / "RECORD.json"


def record() -> dict:
    """The parsed :func:`record_path`."""
    return json.loads(record_path().read_text())
