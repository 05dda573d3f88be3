"""The hard limits and request checks that the orchestrator and every stage share.

A rule lives once. The orchestrator calls these checks when it accepts a Generate request, and each
stage calls the same ones on what it receives (a stage can be called directly), so whatever a stage
would refuse is refused before a job is stored, with the same reason. A service's flags
(``--max-steps``, ``--max-image-size``, ...) may only lower a hard limit: ``flag_at_most`` lowers a
larger value to it, and the flag's help says so.

Light on purpose: no torch, PIL or cv2 here, so the orchestrator checks requests without loading
model code. The ControlNet preprocessors (cv2) check their table against ``PREPROCESSORS`` at import,
and the denoiser offers only schedulers named in ``SCHEDULERS``.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import QUOTE_LIMIT, ConfigurationError, InvalidArgument, quote

# ----------------------------------------------------------------------------------------------
# Hard limits

#: Most denoising steps: Stable Diffusion schedules have 1000 training timesteps, and with the usual
#: steps_offset of 1 a 1000-step DDIM/PNDM schedule would index past the last one. A model whose
#: schedule is shorter still lowers this in the denoiser (DenoiserModel.max_steps).
MAX_STEPS = 999
#: Width and height are multiples of this (the VAE's 8x downsampling of Stable Diffusion models).
SIZE_MULTIPLE = 8
#: Largest generated width or height, in pixels.
MAX_IMAGE_SIZE = 2048
#: Most images one request generates (the batch every stage runs at once).
MAX_BATCH = 16
#: Most ControlNet units one request may use.
MAX_CONTROLNET_UNITS = 4
#: Largest ControlNet conditioning_scale (AUTOMATIC1111 allows up to 2; diffusers sets no bound).
MAX_CONDITIONING_SCALE = 10.0
#: Largest guidance_scale (classifier-free guidance weight).
MAX_GUIDANCE_SCALE = 100.0
#: Most T5 tokens per prompt (max_sequence_length of SD3 and Flux): T5's context, Flux's pipeline default.
MAX_SEQUENCE_LENGTH = 512
#: Longest job_id a stage takes, in characters: the orchestrator's ids are 32 hex digits, and a job id is
#: kept in status history and log lines, so an unbounded one costs memory on every call that sends it.
MAX_JOB_ID_LENGTH = 128
#: Characters a job_id may use (letters, digits, '.', '_', '-'): safe in log lines and status listings.
_JOB_ID = re.compile(r"[A-Za-z0-9._-]+")
#: Fewest num_inference_steps per scheduler class, where diffusers' cannot run fewer: PNDMScheduler's
#: Runge-Kutta warm-up (unless its config sets skip_prk_steps) takes the last 4 timesteps of the schedule,
#: and set_timesteps fails with fewer. Refused whatever the config says, so the orchestrator (which knows
#: the name but not the config) and the denoiser give the same answer.
MIN_STEPS_BY_SCHEDULER = {"PNDMScheduler": 4}

#: Most pixels decoded from one request image: a 16384 x 16384 "decompression bomb" is refused from its header.
MAX_INPUT_PIXELS = 4096 * 4096
#: Most milliseconds between two DenoiseStep messages a Denoise may ask for (step_message_interval_ms; the
#: orchestrator's --denoiser-step-interval-ms).
MAX_STEP_MESSAGE_INTERVAL_MS = 60_000
#: Smallest side of an image the diffusion stages take: below one latent pixel there is nothing to work with.
MIN_IMAGE_SIDE = 8
#: Encodings accepted for request images.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
#: 8-bit modes the diffusion stages take, converted to RGB (or grayscale for masks) as diffusers' image
#: processors do. The classifier takes every mode Pillow converts to RGB, as transformers' load_image does.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")

#: Weight dtypes a model service runs in (--dtype).
DTYPES = ("float32", "float16", "bfloat16")

#: Scheduler classes the denoiser may build for a model (diffusers' KarrasDiffusionSchedulers, which every
#: Stable Diffusion scheduler lists as compatible, and LCM's). A model still offers only those diffusers
#: declares compatible with its own scheduler and whose dependencies are installed (torchsde for
#: DPMSolverSDEScheduler); ListSchedulers names them.
SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler", "DPMSolverSinglestepScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
    "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
    # Flow matching (SD3, Flux): services/denoiser/flow.py offers those whose set_timesteps takes what the
    # family's pipeline passes (Flux: sigmas and mu; Heun takes neither, so it serves SD3 only).
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)


@dataclass(frozen=True)
class PreprocessorOption:
    """One named option of a ControlNet preprocessor: its default and its inclusive range."""

    name: str
    default: float
    min_value: float
    max_value: float
    description: str


_THRESHOLD = "threshold in 8-bit gray levels"

#: ControlNet preprocessors by name, with their options (services/controlnet/preprocessors.py runs them).
PREPROCESSORS: dict[str, tuple[PreprocessorOption, ...]] = {
    "none": (),
    "canny": (PreprocessorOption("low_threshold", 100, 0, 255, "lower hysteresis " + _THRESHOLD),
              PreprocessorOption("high_threshold", 200, 0, 255, "upper hysteresis " + _THRESHOLD)),
    "invert": (),
    "binary": (PreprocessorOption("threshold", 0, 0, 255, _THRESHOLD + "; 0 or 255 choose one by Otsu's method"),),
    "blur_gaussian": (PreprocessorOption("sigma", 9.0, 0.01, 64.0, "standard deviation of the blur in pixels"),),
    "tile_resample": (PreprocessorOption("down_sampling_rate", 1.0, 1.0, 8.0,
                                         "factor to shrink each side by; below 1.1 keeps the image"),),
    "scribble_xdog": (PreprocessorOption("threshold", 32, 1, 64, "stroke threshold; lower keeps fainter edges"),),
    "lineart_standard": (PreprocessorOption("sigma", 6.0, 0.5, 32.0, "blur in pixels the lines are measured against"),),
}
#: Other names accepted for a preprocessor; the empty name (not set) means "none".
PREPROCESSOR_ALIASES = {"": "none", "passthrough": "none"}


def flag_at_most(hard_limit: int, minimum: int = 1):
    """An argparse ``type`` for a flag that may only lower ``hard_limit``: a whole number of at least
    ``minimum``, a larger value lowered to the hard limit (the flag's help says so)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quote(text)} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return min(value, hard_limit)

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


# ----------------------------------------------------------------------------------------------
# Generation parameters


def check_prompt(prompt: str, field: str = "prompt") -> None:
    """A prompt says something (the token limit is the text encoder's: it depends on the tokenizer)."""
    if not prompt.strip():
        raise InvalidArgument(f"{field} is empty; describe the image to generate", reason="EMPTY_PROMPT",
                              metadata={"field": field})


def check_max_sequence_length(value: int) -> None:
    """max_sequence_length (T5 tokens per prompt) is 0 (the family's default) or 1..MAX_SEQUENCE_LENGTH."""
    if not 0 <= value <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgument(
            f"max_sequence_length is {value}; use 1 to {MAX_SEQUENCE_LENGTH} T5 tokens, or 0 for the model's default",
            reason="INVALID_MAX_SEQUENCE_LENGTH", metadata={"field": "max_sequence_length"})


def check_steps(steps: int, max_steps: int = MAX_STEPS) -> None:
    """num_inference_steps must lie in 1..max_steps."""
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(f"num_inference_steps is {steps}; use 1 to {max_steps}", reason="INVALID_STEPS",
                              metadata={"field": "num_inference_steps"})


def check_scheduler_steps(scheduler: str, steps: int) -> None:
    """Some schedulers need a least number of steps (PNDM: 4); ``scheduler`` is the class that will run
    (the denoiser knows a model's default, the orchestrator only a name the request gave)."""
    least = MIN_STEPS_BY_SCHEDULER.get(scheduler)
    if least is not None and steps < least:
        raise InvalidArgument(
            f"{scheduler} needs at least {least} num_inference_steps, got {steps}; raise the steps to {least} "
            "or more, or choose another scheduler", reason="TOO_FEW_STEPS_FOR_SCHEDULER",
            metadata={"field": "num_inference_steps", "scheduler": scheduler, "min_steps": str(least)})


def check_job_id(job_id: str, field: str = "job_id") -> None:
    """A job id a caller sends (empty: the service makes one): at most 128 letters, digits, '.', '_' or '-'."""
    if not job_id:
        return
    if len(job_id) > MAX_JOB_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {len(job_id)} characters; send at most {MAX_JOB_ID_LENGTH} (or none, and the service "
            "makes one)", reason="INVALID_JOB_ID", metadata={"field": field})
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(
            f"{field} {quote(job_id)} has characters other than letters, digits, '.', '_' and '-'; use only those",
            reason="INVALID_JOB_ID", metadata={"field": field})


def check_size(name: str, value: int, max_size: int = MAX_IMAGE_SIZE, *, zero_means: str | None = None) -> None:
    """A width or height: a positive multiple of 8 pixels up to ``max_size``; 0 too when ``zero_means`` says
    what it stands for (the model's default size, the image's own)."""
    if value == 0 and zero_means:
        return
    if value <= 0 or value % SIZE_MULTIPLE:
        zero = f" (or 0 for {zero_means})" if zero_means else ""
        raise InvalidArgument(f"{name} is {value}; use a positive multiple of {SIZE_MULTIPLE} pixels{zero}",
                              reason="INVALID_SIZE", metadata={"field": name})
    if value > max_size:
        raise InvalidArgument(f"{name} is {value} pixels; at most {max_size} are accepted", reason="IMAGE_TOO_LARGE",
                              metadata={"field": name})


def check_num_images(count: int, max_images: int = MAX_BATCH) -> None:
    """num_images (after the default of 1 is filled in) must lie in 1..max_images."""
    if not 1 <= count <= max_images:
        raise InvalidArgument(f"num_images is {count}; use 1 to {max_images}", reason="INVALID_NUM_IMAGES",
                              metadata={"field": "num_images"})


def check_batch(count: int, max_batch: int, field: str) -> None:
    """The images a stage runs at once (a batch dimension, or a count it is sent) must lie in 1..max_batch."""
    if count < 1:
        raise InvalidArgument(f"{field} is {count}; use 1 to {max_batch}", reason="INVALID_BATCH_SIZE",
                              metadata={"field": field})
    if count > max_batch:
        raise InvalidArgument(f"{field} asks for {count} images; use 1 to {max_batch} per request",
                              reason="BATCH_TOO_LARGE", metadata={"field": field, "max_batch": str(max_batch)})


def _check_range(name: str, value: float, low: float, high: float, reason: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{name} is {value}; use a value from {low:g} to {high:g}", reason=reason,
                              metadata={"field": name})


def check_guidance(guidance_scale: float, guidance_rescale: float, eta: float) -> None:
    """guidance_scale in 0..100, guidance_rescale and eta in 0..1."""
    _check_range("guidance_scale", guidance_scale, 0, MAX_GUIDANCE_SCALE, "INVALID_GUIDANCE_SCALE")
    _check_range("guidance_rescale", guidance_rescale, 0, 1, "INVALID_GUIDANCE_RESCALE")
    _check_range("eta", eta, 0, 1, "INVALID_ETA")


def check_strength(strength: float, num_inference_steps: int) -> None:
    """Strength must lie in [0, 1] and leave at least one step (int(steps * strength) >= 1), as the pipelines need."""
    if not math.isfinite(strength) or not 0 <= strength <= 1:
        raise InvalidArgument(f"strength is {strength}; use a value from 0 to 1", reason="INVALID_STRENGTH",
                              metadata={"field": "strength"})
    if min(int(num_inference_steps * strength), num_inference_steps) < 1:
        raise InvalidArgument(
            f"strength {strength:g} with {num_inference_steps} steps leaves no step to run; raise the strength or "
            "the steps so that strength x steps is at least 1", reason="INVALID_STRENGTH",
            metadata={"field": "strength"})


def check_denoising_range(denoising_start: float, denoising_end: float) -> None:
    """A hand-off's fractions of the schedule (diffusers' denoising_start / denoising_end): each 0 (unset) or in
    (0, 1), and the start before the end when both are set."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if not math.isfinite(value) or not (value == 0 or 0 < value < 1):
            raise InvalidArgument(f"{name} is {value}; use a fraction of the schedule between 0 and 1 (exclusive), "
                                  "or 0 to leave it unset", reason="INVALID_DENOISING_FRACTION",
                                  metadata={"field": name})
    if denoising_start and denoising_end and denoising_start >= denoising_end:
        raise InvalidArgument(f"denoising_start {denoising_start:g} is not before denoising_end {denoising_end:g}; "
                              "the run must start before it ends", reason="INVALID_DENOISING_FRACTION",
                              metadata={"field": "denoising_start"})

def check_scheduler(name: str) -> None:
    """A scheduler a request names (empty: the model's own) must be one the denoiser may build."""
    if name and name not in SCHEDULERS:
        raise InvalidArgument(
            f"scheduler {quote(name)} is not a scheduler latentwire offers; choose one of {', '.join(SCHEDULERS)} "
            "(ListSchedulers names those a model takes)",
            reason="UNKNOWN_SCHEDULER", metadata={"scheduler": name[:QUOTE_LIMIT]})


# ----------------------------------------------------------------------------------------------
# ControlNet units


def check_controlnet_count(count: int, max_units: int = MAX_CONTROLNET_UNITS, *, required: bool = False) -> None:
    """At most ``max_units`` ControlNet units; at least one when ``required`` (a ControlNet run)."""
    if count > max_units:
        raise InvalidArgument(f"{count} ControlNet units sent; at most {max_units} per request are accepted "
                              f"(send 1 to {max_units})", reason="TOO_MANY_CONTROLNETS",
                              metadata={"max_units": str(max_units)})
    if required and count < 1:
        raise InvalidArgument(f"no ControlNet unit sent; send 1 to {max_units}", reason="INVALID_UNITS",
                              metadata={"field": "units"})


def check_controlnet_unit(field: str, conditioning_scale: float, guidance_start: float, guidance_end: float) -> None:
    """One unit's numbers: conditioning_scale in 0..10, 0 <= guidance_start < guidance_end <= 1."""
    if not (math.isfinite(conditioning_scale) and 0 <= conditioning_scale <= MAX_CONDITIONING_SCALE):
        raise InvalidArgument(
            f"{field}.conditioning_scale is {conditioning_scale}; use 0 to {MAX_CONDITIONING_SCALE:g}",
            reason="INVALID_CONDITIONING_SCALE", metadata={"field": f"{field}.conditioning_scale"})
    start, end = guidance_start, guidance_end
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= 1):
        raise InvalidArgument(
            f"{field}: guidance_start {start:g} and guidance_end {end:g} must satisfy 0 <= start < end <= 1",
            reason="INVALID_GUIDANCE_RANGE", metadata={"field": f"{field}.guidance_start"})


def preprocessor_name(name: str) -> str:
    """The preprocessor ``name`` (or an alias) stands for; UNKNOWN_PREPROCESSOR naming the valid choices otherwise."""
    canonical = PREPROCESSOR_ALIASES.get(name, name)
    if canonical not in PREPROCESSORS:
        raise InvalidArgument(
            f"unknown preprocessor {quote(name)}; use one of {', '.join(sorted(PREPROCESSORS))} (or passthrough)",
            reason="UNKNOWN_PREPROCESSOR", metadata={"preprocessor": name[:QUOTE_LIMIT]})
    return canonical


def preprocessor_options(name: str, given: Mapping[str, float]) -> dict[str, float]:
    """Every option of preprocessor ``name`` (canonical): the given value, checked against its range, or its default."""
    options = PREPROCESSORS[name]
    known = {o.name for o in options}
    unknown = sorted(set(given) - known)
    if unknown:
        valid = ", ".join(o.name for o in options) or "none"
        raise InvalidArgument(
            f"preprocessor {name!r} has no option {quote(unknown[0])}; its options: {valid}",
            reason="UNKNOWN_PREPROCESSOR_OPTION", metadata={"preprocessor": name, "option": unknown[0][:QUOTE_LIMIT]})
    values = {}
    for option in options:
        value = float(given.get(option.name, option.default))
        if not (math.isfinite(value) and option.min_value <= value <= option.max_value):
            raise InvalidArgument(
                f"preprocessor {name!r}: {option.name} is {value}; use {option.min_value:g} to {option.max_value:g} "
                f"(default {option.default:g})",
                reason="PREPROCESSOR_OPTION_OUT_OF_RANGE", metadata={"preprocessor": name, "option": option.name})
        values[option.name] = value
    return values


def check_preprocessor(name: str, given: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    """A unit's preprocessor and options: (canonical name, every option's value), or INVALID_ARGUMENT."""
    canonical = preprocessor_name(name)
    return canonical, preprocessor_options(canonical, given)


# ----------------------------------------------------------------------------------------------
# Images and dtypes


def check_image_bytes(data: bytes, field: str) -> None:
    """Image bytes were sent at all (before anything decodes them)."""
    if not data:
        raise InvalidArgument(f"{field} is empty; send PNG, JPEG or WebP bytes", reason="IMAGE_EMPTY",
                              metadata={"field": field})


def check_image_size(width: int, height: int, field: str, *, max_pixels: int = MAX_INPUT_PIXELS,
                     min_side: int = MIN_IMAGE_SIDE) -> None:
    """An image's size (read from its header, before decoding): some pixels, each side at least ``min_side``,
    at most ``max_pixels`` in all."""
    if width < 1 or height < 1:
        raise InvalidArgument(f"{field} is {width}x{height} pixels: it holds no pixels", reason="IMAGE_EMPTY",
                              metadata={"field": field})
    if width * height > max_pixels:
        raise InvalidArgument(f"{field} is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
                              reason="IMAGE_TOO_LARGE", metadata={"field": field, "max_pixels": str(max_pixels)})
    if min(width, height) < min_side:
        raise InvalidArgument(f"{field} is {width}x{height} pixels; each side needs at least {min_side}",
                              reason="IMAGE_TOO_SMALL", metadata={"field": field})


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int], image_field: str) -> None:
    """An inpainting mask has its image's size (width, height), so each pixel says whether to repaint it."""
    if mask_size != image_size:
        raise InvalidArgument(
            f"mask_image is {mask_size[0]}x{mask_size[1]} pixels but {image_field} is {image_size[0]}x{image_size[1]}; "
            f"send a mask of the {image_field}'s size", reason="MASK_SIZE_MISMATCH", metadata={"field": "mask_image"})


