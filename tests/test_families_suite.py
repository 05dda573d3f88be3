"""Model families through the running suite equal their diffusers pipelines (issue 12, "Acceptance").

One suite whose stages start on EMPTY caches and fetch every model from a real registry: the tiny SDXL base
(the suite's default model), an SDXL copy whose scheduler uses Karras sigmas, the SDXL refiner, SD3, Flux, SD 1.5,
and the SD 1.5 and SDXL single-file checkpoints (original key layout) converted back into diffusers folders.
Every image is compared, float32 on CPU before PNG quantisation, with the family's own diffusers pipeline on the
same folder, seed and scheduler (torch.Generator("cpu").manual_seed(seed) per pipeline call): max abs difference
at most 1e-5.

- StableDiffusionXLPipeline: the model's defaults (size, guidance 5, scheduler), guidance with a negative prompt,
  no guidance with 2 images, a non-square size, an ancestral, a multistep and a Karras-sigmas scheduler;
- SDXL base + refiner as one job (denoising_end / denoising_start at 0.8) against StableDiffusionXLPipeline then
  StableDiffusionXLImg2ImgPipeline; StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline alone;
- StableDiffusion3Pipeline; FluxPipeline at two sizes and two (distilled) guidance values; FluxImg2ImgPipeline;
- SD3's text encoders split over two text-encoder replicas (CLIP-L + CLIP-G on one, T5 on the other, behind a
  second orchestrator sharing the suite's denoiser and VAE) give the same pixels as one replica holding all three,
  bit for bit, with and without per-encoder pins; the refiner pinned ("refiner") to a second denoiser replica gives
  the pixels of one denoiser running base and refiner, bit for bit;
- single-file SD 1.5 and SDXL checkpoints written from the tiny folders, converted and imported, generate the
  same pixels as the folder they came from, bit for bit;
- three SD3 or Flux jobs at once share the denoiser's transformer forwards (step-level batching, counted by its
  Prometheus histogram) and each image stays within 1e-4 of its solo run.

Flux cancellation and failover: tests/test_families_faults.py.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from latentwire.client import Client
from latentwire.client.client import pixels_from_tensor
from latentwire.client.registry import RegistryClient
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from family_suite import FLUX, REFINER, SD3, SDXL, SDXL_KARRAS, SPLIT
from metrics_helpers import batch_counts
from reference import reference_family_pixels, reference_pixels, reference_sdxl_refined
from test_image_conditioning import init_image, mask_image, pil

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
PROMPT = "a watercolour fox in a birch forest"


@pytest.fixture(scope="module")
def single_files(tiny_family_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny SD 1.5 and SDXL folders written as single-file checkpoints in the original key layout, then
    converted back into diffusers folders (named "tiny-<family>-single") by the registry's converter."""
    from services.registry.single_file import convert_single_file
    from services.tiny_models.single_file import write_original_single_file

    root = tmp_path_factory.mktemp("single-files")
    converted = {}
    for family in ("sd15", "sdxl"):
        folder = tiny_family_models[family]
        checkpoint = write_original_single_file(folder, root / f"tiny-{family}.safetensors")
        converted[family] = convert_single_file(checkpoint, root / "converted" / f"tiny-{family}-single",
                                                config=folder)
    return converted


def generate(address: str, request: orchestrator_pb2.GenerateRequest) -> tuple[str, np.ndarray, list[int]]:
    """Run one Generate call to its result: (job id, float pixels [n, h, w, 3], step numbers seen)."""
    job_id, steps = "", []
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]) as channel:
        for event in orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(request, timeout=300):
            kind = event.WhichOneof("event")
            if kind == "accepted":
                job_id = event.accepted.job_id
            elif kind == "step":
                steps.append(event.step.step)
            elif kind == "result":
                assert event.result.HasField("pixels"), "include_pixels was set"
                return job_id, pixels_from_tensor(event.result.pixels), steps
    raise AssertionError("the stream ended without a result")


