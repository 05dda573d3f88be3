"""VAE service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser

#: Default port of the VAE service.
DEFAULT_PORT = 50054


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.vae`."""
    parser = common_parser("latentwire VAE service (latents <-> images: Decode, and Encode for image-to-image and inpainting)", DEFAULT_PORT)
    add_flag(parser, "--max-image-size", default=2048, type=int, help="largest decoded width or height, in pixels")
    add_flag(parser, "--max-input-pixels", default=4096 * 4096, type=int,
             help="largest init image or mask accepted by Encode, in pixels (width times height)")
    add_flag(parser, "--max-batch", default=16, type=int, help="most latents decoded in one request")
    return parser
