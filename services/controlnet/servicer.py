"""gRPC servicer for latentwire.controlnet.v1.ControlNetService: proto <-> domain, nothing else."""
from __future__ import annotations

import asyncio

import grpc

from latentwire.common.v1 import status_pb2
from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from services.runtime import images, limits, tensors
from services.runtime.config import ServiceConfig
from services.runtime.errors import Cancelled, InvalidArgument
from services.runtime.server import ModelService

from . import preprocessors
from .model import (
    ControlNet,
    Limits,
    ResidualsRun,
    RunSettings,
    UnitSettings,
    check_preview_size,
    check_settings,
    control_image,
    resize_preview,
)

_FLOATS = (tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT16, tensors.DataType.DATA_TYPE_BFLOAT16)
JobState = status_pb2.JobState


class ControlNetService(ModelService, controlnet_pb2_grpc.ControlNetServiceServicer):
    """Computes ControlNet residuals step by step for the denoiser, and runs control-image preprocessors."""

    service_name = controlnet_pb2.DESCRIPTOR.services_by_name["ControlNetService"].full_name

    #: A ControlNet folder is one model with its files at the top (registry kind MODEL_KIND_CONTROLNET).
    components = ()

    def __init__(self, config: ServiceConfig):
        super().__init__(config)
        extra = config.extra
        self.limits = Limits(max_image_size=extra.max_image_size, max_batch=extra.max_batch,
                             max_units=extra.max_units, max_input_pixels=extra.max_input_pixels)

    def register(self, server: grpc.aio.Server) -> list[str]:
        controlnet_pb2_grpc.add_ControlNetServiceServicer_to_server(self, server)
        return [self.service_name, self.register_loader(server)]

    def load_model(self, spec) -> ControlNet:
        # A folder it cannot use raises ModelFolderError: the process refuses to start with it, a request
        # loading the model gets FAILED_PRECONDITION (services/runtime/models.py).
        return ControlNet(spec, self.device, self.dtype, self.config.allow_pickle)

    async def ComputeResiduals(self, request_iterator, context):
        """Serve one denoising run: answer the setup with ControlNetReady, then each step with its residuals.

        The run is a job (GetStatus): SUCCEEDED when the caller closes its side after every step
        of the run was answered, CANCELLED when the call is cancelled or the caller closes it
        early (a cancel can reach us as a plain end of the request stream, so the two cannot be
        told apart), FAILED when a request is refused or the computation fails (the stream then
        ends with the error).
        """
        first = await _next_request(request_iterator)
        if first is None:
            return
        if first.WhichOneof("input") != "setup":
            raise InvalidArgument("the first ComputeResiduals message must carry the setup; a step came first",
                                  reason="SETUP_REQUIRED")
        setup = first.setup
        limits.check_job_id(setup.job_id, "setup.job_id")
        settings = _run_settings(setup)
        check_settings(settings, self.limits)
        prompt_embeds = tensors.from_proto(setup.prompt_embeds, field="prompt_embeds", rank=3, dtypes=_FLOATS)
        added = {name: tensors.from_proto(getattr(setup, name), field=name, rank=2, dtypes=_FLOATS)
                 for name in ("add_text_embeds", "add_time_ids") if setup.HasField(name)}

        job = self.tracker.start(setup.job_id, total_steps=setup.total_steps)
        answered: set[int] = set()
        try:
            loaded = [await self.model_for(unit.model) for unit in setup.units]
            run = await self.worker.run(ResidualsRun, settings, [m.model for m in loaded], prompt_embeds, self.limits,
                                        added.get("add_text_embeds"), added.get("add_time_ids"))
            yield controlnet_pb2.ComputeResidualsResponse(
                ready=controlnet_pb2.ControlNetReady(guess_mode=run.guess_mode, models=[m.spec.name for m in loaded]))
            async for request in request_iterator:
                if request.WhichOneof("input") != "step":
                    raise InvalidArgument("only the first ComputeResiduals message may carry a setup; send steps",
                                          reason="SETUP_REPEATED")
                job.raise_if_cancelled()  # the service is shutting down
                response = await self.worker.run(_step, run, request.step, job=job)
                answered.add(request.step.step_index)
                job.completed_steps = len(answered)
                yield response
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            job.cancel()
            self.tracker.finish(job, JobState.JOB_STATE_CANCELLED)
            raise
        except BaseException:
            self.tracker.finish(job, JobState.JOB_STATE_FAILED)
            raise
        if len(answered) < settings.total_steps:
            job.cancel()
            self.tracker.finish(job, JobState.JOB_STATE_CANCELLED)
        else:
            self.tracker.finish(job, JobState.JOB_STATE_SUCCEEDED)

    async def Preprocess(self, request: controlnet_pb2.PreprocessRequest, context) -> controlnet_pb2.PreprocessResponse:
        """Run one unit's preprocessor on its image; return the control image as a PNG (resized when asked)."""
        unit = _unit_settings(request.unit)
        limits.check_preprocessor(unit.preprocessor, unit.preprocessor_options)
        check_preview_size(request.width, request.height, self.limits.max_image_size)

        def work(job):
            image = control_image(unit, "unit.image", self.limits.max_input_pixels)
            return images.encode_png(resize_preview(image, request.width, request.height))

        return controlnet_pb2.PreprocessResponse(png=await self.run_job("", work))

    async def ListPreprocessors(self, request, context) -> controlnet_pb2.ListPreprocessorsResponse:
        """Name every preprocessor with its options, defaults and ranges."""
        return controlnet_pb2.ListPreprocessorsResponse(preprocessors=[
            controlnet_pb2.Preprocessor(
                name=p.name,
                description=p.description,
                options=[controlnet_pb2.PreprocessorOption(name=o.name, default_value=o.default, min_value=o.min_value,
                                                           max_value=o.max_value, description=o.description)
                         for o in p.options],
            )
            for p in sorted(preprocessors.PREPROCESSORS.values(), key=lambda p: p.name)
        ])


