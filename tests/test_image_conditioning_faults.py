"""Bad init images, masks and ControlNet units get a clear INVALID_ARGUMENT; a ControlNet service that dies
mid-run fails the request with UNAVAILABLE while the denoiser keeps serving."""
from __future__ import annotations

import io
import os
import signal
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from latentwire.client import Client, control
from latentwire.common.v1 import latents_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from services.runtime import tensors
from services.suite.launcher import CONTROLNET_MODULE, ORCHESTRATOR_MODULE, STAGES, start_service, wait_serving
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from test_bad_input import INVALID, _expect
from test_image_conditioning import control_image, init_image, mask_image, png

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

PROMPT = "a lighthouse"


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


CMYK_JPEG = _encoded(Image.new("CMYK", (64, 64), (10, 20, 30, 40)), "JPEG")
SIXTEEN_BIT_PNG = _encoded(Image.fromarray(np.full((64, 64), 40000, np.uint16)), "PNG")
TRUNCATED_PNG = init_image()[:200]
TINY_PNG = png(np.zeros((4, 4, 3), np.uint8))

BAD_REQUESTS = [
    # (id, request settings, words in the message, ErrorInfo reason)
    ("strength-above-1", dict(init_image=init_image(), strength=1.5), ["strength", "0 to 1"], "INVALID_STRENGTH"),
    ("strength-negative", dict(init_image=init_image(), strength=-0.1), ["strength"], "INVALID_STRENGTH"),
    ("strength-leaves-no-step", dict(init_image=init_image(), strength=0.05, steps=10), ["no step"],
     "INVALID_STRENGTH"),
    ("strength-without-image", dict(strength=0.5), ["init_image"], "MISSING_INIT_IMAGE"),
    ("mask-without-image", dict(mask_image=mask_image()), ["init_image"], "MISSING_INIT_IMAGE"),
    ("mask-wrong-size", dict(init_image=init_image(), mask_image=mask_image(32, 32)), ["32x32", "64x64"],
     "MASK_SIZE_MISMATCH"),
    ("undecodable-init-image", dict(init_image=b"not an image at all"), ["init_image", "decoded"],
     "UNDECODABLE_IMAGE"),
    ("truncated-init-image", dict(init_image=TRUNCATED_PNG), ["init_image"], "UNDECODABLE_IMAGE"),
    ("empty-control-image", dict(controlnets=[control(b"")]), ["controlnets[0].image", "empty"], "IMAGE_EMPTY"),
    ("cmyk-init-image", dict(init_image=CMYK_JPEG), ["CMYK", "RGB"], "UNSUPPORTED_IMAGE_MODE"),
    ("16-bit-mask", dict(init_image=init_image(), mask_image=SIXTEEN_BIT_PNG), ["mask_image", "mode"],
     "UNSUPPORTED_IMAGE_MODE"),
    ("tiny-init-image", dict(init_image=TINY_PNG), ["4x4"], "IMAGE_TOO_SMALL"),
    ("undecodable-control-image", dict(controlnets=[control(b"\x89PNG garbage")]), ["controlnets[0].image"],
     "UNDECODABLE_IMAGE"),
    ("cmyk-control-image", dict(controlnets=[control(CMYK_JPEG)]), ["CMYK"], "UNSUPPORTED_IMAGE_MODE"),
    # The same checks and reasons as the ControlNet service's own (services/runtime/limits.py).
    ("negative-control-scale", dict(controlnets=[control(control_image(), scale=-1.0)]), ["conditioning_scale"],
     "INVALID_CONDITIONING_SCALE"),
    ("control-start-after-end", dict(controlnets=[control(control_image(), start=0.8, end=0.2)]),
     ["guidance_start", "guidance_end"], "INVALID_GUIDANCE_RANGE"),
    ("too-many-controlnets", dict(controlnets=[control(control_image())] * 5), ["at most 4"], "TOO_MANY_CONTROLNETS"),
    # Preprocessor names and options are known to the orchestrator too: refused before a job exists.
    ("unknown-preprocessor", dict(controlnets=[control(control_image(), "hed-from-the-future")]),
     ["hed-from-the-future", "canny"], "UNKNOWN_PREPROCESSOR"),
    ("canny-threshold-out-of-range", dict(controlnets=[control(control_image(), "canny", low_threshold=900)]),
     ["low_threshold"], "PREPROCESSOR_OPTION_OUT_OF_RANGE"),
    ("inpainting-model-without-mask", dict(model="tiny-sd-inpainting"), ["inpainting", "mask"],
     "INPAINTING_MODEL_NEEDS_MASK"),
    ("inpainting-model-img2img", dict(model="tiny-sd-inpainting", init_image=init_image()), ["mask"],
     "INPAINTING_MODEL_NEEDS_MASK"),
]