def request(prompt: str = PROMPT, **settings) -> orchestrator_pb2.GenerateRequest:
    return Client.build_request(prompt, include_pixels=True, **settings)


def assert_close(pixels: np.ndarray, expected: np.ndarray, case: str) -> None:
    assert pixels.shape == expected.shape, f"{case}: shape {pixels.shape}, expected {expected.shape}"
    difference = float(np.abs(pixels - expected).max())
    assert difference <= TOLERANCE, f"{case}: max abs difference {difference:.3g}"


# ---- SDXL ---------------------------------------------------------------------------------------------------

SDXL_CASES = [
    # (id, model, request settings, reference pipeline call settings)
    ("model-defaults", SDXL, dict(), dict()),  # 64x64, guidance 5, EulerDiscreteScheduler: the model's own
    ("guidance-negative-prompt", SDXL, dict(guidance_scale=6.0, negative_prompt="fog, blur"),
     dict(guidance_scale=6.0, negative_prompt="fog, blur")),
    ("no-guidance-two-images", SDXL, dict(guidance_scale=1.0, num_images=2),
     dict(guidance_scale=1.0, num_images_per_prompt=2)),
    ("ancestral-non-square", SDXL, dict(scheduler="EulerAncestralDiscreteScheduler", width=64, height=48),
     dict(scheduler="EulerAncestralDiscreteScheduler", width=64, height=48)),
    ("dpm-multistep-negative", SDXL, dict(scheduler="DPMSolverMultistepScheduler", negative_prompt="dark"),
     dict(scheduler="DPMSolverMultistepScheduler", negative_prompt="dark")),
    ("karras-sigmas-model", SDXL_KARRAS, dict(negative_prompt="dark"), dict(negative_prompt="dark")),
]


@pytest.mark.parametrize("case_id,model,settings,call", SDXL_CASES, ids=[c[0] for c in SDXL_CASES])
def test_sdxl_text_to_image_equals_diffusers(family_suite, tiny_family_models, case_id, model, settings, call):
    seed, steps = 31, 3
    _, pixels, seen = generate(family_suite.address, request(model=model, seed=seed, steps=steps, **settings))
    folder = tiny_family_models["sdxl-karras" if model == SDXL_KARRAS else "sdxl"]
    expected = reference_family_pixels("StableDiffusionXLPipeline", folder, PROMPT, seed=seed, steps=steps, **call)
    assert_close(pixels, expected, case_id)
    assert seen == list(range(1, steps + 1))


def test_karras_sigmas_change_the_image(tiny_family_models):
    """The Karras-sigmas model is a case of its own: the same weights without them give another image."""
    plain, karras = (reference_family_pixels("StableDiffusionXLPipeline", tiny_family_models[key], PROMPT, seed=31,
                                             steps=3, negative_prompt="dark") for key in ("sdxl", "sdxl-karras"))
    assert float(np.abs(plain - karras).max()) > 1e-3


def test_sdxl_base_then_refiner_equals_diffusers(family_suite, tiny_family_models):
    seed, steps = 17, 5
    generate_request = request(model=SDXL, seed=seed, steps=steps, negative_prompt="fog")
    generate_request.refiner.name = REFINER
    generate_request.refiner_switch_at = 0.8
    _, pixels, _ = generate(family_suite.address, generate_request)
    expected = reference_sdxl_refined(tiny_family_models["sdxl"], tiny_family_models["sdxl-refiner"], PROMPT,
                                      seed=seed, steps=steps, switch_at=0.8, negative_prompt="fog")
    assert_close(pixels, expected, "base + refiner")
    # The refiner did something: the base alone, decoded, is another image.
    base_only = reference_family_pixels("StableDiffusionXLPipeline", tiny_family_models["sdxl"], PROMPT, seed=seed,
                                        steps=steps, negative_prompt="fog")
    assert float(np.abs(base_only - expected).max()) > 1e-3
    # The switch point defaults to 0.8.
    generate_request.ClearField("refiner_switch_at")
    _, default_switch, _ = generate(family_suite.address, generate_request)
    assert np.array_equal(default_switch, pixels)


