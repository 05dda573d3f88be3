"""A Generate request and its rules: defaults filled, limits checked, images decoded, before a job exists.

`resolve_request` is the orchestrator's whole acceptance check: whatever it lets through is what a
job runs with. `infotext` writes the settings in AUTOMATIC1111's PNG "parameters" format.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping

from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime import images
from services.runtime.errors import FailedPrecondition, InvalidArgument

from .placement import check_pins, resolve_placement


@dataclass(frozen=True)
class GenerateParams:
    """A request with defaults filled in and limits checked."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    width: int
    height: int
    num_images: int
    scheduler: str
    include_pixels: bool
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float = 1.0
    controlnets: tuple[controlnet_pb2.ControlNetUnit, ...] = ()
    guess_mode: bool = False
    #: Placement pins: (stage, device label) pairs from the request's stage_devices.
    stage_devices: tuple[tuple[str, str], ...] = ()

    @property
    def mode(self) -> str:
        """"text-to-image", "image-to-image" or "inpainting"."""
        if self.mask_image:
            return "inpainting"
        return "image-to-image" if self.init_image else "text-to-image"


#: Default strength without one in the request, as diffusers' pipelines default.
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpainting": 1.0}


def resolve_request(request: orchestrator_pb2.GenerateRequest, limits) -> GenerateParams:
    """Fill defaults and refuse, before any work starts, what breaks a limit."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt is empty; describe the image to generate", reason="EMPTY_PROMPT")
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{name} is {len(text)} characters; at most {limits.max_prompt_chars} are accepted",
                reason="PROMPT_TOO_LONG",
            )
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else limits.default_steps
    if steps < 1 or steps > limits.max_steps:
        raise InvalidArgument(f"num_inference_steps is {steps}; use 1 to {limits.max_steps}", reason="INVALID_STEPS")
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 0 or value % 8 != 0:
            raise InvalidArgument(
                f"{name} is {value}; use a positive multiple of 8 pixels (or 0 for the model's default)",
                reason="INVALID_SIZE",
            )
        if value > limits.max_image_size:
            raise InvalidArgument(
                f"{name} is {value} pixels; at most {limits.max_image_size} are accepted", reason="IMAGE_TOO_LARGE"
            )
    num_images = request.num_images or 1
    if num_images < 1 or num_images > limits.max_images:
        raise InvalidArgument(f"num_images is {num_images}; use 1 to {limits.max_images}", reason="INVALID_NUM_IMAGES")
    guidance = request.guidance_scale if request.HasField("guidance_scale") else limits.default_guidance_scale
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise InvalidArgument(f"guidance_scale is {guidance}; use a value from 0 to 100")
    if not math.isfinite(request.guidance_rescale) or not 0 <= request.guidance_rescale <= 1:
        raise InvalidArgument(f"guidance_rescale is {request.guidance_rescale}; use a value from 0 to 1")
    if not math.isfinite(request.eta) or not 0 <= request.eta <= 1:
        raise InvalidArgument(f"eta is {request.eta}; use a value from 0 to 1")
    width, height = request.width, request.height
    size_source = _check_images(request, limits)
    if size_source is not None:
        # As A1111 does: without an explicit size the output takes the init (or first control) image's size.
        width = width or size_source[0] // 8 * 8
        height = height or size_source[1] // 8 * 8
        for name, value in (("width", width), ("height", height)):
            if value < 8 or value > limits.max_image_size:
                raise InvalidArgument(
                    f"the output would be {value} pixels {name}; use 8 to {limits.max_image_size} (set {name} "
                    "or send a smaller image)", reason="IMAGE_TOO_LARGE" if value > 8 else "IMAGE_TOO_SMALL")
    strength = 1.0
    if request.init_image:
        mode = "inpainting" if request.mask_image else "image-to-image"
        strength = request.strength if request.HasField("strength") else DEFAULT_STRENGTH[mode]
        if not math.isfinite(strength) or not 0 <= strength <= 1:
            raise InvalidArgument(f"strength is {strength}; use a value from 0 to 1", reason="INVALID_STRENGTH")
        if min(int(steps * strength), steps) < 1:
            raise InvalidArgument(
                f"strength {strength:g} with {steps} steps leaves no step to run; raise the strength or the steps "
                "so that strength x steps is at least 1", reason="INVALID_STRENGTH")
    elif request.HasField("strength"):
        raise InvalidArgument("strength is set without init_image; send the image to start from",
                              reason="MISSING_INIT_IMAGE")
    controlnets = tuple(_resolve_unit(i, unit, limits) for i, unit in enumerate(request.controlnets))
    check_pins(placement_of(limits), request.stage_devices)
    return GenerateParams(
        model=request.model.name or limits.default_model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed if request.HasField("seed") else secrets.randbelow(2**32),
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_rescale=request.guidance_rescale,
        eta=request.eta,
        width=width,
        height=height,
        num_images=num_images,
        scheduler=request.scheduler,
        include_pixels=request.include_pixels,
        init_image=request.init_image,
        mask_image=request.mask_image,
        strength=strength,
        controlnets=controlnets,
        guess_mode=request.guess_mode,
        stage_devices=tuple(sorted(request.stage_devices.items())),
    )


def placement_of(limits) -> Mapping[str, tuple]:
    """The orchestrator's replicas per stage (placement.py), resolved from its flags once."""
    placement = getattr(limits, "placement_replicas", None)
    if placement is None:
        placement = limits.placement_replicas = resolve_placement(limits)
    return placement


