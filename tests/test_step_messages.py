"""Step messages at most every step_message_interval_ms (services/denoiser/step_messages.py), and still one
DenoisingStep per step from the orchestrator, or one at most every GenerateRequest.step_event_interval_ms
(services/orchestrator/execution.py, _Progress).

The unit part drives StepMessages with a fixed clock; the rest calls the real denoiser and orchestrator of the
shared suite (tiny model) over gRPC.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwire.client import LatentwireError
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2 as pb
from services.denoiser import step_messages
from services.denoiser.model import DenoiseOutput, StepEvent
from services.orchestrator.execution import _Progress
from services.runtime import tensors

from metrics_helpers import scrape
from test_checkpoint_edges import _reason, _request
from test_interrupt import _cancel_at, _generate


def test_steps_sooner_than_the_interval_are_held_and_the_last_is_flushed(monkeypatch):
    clock = [64.0]  # binary fractions only: no rounding at the interval's edge
    monkeypatch.setattr(step_messages.time, "monotonic", lambda: clock[0])
    sent = []
    messages = step_messages.StepMessages(sent.append, 0.125)
    for step in range(1, 21):  # a step every 1/32 s: four steps to the interval
        clock[0] += 0.03125
        checkpoint = object() if step == 7 else None
        preview = b"jpeg" if step == 13 else b""
        messages(StepEvent(step=step, total_steps=20, timestep=1.0, elapsed_seconds=0.03125 * step,
                           checkpoint=checkpoint, preview=preview))
    output = DenoiseOutput(latents=torch.zeros(1), height=8, width=8, scheduler="x", elapsed_seconds=0.0)
    messages.flush()
    messages(output)  # anything else passes as it is
    # The first step; then a step once the interval passed since the last one sent; a checkpoint (7) and a
    # preview (13) always, each starting the interval again; the last step by flush; then the result.
    assert [e.step for e in sent[:-1]] == [1, 5, 7, 11, 13, 17, 20]
    assert sent[-1] is output
    messages.flush()  # nothing held: nothing sent
    assert len(sent) == 8

    every = []
    messages = step_messages.StepMessages(every.append, 0.0)
    for step in range(1, 6):
        messages(StepEvent(step=step, total_steps=5, timestep=1.0, elapsed_seconds=0.0))
    messages.flush()
    assert [e.step for e in every] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_the_denoiser_sends_fewer_step_messages_and_the_same_latents(suite, channel_to):
    stub = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))

    def run(**fields):
        responses = list(stub.Denoise(_request(**fields), timeout=120))
        steps = [r.step.step for r in responses if r.HasField("step")]
        assert responses[-1].HasField("result")
        return steps, tensors.from_proto(responses[-1].result.latents, field="latents")

    every_step, latents = run()
    assert every_step == [1, 2, 3, 4]
    held, held_latents = run(step_message_interval_ms=60_000)
    assert held == [1, 4]  # the first, then nothing within a minute but the last
    assert torch.equal(held_latents, latents)
    # A checkpoint on every step (the suite's denoiser: --checkpoint-interval-s default) is sent regardless.
    checkpointed, _ = run(step_message_interval_ms=60_000, include_checkpoints=True)
    assert checkpointed[0] == 1 and checkpointed[-1] == 4

    for value in (-1, 60_001):
        with pytest.raises(grpc.RpcError) as refused:
            run(step_message_interval_ms=value)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(refused.value) == "INVALID_STEP_MESSAGE_INTERVAL"
        assert "step_message_interval_ms" in refused.value.details()
    health = health_pb2_grpc.HealthStub(channel_to(suite.services["denoiser"].address)).Check(
        health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def _steps_observed(address: str) -> float:
    family = scrape(address).get("latentwire_denoise_step_seconds")
    return sum(s.value for s in (family.samples if family else []) if s.name.endswith("_count"))


@pytest.mark.slow
def test_generate_streams_one_denoising_step_per_step(suite, client):
    """The orchestrator (--denoiser-step-interval-ms 100 by default) asks for fewer step messages than steps at
    this model's 10 to 30 ms a step, and turns them back into one DenoisingStep per step, in order; the
    denoiser's step metric still counts every step."""
    denoiser_metrics = suite.services["denoiser"].metrics_address
    before = _steps_observed(denoiser_metrics)
    result = client.generate("a red circle", steps=20, seed=4, width=64, height=64)
    assert [s.step for s in result.steps] == list(range(1, 21))
    assert {s.total_steps for s in result.steps} == {20}
    elapsed = [s.elapsed_seconds for s in result.steps]
    assert elapsed == sorted(elapsed)
    assert _steps_observed(denoiser_metrics) - before == 20