@pytest.mark.parametrize("case_id,settings,words,reason", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_image_input_is_refused(suite, channel_to, case_id, settings, words, reason):
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(suite.address))
    request = Client.build_request(PROMPT, seed=1, **{"steps": 4, **settings})
    _expect(lambda: stub.Generate(request, timeout=60), INVALID, *words, reason=reason)


def test_stages_refuse_bad_image_input_directly(suite, channel_to):
    """The VAE's Encode and the denoiser validate on their own too (not only behind the orchestrator)."""
    vae = vae_pb2_grpc.VaeServiceStub(channel_to(suite.services["vae"].address))
    _expect(lambda: vae.Encode(vae_pb2.EncodeRequest(image=b"junk"), timeout=30), INVALID, "image",
            reason="UNDECODABLE_IMAGE")
    _expect(lambda: vae.Encode(vae_pb2.EncodeRequest(image=init_image(), mask_image=mask_image(48, 64)), timeout=30),
            INVALID, "mask_image", reason="MASK_SIZE_MISMATCH")
    _expect(lambda: vae.Encode(vae_pb2.EncodeRequest(image=init_image(), width=63), timeout=30), INVALID, "width",
            reason="INVALID_SIZE")

    denoiser = denoiser_pb2_grpc.DenoiserServiceStub(channel_to(suite.services["denoiser"].address))
    embeds = tensors.to_proto(torch.zeros(1, 77, 8), "prompt_embeds")
    wrong = tensors.to_proto(torch.zeros(1, 4, 16, 16), "mean")
    request = denoiser_pb2.DenoiseRequest(
        prompt_embeds=embeds, height=64, width=64, num_inference_steps=4, guidance_scale=1.0, strength=0.5,
        image=denoiser_pb2.ImageConditioning(image_latents=latents_pb2.LatentDistribution(
            mean=wrong, std=wrong, scaling_factor=0.18215)))
    _expect(lambda: denoiser.Denoise(request, timeout=30), INVALID, "image_latents", "[1, 4, 32, 32]",
            reason="INVALID_TENSOR")
    request.controlnet.units.add().image = control_image()
    request.ClearField("image")
    request.controlnet.address = "127.0.0.1:1"  # never dialed: the denoiser has its own --controlnet-address
    _expect(lambda: denoiser.Denoise(request, timeout=30), INVALID, "controlnet.address",
            reason="CONTROLNET_ADDRESS_REFUSED")
    for name, service in suite.services.items():
        health = health_pb2_grpc.HealthStub(channel_to(service.address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_suite_still_serves_after_bad_image_input(client):
    result = client.generate(PROMPT, seed=3, steps=3, init_image=init_image(), strength=0.7,
                             controlnets=[control(control_image())])
    assert len(result.images) == 1


def test_controlnet_service_dying_mid_run_fails_cleanly(suite, tiny_model, tiny_controlnets, channel_to, tmp_path):
    """kill -9 the ControlNet service mid-run: UNAVAILABLE naming it, and the denoiser stays SERVING."""
    log_dir = tmp_path / "logs"
    controlnet = start_service("controlnet-doomed", CONTROLNET_MODULE,
                               ["--port", "0", "--model", str(tiny_controlnets[0])], log_dir=log_dir)
    denoiser = orchestrator = None
    try:
        # A denoiser of its own: it streams only with the ControlNet replicas it is started with.
        denoiser = start_service("denoiser-2", STAGES["denoiser"], [
            "--port", "0", "--model", str(tiny_model), "--controlnet-address", controlnet.address], log_dir=log_dir)
        orchestrator = start_service("orchestrator-2", ORCHESTRATOR_MODULE, [
            "--port", "0", "--max-steps", "1000",
            "--text-encoder-address", suite.services["text_encoder"].address,
            "--denoiser-address", denoiser.address,
            "--vae-address", suite.services["vae"].address,
            "--controlnet-address", controlnet.address,
        ], log_dir=log_dir)
        for service in (controlnet, denoiser, orchestrator):
            wait_serving(service.address, 120, service.name, service.process)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel_to(orchestrator.address))
        request = Client.build_request(PROMPT, seed=2, steps=900, controlnets=[control(control_image())])
        call = stub.Generate(request, timeout=300)
        killed = threading.Event()
        with pytest.raises(grpc.RpcError) as raised:
            for event in call:
                if event.HasField("step") and event.step.step >= 3 and not killed.is_set():
                    os.kill(controlnet.process.pid, signal.SIGKILL)
                    killed.set()
        assert killed.is_set(), "the run ended before the ControlNet service was killed"
        error = raised.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{error.code()} {error.details()}"
        assert "controlnet" in error.details().lower(), error.details()
        health = health_pb2_grpc.HealthStub(channel_to(denoiser.address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        # The denoiser takes the next job at once.
        with Client(orchestrator.address, timeout=60) as client:
            assert len(client.generate(PROMPT, seed=4, steps=3).images) == 1
    finally:
        for service in (orchestrator, denoiser, controlnet):
            if service is not None and service.process.poll() is None:
                service.process.terminate()
                service.process.wait(30)
