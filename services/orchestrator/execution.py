"""Running one accepted job across the stage services: load the model, encode, denoise (streamed), decode.

A job arrives here fully resolved (request.py: defaults filled, seed drawn, models pinned), with its
deadline; nothing is resolved again. The orchestrator holds no model. It calls the text encoder and,
for image-to-image and inpainting, the VAE's Encode (both at once), the denoiser (a server stream it
relays step by step) and the VAE's Decode, passing what is left of the job's deadline on to each
stage. ControlNets run on the ControlNet service, which the denoiser streams with directly: the
orchestrator only names which of the denoiser's configured ControlNet replicas to use. A lost replica
is replaced (replicas.py); the denoiser then resumes from the checkpoint it streamed after its last
finished step, so the image equals an uninterrupted run's.

Model families (services/runtime/families.py): after loading, the denoiser describes the model
(DescribeModel: family, text encoders, default guidance; cached per model key). The guidance scale
defaults to the model's; classifier-free guidance is on above 1 unless the guidance is distilled
(Flux). A multi-encoder model's text encoders may run on different text-encoder replicas (placement
``encoders``, pins "text_encoder/ENCODER"): one Encode per replica with its group of encoders, at
once, and the per-encoder embeddings go to the denoiser, which combines them. An SDXL refiner runs
after the base as a second Denoise (denoising_end / denoising_start hand-off of the latents), and the
refiner's VAE decodes.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import AsyncIterator

import grpc

from latentwire.client import samplers
from latentwire.common.v1 import embeddings_pb2 as common_embeddings
from latentwire.common.v1 import loader_pb2, loader_pb2_grpc, model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime import previews as preview_options, telemetry
from services.runtime.errors import FailedPrecondition, InvalidArgument, LatentwireError, from_rpc_error
from services.runtime.jobs import Job

from . import batches, hires, hires_refiner, interrupts, loras, prompts
from .deadline import Deadline
from .placement import ENCODER_STAGE_PREFIX, Replica, encoder_of, pin_of
from .replicas import JobReplicas, Stages, call_with_failover, lost_replica
from .request import GenerateParams, check_sampler_fits, infotext

log = logging.getLogger(__name__)

#: How long after a replica said a model was in memory jobs skip the LoadModel round for it there (the round costs
#: 3 to 5 ms of a request at tiny size). A LoadModel READY or a job that succeeded there with the model (its stage
#: calls ran it: JobReplicas.confirm_loaded) renews it. The stage RPCs load a model they lack themselves, so a model
#: evicted meanwhile (another orchestrator's job loaded a different one) still runs; only its ModelLoading progress
#: events are not sent.
LOADED_MEMO_S = 10.0


async def load_model_on_stages(
    replicas: JobReplicas, model: str, controlnet_models: tuple[str, ...] = (),
    stage_names: tuple[str, ...] | None = None,
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Ask the job's replica of each stage key (of ``stage_names``; default: every key it uses) to have ``model``
    in memory (the ControlNet replica its ``controlnet_models``); yield ModelLoading events for stages that had
    to load one. Loading is what a replica switch repeats first, so it targets exactly the replicas in use; keys
    sharing a replica (text encoders run together) load it once."""
    queue: asyncio.Queue = asyncio.Queue()
    stage_names = tuple(replicas.current) if stage_names is None else stage_names
    loads = [(stage, model) for stage in stage_names if stage != "controlnet"]
    if "controlnet" in stage_names:
        loads += [("controlnet", name) for name in controlnet_models]
    streams: dict[tuple[int, str], asyncio.Task] = {}
    loading: set[tuple[str, str]] = set()

    async def stream(replica: Replica, name: str) -> None:
        loaded_at = replica.loaded.get(name)
        if loaded_at is not None and time.monotonic() - loaded_at < LOADED_MEMO_S:
            return  # loaded there moments ago (a stage RPC still loads it itself should it have been evicted since)
        request = loader_pb2.LoadModelRequest(model=model_pb2.ModelReference(name=name))
        stub = loader_pb2_grpc.ModelLoaderServiceStub(replica.channel)
        where = (replica.address, name)
        async for event in stub.LoadModel(request, timeout=replicas.deadline.remaining()):
            if event.state == loader_pb2.LOAD_STATE_LOADING:
                loading.add(where)
                replica.loaded.clear()  # loading one may evict others there: ask again for them
                await queue.put(orchestrator_pb2.ModelLoading(stage=replica.stage, model=event.model))
            elif event.state == loader_pb2.LOAD_STATE_READY:
                replica.loaded[name] = time.monotonic()  # jobs in the next moments skip the round
                if event.elapsed_seconds > 0 and where in loading:
                    await queue.put(orchestrator_pb2.ModelLoading(
                        stage=replica.stage, model=event.model, done=True, elapsed_seconds=event.elapsed_seconds))

    async def load(stage: str, name: str) -> None:
        async def call(replica: Replica) -> None:
            key = (id(replica), name)
            replicas.models.setdefault(id(replica), set()).add(name)
            if key not in streams:  # one LoadModel per replica and model, however many keys share it
                streams[key] = asyncio.ensure_future(stream(replica, name))
            await asyncio.shield(streams[key])

        try:
            await call_with_failover(replicas, stage, call)
        except LatentwireError as error:
            await queue.put(error)

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
            yield orchestrator_pb2.GenerateResponse(model_loading=item)
    finally:
        for task in [*tasks, *streams.values()]:
            task.cancel()


