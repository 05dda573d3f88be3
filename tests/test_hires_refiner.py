"""Hires fix with the SDXL refiner (issue 13), as AUTOMATIC1111's "Hires fix: which pass to enable refiner for"
(services/orchestrator/hires_refiner.py), through the running family suite (tiny SDXL base + refiner from the
registry), float32 on CPU, max abs difference 1e-5 against diffusers composed in process on the same folders,
each pipeline call with its own torch.Generator("cpu").manual_seed(seed):

- "second pass" (the default): StableDiffusionXLPipeline (all steps), the latent upscale, then
  StableDiffusionXLImg2ImgPipeline on the base (strength, denoising_end) and on the refiner (denoising_start);
  with a switch the second pass starts below, the refiner runs all of it (img2img at the hires strength);
- "first pass" / "both passes": StableDiffusionXLPipeline (denoising_end) + refiner (denoising_start), the
  upscale, then the refiner's StableDiffusionXLImg2ImgPipeline at the hires strength (A1111 keeps the refiner
  loaded for the second pass);
- the infotext says the pass ("Hires refiner", left out for the default as A1111 does) and its request keywords
  (png-info / generate --from) and the --hires-refiner flag give the same request; refused combinations say what
  to change.
- ControlNet (tiny SD 1.5 suite): the unit applies in the second pass too, its control image resized to the hires
  size (sd-webui-controlnet): StableDiffusionControlNetPipeline, the upscale, StableDiffusionControlNetImg2ImgPipeline.
"""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentwire.client import Client, hires_refiner, infotext
from latentwire.client.client import pixels_from_tensor
from latentwire.client.hires import hires_fix
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from reference import _family_pipeline
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.request import resolve_request
from services.runtime.errors import InvalidArgument

from family_suite import REFINER, SDXL
from test_families_suite import assert_close, request

pytestmark = pytest.mark.slow

PROMPT = "a lighthouse on a cliff at dusk"
SEED, STEPS, SIZE = 5, 3, 32  # the tiny SDXL VAE downsamples 2x: 16x16 latents, 24x24 after the 1.5x upscale
SCALE, STRENGTH = 1.5, 0.7


@pytest.fixture(scope="module")
def pipes(tiny_family_models):
    import diffusers

    base = _family_pipeline("StableDiffusionXLPipeline", str(tiny_family_models["sdxl"]))
    base_img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components)
    base_img2img.set_progress_bar_config(disable=True)
    refiner = _family_pipeline("StableDiffusionXLImg2ImgPipeline", str(tiny_family_models["sdxl-refiner"]))
    return base, base_img2img, refiner


def _call(pipe, output_type: str = "latent", **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
                output_type=output_type, **kwargs).images


def _upscale(latents: torch.Tensor) -> torch.Tensor:  # "Latent": A1111's bilinear interpolate
    return torch.nn.functional.interpolate(latents, size=(24, 24), mode="bilinear")


_REFERENCES: dict[tuple[str, float, str], np.ndarray] = {}


def reference(pipes, refiner_pass: str, switch_at: float, upscaler: str = "Latent") -> np.ndarray:
    """Float pixels of the diffusers composition of ``refiner_pass`` (computed once per module)."""
    key = (refiner_pass, switch_at, upscaler)
    if key not in _REFERENCES:
        _REFERENCES[key] = _compose(pipes, *key)
    return _REFERENCES[key]


def _compose(pipes, refiner_pass: str, switch_at: float, upscaler: str) -> np.ndarray:
    base, base_img2img, refiner = pipes
    if upscaler == "Lanczos":  # the refiner's VAE decodes (8-bit), PIL resizes, the refiner's VAE encodes again
        first = _call(base, width=SIZE, height=SIZE, denoising_end=switch_at)
        image = _call(refiner, "pil", image=first, denoising_start=switch_at)[0]
        resized = image.resize((48, 48), resample=Image.Resampling.LANCZOS)
        return _call(refiner, "np", image=resized, strength=STRENGTH)
    if refiner_pass == hires_refiner.SECOND:
        upscaled = _upscale(_call(base, width=SIZE, height=SIZE))
        handed = _call(base_img2img, image=upscaled, strength=STRENGTH, denoising_end=switch_at)
        return _call(refiner, "np", image=handed, denoising_start=switch_at)
    first = _call(base, width=SIZE, height=SIZE, denoising_end=switch_at)
    refined = _call(refiner, image=first, denoising_start=switch_at)
    return _call(refiner, "np", image=_upscale(refined), strength=STRENGTH)