def check_image_mode(mode: str, field: str, modes: tuple[str, ...] = IMAGE_MODES) -> None:
    """An image mode the stage can use (8-bit grayscale, palette, RGB or RGBA for the diffusion stages)."""
    if mode not in modes:
        raise InvalidArgument(
            f"{field} has image mode {mode}; send 8-bit grayscale, RGB or RGBA ({', '.join(modes)})",
            reason="UNSUPPORTED_IMAGE_MODE", metadata={"field": field, "mode": mode})


def check_dtype(name: str, flag: str = "--dtype") -> str:
    """A weight dtype name a service can run in (a start-up setting: ConfigurationError otherwise)."""
    if name not in DTYPES:
        raise ConfigurationError(f"{flag} {quote(name)} is not supported; use one of {', '.join(DTYPES)}")
    return name


def check_variation(subseed_strength: float, seed_resize_from_w: int, seed_resize_from_h: int,
                    max_image_size: int) -> None:
    """AUTOMATIC1111's variation seed and seed resize: a strength in [0, 1]; seed resize from both sizes (or
    neither), each a multiple of 8 up to the image size limit."""
    if not 0.0 <= subseed_strength <= 1.0:  # NaN fails too
        raise InvalidArgument(f"subseed_strength is {subseed_strength:g}; use 0 (the plain seed) to 1 (the subseed)",
                              reason="INVALID_SUBSEED_STRENGTH", metadata={"field": "subseed_strength"})
    width, height = seed_resize_from_w, seed_resize_from_h
    if (width > 0) != (height > 0) or width < 0 or height < 0:
        raise InvalidArgument(f"seed resize from {width}x{height}: set both seed_resize_from_w and "
                              "seed_resize_from_h (or neither)", reason="INVALID_SEED_RESIZE",
                              metadata={"field": "seed_resize_from_w"})
    for name, value in (("seed_resize_from_w", width), ("seed_resize_from_h", height)):
        if value and (value % 8 or value > max_image_size):
            raise InvalidArgument(f"{name} is {value}; use a multiple of 8 up to {max_image_size} pixels",
                                  reason="INVALID_SEED_RESIZE", metadata={"field": name})


