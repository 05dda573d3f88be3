"""Running one accepted job across the stage services: load the model, encode, denoise (streamed), decode.

A job arrives here fully resolved (request.py: defaults filled, seed drawn, models pinned), with its
deadline; nothing is resolved again. The orchestrator holds no model. It calls the text encoder and,
for image-to-image and inpainting, the VAE's Encode (both at once), the denoiser (a server stream it
relays step by step) and the VAE's Decode, passing what is left of the job's deadline on to each
stage. ControlNets run on the ControlNet service, which the denoiser streams with directly: the
orchestrator only names which of the denoiser's configured ControlNet replicas to use. A lost replica
is replaced (replicas.py); the denoiser then resumes from the checkpoint it streamed after its last
finished step, so the image equals an uninterrupted run's.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from latentwire.common.v1 import loader_pb2, loader_pb2_grpc, model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime import telemetry
from services.runtime.errors import LatentwireError, from_rpc_error
from services.runtime.jobs import Job

from .deadline import Deadline
from .placement import Replica
from .replicas import JobReplicas, Stages, call_with_failover, lost_replica
from .request import GenerateParams, infotext

log = logging.getLogger(__name__)


async def load_model_on_stages(
    replicas: JobReplicas, model: str, controlnet_models: tuple[str, ...] = (),
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
            async for event in stub.LoadModel(request, timeout=replicas.deadline.remaining()):
                if event.state == loader_pb2.LOAD_STATE_LOADING:
                    await queue.put(orchestrator_pb2.ModelLoading(stage=stage, model=event.model))
                elif event.state == loader_pb2.LOAD_STATE_READY and event.elapsed_seconds > 0 and loading[stage]:
                    await queue.put(orchestrator_pb2.ModelLoading(
                        stage=stage, model=event.model, done=True, elapsed_seconds=event.elapsed_seconds))

        try:
            await call_with_failover(replicas, stage, call)
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


async def run_generation(
    stages: Stages, params: GenerateParams, job: Job, deadline: Deadline
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Run the stages for one accepted job (``params`` resolved and pinned at acceptance), yielding progress
    events and, last, the result."""
    started = time.perf_counter()
    model = model_pb2.ModelReference(name=params.model)
    units = params.controlnets
    do_cfg = params.guidance_scale > 1
    controlnet_models = params.controlnet_models
    # One healthy replica per stage for this job (round robin within the request's pins); the model loads there.
    replicas = JobReplicas(stages, job, dict(params.stage_devices), deadline)
    await replicas.pick(("text_encoder", "denoiser", "vae", *(("controlnet",) if units else ())))
    async for event in load_model_on_stages(replicas, params.model, controlnet_models):
        yield event

    # The text encoder and the VAE's Encode do not depend on each other: run them at once.
    stage_started = time.perf_counter()
    text_task = asyncio.create_task(_encode_text(replicas, params, model, do_cfg, job))
    image_task = None
    if params.init_image:
        image_task = asyncio.create_task(_encode_image(replicas, params, model, job))
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
    async for event in _denoise(replicas, request, params.model, controlnet_models, job, stage_started):
        if isinstance(event, denoiser_pb2.DenoiseResult):
            result = event
        else:
            yield event
    denoise_seconds = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    texts = [
        infotext(params, model=params.model, scheduler=result.scheduler, width=result.width, height=result.height,
                 index=i)
        for i in range(params.num_images)
    ]
    decode_request = vae_pb2.DecodeRequest(
        model=model,
        latents=result.latents,
        include_pixels=params.include_pixels,
        png_texts=[vae_pb2.PngText(entries={"parameters": text}) for text in texts],
        job_id=job.job_id,
    )
    decoded = await call_with_failover(
        replicas, "vae",
        lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Decode(decode_request,
                                                                            timeout=deadline.remaining()))
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
            model=params.model,
        )
    )
    if decoded.HasField("pixels"):
        response.result.pixels.CopyFrom(decoded.pixels)
    yield response


async def _denoise(replicas: JobReplicas, request: denoiser_pb2.DenoiseRequest, model: str,
                   controlnet_models: tuple[str, ...], job: Job, stage_started: float):
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
            # By name, never by address: the denoiser dials only the replicas of its own --controlnet-address
            # configuration, where an entry without a name is named by its HOST:PORT (the orchestrator's too).
            attempt.controlnet.replica = replicas.current["controlnet"].address
        if checkpoint is not None:
            attempt.resume_from.CopyFrom(checkpoint)
        call = denoiser_pb2_grpc.DenoiserServiceStub(replica.channel).Denoise(
            attempt, timeout=replicas.deadline.remaining())
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
        lost = lost_replica(failure, "denoiser")
        error = from_rpc_error(failure, "denoiser")
        if lost is None:
            raise error
        await replicas.fail_over(lost, error)
        log.warning("job %s: resuming the denoiser after step %d", job.job_id,
                    checkpoint.completed_steps if checkpoint is not None else 0)
        async for event in load_model_on_stages(replicas, model, controlnet_models, stage_names=(lost,)):
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


async def _encode_text(replicas: JobReplicas, params: GenerateParams, model, do_cfg: bool, job: Job):
    request = text_encoder_pb2.EncodeRequest(
        model=model,
        prompts=[params.prompt],
        negative_prompts=[params.negative_prompt] if params.negative_prompt else [],
        num_images_per_prompt=params.num_images,
        do_classifier_free_guidance=do_cfg,
        job_id=job.job_id,
    )
    return await call_with_failover(
        replicas, "text_encoder",
        lambda replica: text_encoder_pb2_grpc.TextEncoderServiceStub(replica.channel).Encode(
            request, timeout=replicas.deadline.remaining()))


async def _encode_image(replicas: JobReplicas, params: GenerateParams, model, job: Job) -> vae_pb2.EncodeResponse:
    request = vae_pb2.EncodeRequest(
        model=model,
        image=params.init_image,
        mask_image=params.mask_image,
        width=params.width,
        height=params.height,
        job_id=job.job_id,
    )
    return await call_with_failover(
        replicas, "vae",
        lambda replica: vae_pb2_grpc.VaeServiceStub(replica.channel).Encode(request,
                                                                            timeout=replicas.deadline.remaining()))


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