def test_sdxl_image_to_image_equals_diffusers(family_suite, tiny_family_models):
    seed, steps, image = 23, 5, init_image(64, 64)
    _, pixels, seen = generate(family_suite.address, request(model=SDXL, seed=seed, steps=steps, init_image=image,
                                                             strength=0.6, negative_prompt="blurry"))
    expected = reference_family_pixels("StableDiffusionXLImg2ImgPipeline", tiny_family_models["sdxl"], PROMPT,
                                       seed=seed, steps=steps, image=pil(image), strength=0.6,
                                       negative_prompt="blurry")
    assert_close(pixels, expected, "SDXL image-to-image")
    assert len(seen) == int(steps * 0.6)  # strength x steps, as get_timesteps decides


def test_sdxl_inpainting_equals_diffusers(family_suite, tiny_family_models):
    seed, steps, image, mask = 5, 4, init_image(64, 64), mask_image(64, 64)
    _, pixels, _ = generate(family_suite.address, request(model=SDXL, seed=seed, steps=steps, init_image=image,
                                                          mask_image=mask, strength=0.75, guidance_scale=6.0))
    expected = reference_family_pixels("StableDiffusionXLInpaintPipeline", tiny_family_models["sdxl"], PROMPT,
                                       seed=seed, steps=steps, image=pil(image), mask_image=pil(mask, "L"),
                                       strength=0.75, guidance_scale=6.0, height=64, width=64)
    assert_close(pixels, expected, "SDXL inpainting")


# ---- SD3 and Flux -------------------------------------------------------------------------------------------


def test_sd3_equals_diffusers(family_suite, tiny_family_models):
    seed, steps = 8, 3
    # The model's defaults: 32x32 (the tiny VAE does not downsample), guidance 7, FlowMatchEulerDiscreteScheduler.
    _, pixels, _ = generate(family_suite.address, request(model=SD3, seed=seed, steps=steps, negative_prompt="fog"))
    expected = reference_family_pixels("StableDiffusion3Pipeline", tiny_family_models["sd3"], PROMPT, seed=seed,
                                       steps=steps, negative_prompt="fog")
    assert_close(pixels, expected, "SD3")
    assert pixels.shape == (1, 32, 32, 3)


FLUX_CASES = [
    # (id, width, height, guidance scale sent: None = the model's default, 3.5)
    ("32x32-default-guidance", 32, 32, None),
    ("48x32-guidance-5", 48, 32, 5.0),
]


@pytest.mark.parametrize("case_id,width,height,guidance", FLUX_CASES, ids=[c[0] for c in FLUX_CASES])
def test_flux_equals_diffusers(family_suite, tiny_family_models, case_id, width, height, guidance):
    seed, steps = 12, 3
    _, pixels, seen = generate(family_suite.address, request(model=FLUX, seed=seed, steps=steps, width=width,
                                                             height=height, guidance_scale=guidance))
    expected = reference_family_pixels("FluxPipeline", tiny_family_models["flux"], PROMPT, seed=seed, steps=steps,
                                       width=width, height=height, guidance_scale=3.5 if guidance is None else guidance)
    assert_close(pixels, expected, case_id)
    assert seen == list(range(1, steps + 1))


def test_flux_guidance_is_embedded(tiny_family_models):
    """The two guidance values are two cases: the distilled guidance changes the image."""
    low, high = (reference_family_pixels("FluxPipeline", tiny_family_models["flux"], PROMPT, seed=12, steps=3,
                                         width=32, height=32, guidance_scale=g) for g in (3.5, 5.0))
    assert float(np.abs(low - high).max()) > 1e-4