def _run(address: str, refiner_pass: str, switch_at: float, upscaler: str = "Latent"):
    """One job through the suite: (its request, float pixels, step numbers seen, the PNG's infotext)."""
    job = request(PROMPT, model=SDXL, refiner=REFINER, refiner_switch_at=switch_at, seed=SEED, steps=STEPS,
                  width=SIZE, height=SIZE, hires=hires_fix(upscaler, scale=SCALE, denoising_strength=STRENGTH,
                                                           refiner_pass=refiner_pass))
    steps, result = [], None
    with grpc.insecure_channel(address) as channel:
        for event in orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(job, timeout=300):
            if event.WhichOneof("event") == "step":
                steps.append(event.step.step)
            elif event.WhichOneof("event") == "result":
                result = event.result
    assert result is not None, "the stream ended without a result"
    with Image.open(io.BytesIO(result.images[0].png)) as image:
        text = image.text["parameters"]
    return job, pixels_from_tensor(result.pixels), steps, text


@pytest.mark.parametrize("refiner_pass,switch_at,upscaler", [
    # 3 first-pass steps (timesteps 667, 334, 1); the second pass runs int(3 * 0.7) = 2 of 3 (334, 1): at 0.8
    # (cutoff 200) the base runs 334 and the refiner 1.
    ("", 0.8, "Latent"),
    # The second pass starts at 334, below the switch at 0.5 (cutoff 500): the refiner runs both of its steps.
    ("second pass", 0.5, "Latent"),
    # Base 667, 334; refiner 1; then the refiner's whole second pass (334, 1).
    ("first pass", 0.8, "Latent"),
    # The same with a pixel upscaler: the refiner's VAE decodes and encodes.
    ("first pass", 0.8, "Lanczos"),
], ids=["second-pass-default", "second-pass-refiner-only", "first-pass", "first-pass-lanczos"])
def test_hires_refiner_equals_diffusers_composed(family_suite, pipes, refiner_pass, switch_at, upscaler):
    job, pixels, steps, text = _run(family_suite.address, refiner_pass, switch_at, upscaler)
    choice = refiner_pass or hires_refiner.SECOND
    assert pixels.shape == (1, 48, 48, 3)
    assert_close(pixels, reference(pipes, choice, switch_at, upscaler), f"{choice}, {upscaler}")
    assert steps == [1, 2, 3, 4, 5]  # 3 steps at 32x32, 2 at 48x48, however base and refiner share them
    assert "Size: 32x32" in text and f"Refiner: {REFINER}" in text
    assert ("Hires refiner: first pass" in text) == (choice == hires_refiner.FIRST)  # A1111 leaves its default out
    kwargs = infotext.request_kwargs(infotext.parse_parameters(text))
    expected_fix = hires_fix(upscaler, scale=SCALE, denoising_strength=STRENGTH,
                             refiner_pass="" if choice == hires_refiner.SECOND else choice)
    assert kwargs["hires"] == expected_fix and kwargs["refiner"].partition("@")[0] == REFINER  # pinned: @VERSION
    assert kwargs["refiner_switch_at"] == switch_at


def test_both_passes_is_first_pass_and_round_trips(family_suite, pipes, tmp_path):
    """A1111 without a hires checkpoint: "both passes" makes the image of "first pass" (not the one of "second
    pass"); generate --from on its PNG asks for the same job, and --hires-refiner changes just that setting."""
    from latentwire.cli.main import _seed_and_hires_settings, _settings_from_png, build_parser as cli_parser

    job, pixels, _, text = _run(family_suite.address, "both", 0.8)
    assert_close(pixels, reference(pipes, hires_refiner.FIRST, 0.8), "both passes")
    assert float(np.abs(pixels - reference(pipes, hires_refiner.SECOND, 0.8)).max()) > 1e-3
    assert "Hires refiner: both passes" in text
    path = tmp_path / "both.png"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (48, 48)).save(path, pnginfo=info)

    def from_png(*flags: str) -> orchestrator_pb2.GenerateRequest:
        args = cli_parser().parse_args(["generate", "--from", str(path), *flags])
        prompt, settings, _ = _settings_from_png(path, args, _seed_and_hires_settings(args))
        return Client.build_request(prompt, include_pixels=True, **settings)

    again = from_png()
    assert (again.hires, again.refiner.name.partition("@")[0], again.refiner_switch_at, again.seed) == (
        job.hires, job.refiner.name, job.refiner_switch_at, job.seed)
    assert from_png("--hires-refiner", "second").hires == hires_fix(
        "Latent", scale=SCALE, denoising_strength=STRENGTH, refiner_pass="second pass")


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, format="PNG")
    return out.getvalue()