#: Largest |weight| a request may give a LoRA (A1111 takes any number; beyond this it is a typo).
MAX_LORA_WEIGHT = 10.0
#: Most LoRAs one request applies.
MAX_LORAS = 16


def check_lora_weights(loras: Iterable, field: str = "loras") -> None:
    """A request's LoraWeight messages: at most MAX_LORAS, each named, weights within +-MAX_LORA_WEIGHT."""
    loras = list(loras)
    if len(loras) > MAX_LORAS:
        raise InvalidArgument(f"{field} has {len(loras)} LoRAs; at most {MAX_LORAS}", reason="TOO_MANY_LORAS",
                              metadata={"field": field})
    for i, entry in enumerate(loras):
        if not entry.model.name:
            raise InvalidArgument(f"{field}[{i}].model.name is empty; name the LoRA", reason="INVALID_LORA_REFERENCE",
                                  metadata={"field": f"{field}[{i}].model.name"})
        for attribute in ("weight", "text_encoder_weight", "unet_weight"):
            if attribute != "weight" and not entry.HasField(attribute):
                continue
            value = getattr(entry, attribute)
            if not -MAX_LORA_WEIGHT <= value <= MAX_LORA_WEIGHT:  # NaN fails too
                raise InvalidArgument(
                    f"{field}[{i}].{attribute} is {value:g}; use -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}",
                    reason="INVALID_LORA_WEIGHT", metadata={"field": f"{field}[{i}].{attribute}"})