async def _next_request(request_iterator):
    try:
        return await request_iterator.__anext__()
    except StopAsyncIteration:
        return None


def _unit_settings(unit: controlnet_pb2.ControlNetUnit) -> UnitSettings:
    return UnitSettings(
        image=unit.image,
        preprocessor=unit.preprocessor,
        preprocessor_options=dict(unit.preprocessor_options),
        conditioning_scale=unit.conditioning_scale if unit.HasField("conditioning_scale") else 1.0,
        guidance_start=unit.guidance_start if unit.HasField("guidance_start") else 0.0,
        guidance_end=unit.guidance_end if unit.HasField("guidance_end") else 1.0,
    )


def _run_settings(setup: controlnet_pb2.ControlNetSetup) -> RunSettings:
    return RunSettings(
        units=[_unit_settings(unit) for unit in setup.units],
        width=setup.width,
        height=setup.height,
        batch_size=setup.batch_size,
        classifier_free_guidance=setup.classifier_free_guidance,
        guess_mode=setup.guess_mode,
        total_steps=setup.total_steps,
    )


def _step(run: ResidualsRun, step: controlnet_pb2.ControlNetStepInput) -> controlnet_pb2.ComputeResidualsResponse:
    """Decode one step's input, compute, encode the answer (blocking: on the worker pool)."""
    sample = tensors.from_proto(step.sample, field="step.sample", rank=4, dtypes=_FLOATS)
    result = run.step(step.step_index, step.timestep, sample)
    if result is None:
        return controlnet_pb2.ComputeResidualsResponse(
            residuals=controlnet_pb2.ControlNetResiduals(step_index=step.step_index, active=False))
    return controlnet_pb2.ComputeResidualsResponse(residuals=controlnet_pb2.ControlNetResiduals(
        step_index=step.step_index,
        active=True,
        down_block_residuals=[tensors.to_proto(t, f"down_block_residuals[{i}]")
                              for i, t in enumerate(result.down_block_residuals)],
        mid_block_residual=tensors.to_proto(result.mid_block_residual, "mid_block_residual"),
        compute_seconds=result.compute_seconds,
    ))
