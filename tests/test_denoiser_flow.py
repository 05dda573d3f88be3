"""The SD3 and Flux denoising loops (services/denoiser/flow.py), in process, against diffusers' own pipelines.

Conformance: float32 on CPU, the same weights (tiny random models written by create_tiny_model and loaded from
their folders), the same scheduler and seed; the latents the pipelines return with output_type="latent" (Flux's
unpacked with FluxPipeline._unpack_latents) must be within 1e-5 of the loop's. The text conditioning is what the
pipelines' own encode_prompt returns, as conditioning.combine builds it from the text encoder's parts. Then:
failover resumes from a checkpoint bit for bit, a cancelled job stops inside a step, refusals name their reason.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchHeunDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)
from PIL import Image

from services.denoiser import checkpoint as checkpoints
from services.denoiser.conditioning import TextConditioning
from services.denoiser.flow import FlowDenoiser
from services.denoiser.model import DenoiseParams, ImageInputs, load_denoiser
from services.runtime import interrupt
from services.runtime.config import ModelSpec
from services.runtime.errors import Cancelled, InvalidArgument
from services.runtime.jobs import Job
from services.tiny_models import create_tiny_model

#: Largest difference allowed between the loop's latents and the pipeline's.
TOLERANCE = 1e-5
SEED = 7
CPU = torch.device("cpu")


def _load(folder) -> FlowDenoiser:
    return FlowDenoiser(ModelSpec(folder.name, folder), CPU, torch.float32, allow_pickle=False)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = create_tiny_model(tmp_path_factory.mktemp("flow") / "tiny-flux", "flux", seed=0)
    pipe = FluxPipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox in the snow", prompt_2=None, device=CPU)
    return _load(folder), pipe, TextConditioning(prompt_embeds, pooled_prompt_embeds=pooled)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = create_tiny_model(tmp_path_factory.mktemp("flow") / "tiny-sd3", "sd3", seed=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return _load(folder), pipe


def _params(height, width, steps, guidance, scheduler="", strength=1.0, **extra) -> DenoiseParams:
    return DenoiseParams(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                         guidance_rescale=0.0, eta=0.0, seed=SEED, scheduler=scheduler, strength=strength, **extra)


def _run(model: FlowDenoiser, text, params, **kwargs):
    events = []
    output = model.denoise(Job("test", 1), text, params, events.append, **kwargs)
    return output, events


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("height, width, guidance, images", [(128, 128, 3.5, 1), (64, 96, 1.0, 2)])
def test_flux_matches_flux_pipeline(flux, height, width, guidance, images):
    model, pipe, text = flux
    # num_images_per_prompt: the text encoder repeats each encoder's rows (as _get_*_prompt_embeds do).
    text = TextConditioning(text.prompt_embeds.repeat(images, 1, 1),
                            pooled_prompt_embeds=text.pooled_prompt_embeds.repeat(images, 1))
    output, events = _run(model, text, _params(height, width, 2, guidance))
    packed = pipe(prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds, height=height,
                  width=width, num_inference_steps=2, guidance_scale=guidance, generator=_generator(),
                  output_type="latent").images
    expected = FluxPipeline._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    assert list(output.latents.shape) == [images, 16, height, width]  # unpacked; the tiny VAE does not downsample
    assert _max_diff(output.latents, expected) <= TOLERANCE
    assert [e.step for e in events] == [1, 2]


def test_flux_guidance_is_embedded_not_classifier_free(flux):
    model, _, text = flux
    assert not model.do_classifier_free_guidance(3.5)
    low, _ = _run(model, text, _params(64, 64, 1, 1.0))
    high, _ = _run(model, text, _params(64, 64, 1, 3.5))
    assert _max_diff(low.latents, high.latents) > 1e-4  # the guidance embedding changes the prediction


def _init_image(height: int, width: int) -> Image.Image:
    pixels = np.linspace(0, 255, height * width * 3, dtype=np.float32).reshape(height, width, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def _distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the VAE service returns for an image: the unsampled latent distribution (mean, std)."""
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std


def test_flux_image_to_image_matches_flux_img2img_pipeline(flux):
    model, pipe, text = flux
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    height = width = 64
    image = _init_image(height, width)
    vae = pipe.vae
    mean, std = _distribution(vae, img2img.image_processor.preprocess(image, height=height, width=width))
    inputs = ImageInputs(image_mean=mean, image_std=std, scaling_factor=vae.config.scaling_factor,
                         shift_factor=vae.config.shift_factor)
    params = _params(height, width, 4, 3.5, strength=0.6)
    output, events = _run(model, text, params, image=inputs)
    packed = img2img(prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds, image=image,
                     strength=0.6, height=height, width=width, num_inference_steps=4, guidance_scale=3.5,
                     generator=_generator(), output_type="latent").images
    expected = FluxPipeline._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    assert len(events) == 3  # get_timesteps starts at int(4 - 4 * 0.6) = 1
    assert _max_diff(output.latents, expected) <= TOLERANCE
    assert model.work(params, 1, inputs).steps == 3


