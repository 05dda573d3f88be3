"""Hires fix with an SDXL refiner, as AUTOMATIC1111 runs it (modules/sd_samplers_common.py apply_refiner, its
``hires_fix_refiner_pass`` setting; the request's hires.refiner_pass), on the suite's base + refiner hand-off
(denoising_end on the base's Denoise, denoising_start on the refiner's, as diffusers' SDXL pipelines).

A1111 swaps the refiner in once the pass it is enabled for reaches ``refiner_switch_at`` of the noise schedule
(by timestep, as diffusers' discrete timestep cutoff) and leaves it loaded for the rest of the job:

- "second pass" (the default): the first pass runs on the base alone; the upscaled latents are denoised again by
  the base (image-to-image at the hires strength, StableDiffusionXLImg2ImgPipeline with denoising_end) and the
  refiner continues them from refiner_switch_at (StableDiffusionXLImg2ImgPipeline with denoising_start, the
  second pass's steps). A second pass that starts below refiner_switch_at has no base step: A1111's refiner
  takes over at its first step, so the refiner runs all of it (image-to-image at the hires strength).
- "first pass" and "both passes": the first pass is the plain base + refiner hand-off; the refiner, still loaded,
  runs the whole second pass (image-to-image at the hires strength, its own text encoding; a pixel upscaler
  decodes and encodes with its VAE). Without a separate hires checkpoint (which latentwire has not) A1111 gives
  the same images for both choices; only the infotext differs.

Every Denoise draws from its own generator seeded with the job's seed, as separate diffusers pipeline calls.
"""
from __future__ import annotations

import dataclasses
import time

from latentwire.client import hires_refiner, samplers
from latentwire.denoiser.v1 import denoiser_pb2
from services.runtime.errors import LatentwireError

from . import hires, prompts

#: The denoiser's reason for a denoising_end that leaves no step (services/denoiser/model.py).
_NO_STEP_BEFORE_SWITCH = "INVALID_DENOISING_FRACTION"


def switches_in_first_pass(params) -> bool:
    """Whether the base hands off to the refiner in the first pass: always without a hires fix; with one, unless
    the refiner is enabled for the second pass only."""
    return bool(params.refiner) and (params.hires is None or params.hires.refiner_pass != hires_refiner.SECOND)


def progress_tail(params) -> float:
    """Steps after the first pass's (its refiner's, then the second pass's) as a share of the first pass's: the
    total shown while the first pass runs (exact once the next run's first step arrives)."""
    steps = params.num_inference_steps
    tail = params.hires.second_pass_steps(steps) / steps
    if switches_in_first_pass(params):
        tail = (tail + 1 - params.refiner_switch_at) / params.refiner_switch_at
    return tail


async def run(replicas, params, described: denoiser_pb2.DescribeModelResponse,
              refiner_described: denoiser_pb2.DescribeModelResponse, first: denoiser_pb2.DenoiseResult, encoded,
              guidance: float, job, progress):
    """The job's runs after its first pass (``first``: the base's result, handed off at refiner_switch_at unless
    the refiner's pass is the second) with the refiner as ``params.hires.refiner_pass`` says; yields load and step
    events, then the final DenoiseResult (at the hires size, to be decoded by the refiner's VAE).
    ``encoded``: the base's text conditioning."""
    from . import execution  # execution.py calls this module

    fix = params.hires
    started = time.perf_counter()
    if fix.refiner_pass != hires_refiner.SECOND:
        async for event in execution._refine(replicas, params, refiner_described, first, job, started, progress):
            if isinstance(event, denoiser_pb2.DenoiseResult):
                first = event
            else:
                yield event
        async for event in _refiner_second_pass(replicas, params, refiner_described, first, job, progress,
                                                loaded=True):
            yield event
        return

    if prompts.has_schedule(params):  # prompt editing over the second pass's steps, as A1111 (prompts.py)
        encoded = await execution._encode_text(replicas, params, params.model, described, guidance, job,
                                               hires_steps=fix.second_pass_steps(params.num_inference_steps))
    handed = None
    try:
        async for event in hires.second_pass(replicas, params, described, first, encoded, guidance, job, progress,
                                             denoising_end=params.refiner_switch_at):
            if isinstance(event, denoiser_pb2.DenoiseResult):
                handed = event
            else:
                yield event
    except LatentwireError as error:
        if error.reason != _NO_STEP_BEFORE_SWITCH or handed is not None:
            raise
    if handed is None:  # the second pass starts below refiner_switch_at: all of it is the refiner's
        async for event in _refiner_second_pass(replicas, params, refiner_described, first, job, progress):
            yield event
        return
    # The refiner continues the second pass's schedule (its steps and sampler) from refiner_switch_at.
    async for event in execution._refine(replicas, _second_pass_params(params), refiner_described, handed, job,
                                         started, progress):
        yield event


async def _refiner_second_pass(replicas, params, refiner_described, first: denoiser_pb2.DenoiseResult, job,
                               progress, *, loaded: bool = False):
    """The whole second pass on the refiner (on the job's "refiner" replica), with its own text encoding."""
    from . import execution

    guidance = execution._guidance(params, refiner_described)
    if not loaded:  # the refiner's text encoders and VAE (execution._refine loads them for a first-pass hand-off)
        keys = await replicas.pick_encoders(refiner_described.text_encoders)
        async for event in execution.load_model_on_stages(replicas, params.refiner, stage_names=("vae", *keys)):
            yield event
    hires_steps = params.hires.second_pass_steps(params.num_inference_steps) if prompts.has_schedule(params) else None
    encoded = await execution._encode_text(replicas, params, params.refiner, refiner_described, guidance, job,
                                           hires_steps=hires_steps)
    async for event in hires.second_pass(replicas, params, refiner_described, first, encoded, guidance, job,
                                         progress, run_on=params.refiner, stage="refiner"):
        yield event


def _second_pass_params(params):
    """``params`` with the second pass's steps and sampler, for the refiner's hand-off within that pass."""
    fix = params.hires
    changes = {"num_inference_steps": fix.steps or params.num_inference_steps}
    if fix.sampler:  # the hires sampler with its Automatic schedule type, as hires._set_sampler
        changes.update(sampler=fix.sampler, schedule_type=samplers.AUTOMATIC)
    return dataclasses.replace(params, **changes)
