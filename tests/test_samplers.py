"""Samplers and schedule types by their AUTOMATIC1111 / SD.Next names (latentwire.client.samplers).

The table: every name resolves (case-insensitively) to a diffusers class whose __init__ takes every option the
table sets, and builds from a real model's scheduler config; a pre-1.9 combined name equals its sampler plus its
schedule type; unknown names, both sampler and scheduler, and a type a sampler cannot take are refused with
their reasons. Through the running suite (tiny SD 1.5), each sampler name (with one or two schedule types)
equals StableDiffusionPipeline with the scheduler built from the documented options, max abs 1e-5, and writes
A1111's "Sampler: ..., Schedule type: ..." infotext; a flow-matching sampler equals StableDiffusion3Pipeline in
process; a checkpoint resume rebuilds the same scheduler. The CLI lists the table and generates by name.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import subprocess
import sys

import diffusers
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from latentwire.client import LatentwireError, samplers
from reference import _pipeline
from services.orchestrator.request import GenerateParams, check_sampler_fits, resolve_sampler
from services.runtime.errors import InvalidArgument

TOLERANCE = 1e-5
PROMPT = "a lighthouse on a cliff at dusk"
CLI = [sys.executable, "-m", "latentwire.cli.main"]
#: Schedule types that are not the sampler's table name plus nothing.
NAMED_TYPES = [t.name for t in samplers.SCHEDULE_TYPES if t.name != samplers.AUTOMATIC]


def _params(sampler: str, schedule_type: str, seed: int = 5) -> GenerateParams:
    return GenerateParams(model="", prompt="p", negative_prompt="", seed=seed, num_inference_steps=3,
                          guidance_scale=7.5, guidance_rescale=0.0, eta=0.0, width=0, height=0, num_images=1,
                          scheduler="", include_pixels=False, sampler=sampler, schedule_type=schedule_type)


def _choice(name: str, schedule_type: str = "") -> tuple[str, dict]:
    """The scheduler class and options the orchestrator sends for a request's sampler and schedule type."""
    return _params(*resolve_sampler(name, schedule_type, "")).scheduler_choice


# ----------------------------------------------------------------------------------------------
# The table


def test_documented_examples():
    assert _choice("DPM++ 2M Karras") == ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})
    assert _choice("Euler a") == ("EulerAncestralDiscreteScheduler", {})
    assert _choice("euler A") == ("EulerAncestralDiscreteScheduler", {})  # not "Euler" + "a"
    assert _choice("DPM++ 2M SDE", "Exponential") == ("DPMSolverMultistepScheduler", {
        "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_exponential_sigmas": True})
    assert _choice("PLMS") == ("PNDMScheduler", {"skip_prk_steps": True})
    assert _choice("Euler", "SGM Uniform") == ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    # DPM++ SDE's Brownian tree is seeded with the job's seed, as A1111 seeds it.
    assert _params("DPM++ SDE", "Karras", seed=9).scheduler_choice == (
        "DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": 9})
    assert resolve_sampler("", "", "DDIMScheduler") == ("", "")
    assert _params("", "").scheduler_choice == ("", {})


def test_docstring_table_documents_every_sampler():
    rows = {line.split("  ")[0]: line for line in samplers.__doc__.splitlines() if "Scheduler" in line}
    for sampler in samplers.SAMPLERS:
        row = rows[sampler.name]
        assert sampler.scheduler in row.split()
        for option, value in sampler.options:
            assert f"{option}={value!r}".replace("'", '"') in row, (sampler.name, option)


@pytest.fixture(scope="module")
def scheduler_configs(tiny_model, tmp_path_factory):
    """The scheduler config of a diffusion model (tiny SD 1.5, as its pipeline repairs it) and of a flow model."""
    from services.tiny_models import create_tiny_model

    flow = create_tiny_model(tmp_path_factory.mktemp("samplers") / "tiny-sd3", "sd3", seed=0)
    return {False: _pipeline(str(tiny_model)).scheduler.config,
            True: diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(flow, subfolder="scheduler").config}