def test_flux_inpainting_matches_flux_inpaint_pipeline(flux):
    model, pipe, text = flux
    inpaint = FluxInpaintPipeline.from_pipe(pipe)
    height, width = 64, 96
    image = _init_image(height, width)
    mask_image = Image.new("L", (width, height), 0)
    mask_image.paste(255, (16, 8, 64, 40))  # repaint a rectangle, keep the rest
    vae = pipe.vae
    # What the VAE service sends for inpainting: the init image's and the masked image's distributions and the
    # mask at latent size, each preprocessed as the pipeline does.
    init = inpaint.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
    mask = inpaint.mask_processor.preprocess(mask_image, height=height, width=width)
    mean, std = _distribution(vae, init)
    masked_mean, masked_std = _distribution(vae, init * (mask < 0.5))
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    inputs = ImageInputs(image_mean=mean, image_std=std, scaling_factor=vae.config.scaling_factor,
                         shift_factor=vae.config.shift_factor, masked_mean=masked_mean, masked_std=masked_std,
                         mask=torch.nn.functional.interpolate(mask, size=latent_size))
    params = _params(height, width, 3, 3.5, strength=0.9)
    model.check_image_inputs(inputs, params, 1)
    output, events = _run(model, text, params, image=inputs)
    packed = inpaint(prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled_prompt_embeds, image=image,
                     mask_image=mask_image, strength=0.9, height=height, width=width, num_inference_steps=3,
                     guidance_scale=3.5, generator=_generator(), output_type="latent").images
    expected = FluxPipeline._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    assert len(events) == 3
    assert _max_diff(output.latents, expected) <= TOLERANCE
    # Outside the mask the last blend keeps the init image's latent sample (the generator's first draw).
    noise = torch.randn(mean.shape, generator=_generator())
    init_latents = (mean + std * noise - vae.config.shift_factor) * vae.config.scaling_factor
    keep = mask_image.resize(latent_size[::-1]).point(lambda v: v < 128)
    keep = torch.from_numpy(np.array(keep, dtype=bool))
    assert keep.any() and not keep.all()
    assert _max_diff(output.latents[..., keep], init_latents[..., keep]) <= TOLERANCE
    assert _max_diff(output.latents[..., ~keep], init_latents[..., ~keep]) > 1e-3


def test_sd3_image_to_image_matches_sd3_img2img_pipeline(sd3):
    model, pipe = sd3
    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a fox", prompt_2=None, prompt_3=None, device=CPU, do_classifier_free_guidance=True)
    text = TextConditioning(prompt, negative, pooled, negative_pooled)
    image = _init_image(32, 32)
    vae = pipe.vae
    mean, std = _distribution(vae, img2img.image_processor.preprocess(image, height=32, width=32))
    inputs = ImageInputs(image_mean=mean, image_std=std, scaling_factor=vae.config.scaling_factor,
                         shift_factor=vae.config.shift_factor)
    params = _params(32, 32, 3, 7.0, strength=0.7)
    model.check_image_inputs(inputs, params, 1)
    output, events = _run(model, text, params, image=inputs)
    expected = img2img(prompt_embeds=prompt, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                       negative_pooled_prompt_embeds=negative_pooled, image=image, strength=0.7,
                       num_inference_steps=3, guidance_scale=7.0, generator=_generator(), output_type="latent").images
    assert len(events) == model.work(params, 1, inputs).steps == 3  # int(3 - 2.1) = 0: all three
    assert _max_diff(output.latents, expected) <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["", "FlowMatchHeunDiscreteScheduler"])
def test_sd3_with_guidance_matches_sd3_pipeline(sd3, scheduler):
    model, pipe = sd3
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red fox in the snow", prompt_2=None, prompt_3=None, negative_prompt="blurry", device=CPU,
        num_images_per_prompt=2, do_classifier_free_guidance=True)
    text = TextConditioning(prompt, negative, pooled, negative_pooled)
    assert model.do_classifier_free_guidance(7.0)
    model.check_text(text, True, 16)
    output, _ = _run(model, text, _params(32, 32, 2, 7.0, scheduler))
    if scheduler:
        pipe = StableDiffusion3Pipeline.from_pipe(
            pipe, scheduler=FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config))
    expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled, height=32, width=32, num_inference_steps=2,
                    guidance_scale=7.0, generator=_generator(), output_type="latent").images
    assert list(output.latents.shape) == [2, 16, 32, 32]
    assert _max_diff(output.latents, expected) <= TOLERANCE
    assert output.scheduler == (scheduler or "FlowMatchEulerDiscreteScheduler")


