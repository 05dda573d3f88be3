"""Models built locally with random weights, for tests and benchmarks (no model hub access).

- build_clip_tokenizer(): a deterministic CLIP-style byte-level BPE tokenizer (< 1000 ids).
- create_tiny_sd(path, full_size=False, seed=0): write a diffusers Stable Diffusion folder.
- default_model_path() / ensure_default_model(): the shared tiny model under $LATENTWIRE_HOME.
- create_tiny_classifier(path, full_size=False, seed=0): write a transformers MobileViT classifier folder;
  default_classifier_path() / ensure_default_classifier(): the shared tiny one (mobilevit.py).
- create_tiny_controlnet(path, full_size=False, seed=0): write a diffusers ControlNetModel folder;
  default_controlnet_path() / ensure_default_controlnet(): the shared tiny one (controlnet.py).
"""
from services.runtime.image_processors import choose_pil_image_processors

choose_pil_image_processors()  # before diffusers is imported: see services/runtime/image_processors.py

from .stable_diffusion import create_tiny_sd, default_model_path, ensure_default_model
from .mobilevit import create_tiny_classifier, default_classifier_path, ensure_default_classifier
from .controlnet import create_tiny_controlnet, default_controlnet_path, ensure_default_controlnet
from .tokenizer import build_clip_tokenizer

__all__ = ["build_clip_tokenizer", "create_tiny_sd", "default_model_path", "ensure_default_model",
           "create_tiny_classifier", "default_classifier_path", "ensure_default_classifier",
           "create_tiny_controlnet", "default_controlnet_path", "ensure_default_controlnet"]
