"""gRPC servicer for latentwire.denoiser.v1.DenoiserService: proto <-> domain, nothing else."""
from __future__ import annotations

import weakref

import grpc

from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.runtime import circular, lora, tensors
from latentwire.client.channels import grpc_options
from latentwire.client.samplers import options_from_proto
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from services.runtime.limits import MAX_STEP_MESSAGE_INTERVAL_MS, check_job_id, check_scheduler_steps
from services.runtime.server import ModelService
from services.runtime.telemetry import metrics
from services.runtime.worker import tracked

from . import checkpoint, preview
from .preview_vae import PreviewVaes, parse_defaults
from .schedule import from_segments
from .controlnet import ControlNetReplicas, ControlNetStream, check_conditioning, parse_replicas
from .conditioning import INVALID_TEXT_EMBEDDINGS, EncoderParts, TextConditioning, combine
from .model import (DenoiseOutput, DenoiseParams, DenoiserModel, ImageInputs, MicroConditioning, StepEvent,
                    check_params, load_denoiser)
from .noise import init_latents_of, variation_of
from .acceleration import Acceleration
from .flow import FlowDenoiser
from .step_batching import TRANSFORMER, UNET, StepBatcher
from .step_messages import StepMessages

#: Finish: after_step below 0.
INVALID_FINISH_STEP = "INVALID_FINISH_STEP"
#: Finish: no Denoise of that job runs on this replica (it ended, or never started here).
DENOISE_NOT_RUNNING = "DENOISE_NOT_RUNNING"
#: Denoise: step_message_interval_ms below 0 or above MAX_STEP_MESSAGE_INTERVAL_MS.
INVALID_STEP_MESSAGE_INTERVAL = "INVALID_STEP_MESSAGE_INTERVAL"

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)


