"""Bad input at the edges (issue 11): each gets INVALID_ARGUMENT with an ErrorInfo reason, and the service keeps serving."""
from __future__ import annotations

import io

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from latentwire.common.v1 import tensor_pb2
from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from latentwire.denoiser.v1 import denoiser_pb2_grpc
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime import tensors
from test_bad_input import _denoise, _embeds, _expect

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _assert_serving(suite, channel_to, name: str) -> None:
    response = health_pb2_grpc.HealthStub(channel_to(suite.services[name].address)).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    assert suite.services[name].process.poll() is None, f"{name} exited"


def _stubs(suite, channel_to):
    address = {name: suite.services[name].address for name in ("text_encoder", "denoiser", "vae", "controlnet")}
    return (text_encoder_pb2_grpc.TextEncoderServiceStub(channel_to(address["text_encoder"])),
            denoiser_pb2_grpc.DenoiserServiceStub(channel_to(address["denoiser"])),
            vae_pb2_grpc.VaeServiceStub(channel_to(address["vae"])),
            controlnet_pb2_grpc.ControlNetServiceStub(channel_to(address["controlnet"])))


def _encode(job_id: str = "") -> text_encoder_pb2.EncodeRequest:
    return text_encoder_pb2.EncodeRequest(prompts=["a cat"], num_images_per_prompt=1, job_id=job_id)


def _png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("job_id,word", [("j" * 1_000_000, "at most 128"), ("a b\n<script>", "letters, digits")],
                         ids=["one-megabyte", "odd-characters"])
def test_every_stage_bounds_job_id(suite, channel_to, job_id, word):
    """A huge job_id was kept per call (40 calls of 8 MiB: +2 GB RSS): every stage refuses it at the edge."""
    text_encoder, denoiser, vae, controlnet = _stubs(suite, channel_to)
    calls = {
        "text_encoder": lambda: text_encoder.Encode(_encode(job_id), timeout=30),
        "denoiser": lambda: denoiser.Denoise(_denoise(job_id=job_id), timeout=30),
        "vae.Decode": lambda: vae.Decode(vae_pb2.DecodeRequest(
            latents=tensors.to_proto(torch.zeros(1, 4, 8, 8)), job_id=job_id), timeout=30),
        "vae.Encode": lambda: vae.Encode(vae_pb2.EncodeRequest(image=_png(), job_id=job_id), timeout=30),
        "controlnet": lambda: controlnet.ComputeResiduals(iter([controlnet_pb2.ComputeResidualsRequest(
            setup=controlnet_pb2.ControlNetSetup(job_id=job_id))]), timeout=30),
    }
    for stage, call in calls.items():
        error = _expect(call, INVALID, "job_id", word, reason="INVALID_JOB_ID")
        assert len(error.details()) < 300, (stage, len(error.details()))
    for name in ("text_encoder", "denoiser", "vae", "controlnet"):
        _assert_serving(suite, channel_to, name)
    # A good job id still works.
    assert text_encoder.Encode(_encode("job-1.a_b"), timeout=60).prompt_embeds.shape[0] == 1


def test_pndm_needs_four_steps(suite, channel_to, client):
    """PNDMScheduler with 1 to 3 steps answered INTERNAL: refused by the orchestrator and by the denoiser."""
    denoiser = _stubs(suite, channel_to)[1]
    for steps in (1, 2, 3):
        _expect(lambda: denoiser.Denoise(_denoise(scheduler="PNDMScheduler", num_inference_steps=steps), timeout=60),
                INVALID, "PNDMScheduler", "at least 4", reason="TOO_FEW_STEPS_FOR_SCHEDULER")
        request = client.build_request("a cat", seed=1, steps=steps, scheduler="PNDMScheduler")
        _expect(lambda: client.stream(request), INVALID, "at least 4", reason="TOO_FEW_STEPS_FOR_SCHEDULER")
    _assert_serving(suite, channel_to, "denoiser")
    responses = list(denoiser.Denoise(_denoise(scheduler="PNDMScheduler", num_inference_steps=4), timeout=120))
    assert responses[-1].result.scheduler == "PNDMScheduler"
    assert client.generate("a cat", seed=3, steps=4, scheduler="PNDMScheduler").seed == 3


def test_zero_element_tensor_with_huge_dims(suite, channel_to):
    """Shape [0, 2**62, 8] holds no bytes but no array can have it: INVALID_TENSOR, not INTERNAL."""
    denoiser = _stubs(suite, channel_to)[1]
    vae = _stubs(suite, channel_to)[2]
    float32 = tensor_pb2.DataType.DATA_TYPE_FLOAT32
    huge = tensor_pb2.Tensor(dtype=float32, shape=[0, 2**62, 8], raw_contents=b"")
    _expect(lambda: denoiser.Denoise(_denoise(prompt_embeds=huge), timeout=30), INVALID, "prompt_embeds", "shape",
            reason="INVALID_TENSOR")
    huge_latents = tensor_pb2.Tensor(dtype=float32, shape=[0, 4, 2**40, 2**40], raw_contents=b"")
    _expect(lambda: vae.Decode(vae_pb2.DecodeRequest(latents=huge_latents), timeout=30), INVALID, "latents",
            reason="INVALID_TENSOR")
    _assert_serving(suite, channel_to, "denoiser")
    _assert_serving(suite, channel_to, "vae")
    assert list(denoiser.Denoise(_denoise(prompt_embeds=_embeds()), timeout=120))[-1].HasField("result")


def test_png_text_keys_must_be_latin1(suite, channel_to):
    """PNG text keywords are 1-79 Latin-1 characters; a value outside Latin-1 goes as iTXt."""
    vae = _stubs(suite, channel_to)[2]
    latents = tensors.to_proto(torch.zeros(1, 4, 8, 8))
    for key, word in (("snow\u2603man", "Latin-1"), ("k" * 80, "79"), ("", "1 to 79")):
        texts = [vae_pb2.PngText(entries={key: "value"})]
        _expect(lambda: vae.Decode(vae_pb2.DecodeRequest(latents=latents, png_texts=texts), timeout=30),
                INVALID, "png_texts[0]", word, reason="INVALID_PNG_TEXT")
    _assert_serving(suite, channel_to, "vae")
    texts = [vae_pb2.PngText(entries={"parameters": "a cat", "Comment": "snow\u2603man"})]
    response = vae.Decode(vae_pb2.DecodeRequest(latents=latents, png_texts=texts), timeout=60)
    image = Image.open(io.BytesIO(response.png_images[0]))
    assert image.text == {"parameters": "a cat", "Comment": "snow\u2603man"}
