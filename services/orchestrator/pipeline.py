"""Generation across the stage services: validate, encode text (and the init image), denoise (streamed), decode.

The orchestrator holds no model. It checks a request against its limits, then calls the text
encoder and, for image-to-image and inpainting, the VAE's Encode (both at once), the denoiser
(a server stream it relays step by step) and the VAE's Decode, passing the caller's remaining
deadline on to each stage. ControlNets run on the ControlNet service, which the denoiser
streams with directly: the orchestrator only tells it where that service is.
"""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from latentwire.common.v1 import loader_pb2, loader_pb2_grpc, model_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
from latentwire.services.runtime import images
from latentwire.services.runtime.errors import FailedPrecondition, InvalidArgument, from_rpc_error
from latentwire.services.runtime.jobs import Job
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc


@dataclass(frozen=True)
class GenerateParams:
    """A request with defaults filled in and limits checked."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    width: int
    height: int
    num_images: int
    scheduler: str
    include_pixels: bool
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float = 1.0
    controlnets: tuple[controlnet_pb2.ControlNetUnit, ...] = ()
    guess_mode: bool = False

    @property
    def mode(self) -> str:
        """"text-to-image", "image-to-image" or "inpainting"."""
        if self.mask_image:
            return "inpainting"
        return "image-to-image" if self.init_image else "text-to-image"


#: Default strength without one in the request, as diffusers' pipelines default.
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpainting": 1.0}


def resolve_request(request: orchestrator_pb2.GenerateRequest, limits) -> GenerateParams:
    """Fill defaults and refuse, before any work starts, what breaks a limit."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt is empty; describe the image to generate", reason="EMPTY_PROMPT")
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{name} is {len(text)} characters; at most {limits.max_prompt_chars} are accepted",
                reason="PROMPT_TOO_LONG",
            )
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else limits.default_steps
    if steps < 1 or steps > limits.max_steps:
        raise InvalidArgument(f"num_inference_steps is {steps}; use 1 to {limits.max_steps}", reason="INVALID_STEPS")
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 0 or value % 8 != 0:
            raise InvalidArgument(
                f"{name} is {value}; use a positive multiple of 8 pixels (or 0 for the model's default)",
                reason="INVALID_SIZE",
            )
        if value > limits.max_image_size:
            raise InvalidArgument(
                f"{name} is {value} pixels; at most {limits.max_image_size} are accepted", reason="IMAGE_TOO_LARGE"
            )
    num_images = request.num_images or 1
    if num_images < 1 or num_images > limits.max_images:
        raise InvalidArgument(f"num_images is {num_images}; use 1 to {limits.max_images}", reason="INVALID_NUM_IMAGES")
    guidance = request.guidance_scale if request.HasField("guidance_scale") else limits.default_guidance_scale
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise InvalidArgument(f"guidance_scale is {guidance}; use a value from 0 to 100")
    if not math.isfinite(request.guidance_rescale) or not 0 <= request.guidance_rescale <= 1:
        raise InvalidArgument(f"guidance_rescale is {request.guidance_rescale}; use a value from 0 to 1")
    if not math.isfinite(request.eta) or not 0 <= request.eta <= 1:
        raise InvalidArgument(f"eta is {request.eta}; use a value from 0 to 1")
    width, height = request.width, request.height
    size_source = _check_images(request, limits)
    if size_source is not None:
        # As A1111 does: without an explicit size the output takes the init (or first control) image's size.
        width = width or size_source[0] // 8 * 8
        height = height or size_source[1] // 8 * 8
        for name, value in (("width", width), ("height", height)):
            if value < 8 or value > limits.max_image_size:
                raise InvalidArgument(
                    f"the output would be {value} pixels {name}; use 8 to {limits.max_image_size} (set {name} "
                    "or send a smaller image)", reason="IMAGE_TOO_LARGE" if value > 8 else "IMAGE_TOO_SMALL")
    strength = 1.0
    if request.init_image:
        mode = "inpainting" if request.mask_image else "image-to-image"
        strength = request.strength if request.HasField("strength") else DEFAULT_STRENGTH[mode]
        if not math.isfinite(strength) or not 0 <= strength <= 1:
            raise InvalidArgument(f"strength is {strength}; use a value from 0 to 1", reason="INVALID_STRENGTH")
        if min(int(steps * strength), steps) < 1:
            raise InvalidArgument(
                f"strength {strength:g} with {steps} steps leaves no step to run; raise the strength or the steps "
                "so that strength x steps is at least 1", reason="INVALID_STRENGTH")
    elif request.HasField("strength"):
        raise InvalidArgument("strength is set without init_image; send the image to start from",
                              reason="MISSING_INIT_IMAGE")
    controlnets = tuple(_resolve_unit(i, unit, limits) for i, unit in enumerate(request.controlnets))
    return GenerateParams(
        model=request.model.name or limits.default_model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed if request.HasField("seed") else secrets.randbelow(2**32),
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_rescale=request.guidance_rescale,
        eta=request.eta,
        width=width,
        height=height,
        num_images=num_images,
        scheduler=request.scheduler,
        include_pixels=request.include_pixels,
        init_image=request.init_image,
        mask_image=request.mask_image,
        strength=strength,
        controlnets=controlnets,
        guess_mode=request.guess_mode,
    )