async def prepare_model(replicas: JobReplicas, model: str, stage_names: tuple[str, ...],
                        controlnet_models: tuple[str, ...] = (), *, denoiser: str = "denoiser"):
    """Pick the job's replicas for ``model`` and load it there; yield ModelLoading events, then, last, the
    model's DescribeModel answer (from ``denoiser``, the key of the denoiser replica that runs it).

    The text encoders a multi-encoder model has are known once it is described: a model described before
    (cached for the orchestrator's life) gets its text-encoder replicas picked at once, per encoder
    (placement.assign_encoders), and loads everywhere at the same time; a model seen for the first time loads on
    a text-encoder replica picked as for SD 1.x while the denoiser loads, and the encoders another replica has
    to run load once the denoiser has described it."""
    stages = replicas.stages
    described = stages.descriptions.get(model)
    keys = list(stage_names)
    provisional = described is None or not described.text_encoders
    text = "text_encoder" in keys
    if text and not provisional:
        keys.remove("text_encoder")
    await replicas.pick([key for key in keys if key not in replicas.current])
    if text and not provisional:
        keys += await replicas.pick_encoders(described.text_encoders)
    async for event in load_model_on_stages(replicas, model, controlnet_models, tuple(keys)):
        yield event
    if described is None:
        described = await stages.describe_model(replicas, model, denoiser)
        if text and described.text_encoders:
            # The provisional replica has the model loaded: pick_encoders prefers it (as a replica the job uses).
            encoder_keys = await replicas.pick_encoders(described.text_encoders)
            loaded = replicas.current.pop("text_encoder")
            fresh = tuple(key for key in encoder_keys if replicas.current[key] is not loaded)
            async for event in load_model_on_stages(replicas, model, stage_names=fresh):
                yield event
    yield described


