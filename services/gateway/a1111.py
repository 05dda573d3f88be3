"""AUTOMATIC1111's /sdapi/v1 request and response bodies, and their mapping onto the suite's GenerateRequest.

The protocol half of the gateway (vLLM's ``protocol``): pydantic models with A1111's field names and
defaults (modules/api/models.py, StableDiffusionProcessingTxt2Img/Img2Img), and pure functions from a body
to a GenerateRequest and from a GenerateResult back to A1111's ``info``. No I/O here; routes.py does the work.

What A1111 has and the suite does not is accepted and ignored (``IGNORED_FIELDS``; docs/gateway.md), so
clients that send A1111's full bodies (webuiapi, Open WebUI, Krita) work unchanged.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from latentwire.client import samplers as sampler_table
from latentwire.client.hires import canonical_upscaler, hires_fix
from latentwire.client.infotext import parse_parameters, png_parameters
from latentwire.common.v1 import model_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime.errors import InvalidArgument, quote

from . import img2img

#: A1111 request fields the gateway accepts and ignores (the suite has no such feature, or it is the default).
IGNORED_FIELDS = ("styles", "restore_faces", "do_not_save_samples", "do_not_save_grid", "s_churn", "s_tmax", "s_tmin",
                  "s_noise", "s_min_uncond", "save_images", "firstphase_width", "firstphase_height",
                  "hr_checkpoint_name", "hr_prompt", "hr_negative_prompt", "hr_scheduler", "refiner_checkpoint",
                  "refiner_switch_at", "disable_extra_networks", "comments", "image_cfg_scale",
                  "initial_noise_multiplier", "latent_mask", "include_init_images", "force_task_id", "infotext")

#: A1111's schedule types by their API name (GET /sdapi/v1/schedulers "name") -> the suite's.
SCHEDULER_NAMES = {t.name.lower().replace(" ", "_"): t.name for t in sampler_table.SCHEDULE_TYPES}


class GenerationBody(BaseModel):
    """Fields txt2img and img2img share (A1111's StableDiffusionProcessing API model)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgBody(GenerationBody):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=0.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None


class Img2ImgBody(GenerationBody):
    """POST /sdapi/v1/img2img."""

    init_images: list[str] = Field(min_length=1)
    resize_mode: int = 0
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0)
    mask_blur_x: int = Field(4, ge=0)
    mask_blur_y: int = Field(4, ge=0)
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] | None = Field(None, description="The generated images in base64 format.")
    parameters: dict[str, Any]
    info: str


class PngInfoBody(BaseModel):
    image: str = Field(description="The base64 encoded image (a data URL or bare base64)")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="The progress with a range of 0 to 1")
    eta_relative: float
    state: ProgressState
    current_image: str | None = Field(None, description="The current image in base64 format (the live preview)")
    textinfo: str | None = None
    current_task: str | None = None


# -- images ------------------------------------------------------------------------------------------------

def decode_image(data: str, field: str) -> bytes:
    """Bytes of a base64 image (bare, or a ``data:image/...;base64,`` URL, as A1111 accepts); InvalidArgument
    naming ``field`` when it is not one."""
    if not isinstance(data, str) or not data:
        raise InvalidArgument(f"{field}: give the image as base64 (or a data: URL)", reason="INVALID_IMAGE",
                              metadata={"field": field})
    if data.startswith("data:"):
        data = data.split(",", 1)[1] if "," in data else ""
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raw = b""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad bytes; all mean the same to the caller
        raise InvalidArgument(f"{field}: not a base64 PNG, JPEG or WebP image", reason="INVALID_IMAGE",
                              metadata={"field": field}) from None
    return raw


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_img2img(body: Img2ImgBody) -> img2img.Prepared:
    """img2img's init image and mask as A1111 prepares them (resize_mode, mask blur and invert, inpainting_fill,
    inpaint_full_res: img2img.py), at the body's width x height; what the results need afterwards with them."""
    mask = decode_image(body.mask, "mask") if body.mask else None
    blur_x, blur_y = ((body.mask_blur, body.mask_blur) if body.mask_blur is not None
                      else (body.mask_blur_x, body.mask_blur_y))
    return img2img.prepare(decode_image(body.init_images[0], "init_images[0]"), mask, width=body.width,
                           height=body.height, resize_mode=body.resize_mode, inpainting_fill=body.inpainting_fill,
                           full_res=bool(body.inpaint_full_res), padding=body.inpaint_full_res_padding,
                           blur_x=blur_x, blur_y=blur_y, invert=bool(body.inpainting_mask_invert))


# -- names ---------------------------------------------------------------------------------------------------