class DenoiserService(ModelService, denoiser_pb2_grpc.DenoiserServiceServicer):
    """Runs denoising loops and streams their steps."""

    service_name = denoiser_pb2.DESCRIPTOR.services_by_name["DenoiserService"].full_name

    components = ("unet", "transformer", "scheduler")

    def __init__(self, config):
        super().__init__(config)
        self.controlnet_replicas = ControlNetReplicas(
            parse_replicas(config.extra.controlnet_address),
            grpc_options(config.max_message_bytes, config.keepalive_time_s, config.keepalive_timeout_s))
        self.preview_vaes = PreviewVaes(parse_defaults(config.extra.preview_vae), self.models, self.device, self.dtype)
        #: One step batcher per loaded UNet model (step_batching.py); dropped with the model when it is unloaded.
        self._step_batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def register(self, server: grpc.aio.Server) -> list[str]:
        denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> DenoiserModel:
        extra = self.config.extra
        return load_denoiser(spec, self.device, self.dtype, self.config.allow_pickle,
                             Acceleration(channels_last=extra.channels_last, compile_mode=extra.compile))

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest, context):
        """Run one denoising loop, streaming a DenoiseStep per step and the latents last."""
        check_job_id(request.job_id)
        check_conditioning(request.controlnet)  # before any work: an address in a request is never dialed
        if not 0 <= request.step_message_interval_ms <= MAX_STEP_MESSAGE_INTERVAL_MS:
            raise InvalidArgument(f"step_message_interval_ms is {request.step_message_interval_ms}; use 0 (every "
                                  f"step) to {MAX_STEP_MESSAGE_INTERVAL_MS} milliseconds",
                                  reason=INVALID_STEP_MESSAGE_INTERVAL, metadata={"field": "step_message_interval_ms"})
        model = (await self.model_for(request.model)).model
        limits = self.config.extra
        micro = _micro_conditioning(model, request)
        params = DenoiseParams(
            height=request.height or model.default_height,
            width=request.width or model.default_width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            eta=request.eta,
            seed=request.seed,
            scheduler=request.scheduler,
            strength=request.strength,
            denoising_start=request.denoising_start,
            denoising_end=request.denoising_end,
            micro=micro,
            scheduler_options=tuple(options_from_proto(request.scheduler_options).items()),
            variation=variation_of(request, limits.max_image_size),
        )
        check_params(params, max_steps=min(limits.max_steps, model.max_steps), max_image_size=limits.max_image_size)
        # Refuse an unknown scheduler, or options it does not take, before admitting the job (building the prototype
        # the job's scheduler is copied from).
        model.scheduler_prototype(params.scheduler, params.scheduler_options)
        check_scheduler_steps(params.scheduler or model.default_scheduler, params.num_inference_steps)
        do_cfg = model.do_classifier_free_guidance(params.guidance_scale)
        text = _text_conditioning(model, request, do_cfg)
        model.check_text(text, do_cfg, limits.max_batch)
        schedule = from_segments(request.conditioning_schedule,
                                 lambda segment: _text_conditioning(model, segment, do_cfg), text)
        image = _image_inputs(request.image) if request.HasField("image") else None
        init_latents = init_latents_of(request, (params.height // model.vae_scale_factor,
                                                 params.width // model.vae_scale_factor))
        if init_latents is not None:  # image-to-image from latents (hires fix)
            image = ImageInputs(init_latents=init_latents)
        model.check_image_inputs(image, params, text.batch)
        open_controlnet = None
        if request.controlnet.units:
            _check_controlnet_mode(model, image)
            open_controlnet = self._controlnet_opener(request, params, context.time_remaining())
        resume_from = checkpoint.from_proto(request.resume_from) if request.HasField("resume_from") else None

        previews = preview.options(request, model)  # None: no previews
        preview_vae = None  # method "tiny-vae": loaded and checked before the job starts
        if previews is not None and previews.method == "tiny-vae":
            preview_vae = await self.worker.run(self.preview_vaes.for_run, previews.preview_vae, model)
        loras = await lora.uses_of(self, model, request.loras, "denoiser")  # before the job starts
        job = self.tracker.start(request.job_id, total_steps=params.num_inference_steps,
                                 work=model.work(params, text.batch, image, resume_from))
        if request.finish_after_step > 0:
            job.finish_after_step = request.finish_after_step
        # LoRAs and tiling patch the UNet for the job's own thread only: such a job's forwards cannot run on another's.
        batcher = None if loras or request.tiling else self._step_batcher(model)

        def work(emit):
            denoiser = getattr(model, model.family.denoiser)
            steps = StepMessages(emit, request.step_message_interval_ms / 1000)
            with tracked(self.tracker, job), circular.tiling(request.tiling, denoiser), \
                    lora.applied({model.family.denoiser: denoiser}, loras):
                output = model.denoise(job, text, params, preview.emitter(steps, previews, model, params, preview_vae),
                                     image, open_controlnet,
                                     resume_from=resume_from, include_checkpoints=request.include_checkpoints,
                                     checkpoint_interval_s=limits.checkpoint_interval_s,
                                     **({"schedule": schedule} if schedule is not None else {}),
                                     **({"step_batcher": batcher} if batcher is not None else {}),
                                     compiled=not (loras or request.tiling))
            steps.flush()  # the last step before the result, if it was held back
            return output

        async for event in self.worker.stream(job, work):
            if isinstance(event, StepEvent):
                # Built in place: each message handed to a parent's constructor would be copied whole (the
                # checkpoint's latents: 1 MB per Flux step at 1024x1024), on the event loop's thread, which shares
                # the interpreter lock with the denoising loop.
                response = denoiser_pb2.DenoiseResponse()
                step = response.step
                step.step, step.total_steps = event.step, event.total_steps
                step.timestep, step.elapsed_seconds = event.timestep, event.elapsed_seconds
                if event.checkpoint is not None:
                    checkpoint.to_proto(event.checkpoint, into=step.checkpoint)
                if event.preview:
                    step.preview_image, step.preview_format = event.preview, event.preview_format
                yield response
            elif isinstance(event, DenoiseOutput):
                response = denoiser_pb2.DenoiseResponse()
                result = response.result
                tensors.to_proto(event.latents, "latents", into=result.latents)
                result.elapsed_seconds, result.height, result.width = event.elapsed_seconds, event.height, event.width
                result.scheduler = event.scheduler
                yield response

    def _step_batcher(self, model) -> StepBatcher | None:
        """The model's step batcher (the UNet's, or SD3's and Flux's transformer's); None when batching is off."""
        limits = self.config.extra
        if limits.step_batch_max <= 1 or not isinstance(model, (DenoiserModel, FlowDenoiser)):
            return None
        batcher = self._step_batchers.get(model)
        if batcher is None:
            flow = isinstance(model, FlowDenoiser)
            network = getattr(model, "compiled_network", None) or (model.transformer if flow else model.unet)
            batcher = StepBatcher(network, calling=TRANSFORMER if flow else UNET, max_rows=limits.step_batch_max,
                                  wait_s=limits.step_batch_wait_ms / 1000,
                                  observe=lambda jobs, rows: metrics.denoise_batch_jobs.observe(jobs))
            self._step_batchers[model] = batcher
        return batcher

    def _controlnet_opener(self, request: denoiser_pb2.DenoiseRequest, params: DenoiseParams, timeout):
        """A function the loop calls to open its ControlNet stream once it knows the run's fixed inputs."""
        conditioning = request.controlnet
        candidates = self.controlnet_replicas.candidates(conditioning.replica)

        def open_controlnet(*, prompt_embeds, batch_size, classifier_free_guidance, total_steps, add_text_embeds=None,
                            add_time_ids=None) -> ControlNetStream:
            added = {}
            if add_text_embeds is not None:  # SDXL: the ControlNet takes the UNet's added conditioning too
                added = dict(add_text_embeds=tensors.to_proto(add_text_embeds, "add_text_embeds"),
                             add_time_ids=tensors.to_proto(add_time_ids, "add_time_ids"))
            setup = controlnet_pb2.ControlNetSetup(
                job_id=request.job_id,
                units=conditioning.units,
                width=params.width,
                height=params.height,
                batch_size=batch_size,
                classifier_free_guidance=classifier_free_guidance,
                guess_mode=conditioning.guess_mode,
                prompt_embeds=tensors.to_proto(prompt_embeds, "prompt_embeds"),
                total_steps=total_steps,
                **added,
            )
            return self.controlnet_replicas.open(candidates, setup, timeout)

        return open_controlnet

    async def close(self) -> None:
        self.controlnet_replicas.close()
        await super().close()

    async def Finish(self, request: denoiser_pb2.FinishRequest, context):
        """Make a running Denoise of the job stop at a step boundary and return its latents as its result."""
        check_job_id(request.job_id)
        if not request.job_id:
            raise InvalidArgument("job_id is empty; name the job whose Denoise should finish",
                                  reason="INVALID_JOB_ID", metadata={"field": "job_id"})
        if request.after_step < 0:
            raise InvalidArgument(f"after_step is {request.after_step}; use 0 (the step in progress) or a step "
                                  "number", reason=INVALID_FINISH_STEP, metadata={"field": "after_step"})
        jobs = self.tracker.active(request.job_id)
        if not jobs:
            raise NotFound(f"no Denoise of job {quote(request.job_id)} is running here; it may have ended",
                           reason=DENOISE_NOT_RUNNING, metadata={"job_id": request.job_id[:64]})
        completed = max(job.completed_steps for job in jobs)
        after = min(job.finish_early(request.after_step) for job in jobs)
        return denoiser_pb2.FinishResponse(completed_steps=completed, after_step=after)

    async def DescribeModel(self, request: denoiser_pb2.DescribeModelRequest, context):
        """Say what a model is: its family, text encoders and defaults."""
        model = (await self.model_for(request.model)).model
        return model.describe()

    async def ListSchedulers(self, request: denoiser_pb2.ListSchedulersRequest, context):
        """Name the schedulers a model accepts."""
        model = (await self.model_for(request.model)).model
        return denoiser_pb2.ListSchedulersResponse(
            default_scheduler=model.default_scheduler, schedulers=model.schedulers
        )


def _text_conditioning(model, request: denoiser_pb2.DenoiseRequest, do_cfg: bool) -> TextConditioning:
    """The request's text conditioning: prompt_embeds for a single-encoder model, text_embeddings (combined as the
    family's pipeline does) for a multi-encoder one."""
    family = model.family
    if not family.multi_encoder:
        if request.text_embeddings:
            raise InvalidArgument(f"text_embeddings is set, but a {family.title} model has one text encoder; send its "
                                  "embeddings in prompt_embeds and negative_prompt_embeds",
                                  reason=INVALID_TEXT_EMBEDDINGS, metadata={"field": "text_embeddings"})
        prompt_embeds = tensors.from_proto(request.prompt_embeds, field="prompt_embeds", rank=3, dtypes=_FLOATS)
        negative = None
        if do_cfg and tensors.is_set(request.negative_prompt_embeds):
            negative = tensors.from_proto(
                request.negative_prompt_embeds, field="negative_prompt_embeds", rank=3, dtypes=_FLOATS
            )
        return TextConditioning(prompt_embeds, negative)
    if tensors.is_set(request.prompt_embeds) or tensors.is_set(request.negative_prompt_embeds):
        raise InvalidArgument(f"prompt_embeds is set, but a {family.title} model has several text encoders; send "
                              "the text encoder's per-encoder embeddings in text_embeddings",
                              reason=INVALID_TEXT_EMBEDDINGS, metadata={"field": "prompt_embeds"})
    parts: dict[str, EncoderParts] = {}
    for i, entry in enumerate(request.text_embeddings):
        if entry.encoder in parts:
            raise InvalidArgument(f"text_embeddings[{i}] repeats encoder {quote(entry.encoder)}; send one entry per "
                                  "encoder",
                                  reason=INVALID_TEXT_EMBEDDINGS, metadata={"field": f"text_embeddings[{i}].encoder"})
        decoded = {}
        for name, rank in (("prompt_embeds", 3), ("negative_prompt_embeds", 3), ("pooled_prompt_embeds", 2),
                           ("negative_pooled_prompt_embeds", 2)):
            if name.startswith("negative") and not do_cfg:
                continue  # ignored without guidance, as negative_prompt_embeds is
            value = getattr(entry, name)
            if entry.HasField(name) and tensors.is_set(value):
                decoded[name] = tensors.from_proto(value, field=f"text_embeddings[{i}].{name}", rank=rank,
                                                   dtypes=_FLOATS)
        parts[entry.encoder] = EncoderParts(**decoded)
    return combine(family, parts, do_cfg)


def _micro_conditioning(model, request: denoiser_pb2.DenoiseRequest) -> MicroConditioning | None:
    """SDXL's micro-conditioning, defaults filled as diffusers does; refused for a model without it."""
    if not request.HasField("micro_conditioning"):
        return None
    if model.family.name not in ("sdxl", "sdxl-refiner"):
        raise InvalidArgument(f"micro_conditioning is set, but a {model.family.title} model has no SDXL "
                              "micro-conditioning; leave it unset", reason="MICRO_CONDITIONING_NOT_SUPPORTED",
                              metadata={"field": "micro_conditioning"})
    from .sdxl import check_micro

    m = request.micro_conditioning
    micro = MicroConditioning(
        original_height=m.original_height, original_width=m.original_width, crop_top=m.crop_top,
        crop_left=m.crop_left, target_height=m.target_height, target_width=m.target_width,
        aesthetic_score=m.aesthetic_score if m.HasField("aesthetic_score") else 6.0,
        negative_aesthetic_score=m.negative_aesthetic_score if m.HasField("negative_aesthetic_score") else 2.5)
    check_micro(micro)
    return micro


def _check_controlnet_mode(model, image: ImageInputs | None) -> None:
    """ControlNet runs with SD 1.x/2.x (every mode) and with SDXL text-to-image."""
    family = model.family
    if family.name == "sd" or (family.name == "sdxl" and image is None):
        return
    what = "image-to-image and inpainting" if family.name == "sdxl" else "models"
    raise FailedPrecondition(f"this denoiser runs ControlNet with SD 1.x/2.x models and SDXL text-to-image, not with "
                             f"{family.title} {what}; remove the ControlNet units", reason="CONTROLNET_NOT_SUPPORTED",
                             metadata={"field": "controlnet.units"})


def _image_inputs(message: denoiser_pb2.ImageConditioning) -> ImageInputs:
    """Decode the init image's distributions and mask, or hand-off latents; shapes are checked against the model
    later."""
    if message.HasField("latents"):
        if message.HasField("image_latents") or message.HasField("mask") or message.HasField("masked_image_latents"):
            raise InvalidArgument("image.latents (a hand-off) cannot be combined with image.image_latents or a mask; "
                                  "send one or the other", reason="HANDOFF_MISMATCH",
                                  metadata={"field": "image.latents"})
        return ImageInputs(latents=tensors.from_proto(message.latents, field="image.latents", rank=4, dtypes=_FLOATS))
    if not message.HasField("image_latents"):
        raise InvalidArgument("image is set without image.image_latents; send the VAE service's Encode result",
                              reason="INVALID_TENSOR", metadata={"field": "image.image_latents"})

    def distribution(field: str, value):
        mean = tensors.from_proto(value.mean, field=f"image.{field}.mean", rank=4, dtypes=_FLOATS)
        std = tensors.from_proto(value.std, field=f"image.{field}.std", rank=4, dtypes=_FLOATS)
        return mean, std

    image_mean, image_std = distribution("image_latents", message.image_latents)
    inputs = dict(image_mean=image_mean, image_std=image_std, scaling_factor=message.image_latents.scaling_factor,
                  shift_factor=message.image_latents.shift_factor)
    if message.HasField("mask") or message.HasField("masked_image_latents"):
        if not (message.HasField("mask") and message.HasField("masked_image_latents")):
            raise InvalidArgument("inpainting needs both image.mask and image.masked_image_latents",
                                  reason="INVALID_TENSOR", metadata={"field": "image.mask"})
        inputs["masked_mean"], inputs["masked_std"] = distribution("masked_image_latents", message.masked_image_latents)
        inputs["mask"] = tensors.from_proto(message.mask, field="image.mask", rank=4, dtypes=_FLOATS)
    return ImageInputs(**inputs)
