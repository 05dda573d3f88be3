"""Write a diffusers pipeline folder atomically: the one save path of every tiny model family.

Same contract as :func:`services.tiny_models.create_tiny_sd`: the folder is built in a hidden
temporary sibling and renamed into place, so the target either does not exist or holds a
complete model, and an existing non-empty target is never overwritten.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline

from .stable_diffusion import _apply_umask_permissions, _occupied

__all__ = ["save_pipeline_folder", "seeded"]


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build one component right after reseeding, as diffusers' fast tests do, in float32, eval mode.

    Reseeding before each component makes its weights depend only on the seed, not on how many
    random numbers the others consumed. The caller's global RNG stream is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    # Parity checks assume float32 weights, whatever the default dtype; diffusers warns on every
    # .to(dtype), even a no-op one, hence the check.
    if any(param.dtype != torch.float32 for param in model.parameters()):
        model = model.to(torch.float32)
    return model.eval()


def save_pipeline_folder(build: Callable[[], DiffusionPipeline], path: str | os.PathLike[str]) -> Path:
    """Build a pipeline with ``build()`` and save it (safetensors only) as a folder at ``path``.

    Raises:
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    target = Path(path)
    if _occupied(target):
        raise FileExistsError(f"{target} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build().save_pretrained(staging, safe_serialization=True)
        _apply_umask_permissions(staging)
        try:
            os.rename(staging, target)  # atomic; refuses to replace a non-empty folder
        except OSError as error:
            if _occupied(target):
                raise FileExistsError(f"{target} appeared while building; left untouched") from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
