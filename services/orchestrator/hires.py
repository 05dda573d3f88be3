"""Hires fix (AUTOMATIC1111's txt2img "Hires. fix"): the request's size is the first pass; its latents are
upscaled (latent modes: resized by the denoiser with torch.nn.functional.interpolate, as A1111 does; pixel modes:
decoded by the VAE, resized with PIL, encoded again) and denoised again at the larger size as image-to-image with
the hires fix's own denoising strength, steps and, optionally, sampler.

The second pass is a second Denoise with the same text conditioning and seed: like two diffusers pipeline calls,
each pass draws from its own torch.Generator("cpu") seeded with the job's seed (A1111 too starts a fresh random
generator from the same seeds for the second pass). A latent-mode pass equals StableDiffusionImg2ImgPipeline called
with the upscaled latents as its image; a pixel-mode pass equals it called with the resized PIL image.

ControlNet units apply in the second pass too, each control image resized to the hires size, as the
sd-webui-controlnet extension does (StableDiffusionControlNetPipeline, then StableDiffusionControlNetImg2ImgPipeline
with the same control image). With an SDXL refiner, hires_refiner.py decides which passes it takes over in.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

from PIL import Image

from latentwire.client import hires as upscalers
from latentwire.client import hires_refiner, samplers
from latentwire.common.v1 import model_pb2
from latentwire.denoiser.v1 import denoiser_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.limits import check_size, check_steps, check_strength

from . import upscale_models

#: Largest hires scale accepted (AUTOMATIC1111's slider goes to 4).
MAX_SCALE = 8.0


@dataclass(frozen=True)
class HiresParams:
    """A request's hires fix with its defaults filled."""

    #: Upscaler name as latentwire.client.hires spells it ("Latent", "Lanczos", ...).
    upscaler: str
    #: Upscale factor; 0 when resize_width / resize_height give the size.
    scale: float
    resize_width: int
    resize_height: int
    #: Second-pass steps; 0: the first pass's.
    steps: int
    denoising_strength: float
    #: Second-pass sampler by table name; "": the first pass's sampler or scheduler.
    sampler: str = ""
    #: With a refiner: the pass it takes over in (latentwire.client.hires_refiner's name); "": no refiner.
    refiner_pass: str = ""

    @property
    def latent(self) -> bool:
        return upscalers.find_latent_upscaler(self.upscaler) is not None

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size in pixels, for a first pass of ``width`` x ``height``."""
        return upscalers.target_size(width, height, self.scale, self.resize_width, self.resize_height)

    def second_pass_steps(self, first_pass_steps: int) -> int:
        """Steps the second pass runs: the last denoising_strength share of its schedule (diffusers'
        get_timesteps)."""
        steps = self.steps or first_pass_steps
        return min(int(steps * self.denoising_strength), steps)

    def to_proto(self) -> orchestrator_pb2.HiresFix:
        return orchestrator_pb2.HiresFix(upscaler=self.upscaler, scale=self.scale, resize_width=self.resize_width,
                                         resize_height=self.resize_height, steps=self.steps,
                                         denoising_strength=self.denoising_strength, sampler=self.sampler,
                                         refiner_pass=hires_refiner.to_proto(self.refiner_pass))


def resolve_hires(request: orchestrator_pb2.GenerateRequest, *, steps: int, num_images: int,
                  max_image_size: int, max_steps: int) -> HiresParams | None:
    """The request's hires fix checked, defaults filled; None without one."""
    if not request.HasField("hires"):
        return None
    from .request import resolve_sampler  # request.py imports this module

    fix = request.hires
    upscaler = upscalers.canonical_upscaler(fix.upscaler)
    if upscaler is None:  # a registry upscaler model, checked and pinned at acceptance (upscale_models.py)
        if not upscale_models.is_model_reference(fix.upscaler):
            raise upscale_models.unknown(fix.upscaler)
        upscaler = fix.upscaler.strip()
    if request.init_image:
        raise InvalidArgument("hires fix is a text-to-image feature (AUTOMATIC1111 has none in img2img); this "
                              "request has an init image: drop hires, or the init image and strength",
                              reason="HIRES_NOT_COMBINABLE", metadata={"field": "hires"})
    if request.controlnets and request.refiner.name:
        raise InvalidArgument("hires fix with ControlNets runs without a refiner (the refiner takes no ControlNet); "
                              "drop the refiner, the ControlNets or hires", reason="HIRES_NOT_COMBINABLE",
                              metadata={"field": "hires"})
    refiner_pass = _refiner_pass(request)
    for name, value in (("hires.resize_width", fix.resize_width), ("hires.resize_height", fix.resize_height)):
        if value:
            check_size(name, value, max_image_size)
    resized = bool(fix.resize_width or fix.resize_height)
    scale = fix.scale
    if resized and scale:
        raise InvalidArgument("hires.scale and hires.resize_width / resize_height are both set; give a scale or a "
                              "size", reason="INVALID_HIRES_SIZE", metadata={"field": "hires.scale"})
    if not resized:
        scale = scale or upscalers.DEFAULT_SCALE
        if not math.isfinite(scale) or not 1.0 <= scale <= MAX_SCALE:
            raise InvalidArgument(f"hires.scale is {scale:g}; use 1 to {MAX_SCALE:g}", reason="INVALID_HIRES_SIZE",
                                  metadata={"field": "hires.scale"})
    if fix.steps:
        check_steps(fix.steps, max_steps)
    second_steps = fix.steps or steps
    strength = (fix.denoising_strength if fix.HasField("denoising_strength")
                else upscalers.DEFAULT_DENOISING_STRENGTH)
    check_strength(strength, second_steps)
    if not upscalers.find_latent_upscaler(upscaler) and num_images > 1:
        raise InvalidArgument(f"hires upscaler {upscaler} works on one image at a time; set num_images to 1 (use "
                              "batch_count for more images) or a latent upscaler", reason="HIRES_NOT_COMBINABLE",
                              metadata={"field": "num_images"})
    sampler = resolve_sampler(fix.sampler, "", "")[0] if fix.sampler else ""
    params = HiresParams(upscaler, 0.0 if resized else scale, fix.resize_width, fix.resize_height, fix.steps,
                         strength, sampler, refiner_pass)
    if request.width and request.height:
        for name, value in zip(("width", "height"), params.target(request.width, request.height)):
            check_size(f"hires {name}", value, max_image_size)
    return params