async def run_generation(
    stages: Stages, params: GenerateParams, job: Job, deadline: Deadline
) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Run the stages for one accepted job (``params`` resolved and pinned at acceptance), yielding progress
    events and, last, the result.

    With a refiner (SDXL), the model denoises up to ``refiner_switch_at`` of the schedule (denoising_end) and the
    refiner, on the "refiner" pin's denoiser replica, continues its latents from there (denoising_start) with its
    own text encoding, then the refiner's VAE decodes, as StableDiffusionXLImg2ImgPipeline does after the base.
    A batch count runs the job once per batch (batches.py); a hires fix adds a second pass (hires.py)."""
    if params.batch_count > 1:
        async for event in batches.run_batches(run_generation, stages, params, job, deadline):
            yield event
        return
    started = time.perf_counter()
    model = model_pb2.ModelReference(name=params.model)
    units = params.controlnets
    controlnet_models = params.controlnet_models
    # One healthy replica per stage for this job (round robin within the request's pins); the model loads there.
    replicas = JobReplicas(stages, job, dict(params.stage_devices), deadline)
    described = None
    async for event in prepare_model(replicas, params.model,
                                     ("text_encoder", "denoiser", "vae", *(("controlnet",) if units else ())),
                                     controlnet_models):
        if isinstance(event, denoiser_pb2.DescribeModelResponse):
            described = event
        else:
            yield event
    guidance = _guidance(params, described)
    check_sampler_fits(params, described.family, described.schedulers)
    hires.check_controlnets_fit(params, described.family)
    refiner_described = None
    if params.refiner:
        # Picked, loaded and checked before the base runs: a wrong refiner fails the job before any denoising.
        async for event in prepare_model(replicas, params.refiner, ("refiner",), denoiser="refiner"):
            if isinstance(event, denoiser_pb2.DescribeModelResponse):
                refiner_described = event
            else:
                yield event
        _check_refiner_family(described, refiner_described)
        check_sampler_fits(params, refiner_described.family, refiner_described.schedulers)

    # The text encoder and the VAE's Encode do not depend on each other: run them at once.
    stage_started = time.perf_counter()
    text_task = asyncio.create_task(_encode_text(replicas, params, params.model, described, guidance, job))
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
    request = _denoise_request(params, model, job, encoded, guidance)
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
    progress = _Progress(params.step_event_interval_ms)
    if params.hires is not None:
        progress.tail = hires.progress_tail(params)
    if hires_refiner.switches_in_first_pass(params):
        request.denoising_end = params.refiner_switch_at
        progress.tail = (1 - params.refiner_switch_at) / params.refiner_switch_at
    if params.hires is not None and params.refiner:
        progress.tail = hires_refiner.progress_tail(params)
    result = None
    async for event in _denoise(replicas, request, params.model, controlnet_models, job, stage_started, progress):
        if isinstance(event, denoiser_pb2.DenoiseResult):
            result = event
        else:
            yield event
    size = (result.width, result.height)  # the first pass's size, which the infotext names
    finish = interrupts.of(job)
    if finish is not None and finish.stops_passes(job.completed_steps):
        pass  # finished early (interrupts.py): no second pass, no refiner; the first pass's latents are decoded
    elif params.hires is not None and params.refiner:
        # The refiner in the first and/or the second pass, as A1111's hires_fix_refiner_pass (hires_refiner.py).
        async for event in hires_refiner.run(replicas, params, described, refiner_described, result, encoded,
                                             guidance, job, progress):
            if isinstance(event, denoiser_pb2.DenoiseResult):
                result = denoiser_pb2.DenoiseResult(latents=event.latents, scheduler=result.scheduler,
                                                    width=event.width, height=event.height)
            else:
                yield event
    elif params.hires is not None:
        if prompts.has_schedule(params):  # prompt editing over the second pass's steps, as A1111 (prompts.py)
            encoded = await _encode_text(replicas, params, params.model, described, guidance, job,
                                         hires_steps=params.hires.second_pass_steps(params.num_inference_steps))
        async for event in hires.second_pass(replicas, params, described, result, encoded, guidance, job, progress):
            if isinstance(event, denoiser_pb2.DenoiseResult):
                result = denoiser_pb2.DenoiseResult(latents=event.latents, scheduler=result.scheduler,
                                                    width=event.width, height=event.height)
            else:
                yield event
    denoise_seconds = time.perf_counter() - stage_started

    decode_model, refiner_seconds = model, None
    if finish is not None and finish.stops_passes(job.completed_steps):
        pass  # the base's latents, by the base's VAE
    elif params.refiner and params.hires is not None:  # refined above; the refiner's VAE decodes
        decode_model = model_pb2.ModelReference(name=params.refiner)
    elif params.refiner:
        stage_started = time.perf_counter()
        async for event in _refine(replicas, params, refiner_described, result, job, stage_started, progress):
            if isinstance(event, denoiser_pb2.DenoiseResult):
                refined = event
            else:
                yield event
        # The refiner's own scheduler, size and latents; the base's scheduler names the run in the infotext.
        result = denoiser_pb2.DenoiseResult(latents=refined.latents, scheduler=result.scheduler,
                                            width=refined.width, height=refined.height)
        decode_model = model_pb2.ModelReference(name=params.refiner)
        refiner_seconds = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    texts = [
        infotext(params, model=params.model, scheduler=result.scheduler, width=size[0], height=size[1], index=i,
                 guidance_scale=guidance, guidance_distilled=described.guidance_distilled)
        for i in range(params.num_images)
    ]
    decode_request = vae_pb2.DecodeRequest(
        model=decode_model,
        latents=result.latents,
        include_pixels=params.include_pixels,
        png_texts=[vae_pb2.PngText(entries={"parameters": text}) for text in texts],
        job_id=job.job_id,
        tiling=params.tiling,
        vae_tiling=params.vae_tiling,
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
    timings.append(orchestrator_pb2.StageTiming(stage="denoiser", seconds=denoise_seconds))
    if refiner_seconds is not None:
        timings.append(orchestrator_pb2.StageTiming(stage="refiner", seconds=refiner_seconds))
    timings.append(orchestrator_pb2.StageTiming(stage="vae", seconds=vae_seconds))
    telemetry.observe_stages(timings)
    pngs = list(decoded.png_images)
    response = orchestrator_pb2.GenerateResponse(
        result=orchestrator_pb2.GenerateResult(
            images=[orchestrator_pb2.GeneratedImage(png=png, index=i) for i, png in enumerate(pngs)],
            seed=params.seed,
            image_seeds=[params.seed] * len(pngs),
            timings=timings,
            total_seconds=time.perf_counter() - started,
            model=params.model,
        )
    )
    if decoded.HasField("pixels"):
        response.result.pixels.CopyFrom(decoded.pixels)
    replicas.confirm_loaded()
    yield response


def _guidance(params: GenerateParams, described: denoiser_pb2.DescribeModelResponse) -> float:
    """The guidance scale a run uses: the request's, else the model's default."""
    return described.default_guidance_scale if params.guidance_scale is None else params.guidance_scale


def _check_refiner_family(base: denoiser_pb2.DescribeModelResponse,
                          refiner: denoiser_pb2.DescribeModelResponse) -> None:
    """A refiner hand-off runs from an SDXL base to an SDXL refiner (or another SDXL base), as diffusers does."""
    if base.family != "sdxl":
        raise InvalidArgument(f"refiner is set, but the model is of family {base.family!r}; the hand-off to a "
                              "refiner runs from a Stable Diffusion XL base model", reason="INVALID_REFINER")
    if refiner.family not in ("sdxl", "sdxl-refiner"):
        raise InvalidArgument(f"refiner names a model of family {refiner.family!r}; use a Stable Diffusion XL "
                              "refiner (or base) model", reason="INVALID_REFINER")


def _denoise_request(params: GenerateParams, model: model_pb2.ModelReference, job: Job, encoded,
                     guidance: float) -> denoiser_pb2.DenoiseRequest:
    """The DenoiseRequest of ``model`` with the text conditioning ``encoded`` (an EncodeResponse for a
    single-encoder model, else the gathered EncoderEmbeddings)."""
    request = denoiser_pb2.DenoiseRequest(
        model=model,
        job_id=job.job_id,
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=guidance,
        guidance_rescale=params.guidance_rescale,
        eta=params.eta,
        seed=params.seed,
        # A1111's variation seed and seed resize, on every pass (a hires fix's second pass too, as A1111's).
        subseed=params.subseed,
        subseed_strength=params.subseed_strength,
        seed_resize_from_w=params.seed_resize_from_w,
        seed_resize_from_h=params.seed_resize_from_h,
    )
    # The same scheduler class and options on every Denoise of the job (the refiner's, a resume after failover).
    request.scheduler, options = params.scheduler_choice
    if options:
        request.scheduler_options.CopyFrom(samplers.options_to_proto(options))
    request.tiling = params.tiling
    if model.name == params.model:  # the job's LoRAs are the base model's (not the refiner's)
        request.loras.extend(params.loras)
    if params.previews is not None:
        preview_options.to_proto(params.previews, request.previews)
    if isinstance(encoded, prompts.ScheduledEncoding):
        prompts.fill_denoise_request(request, encoded)
    elif isinstance(encoded, text_encoder_pb2.EncodeResponse):
        request.prompt_embeds.CopyFrom(encoded.prompt_embeds)
        if encoded.HasField("negative_prompt_embeds"):
            request.negative_prompt_embeds.CopyFrom(encoded.negative_prompt_embeds)
    else:
        request.text_embeddings.extend(encoded)
    return request


async def _refine(replicas: JobReplicas, params: GenerateParams, described: denoiser_pb2.DescribeModelResponse,
                  base: denoiser_pb2.DenoiseResult, job: Job, stage_started: float, progress: _Progress):
    """The refiner's run after the base: its text encoding, then Denoise from ``refiner_switch_at`` on the base's
    latents (same seed, steps and scheduler; each run draws from its own generator seeded with the job's seed, as
    two diffusers pipeline calls do). Yields load and step events, then the refiner's DenoiseResult."""
    model = model_pb2.ModelReference(name=params.refiner)
    guidance = _guidance(params, described)
    keys = await replicas.pick_encoders(described.text_encoders)  # an SDXL model has several
    async for event in load_model_on_stages(replicas, params.refiner, stage_names=("vae", *keys)):
        yield event
    encoded = await _encode_text(replicas, params, params.refiner, described, guidance, job)
    request = _denoise_request(params, model, job, encoded, guidance)
    request.height, request.width = base.height, base.width
    request.denoising_start = params.refiner_switch_at
    request.image.latents.CopyFrom(base.latents)
    progress.start_next_run()
    async for event in _denoise(replicas, request, params.refiner, (), job, stage_started, progress,
                                stage="refiner"):
        yield event


