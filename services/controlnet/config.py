"""ControlNet service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_limit_flag, common_parser

#: Default port of the ControlNet service.
DEFAULT_PORT = 50057


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.controlnet`."""
    parser = common_parser(
        "latentwire ControlNet service (per-step ControlNet residuals for the denoiser, and control-image "
        "preprocessors); --model takes standalone diffusers ControlNetModel folders", DEFAULT_PORT)
    add_limit_flag(parser, "--max-image-size", hard_limit=limits.MAX_IMAGE_SIZE,
                   help="largest generated width or height a run may ask for, in pixels")
    add_limit_flag(parser, "--max-input-pixels", hard_limit=limits.MAX_INPUT_PIXELS,
                   help="largest unit image accepted, in pixels (width times height)")
    add_limit_flag(parser, "--max-batch", hard_limit=limits.MAX_BATCH, help="most images per run (batch_size)")
    add_limit_flag(parser, "--max-units", hard_limit=limits.MAX_CONTROLNET_UNITS, help="most ControlNet units per run")
    return parser
