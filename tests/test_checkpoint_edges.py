"""A tampered resume_from checkpoint is INVALID_ARGUMENT naming what is wrong, and the denoiser keeps serving.

The checkpoint comes from the caller, so its scheduler state is checked against this run's freshly prepared
scheduler (attribute forms, tensor shapes and dtypes, step indexes) and its JSON is bounded before parsing.
Each case starts from a real checkpoint the denoiser sent and changes one thing.
"""
from __future__ import annotations

import json

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from latentwire.common.v1 import tensor_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.runtime import tensors

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

STEPS = 4


def _embeds() -> tensor_pb2.Tensor:
    return tensors.to_proto(torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(3)), "embeds")


def _request(**fields) -> denoiser_pb2.DenoiseRequest:
    base = dict(prompt_embeds=_embeds(), negative_prompt_embeds=_embeds(), height=64, width=64,
                num_inference_steps=STEPS, guidance_scale=3.0, seed=21, scheduler="EulerDiscreteScheduler")
    base.update(fields)
    return denoiser_pb2.DenoiseRequest(**base)


def _reason(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def _forged(checkpoint: denoiser_pb2.DenoiseCheckpoint, *, attributes=None, text=None,
            tensor=None, **fields) -> denoiser_pb2.DenoiseCheckpoint:
    """A copy of ``checkpoint`` with its attributes (a dict, or raw JSON ``text``), tensors or fields replaced."""
    forged = denoiser_pb2.DenoiseCheckpoint()
    forged.CopyFrom(checkpoint)
    if attributes is not None:
        text = json.dumps({**json.loads(checkpoint.scheduler_state.attributes_json), **attributes})
    if text is not None:
        forged.scheduler_state.attributes_json = text
    if tensor is not None:
        forged.scheduler_state.tensors.append(tensors.to_proto(tensor, "sigmas"))
    for name, value in fields.items():
        setattr(forged, name, value)
    return forged


@pytest.fixture(scope="module")
def run(suite):
    """The real denoiser's stub, a real checkpoint after step 2 of 4, and the uninterrupted run's latents."""
    with grpc.insecure_channel(suite.services["denoiser"].address) as channel:
        stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)
        responses = list(stub.Denoise(_request(include_checkpoints=True), timeout=120))
        taken = [r.step for r in responses if r.HasField("step")][1].checkpoint
        assert taken.completed_steps == 2 and "_step_index" in taken.scheduler_state.attributes_json
        whole = tensors.from_proto([r for r in responses if r.HasField("result")][-1].result.latents,
                                   field="latents")
        yield stub, taken, whole


def _sigmas(tensor: torch.Tensor):
    """Forge the scheduler's ``sigmas`` (a tensor the fresh scheduler holds, [steps + 1] float32) as ``tensor``."""
    def forge(taken):
        return _forged(taken, attributes={"sigmas": {"tensor": len(taken.scheduler_state.tensors)}}, tensor=tensor)
    return forge


#: (id, how to forge the taken checkpoint, words the message must hold)
NEW_CASES = [
    ("step-index-past-the-end", lambda t: _forged(t, attributes={"_step_index": 1_000_000_000}),
     ["_step_index", "outside 0 to 4"]),
    ("step-index-1e9", lambda t: _forged(t, attributes={"_step_index": 1e9}), ["_step_index", "whole number"]),
    ("negative-step-index", lambda t: _forged(t, attributes={"_step_index": -1}), ["_step_index", "outside 0 to 4"]),
    ("empty-sigmas", _sigmas(torch.zeros(0)), ["sigmas", "[0] float32", "[5] float32"]),
    ("sigmas-of-the-wrong-length", _sigmas(torch.ones(3)), ["sigmas", "[3] float32"]),
    # 100000 levels are over the size bound already, so it answers first; 4000 levels fit in the size.
    ("deeply-nested-json", lambda t: _forged(t, text="[" * 100_000 + "]" * 100_000), ["attributes_json", "characters"]),
    ("nested-json-within-the-size", lambda t: _forged(t, text="[" * 4000 + "]" * 4000), ["nests", "deep"]),
    ("nested-json-in-an-attribute",
     lambda t: _forged(t, text='{"_step_index": ' + "[" * 5000 + "]" * 5000 + "}"), ["nests", "deep"]),
    ("huge-json", lambda t: _forged(t, text='{"x": "' + "a" * 1_000_000 + '"}'), ["characters"]),
]
#: Refused before the state checks existed too; kept so the whole set is sent before the serving check.
OLD_CASES = [
    ("completed-steps-beyond-the-total", lambda t: _forged(t, completed_steps=9), ["9 steps completed", "0 to 4"]),
    ("negative-completed-steps", lambda t: _forged(t, completed_steps=-1), ["-1 steps completed"]),
]


def _expect_refused(stub, forged, words) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Denoise(_request(resume_from=forged), timeout=120))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()} {error.details()}"
    assert _reason(error) == "CHECKPOINT_MISMATCH"
    details = error.details()
    assert len(details) < 400, details[:400]
    assert all(word in details for word in words), details
    assert not any(word in details for word in ("Error", "Exception", "Traceback", "torch.", "<")), details


@pytest.mark.parametrize("case_id,forge,words", NEW_CASES, ids=[c[0] for c in NEW_CASES])
def test_a_tampered_checkpoint_is_invalid_argument(run, case_id, forge, words):
    stub, taken, _ = run
    _expect_refused(stub, forge(taken), words)


def test_after_every_tampered_checkpoint_the_denoiser_serves_and_a_good_one_resumes(suite, run, channel_to):
    stub, taken, whole = run
    for case_id, forge, words in NEW_CASES + OLD_CASES:
        _expect_refused(stub, forge(taken), words)
    address = suite.services["denoiser"].address
    health = health_pb2_grpc.HealthStub(channel_to(address)).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert suite.services["denoiser"].process.poll() is None
    # The untouched checkpoint still resumes, to the uninterrupted run's latents.
    resumed = list(stub.Denoise(_request(resume_from=taken), timeout=120))
    assert [r.step.step for r in resumed if r.HasField("step")] == [3, 4]
    latents = [r for r in resumed if r.HasField("result")][-1].result.latents
    assert torch.equal(tensors.from_proto(latents, field="latents"), whole)


def test_checkpoint_interval_picks_the_steps(monkeypatch):
    """--checkpoint-interval-s: a checkpoint on the first step that ends at least the interval after the last
    one (or the run's start); 0 takes one every step."""
    from diffusers import EulerDiscreteScheduler

    from services.denoiser import checkpoint as checkpoints

    clock = [100.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    latents = torch.zeros(1, 4, 8, 8)

    def taken(interval_s: float, step_seconds: float, steps: int = 8) -> list[int]:
        scheduler = EulerDiscreteScheduler()
        scheduler.set_timesteps(steps)
        writer = checkpoints.CheckpointWriter(scheduler, torch.Generator().manual_seed(0), interval_s)
        picked = []
        for step in range(1, steps + 1):
            clock[0] += step_seconds
            if writer.capture(step, steps, latents) is not None:
                picked.append(step)
        return picked

    assert taken(0.0, 0.01) == list(range(1, 9))
    assert taken(0.5, 0.2) == [3, 6]
    assert taken(0.5, 0.6) == list(range(1, 9))
    assert taken(3600.0, 0.2) == []