class _Progress:
    """Step numbers across the runs of one job: the refiner's steps continue the base's count, and while the
    base runs its total includes an estimate of the refiner's steps (``tail`` times the base's; exact once the
    refiner's first step arrives). With an event interval (GenerateRequest.step_event_interval_ms) it also says
    which steps become DenoisingStep events: one at most every interval, each run's last step and a step with a
    preview always."""

    def __init__(self, event_interval_ms: int = 0) -> None:
        self.offset = 0
        self.tail = 0.0
        self.last_total = 0
        self.event_interval_s = event_interval_ms / 1000
        self.last_event = -math.inf

    def sends(self, step: int, latest: int, total: int, now: float, *, preview: bool) -> bool:
        """Whether run step ``step`` of ``total`` becomes an event at ``now`` (perf_counter seconds), ``latest``
        being the step the denoiser's message reported (the steps since the one before arrive with it): with an
        interval, only the latest of them can."""
        if not self.event_interval_s:
            return True
        if step == latest and (preview or step == total or now - self.last_event >= self.event_interval_s):
            self.last_event = now
            return True
        return False

    def start_next_run(self) -> None:
        self.offset, self.tail = self.last_total, 0.0

    def count(self, step: int, total: int) -> tuple[int, int]:
        self.last_total = self.offset + total
        return self.offset + step, self.offset + total + math.ceil(total * self.tail - 1e-9)