def infotext_fields(fix: HiresParams) -> list[str]:
    """The hires fix in AUTOMATIC1111's infotext ("Denoising strength" comes first, as A1111 writes it)."""
    fields = [f"Denoising strength: {fix.denoising_strength:g}"]
    if fix.resize_width or fix.resize_height:
        fields.append(f"Hires resize: {fix.resize_width}x{fix.resize_height}")
    else:
        fields.append(f"Hires upscale: {fix.scale:g}")
    if fix.steps:
        fields.append(f"Hires steps: {fix.steps}")
    fields.append(f"Hires upscaler: {fix.upscaler}")
    if fix.sampler:
        fields.append(f"Hires sampler: {fix.sampler}")
    if fix.refiner_pass and fix.refiner_pass != hires_refiner.DEFAULT:  # A1111 leaves its default out
        fields.append(f"Hires refiner: {fix.refiner_pass}")
    return fields


def _refiner_pass(request: orchestrator_pb2.GenerateRequest) -> str:
    """The request's hires.refiner_pass by name ("" without a refiner)."""
    value = request.hires.refiner_pass
    if not request.refiner.name:
        if value:
            raise InvalidArgument("hires.refiner_pass is set without refiner; name the refiner model to hand off to "
                                  "or leave it unset", reason="MISSING_REFINER",
                                  metadata={"field": "hires.refiner_pass"})
        return ""
    name = hires_refiner.from_proto(value)
    if name is None:
        raise InvalidArgument(f"hires.refiner_pass is {value}, not a HiresRefinerPass value; use one of "
                              f"{', '.join(hires_refiner.names())}", reason="INVALID_HIRES_REFINER_PASS",
                              metadata={"field": "hires.refiner_pass"})
    return name


def check_controlnets_fit(params, family: str) -> None:
    """Hires fix with ControlNets runs the units in an image-to-image second pass, which the denoiser does for
    SD 1.x/2.x only: refused before the first pass for another family."""
    if params.hires is not None and params.controlnets and family != "sd":
        raise FailedPrecondition(f"hires fix with ControlNets runs on SD 1.x/2.x models; this model is of family "
                                 f"{family}: drop hires or the ControlNets", reason="CONTROLNET_NOT_SUPPORTED",
                                 metadata={"field": "hires"})


def progress_tail(params) -> float:
    """The second pass's steps as a share of the first pass's (the total shown while the first pass runs)."""
    return params.hires.second_pass_steps(params.num_inference_steps) / params.num_inference_steps


