"""Models built locally with random weights, for tests and benchmarks (no model hub access).

- build_clip_tokenizer(): a deterministic CLIP-style byte-level BPE tokenizer (< 1000 ids).
- create_tiny_sd(path, full_size=False, seed=0): write a diffusers Stable Diffusion folder.
- default_model_path() / ensure_default_model(): the shared tiny model under $LATENTWIRE_HOME.
"""
from .stable_diffusion import create_tiny_sd, default_model_path, ensure_default_model
from .tokenizer import build_clip_tokenizer

__all__ = ["build_clip_tokenizer", "create_tiny_sd", "default_model_path", "ensure_default_model"]
