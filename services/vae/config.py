"""VAE service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_limit_flag, common_parser

#: Default port of the VAE service.
DEFAULT_PORT = 50054


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.vae`."""
    parser = common_parser("latentwire VAE service (latents <-> images: Decode, and Encode for image-to-image and inpainting)", DEFAULT_PORT)
    add_limit_flag(parser, "--max-image-size", hard_limit=limits.MAX_IMAGE_SIZE,
                   help="largest decoded width or height, in pixels")
    add_limit_flag(parser, "--max-input-pixels", hard_limit=limits.MAX_INPUT_PIXELS,
                   help="largest init image or mask accepted by Encode, in pixels (width times height)")
    add_limit_flag(parser, "--max-batch", hard_limit=limits.MAX_BATCH, help="most latents decoded in one request")
    return parser
