"""Progress streaming and cancellation across the running services."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwire.common.v1 import status_pb2, status_pb2_grpc
from job_helpers import wait_for
from services.runtime.errors import error_info_of

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

JobState = status_pb2.JobState


def _status(channel) -> status_pb2.GetStatusResponse:
    return status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)


def test_event_order(client):
    events = list(client.iter_events("a lighthouse at dusk", seed=5, steps=7, num_images=2))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and events[0].accepted.job_id and events[0].accepted.seed == 5
    assert kinds[1] == "text_encoded"
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.step for s in steps] == list(range(1, 8))
    assert all(s.total_steps == 7 for s in steps)
    assert all(a.elapsed_seconds <= b.elapsed_seconds for a, b in zip(steps, steps[1:]))
    assert kinds[2:9] == ["step"] * 7
    assert kinds[9:] == ["decoded", "result"]
    result = events[-1].result
    assert len(result.images) == 2 and all(i.png.startswith(b"\x89PNG") for i in result.images)
    assert {t.stage for t in result.timings} == {"text_encoder", "denoiser", "vae"}


def test_second_order_scheduler_reports_every_loop_iteration(client):
    events = list(client.iter_events("a tree", seed=5, steps=4, scheduler="HeunDiscreteScheduler"))
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    # Heun evaluates the UNet twice per step but once for the last: 2 * 4 - 1 loop iterations.
    assert [s.step for s in steps] == list(range(1, 8)) and steps[-1].total_steps == 7


def test_cancel_stops_denoiser_within_one_step(suite, client, channel_to):
    denoiser = channel_to(suite.services["denoiser"].address)
    steps_total = 900  # long enough that cancelling after a few steps is mid-run
    call = client.stream(
        client.build_request("a long run", seed=9, steps=steps_total, guidance_scale=7.5, width=256, height=256)
    )
    job_id, seen = "", 0
    for event in call:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            job_id = event.accepted.job_id
        elif kind == "step":
            seen = event.step.step
            if seen >= 5:
                break
    call.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        next(iter(call))
    assert raised.value.code() == grpc.StatusCode.CANCELLED

    def cancelled_job():
        status = _status(denoiser)
        if any(j.job_id == job_id for j in status.active_jobs):
            return None
        return next((j for j in status.recent_jobs if j.job_id == job_id), None)

    job = wait_for(cancelled_job, timeout=20.0)
    assert job.state == JobState.JOB_STATE_CANCELLED
    assert job.steps_at_cancel >= seen
    # The loop checks for cancellation before every step: at most the step under way finishes.
    assert job.completed_steps - job.steps_at_cancel <= 1, job
    assert job.completed_steps < steps_total

    # Every stage has freed the job and still serves.
    for name, service in suite.services.items():
        channel = channel_to(service.address)
        wait_for(lambda: not any(j.job_id == job_id for j in _status(channel).active_jobs), timeout=20.0)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    orchestrator_job = next(j for j in _status(channel_to(suite.address)).recent_jobs if j.job_id == job_id)
    assert orchestrator_job.state == JobState.JOB_STATE_CANCELLED

    # And the next request succeeds.
    assert len(client.generate("after the cancel", seed=1, steps=3).images) == 1


def test_a_stream_cancelled_from_another_thread_ends_at_once(suite, client, channel_to):
    """The client reads a stream on the thread that iterates it (base.SINGLE_THREADED_STREAMS), blocked in gRPC
    between events: cancel() from another thread (a UI's stop button) still ends that iteration at once, with
    CANCELLED, and the job with it. One event a minute at most, so nothing but the cancel can wake the reader."""
    import threading

    call = client.stream(client.build_request("a long wait", seed=4, steps=999, guidance_scale=7.5, width=64,
                                              height=64, step_event_interval_ms=60_000))
    events = iter(call)
    job_id = next(events).accepted.job_id
    cancelled_at = []
    timer = threading.Timer(1.0, lambda: (cancelled_at.append(time.monotonic()), call.cancel()))
    timer.start()
    try:
        with pytest.raises(grpc.RpcError) as raised:
            for _ in events:
                pass
        ended = time.monotonic()
    finally:
        timer.cancel()
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert cancelled_at and ended - cancelled_at[0] < 2.0, "the reader stayed blocked after cancel()"
    orchestrator = channel_to(suite.address)
    job = wait_for(lambda: next((j for j in _status(orchestrator).recent_jobs if j.job_id == job_id), None),
                   timeout=20.0)
    assert job.state == JobState.JOB_STATE_CANCELLED and job.completed_steps < 999, job


def test_deadline_cancels_the_job(suite, client, channel_to):
    # The deadline has to pass while the denoiser runs the job: give it what this machine needs, measured now,
    # to reach a first step (more on a loaded machine), and 1.5 s of steps; 900 steps take far longer.
    started, to_first_step = time.monotonic(), None
    for event in client.iter_events("warm up", seed=3, steps=1, guidance_scale=7.5, width=256, height=256):
        if event.WhichOneof("event") == "step" and to_first_step is None:
            to_first_step = time.monotonic() - started
    request = client.build_request("slow", seed=3, steps=900, guidance_scale=7.5, width=256, height=256)
    call = client._stub.Generate(request, timeout=2 * to_first_step + 1.5)
    job_id = ""
    with pytest.raises(grpc.RpcError) as raised:
        for event in call:
            if event.WhichOneof("event") == "accepted":
                job_id = event.accepted.job_id
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    denoiser = channel_to(suite.services["denoiser"].address)
    wait_for(lambda: not _status(denoiser).active_jobs, timeout=20.0)
    info = error_info_of(raised.value)
    if info is not None and info.reason == "DEADLINE_TOO_SHORT":
        # The denoiser's estimate (from the warm-up run) says 900 steps cannot fit: refused before it starts.
        assert not any(j.job_id == job_id for j in _status(denoiser).recent_jobs)
        return
    job = next(j for j in _status(denoiser).recent_jobs if j.job_id == job_id)
    assert job.state == JobState.JOB_STATE_CANCELLED and job.completed_steps < 900