@pytest.mark.parametrize("sampler", samplers.SAMPLERS, ids=[s.name for s in samplers.SAMPLERS])
def test_every_name_and_schedule_type_builds_its_scheduler(sampler, scheduler_configs):
    cls = getattr(diffusers, sampler.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    assert sampler.families and set(sampler.families) <= {"sd", "sdxl", "sdxl-refiner", "sd3", "flux"}
    for type_name in sampler.schedule_types:
        for name in (sampler.name, sampler.name.upper(), "  " + sampler.name.lower().replace(" ", "   ")):
            assert resolve_sampler(name, type_name.lower(), "") == (sampler.name, type_name)
        scheduler, options = _params(sampler.name, type_name).scheduler_choice
        assert scheduler == sampler.scheduler
        assert set(options) <= set(samplers.OPTION_NAMES)
        # from_config drops unknown options with a warning only: every option must be one the class takes.
        assert all(option in accepted for option in options), (sampler.name, type_name, options)
        built = cls.from_config(scheduler_configs[sampler.flow_matching], **options)
        for option, value in options.items():
            assert built.config[option] == value
        built.set_timesteps(4)
        # What travels to the denoiser comes back the same.
        assert samplers.options_from_proto(samplers.options_to_proto(options)) == options
    # A type the sampler's class has no option for is refused.
    for type_name in set(NAMED_TYPES) - set(sampler.schedule_types):
        with pytest.raises(InvalidArgument) as refused:
            resolve_sampler(sampler.name, type_name, "")
        assert refused.value.reason == "SCHEDULE_TYPE_NOT_AVAILABLE"
        assert all(t in str(refused.value) for t in sampler.schedule_types)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS, ids=[s.name for s in samplers.SAMPLERS])
def test_combined_names_equal_name_plus_type(sampler):
    for type_name in sampler.schedule_types:
        combined = f"{sampler.name} {type_name}"
        assert resolve_sampler(combined, "", "") == resolve_sampler(sampler.name, type_name, "")
        assert resolve_sampler(combined.lower(), type_name.upper(), "") == (sampler.name, type_name)


def test_a1111_pre_1_9_names_resolve():
    # The combined names A1111 1.8 listed that diffusers has a scheduler for.
    for name, expected in [("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
                           ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")),
                           ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
                           ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "Karras")),
                           ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "Karras")),
                           ("DPM++ 3M SDE Exponential", ("DPM++ 3M SDE", "Exponential")),
                           ("DPM2 Karras", ("DPM2", "Karras")), ("DPM2 a Karras", ("DPM2 a", "Karras")),
                           ("LMS Karras", ("LMS", "Karras")), ("Euler a", ("Euler a", "Automatic")),
                           ("DDIM", ("DDIM", "Automatic")), ("PLMS", ("PLMS", "Automatic")),
                           ("UniPC", ("UniPC", "Automatic"))]:
        assert resolve_sampler(name, "", "") == expected, name


@pytest.mark.parametrize("sampler,schedule_type,scheduler,reason,says", [
    ("DPM++ 2M Karrass", "", "", "UNKNOWN_SAMPLER", ["'DPM++ 2M'", "latentwire samplers"]),
    ("Euler b", "", "", "UNKNOWN_SAMPLER", ["'Euler a'"]),
    ("DPM fast", "", "", "UNKNOWN_SAMPLER", ["latentwire samplers"]),  # diffusers has no scheduler for it
    ("DPM++ 2M", "Polyexponential", "", "UNKNOWN_SCHEDULE_TYPE", ["Karras", "SGM Uniform"]),
    ("DPM++ 2M", "", "DDIMScheduler", "SAMPLER_AND_SCHEDULER", ["not both"]),
    ("", "Karras", "", "MISSING_SAMPLER", ["sampler"]),
    ("DPM++ 2M Karras", "Exponential", "", "SCHEDULE_TYPE_CONFLICT", ["Karras", "Exponential"]),
    ("DDIM Karras", "", "", "SCHEDULE_TYPE_NOT_AVAILABLE", ["Automatic", "SGM Uniform"]),
    ("Euler FlowMatch", "Karras", "", "SCHEDULE_TYPE_NOT_AVAILABLE", ["Automatic"]),
])
def test_refusals_name_their_reason(sampler, schedule_type, scheduler, reason, says):
    with pytest.raises(InvalidArgument) as refused:
        resolve_sampler(sampler, schedule_type, scheduler)
    assert refused.value.reason == reason
    assert all(text in str(refused.value) for text in says), str(refused.value)


