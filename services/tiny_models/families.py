"""One entry point for every tiny model family: ``create_tiny_model(path, family, seed=...)``.

``FAMILIES`` lists what ``latentwire models create-tiny --family`` offers; ``sd15`` is the
original tiny Stable Diffusion 1.x model (stable_diffusion.py). The tiny preview VAEs (AutoencoderTiny folders:
"taesd", "taesd3", "taef1"; preview_vae.py) are made by the same call, but are no model family.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FAMILIES", "create_tiny_model"]

FAMILIES = ("sd15", "sdxl", "sdxl-refiner", "sd3", "flux")


def create_tiny_model(path: str | os.PathLike[str], family: str = "sd15", *, seed: int = 0) -> Path:
    """Write a tiny random-weight diffusers folder of ``family`` (one of :data:`FAMILIES`, or a tiny preview VAE of
    preview_vae.PREVIEW_VAES) to ``path``.

    The same (family, seed) always gives the same bytes.

    Raises:
        ValueError: ``family`` is not one of :data:`FAMILIES`.
        FileExistsError: ``path`` already holds something; it is never overwritten.
    """
    # Imports are per family so building one does not import every other family's classes.
    if family == "sd15":
        from .stable_diffusion import create_tiny_sd

        return create_tiny_sd(path, seed=seed)
    if family in ("sdxl", "sdxl-refiner"):
        from .sdxl import create_tiny_sdxl

        return create_tiny_sdxl(path, seed=seed, refiner=family == "sdxl-refiner")
    if family == "sd3":
        from .sd3 import create_tiny_sd3

        return create_tiny_sd3(path, seed=seed)
    if family == "flux":
        from .flux import create_tiny_flux

        return create_tiny_flux(path, seed=seed)
    from .preview_vae import PREVIEW_VAES, create_tiny_preview_vae

    if family in PREVIEW_VAES:
        return create_tiny_preview_vae(path, family, seed=seed)
    raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
