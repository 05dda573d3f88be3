"""ControlNet service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser

#: Default port of the ControlNet service.
DEFAULT_PORT = 50057


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.controlnet`."""
    parser = common_parser(
        "latentwire ControlNet service (per-step ControlNet residuals for the denoiser, and control-image "
        "preprocessors); --model takes standalone diffusers ControlNetModel folders", DEFAULT_PORT)
    add_flag(parser, "--max-image-size", default=2048, type=int,
             help="largest generated width or height a run may ask for, in pixels")
    add_flag(parser, "--max-input-pixels", default=4096 * 4096, type=int,
             help="largest unit image accepted, in pixels (width times height)")
    add_flag(parser, "--max-batch", default=16, type=int, help="most images per run (batch_size)")
    add_flag(parser, "--max-units", default=4, type=int, help="most ControlNet units per run")
    return parser
