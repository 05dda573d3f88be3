"""Krita in AUTOMATIC1111 mode: the routes auto-sd-paint-ext's Krita plugin calls (/sdapi/interpause/..., on the
session gateway), with the bodies its frontends/krita/krita_diff/client.py builds from its defaults.py values
(tests/data/gateway/krita_*.json: a prompt typed, a 64x64 selection, and the plugin's "Base size" and "Max size"
set to 64 for the tiny model, where defaults.py has 512 and 768), and what the plugin reads back: /config
passes its get_config checks, and each generation answers ``outputs`` (PNGs of exactly the selection's size, the
inpainting one with the mask as its alpha) and ``info``.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import requests
from PIL import Image

DATA = Path(__file__).parent / "data" / "gateway"


def _body(name: str) -> dict:
    return json.loads((DATA / f"krita_{name}.json").read_text())


def _image(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_config_passes_the_plugins_checks(gateway):
    config = requests.get(f"{gateway.url}/sdapi/interpause/config", timeout=30).json()
    # What krita_diff/client.py get_config asserts before it accepts a backend.
    assert "sample_path" in config
    for key in ("upscalers", "samplers", "samplers_img2img", "face_restorers", "sd_models", "scripts_txt2img",
                "scripts_img2img"):
        assert len(config[key]) > 0, key
    assert {"Euler a", "LMS"} <= set(config["samplers"]) and "tiny-sd" in config["sd_models"]


def test_txt2img_answers_the_selection_size(gateway):
    body = _body("txt2img")
    answer = requests.post(f"{gateway.url}/sdapi/interpause/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    outputs = answer.json()["outputs"]
    assert len(outputs) == 1 and _image(outputs[0]).size == (body["orig_width"], body["orig_height"])
    info = json.loads(answer.json()["info"])
    # Generated at sddebz_highres_fix's size (the shorter side at base_size), then resized to the selection.
    assert (info["width"], info["height"]) == (64, 64) and info["steps"] == 20 and info["sampler_name"] == "Euler a"


def test_img2img_and_inpaint(gateway):
    body = _body("img2img")
    answer = requests.post(f"{gateway.url}/sdapi/interpause/img2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    output = _image(answer.json()["outputs"][0])
    assert output.size == (64, 64)
    assert json.loads(answer.json()["info"])["denoising_strength"] == 0.8

    body = _body("inpaint")
    answer = requests.post(f"{gateway.url}/sdapi/interpause/img2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    output = _image(answer.json()["outputs"][0])
    assert output.size == (64, 64) and output.mode == "RGBA"
    # The plugin pastes the result as a layer: the mask (the mask layer's alpha) is its alpha.
    expected_alpha = np.asarray(_image(body["mask_img"]).getchannel("A"))
    np.testing.assert_array_equal(np.asarray(output.getchannel("A")), expected_alpha)
    info = json.loads(answer.json()["info"])
    assert info["sampler_name"] == "LMS" and info["steps"] == 100


def test_upscale_none_and_refusals(gateway):
    answer = requests.post(f"{gateway.url}/sdapi/interpause/upscale", json=_body("upscale"), timeout=30)
    assert answer.status_code == 200 and answer.json() is None  # upscaler "None": the backend answers null
    refused = requests.post(f"{gateway.url}/sdapi/interpause/upscale",
                            json={**_body("upscale"), "upscaler_name": "R-ESRGAN 4x+"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["reason"] == "UPSCALER_NOT_SUPPORTED"
    scripted = requests.post(f"{gateway.url}/sdapi/interpause/txt2img",
                             json={**_body("txt2img"), "script": "Loopback"}, timeout=30)
    assert scripted.status_code == 422 and scripted.json()["reason"] == "SCRIPT_NOT_FOUND"
