"""Batch count (AUTOMATIC1111's "Batch count"): a job of batch_count batches of num_images runs the batches one
after another, batch i with seed seed + i * num_images as A1111 counts seeds (within one batch the images come
from one draw of the batch's generator, as diffusers draws them). The batches' progress counts on across them and
their images are gathered into one result, each with the seed of the batch that made it (its PNG infotext says
that seed, so the image can be made again on its own)."""
from __future__ import annotations

import dataclasses
import time
from typing import AsyncIterator, Callable

from latentwire.orchestrator.v1 import orchestrator_pb2
from services.runtime.errors import InvalidArgument

from . import interrupts

#: Most batches one job runs (AUTOMATIC1111's slider goes to 100).
MAX_BATCH_COUNT = 100


def check_batch_count(batch_count: int, seed: int, num_images: int) -> None:
    """1 to MAX_BATCH_COUNT batches, whose seeds stay below 2 ** 64."""
    if not 1 <= batch_count <= MAX_BATCH_COUNT:
        raise InvalidArgument(f"batch_count is {batch_count}; use 1 to {MAX_BATCH_COUNT}",
                              reason="INVALID_BATCH_COUNT", metadata={"field": "batch_count"})
    if seed + (batch_count - 1) * num_images >= 2**64:
        raise InvalidArgument(f"seed {seed} with {batch_count} batches of {num_images} runs past the largest seed "
                              "(2^64 - 1); use a smaller seed", reason="INVALID_BATCH_COUNT",
                              metadata={"field": "seed"})


async def run_batches(run: Callable, stages, params, job, deadline) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
    """Run ``run`` (execution.run_generation) once per batch; relay its events with the step counts of the whole
    job; yield one GenerateResult with every batch's images last."""
    started = time.perf_counter()
    count = params.batch_count
    results: list[orchestrator_pb2.GenerateResult] = []
    finish = interrupts.of(job)
    for i in range(count):
        if i and finish is not None and finish.stops_batches(job.completed_steps):
            break  # interrupted (interrupts.py): the batches so far are the result
        batch = dataclasses.replace(params, seed=params.seed + i * params.num_images, batch_count=1)
        async for event in run(stages, batch, job, deadline):
            if event.HasField("result"):
                results.append(event.result)
                continue
            if event.HasField("step"):  # the batches run the same steps: the job's total is count times a batch's
                step = event.step
                step.step, step.total_steps = i * step.total_steps + step.step, count * step.total_steps
                job.completed_steps, job.total_steps = step.step, step.total_steps
            yield event
    yield orchestrator_pb2.GenerateResponse(result=merge(results, params.seed, time.perf_counter() - started))


def merge(results: list[orchestrator_pb2.GenerateResult], seed: int, seconds: float) -> orchestrator_pb2.GenerateResult:
    """The batches' results as one: images in batch order re-indexed, their seeds, stage times summed, pixels
    concatenated along the image axis."""
    merged = orchestrator_pb2.GenerateResult(seed=seed, total_seconds=seconds, model=results[0].model)
    timings: dict[str, float] = {}
    for result in results:
        for image, image_seed in zip(result.images, result.image_seeds):
            merged.images.add(png=image.png, index=len(merged.images))
            merged.image_seeds.append(image_seed)
        for timing in result.timings:
            timings[timing.stage] = timings.get(timing.stage, 0.0) + timing.seconds
    merged.timings.extend(orchestrator_pb2.StageTiming(stage=stage, seconds=s) for stage, s in timings.items())
    if results[0].HasField("pixels"):
        merged.pixels.CopyFrom(results[0].pixels)
        merged.pixels.shape[0] = sum(r.pixels.shape[0] for r in results)
        merged.pixels.raw_contents = b"".join(r.pixels.raw_contents for r in results)
    return merged
