"""Image-to-image, inpainting and ControlNet through the running suite equal diffusers' own pipelines.

StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline (a dedicated 9-channel inpainting
UNet, and a standard UNet with mask blending) and StableDiffusionControlNetPipeline (one and two
ControlNets, with guidance ranges other than 0..1) on the same tiny weights and seeds: float32
on CPU, max abs difference at most 1e-5 before PNG quantisation. The ControlNets run in the
ControlNet service's own process, reached by the denoiser over its bidirectional stream.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentwire.client import control
from reference import reference_image_pixels

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
PROMPT = "a red barn in a snowy field"


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def init_image(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """A smooth colour pattern with some noise: something a VAE encodes to non-trivial latents."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return png((base + rng.integers(0, 55, size=(height, width, 3))).astype(np.uint8))


def mask_image(width: int = 64, height: int = 64) -> bytes:
    """White (repaint) in a centre rectangle, black elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return png(mask, "L")


def control_image(width: int = 64, height: int = 64, seed: int = 1) -> bytes:
    """Lines on black, like an edge map."""
    rng = np.random.default_rng(seed)
    edges = np.zeros((height, width, 3), np.uint8)
    for row in rng.integers(0, height, size=6):
        edges[row, :] = 255
    for column in rng.integers(0, width, size=6):
        edges[:, column] = 255
    return png(edges)


def pil(data: bytes, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(data)).convert(mode)


def assert_equal(result, expected, case: str) -> None:
    assert result.pixels.shape == expected.shape, case
    difference = float(np.abs(result.pixels - expected).max())
    assert difference <= TOLERANCE, f"{case}: max abs difference {difference:.3g}"


IMG2IMG_CASES = [
    # (id, scheduler, settings)
    ("ddim-cfg", "DDIMScheduler", dict(guidance_scale=7.5, strength=0.6)),
    ("euler-ancestral-batch", "EulerAncestralDiscreteScheduler", dict(guidance_scale=6.0, strength=0.8, num_images=2)),
    ("dpmsolver-no-cfg-non-square", "DPMSolverMultistepScheduler", dict(guidance_scale=1.0, strength=0.5, size=(80, 48))),
    ("full-strength", "EulerDiscreteScheduler", dict(guidance_scale=7.5, strength=1.0)),
]


@pytest.mark.parametrize("case_id,scheduler,settings", IMG2IMG_CASES, ids=[c[0] for c in IMG2IMG_CASES])
def test_image_to_image_equals_diffusers(client, tiny_model, case_id, scheduler, settings):
    width, height = settings.get("size", (64, 64))
    image = init_image(width, height)
    seed, steps = 77, 10
    result = client.generate(PROMPT, seed=seed, steps=steps, scheduler=scheduler, include_pixels=True,
                             guidance_scale=settings["guidance_scale"], num_images=settings.get("num_images", 1),
                             init_image=image, strength=settings["strength"], negative_prompt="blurry")
    expected = reference_image_pixels(
        "img2img", tiny_model, PROMPT, seed=seed, steps=steps, guidance_scale=settings["guidance_scale"],
        scheduler=scheduler, image=pil(image), strength=settings["strength"], negative_prompt="blurry",
        num_images_per_prompt=settings.get("num_images", 1))
    assert_equal(result, expected, case_id)
    # The init image matters: a different one gives a different result.
    other = client.generate(PROMPT, seed=seed, steps=steps, scheduler=scheduler, include_pixels=True,
                            guidance_scale=settings["guidance_scale"], num_images=settings.get("num_images", 1),
                            init_image=init_image(width, height, seed=5), strength=settings["strength"],
                            negative_prompt="blurry")
    assert np.abs(other.pixels - result.pixels).max() > 1e-3
    # strength x steps steps run, as the pipeline's get_timesteps decides.
    assert result.steps[-1].total_steps == min(int(steps * settings["strength"]), steps)


INPAINT_CASES = [
    # (id, model fixture, scheduler, settings)
    ("inpainting-unet-ddim", "tiny_inpainting_model", "DDIMScheduler", dict(guidance_scale=7.5, strength=1.0)),
    ("inpainting-unet-partial-strength-batch", "tiny_inpainting_model", "EulerAncestralDiscreteScheduler",
     dict(guidance_scale=6.0, strength=0.7, num_images=2)),
    ("standard-unet-blend", "tiny_model", "DDIMScheduler", dict(guidance_scale=7.5, strength=1.0)),
    ("standard-unet-blend-partial-no-cfg", "tiny_model", "EulerDiscreteScheduler",
     dict(guidance_scale=1.0, strength=0.75, size=(48, 80))),
]


@pytest.mark.parametrize("case_id,model_fixture,scheduler,settings", INPAINT_CASES, ids=[c[0] for c in INPAINT_CASES])
def test_inpainting_equals_diffusers(client, request, case_id, model_fixture, scheduler, settings):
    model = request.getfixturevalue(model_fixture)
    width, height = settings.get("size", (64, 64))
    image, mask = init_image(width, height), mask_image(width, height)
    seed, steps = 5, 8
    result = client.generate(PROMPT, model=model.name, seed=seed, steps=steps, scheduler=scheduler,
                             include_pixels=True, guidance_scale=settings["guidance_scale"],
                             num_images=settings.get("num_images", 1), init_image=image, mask_image=mask,
                             strength=settings["strength"])
    expected = reference_image_pixels(
        "inpaint", model, PROMPT, seed=seed, steps=steps, guidance_scale=settings["guidance_scale"],
        scheduler=scheduler, image=pil(image), mask_image=pil(mask, "L"), strength=settings["strength"],
        width=width, height=height, num_images_per_prompt=settings.get("num_images", 1))
    assert_equal(result, expected, case_id)
    if model_fixture == "tiny_model" and settings["strength"] < 1:
        # Mask blending keeps the unmasked region close to the init image, the masked one is repainted.
        init = np.asarray(pil(image), dtype=np.float32) / 255
        outside = np.ones((height, width), bool)
        outside[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = False
        assert np.abs(result.pixels[0] - init)[outside].mean() < np.abs(result.pixels[0] - init)[~outside].mean()


CONTROLNET_CASES = [
    # (id, units as (model, scale, start, end), settings)
    ("one-controlnet", [("", 1.0, None, None)], dict(guidance_scale=7.5)),
    ("one-controlnet-range-no-cfg", [("", 0.8, 0.25, 0.75)], dict(guidance_scale=1.0, scheduler="EulerDiscreteScheduler")),
    ("two-controlnets-ranges", [("cn-a", 1.0, 0.0, 0.6), ("cn-b", 0.7, 0.3, 1.0)], dict(guidance_scale=7.5)),
    ("two-controlnets-guess-mode-batch", [("cn-a", 0.9, 0.1, 0.9), ("cn-b", 1.2, 0.0, 0.5)],
     dict(guidance_scale=6.0, guess_mode=True, num_images=2, scheduler="EulerAncestralDiscreteScheduler")),
]


@pytest.mark.parametrize("case_id,units,settings", CONTROLNET_CASES, ids=[c[0] for c in CONTROLNET_CASES])
def test_controlnet_equals_diffusers(client, tiny_model, tiny_controlnets, case_id, units, settings):
    images = [control_image(seed=i + 1) for i in range(len(units))]
    seed, steps = 21, 8
    scheduler = settings.get("scheduler", "DDIMScheduler")
    result = client.generate(
        PROMPT, seed=seed, steps=steps, scheduler=scheduler, include_pixels=True,
        guidance_scale=settings["guidance_scale"], num_images=settings.get("num_images", 1),
        guess_mode=settings.get("guess_mode", False),
        controlnets=[control(img, "none", scale=scale, start=start, end=end, model=model)
                     for img, (model, scale, start, end) in zip(images, units)])
    paths = {"": tiny_controlnets[0], "cn-a": tiny_controlnets[0], "cn-b": tiny_controlnets[1]}
    multi = len(units) > 1
    scales = [u[1] for u in units]
    starts = [0.0 if u[2] is None else u[2] for u in units]
    ends = [1.0 if u[3] is None else u[3] for u in units]
    expected = reference_image_pixels(
        "controlnet", tiny_model, PROMPT, seed=seed, steps=steps, guidance_scale=settings["guidance_scale"],
        scheduler=scheduler, controlnets=tuple(paths[u[0]] for u in units),
        image=[pil(i) for i in images] if multi else pil(images[0]),
        controlnet_conditioning_scale=scales if multi else scales[0],
        control_guidance_start=starts if multi else starts[0], control_guidance_end=ends if multi else ends[0],
        guess_mode=settings.get("guess_mode", False), num_images_per_prompt=settings.get("num_images", 1))
    assert_equal(result, expected, case_id)
    # The ControlNets matter: without them the image differs.
    plain = client.generate(PROMPT, seed=seed, steps=steps, scheduler=scheduler, include_pixels=True,
                            guidance_scale=settings["guidance_scale"], num_images=settings.get("num_images", 1))
    assert np.abs(plain.pixels - result.pixels).max() > 1e-3


def test_canny_preprocessor_through_the_suite(client, tiny_model, tiny_controlnets):
    """A canny unit equals the pipeline fed with cv2.Canny's edges, as diffusers' ControlNet docs make them."""
    import cv2

    image = init_image(seed=3)
    seed, steps = 8, 6
    result = client.generate(PROMPT, seed=seed, steps=steps, include_pixels=True, guidance_scale=7.5,
                             controlnets=[control(image, "canny", low_threshold=50, high_threshold=120)])
    edges = cv2.Canny(np.asarray(pil(image)), 50, 120)
    expected = reference_image_pixels(
        "controlnet", tiny_model, PROMPT, seed=seed, steps=steps, guidance_scale=7.5,
        controlnets=(tiny_controlnets[0],), image=Image.fromarray(np.stack([edges] * 3, axis=-1)))
    assert_equal(result, expected, "canny")


def test_output_size_follows_the_init_image(client):
    result = client.generate(PROMPT, seed=1, steps=4, include_pixels=True, init_image=init_image(72, 40),
                             strength=0.5)
    assert result.pixels.shape == (1, 40, 72, 3)
    assert Image.open(io.BytesIO(result.images[0])).size == (72, 40)
    infotext = Image.open(io.BytesIO(result.images[0])).text["parameters"]
    assert "Denoising strength: 0.5" in infotext


def test_cli_image_flags(suite, client, tmp_path):
    """`latentwire generate --init-image --mask --strength --control` makes the same request as the client."""
    import subprocess
    import sys

    (tmp_path / "init.png").write_bytes(init_image())
    (tmp_path / "mask.png").write_bytes(mask_image())
    (tmp_path / "edges.png").write_bytes(control_image())
    pixels_path = tmp_path / "pixels.npy"
    completed = subprocess.run(
        [sys.executable, "-m", "latentwire.cli.main", "generate", PROMPT, "--server", suite.address, "--seed", "9",
         "--steps", "6", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
         "--strength", "0.9", "--control", f"none@cn-b:{tmp_path / 'edges.png'}:0.7:0.0:0.5",
         "-o", str(tmp_path / "out.png"), "--save-pixels", str(pixels_path), "-q"],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    expected = client.generate(PROMPT, seed=9, steps=6, include_pixels=True, init_image=init_image(),
                               mask_image=mask_image(), strength=0.9,
                               controlnets=[control(control_image(), "none", scale=0.7, start=0.0, end=0.5,
                                                    model="cn-b")])
    assert np.array_equal(np.load(pixels_path), expected.pixels)
    infotext = Image.open(tmp_path / "out.png").text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: cn-b, Weight: 0.7' in infotext

    bad = subprocess.run(
        [sys.executable, "-m", "latentwire.cli.main", "generate", PROMPT, "--server", suite.address,
         "--control", "canny"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PREPROCESSOR" in bad.stderr
