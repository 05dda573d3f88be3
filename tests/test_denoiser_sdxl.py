"""The SDXL denoising loop (services/denoiser/sdxl.py) equals diffusers' SDXL pipelines, and the denoiser service
describes models and refuses conditioning that does not fit them.

In-process first: the loop is loaded from tiny folders and fed what the text encoder and VAE services would send
(each encoder's embeddings from the pipeline's own encode_prompt, split per encoder; the VAE's unsampled latent
distributions), then compared with the pipeline's output_type="latent" run on the same weights, scheduler and seed:
float32 on CPU, max abs difference at most 1e-5. Then a real denoiser server: DescribeModel, a Denoise over gRPC
with text_embeddings, and refusals.
"""
from __future__ import annotations

import json
import shutil

import diffusers
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from latentwire.common.v1 import embeddings_pb2, model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.denoiser import checkpoint as checkpoints
from services.denoiser.conditioning import EncoderParts, combine
from services.denoiser.model import DenoiseParams, ImageInputs, MicroConditioning, load_denoiser
from services.runtime import families, tensors
from services.runtime.config import ModelSpec
from services.runtime.errors import InvalidArgument, error_info_of
from services.runtime.jobs import Job
from services.suite.launcher import start_service, wait_serving
from services.tiny_models import create_tiny_model