def _check_images(request: orchestrator_pb2.GenerateRequest, limits) -> tuple[int, int] | None:
    """Decode every image once to refuse a bad one before any stage works; return the size the output
    defaults to (init image, else first control image), or None for text-to-image."""
    max_pixels = limits.max_input_pixels
    if request.mask_image and not request.init_image:
        raise InvalidArgument("mask_image is set without init_image; inpainting needs the image to repaint",
                              reason="MISSING_INIT_IMAGE")
    size = None
    if request.init_image:
        init = images.decode_image(request.init_image, "init_image", max_pixels=max_pixels)
        size = init.size
        if request.mask_image:
            mask = images.decode_image(request.mask_image, "mask_image", max_pixels=max_pixels)
            if mask.size != init.size:
                raise InvalidArgument(
                    f"mask_image is {mask.width}x{mask.height} pixels but init_image is {init.width}x{init.height}; "
                    "send a mask of the init image's size", reason="MASK_SIZE_MISMATCH",
                    metadata={"field": "mask_image"})
    for i, unit in enumerate(request.controlnets):
        control = images.decode_image(unit.image, f"controlnets[{i}].image", max_pixels=max_pixels)
        size = size or control.size
    return size


def _resolve_unit(index: int, unit: controlnet_pb2.ControlNetUnit, limits) -> controlnet_pb2.ControlNetUnit:
    """Check one ControlNet unit's numbers and fill its defaults (scale 1, start 0, end 1, preprocessor "none")."""
    field = f"controlnets[{index}]"
    if not limits.controlnet_address:
        raise FailedPrecondition(
            "this orchestrator has no ControlNet service; start one and pass --controlnet-address",
            reason="CONTROLNET_NOT_CONFIGURED")
    if index >= limits.max_controlnets:
        raise InvalidArgument(f"at most {limits.max_controlnets} ControlNets per request are accepted",
                              reason="TOO_MANY_CONTROLNETS")
    resolved = controlnet_pb2.ControlNetUnit()
    resolved.CopyFrom(unit)
    scale = unit.conditioning_scale if unit.HasField("conditioning_scale") else 1.0
    start = unit.guidance_start if unit.HasField("guidance_start") else 0.0
    end = unit.guidance_end if unit.HasField("guidance_end") else 1.0
    if not math.isfinite(scale) or not 0 <= scale <= 10:
        raise InvalidArgument(f"{field}.conditioning_scale is {scale}; use a value from 0 to 10",
                              reason="INVALID_CONTROLNET", metadata={"field": f"{field}.conditioning_scale"})
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= 1):
        raise InvalidArgument(
            f"{field}: guidance_start {start:g} and guidance_end {end:g} must satisfy 0 <= start < end <= 1",
            reason="INVALID_CONTROLNET", metadata={"field": f"{field}.guidance_start"})
    resolved.conditioning_scale, resolved.guidance_start, resolved.guidance_end = scale, start, end
    resolved.preprocessor = unit.preprocessor or "none"
    return resolved


