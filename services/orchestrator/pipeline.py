"""Generation across the stage services: validate, encode text (and the init image), denoise (streamed), decode.

The orchestrator holds no model. It checks a request against its limits, then calls the text
encoder and, for image-to-image and inpainting, the VAE's Encode (both at once), the denoiser
(a server stream it relays step by step) and the VAE's Decode, passing the caller's remaining
deadline on to each stage. ControlNets run on the ControlNet service, which the denoiser
streams with directly: the orchestrator only tells it where that service is.

Each stage may have several replicas (placement.py). A job picks one healthy replica per stage;
when a call fails because its replica died or was cut off, the job goes on with another one:
text encoder and VAE calls are simply repeated, and the denoiser resumes from the checkpoint it
streamed after its last finished step, so the image equals an uninterrupted run's.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Mapping, TypeVar

import grpc

from latentwire.common.v1 import loader_pb2, loader_pb2_grpc, model_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
from latentwire.services.runtime import images, telemetry
from latentwire.services.runtime.errors import (FailedPrecondition, InvalidArgument, LatentwireError, Unavailable,
                                                error_info_of, from_rpc_error)
from latentwire.services.runtime.jobs import Job
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

from .placement import Replica, StagePools, check_pins, resolve_placement

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    #: Placement pins: (stage, device label) pairs from the request's stage_devices.
    stage_devices: tuple[tuple[str, str], ...] = ()

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
    check_pins(placement_of(limits), request.stage_devices)
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
        stage_devices=tuple(sorted(request.stage_devices.items())),
    )


def placement_of(limits) -> Mapping[str, tuple]:
    """The orchestrator's replicas per stage (placement.py), resolved from its flags once."""
    placement = getattr(limits, "placement_replicas", None)
    if placement is None:
        placement = limits.placement_replicas = resolve_placement(limits)
    return placement


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
    if "controlnet" not in placement_of(limits):
        raise FailedPrecondition(
            "this orchestrator has no ControlNet service; start one and pass --controlnet-address (or place "
            "controlnet replicas in --placement)",
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
    """The stage services, a pool of replicas each (placement.py), and, when configured, the model registry."""

    def __init__(self, pools: StagePools, registry: grpc.aio.Channel | None = None, *, step_timeout_s: float = 0.0,
                 max_failovers: int = 3):
        self.pools = pools
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry) if registry is not None else None
        #: Seconds to wait for the denoiser's next step before its replica counts as lost (0: no limit).
        self.step_timeout_s = step_timeout_s
        #: Replica switches one job may make before its stage error is final.
        self.max_failovers = max_failovers

    @property
    def denoiser(self) -> denoiser_pb2_grpc.DenoiserServiceStub:
        """A denoiser stub for one-off calls (ListSchedulers), on the next healthy replica."""
        return denoiser_pb2_grpc.DenoiserServiceStub(self.pools["denoiser"].any_channel())


class JobReplicas:
    """The replica each stage of one job runs on, and the switch to another one when it fails."""

    def __init__(self, stages: Stages, job: Job, pins: Mapping[str, str]):
        self.stages = stages
        self.job = job
        self.pins = dict(pins)
        self.current: dict[str, Replica] = {}
        self.failovers = 0

    async def pick(self, stage_names, context) -> None:
        """Pick a healthy replica for each stage (round robin, within its pin), waiting briefly for one."""
        for stage in stage_names:
            self.current[stage] = await self.stages.pools[stage].pick(self.pins.get(stage, ""),
                                                                      timeout=_timeout(context))

    async def fail_over(self, stage: str, error: LatentwireError, context) -> Replica:
        """Take the stage's failed replica out of the rotation and switch to another healthy one, preferring the
        same device label (the result is bit-identical only on the same kind of device); raise ``error`` when
        there is none or the job has switched too often."""
        failed = self.current[stage]
        pool = self.stages.pools[stage]
        pool.mark_down(failed, error.message)
        pin = self.pins.get(stage, "")
        if not any(r is not failed and (not pin or r.device == pin) for r in pool.replicas):
            raise error  # a single replica: nothing to switch to (as before placement)
        if self.failovers >= self.stages.max_failovers:
            raise error
        try:
            replica = await pool.pick(pin, prefer_device=failed.device, avoid=failed, timeout=_timeout(context))
        except Unavailable as none:
            raise type(error)(f"{error.message}; and no other replica to continue on: {none.message}",
                              reason=error.reason, metadata=error.metadata) from None
        self.failovers += 1
        self.current[stage] = replica
        log.warning("job %s: %r failed (%s); continuing on %r", self.job.job_id, failed, error.message, replica)
        return replica