def test_flux_image_to_image_equals_diffusers(family_suite, tiny_family_models):
    seed, steps, image = 9, 5, init_image(32, 32)
    _, pixels, _ = generate(family_suite.address, request(model=FLUX, seed=seed, steps=steps, init_image=image,
                                                          strength=0.7, width=32, height=32))
    expected = reference_family_pixels("FluxImg2ImgPipeline", tiny_family_models["flux"], PROMPT, seed=seed,
                                       steps=steps, image=pil(image), strength=0.7, width=32, height=32,
                                       guidance_scale=3.5)
    assert_close(pixels, expected, "Flux image-to-image")


# ---- a second orchestrator: text encoders split over two replicas, a second denoiser for the refiner ----------

def weights(cache: Path, model: str) -> list[str]:
    """Weight files a stage's cache holds of version 1 of ``model``, relative to the version's folder."""
    folder = cache / "models" / model / "1"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def _recent_jobs(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    return {job.job_id for job in status.recent_jobs}


@pytest.mark.parametrize("pins", [{}, {"text_encoder": "te-clip", "text_encoder/text_encoder_3": "te-t5"}],
                         ids=["unpinned", "pinned-per-encoder"])
def test_sd3_encoders_split_over_two_replicas_give_the_same_pixels(family_suite, second_orchestrator,
                                                                   tiny_family_models, pins):
    settings = dict(model=SD3, seed=41, steps=3, negative_prompt="fog", num_images=2)
    _, whole, _ = generate(family_suite.address, request(**settings))
    job_id, split, _ = generate(second_orchestrator["orchestrator"].address, request(**settings, stage_devices=pins))
    assert np.array_equal(split, whole), f"max abs difference {float(np.abs(split - whole).max())}"
    # Each replica encoded its own part of this job, and fetched only its own encoders from the registry.
    for device, encoders in SPLIT.items():
        assert job_id in _recent_jobs(second_orchestrator[device].address), f"{device} did not encode the job"
        assert weights(family_suite.root / "second" / "cache" / device, SD3) == [
            f"{encoder}/model.safetensors" for encoder in encoders.split(",")]
    expected = reference_family_pixels("StableDiffusion3Pipeline", tiny_family_models["sd3"], PROMPT, seed=41,
                                       steps=3, negative_prompt="fog", num_images_per_prompt=2)
    assert_close(split, expected, "SD3 split encoders")



def test_refiner_on_another_denoiser_replica_gives_the_same_pixels(family_suite, second_orchestrator):
    """The "refiner" pin sends the refiner run to the second denoiser: the latents cross replicas, the pixels
    equal the suite's (one denoiser for both runs) bit for bit."""
    def refined(address: str, pins: dict[str, str]) -> tuple[str, np.ndarray]:
        generate_request = request(model=SDXL, seed=17, steps=5, negative_prompt="fog", stage_devices=pins)
        generate_request.refiner.name = REFINER
        job_id, pixels, _ = generate(address, generate_request)
        return job_id, pixels

    _, whole = refined(family_suite.address, {})
    job_id, split = refined(second_orchestrator["orchestrator"].address, {"denoiser": "gpu-a", "refiner": "gpu-b"})
    assert np.array_equal(split, whole), f"max abs difference {float(np.abs(split - whole).max())}"
    assert job_id in _recent_jobs(family_suite.services["denoiser"].address), "the base did not run on gpu-a"
    assert job_id in _recent_jobs(second_orchestrator["gpu-b"].address), "the refiner did not run on gpu-b"
    assert weights(family_suite.root / "second" / "cache" / "gpu-b", REFINER) == [
        "unet/diffusion_pytorch_model.safetensors"]

# ---- single-file checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoint_generates_as_its_folder(family_suite, tiny_family_models, single_files, family):
    folder, converted = tiny_family_models[family], single_files[family]
    with RegistryClient(family_suite.services["registry"].address, timeout=120) as registry:
        imported = registry.import_folder(converted, converted.name, aliases=["default"]).model_version
    assert imported.kind == registry_kind(family)
    settings = dict(seed=3, steps=3, guidance_scale=5.0, negative_prompt="fog")
    _, from_folder, _ = generate(family_suite.address, request(model=folder.name, **settings))
    _, from_file, _ = generate(family_suite.address, request(model=converted.name, **settings))
    assert np.array_equal(from_file, from_folder), f"max abs difference {float(np.abs(from_file - from_folder).max())}"
    if family == "sd15":
        expected = reference_pixels(folder, PROMPT, seed=3, steps=3, guidance_scale=5.0, negative_prompt="fog")
    else:
        expected = reference_family_pixels("StableDiffusionXLPipeline", folder, PROMPT, seed=3, steps=3,
                                           guidance_scale=5.0, negative_prompt="fog")
    assert_close(from_file, expected, f"{family} single file")


def registry_kind(family: str) -> int:
    from latentwire.registry.v1 import registry_pb2

    return {"sd15": registry_pb2.MODEL_KIND_STABLE_DIFFUSION,
            "sdxl": registry_pb2.MODEL_KIND_STABLE_DIFFUSION_XL}[family]


# ---- last: what the stages fetched --------------------------------------------------------------------------

UNET, TRANSFORMER, VAE = ("unet/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                          "vae/diffusion_pytorch_model.safetensors")
FETCHED = {
    # model: weights in the text encoder's, the denoiser's and the VAE's cache
    SDXL: (["text_encoder/model.safetensors", "text_encoder_2/model.safetensors"], [UNET], [VAE]),
    REFINER: (["text_encoder_2/model.safetensors"], [UNET], [VAE]),
    SD3: ([f"text_encoder{s}/model.safetensors" for s in ("", "_2", "_3")], [TRANSFORMER], [VAE]),
    FLUX: (["text_encoder/model.safetensors", "text_encoder_2/model.safetensors"], [TRANSFORMER], [VAE]),
}


def test_stages_fetched_only_their_components(family_suite):
    """Run after the tests above (file order): each stage started on an empty cache and fetched from the registry
    only the weights of its own components of each model it ran."""
    cache = family_suite.root / "cache"
    for model, expected in FETCHED.items():
        fetched = tuple(weights(cache / stage, model) for stage in ("text_encoder", "denoiser", "vae"))
        assert fetched == expected, model


# ---- step-level batching of the transformers --------------------------------------------------------------------


@pytest.mark.parametrize("model", [SD3, FLUX])
def test_concurrent_transformer_jobs_share_forwards_and_keep_their_images(family_suite, model):
    """Three jobs of one SD3 or Flux model at once (different seeds, guidance and step counts) share the
    transformer's forwards on the denoiser and each image stays its solo run's (batched kernels round differently:
    1e-4, the step-level batching tolerance).

    The jobs reach the denoiser one after another (each passes the text encoder first), and a tiny Flux step takes
    a few ms: loops of 20 to 32 steps overlap, and a round whose loops still happened not to overlap (a busy
    machine) is run again, up to three rounds; every round's images are checked."""
    import threading

    settings = [dict(seed=31, steps=24, guidance_scale=5.0), dict(seed=32, steps=32, guidance_scale=3.0),
                dict(seed=33, steps=20, guidance_scale=4.0)]
    requests = [request(model=model, width=32, height=32, **s) for s in settings]
    solo = [generate(family_suite.address, r)[1] for r in requests]
    metrics = family_suite.services["denoiser"].metrics_address
    before = batch_counts(metrics)[1]
    for _ in range(3):
        together: dict[int, np.ndarray] = {}
        start = threading.Barrier(len(requests))

        def run(index: int) -> None:
            start.wait()
            together[index] = generate(family_suite.address, requests[index])[1]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert sorted(together) == [0, 1, 2], "a job failed or hung"
        for index, pixels in together.items():
            difference = float(np.abs(pixels - solo[index]).max())
            assert pixels.shape == solo[index].shape and difference <= 1e-4, (index, difference)
        if batch_counts(metrics)[1] > before:
            break
    assert batch_counts(metrics)[1] > before, "no transformer forward held more than one job in three rounds"