async def second_pass(replicas, params, described: denoiser_pb2.DescribeModelResponse,
                      base: denoiser_pb2.DenoiseResult, encoded, guidance: float, job, progress, *,
                      run_on: str = "", stage: str = "denoiser", denoising_end: float = 0.0):
    """Upscale the first pass's ``base`` result and denoise it again at the hires size; yields step events, then
    the second pass's DenoiseResult. ``encoded``: the first pass's text conditioning (reused as it is).

    With an SDXL refiner (hires_refiner.py): ``run_on`` names the model that runs the pass (and whose VAE a pixel
    upscale uses; default: the job's model) on the job's ``stage`` replica, and ``denoising_end`` stops it there
    for the refiner's hand-off."""
    from . import execution  # execution.py calls this module

    fix = params.hires
    started = time.perf_counter()
    width, height = fix.target(base.width, base.height)
    model = model_pb2.ModelReference(name=run_on or params.model)
    request = execution._denoise_request(params, model, job, encoded, guidance)
    request.height, request.width = height, width
    request.denoising_end = denoising_end
    request.num_inference_steps = fix.steps or params.num_inference_steps
    request.strength = fix.denoising_strength
    if fix.sampler:
        _set_sampler(request, fix.sampler, params.seed, described)
    if fix.latent:
        request.init_latents.CopyFrom(base.latents)
        request.latent_upscaler = fix.upscaler
    else:
        image = await _pixel_upscale(replicas, model, base, width, height, fix.upscaler, job, params)
        request.image.image_latents.CopyFrom(image.image_latents)
    controlnet_models = ()
    if params.controlnets and model.name == params.model:
        # As the sd-webui-controlnet extension: the units apply in the second pass too, each control image
        # resized to the hires size (the ControlNet service resizes it to the request's size).
        request.controlnet.units.extend(params.controlnets)
        request.controlnet.guess_mode = params.guess_mode
        controlnet_models = params.controlnet_models
    progress.start_next_run()
    async for event in execution._denoise(replicas, request, model.name, controlnet_models, job, started, progress,
                                          stage=stage):
        yield event


def _set_sampler(request: denoiser_pb2.DenoiseRequest, name: str, seed: int,
                 described: denoiser_pb2.DescribeModelResponse) -> None:
    """The second pass's own sampler (its Automatic schedule type) on ``request``."""
    sampler = samplers.find_sampler(name)
    if described.family not in sampler.families or sampler.scheduler not in described.schedulers:
        raise InvalidArgument(f"hires sampler {sampler.name} does not fit this model (family {described.family}); "
                              "choose another or leave it empty", reason="SAMPLER_NOT_AVAILABLE",
                              metadata={"sampler": sampler.name, "family": described.family})
    request.scheduler = sampler.scheduler
    request.ClearField("scheduler_options")
    options = samplers.options_of(sampler, samplers.find_schedule_type(samplers.AUTOMATIC), seed=seed)
    if options:
        request.scheduler_options.CopyFrom(samplers.options_to_proto(options))


async def _pixel_upscale(replicas, model, base: denoiser_pb2.DenoiseResult, width: int, height: int, upscaler: str,
                         job, params) -> vae_pb2.EncodeResponse:
    """A pixel-space upscale: the VAE decodes the first pass (8-bit, as a pipeline's output_type="pil"), PIL
    resizes it to ``width`` x ``height`` and the VAE encodes it again as the second pass's init image."""
    from .replicas import call_with_failover

    # The job's seamless tiling and VAE tiling hold for these two calls as for its final decode.
    decode = vae_pb2.DecodeRequest(model=model, latents=base.latents, job_id=job.job_id, tiling=params.tiling,
                                   vae_tiling=params.vae_tiling)
    decoded = await call_with_failover(
        replicas, "vae", lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Decode(
            decode, timeout=replicas.deadline.remaining()))
    if upscaler in upscalers.PIXEL_UPSCALERS:
        png = resize_png(decoded.png_images[0], width, height, upscaler)
    else:  # a registry upscaler model, run on the VAE stage
        png = await upscale_models.upscale_png(replicas, decoded.png_images[0], width, height, upscaler, job)
    encode = vae_pb2.EncodeRequest(model=model, image=png, width=width, height=height, job_id=job.job_id,
                                   tiling=params.tiling, vae_tiling=params.vae_tiling)
    return await call_with_failover(
        replicas, "vae", lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Encode(
            encode, timeout=replicas.deadline.remaining()))


def resize_png(png: bytes, width: int, height: int, upscaler: str) -> bytes:
    """An image resized with the pixel upscaler's PIL filter, as PNG bytes (lossless, so the VAE sees exactly the
    resized pixels)."""
    resample = getattr(Image.Resampling, upscalers.PIXEL_UPSCALERS[upscaler])
    with Image.open(io.BytesIO(png)) as image:
        resized = image.convert("RGB").resize((width, height), resample=resample)
    out = io.BytesIO()
    resized.save(out, format="PNG")
    return out.getvalue()