def _resume_after_first_step(model, text, params):
    full, events = _run(model, text, params, include_checkpoints=True)
    assert all(e.checkpoint is not None for e in events)
    # As on failover: the checkpoint travels as a proto to another replica, which rebuilds the run and resumes.
    taken = checkpoints.from_proto(checkpoints.to_proto(events[0].checkpoint))
    resumed, rest = _run(model, text, params, resume_from=taken)
    assert [e.step for e in rest] == [e.step for e in events[1:]]
    return full, resumed, taken


def test_flux_resumes_from_a_checkpoint_bit_identically(flux):
    model, _, text = flux
    full, resumed, taken = _resume_after_first_step(model, text, _params(64, 96, 3, 3.5))
    assert list(taken.latents.shape) == [1, 16, 64, 96]  # unpacked, as results (the loop packs them again)
    assert torch.equal(resumed.latents, full.latents)


def test_sd3_resumes_a_heun_run_bit_identically(sd3):
    model, pipe = sd3
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a fox", prompt_2=None, prompt_3=None, device=CPU, do_classifier_free_guidance=True)
    text = TextConditioning(prompt, negative, pooled, negative_pooled)
    # Heun's state between its two half steps (sample, dt, derivative) is in the checkpoint.
    full, resumed, taken = _resume_after_first_step(model, text, _params(32, 32, 2, 7.0,
                                                                         "FlowMatchHeunDiscreteScheduler"))
    assert "sample" in taken.attributes_json
    assert torch.equal(resumed.latents, full.latents)


def test_a_checkpoint_of_another_run_is_refused(flux):
    model, _, text = flux
    _, events = _run(model, text, _params(64, 64, 3, 3.5), include_checkpoints=True)
    with pytest.raises(InvalidArgument) as refused:
        _run(model, text, _params(64, 96, 3, 3.5), resume_from=events[0].checkpoint)
    assert refused.value.reason == "CHECKPOINT_MISMATCH"


def test_a_cancelled_flux_job_stops_within_a_step(flux, record_property):
    model, _, text = flux
    # One step at 256x256: about 15 s on one idle core (attention over 16384 image + 512 text tokens), so only the
    # hooks between the transformer's layers and attention slices can end it early (interrupt.py).
    job = Job("cancel-flux", 1)
    threading.Timer(0.5, job.cancel).start()
    started = time.monotonic()
    with pytest.raises(Cancelled), interrupt.running(job):
        model.denoise(job, text, _params(256, 256, 1, 3.5), lambda event: None)
    late = time.monotonic() - started - 0.5
    record_property("flux_256_step_stops_after_cancel_s", round(late, 3))
    assert job.completed_steps == 0
    assert late < 5.0