def test_a_sampler_must_fit_the_model():
    sd_schedulers = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
    check_sampler_fits(_params("DPM++ 2M", "Karras"), "sd", sd_schedulers)
    check_sampler_fits(_params("", ""), "flux", ["FlowMatchEulerDiscreteScheduler"])
    with pytest.raises(InvalidArgument) as refused:
        check_sampler_fits(_params("Euler FlowMatch", "Automatic"), "sd", sd_schedulers)
    assert refused.value.reason == "SAMPLER_NOT_AVAILABLE"
    assert "DPM++ 2M, DPM++ 2M SDE, DPM++ 2M SDE Heun, DPM++ 3M, DPM++ 3M SDE, Euler, DDIM" in str(refused.value)
    with pytest.raises(InvalidArgument) as refused:  # Flux's pipeline cannot run Heun's schedule
        check_sampler_fits(_params("Heun FlowMatch", "Automatic"), "flux",
                           ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
    assert refused.value.reason == "SAMPLER_NOT_AVAILABLE" and "Euler FlowMatch" in str(refused.value)


# ----------------------------------------------------------------------------------------------
# In process: a flow-matching sampler, and a resume that rebuilds the sampler's scheduler


def test_flow_matching_sampler_equals_sd3_pipeline(tmp_path):
    from services.denoiser.conditioning import TextConditioning
    from services.denoiser.model import DenoiseParams, load_denoiser
    from services.runtime.config import ModelSpec
    from services.runtime.jobs import Job
    from services.tiny_models import create_tiny_model

    folder = create_tiny_model(tmp_path / "tiny-sd3", "sd3", seed=0)
    model = load_denoiser(ModelSpec("tiny-sd3", folder), torch.device("cpu"), torch.float32, False)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, prompt_2=None, prompt_3=None, device=torch.device("cpu"), do_classifier_free_guidance=True)
    scheduler, options = _choice("heun flowmatch")
    assert scheduler in model.schedulers
    params = DenoiseParams(height=32, width=32, num_inference_steps=2, guidance_scale=7.0, guidance_rescale=0.0,
                           eta=0.0, seed=3, scheduler=scheduler, scheduler_options=tuple(options.items()))
    output = model.denoise(Job("flow", 1), TextConditioning(prompt, negative, pooled, negative_pooled), params,
                           lambda event: None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
    expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled, height=32, width=32, num_inference_steps=2,
                    guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert output.scheduler == "FlowMatchHeunDiscreteScheduler"
    assert (output.latents - expected).abs().max().item() <= TOLERANCE


def test_resume_rebuilds_the_samplers_scheduler(tiny_model):
    from services.denoiser import checkpoint as checkpoints
    from services.denoiser.conditioning import TextConditioning
    from services.denoiser.model import DenoiseParams, load_denoiser
    from services.runtime.config import ModelSpec
    from services.runtime.jobs import Job

    model = load_denoiser(ModelSpec("tiny-sd", tiny_model), torch.device("cpu"), torch.float32, False)
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    text = TextConditioning(embeds, torch.zeros_like(embeds))
    scheduler, options = _choice("DPM++ 2M SDE Karras")
    size = model.default_height
    params = DenoiseParams(height=size, width=size, num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.0,
                           eta=0.0, seed=11, scheduler=scheduler, scheduler_options=tuple(options.items()))
    events = []
    full = model.denoise(Job("full", 1), text, params, events.append, include_checkpoints=True)
    assert model.make_scheduler(scheduler, params.scheduler_options).config.use_karras_sigmas
    plain = model.denoise(Job("plain", 1), text, dataclasses.replace(params, scheduler_options=()),
                          lambda event: None)
    assert (plain.latents - full.latents).abs().max().item() > 1e-4  # the options change the run
    taken = checkpoints.from_proto(checkpoints.to_proto(events[1].checkpoint))
    resumed = model.denoise(Job("resumed", 1), text, params, lambda event: None, resume_from=taken)
    assert torch.equal(resumed.latents, full.latents)


def test_denoiser_refuses_options_its_scheduler_lacks(tiny_model):
    from services.denoiser.model import load_denoiser
    from services.runtime.config import ModelSpec

    model = load_denoiser(ModelSpec("tiny-sd", tiny_model), torch.device("cpu"), torch.float32, False)
    for options, says in [((("use_karras_sigmas", True),), "has no option use_karras_sigmas"),
                          ((("use_karras_sigmas", True), ("use_beta_sigmas", True)), "at most one sigma schedule"),
                          ((("algorithm_type", "nonsense"),), "'nonsense'")]:
        name = "DDIMScheduler" if "has no option" in says else "DPMSolverMultistepScheduler"
        with pytest.raises(InvalidArgument) as refused:
            model.make_scheduler(name, options)
        assert refused.value.reason == "INVALID_SCHEDULER_OPTIONS"
        assert says in str(refused.value), str(refused.value)


# ----------------------------------------------------------------------------------------------
# Through the running suite


def _reference(tiny_model, scheduler: str, options: dict, *, seed: int, steps: int, guidance: float) -> np.ndarray:
    """StableDiffusionPipeline on the same folder with ``scheduler`` built from its config and ``options``."""
    pipe = _pipeline(str(tiny_model))
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config, **options)
    try:
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(seed)).images
    finally:
        pipe.scheduler = original


#: Each diffusion sampler the tiny SD 1.5 model takes, with one or two schedule types ("" = none named).
SUITE_CASES = [
    ("DPM++ 2M", ""), ("DPM++ 2M Karras", ""), ("DPM++ SDE", "Karras"), ("DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE Heun Karras", ""), ("DPM++ 3M", "Beta"), ("DPM++ 3M SDE", ""), ("Euler a", ""),
    ("Euler a", "SGM Uniform"), ("Euler", "Karras"),
    ("LMS", "Uniform"), ("Heun", ""), ("DPM2", "Karras"), ("DPM2 a", ""), ("DDIM", "SGM Uniform"), ("DDPM", ""),
    ("PLMS", ""), ("UniPC", "Karras"), ("DEIS", ""),
]


