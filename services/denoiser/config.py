"""Denoiser service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser

#: Default port of the denoiser service.
DEFAULT_PORT = 50053


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.denoiser`."""
    parser = common_parser("latentwire denoiser service (UNet + scheduler loop)", DEFAULT_PORT)
    add_flag(parser, "--max-steps", default=1000, type=int, help="most denoising steps per request")
    add_flag(parser, "--max-image-size", default=2048, type=int, help="largest width or height, in pixels")
    add_flag(parser, "--max-batch", default=16, type=int, help="most images denoised in one request")
    return parser
