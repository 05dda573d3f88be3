"""Bad input gets a clear status with google.rpc.ErrorInfo, and every service keeps serving."""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from latentwire.common.v1 import model_pb2, tensor_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from services.runtime import tensors
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _expect(call, code: grpc.StatusCode, *words: str, reason: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        response = call()
        if hasattr(response, "__iter__") and not hasattr(response, "ListFields"):
            list(response)
    error = raised.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    for word in words:
        assert word in error.details(), error.details()
    info = _error_info(error)
    assert info is not None and info.domain == "latentwire.dev", "no ErrorInfo detail"
    if reason:
        assert info.reason == reason, info
    return error


ORCHESTRATOR_CASES = [
    ("zero-steps", dict(steps=0), INVALID, "num_inference_steps", "INVALID_STEPS"),
    ("negative-steps", dict(steps=-3), INVALID, "num_inference_steps", "INVALID_STEPS"),
    # --max-steps 1000 is lowered to the hard limit the denoiser shares (services/runtime/limits.py).
    ("too-many-steps", dict(steps=1000), INVALID, "1 to 999", "INVALID_STEPS"),
    ("width-not-multiple-of-8", dict(width=100), INVALID, "multiple of 8", "INVALID_SIZE"),
    ("negative-height", dict(height=-64), INVALID, "height", "INVALID_SIZE"),
    ("over-size-limit", dict(width=1024, height=64), INVALID, "at most 512", "IMAGE_TOO_LARGE"),
    ("too-many-images", dict(num_images=9), INVALID, "num_images", "INVALID_NUM_IMAGES"),
    ("negative-images", dict(num_images=-1), INVALID, "num_images", "INVALID_NUM_IMAGES"),
    ("nan-guidance", dict(guidance_scale=math.nan), INVALID, "guidance_scale", None),
    ("eta-out-of-range", dict(eta=2.0), INVALID, "eta", None),
    ("unknown-scheduler", dict(scheduler="NoSuchScheduler"), INVALID, "EulerDiscreteScheduler", "UNKNOWN_SCHEDULER"),
    ("unknown-model", dict(model="no-such-model"), NOT_FOUND, "no-such-model", "MODEL_NOT_FOUND"),
]


@pytest.mark.parametrize("case_id,settings,code,word,reason", ORCHESTRATOR_CASES, ids=[c[0] for c in ORCHESTRATOR_CASES])
def test_orchestrator_rejects(client, case_id, settings, code, word, reason):
    request = client.build_request("a cat", seed=1, **{"steps": 2, **settings})
    _expect(lambda: client.stream(request), code, word, reason=reason)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(client, prompt):
    _expect(lambda: client.stream(client.build_request(prompt, steps=2)), INVALID, "prompt", reason="EMPTY_PROMPT")


def test_prompt_over_token_limit(client):
    # Over 77 tokens is A1111's chunked reading (services/text_encoder/a1111.py); over its 750 tokens is refused.
    prompt = " ".join(["a"] * 999)
    _expect(lambda: client.stream(client.build_request(prompt, steps=2)), INVALID, "tokens", reason="PROMPT_TOO_LONG")
    negative = client.build_request("a cat", negative_prompt="a " * 999, steps=2)
    _expect(lambda: client.stream(negative), INVALID, "negative_prompts[0]", reason="PROMPT_TOO_LONG")


def test_prompt_over_character_limit(client):
    _expect(lambda: client.stream(client.build_request("a" * 2001, steps=2)), INVALID, "2000", reason="PROMPT_TOO_LONG")


def _embeds(batch=1, tokens=77, width=8, dtype=torch.float32) -> tensor_pb2.Tensor:
    return tensors.to_proto(torch.zeros(batch, tokens, width, dtype=dtype), "prompt_embeds")


def test_text_encoder_rejects(suite, channel_to):
    stub = text_encoder_pb2_grpc.TextEncoderServiceStub(channel_to(suite.services["text_encoder"].address))
    encode = text_encoder_pb2.EncodeRequest
    _expect(lambda: stub.Encode(encode(prompts=[], num_images_per_prompt=1)), INVALID, "prompts")
    _expect(lambda: stub.Encode(encode(prompts=["a"], negative_prompts=["b", "c"], num_images_per_prompt=1)),
            INVALID, "negative_prompts")
    _expect(lambda: stub.Encode(encode(prompts=["a"], num_images_per_prompt=0)), INVALID, "num_images_per_prompt")
    _expect(lambda: stub.Encode(encode(prompts=["a"], num_images_per_prompt=100)), INVALID, reason="BATCH_TOO_LARGE")
    _expect(lambda: stub.Encode(encode(model=model_pb2.ModelReference(name="x"), prompts=["a"], num_images_per_prompt=1)),
            NOT_FOUND, "'x'", reason="MODEL_NOT_FOUND")


def _denoise(**fields) -> denoiser_pb2.DenoiseRequest:
    base = dict(prompt_embeds=_embeds(), negative_prompt_embeds=_embeds(), height=64, width=64,
                num_inference_steps=2, guidance_scale=7.5, seed=1)
    base.update(fields)
    return denoiser_pb2.DenoiseRequest(**base)


def test_denoiser_rejects_malformed_tensors(suite, channel_to):
    stub = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))
    good = _embeds()
    short = tensor_pb2.Tensor(dtype=good.dtype, shape=good.shape, raw_contents=good.raw_contents[:-4])
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=short)), INVALID, "needs", reason="INVALID_TENSOR")
    unspecified = tensor_pb2.Tensor(shape=good.shape, raw_contents=good.raw_contents)
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=unspecified)), INVALID, "dtype", reason="INVALID_TENSOR")
    integer = tensors.to_proto(torch.zeros(1, 77, 8, dtype=torch.int64))
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=integer)), INVALID, "DATA_TYPE_INT64", reason="INVALID_TENSOR")
    rank2 = tensors.to_proto(torch.zeros(77, 8))
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=rank2)), INVALID, "rank-3", reason="INVALID_TENSOR")
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=_embeds(width=16), negative_prompt_embeds=_embeds(width=16))),
            INVALID, "8]", reason="INVALID_TENSOR")
    negative_dims = tensor_pb2.Tensor(dtype=good.dtype, shape=[-1, 77, 8], raw_contents=b"")
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=negative_dims)), INVALID, "shape", reason="INVALID_TENSOR")
    nan = tensors.to_proto(torch.full((1, 77, 8), float("nan")))
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=nan)), INVALID, "NaN", reason="INVALID_TENSOR")
    _expect(lambda: stub.Denoise(_denoise(negative_prompt_embeds=tensor_pb2.Tensor())), INVALID,
            "negative_prompt_embeds", reason="MISSING_NEGATIVE_EMBEDS")
    _expect(lambda: stub.Denoise(_denoise(negative_prompt_embeds=_embeds(batch=2))), INVALID, "must match")


