"""Cancellation within one step and failover with a bit-identical resume hold for Flux as they do for SD 1.5
(issue 12, "Acceptance"; tests/test_work_stops.py and tests/test_failover.py are the SD 1.5 versions).

- The family suite's denoiser (tests/family_suite.py, its own process) running the tiny Flux: a caller that
  cancels its Denoise call in the middle of a transformer step (at 512x512 the attention over 65536 packed tokens
  takes minutes on this CPU) frees the denoiser within a bounded time, with no step done.
- Text encoder, VAE and two Flux denoiser replicas behind an orchestrator with a placement file: killing the
  replica that runs a job (kill -9, mid-run) resumes the job from its last checkpoint on the other replica, and
  its pixels equal an uninterrupted run's exactly (and FluxPipeline's within 1e-5). The denoisers checkpoint
  every 0.1 s (--checkpoint-interval-s), not every step, so a resumed run may repeat the steps after its
  checkpoint; the caller still sees every step once.
"""
from __future__ import annotations

import os
import re
import signal
import time

import grpc
import numpy as np
import pytest
import torch

from latentwire.client import Client
from latentwire.common.v1 import embeddings_pb2, model_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.runtime import tensors
from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, wait_serving

from family_suite import FLUX
from reference import reference_family_pixels
from test_failover import DEVICES, KILL_AFTER_STEP, STEP_TIMEOUT_S, Cluster, _jobs, run, start_replicas, \
    write_placement
from test_work_stops import FREED_WITHIN_S, JobState, _status, _wait_active, _wait_freed

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

PROMPT = "a lighthouse on a cliff at dusk"


