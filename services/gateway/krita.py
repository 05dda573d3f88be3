"""Krita in AUTOMATIC1111 mode: the routes of Interpause/auto-sd-paint-ext's backend (``/sdapi/interpause/...``),
which its Krita plugin (frontends/krita/krita_diff/client.py) calls, on the same machinery as ``/sdapi/v1``.

The plugin posts its own body shape (backend/structs.py: Txt2ImgRequest, Img2ImgRequest, UpscaleRequest; unset
fields take backend/config.py's defaults) and reads ``outputs`` (base64 PNGs of exactly the selection's size) and
``info``. As the backend does: the generation size comes from the selection by ``sddebz_highres_fix`` (base_size,
max_size, strides of 64), the results are resized back to the selection (A1111's resize_image 0, LANCZOS), and an
inpainting result gets the mask (the mask image's alpha) as its alpha. Scripts other than "None", face restoration
and upscalers other than "None" are not available here.
"""
from __future__ import annotations

import asyncio
import base64
import io
from math import ceil
from typing import Any

from fastapi import APIRouter, Depends, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from latentwire.client import samplers as sampler_table
from services.runtime.errors import InvalidArgument, quote

from . import a1111
from .auth import User, current_user
from .img2img import resize_image

router = APIRouter(prefix="/sdapi/interpause", tags=["krita"])

#: Upscale with an upscaler other than "None": the gateway runs upscalers only inside a hires fix.
UPSCALER_NOT_SUPPORTED = "UPSCALER_NOT_SUPPORTED"


class _Generation(BaseModel):
    """backend/config.py's GenerationOptions (with BaseOptions and FaceRestorationOptions), its defaults."""

    model_config = ConfigDict(extra="allow")

    sample_path: str = "outputs/krita"
    save_samples: bool = False
    sd_model: str = "model.ckpt"
    script: str = "None"
    script_args: list = Field(default_factory=list)
    prompt: Any = "dog"
    negative_prompt: Any = ""
    seed: int = -1
    seed_enable_extras: bool = False
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    sampler_name: str = "Euler a"
    steps: int = Field(30, ge=1)
    cfg_scale: float = 7.5
    denoising_strength: float = Field(0.35, ge=0.0, le=1.0)
    batch_count: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    base_size: int = Field(512, ge=64)
    max_size: int = Field(768, ge=64)
    tiling: bool = False
    highres_fix: bool = False
    upscaler_name: str = "None"
    include_grid: bool = False
    restore_faces: bool = False
    disable_sddebz_highres: bool = False


class KritaTxt2Img(_Generation):
    """backend/structs.py Txt2ImgRequest."""

    orig_width: int = Field(ge=1)
    orig_height: int = Field(ge=1)


class KritaImg2Img(_Generation):
    """backend/structs.py Img2ImgRequest (Img2ImgOptions with InpaintingOptions)."""

    src_img: str
    mask_img: str | None = None
    mode: int = 0
    resize_mode: int = 1
    steps: int = Field(50, ge=1)
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 0
    mask_blur: int = 0
    invert_mask: bool = False
    color_correct: bool = True
    do_exact_steps: bool = True


class KritaUpscale(BaseModel):
    """backend/structs.py UpscaleRequest."""

    model_config = ConfigDict(extra="allow")

    src_img: str
    upscaler_name: str = "None"
    downscale_first: bool = False


def sddebz_highres_fix(base_size: int, max_size: int, orig_width: int, orig_height: int,
                       just_stride: bool = False) -> tuple[int, int]:
    """The generation size for a selection, as auto-sd-paint-ext's backend/utils.py computes it: the shorter side
    at base_size (the longer at most max_size), aspect ratio kept in strides of 64."""
    def rnd(r: float, x: int, z: int = 64) -> int:
        return z * ceil(r * x / z)

    ratio = orig_width / orig_height
    if just_stride:
        return ceil(orig_width / 64) * 64, ceil(orig_height / 64) * 64
    if orig_width > orig_height:
        width, height = rnd(ratio, base_size), base_size
        if width > max_size:
            width, height = max_size, rnd(1 / ratio, max_size)
    else:
        width, height = base_size, rnd(1 / ratio, base_size)
        if height > max_size:
            width, height = rnd(ratio, max_size), max_size
    return width, height


