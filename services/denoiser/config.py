"""Denoiser service configuration: the common flags plus its own limits."""
from __future__ import annotations

import argparse

from services.runtime import limits
from services.runtime.config import add_flag, add_limit_flag, common_parser

from .acceleration import COMPILE_MODES

#: Default port of the denoiser service.
DEFAULT_PORT = 50053
#: Default --checkpoint-interval-s: a failover re-runs at most half a second of steps.
DEFAULT_CHECKPOINT_INTERVAL_S = 0.5


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 3600 seconds")
    return seconds


#: Default --step-batch-max: rows (latent images, guidance halves counted) in one shared network forward.
DEFAULT_STEP_BATCH_MAX = 16
#: Most rows --step-batch-max takes (a forward of more rows gains nothing and holds more memory).
MAX_STEP_BATCH = 256
#: Default --step-batch-wait-ms: how long a step waits for the other jobs of its key.
DEFAULT_STEP_BATCH_WAIT_MS = 2.0
#: Most --step-batch-wait-ms (every step of a job may wait this long).
MAX_STEP_BATCH_WAIT_MS = 1000.0


def _step_batch_max(value: str) -> int:
    try:
        rows = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of rows") from None
    if not 1 <= rows <= MAX_STEP_BATCH:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 (no batching) and {MAX_STEP_BATCH} rows")
    return rows


def _step_batch_wait_ms(value: str) -> float:
    try:
        wait = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of milliseconds") from None
    if not 0 <= wait <= MAX_STEP_BATCH_WAIT_MS:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and {MAX_STEP_BATCH_WAIT_MS:g} milliseconds")
    return wait


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
    # Step-level batching of concurrent jobs' UNet or transformer forwards (services/denoiser/step_batching.py).
    add_flag(parser, "--step-batch-max", type=_step_batch_max, default=DEFAULT_STEP_BATCH_MAX,
             help="most rows (images, guidance halves counted) that concurrent jobs of one model, size and "
                  "conditioning shape stack into one UNet or transformer forward per step; 1: every job calls the "
                  f"network alone (no batching); at most {MAX_STEP_BATCH}. Jobs with LoRAs or tiling always run "
                  "alone")
    add_flag(parser, "--step-batch-wait-ms", type=_step_batch_wait_ms, default=DEFAULT_STEP_BATCH_WAIT_MS,
             help="how long a step waits for the other running jobs of its batch to reach the same point, in "
                  "milliseconds (0: never waits; a job running alone never waits); at most "
                  f"{MAX_STEP_BATCH_WAIT_MS:g}")
    # Accelerator options of the network (services/denoiser/acceleration.py); off by default.
    add_flag(parser, "--channels-last", action="store_true", default=False,
             help="keep the UNet's weights in channels_last (NHWC) memory format, faster for convolutions on GPUs "
                  "with tensor cores; results differ by float rounding only; transformers (SD3, Flux) unchanged")
    add_flag(parser, "--compile", choices=COMPILE_MODES, default="off",
             help="torch.compile the network with this mode (reduce-overhead: CUDA graphs on CUDA for fixed "
                  "shapes); each new shape compiles first; a compiled network stops for a cancel or deadline "
                  "between steps only; jobs with LoRAs or tiling run it uncompiled")
    # The preview VAE of previews by method "tiny-vae" when a request names none (services/denoiser/preview_vae.py).
    add_flag(parser, "--preview-vae", action="append", default=[],
             help="the tiny preview VAE (AutoencoderTiny: TAESD, TAESDXL, TAESD3, TAEF1) that decodes live previews "
                  "of method tiny-vae for one model family when the request names none, as FAMILY=NAME (family sd, "
                  "sdxl, sdxl-refiner, sd3 or flux; sdxl's serves the refiner too; NAME a registry model of kind "
                  "MODEL_KIND_PREVIEW_VAE, or an AutoencoderTiny folder path); repeatable (the variable takes a "
                  "comma-separated list); without one, such requests must name their preview VAE")
    return parser
