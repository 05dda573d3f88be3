"""Step messages at most every step_message_interval_ms (services/denoiser/step_messages.py), and still one
DenoisingStep per step from the orchestrator.

The unit part drives StepMessages with a fixed clock; the rest calls the real denoiser and orchestrator of the
shared suite (tiny model) over gRPC.
"""
from __future__ import annotations

import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.denoiser import step_messages
from services.denoiser.model import DenoiseOutput, StepEvent
from services.runtime import tensors

from test_checkpoint_edges import _reason, _request


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
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "latentwire_denoise_step_seconds":
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return 0.0


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