def _lost_replica(error: grpc.RpcError, stage: str) -> str | None:
    """Which stage lost a replica when a call to ``stage`` failed: ``stage`` itself, the ControlNet service behind
    the denoiser, or None when the failure is the request's own (another replica would fail the same way).

    UNAVAILABLE: the replica died, was cut off or is shutting down (refusing new calls). CANCELLED: it gave the
    call up while shutting down (a cancel of ours surfaces as asyncio.CancelledError, never as this code).
    """
    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return None
    info = error_info_of(error)
    origin = info.metadata.get("stage", stage) if info is not None else stage
    if origin == stage or (stage == "denoiser" and origin == "controlnet"):
        return origin
    return None  # something further down (the registry a stage fetches from) is out, not this replica


async def _call_with_failover(replicas: JobReplicas, stage: str, call: Callable[[Replica], Awaitable[T]],
                              context) -> T:
    """Run an idempotent unary stage call, repeating it on another replica when its replica is lost."""
    while True:
        try:
            return await call(replicas.current[stage])
        except grpc.RpcError as error:
            failure = from_rpc_error(error, stage)
            if _lost_replica(error, stage) != stage:
                raise failure from None
            await replicas.fail_over(stage, failure, context)


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
    replicas: JobReplicas, model: str, context: grpc.aio.ServicerContext, controlnet_models: tuple[str, ...] = (),
    stage_names: tuple[str, ...] | None = None,
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Ask the job's replica of each stage (of ``stage_names``; default: every stage it uses) to have ``model``
    in memory (the ControlNet replica its ``controlnet_models``); yield ModelLoading events for stages that had
    to load one. Loading is what a replica switch repeats first, so it targets exactly the replicas in use."""
    queue: asyncio.Queue = asyncio.Queue()
    stage_names = tuple(replicas.current) if stage_names is None else stage_names
    loads = [(stage, model) for stage in stage_names if stage != "controlnet"]
    if "controlnet" in stage_names:
        loads += [("controlnet", name) for name in controlnet_models]

    async def load(stage: str, name: str) -> None:
        request = loader_pb2.LoadModelRequest(model=model_pb2.ModelReference(name=name))

        async def call(replica: Replica) -> None:
            stub = loader_pb2_grpc.ModelLoaderServiceStub(replica.channel)
            async for event in stub.LoadModel(request, timeout=_timeout(context)):
                if event.state == loader_pb2.LOAD_STATE_LOADING:
                    await queue.put(orchestrator_pb2.ModelLoading(stage=stage, model=event.model))
                elif event.state == loader_pb2.LOAD_STATE_READY and event.elapsed_seconds > 0 and loading[stage]:
                    await queue.put(orchestrator_pb2.ModelLoading(
                        stage=stage, model=event.model, done=True, elapsed_seconds=event.elapsed_seconds))

        try:
            await _call_with_failover(replicas, stage, call, context)
        except LatentwireError as error:
            await queue.put(error)

    loading = dict.fromkeys([stage for stage, _ in loads], False)
    tasks = [asyncio.create_task(load(stage, name)) for stage, name in loads]
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
    # One healthy replica per stage for this job (round robin within the request's pins); the model loads there.
    replicas = JobReplicas(stages, job, dict(params.stage_devices))
    await replicas.pick(("text_encoder", "denoiser", "vae", *(("controlnet",) if units else ())), context)
    async for event in load_model_on_stages(replicas, pinned, context, controlnet_models):
        yield event

    # The text encoder and the VAE's Encode do not depend on each other: run them at once.
    stage_started = time.perf_counter()
    text_task = asyncio.create_task(_encode_text(replicas, params, model, do_cfg, job, context))
    image_task = None
    if params.init_image:
        image_task = asyncio.create_task(_encode_image(replicas, params, model, job, context))
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
        request.controlnet.units.extend(units)
        request.controlnet.guess_mode = params.guess_mode
    result = None
    async for event in _denoise(replicas, request, pinned, controlnet_models, job, context, stage_started):
        if isinstance(event, denoiser_pb2.DenoiseResult):
            result = event
        else:
            yield event
    denoise_seconds = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    texts = [
        infotext(params, model=pinned, scheduler=result.scheduler, width=result.width, height=result.height, index=i)
        for i in range(params.num_images)
    ]
    decode_request = vae_pb2.DecodeRequest(
        model=model,
        latents=result.latents,
        include_pixels=params.include_pixels,
        png_texts=[vae_pb2.PngText(entries={"parameters": text}) for text in texts],
        job_id=job.job_id,
    )
    decoded = await _call_with_failover(
        replicas, "vae",
        lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Decode(decode_request, timeout=_timeout(context)),
        context)
    vae_seconds = time.perf_counter() - stage_started
    yield orchestrator_pb2.GenerateResponse(decoded=orchestrator_pb2.Decoded(elapsed_seconds=vae_seconds))

    timings = [orchestrator_pb2.StageTiming(stage="text_encoder", seconds=text_seconds)]
    if image is not None:
        timings.append(orchestrator_pb2.StageTiming(stage="vae_encode", seconds=image_seconds))
    timings += [
        orchestrator_pb2.StageTiming(stage="denoiser", seconds=denoise_seconds),
        orchestrator_pb2.StageTiming(stage="vae", seconds=vae_seconds),
    ]
    telemetry.observe_stages(timings)
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


async def _denoise(replicas: JobReplicas, request: denoiser_pb2.DenoiseRequest, model: str,
                   controlnet_models: tuple[str, ...], job: Job, context, stage_started: float):
    """Run the denoiser's stream, relaying each step; yield DenoisingStep events, then the DenoiseResult.

    The denoiser sends a checkpoint with every step. When its replica is lost (died, cut off: the
    stream fails UNAVAILABLE, or no step arrives within --step-timeout-s), the run resumes from the
    last checkpoint on another replica, after that replica has loaded the model; when the ControlNet
    replica behind it is lost, the same denoiser resumes with another ControlNet replica.
    """
    checkpoint = None
    while True:
        replica = replicas.current["denoiser"]
        attempt = denoiser_pb2.DenoiseRequest()
        attempt.CopyFrom(request)
        attempt.include_checkpoints = True
        if request.controlnet.units:
            attempt.controlnet.address = replicas.current["controlnet"].address
        if checkpoint is not None:
            attempt.resume_from.CopyFrom(checkpoint)
        call = denoiser_pb2_grpc.DenoiserServiceStub(replica.channel).Denoise(attempt, timeout=_timeout(context))
        result = failure = None
        try:
            while result is None:
                event = await _next_event(call, replicas.stages.step_timeout_s, replica)
                if event is grpc.aio.EOF:
                    raise _NoResult()
                if event.HasField("step"):
                    step = event.step
                    if step.HasField("checkpoint"):
                        checkpoint = step.checkpoint
                    job.completed_steps = step.step
                    job.total_steps = step.total_steps
                    yield orchestrator_pb2.GenerateResponse(step=orchestrator_pb2.DenoisingStep(
                        step=step.step, total_steps=step.total_steps,
                        elapsed_seconds=time.perf_counter() - stage_started))
                elif event.HasField("result"):
                    result = event.result
        except grpc.RpcError as error:
            failure = error
        finally:
            # The caller went away, a step failed or the replica is lost: stop this replica's loop too.
            if result is None:
                call.cancel()
        if result is not None:
            yield result
            return
        lost = _lost_replica(failure, "denoiser")
        error = from_rpc_error(failure, "denoiser")
        if lost is None:
            raise error
        await replicas.fail_over(lost, error, context)
        log.warning("job %s: resuming the denoiser after step %d", job.job_id,
                    checkpoint.completed_steps if checkpoint is not None else 0)
        async for event in load_model_on_stages(replicas, model, context, controlnet_models, stage_names=(lost,)):
            yield event


async def _next_event(call, timeout: float, replica: Replica):
    """The stream's next message (or grpc.aio.EOF); a replica that sends nothing for ``timeout`` seconds is lost.

    A cut link does not reset the TCP connection: keepalive (--keepalive-time-s + --keepalive-timeout-s)
    notices it and fails the stream UNAVAILABLE; this bound also catches a replica that is connected but stuck.
    """
    if not timeout:
        return await call.read()
    try:
        return await asyncio.wait_for(call.read(), timeout)
    except asyncio.TimeoutError:
        raise _StepTimeout(replica, timeout) from None


async def _encode_text(replicas: JobReplicas, params: GenerateParams, model, do_cfg: bool, job: Job, context):
    request = text_encoder_pb2.EncodeRequest(
        model=model,
        prompts=[params.prompt],
        negative_prompts=[params.negative_prompt] if params.negative_prompt else [],
        num_images_per_prompt=params.num_images,
        do_classifier_free_guidance=do_cfg,
        job_id=job.job_id,
    )
    return await _call_with_failover(
        replicas, "text_encoder",
        lambda replica: text_encoder_pb2_grpc.TextEncoderServiceStub(replica.channel).Encode(
            request, timeout=_timeout(context)),
        context)


async def _encode_image(replicas: JobReplicas, params: GenerateParams, model, job: Job,
                        context) -> vae_pb2.EncodeResponse:
    request = vae_pb2.EncodeRequest(
        model=model,
        image=params.init_image,
        mask_image=params.mask_image,
        width=params.width,
        height=params.height,
        job_id=job.job_id,
    )
    return await _call_with_failover(
        replicas, "vae",
        lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Encode(request, timeout=_timeout(context)),
        context)


class _StepTimeout(grpc.RpcError):
    """No step from the denoiser replica within --step-timeout-s: it counts as lost, like an UNAVAILABLE stream."""

    def __init__(self, replica: Replica, timeout: float):
        super().__init__()
        self._message = f"no step from {replica.address} in {timeout:g} s"

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return self._message


class _NoResult(grpc.RpcError):
    """The denoiser's stream ended without latents."""

    def code(self):
        return grpc.StatusCode.INTERNAL

    def details(self):
        return "the denoiser's stream ended without a result"

