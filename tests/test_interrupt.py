"""Finishing a job early (CancelJob with INTERRUPT / SKIP, services/orchestrator/interrupts.py): the sampling stops
at a step boundary, the latents as they are then are decoded, and the job succeeds with that image; it equals
diffusers' StableDiffusionPipeline whose callback_on_step_end sets ``pipe._interrupt`` at the same step."""
from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from latentwire.client.client import pixels_from_tensor
from latentwire.common.v1 import status_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc
from reference import _pipeline

TOLERANCE = 1e-5
PROMPT = "a photo of an astronaut riding a horse on the moon"


def _generate(channel, request: pb.GenerateRequest, on_event) -> tuple[pb.GenerateResult, list]:
    """Run Generate; ``on_event(event, stub)`` is called on every event (it may call CancelJob)."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    events, result = [], None
    for event in stub.Generate(request, timeout=120):
        events.append(event)
        on_event(event, stub)
        if event.HasField("result"):
            result = event.result
    return result, events


def _cancel_at(mode: int, trigger, at_step: int = 0):
    """An on_event that asks CancelJob(mode, at_step) once, on the first event ``trigger(event)`` accepts."""
    state = {"job": None, "answer": None}

    def on_event(event, stub):
        if event.HasField("accepted"):
            state["job"] = event.accepted.job_id
        if state["answer"] is None and trigger(event):
            state["answer"] = stub.CancelJob(pb.CancelJobRequest(name=f"jobs/{state['job']}", mode=mode,
                                                                 at_step=at_step), timeout=30)

    on_event.state = state
    return on_event


def _reference_interrupted(model, *, seed: int, steps: int, after: int, guidance_scale: float = 7.5,
                           width: int = 64, height: int = 64) -> np.ndarray:
    """diffusers with ``pipe._interrupt = True`` set by callback_on_step_end at loop index ``after - 1``: ``after``
    steps run, then the latents are decoded."""
    pipe = _pipeline(str(model))

    def callback(pipeline, i, t, kwargs):
        if i == after - 1:
            pipeline._interrupt = True
        return kwargs

    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                callback_on_step_end=callback).images


def test_interrupt_at_step_equals_diffusers_interrupted(suite, tiny_model, channel_to):
    """INTERRUPT at step 5 of 12, asked as the job is accepted (before the denoiser runs): the job SUCCEEDS with
    the image of 5 steps, equal to diffusers interrupted after its 5th step; later events say so."""
    channel = channel_to(suite.address)
    on_event = _cancel_at(pb.CANCEL_MODE_INTERRUPT, lambda e: e.HasField("accepted"), at_step=5)
    request = pb.GenerateRequest(prompt=PROMPT, seed=77, num_inference_steps=12, width=64, height=64,
                                 guidance_scale=7.5, include_pixels=True)
    result, events = _generate(channel, request, on_event)
    assert result is not None and result.finished_early and result.steps_run == 5
    steps = [e.step.step for e in events if e.HasField("step")]
    assert steps == [1, 2, 3, 4, 5]
    assert any(e.HasField("finish_requested") and e.finish_requested.at_step == 5 for e in events)
    expected = _reference_interrupted(tiny_model, seed=77, steps=12, after=5)
    pixels = pixels_from_tensor(result.pixels)
    assert pixels.shape == expected.shape
    assert float(np.abs(pixels - expected).max()) <= TOLERANCE
    # The infotext keeps the requested steps, as A1111's does.
    assert b"Steps: 12" in result.images[0].png
    job = on_event.state["answer"].job
    assert job.finish_mode == pb.CANCEL_MODE_INTERRUPT and job.finish_at_step == 5
    # The stored job agrees.
    stored = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).GetJob(
        pb.GetJobRequest(name=f"jobs/{on_event.state['job']}"), timeout=10).job
    assert stored.state == status_pb2.JOB_STATE_SUCCEEDED
    assert stored.result.finished_early and stored.result.steps_run == 5
    assert stored.finish_mode == pb.CANCEL_MODE_INTERRUPT and stored.finish_at_step == 5


def test_interrupt_at_step_while_sampling_equals_diffusers(suite, tiny_model, channel_to):
    """INTERRUPT at step 45 of 60 asked on step 1's event: the orchestrator tells the running denoiser (Finish), which
    stops after step 45 exactly; the image equals diffusers interrupted there."""
    channel = channel_to(suite.address)
    on_event = _cancel_at(pb.CANCEL_MODE_INTERRUPT, lambda e: e.HasField("step") and e.step.step == 1, at_step=45)
    request = pb.GenerateRequest(prompt=PROMPT, seed=8, num_inference_steps=60, width=64, height=64,
                                 guidance_scale=7.5, include_pixels=True)
    result, events = _generate(channel, request, on_event)
    assert result is not None and result.finished_early and result.steps_run == 45
    expected = _reference_interrupted(tiny_model, seed=8, steps=60, after=45)
    assert float(np.abs(pixels_from_tensor(result.pixels) - expected).max()) <= TOLERANCE


def test_interrupt_at_the_next_step_during_sampling(suite, channel_to):
    """INTERRUPT with no step while the denoiser samples (asked on step 2's event): the job ends soon after with an
    image; the later batch of batch_count does not run."""
    channel = channel_to(suite.address)
    on_event = _cancel_at(pb.CANCEL_MODE_INTERRUPT, lambda e: e.HasField("step") and e.step.step == 2)
    request = pb.GenerateRequest(prompt=PROMPT, seed=5, num_inference_steps=300, width=64, height=64,
                                 batch_count=2)
    result, events = _generate(channel, request, on_event)
    assert result is not None and result.finished_early
    assert len(result.images) == 1 and 2 <= result.steps_run < 300  # stopped in the first batch's run
    steps = [e.step.step for e in events if e.HasField("step")]
    assert steps[-1] == result.steps_run < 300


def test_skip_finishes_the_batch_and_runs_the_next(suite, tiny_model, channel_to):
    """SKIP at step 3 of batch 1 (4 steps each): batch 1's image is its 3-step image, batch 2 runs in full with
    its own seed, as A1111's skip does."""
    channel = channel_to(suite.address)
    on_event = _cancel_at(pb.CANCEL_MODE_SKIP, lambda e: e.HasField("accepted"), at_step=3)
    request = pb.GenerateRequest(prompt=PROMPT, seed=40, num_inference_steps=4, width=64, height=64,
                                 guidance_scale=7.5, batch_count=2, include_pixels=True)
    result, events = _generate(channel, request, on_event)
    assert result is not None and result.finished_early and result.steps_run == 3 + 4
    assert list(result.image_seeds) == [40, 41]
    pixels = pixels_from_tensor(result.pixels)
    first = _reference_interrupted(tiny_model, seed=40, steps=4, after=3)
    second = _reference_interrupted(tiny_model, seed=41, steps=4, after=4)
    assert float(np.abs(pixels[0:1] - first).max()) <= TOLERANCE
    assert float(np.abs(pixels[1:2] - second).max()) <= TOLERANCE


def test_interrupt_skips_the_hires_second_pass(suite, channel_to):
    """INTERRUPT during a hires fix's first pass: no second pass (A1111's sample_hr_pass returns the first pass's
    samples when interrupted), so the image has the first pass's size."""
    channel = channel_to(suite.address)
    on_event = _cancel_at(pb.CANCEL_MODE_INTERRUPT, lambda e: e.HasField("accepted"), at_step=2)
    request = pb.GenerateRequest(prompt=PROMPT, seed=3, num_inference_steps=4, width=64, height=64)
    request.hires.CopyFrom(pb.HiresFix(upscaler="Latent", scale=2.0, denoising_strength=0.5))
    result, _ = _generate(channel, request, on_event)
    assert result is not None and result.finished_early and result.steps_run == 2
    assert Image.open(io.BytesIO(result.images[0].png)).size == (64, 64)


def test_finish_early_is_refused_for_a_running_grid_job(suite, channel_to):
    """A grid job's cells are separate runs: INTERRUPT on it is FAILED_PRECONDITION (cancel it instead), and nothing
    is stored on the job."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    request = pb.GenerateRequest(prompt=PROMPT, seed=1, num_inference_steps=300, width=64, height=64)
    request.grid.x.CopyFrom(pb.GridAxis(type="Seed", values=["1", "2"]))
    call = stub.Generate(request, timeout=120)
    name = ""
    for event in call:
        if event.HasField("accepted"):
            name = f"jobs/{event.accepted.job_id}"
        if event.HasField("step"):
            break
    with pytest.raises(grpc.RpcError) as refused:
        stub.CancelJob(pb.CancelJobRequest(name=name, mode=pb.CANCEL_MODE_INTERRUPT), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "grid" in refused.value.details()
    assert stub.GetJob(pb.GetJobRequest(name=name), timeout=10).job.finish_mode == pb.CANCEL_MODE_UNSPECIFIED
    # CANCELLED, or still RUNNING when the job did not stop within CancelJob's 2 s (a loaded machine).
    state = stub.CancelJob(pb.CancelJobRequest(name=name), timeout=10).job.state
    assert state in (status_pb2.JOB_STATE_CANCELLED, status_pb2.JOB_STATE_RUNNING)
    deadline = time.monotonic() + 60
    while stub.GetJob(pb.GetJobRequest(name=name), timeout=10).job.state != status_pb2.JOB_STATE_CANCELLED:
        assert time.monotonic() < deadline, "the grid job was not cancelled"
        time.sleep(0.05)
    call.cancel()


def test_an_older_sqlite_store_gets_the_finish_columns(tmp_path):
    """A job store written before finish_mode / finish_at_step existed: its jobs read as never asked to finish; a
    request stored later reads back (a later SKIP keeps a stored INTERRUPT, as interrupts.EarlyFinish does)."""
    import sqlite3

    from services.orchestrator.jobs import JobStore, _job_proto

    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, state TEXT NOT NULL, "
                "priority INTEGER NOT NULL, request BLOB NOT NULL, seed TEXT NOT NULL, model TEXT NOT NULL, "
                "prompt TEXT NOT NULL, create_time REAL NOT NULL, start_time REAL, end_time REAL, deadline REAL, "
                "completed_steps INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, "
                "attempts INTEGER NOT NULL DEFAULT 0, result BLOB, error_code INTEGER, error_message TEXT, "
                "error_reason TEXT, owner TEXT NOT NULL DEFAULT 'anonymous')")
    old.execute("INSERT INTO jobs (job_id, seq, state, priority, request, seed, model, prompt, create_time) "
                "VALUES ('old', 1, 'JOB_STATE_RUNNING', 0, x'', '7', 'm', 'p', 0)")
    old.commit()
    old.close()
    store = JobStore(path)
    job = _job_proto(store.row("old", with_result=False), None)
    assert (job.seed, job.owner, job.finish_mode, job.finish_at_step) == (7, "anonymous", 0, 0)
    store.record_finish("old", pb.CANCEL_MODE_INTERRUPT, 4)
    store.record_finish("old", pb.CANCEL_MODE_SKIP, 6)
    job = _job_proto(store.row("old", with_result=False), None)
    assert (job.finish_mode, job.finish_at_step) == (pb.CANCEL_MODE_INTERRUPT, 6)
    (page,) = store.page(None, 10, 0)
    assert _job_proto(page, None).finish_mode == pb.CANCEL_MODE_INTERRUPT
    assert store.unfinished()[0][-2:] == (pb.CANCEL_MODE_INTERRUPT, 6)
    store.close()


def test_cancel_request_rules(suite, channel_to):
    """at_step with CANCEL, a negative at_step or an unknown mode: INVALID_ARGUMENT; Finish on a denoiser that
    runs no such job: NOT_FOUND."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    for request in (pb.CancelJobRequest(name="jobs/x", at_step=3),
                    pb.CancelJobRequest(name="jobs/x", mode=pb.CANCEL_MODE_INTERRUPT, at_step=-1),
                    pb.CancelJobRequest(name="jobs/x", mode=9)):
        with pytest.raises(grpc.RpcError) as error:
            stub.CancelJob(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    denoiser = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))
    with pytest.raises(grpc.RpcError) as error:
        denoiser.Finish(denoiser_pb2.FinishRequest(job_id="no-such-job"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
