"""Images through the running suite equal diffusers' StableDiffusionPipeline on the same folder.

Float32 on CPU, compared before PNG quantisation: max abs difference at most 1e-5.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reference import reference_pixels

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

TOLERANCE = 1e-5

CASES = [
    # (id, scheduler, settings)
    ("ddim-cfg-negative", "DDIMScheduler", dict(guidance_scale=7.5, negative_prompt="blurry, low quality")),
    ("euler-cfg", "EulerDiscreteScheduler", dict(guidance_scale=6.0)),
    ("euler-ancestral-cfg-batch", "EulerAncestralDiscreteScheduler", dict(guidance_scale=7.5, num_images=3)),
    ("dpmsolver-no-cfg", "DPMSolverMultistepScheduler", dict(guidance_scale=1.0)),
    ("unipc-non-square", "UniPCMultistepScheduler", dict(guidance_scale=5.0, width=96, height=48)),
    ("pndm-cfg-negative-batch", "PNDMScheduler", dict(guidance_scale=7.5, negative_prompt="dark", num_images=2)),
    ("lms-no-cfg-non-square", "LMSDiscreteScheduler", dict(guidance_scale=1.0, width=48, height=80)),
    ("ancestral-no-cfg-negative-ignored", "EulerAncestralDiscreteScheduler",
     dict(guidance_scale=1.0, negative_prompt="ignored without guidance")),
    ("heun-second-order", "HeunDiscreteScheduler", dict(guidance_scale=7.5)),
    ("kdpm2-ancestral", "KDPM2AncestralDiscreteScheduler", dict(guidance_scale=7.5, num_images=2)),
]


@pytest.mark.parametrize("case_id,scheduler,settings", CASES, ids=[c[0] for c in CASES])
def test_suite_equals_diffusers(client, tiny_model, case_id, scheduler, settings):
    prompt = "a photo of an astronaut riding a horse on the moon"
    seed, steps = 1234, 8
    result = client.generate(prompt, seed=seed, steps=steps, scheduler=scheduler, include_pixels=True, **settings)
    expected = reference_pixels(
        tiny_model,
        prompt,
        seed=seed,
        steps=steps,
        guidance_scale=settings["guidance_scale"],
        negative_prompt=settings.get("negative_prompt"),
        num_images=settings.get("num_images", 1),
        width=settings.get("width"),
        height=settings.get("height"),
        scheduler=scheduler,
    )
    assert result.pixels.shape == expected.shape
    difference = float(np.abs(result.pixels - expected).max())
    assert difference <= TOLERANCE, f"{case_id}: max abs difference {difference:.3g}"
    # The images must differ from each other (one generator draws the whole batch, as diffusers does).
    if expected.shape[0] > 1:
        assert np.abs(result.pixels[0] - result.pixels[1]).max() > 1e-3
    # The PNGs are the quantised pixels, as diffusers' numpy_to_pil makes them.
    assert len(result.images) == expected.shape[0]
    for png, pixels in zip(result.images, expected):
        decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert decoded.shape == pixels.shape
        assert np.abs(decoded.astype(int) - (pixels * 255).round().astype(int)).max() <= 1


def test_different_seeds_differ(client):
    first = client.generate("a cat", seed=1, steps=3, include_pixels=True)
    second = client.generate("a cat", seed=2, steps=3, include_pixels=True)
    again = client.generate("a cat", seed=1, steps=3, include_pixels=True)
    assert np.abs(first.pixels - second.pixels).max() > 1e-3
    assert np.array_equal(first.pixels, again.pixels)


def test_cli_generate_equals_diffusers(suite, tiny_model, tmp_path):
    """`latentwire generate` end to end: PNG files, infotext chunk, printed seed, float pixels."""
    output = tmp_path / "out.png"
    pixels_path = tmp_path / "pixels.npy"
    completed = subprocess.run(
        [sys.executable, "-m", "latentwire.cli.main", "generate", "a red fox in the snow", "-o", str(output),
         "--negative", "blurry", "--seed", "77", "--steps", "6", "--guidance", "7.0", "--width", "80",
         "--height", "64", "--images", "2", "--scheduler", "EulerAncestralDiscreteScheduler",
         "--server", suite.address, "--save-pixels", str(pixels_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "seed 77" in completed.stdout
    assert "denoising" in completed.stderr  # the progress bar, fed by the stream
    expected = reference_pixels(
        tiny_model, "a red fox in the snow", seed=77, steps=6, guidance_scale=7.0, negative_prompt="blurry",
        num_images=2, width=80, height=64, scheduler="EulerAncestralDiscreteScheduler",
    )
    pixels = np.load(pixels_path)
    assert float(np.abs(pixels - expected).max()) <= TOLERANCE
    second = tmp_path / "out-1.png"
    for index, path in enumerate([output, second]):
        image = Image.open(path)
        assert image.size == (80, 64)
        text = image.text["parameters"]
        assert text.startswith("a red fox in the snow\nNegative prompt: blurry\n")
        assert "Steps: 6, Sampler: EulerAncestralDiscreteScheduler, CFG scale: 7, Seed: 77, Size: 80x64" in text
        assert f"Batch size: 2, Batch pos: {index}" in text