def _check_images(request: orchestrator_pb2.GenerateRequest, limits) -> tuple[int, int] | None:
    """Decode every image once to refuse a bad one before any stage works; return the size the output
    defaults to (init image, else first control image), or None for text-to-image."""
    max_pixels = limits.max_input_pixels
    if request.mask_image and not request.init_image:
        raise InvalidArgument("mask_image is set without init_image; inpainting needs the image to repaint",
                              reason="MISSING_INIT_IMAGE")
    size = None
    if request.init_image:
        init = images.decode_image(request.init_image, "init_image", max_pixels=max_pixels)
        size = init.size
        if request.mask_image:
            mask = images.decode_image(request.mask_image, "mask_image", max_pixels=max_pixels)
            if mask.size != init.size:
                raise InvalidArgument(
                    f"mask_image is {mask.width}x{mask.height} pixels but init_image is {init.width}x{init.height}; "
                    "send a mask of the init image's size", reason="MASK_SIZE_MISMATCH",
                    metadata={"field": "mask_image"})
    for i, unit in enumerate(request.controlnets):
        control = images.decode_image(unit.image, f"controlnets[{i}].image", max_pixels=max_pixels)
        size = size or control.size
    return size


def _resolve_unit(index: int, unit: controlnet_pb2.ControlNetUnit, limits) -> controlnet_pb2.ControlNetUnit:
    """Check one ControlNet unit's numbers and fill its defaults (scale 1, start 0, end 1, preprocessor "none")."""
    field = f"controlnets[{index}]"
    if "controlnet" not in placement_of(limits):
        raise FailedPrecondition(
            "this orchestrator has no ControlNet service; start one and pass --controlnet-address (or place "
            "controlnet replicas in --placement)",
            reason="CONTROLNET_NOT_CONFIGURED")
    if index >= limits.max_controlnets:
        raise InvalidArgument(f"at most {limits.max_controlnets} ControlNets per request are accepted",
                              reason="TOO_MANY_CONTROLNETS")
    resolved = controlnet_pb2.ControlNetUnit()
    resolved.CopyFrom(unit)
    scale = unit.conditioning_scale if unit.HasField("conditioning_scale") else 1.0
    start = unit.guidance_start if unit.HasField("guidance_start") else 0.0
    end = unit.guidance_end if unit.HasField("guidance_end") else 1.0
    if not math.isfinite(scale) or not 0 <= scale <= 10:
        raise InvalidArgument(f"{field}.conditioning_scale is {scale}; use a value from 0 to 10",
                              reason="INVALID_CONTROLNET", metadata={"field": f"{field}.conditioning_scale"})
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= 1):
        raise InvalidArgument(
            f"{field}: guidance_start {start:g} and guidance_end {end:g} must satisfy 0 <= start < end <= 1",
            reason="INVALID_CONTROLNET", metadata={"field": f"{field}.guidance_start"})
    resolved.conditioning_scale, resolved.guidance_start, resolved.guidance_end = scale, start, end
    resolved.preprocessor = unit.preprocessor or "none"
    return resolved


def infotext(params: GenerateParams, *, model: str, scheduler: str, width: int, height: int, index: int) -> str:
    """Generation settings in AUTOMATIC1111's PNG "parameters" format, which many tools read."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = [
        f"Steps: {params.num_inference_steps}",
        f"Sampler: {scheduler}",
        f"CFG scale: {params.guidance_scale:g}",
        f"Seed: {params.seed}",
        f"Size: {width}x{height}",
        f"Model: {model or 'default'}",
    ]
    if params.init_image:
        settings.append(f"Denoising strength: {params.strength:g}")
    if params.num_images > 1:
        settings += [f"Batch size: {params.num_images}", f"Batch pos: {index}"]
    for i, unit in enumerate(params.controlnets):
        settings.append(
            f'ControlNet {i}: "Module: {unit.preprocessor}, Model: {unit.model.name or "default"}, '
            f'Weight: {unit.conditioning_scale:g}, Guidance Start: {unit.guidance_start:g}, '
            f'Guidance End: {unit.guidance_end:g}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)