def infotext(params: GenerateParams, *, model: str, scheduler: str, width: int, height: int, index: int) -> str:
    """Generation settings in AUTOMATIC1111's PNG "parameters" format, which many tools read."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = [
        f"Steps: {params.num_inference_steps}",
        f"Sampler: {scheduler}",
        f"CFG scale: {params.guidance_scale:g}",
        f"Seed: {params.seed}",
        f"Size: {width}x{height}",
        f"Model: {model or 'default'}",
    ]
    if params.init_image:
        settings.append(f"Denoising strength: {params.strength:g}")
    if params.num_images > 1:
        settings += [f"Batch size: {params.num_images}", f"Batch pos: {index}"]
    for i, unit in enumerate(params.controlnets):
        settings.append(
            f'ControlNet {i}: "Module: {unit.preprocessor}, Model: {unit.model.name or "default"}, '
            f'Weight: {unit.conditioning_scale:g}, Guidance Start: {unit.guidance_start:g}, '
            f'Guidance End: {unit.guidance_end:g}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


class Stages:
    """Stubs for the three stage services and, when configured, the model registry and the ControlNet service."""

    def __init__(self, text_encoder: grpc.aio.Channel, denoiser: grpc.aio.Channel, vae: grpc.aio.Channel,
                 registry: grpc.aio.Channel | None = None, controlnet: grpc.aio.Channel | None = None,
                 controlnet_address: str = ""):
        self.text_encoder = text_encoder_pb2_grpc.TextEncoderServiceStub(text_encoder)
        self.denoiser = denoiser_pb2_grpc.DenoiserServiceStub(denoiser)
        self.vae = vae_pb2_grpc.VaeServiceStub(vae)
        self.loaders = {
            "text_encoder": loader_pb2_grpc.ModelLoaderServiceStub(text_encoder),
            "denoiser": loader_pb2_grpc.ModelLoaderServiceStub(denoiser),
            "vae": loader_pb2_grpc.ModelLoaderServiceStub(vae),
        }
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry) if registry is not None else None
        self.controlnet_loader = (loader_pb2_grpc.ModelLoaderServiceStub(controlnet)
                                  if controlnet is not None else None)
        #: The ControlNet service's address as the denoiser reaches it.
        self.controlnet_address = controlnet_address


async def resolve_model(stages: Stages, name: str, context: grpc.aio.ServicerContext) -> str:
    """Pin a registry reference to one version ("name@VERSION") for the whole job.

    Every stage then loads exactly that version, and moving an alias later does not change a
    job that has started. Without a registry the name passes through unchanged.
    """
    if stages.registry is None or not name:
        return name
    try:
        response = await stages.registry.ResolveModel(
            registry_pb2.ResolveModelRequest(reference=name), timeout=_timeout(context)
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error, "registry") from None
    return f"{response.model_version.model_id}@{response.model_version.version}"


async def load_model_on_stages(
    stages: Stages, model: str, context: grpc.aio.ServicerContext, controlnet_models: tuple[str, ...] = ()
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Ask every stage to have ``model`` (and the ControlNet service its ``controlnet_models``) in memory;
    yield ModelLoading events for stages that had to load one."""
    queue: asyncio.Queue = asyncio.Queue()
    loads = [(stage, stub, model) for stage, stub in stages.loaders.items()]
    loads += [("controlnet", stages.controlnet_loader, name) for name in controlnet_models]

    async def load(stage: str, stub, name: str) -> None:
        request = loader_pb2.LoadModelRequest(model=model_pb2.ModelReference(name=name))
        try:
            async for event in stub.LoadModel(request, timeout=_timeout(context)):
                if event.state == loader_pb2.LOAD_STATE_LOADING:
                    await queue.put(orchestrator_pb2.ModelLoading(stage=stage, model=event.model))
                elif event.state == loader_pb2.LOAD_STATE_READY and event.elapsed_seconds > 0 and loading[stage]:
                    await queue.put(orchestrator_pb2.ModelLoading(
                        stage=stage, model=event.model, done=True, elapsed_seconds=event.elapsed_seconds))
        except grpc.RpcError as error:
            await queue.put(from_rpc_error(error, stage))

    loading = dict.fromkeys([stage for stage, _, _ in loads], False)
    tasks = [asyncio.create_task(load(stage, stub, name)) for stage, stub, name in loads]
    try:
        pending = set(tasks)
        while pending or not queue.empty():
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({getter, *pending}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            if getter not in done:
                getter.cancel()
                continue
            item = getter.result()
            if isinstance(item, Exception):
                raise item
            if not item.done:
                loading[item.stage] = True
            yield orchestrator_pb2.GenerateResponse(model_loading=item)
    finally:
        for task in tasks:
            task.cancel()


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining time, passed on to each stage (Python does not propagate deadlines itself)."""
    return context.time_remaining()


async def run_generation(
    stages: Stages, params: GenerateParams, job: Job, context: grpc.aio.ServicerContext
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Run the stages for one job, yielding progress events and, last, the result."""
    started = time.perf_counter()
    pinned = await resolve_model(stages, params.model, context)
    model = model_pb2.ModelReference(name=pinned)
    units = []
    for unit in params.controlnets:
        pinned_unit = controlnet_pb2.ControlNetUnit()
        pinned_unit.CopyFrom(unit)
        if unit.model.name:
            pinned_unit.model.name = await resolve_model(stages, unit.model.name, context)
        units.append(pinned_unit)
    do_cfg = params.guidance_scale > 1
    yield orchestrator_pb2.GenerateResponse(
        accepted=orchestrator_pb2.JobAccepted(job_id=job.job_id, seed=params.seed, model=pinned)
    )
    controlnet_models = tuple(dict.fromkeys(unit.model.name for unit in units))
    async for event in load_model_on_stages(stages, pinned, context, controlnet_models):
        yield event

    # The text encoder and the VAE's Encode do not depend on each other: run them at once.
    stage_started = time.perf_counter()
    text_task = asyncio.create_task(_encode_text(stages, params, model, do_cfg, job, context))
    image_task = None
    if params.init_image:
        image_task = asyncio.create_task(_encode_image(stages, params, model, job, context))
    try:
        encoded = await text_task
        text_seconds = time.perf_counter() - stage_started
        yield orchestrator_pb2.GenerateResponse(text_encoded=orchestrator_pb2.TextEncoded(elapsed_seconds=text_seconds))
        image = None
        if image_task is not None:
            image = await image_task
            image_seconds = time.perf_counter() - stage_started
            yield orchestrator_pb2.GenerateResponse(
                image_encoded=orchestrator_pb2.ImageEncoded(elapsed_seconds=image_seconds))
    finally:
        for task in (text_task, image_task):
            if task is not None and not task.done():
                task.cancel()

    stage_started = time.perf_counter()
    request = denoiser_pb2.DenoiseRequest(
        model=model,
        job_id=job.job_id,
        prompt_embeds=encoded.prompt_embeds,
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        guidance_rescale=params.guidance_rescale,
        eta=params.eta,
        seed=params.seed,
        scheduler=params.scheduler,
    )
    if encoded.HasField("negative_prompt_embeds"):
        request.negative_prompt_embeds.CopyFrom(encoded.negative_prompt_embeds)
    if image is not None:
        request.height, request.width = image.height, image.width
        request.strength = params.strength
        request.image.image_latents.CopyFrom(image.image_latents)
        if image.HasField("mask"):
            request.image.masked_image_latents.CopyFrom(image.masked_image_latents)
            request.image.mask.CopyFrom(image.mask)
    if units:
        request.controlnet.address = stages.controlnet_address
        request.controlnet.units.extend(units)
        request.controlnet.guess_mode = params.guess_mode
    call = stages.denoiser.Denoise(request, timeout=_timeout(context))
    result = None
    try:
        async for event in call:
            if event.HasField("step"):
                job.completed_steps = event.step.step
                job.total_steps = event.step.total_steps
                yield orchestrator_pb2.GenerateResponse(
                    step=orchestrator_pb2.DenoisingStep(
                        step=event.step.step,
                        total_steps=event.step.total_steps,
                        elapsed_seconds=time.perf_counter() - stage_started,
                    )
                )
            elif event.HasField("result"):
                result = event.result
    except grpc.RpcError as error:
        raise from_rpc_error(error, "denoiser") from None
    finally:
        # The caller went away (or a later step failed): stop the denoiser's loop too.
        if result is None:
            call.cancel()
    if result is None:
        raise from_rpc_error(_NoResult(), "denoiser")
    denoise_seconds = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    texts = [
        infotext(params, model=pinned, scheduler=result.scheduler, width=result.width, height=result.height, index=i)
        for i in range(params.num_images)
    ]
    try:
        decoded = await stages.vae.Decode(
            vae_pb2.DecodeRequest(
                model=model,
                latents=result.latents,
                include_pixels=params.include_pixels,
                png_texts=[vae_pb2.PngText(entries={"parameters": text}) for text in texts],
                job_id=job.job_id,
            ),
            timeout=_timeout(context),
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error, "vae") from None
    vae_seconds = time.perf_counter() - stage_started
    yield orchestrator_pb2.GenerateResponse(decoded=orchestrator_pb2.Decoded(elapsed_seconds=vae_seconds))

    timings = [orchestrator_pb2.StageTiming(stage="text_encoder", seconds=text_seconds)]
    if image is not None:
        timings.append(orchestrator_pb2.StageTiming(stage="vae_encode", seconds=image_seconds))
    timings += [
        orchestrator_pb2.StageTiming(stage="denoiser", seconds=denoise_seconds),
        orchestrator_pb2.StageTiming(stage="vae", seconds=vae_seconds),
    ]
    pngs = list(decoded.png_images)
    response = orchestrator_pb2.GenerateResponse(
        result=orchestrator_pb2.GenerateResult(
            images=[orchestrator_pb2.GeneratedImage(png=png, index=i) for i, png in enumerate(pngs)],
            seed=params.seed,
            timings=timings,
            total_seconds=time.perf_counter() - started,
            model=pinned,
        )
    )
    if decoded.HasField("pixels"):
        response.result.pixels.CopyFrom(decoded.pixels)
    yield response


async def _encode_text(stages: Stages, params: GenerateParams, model, do_cfg: bool, job: Job, context):
    try:
        return await stages.text_encoder.Encode(
            text_encoder_pb2.EncodeRequest(
                model=model,
                prompts=[params.prompt],
                negative_prompts=[params.negative_prompt] if params.negative_prompt else [],
                num_images_per_prompt=params.num_images,
                do_classifier_free_guidance=do_cfg,
                job_id=job.job_id,
            ),
            timeout=_timeout(context),
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error, "text_encoder") from None


async def _encode_image(stages: Stages, params: GenerateParams, model, job: Job, context) -> vae_pb2.EncodeResponse:
    try:
        return await stages.vae.Encode(
            vae_pb2.EncodeRequest(
                model=model,
                image=params.init_image,
                mask_image=params.mask_image,
                width=params.width,
                height=params.height,
                job_id=job.job_id,
            ),
            timeout=_timeout(context),
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error, "vae") from None


class _NoResult(grpc.RpcError):
    """The denoiser's stream ended without latents."""

    def code(self):
        return grpc.StatusCode.INTERNAL

    def details(self):
        return "the denoiser's stream ended without a result"