def test_describe_and_defaults_follow_the_pipelines(flux, sd3):
    flux_model, sd3_model = flux[0], sd3[0]
    folder = Path(flux[1].config._name_or_path)
    assert isinstance(load_denoiser(ModelSpec("f", folder), CPU, torch.float32, False), FlowDenoiser)
    described = flux_model.describe()
    assert (described.family, described.default_width, described.default_height) == ("flux", 128, 128)
    assert described.guidance_distilled and described.default_guidance_scale == 3.5
    assert list(described.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert described.latent_channels == 16
    # Flux's pipeline passes sigmas and mu to set_timesteps: Heun takes neither.
    assert list(described.schedulers) == ["FlowMatchEulerDiscreteScheduler"]
    described = sd3_model.describe()
    assert (described.family, described.default_width, described.default_guidance_scale) == ("sd3", 32, 7.0)
    assert list(described.schedulers) == ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    assert list(described.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]


@pytest.mark.parametrize("params, image, reason, field", [
    (_params(128, 128, 2, 3.5, denoising_end=0.8), None, "HANDOFF_NOT_SUPPORTED", "denoising_end"),
    (_params(64, 64, 2, 3.5), ImageInputs(latents=torch.zeros(1, 16, 64, 64)), "HANDOFF_NOT_SUPPORTED",
     "image.latents"),
    (_params(64, 64, 2, 3.5), ImageInputs(torch.zeros(1, 16, 64, 64), torch.ones(1, 16, 64, 64), 0.36,
                                          torch.zeros(1, 16, 64, 64), torch.ones(1, 16, 64, 64),
                                          mask=torch.ones(1, 1, 8, 8)), "INVALID_TENSOR", "mask"),
    (_params(64, 64, 2, 3.5), ImageInputs(torch.zeros(1, 4, 64, 64), torch.ones(1, 4, 64, 64), 0.36),
     "INVALID_TENSOR", "image_latents"),
    (_params(64, 64, 2, 3.5, strength=0.0), ImageInputs(torch.zeros(1, 16, 64, 64), torch.ones(1, 16, 64, 64), 0.36),
     "INVALID_STRENGTH", "strength"),
])
def test_flux_refuses_what_it_cannot_run(flux, params, image, reason, field):
    model = flux[0]
    with pytest.raises(InvalidArgument) as refused:
        model.check_image_inputs(image, params, 1)
    assert (refused.value.reason, refused.value.metadata.get("field")) == (reason, field)
    assert "0x" not in str(refused.value)


def test_flux_sizes_are_whole_2x2_patches_of_latent_pixels(flux, tmp_path):
    # A Flux folder whose VAE downsamples 8x, as the real ones (the denoiser reads only vae/config.json's levels).
    folder = Path(shutil.copytree(flux[1].config._name_or_path, tmp_path / "flux-f8"))
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["block_out_channels"] = [4, 4, 4, 4]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    model = _load(folder)
    assert (model.vae_scale_factor, model.default_height, model.default_width) == (8, 1024, 1024)
    model.check_image_inputs(None, _params(1024, 1008, 2, 3.5), 1)
    with pytest.raises(InvalidArgument) as refused:
        model.check_image_inputs(None, _params(1024, 1000, 2, 3.5), 1)  # a multiple of 8, not of 16
    assert (refused.value.reason, refused.value.metadata["field"]) == ("INVALID_SIZE", "width")
    assert "multiple of 16" in refused.value.message


def test_flux_refuses_a_scheduler_its_pipeline_cannot_run_and_sd3_a_missing_negative(flux, sd3):
    model, _, text = flux
    with pytest.raises(InvalidArgument) as refused:
        model.make_scheduler("FlowMatchHeunDiscreteScheduler")
    assert refused.value.reason == "UNKNOWN_SCHEDULER"
    sd3_model, pipe = sd3
    prompt, _, pooled, _ = pipe.encode_prompt("a fox", prompt_2=None, prompt_3=None, device=CPU,
                                              do_classifier_free_guidance=False)
    with pytest.raises(InvalidArgument) as refused:
        sd3_model.check_text(TextConditioning(prompt, pooled_prompt_embeds=pooled), True, 16)
    assert refused.value.reason == "MISSING_NEGATIVE_EMBEDS"
    with pytest.raises(InvalidArgument) as refused:
        sd3_model.check_text(TextConditioning(prompt[..., :8], pooled_prompt_embeds=pooled), False, 16)
    assert refused.value.reason == "INVALID_TEXT_EMBEDDINGS"


def test_sd3_refuses_a_mask(sd3):
    model = sd3[0]
    latents = torch.zeros(1, 16, 32, 32)
    image = ImageInputs(latents, latents + 1, 1.5, latents, latents + 1, torch.ones(1, 1, 32, 32), shift_factor=0.06)
    with pytest.raises(InvalidArgument) as refused:
        model.check_image_inputs(image, _params(32, 32, 2, 7.0, strength=0.8), 1)
    assert (refused.value.reason, refused.value.metadata["field"]) == ("INPAINTING_NOT_SUPPORTED", "image.mask")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sliced_attention_of_the_transformers_changes_no_result(request, monkeypatch, family):
    """The interruptible copies of JointAttnProcessor2_0 (SD3) and FluxAttnProcessor, sliced into many query
    slices, give the pipeline's unhooked transformer's output."""
    model, pipe = request.getfixturevalue(family)[:2]
    assert model.transformer is not pipe.transformer
    torch.manual_seed(0)
    if family == "flux":
        latents, ids = torch.randn(1, 256, 64), FluxPipeline._prepare_latent_image_ids(1, 16, 16, CPU, torch.float32)
        inputs = dict(hidden_states=latents, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 20, 32),
                      txt_ids=torch.zeros(20, 3), img_ids=ids)
    else:
        inputs = dict(hidden_states=torch.randn(2, 16, 32, 32), timestep=torch.tensor([500.0, 500.0]),
                      encoder_hidden_states=torch.randn(2, 20, 32), pooled_projections=torch.randn(2, 64))
    checks = []
    real_check = interrupt.check
    monkeypatch.setattr(interrupt, "check", lambda: checks.append(1) or real_check())
    with torch.inference_mode():
        expected = pipe.transformer(**inputs, return_dict=False)[0]
        whole = model.transformer(**inputs, return_dict=False)[0]
        unsliced_checks = len(checks)
        monkeypatch.setattr(interrupt, "CPU_SLICE_UNITS", 2 ** 14)  # a few queries per slice
        sliced = model.transformer(**inputs, return_dict=False)[0]
    assert len(checks) - unsliced_checks > 2 * unsliced_checks  # the slices checked the job
    assert _max_diff(whole, expected) <= TOLERANCE
    assert _max_diff(sliced, expected) <= TOLERANCE
