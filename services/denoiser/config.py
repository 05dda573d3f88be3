"""Denoiser service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_flag, add_limit_flag, common_parser

#: Default port of the denoiser service.
DEFAULT_PORT = 50053


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.denoiser`."""
    parser = common_parser("latentwire denoiser service (UNet or transformer + scheduler loop)", DEFAULT_PORT)
    add_limit_flag(parser, "--max-steps", hard_limit=limits.MAX_STEPS,
                   help="most denoising steps per request (a model's schedule may allow fewer)")
    add_limit_flag(parser, "--max-image-size", hard_limit=limits.MAX_IMAGE_SIZE, help="largest width or height, in pixels")
    add_limit_flag(parser, "--max-batch", hard_limit=limits.MAX_BATCH, help="most images denoised in one request")
    # The only ControlNet services this denoiser ever connects to: a request names one of them at most by NAME.
    add_flag(parser, "--controlnet-address", action="append", default=[],
             help="a ControlNet replica this denoiser streams with, as HOST:PORT or NAME=HOST:PORT (its name is "
                  "HOST:PORT when none is given), as this host reaches it; repeatable (the variable takes a "
                  "comma-separated list); without any, requests with ControlNet units get FAILED_PRECONDITION")
    return parser
