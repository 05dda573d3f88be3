"""Live previews by a tiny preview VAE (PreviewOptions method "tiny-vae"; services/denoiser/preview_vae.py).

- A diffusers AutoencoderTiny folder (the tiny "taesd", 4 latent channels, and "taef1", 16, with TAEF1's scaling
  and shift factors; services/tiny_models/preview_vae.py) imports as MODEL_KIND_PREVIEW_VAE.
- Through the running family suite (registry models, tests/family_suite.py): an SD 1.5 run by the CLI naming the
  preview VAE (`generate --preview-method tiny-vae --preview-vae NAME --preview-dir DIR`) and a Flux run using the
  denoiser's configured one (--preview-vae flux=NAME): every preview equals the decode of the same step's latents
  of the diffusers pipeline (captured by callback_on_step_end) by that AutoencoderTiny, done as the pipeline does
  when it is its ``vae`` -- the last step's is the pipeline's own output with ``pipe.vae`` swapped in -- then
  encoded as JPEG the same way (quality 80). The final image is the same with and without previews.
- Refused before a job starts: a preview VAE whose latent channels do not fit the model, an unknown name, a model
  of another kind, and a family the denoiser has no preview VAE configured for.

Tolerance of the previews: the suite's latents equal the pipeline's within 1e-5, not bit for bit (the split text
encoding and denoising do the same float work in other groupings), so a pixel lying on a rounding boundary of the
8-bit quantisation may come out one level apart, and JPEG spreads such a change over its 8x8 block after
quantising the block's coefficients. The decoded previews may differ by at most 3 levels per channel (JPEG at
quality 80 moves a one-level step by up to about 2), and at least half of a run's previews must be byte-identical
(measured: all six are, 0 levels apart); a wrong decode (latents without TAEF1's scaling and shift) is tens of
levels off.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, FluxPipeline, StableDiffusionPipeline
from PIL import Image

from latentwire.client import Client, LatentwireError
from latentwire.client.registry import RegistryClient, scan_folder
from latentwire.common.v1 import model_pb2, preview_pb2
from latentwire.registry.v1 import registry_pb2
from services.denoiser.preview_vae import parse_defaults
from services.runtime import previews as preview_options
from services.runtime.errors import ConfigurationError
from services.tiny_models import create_tiny_model

from family_suite import FLUX, PREVIEW_VAE_TAEF1, PREVIEW_VAE_TAESD, SD15, SDXL

#: Starts service processes (the family suite): left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

PROMPT = "a lighthouse on a cliff at dusk"
CLI = [sys.executable, "-m", "latentwire.cli.main"]
#: Largest difference of a decoded preview from its reference, per channel, in 8-bit levels (module docstring).
LEVELS = 3


@pytest.fixture(scope="module")
def preview_vae_folders(tmp_path_factory) -> dict[str, object]:
    """The tiny preview VAEs, by registry name: TAESD-like (4 channels) and TAEF1-like (16 channels)."""
    root = tmp_path_factory.mktemp("preview-vaes")
    return {PREVIEW_VAE_TAESD: create_tiny_model(root / PREVIEW_VAE_TAESD, "taesd"),
            PREVIEW_VAE_TAEF1: create_tiny_model(root / PREVIEW_VAE_TAEF1, "taef1")}


@pytest.fixture(scope="module")
def imported(family_suite, preview_vae_folders) -> dict[str, registry_pb2.ModelVersion]:
    """The tiny preview VAEs imported into the family suite's registry (alias "default")."""
    with RegistryClient(family_suite.services["registry"].address, timeout=120) as registry:
        return {name: registry.import_folder(folder, name, aliases=["default"]).model_version
                for name, folder in preview_vae_folders.items()}


@pytest.fixture(scope="module")
def family_client(family_suite):
    with Client(family_suite.address, timeout=300) as client:
        yield client


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=preview_options.QUALITY)
    return buffer.getvalue()