def _prompt(value: Any) -> str:
    """The backend's parse_prompt: a string, a list (joined by ", ") or {text: weight}."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(str(k) if w is None else f"({k}:{w})" for k, w in value.items())
    raise InvalidArgument("prompt: give a string, a list of strings or {text: weight}", reason="INVALID_REQUEST_BODY",
                          metadata={"field": "prompt"})


def _common(body: _Generation, request: Request, width: int, height: int) -> dict[str, Any]:
    """The /sdapi/v1 body fields both routes share."""
    if body.script not in ("", "None"):
        raise InvalidArgument(f"script {quote(body.script)} is not available here: the gateway runs no A1111 scripts "
                              "(choose None)", reason="SCRIPT_NOT_FOUND", metadata={"field": "script"})
    fields: dict[str, Any] = dict(
        prompt=_prompt(body.prompt), negative_prompt=_prompt(body.negative_prompt), seed=body.seed,
        sampler_name=body.sampler_name, steps=body.steps, cfg_scale=body.cfg_scale, width=width, height=height,
        n_iter=body.batch_count, batch_size=body.batch_size, tiling=body.tiling,
        denoising_strength=body.denoising_strength)
    if body.seed_enable_extras:
        fields.update(subseed=body.subseed, subseed_strength=body.subseed_strength,
                      seed_resize_from_w=body.seed_resize_from_w or -1,
                      seed_resize_from_h=body.seed_resize_from_h or -1)
    # The plugin sends its default "model.ckpt" until the user picks one of /config's sd_models: keep the current.
    model = a1111.strip_hash(body.sd_model)
    if model and model in _models(request):
        fields["override_settings"] = {"sd_model_checkpoint": model}
    return fields


def _models(request: Request) -> list[str]:
    settings = request.app.state.settings
    current = request.app.state.options.get("sd_model_checkpoint", "")
    return list(dict.fromkeys([*settings.models, *([current] if current else [])]))


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _open(data: str, field: str) -> Image.Image:
    image = Image.open(io.BytesIO(a1111.decode_image(data, field)))
    image.load()
    return image


def _fit(outputs: list[str], width: int, height: int, alpha: Image.Image | None = None) -> list[str]:
    """Each output resized to the selection (resize_image 0), with ``alpha`` as its alpha channel if given."""
    fitted = []
    for output in outputs:
        image = resize_image(0, _open(output, "output").convert("RGB"), width, height)
        if alpha is not None:
            image = Image.merge("RGBA", (*image.split(), alpha))
        fitted.append(_png_b64(image))
    return fitted


@router.get("/config")
async def config(request: Request, user: User = Depends(current_user)):
    """What the plugin's get_config checks and lists (backend's ConfigResponse)."""
    names = [s.name for s in sampler_table.SAMPLERS]
    return {"sample_path": "outputs/krita", "save_samples": False, "upscalers": ["None"], "samplers": names,
            "samplers_img2img": names, "scripts_txt2img": {"None": []}, "scripts_img2img": {"None": []},
            "face_restorers": ["None"], "sd_models": _models(request) or ["None"], "sd_vaes": []}


@router.post("/txt2img")
async def txt2img(request: Request, body: KritaTxt2Img, user: User = Depends(current_user)):
    """The plugin's txt2img: generated at sddebz_highres_fix's size, answered at the selection's."""
    from .routes import _generate

    width, height = sddebz_highres_fix(body.base_size, body.max_size, body.orig_width, body.orig_height,
                                       body.disable_sddebz_highres)
    fields = _common(body, request, width, height)
    if body.highres_fix:  # the backend's: a hires fix up to the selection's size
        fields.update(enable_hr=True, hr_resize_x=body.orig_width, hr_resize_y=body.orig_height,
                      hr_upscaler=None if body.upscaler_name == "None" else body.upscaler_name)
    answer = await _generate(request, a1111.Txt2ImgBody(**fields), user)
    outputs = await asyncio.to_thread(_fit, answer["images"], body.orig_width, body.orig_height)
    return {"outputs": outputs, "info": answer["info"]}


@router.post("/img2img")
async def img2img(request: Request, body: KritaImg2Img, user: User = Depends(current_user)):
    """The plugin's img2img (mode 0) and inpaint (mode 1, the mask is mask_img's alpha), answered at the
    selection's size; an inpainting result carries the mask as its alpha, as the backend's apply_mask."""
    from .routes import _generate

    if body.mode not in (0, 1):
        raise InvalidArgument(f"mode is {body.mode}; use 0 (img2img) or 1 (inpaint)", reason="INVALID_REQUEST_BODY",
                              metadata={"field": "mode"})
    source = _open(body.src_img, "src_img")
    orig_width, orig_height = source.size
    width, height = sddebz_highres_fix(body.base_size, body.max_size, orig_width, orig_height,
                                       body.disable_sddebz_highres)
    fields = _common(body, request, width, height)
    fields.update(init_images=[body.src_img], resize_mode=body.resize_mode, inpainting_fill=body.inpainting_fill,
                  inpaint_full_res=False, inpaint_full_res_padding=0, mask_blur=0,
                  inpainting_mask_invert=int(body.invert_mask))
    mask = None
    if body.mode == 1 and body.mask_img is not None:
        mask = _open(body.mask_img, "mask_img").convert("RGBA").getchannel("A")  # the backend's prepare_mask
        fields["mask"] = _png_b64(mask)
    answer = await _generate(request, a1111.Img2ImgBody(**fields), user)
    alpha = None
    if mask is not None:
        alpha = ImageOps.invert(mask) if body.invert_mask else mask
        alpha = alpha.resize((orig_width, orig_height)) if alpha.size != (orig_width, orig_height) else alpha
    outputs = await asyncio.to_thread(_fit, answer["images"], orig_width, orig_height, alpha)
    return {"outputs": outputs, "info": answer["info"]}


@router.post("/upscale")
async def upscale(body: KritaUpscale, user: User = Depends(current_user)):
    """Upscaler "None" does nothing (the backend answers null); others are not offered outside a hires fix."""
    if body.upscaler_name in ("", "None"):
        return None
    raise InvalidArgument(f"upscaler {quote(body.upscaler_name)} is not available for a plain upscale here; the "
                          "gateway runs upscalers within a hires fix (txt2img highres_fix)",
                          reason=UPSCALER_NOT_SUPPORTED, metadata={"field": "upscaler_name"})
