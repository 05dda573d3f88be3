"""VAE service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_flag, add_limit_flag, common_parser

from .tiled import DEFAULT_TILE_ABOVE

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
    add_flag(parser, "--vae-tile-above", type=_non_negative, default=DEFAULT_TILE_ABOVE,
             help="pixels (width times height) above which a decode or encode runs in tiles, one image at a time, "
                  "unless the request says vae_tiling ON or OFF")
    add_flag(parser, "--vae-tile-size", type=_non_negative, default=0,
             help="side of a VAE tile in pixels (0: the VAE's own, its config's sample_size)")
    return parser


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return number
