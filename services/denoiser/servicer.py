"""gRPC servicer for latentwire.denoiser.v1.DenoiserService: proto <-> domain, nothing else."""
from __future__ import annotations

import grpc

from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.services.runtime import tensors
from latentwire.services.runtime.server import ModelService
from latentwire.services.runtime.worker import tracked

from .model import DenoiseOutput, DenoiseParams, DenoiserModel, StepEvent, check_params

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)


class DenoiserService(ModelService, denoiser_pb2_grpc.DenoiserServiceServicer):
    """Runs denoising loops and streams their steps."""

    service_name = denoiser_pb2.DESCRIPTOR.services_by_name["DenoiserService"].full_name

    components = ("unet", "scheduler")

    def register(self, server: grpc.aio.Server) -> list[str]:
        denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> DenoiserModel:
        return DenoiserModel(spec, self.device, self.dtype, self.config.allow_pickle)

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest, context):
        """Run one denoising loop, streaming a DenoiseStep per step and the latents last."""
        model = (await self.model_for(request.model)).model
        limits = self.config.extra
        params = DenoiseParams(
            height=request.height or model.default_size,
            width=request.width or model.default_size,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            eta=request.eta,
            seed=request.seed,
            scheduler=request.scheduler,
        )
        check_params(params, max_steps=min(limits.max_steps, model.max_steps), max_image_size=limits.max_image_size)
        model.make_scheduler(params.scheduler)  # refuse an unknown scheduler before admitting the job
        do_cfg = model.do_classifier_free_guidance(params.guidance_scale)
        prompt_embeds = tensors.from_proto(request.prompt_embeds, field="prompt_embeds", rank=3, dtypes=_FLOATS)
        negative = None
        if do_cfg and tensors.is_set(request.negative_prompt_embeds):
            negative = tensors.from_proto(
                request.negative_prompt_embeds, field="negative_prompt_embeds", rank=3, dtypes=_FLOATS
            )
        model.check_embeds(prompt_embeds, negative, do_cfg, limits.max_batch)

        job = self.tracker.start(request.job_id, total_steps=params.num_inference_steps)

        def work(emit):
            with tracked(self.tracker, job):
                return model.denoise(job, prompt_embeds, negative, params, emit)

        async for event in self.worker.stream(job, work):
            if isinstance(event, StepEvent):
                yield denoiser_pb2.DenoiseResponse(
                    step=denoiser_pb2.DenoiseStep(
                        step=event.step,
                        total_steps=event.total_steps,
                        timestep=event.timestep,
                        elapsed_seconds=event.elapsed_seconds,
                    )
                )
            elif isinstance(event, DenoiseOutput):
                yield denoiser_pb2.DenoiseResponse(
                    result=denoiser_pb2.DenoiseResult(
                        latents=tensors.to_proto(event.latents, "latents"),
                        elapsed_seconds=event.elapsed_seconds,
                        height=event.height,
                        width=event.width,
                        scheduler=event.scheduler,
                    )
                )

    async def ListSchedulers(self, request: denoiser_pb2.ListSchedulersRequest, context):
        """Name the schedulers a model accepts."""
        model = (await self.model_for(request.model)).model
        return denoiser_pb2.ListSchedulersResponse(
            default_scheduler=model.default_scheduler, schedulers=model.schedulers
        )