async def _denoise(replicas: JobReplicas, request: denoiser_pb2.DenoiseRequest, model: str,
                   controlnet_models: tuple[str, ...], job: Job, stage_started: float,
                   progress: _Progress | None = None, *, stage: str = "denoiser"):
    """Run the denoiser's stream on the job's ``stage`` replica ("denoiser", or "refiner"), relaying each step;
    yield DenoisingStep events, then the DenoiseResult.

    The denoiser sends a checkpoint with a step at most every --checkpoint-interval-s (its flag). When its
    replica is lost (died, cut off: the stream fails UNAVAILABLE, or no step arrives within --step-timeout-s),
    the run resumes from the last checkpoint on another replica, after that replica has loaded the model (the
    steps after that checkpoint run again and are relayed once); when the ControlNet replica behind it is
    lost, the same denoiser resumes with another ControlNet replica.
    """
    progress = progress or _Progress()
    checkpoint = None
    relayed = 0  # the last step relayed: a resumed run repeats the steps after its checkpoint
    unsent = None  # the last step counted but not sent (an event interval): sent before the result
    finish = interrupts.of(job)  # finishing early (CancelJob INTERRUPT / SKIP)
    while True:
        replica = replicas.current[stage]
        attempt = denoiser_pb2.DenoiseRequest()
        attempt.CopyFrom(request)
        attempt.include_checkpoints = True
        attempt.step_message_interval_ms = replicas.stages.denoiser_step_interval_ms
        if request.controlnet.units:
            # By name, never by address: the denoiser dials only the replicas of its own --controlnet-address
            # configuration, where an entry without a name is named by its HOST:PORT (the orchestrator's too).
            attempt.controlnet.replica = replicas.current["controlnet"].address
        if checkpoint is not None:
            attempt.resume_from.CopyFrom(checkpoint)
        if finish is not None:
            attempt.finish_after_step = finish.run_started(replica.channel, attempt.job_id,
                                                           job.completed_steps - relayed)
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
                    if step.step <= relayed:
                        continue
                    # One DenoisingStep per step (or per event interval, _Progress.sends): the denoiser sends
                    # a step message at most every step_message_interval_ms, and the one it sends counts the
                    # steps since the last.
                    now = time.perf_counter()
                    elapsed = now - stage_started
                    for number in range(relayed + 1, step.step + 1):
                        if finish is not None:
                            finish.step_relayed()
                        done, total = progress.count(number, step.total_steps)
                        job.completed_steps = done
                        job.total_steps = total
                        preview = number == step.step and bool(step.preview_image)
                        message = orchestrator_pb2.DenoisingStep(step=done, total_steps=total, elapsed_seconds=elapsed)
                        if not progress.sends(number, step.step, step.total_steps, now, preview=preview):
                            unsent = message
                            continue
                        unsent = None
                        if preview:
                            message.preview_image, message.preview_format = step.preview_image, step.preview_format
                        yield orchestrator_pb2.GenerateResponse(step=message)
                    relayed = step.step
                elif event.HasField("result"):
                    result = event.result
        except grpc.RpcError as error:
            failure = error
        finally:
            # The caller went away, a step failed or the replica is lost: stop this replica's loop too.
            if result is None:
                call.cancel()
        if result is not None:
            if unsent is not None:  # the run ended before its planned last step (finished early, denoising_end)
                yield orchestrator_pb2.GenerateResponse(step=unsent)
            if finish is not None:
                finish.run_ended(relayed, progress.last_total - progress.offset)
            yield result
            return
        lost = lost_replica(failure, "denoiser")
        error = from_rpc_error(failure, "denoiser")
        if lost is None:
            raise error
        lost = stage if lost == "denoiser" else lost
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
        # asyncio.timeout, not wait_for: no task per message (a step's event costs a timer handle only).
        async with asyncio.timeout(timeout):
            return await call.read()
    except TimeoutError:
        raise _StepTimeout(replica, timeout) from None