def strip_hash(title: str) -> str:
    """A model title as A1111 lists it ("name [abcdef1234]", "name.safetensors") -> the suite's model name."""
    name = title.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    for suffix in (".safetensors", ".ckpt", ".pt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def sampler_fields(sampler_name: str | None, scheduler: str | None) -> tuple[str, str]:
    """(sampler, schedule_type) of a GenerateRequest from A1111's sampler_name and scheduler (1.9+), or a pre-1.9
    combined name ("DPM++ 2M Karras") with scheduler "automatic"; unknown names go to the suite, which refuses
    them naming the ones it knows."""
    sampler = (sampler_name or "").strip()
    schedule = (scheduler or "").strip()
    if schedule.lower() in ("", "automatic"):
        return sampler, ""
    schedule_type = SCHEDULER_NAMES.get(schedule.lower().replace(" ", "_"), schedule)
    split = sampler_table.split_combined(sampler) if sampler else None
    if split is not None and split[1] is not None:
        # A combined name and an explicit schedule type: the explicit one wins, as in A1111 1.9+.
        sampler = split[0].name
    return sampler, schedule_type


def is_ddim(sampler: str) -> bool:
    found = sampler_table.split_combined(sampler) if sampler else None
    return found is not None and found[0].scheduler == "DDIMScheduler"


# -- bodies -> GenerateRequest ------------------------------------------------------------------------------

def _controlnet_units(body: GenerationBody) -> tuple[list[controlnet_pb2.ControlNetUnit], bool]:
    """sd-webui-controlnet's ``alwayson_scripts.controlnet.args`` (any case of "controlnet") -> ControlNetUnits,
    and whether one asks for "ControlNet is more important" (the suite's guess mode)."""
    units, guess_mode = [], False
    for key, script in (body.alwayson_scripts or {}).items():
        if key.strip().lower() != "controlnet":
            continue
        args = script.get("args", []) if isinstance(script, dict) else []
        for index, unit in enumerate(args):
            if not isinstance(unit, dict) or not unit.get("enabled", True):
                continue
            field = f"alwayson_scripts.{key}.args[{index}]"
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # {"image": ..., "mask": ...} as the extension's newer API sends
                image = image.get("image")
            if not image:
                raise InvalidArgument(f"{field}: a ControlNet unit needs an image (image or input_image, base64)",
                                      reason="CONTROLNET_IMAGE_MISSING", metadata={"field": field})
            module = str(unit.get("module") or "none").strip().lower()
            options: dict[str, float] = {}
            if module == "canny":
                for name, key_name in (("low_threshold", "threshold_a"), ("high_threshold", "threshold_b")):
                    value = unit.get(key_name)
                    if isinstance(value, (int, float)) and value >= 0:
                        options[name] = float(value)
            model = strip_hash(str(unit.get("model") or ""))
            proto = controlnet_pb2.ControlNetUnit(
                model=model_pb2.ModelReference(name="" if model.lower() == "none" else model),
                image=decode_image(image, f"{field}.image"), preprocessor=module,
                preprocessor_options=options)
            for name, target in (("weight", "conditioning_scale"), ("guidance_start", "guidance_start"),
                                 ("guidance_end", "guidance_end")):
                if isinstance(unit.get(name), (int, float)):
                    setattr(proto, target, float(unit[name]))
            units.append(proto)
            mode = unit.get("control_mode")
            guess_mode |= mode in (2, "2") or (isinstance(mode, str) and mode.lower().startswith("controlnet is"))
    return units, guess_mode


def checkpoint_of(body: GenerationBody, options: dict[str, Any]) -> str:
    """The model a request runs on: override_settings.sd_model_checkpoint, else the gateway's current option
    ("" keeps the suite's default)."""
    override = (body.override_settings or {}).get("sd_model_checkpoint")
    title = override if isinstance(override, str) and override.strip() else options.get("sd_model_checkpoint", "")
    return strip_hash(title or "")


def clip_skip_of(body: GenerationBody, options: dict[str, Any]) -> int:
    value = (body.override_settings or {}).get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise InvalidArgument("CLIP_stop_at_last_layers: give a whole number (1 uses the last layer)",
                              reason="INVALID_OPTION", metadata={"field": "CLIP_stop_at_last_layers"}) from None


#: GenerateRequest.step_event_interval_ms of the A1111 routes' jobs (what /sdapi/v1/progress shows).
PROGRESS_STEP_EVENT_INTERVAL_MS = 100


def to_generate_request(body: GenerationBody, options: dict[str, Any], *, preview_interval: int,
                        prepared: img2img.Prepared | None = None) -> orchestrator_pb2.GenerateRequest:
    """The GenerateRequest of an A1111 txt2img or img2img body (docs/gateway.md has the field table).

    Raises InvalidArgument (reason naming the field) for what the suite cannot take from this body."""
    if body.script_name:
        raise InvalidArgument(f"script {quote(body.script_name)} is not available here: the gateway runs no "
                              "A1111 scripts (leave script_name empty)", reason="SCRIPT_NOT_FOUND",
                              metadata={"field": "script_name"})
    sampler, schedule_type = sampler_fields(body.sampler_name or body.sampler_index, body.scheduler)
    request = orchestrator_pb2.GenerateRequest(
        model=model_pb2.ModelReference(name=checkpoint_of(body, options)),
        prompt=body.prompt, negative_prompt=body.negative_prompt,
        num_inference_steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
        num_images=body.batch_size, batch_count=body.n_iter, sampler=sampler, schedule_type=schedule_type,
        clip_skip=clip_skip_of(body, options), tiling=bool(body.tiling),
        subseed_strength=body.subseed_strength,
        # The REST call is the only one waiting for the result: interrupt ends it, and the job with it.
        cancel_on_disconnect=True,
        # /sdapi/v1/progress is polled (A1111's page every second): a step event every 100 ms at most is plenty,
        # and each one saved is CPU the orchestrator and this gateway leave to the denoiser.
        step_event_interval_ms=PROGRESS_STEP_EVENT_INTERVAL_MS,
    )
    if body.seed >= 0:
        request.seed = body.seed
    if body.subseed >= 0:
        request.subseed = body.subseed
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:
        request.seed_resize_from_w, request.seed_resize_from_h = body.seed_resize_from_w, body.seed_resize_from_h
    if body.eta is not None and is_ddim(sampler):
        # A1111's eta reaches DDIM (and k-diffusion's ancestral samplers, whose diffusers classes have eta fixed at 1).
        request.eta = body.eta
    if preview_interval > 0:
        request.previews.interval = preview_interval
        request.previews.format = "jpeg"
    units, guess_mode = _controlnet_units(body)
    request.controlnets.extend(units)
    request.guess_mode = guess_mode
    if isinstance(body, Img2ImgBody):
        prepared = prepared or prepare_img2img(body)
        request.init_image = prepared.init_png
        request.strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        if prepared.mask_png is not None:
            request.mask_image = prepared.mask_png
    elif isinstance(body, Txt2ImgBody) and body.enable_hr:
        upscaler = body.hr_upscaler or ""
        if canonical_upscaler(upscaler) is None and upscaler.lower() in ("none", ""):
            upscaler = ""
        hr_sampler = body.hr_sampler_name or ""
        if hr_sampler.lower() in ("use same sampler", "none"):
            hr_sampler = ""
        request.hires.CopyFrom(hires_fix(
            upscaler, scale=body.hr_scale if not (body.hr_resize_x or body.hr_resize_y) else 0.0,
            resize=(body.hr_resize_x, body.hr_resize_y), steps=body.hr_second_pass_steps,
            denoising_strength=body.denoising_strength if body.denoising_strength else None, sampler=hr_sampler))
    return request


# -- results -> A1111's info ---------------------------------------------------------------------------------

def info_json(body: GenerationBody, request: orchestrator_pb2.GenerateRequest,
              result: orchestrator_pb2.GenerateResult, infotexts: list[str], *, job_timestamp: str) -> str:
    """A1111's ``info`` (Processed.js(): its keys, a JSON string) for a finished job."""
    seeds = [int(s) for s in result.image_seeds] or [int(result.seed)] * len(result.images)
    sampler = request.sampler or body.sampler_name or body.sampler_index or ""
    width, height = request.width, request.height
    if infotexts:
        first = parse_parameters(infotexts[0])
        if "Size-1" in first and "Size-2" in first:
            width, height = int(first["Size-1"]), int(first["Size-2"])
    extra = {}
    if request.HasField("hires"):
        extra.update({"Hires upscale": request.hires.scale or None,
                      "Hires upscaler": request.hires.upscaler or "Latent"})
    if body.styles:
        extra["Styles (ignored)"] = ", ".join(body.styles)
    count = len(result.images)
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * count,
        "seed": int(result.seed), "all_seeds": seeds,
        "subseed": int(request.subseed) if request.HasField("subseed") else -1,
        "all_subseeds": [int(request.subseed) if request.HasField("subseed") else -1] * count,
        "subseed_strength": body.subseed_strength, "width": width, "height": height,
        "sampler_name": sampler, "scheduler": body.scheduler or "Automatic",
        "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model.split("@", 1)[0], "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": body.denoising_strength, "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": infotexts, "styles": body.styles or [],
        "job_timestamp": job_timestamp, "clip_skip": request.clip_skip or 1,
        "is_using_inpainting_conditioning": bool(request.mask_image), "version": "latentwire",
    }
    return json.dumps(info)


def job_timestamp(now: float | None = None) -> str:
    """A1111's job_timestamp: local time as YYYYmmddHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(now))


def png_infotext(png: bytes) -> str:
    """The PNG's "parameters" text (the suite writes A1111's infotext there), or ""."""
    try:
        return png_parameters(png)
    except ValueError:
        return ""