def test_step_events_at_most_every_interval_keep_the_latest_step_the_last_and_previews():
    progress = _Progress(100)
    sent = []

    def message(latest: int, now: float, *, first: int, preview: bool = False, total: int = 20) -> None:
        """A denoiser message reporting ``latest`` (the steps since ``first`` with it) arriving at ``now``."""
        for number in range(first, latest + 1):
            if progress.sends(number, latest, total, now, preview=preview and number == latest):
                sent.append(number)

    message(3, 0.0625, first=1)  # the first message: its latest step
    message(6, 0.125, first=4)  # 62.5 ms later: held
    message(9, 0.1875, first=7)  # 125 ms after the last sent: its latest step
    message(10, 0.25, first=10, preview=True)  # a preview always
    message(12, 0.3125, first=11)  # 62.5 ms after the preview: held
    message(20, 0.375, first=13)  # the run's last step always
    assert sent == [3, 9, 10, 20]

    every = _Progress()
    assert all(every.sends(n, 5, 20, 0.0, preview=False) for n in range(1, 6))


@pytest.mark.slow
def test_generate_sends_step_events_at_most_every_interval_and_the_same_image(suite, client):
    """With step_event_interval_ms the caller gets the first step the orchestrator hears of, the steps with a
    preview and the last, nothing else within the interval; the image and the denoiser's step count are those
    of a run with every step. Out-of-range intervals are refused before a job is made."""
    settings = dict(steps=20, seed=9, width=64, height=64, include_pixels=True, preview_every=5)
    every = client.generate("a blue square", **settings)
    assert [s.step for s in every.steps] == list(range(1, 21))
    denoiser_metrics = suite.services["denoiser"].metrics_address
    before = _steps_observed(denoiser_metrics)
    fewer = client.generate("a blue square", step_event_interval_ms=60_000, **settings)
    steps = [s.step for s in fewer.steps]
    assert steps[-4:] == [5, 10, 15, 20] and len(steps) <= 5 and steps == sorted(set(steps))
    assert all(s.preview_image for s in fewer.steps if s.step % 5 == 0)
    assert {s.total_steps for s in fewer.steps} == {20}
    assert _steps_observed(denoiser_metrics) - before == 20
    assert np.array_equal(fewer.pixels, every.pixels) and fewer.images == every.images

    for value in (-1, 60_001):
        with pytest.raises(LatentwireError) as refused:
            client.generate("a blue square", steps=2, step_event_interval_ms=value)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.reason == "INVALID_STEP_EVENT_INTERVAL"
        assert "step_event_interval_ms" in refused.value.message
    assert len(client.generate("a blue square", steps=2, seed=1).steps) == 2  # still serving


@pytest.mark.slow
def test_a_run_that_ends_early_still_sends_its_last_step_before_the_result(suite, channel_to):
    """INTERRUPT at step 5 of 12 with a 60 s event interval: step 5 is not the planned last step, yet the caller
    gets it (held back, then sent before the result), so the last event says where the run stopped."""
    on_event = _cancel_at(pb.CANCEL_MODE_INTERRUPT, lambda e: e.HasField("accepted"), at_step=5)
    request = pb.GenerateRequest(prompt="a green triangle", seed=5, num_inference_steps=12, width=64, height=64,
                                 step_event_interval_ms=60_000)
    result, events = _generate(channel_to(suite.address), request, on_event)
    assert result is not None and result.finished_early and result.steps_run == 5
    steps = [e.step.step for e in events if e.HasField("step")]
    assert steps[-1] == 5 and len(steps) <= 2 and steps == sorted(set(steps))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("result") > max(i for i, kind in enumerate(kinds) if kind == "step")
