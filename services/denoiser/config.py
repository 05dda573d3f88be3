"""Denoiser service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_flag, add_limit_flag, common_parser

#: Default port of the denoiser service.
DEFAULT_PORT = 50053
#: Default --checkpoint-interval-s: a failover re-runs at most half a second of steps.
DEFAULT_CHECKPOINT_INTERVAL_S = 0.5


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 3600 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.denoiser`."""
    parser = common_parser("latentwire denoiser service (UNet or transformer + scheduler loop)", DEFAULT_PORT)
    add_limit_flag(parser, "--max-steps", hard_limit=limits.MAX_STEPS,
                   help="most denoising steps per request (a model's schedule may allow fewer)")
    add_limit_flag(parser, "--max-image-size", hard_limit=limits.MAX_IMAGE_SIZE, help="largest width or height, in pixels")
    add_limit_flag(parser, "--max-batch", hard_limit=limits.MAX_BATCH, help="most images denoised in one request")
    add_flag(parser, "--checkpoint-interval-s", type=_seconds, default=DEFAULT_CHECKPOINT_INTERVAL_S,
             help="when a caller asks for checkpoints (the orchestrator, for failover), send one after the first "
                  "step that ends at least this many seconds after the last one; 0: after every step. A failover "
                  "re-runs at most this much work; a step without a checkpoint sends no copy of the latents")
    # The only ControlNet services this denoiser ever connects to: a request names one of them at most by NAME.
    add_flag(parser, "--controlnet-address", action="append", default=[],
             help="a ControlNet replica this denoiser streams with, as HOST:PORT or NAME=HOST:PORT (its name is "
                  "HOST:PORT when none is given), as this host reaches it; repeatable (the variable takes a "
                  "comma-separated list); without any, requests with ControlNet units get FAILED_PRECONDITION")
    # The preview VAE of previews by method "tiny-vae" when a request names none (services/denoiser/preview_vae.py).
    add_flag(parser, "--preview-vae", action="append", default=[],
             help="the tiny preview VAE (AutoencoderTiny: TAESD, TAESDXL, TAESD3, TAEF1) that decodes live previews "
                  "of method tiny-vae for one model family when the request names none, as FAMILY=NAME (family sd, "
                  "sdxl, sdxl-refiner, sd3 or flux; sdxl's serves the refiner too; NAME a registry model of kind "
                  "MODEL_KIND_PREVIEW_VAE, or an AutoencoderTiny folder path); repeatable (the variable takes a "
                  "comma-separated list); without one, such requests must name their preview VAE")
    return parser
