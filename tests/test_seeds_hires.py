"""AUTOMATIC1111's seeds (variation seed, seed resize, batch count) and hires fix (issue 13, part S).

Through the running suite (tiny SD 1.5, DDIM with eta 0: the scheduler draws nothing, so only the initial noise
differs between runs), float32 on CPU, max abs difference 1e-5 against diffusers on the same weights:
- subseed_strength 0 is the plain seed (whatever the subseed); 1 is a run with seed = subseed; 0.4 equals
  StableDiffusionPipeline given as latents the slerp of the two noises computed here (each drawn from its own
  torch.Generator("cpu") seeded with the seed and the subseed);
- seed resize equals the pipeline given noise built here by hand: the seed's noise at the from-size (a fresh
  generator seeded with the seed) placed in the middle of the seed's noise at the image size, cropped where larger;
- batch count: each batch's images equal a separate run with seed + i * num_images, and the result says each
  image's seed;
- hires fix equals diffusers composed in process: StableDiffusionPipeline(output_type="latent" or "pil") with
  torch.Generator("cpu").manual_seed(seed), then the upscale (torch.nn.functional.interpolate as A1111, or PIL
  Lanczos), then StableDiffusionImg2ImgPipeline(image=upscaled latents or image, strength) with a fresh
  torch.Generator("cpu").manual_seed(seed) (each pass draws from its own generator seeded with the job's seed);
  the progress stream counts both passes;
- the PNG infotext carries the settings and `request_kwargs` (png-info / generate --from) makes the same image.
One SDXL case in process: image-to-image from upscaled latents on the tiny SDXL denoiser equals
StableDiffusionXLImg2ImgPipeline given the latents. Bad inputs are refused with their reasons.
"""
from __future__ import annotations

import io
import math

import diffusers
import grpc
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentwire.client import LatentwireError, infotext
from latentwire.client.hires import find_latent_upscaler, hires_fix
from latentwire.orchestrator.v1 import orchestrator_pb2
from reference import _pipeline
from services.denoiser import noise
from services.denoiser.conditioning import TextConditioning
from services.denoiser.model import DenoiseParams, ImageInputs, load_denoiser
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.request import infotext as write_infotext
from services.orchestrator.request import resolve_request
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument
from services.runtime.jobs import Job

TOLERANCE = 1e-5
PROMPT = "a lighthouse on a cliff at dusk"
SIZE = 32  # pixels; the tiny SD 1.5 VAE downsamples 2x: 16x16 latents
STEPS, GUIDANCE = 2, 6.0


def _diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def pipe(tiny_model):
    pipeline = _pipeline(str(tiny_model))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _txt2img(pipe, seed: int, latents=None, output_type: str = "np", size: int = SIZE):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=size, height=size, latents=latents,
                generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type).images


def _noise(seed: int, shape) -> torch.Tensor:
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp written out for one image's [channels, height, width] noise (norms along dim 1)."""
    a = low / low.norm(dim=1, keepdim=True)
    b = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((a * b).sum(1))
    return (torch.sin((1 - val) * omega) / torch.sin(omega)).unsqueeze(1) * low + \
        (torch.sin(val * omega) / torch.sin(omega)).unsqueeze(1) * high


def _generate(client, **settings):
    settings.setdefault("width", SIZE)
    settings.setdefault("height", SIZE)
    return client.generate(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, include_pixels=True, **settings)


def _parameters(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).text["parameters"]


# ----------------------------------------------------------------------------------------------
# Variation seeds and seed resize


def test_slerp_and_placement_by_hand():
    low, high = _noise(1, (4, 6, 5)), _noise(2, (4, 6, 5))
    assert torch.equal(noise.slerp(1.0, low, high), high)
    assert float((noise.slerp(0.3, low, high) - _slerp(0.3, low, high)).abs().max()) < 1e-6
    assert torch.equal(noise.slerp(0.0, low, high), low)
    # Nearly parallel noises take A1111's linear branch, with its weights as A1111 orders them.
    assert torch.equal(noise.slerp(0.25, low, low * 1.0001), low * 0.25 + low * 1.0001 * 0.75)
    big, small = torch.zeros(1, 1, 4, 6), torch.arange(12.0).reshape(1, 1, 6, 2) + 1
    placed = noise.place(big, small)  # 6 rows into 4: the middle 4; 2 columns into 6: columns 2-3
    assert torch.equal(placed[0, 0, :, 2:4], small[0, 0, 1:5])
    assert placed[0, 0, :, [0, 1, 4, 5]].abs().sum() == 0