def _decoded(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(np.int16)


def _reference_previews(pipe, vae: AutoencoderTiny, *, seed: int, unpack=None,
                        **call) -> tuple[list[bytes], list[torch.Tensor]]:
    """The diffusers pipeline with ``pipe.vae = vae`` (as diffusers documents TAESD's use): each step's latents
    (callback_on_step_end) decoded by ``vae`` as the pipeline decodes, as preview JPEGs, and those latents. The last
    step's decode is checked against the pipeline's own output."""
    latents: list[torch.Tensor] = []

    def capture(pipeline, step, timestep, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    pipe.vae = vae
    last = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                callback_on_step_end=capture, **call).images[0]
    pixels = []
    for step_latents in latents:
        if unpack is not None:  # FluxPipeline.__call__: unpacked, then latents / scaling_factor + shift_factor
            step_latents = unpack(step_latents) / vae.config.scaling_factor + vae.config.shift_factor
        else:  # StableDiffusionPipeline.__call__: latents / scaling_factor
            step_latents = step_latents / vae.config.scaling_factor
        with torch.no_grad():
            image = vae.decode(step_latents, return_dict=False)[0]
        pixels.append(np.asarray(pipe.image_processor.postprocess(image, output_type="pil")[0]))
    assert np.array_equal(pixels[-1], np.asarray(last)), "the decode above is not the pipeline's"
    return [_jpeg(p) for p in pixels], latents


def _assert_previews_equal(got: list[bytes], expected: list[bytes], case: str) -> None:
    assert len(got) == len(expected), f"{case}: {len(got)} previews, expected {len(expected)}"
    identical = sum(image == reference for image, reference in zip(got, expected))
    assert 2 * identical >= len(got), f"{case}: only {identical} of {len(got)} previews byte-identical"
    for step, (image, reference) in enumerate(zip(got, expected), 1):
        decoded, wanted = _decoded(image), _decoded(reference)
        assert Image.open(io.BytesIO(image)).format == "JPEG"
        assert decoded.shape == wanted.shape, f"{case} step {step}: {decoded.shape}, expected {wanted.shape}"
        difference = int(np.abs(decoded - wanted).max())
        assert difference <= LEVELS, f"{case} step {step}: {difference} levels apart"
    # The previews show the run progressing: no two steps' previews alike.
    assert len({bytes(p) for p in got}) == len(got)


def test_autoencoder_tiny_folder_imports_as_preview_vae(preview_vae_folders, imported):
    for name, folder in preview_vae_folders.items():
        assert scan_folder(folder).kind == registry_pb2.MODEL_KIND_PREVIEW_VAE
        assert imported[name].kind == registry_pb2.MODEL_KIND_PREVIEW_VAE
        assert list(imported[name].components) == []
    options = preview_pb2.PreviewOptions(method="tiny-vae", preview_vae=model_pb2.ModelReference(name="taesd"))
    assert preview_options.from_proto(options) == preview_options.Previews(5, "jpeg", "tiny-vae", "taesd")
    options.method = "approx"  # the approx map uses no preview VAE
    assert preview_options.from_proto(options).preview_vae == ""
    assert parse_defaults(["sd=taesd", "flux = taef1"]) == {"sd": "taesd", "flux": "taef1"}
    for bad in (["sd"], ["sd15=taesd"], ["sd=a", "sd=b"], ["sd=/no/such/folder"]):
        with pytest.raises(ConfigurationError):
            parse_defaults(bad)


def test_sd15_cli_tiny_vae_previews_equal_the_pipeline_decode(family_suite, family_client, tiny_family_models,
                                                                preview_vae_folders, imported, tmp_path):
    seed, steps = 21, 3
    previews, pixels = tmp_path / "previews", tmp_path / "pixels.npy"
    done = subprocess.run([*CLI, "generate", PROMPT, "--model", SD15, "--seed", str(seed), "--steps", str(steps),
                           "--preview-method", "tiny-vae", "--preview-vae", PREVIEW_VAE_TAESD, "--preview-every", "1",
                           "--preview-dir", str(previews), "--save-pixels", str(pixels), "-o", str(tmp_path / "o.png"),
                           "-q", "--server", family_suite.address], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = sorted(previews.iterdir())
    assert [p.name for p in written] == ["step-0001.jpg", "step-0002.jpg", "step-0003.jpg"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_family_models["sd15"], safety_checker=None,
                                                   requires_safety_checker=False, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    vae = AutoencoderTiny.from_pretrained(preview_vae_folders[PREVIEW_VAE_TAESD], use_safetensors=True)
    expected, _ = _reference_previews(pipe, vae, seed=seed, num_inference_steps=steps)
    _assert_previews_equal([p.read_bytes() for p in written], expected, "SD 1.5")
    assert Image.open(written[0]).size == (64, 64)  # 32x32 latents, decoded 2x by the tiny TAESD: the image's size
    # The same run without previews gives the same image.
    plain = family_client.generate(PROMPT, model=SD15, seed=seed, steps=steps, include_pixels=True)
    assert np.array_equal(np.load(pixels), plain.pixels)


def test_flux_configured_tiny_vae_previews_equal_the_pipeline_decode(family_client, tiny_family_models,
                                                                     preview_vae_folders, imported):
    """No preview VAE named: the denoiser's --preview-vae flux=... (tests/family_suite.py) decodes, with TAEF1's
    scaling and shift, after unpacking Flux's packed latents."""
    seed, steps, width, height = 12, 3, 48, 32
    settings = dict(model=FLUX, seed=seed, steps=steps, width=width, height=height, include_pixels=True)
    result = family_client.generate(PROMPT, preview_method="tiny-vae", preview_every=1, **settings)
    assert [s.preview_format for s in result.steps] == ["jpeg"] * steps
    pipe = FluxPipeline.from_pretrained(tiny_family_models["flux"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    vae = AutoencoderTiny.from_pretrained(preview_vae_folders[PREVIEW_VAE_TAEF1], use_safetensors=True)

    def unpack(latents):
        return FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    expected, latents = _reference_previews(pipe, vae, seed=seed, unpack=unpack, num_inference_steps=steps,
                                            width=width, height=height, guidance_scale=3.5)
    _assert_previews_equal([s.preview_image for s in result.steps], expected, "Flux")
    assert Image.open(io.BytesIO(result.steps[0].preview_image)).size == (2 * width, 2 * height)  # TAEF1-tiny: 2x
    # The test can fail: without TAEF1's scaling and shift the same latents decode many levels away.
    with torch.no_grad():
        unscaled = vae.decode(unpack(latents[-1]), return_dict=False)[0]
    wrong = np.asarray(pipe.image_processor.postprocess(unscaled, output_type="pil")[0]).astype(np.int16)
    assert int(np.abs(wrong - _decoded(expected[-1])).max()) > 10 * LEVELS
    plain = family_client.generate(PROMPT, **settings)
    assert np.array_equal(result.pixels, plain.pixels)


@pytest.mark.parametrize("model,preview_vae,code,reason", [
    (SD15, PREVIEW_VAE_TAEF1, "INVALID_ARGUMENT", "PREVIEW_VAE_MISMATCH"),  # 16 channels for SD's 4
    (SD15, "no-such-preview-vae", "NOT_FOUND", "PREVIEW_VAE_NOT_FOUND"),
    (SD15, SDXL, "INVALID_ARGUMENT", "NOT_A_PREVIEW_VAE"),  # a pipeline, not an AutoencoderTiny
    (SD15, "", "FAILED_PRECONDITION", "PREVIEW_VAE_NOT_CONFIGURED"),  # the suite configures Flux's only
], ids=["channel-mismatch", "unknown", "wrong-kind", "not-configured"])
def test_tiny_vae_refusals(family_client, imported, model, preview_vae, code, reason):
    with pytest.raises(LatentwireError) as refused:
        family_client.generate(PROMPT, model=model, steps=2, preview_method="tiny-vae", preview_vae=preview_vae)
    assert (refused.value.code.name, refused.value.reason) == (code, reason)
    assert "preview" in refused.value.message.lower()