TOLERANCE = 1e-5
PROMPT = "a lighthouse on a cliff at dawn"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SDXL base and refiner (seed 0); the base again with use_karras_sigmas in its scheduler config, and
    with a 9-channel inpainting UNet (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("sdxl-models")
    base = create_tiny_model(root / "tiny-sdxl", "sdxl", seed=0)
    refiner = create_tiny_model(root / "tiny-sdxl-refiner", "sdxl-refiner", seed=0)
    karras = shutil.copytree(base, root / "tiny-sdxl-karras")
    config_path = karras / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_karras_sigmas": True}))
    inpainting = shutil.copytree(base, root / "tiny-sdxl-inpainting")
    unet_config = dict(diffusers.UNet2DConditionModel.load_config(inpainting / "unet"), in_channels=9)
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel.from_config(unet_config).save_pretrained(inpainting / "unet")
    return {"base": base, "refiner": refiner, "karras": karras, "inpainting": inpainting}


@pytest.fixture(scope="module")
def denoisers(models):
    return {name: load_denoiser(ModelSpec(name, path), CPU, torch.float32, False) for name, path in models.items()}


_PIPELINES = {}


def pipeline(cls: str, path):
    key = (cls, str(path))
    if key not in _PIPELINES:
        pipe = getattr(diffusers, cls).from_pretrained(path, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def encoder_parts(pipe, num_images: int, cfg: bool, negative_prompt: str | None = None) -> dict[str, EncoderParts]:
    """What the text encoder service sends: the pipeline's encode_prompt, split back into its encoders."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
    if pipe.text_encoder is None:  # the refiner: text_encoder_2 only
        return {"text_encoder_2": EncoderParts(embeds, negative, pooled, negative_pooled)}
    width = pipe.text_encoder.config.hidden_size
    return {
        "text_encoder": EncoderParts(embeds[..., :width], None if negative is None else negative[..., :width]),
        "text_encoder_2": EncoderParts(embeds[..., width:], None if negative is None else negative[..., width:],
                                       pooled, negative_pooled),
    }


def run(denoiser, parts, params: DenoiseParams, image: ImageInputs | None = None, **kwargs):
    do_cfg = denoiser.do_classifier_free_guidance(params.guidance_scale)
    text = combine(denoiser.family, parts, do_cfg)
    denoiser.check_text(text, do_cfg, 16)
    denoiser.check_image_inputs(image, params, text.batch)
    events = []
    output = denoiser.denoise(Job("job", params.num_inference_steps), text, params, events.append, image, **kwargs)
    return output, events


def assert_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape
    difference = float((actual - expected).abs().max())
    assert difference <= TOLERANCE, f"max abs difference {difference}"


def test_families_and_description(denoisers):
    base, refiner = denoisers["base"].describe(), denoisers["refiner"].describe()
    assert (base.family, list(base.text_encoders), base.default_width, base.default_height) == \
        ("sdxl", ["text_encoder", "text_encoder_2"], 64, 64)
    assert base.default_guidance_scale == 5.0 and not base.requires_aesthetics_score and base.latent_channels == 4
    assert (refiner.family, list(refiner.text_encoders), refiner.requires_aesthetics_score) == \
        ("sdxl-refiner", ["text_encoder_2"], True)
    assert "EulerAncestralDiscreteScheduler" in base.schedulers and base.default_scheduler == "EulerDiscreteScheduler"


# (id, model, scheduler, guidance_scale, negative prompt, images, height, width)
BASE_CASES = [
    ("guidance-negative-2-images-non-square", "base", "", 5.0, "blurry, low quality", 2, 64, 96),
    ("no-guidance", "base", "", 1.0, None, 1, 64, 64),
    ("ancestral", "base", "EulerAncestralDiscreteScheduler", 6.0, None, 1, 64, 64),
    ("karras-sigmas", "karras", "", 5.0, None, 1, 64, 64),
    ("dpm-multistep", "base", "DPMSolverMultistepScheduler", 5.0, None, 1, 64, 64),
]


@pytest.mark.parametrize("case", BASE_CASES, ids=[c[0] for c in BASE_CASES])
def test_base_equals_the_pipeline(models, denoisers, case):
    _, model, scheduler, guidance, negative_prompt, images, height, width = case
    pipe = pipeline("StableDiffusionXLPipeline", models[model])
    denoiser = denoisers[model]
    parts = encoder_parts(pipe, images, guidance > 1, negative_prompt)
    params = DenoiseParams(height, width, 3, guidance, 0.0, 0.0, 11, scheduler)
    output, events = run(denoiser, parts, params)
    original = pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        expected = pipe(PROMPT, negative_prompt=negative_prompt, num_images_per_prompt=images, height=height,
                        width=width, num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(11)).images
    finally:
        pipe.scheduler = original
    assert_close(output.latents, expected)
    assert [e.step for e in events] == [1, 2, 3]
    if model == "karras":  # the config's Karras sigmas are used: the plain model's schedule differs
        plain, _ = run(denoisers["base"], parts, params)
        assert not torch.allclose(plain.latents, output.latents)


def test_base_then_refiner_equals_the_ensemble_of_experts(models, denoisers):
    """StableDiffusionXLPipeline(denoising_end=0.8) then StableDiffusionXLImg2ImgPipeline on the refiner
    (denoising_start=0.8, image=the latents), each with its own generator seeded with the job seed."""
    base_pipe = pipeline("StableDiffusionXLPipeline", models["base"])
    refiner_pipe = pipeline("StableDiffusionXLImg2ImgPipeline", models["refiner"])
    steps, seed, guidance = 4, 5, 5.0
    base_params = DenoiseParams(64, 64, steps, guidance, 0.0, 0.0, seed, "", denoising_end=0.8)
    handed, base_events = run(denoisers["base"], encoder_parts(base_pipe, 1, True), base_params)
    refiner_params = DenoiseParams(64, 64, steps, guidance, 0.0, 0.0, seed, "", denoising_start=0.8)
    refined, refiner_events = run(denoisers["refiner"], encoder_parts(refiner_pipe, 1, True), refiner_params,
                                  ImageInputs(latents=handed.latents))

    expected_handed = base_pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, denoising_end=0.8,
                                output_type="latent", generator=torch.Generator("cpu").manual_seed(seed)).images
    expected = refiner_pipe(PROMPT, image=expected_handed, num_inference_steps=steps, guidance_scale=guidance,
                            denoising_start=0.8, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(seed)).images
    assert_close(handed.latents, expected_handed)
    assert_close(refined.latents, expected)
    # The two runs split the schedule: the base stops early, the refiner runs the rest.
    assert 0 < len(base_events) < steps and 0 < len(refiner_events) < steps


def vae_distribution(pipe, pixels: torch.Tensor):
    """What the VAE service's Encode returns: the unsampled latent distribution (mean, std)."""
    with torch.no_grad():
        dist = pipe.vae.encode(pixels.float()).latent_dist
    return dist.mean, dist.std


def test_img2img_equals_the_pipeline(models, denoisers):
    """StableDiffusionXLImg2ImgPipeline alone, 2 images from one init image, on the base (target-size time ids)
    and on the refiner (aesthetic scores, with micro-conditioning given)."""
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    for model, micro in (("base", None), ("refiner", MicroConditioning(aesthetic_score=7.0,
                                                                        negative_aesthetic_score=2.0))):
        pipe = pipeline("StableDiffusionXLImg2ImgPipeline", models[model])
        mean, std = vae_distribution(pipe, pipe.image_processor.preprocess(init))
        image = ImageInputs(mean, std, pipe.vae.config.scaling_factor)
        params = DenoiseParams(64, 64, 4, 5.0, 0.0, 0.0, 3, "", strength=0.6, micro=micro)
        output, events = run(denoisers[model], encoder_parts(pipe, 2, True), params, image)
        extra = {} if micro is None else {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
        expected = pipe(PROMPT, image=init, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
                        num_images_per_prompt=2, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(3), **extra).images
        assert_close(output.latents, expected)
        assert len(events) == 2  # int(4 * 0.6) steps


@pytest.mark.parametrize("model", ["base", "inpainting"])
def test_inpaint_equals_the_pipeline(models, denoisers, model):
    """StableDiffusionXLInpaintPipeline alone: a standard UNet blends the unmasked region back, a 9-channel
    inpainting UNet takes the mask and the masked image's latents."""
    pipe = pipeline("StableDiffusionXLInpaintPipeline", models[model])
    rng = np.random.default_rng(1)
    init = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask_array = np.zeros((64, 64), np.uint8)
    mask_array[16:48, 8:40] = 255
    mask_image = Image.fromarray(mask_array, "L")
    # What the VAE service does for inpainting (the pipeline's preprocessing and prepare_mask_latents).
    pixels = pipe.image_processor.preprocess(init, height=64, width=64).to(torch.float32)
    mask = pipe.mask_processor.preprocess(mask_image, height=64, width=64)
    image_mean, image_std = vae_distribution(pipe, pixels)
    masked_mean, masked_std = vae_distribution(pipe, pixels * (mask < 0.5))
    latent_mask = torch.nn.functional.interpolate(mask, size=(64 // pipe.vae_scale_factor,) * 2)
    image = ImageInputs(image_mean, image_std, pipe.vae.config.scaling_factor, masked_mean, masked_std, latent_mask)
    strength = 0.75 if model == "base" else 1.0
    params = DenoiseParams(64, 64, 4, 5.0, 0.0, 0.0, 9, "", strength=strength)
    output, _ = run(denoisers[model], encoder_parts(pipe, 2, True), params, image)
    expected = pipe(PROMPT, image=init, mask_image=mask_image, strength=strength, num_inference_steps=4,
                    num_images_per_prompt=2, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(9)).images
    assert_close(output.latents, expected)


@pytest.mark.parametrize("handoff", [False, True], ids=["base-ancestral", "refiner-handoff"])
def test_resume_from_a_checkpoint_equals_the_whole_run(models, denoisers, handoff):
    """A run resumed from its mid-run checkpoint (over the wire and back) equals the uninterrupted run bit for bit;
    the ancestral scheduler's generator state travels in the checkpoint."""
    if handoff:
        denoiser = denoisers["refiner"]
        parts = encoder_parts(pipeline("StableDiffusionXLImg2ImgPipeline", models["refiner"]), 2, True)
        latents = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(0))
        params = DenoiseParams(64, 64, 8, 5.0, 0.0, 0.0, 4, "EulerAncestralDiscreteScheduler", denoising_start=0.5)
        image = ImageInputs(latents=latents)
    else:
        denoiser = denoisers["base"]
        parts = encoder_parts(pipeline("StableDiffusionXLPipeline", models["base"]), 2, True)
        params = DenoiseParams(64, 64, 6, 5.0, 0.0, 0.0, 4, "EulerAncestralDiscreteScheduler", denoising_end=0.9)
        image = None
    whole, events = run(denoiser, parts, params, image, include_checkpoints=True)
    total = events[-1].total_steps
    middle = events[total // 2 - 1].checkpoint
    message = denoiser_pb2.DenoiseCheckpoint.FromString(checkpoints.to_proto(middle).SerializeToString())
    resumed, resumed_events = run(denoiser, parts, params, image, resume_from=checkpoints.from_proto(message))
    assert [e.step for e in resumed_events] == list(range(total // 2 + 1, total + 1))
    assert torch.equal(resumed.latents, whole.latents)
    assert not torch.equal(middle.latents, whole.latents)


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess-mode"])
def test_controlnet_equals_the_pipeline(models, denoisers, tmp_path_factory, guess_mode):
    """StableDiffusionXLControlNetPipeline: the loop hands the ControlNet its added conditioning (pooled text
    embeddings and add_time_ids); the residuals come from the ControlNet service's own code, in-process."""
    import io

    from services.controlnet.model import ControlNet, Limits, ResidualsRun, RunSettings, UnitSettings
    from services.tiny_models.controlnet import create_tiny_controlnet

    folder = tmp_path_factory.mktemp("sdxl-controlnet") / "cn"
    if not folder.exists():
        create_tiny_controlnet(folder, family="sdxl", seed=0)
    net = ControlNet(ModelSpec("cn", folder), CPU, torch.float32, False)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[::9, :] = 255
    edges[:, ::7] = 255
    control_image = Image.fromarray(edges)
    buffer = io.BytesIO()
    control_image.save(buffer, format="PNG")

    class Session:
        def __init__(self, run):
            self.run, self.guess_mode = run, run.guess_mode

        def residuals(self, step_index, timestep, sample):
            result = self.run.step(step_index, timestep, sample)
            return None if result is None else (result.down_block_residuals, result.mid_block_residual)

        def close(self, ok):
            pass

    def open_controlnet(*, prompt_embeds, batch_size, classifier_free_guidance, total_steps, add_text_embeds,
                        add_time_ids):
        settings = RunSettings(units=[UnitSettings(image=buffer.getvalue(), conditioning_scale=0.8,
                                                   guidance_end=0.7)],
                               width=64, height=64, batch_size=batch_size,
                               classifier_free_guidance=classifier_free_guidance, guess_mode=guess_mode,
                               total_steps=total_steps)
        return Session(ResidualsRun(settings, [net], prompt_embeds, Limits(512, 4, 4, 4096 * 4096),
                                    add_text_embeds, add_time_ids))

    base = pipeline("StableDiffusionXLPipeline", models["base"])
    pipe = diffusers.StableDiffusionXLControlNetPipeline(**base.components, controlnet=net.net)
    pipe.set_progress_bar_config(disable=True)
    params = DenoiseParams(64, 64, 3, 5.0, 0.0, 0.0, 17, "")
    output, _ = run(denoisers["base"], encoder_parts(base, 2, True), params, open_controlnet=open_controlnet)
    without, _ = run(denoisers["base"], encoder_parts(base, 2, True), params)
    expected = pipe(PROMPT, image=control_image, controlnet_conditioning_scale=0.8, control_guidance_end=0.7,
                    guess_mode=guess_mode, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator("cpu").manual_seed(17)).images
    assert_close(output.latents, expected)
    assert not torch.allclose(output.latents, without.latents)  # the residuals changed the result


def test_in_process_refusals(models, denoisers):
    base, refiner = denoisers["base"], denoisers["refiner"]
    parts = encoder_parts(pipeline("StableDiffusionXLPipeline", models["base"]), 1, True)
    params = DenoiseParams(64, 64, 3, 5.0, 0.0, 0.0, 1, "")

    def reason(call) -> str:
        with pytest.raises(InvalidArgument) as raised:
            call()
        return raised.value.reason

    assert reason(lambda: combine(families.SDXL, {"text_encoder_2": parts["text_encoder_2"]}, True)) == \
        "INVALID_TEXT_EMBEDDINGS"
    no_negative = {k: EncoderParts(v.prompt_embeds, None, v.pooled_prompt_embeds) for k, v in parts.items()}
    assert reason(lambda: combine(families.SDXL, no_negative, True)) == "MISSING_NEGATIVE_EMBEDS"
    # The refiner's UNet takes text_encoder_2's width only: base embeddings do not fit it.
    assert reason(lambda: refiner.check_text(combine(families.SDXL, parts, True), True, 16)) in (
        "INVALID_TEXT_EMBEDDINGS",)
    assert reason(lambda: refiner.check_image_inputs(None, params, 1)) == "REFINER_NEEDS_IMAGE"
    handoff = ImageInputs(latents=torch.zeros(1, 4, 32, 32))
    assert reason(lambda: base.check_image_inputs(handoff, params, 1)) == "HANDOFF_MISMATCH"
    assert reason(lambda: base.check_image_inputs(
        handoff, DenoiseParams(64, 64, 3, 5.0, 0.0, 0.0, 1, "", denoising_start=0.9, denoising_end=0.5), 1)) == \
        "INVALID_DENOISING_FRACTION"
    assert reason(lambda: base.check_image_inputs(
        ImageInputs(latents=torch.zeros(1, 4, 16, 16)), DenoiseParams(64, 64, 3, 5.0, 0.0, 0.0, 1, "",
                                                                      denoising_start=0.5), 1)) == "INVALID_TENSOR"


# ---- through a real denoiser server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser_server(models, tmp_path_factory):
    """The denoiser service on the tiny SDXL base (default), refiner and an SD 1.5 model, in its own process."""
    sd15 = create_tiny_model(tmp_path_factory.mktemp("sd15") / "tiny-sd15", "sd15", seed=0)
    log_dir = tmp_path_factory.mktemp("denoiser-logs")
    service = start_service("denoiser", "services.denoiser", [
        "--port", "0", "--model", f"sdxl={models['base']}", "--model", f"refiner={models['refiner']}",
        "--model", f"sd15={sd15}"], log_dir=log_dir)
    try:
        wait_serving(service.address, 300, "denoiser", service.process)
        with grpc.insecure_channel(service.address) as channel:
            stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)
            stub.sd15_width = json.loads((sd15 / "unet" / "config.json").read_text())["cross_attention_dim"]
            yield stub
    finally:
        service.process.terminate()
        code = service.process.wait(30)
    assert code == 0, f"the denoiser exited with {code}; log in {log_dir}"


def text_embeddings(parts: dict[str, EncoderParts]) -> list[embeddings_pb2.EncoderEmbeddings]:
    entries = []
    for encoder, part in parts.items():
        fields = {name: tensors.to_proto(value, name) for name, value in vars(part).items() if value is not None}
        entries.append(embeddings_pb2.EncoderEmbeddings(encoder=encoder, **fields))
    return entries


def denoise(stub, **fields):
    responses = list(stub.Denoise(denoiser_pb2.DenoiseRequest(job_id="sdxl-test", **fields), timeout=120))
    return tensors.from_proto(responses[-1].result.latents, field="latents")


def refusal(stub, **fields):
    with pytest.raises(grpc.RpcError) as raised:
        denoise(stub, **fields)
    return raised.value.code(), error_info_of(raised.value).reason, raised.value.details()


def test_describe_model_over_grpc(denoiser_server):
    sdxl = denoiser_server.DescribeModel(denoiser_pb2.DescribeModelRequest(), timeout=60)
    assert (sdxl.family, list(sdxl.text_encoders), sdxl.default_width, sdxl.default_guidance_scale) == \
        ("sdxl", ["text_encoder", "text_encoder_2"], 64, 5.0)
    refiner = denoiser_server.DescribeModel(
        denoiser_pb2.DescribeModelRequest(model=model_pb2.ModelReference(name="refiner")), timeout=60)
    assert (refiner.family, list(refiner.text_encoders), refiner.requires_aesthetics_score) == \
        ("sdxl-refiner", ["text_encoder_2"], True)
    sd15 = denoiser_server.DescribeModel(
        denoiser_pb2.DescribeModelRequest(model=model_pb2.ModelReference(name="sd15")), timeout=60)
    assert (sd15.family, list(sd15.text_encoders), sd15.default_guidance_scale) == ("sd", [], 7.5)


def test_denoise_over_grpc_equals_the_pipeline_and_refusals(models, denoiser_server):
    pipe = pipeline("StableDiffusionXLPipeline", models["base"])
    parts = encoder_parts(pipe, 1, True)
    common = dict(num_inference_steps=2, guidance_scale=5.0, seed=13)
    latents = denoise(denoiser_server, text_embeddings=text_embeddings(parts), **common)
    expected = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(13)).images
    assert_close(latents, expected)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    single = tensors.to_proto(parts["text_encoder"].prompt_embeds, "prompt_embeds")
    code, reason, details = refusal(denoiser_server, prompt_embeds=single, **common)
    assert (code, reason) == (invalid, "INVALID_TEXT_EMBEDDINGS") and "text_embeddings" in details
    code, reason, details = refusal(denoiser_server, text_embeddings=text_embeddings(parts)[1:], **common)
    assert (code, reason) == (invalid, "INVALID_TEXT_EMBEDDINGS") and "lacks encoder text_encoder" in details
    twice = text_embeddings(parts) + text_embeddings(parts)[:1]
    assert refusal(denoiser_server, text_embeddings=twice, **common)[:2] == (invalid, "INVALID_TEXT_EMBEDDINGS")
    code, reason, _ = refusal(denoiser_server, text_embeddings=text_embeddings(parts), denoising_start=0.5, **common)
    assert (code, reason) == (invalid, "HANDOFF_MISMATCH")
    code, reason, _ = refusal(denoiser_server, text_embeddings=text_embeddings(parts), denoising_end=1.5, **common)
    assert (code, reason) == (invalid, "INVALID_DENOISING_FRACTION")
    # An SD 1.5 model takes prompt_embeds, not per-encoder embeddings, and has no hand-off.
    sd15 = model_pb2.ModelReference(name="sd15")
    code, reason, _ = refusal(denoiser_server, model=sd15, text_embeddings=text_embeddings(parts), **common)
    assert (code, reason) == (invalid, "INVALID_TEXT_EMBEDDINGS")
    sd_embeds = tensors.to_proto(torch.zeros(1, 77, denoiser_server.sd15_width), "prompt_embeds")
    code, reason, _ = refusal(denoiser_server, model=sd15, prompt_embeds=sd_embeds, negative_prompt_embeds=sd_embeds,
                              denoising_end=0.5, **common)
    assert (code, reason) == (invalid, "HANDOFF_NOT_SUPPORTED")
    # The refiner continues hand-off latents only.
    refiner = model_pb2.ModelReference(name="refiner")
    refiner_parts = encoder_parts(pipeline("StableDiffusionXLImg2ImgPipeline", models["refiner"]), 1, True)
    code, reason, _ = refusal(denoiser_server, model=refiner, text_embeddings=text_embeddings(refiner_parts), **common)
    assert (code, reason) == (invalid, "REFINER_NEEDS_IMAGE")
    handoff = denoiser_pb2.ImageConditioning(latents=tensors.to_proto(expected, "latents"))
    refined = denoise(denoiser_server, model=refiner, text_embeddings=text_embeddings(refiner_parts), image=handoff,
                      denoising_start=0.5, **common)
    assert refined.shape == expected.shape
