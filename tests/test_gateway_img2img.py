"""img2img's A1111 pixel work in the gateway (services/gateway/img2img.py): resize_mode, inpainting_fill,
inpaint_full_res with its padding, and the overlay of the original outside the mask.

Each REST result is compared with the suite's own gRPC result for the init image (and mask) the test computes
with plain PIL calls for that geometry (a crop, a paste, a resize), so the gateway must have sent exactly those
pixels; the full-res result is then pasted into the original as the test computes it.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from latentwire.client import Client
from services.gateway import img2img

PROMPT = "a stone bridge over a river"
LANCZOS = Image.Resampling.LANCZOS


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _random(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _rest(gateway, **body) -> requests.Response:
    body = {"prompt": PROMPT, "seed": 9, "steps": 3, "width": 64, "height": 64, "denoising_strength": 0.6,
            "sampler_name": "Euler a", "override_settings": {"sd_model_checkpoint": "tiny-sd"}, **body}
    return requests.post(f"{gateway.url}/sdapi/v1/img2img", json=body, timeout=120)


def _grpc(suite, init: Image.Image, *, mask: Image.Image | None = None, model: str = "tiny-sd",
          strength: float = 0.6) -> bytes:
    with Client(suite.address, timeout=120) as client:
        return client.generate(PROMPT, model=model, seed=9, steps=3, guidance_scale=7.0, width=64, height=64,
                               sampler="Euler a", init_image=_png(init), strength=strength,
                               mask_image=_png(mask) if mask is not None else None).images[0]


def test_resize_mode_crop_and_resize(gateway, suite):
    """resize_mode 1 on a 96x64 image for 64x64: the middle 64x64 of the image, nothing resized."""
    source = _random(96, 64, 1)
    answer = _rest(gateway, init_images=[_b64(source)], resize_mode=1)
    assert answer.status_code == 200, answer.text
    expected = _grpc(suite, source.crop((16, 0, 80, 64)))
    np.testing.assert_array_equal(_pixels(base64.b64decode(answer.json()["images"][0])), _pixels(expected))


def test_resize_mode_resize_and_fill(gateway, suite):
    """resize_mode 2 on a 64x32 image for 64x64: the image whole in the middle, its top and bottom edges stretched
    over the 16 rows above and below (PIL's default, bicubic, resize of a zero-height box at each edge)."""
    source = _random(64, 32, 2)
    init = Image.new("RGB", (64, 64))
    init.paste(source, (0, 16))
    init.paste(source.resize((64, 16), Image.Resampling.BICUBIC, box=(0, 0, 64, 0)), (0, 0))
    init.paste(source.resize((64, 16), Image.Resampling.BICUBIC, box=(0, 32, 64, 32)), (0, 48))
    answer = _rest(gateway, init_images=[_b64(source)], resize_mode=2)
    assert answer.status_code == 200, answer.text
    expected = _grpc(suite, init)
    np.testing.assert_array_equal(_pixels(base64.b64decode(answer.json()["images"][0])), _pixels(expected))


def test_inpaint_full_res_processes_the_padded_region_and_pastes_it_back(gateway, suite):
    """inpaint_full_res with padding 8 around a 16x16 mask in a 128x128 image: the 32x32 region (72..104) is
    inpainted at 64x64 and pasted back; outside the mask the answer is the original, pixel for pixel."""
    source = _random(128, 128, 3)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (80, 80, 96, 96))
    answer = _rest(gateway, init_images=[_b64(source)], mask=_b64(mask), mask_blur=0, inpaint_full_res=True,
                   inpaint_full_res_padding=8, inpainting_fill=1, denoising_strength=0.75,
                   override_settings={"sd_model_checkpoint": "tiny-sd-inpainting"})
    assert answer.status_code == 200, answer.text
    shown = _pixels(base64.b64decode(answer.json()["images"][0]))
    assert shown.shape == (128, 128, 3)
    region = (72, 72, 104, 104)
    generated = _grpc(suite, source.crop(region).resize((64, 64), LANCZOS),
                      mask=mask.crop(region).resize((64, 64), LANCZOS), model="tiny-sd-inpainting", strength=0.75)
    expected = np.asarray(source, dtype=np.int16).copy()
    pasted = np.asarray(Image.open(io.BytesIO(generated)).convert("RGB").resize((32, 32), LANCZOS), dtype=np.int16)
    inside = np.asarray(mask)[72:104, 72:104] == 255
    expected[72:104, 72:104][inside] = pasted[inside]
    np.testing.assert_array_equal(shown, expected)


def test_inpainting_keeps_the_original_outside_the_mask(gateway):
    """A1111's overlay: outside a (sharp) mask the answer is the init image exactly, inside it is repainted."""
    source = _random(64, 64, 4)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    answer = _rest(gateway, init_images=[_b64(source)], mask=_b64(mask), mask_blur=0, inpaint_full_res=False)
    assert answer.status_code == 200, answer.text
    shown, before = _pixels(base64.b64decode(answer.json()["images"][0])), np.asarray(source, dtype=np.int16)
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(shown[outside], before[outside])
    assert np.abs(shown[~outside] - before[~outside]).mean() > 5


def test_fill_paints_the_masked_region_with_the_colours_around_it():
    """inpainting_fill 0 (A1111's default): noise under the mask of a one-colour image becomes that colour; the
    unmasked pixels stay as they are; with inpainting_fill 1 (original) nothing changes."""
    colour = (200, 40, 90)
    image = Image.new("RGB", (64, 64), colour)
    image.paste(_random(20, 20, 5), (22, 22))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    prepared = img2img.prepare(_png(image), _png(mask), width=64, height=64, resize_mode=0, inpainting_fill=0,
                               full_res=False, padding=0, blur_x=0, blur_y=0, invert=False)
    filled = _pixels(prepared.init_png)
    # (premultiplied-alpha blurs round a little)
    assert np.abs(filled - np.array(colour)).max() <= 8
    original = img2img.prepare(_png(image), _png(mask), width=64, height=64, resize_mode=0, inpainting_fill=1,
                               full_res=False, padding=0, blur_x=0, blur_y=0, invert=False)
    np.testing.assert_array_equal(_pixels(original.init_png), np.asarray(image, dtype=np.int16))


@pytest.mark.parametrize("body,reason", [
    ({"resize_mode": 3}, "RESIZE_MODE_NOT_SUPPORTED"),
    ({"resize_mode": 7}, "RESIZE_MODE_NOT_SUPPORTED"),
    ({"inpainting_fill": 2, "mask": "MASK"}, "INPAINTING_FILL_NOT_SUPPORTED"),
    ({"inpainting_fill": 3, "mask": "MASK"}, "INPAINTING_FILL_NOT_SUPPORTED"),
])
def test_latent_modes_are_refused(gateway, body, reason):
    """What A1111 does in latent space (latent upscale, latent noise / nothing) is 422 with a reason, not ignored."""
    if body.get("mask") == "MASK":
        body = {**body, "mask": _b64(Image.new("L", (64, 64), 255))}
    answer = _rest(gateway, init_images=[_b64(_random(64, 64, 6))], **body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["reason"] == reason
