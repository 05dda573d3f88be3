"""Per-service dtype and device selection."""
from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest
import torch

from latentwire.common.v1 import status_pb2, status_pb2_grpc, tensor_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.runtime import tensors
from services.suite.launcher import start_service, start_suite, wait_serving


def test_bfloat16_denoiser_takes_float32_embeddings(tiny_model, tmp_path):
    """A denoiser in bfloat16 accepts the text encoder's float32 embeddings and returns bfloat16 latents."""
    service = start_service("denoiser", "services.denoiser",
                            ["--port", "0", "--model", str(tiny_model), "--dtype", "bfloat16"], log_dir=tmp_path)
    try:
        wait_serving(service.address, 120)
        with grpc.insecure_channel(service.address) as channel:
            status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
            assert status.loaded_models[0].dtype == "bfloat16"
            embeds = tensors.to_proto(torch.randn(1, 77, 8))
            events = list(denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(
                denoiser_pb2.DenoiseRequest(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=64, width=64,
                                            num_inference_steps=3, guidance_scale=7.5, seed=1), timeout=120))
        latents = events[-1].result.latents
        assert latents.dtype == tensor_pb2.DataType.DATA_TYPE_BFLOAT16
        decoded = tensors.from_proto(latents, field="latents")
        assert decoded.shape == (1, 4, 32, 32) and bool(torch.isfinite(decoded.float()).all())
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(60) == 0


def test_unknown_device_refused(tiny_model):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "services.vae", "--port", "0", "--model",
                                str(tiny_model), "--device", "tpu"], capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "--device" in completed.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATENTWIRE_TEST_CUDA") != "1" or not torch.cuda.is_available(),
                    reason="GPU test: set LATENTWIRE_TEST_CUDA=1 on a machine with CUDA")
def test_cuda_suite_matches_diffusers_on_cuda(tiny_model, tmp_path):
    """Every stage on cuda:0: images match diffusers' pipeline on cuda (GPU kernels differ from CPU ones)."""
    import diffusers

    from latentwire.client import Client

    args = ["--device", "cuda"]
    with start_suite(tiny_model, ports=dict.fromkeys(["orchestrator", "text_encoder", "denoiser", "vae"], 0),
                     log_dir=tmp_path, extra_args={"text_encoder": args, "denoiser": args, "vae": args}) as suite:
        with Client(suite.address, timeout=120) as client:
            result = client.generate("a cat", seed=3, steps=10, include_pixels=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                             requires_safety_checker=False).to("cuda")
    expected = pipe("a cat", num_inference_steps=10, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    assert float(np.abs(result.pixels - expected).max()) <= 1e-4