@pytest.mark.slow
@pytest.mark.parametrize("sampler,schedule_type", SUITE_CASES, ids=[f"{a}|{b}" for a, b in SUITE_CASES])
def test_sampler_through_suite_equals_diffusers(client, tiny_model, sampler, schedule_type):
    steps = 4 if sampler == "PLMS" else 3  # PNDMScheduler needs 4 (limits.MIN_STEPS_BY_SCHEDULER)
    seed, guidance = 21, 6.0
    result = client.generate(PROMPT, seed=seed, steps=steps, guidance_scale=guidance, sampler=sampler,
                             schedule_type=schedule_type, include_pixels=True)
    name, type_name = resolve_sampler(sampler, schedule_type, "")
    scheduler, options = _params(name, type_name, seed=seed).scheduler_choice
    expected = _reference(tiny_model, scheduler, options, seed=seed, steps=steps, guidance=guidance)
    difference = float(np.abs(result.pixels - expected).max())
    assert difference <= TOLERANCE, f"{sampler} {schedule_type}: max abs difference {difference:.3g}"
    text = Image.open(io.BytesIO(result.images[0])).text["parameters"]
    assert f"Steps: {steps}, Sampler: {name}, Schedule type: {type_name}, CFG scale: 6, Seed: {seed}" in text


@pytest.mark.slow
def test_schedule_types_change_the_image(client):
    """The options reach the denoiser: the same sampler with two schedule types gives different images."""
    images = [client.generate(PROMPT, seed=2, steps=3, sampler="Euler", schedule_type=t, include_pixels=True).pixels
              for t in ("Automatic", "Karras")]
    assert float(np.abs(images[0] - images[1]).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("settings,reason,says", [
    (dict(sampler="DPM++ 2M Karrass"), "UNKNOWN_SAMPLER", ["'DPM++ 2M'", "latentwire samplers"]),
    (dict(sampler="Euler FlowMatch"), "SAMPLER_NOT_AVAILABLE", ["family sd", "DPM++ 2M", "Euler a"]),
    # LCMScheduler is not among those diffusers declares compatible with the tiny model's DDIMScheduler.
    (dict(sampler="LCM"), "SAMPLER_NOT_AVAILABLE", ["DPM++ 2M"]),
    (dict(sampler="Euler", scheduler="DDIMScheduler"), "SAMPLER_AND_SCHEDULER", ["not both"]),
    (dict(sampler="DDIM", schedule_type="Karras"), "SCHEDULE_TYPE_NOT_AVAILABLE", ["SGM Uniform"]),
])
def test_suite_refusals(client, settings, reason, says):
    with pytest.raises(LatentwireError) as refused:
        client.generate(PROMPT, seed=1, steps=3, **settings)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == reason
    assert all(text in str(refused.value) for text in says), str(refused.value)
    if reason == "SAMPLER_NOT_AVAILABLE":
        assert "LCM" not in str(refused.value).split("choose one of")[1]


@pytest.mark.slow
def test_cli_samplers_and_generate_by_sampler(suite, tiny_model, tmp_path):
    listed = subprocess.run([*CLI, "samplers"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "DPM++ 2M: DPMSolverMultistepScheduler (algorithm_type='dpmsolver++', solver_order=2)" in listed.stdout
    assert "Karras: use_karras_sigmas=True" in listed.stdout and "Euler FlowMatch" in listed.stdout
    for_model = subprocess.run([*CLI, "samplers", "--model", "tiny-sd", "--server", suite.address],
                               capture_output=True, text=True, timeout=60)
    assert for_model.returncode == 0, for_model.stderr
    assert "  Euler a: " in for_model.stdout and "FlowMatch" not in for_model.stdout
    assert "  LCM: " not in for_model.stdout

    output, pixels = tmp_path / "lighthouse.png", tmp_path / "pixels.npy"
    generated = subprocess.run(
        [*CLI, "generate", PROMPT, "-o", str(output), "--seed", "8", "--steps", "3", "--guidance", "6",
         "--sampler", "dpm++ 2m", "--schedule-type", "karras", "--server", suite.address, "-q",
         "--save-pixels", str(pixels)], capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    expected = _reference(tiny_model, *_choice("DPM++ 2M Karras"), seed=8, steps=3, guidance=6.0)
    assert float(np.abs(np.load(pixels) - expected).max()) <= TOLERANCE
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in Image.open(output).text["parameters"]
    refused = subprocess.run([*CLI, "generate", PROMPT, "--sampler", "Eulr", "--server", suite.address, "-q",
                              "-o", str(tmp_path / "no.png")], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Euler" in refused.stderr and "Traceback" not in refused.stderr