def test_denoiser_rejects_bad_parameters(suite, channel_to):
    stub = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))
    _expect(lambda: stub.Denoise(_denoise(num_inference_steps=0)), INVALID, reason="INVALID_STEPS")
    # DDIM with steps_offset=1 has 999 usable timesteps; more would index past the schedule.
    _expect(lambda: stub.Denoise(_denoise(num_inference_steps=1000)), INVALID, "1 to 999", reason="INVALID_STEPS")
    _expect(lambda: stub.Denoise(_denoise(width=60)), INVALID, reason="INVALID_SIZE")
    _expect(lambda: stub.Denoise(_denoise(height=4096)), INVALID, reason="IMAGE_TOO_LARGE")
    _expect(lambda: stub.Denoise(_denoise(scheduler="Nope")), INVALID, reason="UNKNOWN_SCHEDULER")
    _expect(lambda: stub.Denoise(_denoise(prompt_embeds=_embeds(batch=17), negative_prompt_embeds=_embeds(batch=17))),
            INVALID, reason="BATCH_TOO_LARGE")
    _expect(lambda: stub.Denoise(_denoise(model=model_pb2.ModelReference(name="nope"))), NOT_FOUND,
            reason="MODEL_NOT_FOUND")


def test_vae_rejects(suite, channel_to):
    stub = vae_pb2_grpc.VaeServiceStub(channel_to(suite.services["vae"].address))
    wrong_channels = tensors.to_proto(torch.zeros(1, 3, 32, 32))
    _expect(lambda: stub.Decode(vae_pb2.DecodeRequest(latents=wrong_channels)), INVALID, "[batch >= 1, 4",
            reason="INVALID_TENSOR")
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DataType.DATA_TYPE_FLOAT32, shape=[1, 4, 4096, 4096], raw_contents=b"")
    _expect(lambda: stub.Decode(vae_pb2.DecodeRequest(latents=huge)), INVALID, "bytes", reason="INVALID_TENSOR")
    big = tensors.to_proto(torch.zeros(1, 4, 1100, 8))
    _expect(lambda: stub.Decode(vae_pb2.DecodeRequest(latents=big)), INVALID, "at most", reason="IMAGE_TOO_LARGE")
    ok = tensors.to_proto(torch.zeros(2, 4, 8, 8))
    _expect(lambda: stub.Decode(vae_pb2.DecodeRequest(latents=ok, png_texts=[vae_pb2.PngText()])), INVALID,
            "png_texts")
    # A well-formed request still works after all that.
    response = stub.Decode(vae_pb2.DecodeRequest(latents=ok, include_pixels=True))
    assert len(response.png_images) == 2
    pixels = np.frombuffer(response.pixels.raw_contents, "<f4").reshape(list(response.pixels.shape))
    assert pixels.shape == (2, 16, 16, 3) and 0 <= pixels.min() and pixels.max() <= 1


def test_everything_still_serving(suite, client, channel_to):
    """Run last in this module (pytest keeps file order): nothing above broke a service."""
    for name, service in suite.services.items():
        response = health_pb2_grpc.HealthStub(channel_to(service.address)).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        assert service.process.poll() is None, f"{name} exited"
    assert client.generate("still fine", seed=2, steps=2).seed == 2


def test_unary_error_shape(suite, channel_to):
    """ListSchedulers on an unknown model: NOT_FOUND through the orchestrator, with the stage named."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    from latentwire.orchestrator.v1 import orchestrator_pb2

    error = _expect(lambda: stub.ListSchedulers(
        orchestrator_pb2.ListSchedulersRequest(model=model_pb2.ModelReference(name="zzz"))), NOT_FOUND, "zzz")
    assert _error_info(error).metadata["stage"] == "denoiser"