# ---- ControlNet in the second pass (tiny SD 1.5 suite) ---------------------------------------------------------

def test_hires_with_controlnet_equals_diffusers_composed(client, tiny_model, tiny_controlnets):
    """As the sd-webui-controlnet extension, the unit applies in the second pass too, its control image resized to
    the hires size: StableDiffusionControlNetPipeline (latents), the upscale, then
    StableDiffusionControlNetImg2ImgPipeline at 48x48 with the same control image; guidance_end 0.6 covers the
    second pass's first of its 2 steps only (the pipeline's controlnet_keep over the steps that run)."""
    import diffusers

    from latentwire.client import control
    from test_image_conditioning import control_image, pil

    image, guidance = control_image(32, 32, seed=2), 6.0
    result = client.generate(PROMPT, seed=SEED, steps=STEPS, width=SIZE, height=SIZE, guidance_scale=guidance,
                             include_pixels=True, controlnets=[control(image, "none", scale=0.9, end=0.6)],
                             hires=hires_fix("Latent", scale=SCALE, denoising_strength=STRENGTH))
    net = diffusers.ControlNetModel.from_pretrained(tiny_controlnets[0], use_safetensors=True)
    first = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model, controlnet=net, safety_checker=None, requires_safety_checker=False, use_safetensors=True)
    second = diffusers.StableDiffusionControlNetImg2ImgPipeline(**first.components)
    unit = dict(controlnet_conditioning_scale=0.9, control_guidance_end=0.6, guidance_scale=guidance)
    latents = _call(first, image=pil(image), width=SIZE, height=SIZE, **unit)
    expected = _call(second, "np", image=_upscale(latents), control_image=pil(image), strength=STRENGTH, width=48,
                     height=48, **unit)
    assert_close(result.pixels, expected, "hires + ControlNet")
    plain = client.generate(PROMPT, seed=SEED, steps=STEPS, width=SIZE, height=SIZE, guidance_scale=guidance,
                            include_pixels=True, hires=hires_fix("Latent", scale=SCALE, denoising_strength=STRENGTH))
    assert float(np.abs(plain.pixels - result.pixels).max()) > 1e-3  # the unit matters


SETTINGS = settings_from_flags(build_parser().parse_args(
    ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3",
     "--controlnet-address", "cn:4"]))


@pytest.mark.parametrize("fields,reason,says", [
    (dict(init_image=_png()), "HIRES_NOT_COMBINABLE", "AUTOMATIC1111 has none in img2img"),
    (dict(controlnets=[controlnet_pb2.ControlNetUnit(model=dict(name="canny"), image=_png())],
          refiner=dict(name="r")), "HIRES_NOT_COMBINABLE", "drop the refiner, the ControlNets or hires"),
    (dict(hires=hires_fix(refiner_pass="both")), "MISSING_REFINER", "name the refiner"),
    (dict(hires=orchestrator_pb2.HiresFix(refiner_pass=9), refiner=dict(name="r")), "INVALID_HIRES_REFINER_PASS",
     "first pass, second pass, both passes"),
], ids=["init-image", "controlnets-and-refiner", "pass-without-refiner", "unknown-pass"])
def test_refusals_say_what_to_change(fields, reason, says):
    fields.setdefault("hires", hires_fix())
    with pytest.raises(InvalidArgument) as refused:
        resolve_request(orchestrator_pb2.GenerateRequest(prompt="p", seed=1, **fields), SETTINGS)
    assert refused.value.reason == reason, str(refused.value)
    assert says in str(refused.value)


def test_hires_controlnets_only_on_sd_models():
    """The second pass with ControlNets is SD 1.x/2.x image-to-image: another family is refused once the model is
    described, before the first pass runs."""
    from services.orchestrator import hires
    from services.runtime.errors import FailedPrecondition

    params = resolve_request(orchestrator_pb2.GenerateRequest(
        prompt="p", seed=1, hires=hires_fix(), controlnets=[controlnet_pb2.ControlNetUnit(image=_png())]), SETTINGS)
    hires.check_controlnets_fit(params, "sd")
    with pytest.raises(FailedPrecondition) as refused:
        hires.check_controlnets_fit(params, "sdxl")
    assert refused.value.reason == "CONTROLNET_NOT_SUPPORTED" and "drop hires or the ControlNets" in str(refused.value)


def test_unknown_pass_name_is_refused_by_the_client():
    with pytest.raises(ValueError, match="first pass, second pass, both passes"):
        hires_fix(refiner_pass="third")