async def _encode_text(replicas: JobReplicas, params: GenerateParams, model: str,
                       described: denoiser_pb2.DescribeModelResponse, guidance: float, job: Job,
                       hires_steps: int | None = None):
    """The prompts' embeddings for ``model``: an EncodeResponse from the job's text-encoder replica for a
    single-encoder model (SD 1.x/2.x); for a multi-encoder model the EncoderEmbeddings of each of its encoders,
    gathered from the replicas the job runs them on (one Encode per replica, at once), in the model's order."""
    do_cfg = guidance > 1 and not described.guidance_distilled
    params = loras.for_encoding(params)  # the prompt without its <lora:...> tags
    request = text_encoder_pb2.EncodeRequest(
        model=model_pb2.ModelReference(name=model),
        prompts=[params.prompt],
        negative_prompts=[params.negative_prompt] if params.negative_prompt else [],
        num_images_per_prompt=params.num_images,
        do_classifier_free_guidance=do_cfg,
        job_id=job.job_id,
        clip_skip=params.clip_skip,
    )
    if model == params.model:  # the job's LoRAs and embeddings are the base model's (not the refiner's)
        request.loras.extend(params.loras)
        request.embeddings.extend(model_pb2.ModelReference(name=name) for name in params.embeddings)
    # A1111 prompt editing / alternation: the distinct texts of the schedule, encoded once (prompts.py).
    plan = await prompts.plan_for(params, model, described.family, hires_steps)
    if plan is not None:
        prompts.set_texts(request, plan)
    encoded = await _encode(replicas, request, described)
    return encoded if plan is None else prompts.ScheduledEncoding(plan, encoded, params.num_images)


async def _encode(replicas: JobReplicas, request: text_encoder_pb2.EncodeRequest,
                  described: denoiser_pb2.DescribeModelResponse):
    """_encode_text's Encode: on the job's text-encoder replica, or per encoder on the replicas running them."""
    if not described.text_encoders:
        return await call_with_failover(
            replicas, "text_encoder",
            lambda replica: text_encoder_pb2_grpc.TextEncoderServiceStub(replica.channel).Encode(
                request, timeout=replicas.deadline.remaining()))
    gathered = await _encode_per_replica(replicas, request, [ENCODER_STAGE_PREFIX + e for e in described.text_encoders])
    return [gathered[encoder] for encoder in described.text_encoders]