def test_subseed_strength_0_and_1(client):
    plain = _generate(client, seed=11).pixels
    zero = _generate(client, seed=11, subseed=99, subseed_strength=0.0)
    assert _diff(zero.pixels, plain) == 0.0
    assert "Variation seed" not in _parameters(zero.images[0])
    one = _generate(client, seed=11, subseed=99, subseed_strength=1.0).pixels
    assert _diff(one, _generate(client, seed=99).pixels) <= TOLERANCE
    assert _diff(one, plain) > 1e-3


def test_subseed_mid_strength_equals_slerp_and_png_info_regenerates(client, pipe):
    result = _generate(client, seed=5, subseed=6, subseed_strength=0.4)
    shape = (1, 4, SIZE // 2, SIZE // 2)
    mixed = _slerp(0.4, _noise(5, shape)[0], _noise(6, shape)[0])[None]
    assert _diff(result.pixels, _txt2img(pipe, 5, latents=mixed)) <= TOLERANCE
    text = _parameters(result.images[0])
    assert "Seed: 5," in text and "Variation seed: 6, Variation seed strength: 0.4" in text
    kwargs = infotext.request_kwargs(infotext.parse_parameters(text))
    assert kwargs["subseed"] == 6 and kwargs["subseed_strength"] == 0.4
    prompt = kwargs.pop("prompt")
    again = client.generate(prompt, include_pixels=True, **kwargs)
    assert _diff(again.pixels, result.pixels) == 0.0


def test_seed_resize_equals_hand_built_noise(client, pipe):
    # From 24x48 pixels (12 wide, 24 high in latents) into 16x16: padded left and right, cropped top and bottom.
    result = _generate(client, seed=8, seed_resize_from=(24, 48))
    full = _noise(8, (1, 4, 16, 16))
    small = _noise(8, (1, 4, 24, 12))
    expected = full.clone()
    expected[:, :, :, 2:14] = small[:, :, 4:20, :]
    assert _diff(result.pixels, _txt2img(pipe, 8, latents=expected)) <= TOLERANCE
    assert _diff(result.pixels, _txt2img(pipe, 8)) > 1e-3
    text = _parameters(result.images[0])
    assert "Seed resize from: 24x48" in text
    assert infotext.request_kwargs(infotext.parse_parameters(text))["seed_resize_from"] == (24, 48)


def test_batch_count_seeds_count_up(client):
    result = _generate(client, seed=40, num_images=2, batch_count=2)
    assert result.image_seeds == [40, 40, 42, 42]
    assert result.pixels.shape[0] == 4 and len(result.images) == 4
    for i, seed in ((0, 40), (1, 42)):
        alone = _generate(client, seed=seed, num_images=2).pixels
        assert _diff(result.pixels[2 * i:2 * i + 2], alone) == 0.0
    assert [f"Seed: {s}," in _parameters(png) for s, png in zip(result.image_seeds, result.images)] == [True] * 4
    assert "Batch pos: 1" in _parameters(result.images[3])
    assert [s.step for s in result.steps] == [1, 2, 3, 4] and result.steps[-1].total_steps == 4


# ----------------------------------------------------------------------------------------------
# Hires fix


def _img2img(pipe, image, seed: int, steps: int, strength: float):
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return img2img(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


def test_hires_latent_equals_diffusers_composed(client, pipe):
    result = _generate(client, seed=3, hires=hires_fix("Latent (bicubic antialiased)", scale=1.5, steps=3,
                                                      denoising_strength=0.7))
    latents = _txt2img(pipe, 3, output_type="latent")
    upscaled = torch.nn.functional.interpolate(latents, size=(24, 24), mode="bicubic", antialias=True)
    expected = _img2img(pipe, upscaled, 3, steps=3, strength=0.7)
    assert result.pixels.shape == (1, 48, 48, 3)
    assert _diff(result.pixels, expected) <= TOLERANCE
    # Progress counts both passes: 2 first-pass steps, then int(3 * 0.7) = 2.
    assert [s.step for s in result.steps] == [1, 2, 3, 4] and {s.total_steps for s in result.steps} == {4}
    text = _parameters(result.images[0])
    assert "Size: 32x32" in text
    assert ("Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 3, "
            "Hires upscaler: Latent (bicubic antialiased)") in text
    kwargs = infotext.request_kwargs(infotext.parse_parameters(text))
    assert kwargs["hires"] == hires_fix("Latent (bicubic antialiased)", scale=1.5, steps=3, denoising_strength=0.7)
    assert "strength" not in kwargs


def test_hires_lanczos_equals_decode_resize_img2img(client, pipe):
    result = _generate(client, seed=4, hires=hires_fix("Lanczos", resize=(40, 0), denoising_strength=0.5))
    first = _txt2img(pipe, 4, output_type="pil")[0]
    resized = first.resize((40, 40), resample=Image.Resampling.LANCZOS)
    expected = _img2img(pipe, resized, 4, steps=STEPS, strength=0.5)
    assert _diff(result.pixels, expected) <= TOLERANCE
    text = _parameters(result.images[0])
    assert "Denoising strength: 0.5, Hires resize: 40x0, Hires upscaler: Lanczos" in text


def test_sdxl_img2img_from_upscaled_latents_equals_the_pipeline(tiny_family_models):
    """The denoiser's image-to-image from latents (a hires fix's second pass) on tiny SDXL."""
    path = tiny_family_models["sdxl"]
    denoiser = load_denoiser(ModelSpec("sdxl", path), torch.device("cpu"), torch.float32, False)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    first = torch.randn(1, 4, 16, 16, generator=torch.Generator("cpu").manual_seed(0))
    upscaled = noise.upscale_latents(first, (24, 24), find_latent_upscaler("Latent"))
    assert torch.equal(upscaled, torch.nn.functional.interpolate(first, size=(24, 24), mode="bilinear"))
    from test_denoiser_sdxl import PROMPT as SDXL_PROMPT
    from test_denoiser_sdxl import encoder_parts, run

    params = DenoiseParams(48, 48, 3, 5.0, 0.0, 0.0, 7, "", strength=0.6)
    output, events = run(denoiser, encoder_parts(pipe, 1, True), params, ImageInputs(init_latents=upscaled))
    expected = pipe(SDXL_PROMPT, image=upscaled, strength=0.6, num_inference_steps=3, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator("cpu").manual_seed(7)).images
    assert float((output.latents - expected).abs().max()) <= TOLERANCE
    assert len(events) == 1  # int(3 * 0.6)


def test_sd3_img2img_from_upscaled_latents_equals_the_pipeline(tiny_family_models):
    """The same on a flow-matching model (tiny SD3; its VAE does not downsample): 16x16 latents upscaled to 24x24."""
    path = tiny_family_models["sd3"]
    denoiser = load_denoiser(ModelSpec("sd3", path), torch.device("cpu"), torch.float32, False)
    pipe = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, prompt_2=None, prompt_3=None, device=torch.device("cpu"), do_classifier_free_guidance=True)
    first = torch.randn(1, denoiser.latent_channels, 16, 16, generator=torch.Generator("cpu").manual_seed(1))
    upscaled = noise.upscale_latents(first, (24, 24), find_latent_upscaler("Latent (nearest-exact)"))
    params = DenoiseParams(24, 24, 3, 7.0, 0.0, 0.0, 7, "", strength=0.7)
    image = ImageInputs(init_latents=upscaled)
    denoiser.check_image_inputs(image, params, 1)
    events = []
    output = denoiser.denoise(Job("job", 3), TextConditioning(prompt, negative, pooled, negative_pooled), params,
                              events.append, image)
    expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled, image=upscaled, strength=0.7, num_inference_steps=3,
                    guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    assert float((output.latents - expected).abs().max()) <= TOLERANCE
    with pytest.raises(InvalidArgument) as refused:  # latents of another size without an upscaler
        denoiser.check_image_inputs(ImageInputs(init_latents=first), params, 1)
    assert refused.value.reason == "INVALID_TENSOR"


# ----------------------------------------------------------------------------------------------
# Bad inputs


SETTINGS = settings_from_flags(build_parser().parse_args(
    ["--text-encoder-address", "te:1", "--denoiser-address", "dn:2", "--vae-address", "vae:3",
     "--max-image-size", "512"]))


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("fields,reason,says", [
    (dict(subseed_strength=1.5), "INVALID_SUBSEED_STRENGTH", "use 0"),
    (dict(subseed_strength=math.nan), "INVALID_SUBSEED_STRENGTH", "use 0"),
    (dict(seed_resize_from_w=64), "INVALID_SEED_RESIZE", "set both"),
    (dict(seed_resize_from_w=60, seed_resize_from_h=64), "INVALID_SEED_RESIZE", "multiple of 8"),
    (dict(seed_resize_from_w=1024, seed_resize_from_h=64), "INVALID_SEED_RESIZE", "up to 512"),
    (dict(batch_count=101), "INVALID_BATCH_COUNT", "1 to 100"),
    (dict(batch_count=-1), "INVALID_BATCH_COUNT", "1 to 100"),
    (dict(seed=2**64 - 2, num_images=2, batch_count=2), "INVALID_BATCH_COUNT", "smaller seed"),
    (dict(hires=hires_fix("Latent (fancy)")), "UNKNOWN_UPSCALER", "Latent (bicubic)"),
    (dict(hires=hires_fix(scale=0.5)), "INVALID_HIRES_SIZE", "use 1 to 8"),
    (dict(hires=hires_fix(scale=2, resize=(64, 64))), "INVALID_HIRES_SIZE", "a scale or a size"),
    (dict(hires=hires_fix(denoising_strength=0.0)), "INVALID_STRENGTH", ""),
    (dict(hires=hires_fix(steps=-2)), "INVALID_STEPS", ""),
    (dict(hires=hires_fix("Lanczos"), num_images=2), "HIRES_NOT_COMBINABLE", "batch_count"),
    (dict(hires=hires_fix(), init_image=_png()), "HIRES_NOT_COMBINABLE", "init image"),
    (dict(hires=hires_fix(refiner_pass="first")), "MISSING_REFINER", "name the refiner"),
    (dict(hires=hires_fix(scale=4), width=256, height=256), "IMAGE_TOO_LARGE", "hires width"),
    (dict(hires=hires_fix(sampler="Euler b")), "UNKNOWN_SAMPLER", "Euler"),
])
def test_refusals(fields, reason, says):
    request = orchestrator_pb2.GenerateRequest(prompt="p", seed=fields.pop("seed", 1), **fields)
    with pytest.raises(InvalidArgument) as refused:
        resolve_request(request, SETTINGS)
    assert refused.value.reason == reason, str(refused.value)
    assert says in str(refused.value)


def test_refusals_over_grpc(client):
    """The orchestrator refuses before a job exists, with the reason in the status's ErrorInfo."""
    with pytest.raises(LatentwireError) as refused:
        client.generate(PROMPT, steps=STEPS, width=SIZE, height=SIZE, seed=1, subseed_strength=2.0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "INVALID_SUBSEED_STRENGTH"


def test_stored_request_resolves_to_the_same_params():
    """What the job store keeps (to_request) resolves again to equal params: the drawn subseed, the hires fix."""
    request = orchestrator_pb2.GenerateRequest(prompt="p", subseed_strength=0.3, seed_resize_from_w=64,
                                               seed_resize_from_h=48, batch_count=3,
                                               hires=hires_fix("latent (NEAREST)", resize=(0, 96), steps=4))
    params = resolve_request(request, SETTINGS)
    assert params.hires.upscaler == "Latent (nearest)" and params.hires.denoising_strength == 0.7
    assert params.batch_count == 3 and params.seed_resize_from_w == 64
    assert resolve_request(params.to_request(), SETTINGS) == params
    assert params.hires.target(64, 32) == (192, 96)
    assert resolve_request(orchestrator_pb2.GenerateRequest(prompt="p"), SETTINGS).hires is None


def test_cli_flags_build_the_request():
    from latentwire.cli.main import _seed_and_hires_settings, build_parser
    from latentwire.client import Client

    args = build_parser().parse_args(
        ["generate", "p", "--subseed", "3", "--subseed-strength", "0.5", "--seed-resize-from", "64x48",
         "--batch-count", "2", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos", "--hires-steps", "4",
         "--hires-denoising", "0.4"])
    request = Client.build_request("p", **_seed_and_hires_settings(args))
    assert (request.subseed, request.subseed_strength, request.seed_resize_from_w, request.seed_resize_from_h,
            request.batch_count) == (3, 0.5, 64, 48, 2)
    assert request.hires == hires_fix("Lanczos", scale=1.5, steps=4, denoising_strength=0.4)
    plain = build_parser().parse_args(["generate", "p"])
    assert not Client.build_request("p", **_seed_and_hires_settings(plain)).HasField("hires")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        _seed_and_hires_settings(build_parser().parse_args(["generate", "p", "--seed-resize-from", "64"]))


def test_from_png_keeps_the_files_hires_under_flags(tmp_path):
    """generate --from: a --hires-* flag changes that setting of the file's hires fix, the others stay."""
    from latentwire.cli.main import _seed_and_hires_settings, _settings_from_png, build_parser

    params = resolve_request(orchestrator_pb2.GenerateRequest(
        prompt="p", seed=4, num_inference_steps=3, subseed=2, subseed_strength=0.25, width=32, height=32,
        hires=hires_fix("Lanczos", scale=1.5, steps=4, denoising_strength=0.4)), SETTINGS)
    text = write_infotext(params, model="m", scheduler="DDIMScheduler", width=32, height=32, index=0,
                          guidance_scale=7.5)
    path = tmp_path / "hires.png"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (48, 48)).save(path, pnginfo=info)

    def merged(*flags):
        args = build_parser().parse_args(["generate", "--from", str(path), *flags])
        return _settings_from_png(path, args, _seed_and_hires_settings(args))[1]

    assert merged()["hires"] == hires_fix("Lanczos", scale=1.5, steps=4, denoising_strength=0.4)
    assert (merged()["subseed"], merged()["subseed_strength"]) == (2, 0.25)
    assert merged("--hires-steps", "6")["hires"] == hires_fix("Lanczos", scale=1.5, steps=6, denoising_strength=0.4)
    assert merged("--hires-resize", "64x64")["hires"] == hires_fix("Lanczos", resize=(64, 64), steps=4,
                                                                   denoising_strength=0.4)