# ---- cancellation within one step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_denoiser(family_suite):
    """A channel to the family suite's denoiser (its own process), which fetches the tiny Flux from the registry
    on first use."""
    channel = grpc.insecure_channel(family_suite.services["denoiser"].address,
                                    options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    yield channel
    channel.close()


def flux_request(job_id: str, size: int, steps: int = 2) -> denoiser_pb2.DenoiseRequest:
    """A Flux DenoiseRequest with made-up text embeddings of the tiny model's sizes: CLIP's pooled output (32)
    and 16 T5 tokens (32); no classifier-free guidance, guidance 3.5 embedded."""
    generator = torch.Generator().manual_seed(0)
    pooled, t5 = torch.randn(1, 32, generator=generator), torch.randn(1, 16, 32, generator=generator)
    return denoiser_pb2.DenoiseRequest(
        model=model_pb2.ModelReference(name=FLUX), job_id=job_id, height=size, width=size, num_inference_steps=steps,
        guidance_scale=3.5, seed=1,
        text_embeddings=[
            embeddings_pb2.EncoderEmbeddings(encoder="text_encoder",
                                             pooled_prompt_embeds=tensors.to_proto(pooled, "pooled_prompt_embeds")),
            embeddings_pb2.EncoderEmbeddings(encoder="text_encoder_2",
                                             prompt_embeds=tensors.to_proto(t5, "prompt_embeds")),
        ])


def test_flux_denoise_returns_unpacked_latents(flux_denoiser):
    """The request the cancellation test sends is a valid one: at a small size it runs to its latents."""
    responses = list(denoiser_pb2_grpc.DenoiserServiceStub(flux_denoiser).Denoise(flux_request("small-32", 32),
                                                                                  timeout=120))
    assert [r.step.step for r in responses if r.WhichOneof("event") == "step"] == [1, 2]
    latents = tensors.from_proto(responses[-1].result.latents, field="latents")
    assert tuple(latents.shape) == (1, 16, 32, 32)  # unpacked [B, C, H/f, W/f]; the tiny VAE's f is 1


def test_a_caller_that_cancels_mid_step_frees_the_flux_denoiser(flux_denoiser, record_property):
    # 512x512 latents are 65536 packed tokens: one step's attention takes minutes on one core.
    call = denoiser_pb2_grpc.DenoiserServiceStub(flux_denoiser).Denoise(flux_request("flux-cancel-512", 512),
                                                                        timeout=600)
    _wait_active(flux_denoiser, "flux-cancel-512")
    time.sleep(0.5)  # well inside the first step
    cancelled = time.monotonic()
    call.cancel()
    _, job = _wait_freed(flux_denoiser, "flux-cancel-512", FREED_WITHIN_S)
    record_property("flux_512_freed_after_cancel_s", round(time.monotonic() - cancelled, 2))
    assert job.state == JobState.JOB_STATE_CANCELLED and job.steps_at_cancel == 0 and job.completed_steps == 0
    assert not _status(flux_denoiser).active_jobs


# ---- failover -----------------------------------------------------------------------------------------------

#: 96x96: about 0.1 to 0.2 s a step on an idle core, so that the kill after step 4 lands well before the end.
SIZE, STEPS, SEED = 96, 16, 11
#: The denoisers' --checkpoint-interval-s: not every step (a resume may repeat steps after its checkpoint), but
#: short enough that the 4 steps before the kill always take one.
CHECKPOINT_INTERVAL_S = 0.1


@pytest.fixture(scope="module")
def flux_cluster(tiny_family_models, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("flux-failover-logs")
    services, args = start_replicas(tiny_family_models["flux"], log_dir, checkpoint_interval_s=CHECKPOINT_INTERVAL_S)
    cluster = Cluster(services, args, log_dir)
    try:
        placement = write_placement(log_dir / "placement.yaml", services)
        cluster.services["orchestrator"] = start_service("orchestrator", ORCHESTRATOR_MODULE, [
            "--port", "0", "--placement", str(placement), "--replica-wait-s", "60",
            "--step-timeout-s", str(STEP_TIMEOUT_S),
            # The kill is timed by the step events this test sees, and the resume point is checked against that
            # step: the denoiser must report every step as it ends (by default it reports at most every 100 ms,
            # so a step seen here may be one or two behind the loop, whose next checkpoint then comes after it).
            "--denoiser-step-interval-ms", "0",
        ], log_dir=log_dir)
        for name, service in cluster.services.items():
            wait_serving(service.address, 300, name, service.process)
        yield cluster
    finally:
        cluster.stop()


def flux_generate_request():
    return Client.build_request(PROMPT, seed=SEED, steps=STEPS, width=SIZE, height=SIZE, guidance_scale=4.0,
                                include_pixels=True)


def test_kill_9_mid_flux_job_resumes_on_the_other_replica_identically(flux_cluster, tiny_family_models,
                                                                      record_property):
    _, expected, steps = run(flux_cluster, flux_generate_request())
    assert steps == list(range(1, STEPS + 1))
    reference = reference_family_pixels("FluxPipeline", tiny_family_models["flux"], PROMPT, seed=SEED, steps=STEPS,
                                        width=SIZE, height=SIZE, guidance_scale=4.0)
    assert expected.shape == reference.shape and float(np.abs(expected - reference).max()) <= 1e-5

    killed: dict[str, float | str] = {}
    step_times: dict[int, float] = {}

    def kill_after_a_few_steps(job_id: str, step: int) -> None:
        step_times[step] = time.monotonic()
        if step == KILL_AFTER_STEP:
            name = flux_cluster.replica_running(job_id)
            assert name is not None, "no denoiser replica reports the job as running"
            os.kill(flux_cluster.services[name].process.pid, signal.SIGKILL)
            killed.update(name=name, at=time.monotonic())

    job_id, pixels, steps = run(flux_cluster, flux_generate_request(), kill_after_a_few_steps)
    assert killed, "the job finished before the kill"
    victim = str(killed["name"])
    survivor = next(name for name in DEVICES if name != victim)
    assert flux_cluster.services[victim].process.wait(10) == -signal.SIGKILL
    # Resumed from a checkpoint taken before the kill, not restarted; every step relayed exactly once, in order.
    resumed = re.findall(rf"job {job_id}: resuming the denoiser after step (\d+)",
                         (flux_cluster.log_dir / "orchestrator.log").read_text())
    assert len(resumed) == 1 and 0 < int(resumed[0]) <= KILL_AFTER_STEP, resumed
    assert steps == list(range(1, STEPS + 1))
    assert job_id in _jobs(flux_cluster.channel(flux_cluster.services[survivor].address), recent=True)
    difference = float(np.abs(pixels - expected).max())
    assert difference == 0.0, f"max abs difference {difference} after failover"
    record_property("flux_failover_seconds_after_kill", round(step_times[KILL_AFTER_STEP + 1] - float(killed["at"]), 3))