async def _encode_per_replica(replicas: JobReplicas, request: text_encoder_pb2.EncodeRequest,
                              keys: list[str]) -> dict[str, common_embeddings.EncoderEmbeddings]:
    """Run the text encoders of ``keys`` ("text_encoder/ENCODER") on the job's replicas, one Encode per replica
    with its group of encoders, all at once; return the embeddings by encoder.

    A lost replica is replaced (its encoders move together, replicas.JobReplicas.fail_over) and its group asked
    again. A replica that does not run an encoder the placement says it hosts (it answers ENCODER_NOT_HOSTED, or
    lists it in missing_encoders) is passed over for that encoder for the rest of the job, and another replica
    hosting it is asked."""
    gathered: dict[str, common_embeddings.EncoderEmbeddings] = {}
    pool = replicas.stages.pools["text_encoder"]

    async def run(group_keys: list[str]) -> None:
        groups: dict[Replica, list[str]] = {}
        for key in group_keys:
            groups.setdefault(replicas.current[key], []).append(key)
        tasks = [asyncio.create_task(one(replica, group)) for replica, group in groups.items()]
        try:
            await asyncio.gather(*tasks)
        finally:  # one group failed for good (or the job was cancelled): stop the others too
            for task in tasks:
                task.cancel()

    async def one(replica: Replica, group: list[str]) -> None:
        attempt = text_encoder_pb2.EncodeRequest()
        attempt.CopyFrom(request)
        attempt.encoders[:] = [encoder_of(key) for key in group]
        try:
            response = await text_encoder_pb2_grpc.TextEncoderServiceStub(replica.channel).Encode(
                attempt, timeout=replicas.deadline.remaining())
        except grpc.RpcError as error:
            failure = from_rpc_error(error, "text_encoder")
            if lost_replica(error, "text_encoder") == "text_encoder":
                await replicas.fail_over(group[0], failure, replica)
                await run(group)
                return
            if failure.reason != ENCODER_NOT_HOSTED:
                raise failure from None
            if len(group) > 1:
                named = ENCODER_STAGE_PREFIX + failure.metadata.get("encoder", "")
                if named in group:  # the replica said which one: move it, ask again for the others
                    replicas.current[named] = _other_host(pool, replicas, named, replica)
                    await run(group)
                else:  # find out which, one encoder at a time
                    await asyncio.gather(*(one(replica, [key]) for key in group))
                return
            response = None
        for embeddings in response.encoders if response is not None else ():
            if ENCODER_STAGE_PREFIX + embeddings.encoder in group:
                gathered[embeddings.encoder] = embeddings
        unserved = [key for key in group if encoder_of(key) not in gathered]
        if unserved:
            for key in unserved:
                replicas.current[key] = _other_host(pool, replicas, key, replica)
            await run(unserved)

    await run(keys)
    return gathered


#: Reason of a text encoder asked for an encoder it does not host (services/text_encoder).
ENCODER_NOT_HOSTED = "ENCODER_NOT_HOSTED"


def _other_host(pool, replicas: JobReplicas, key: str, lacking: Replica) -> Replica:
    """A healthy replica other than ``lacking`` that hosts the key's encoder (within its pin), remembering that
    ``lacking`` does not; FAILED_PRECONDITION when there is none."""
    encoder = encoder_of(key)
    replicas.lacking.setdefault(encoder, set()).add(lacking.address)
    pin = pin_of(replicas.pins, key)
    for replica in pool.rotation():
        if (replica.hosts(encoder) and replica.address not in replicas.lacking[encoder]
                and (not pin or replica.device == pin)):
            return replica
    raise FailedPrecondition(
        f"no text-encoder replica runs {encoder} of this model: {lacking.address} does not, although the "
        "placement says it hosts it; start a replica with that encoder (--encoders) or fix the placement",
        reason=ENCODER_NOT_HOSTED, metadata={"stage": "text_encoder", "encoder": encoder})


async def _encode_image(replicas: JobReplicas, params: GenerateParams, model, job: Job) -> vae_pb2.EncodeResponse:
    request = vae_pb2.EncodeRequest(
        model=model,
        image=params.init_image,
        mask_image=params.mask_image,
        width=params.width,
        height=params.height,
        job_id=job.job_id,
        tiling=params.tiling,
        vae_tiling=params.vae_tiling,
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
