"""The shared runtime: tensor codec, configuration, start-up refusals, safetensors policy, graceful shutdown."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwire.common.v1 import tensor_pb2
from services.runtime import tensors
from services.runtime.config import parse_model_specs
from services.runtime.errors import ConfigurationError, InvalidArgument
from services.suite.launcher import start_service, wait_serving
from latentwire.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_tensor_round_trip(dtype):
    original = (torch.randn(2, 3, 5) * 10).to(dtype)
    decoded = tensors.from_proto(tensors.to_proto(original, "x"), field="x")
    assert decoded.dtype == dtype and torch.equal(decoded, original)


def test_tensor_bytes_are_row_major_little_endian():
    message = tensors.to_proto(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t())  # a non-contiguous view
    assert list(message.shape) == [2, 2]
    assert message.raw_contents == torch.tensor([1.0, 3.0, 2.0, 4.0]).numpy().astype("<f4").tobytes()


@pytest.mark.parametrize(
    "message,words",
    [
        (tensor_pb2.Tensor(dtype=1, shape=[2, 2], raw_contents=b"\0" * 15), "needs 16"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], raw_contents=b"\0" * 4), "dtype"),
        (tensor_pb2.Tensor(dtype=1, shape=[1] * 9, raw_contents=b"\0" * 4), "at most 8"),
        (tensor_pb2.Tensor(dtype=1, shape=[-4], raw_contents=b""), ">= 0"),
    ],
)
def test_tensor_validation(message, words):
    with pytest.raises(InvalidArgument) as raised:
        tensors.from_proto(message, field="latents")
    assert words in raised.value.message and "latents" in raised.value.message


def test_model_specs():
    specs = parse_model_specs(["/models/tiny-sd", "big=/models/sd15"])
    assert [(s.name, str(s.path), s.is_default) for s in specs] == [
        ("tiny-sd", "/models/tiny-sd", True), ("big", "/models/sd15", False)]
    with pytest.raises(ConfigurationError):
        parse_model_specs(["a=/x", "a=/y"])


def _run_module(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, env=env)


def test_service_refuses_to_start_without_model():
    completed = _run_module("services.denoiser", "--port", "0")
    assert completed.returncode == 2
    assert "no model configured" in completed.stderr and "LATENTWIRE_MODEL" in completed.stderr


def test_orchestrator_refuses_to_start_without_stage_addresses():
    completed = _run_module("services.orchestrator", "--port", "0", "--denoiser-address", "x:1")
    assert completed.returncode == 2
    assert "--text-encoder-address" in completed.stderr and "--vae-address" in completed.stderr


@pytest.fixture(scope="module")
def env_text_encoder(tiny_model, tmp_path_factory):
    """A text encoder configured by environment variables alone (LATENTWIRE_MODEL, LATENTWIRE_PORT), its health
    watched from the moment its port opens until SERVING: (address, the statuses seen). One process for the two
    tests below (each start costs seconds); it must exit 0 on SIGTERM."""
    import os

    env = {**os.environ, "LATENTWIRE_MODEL": f"envmodel={tiny_model}", "LATENTWIRE_PORT": "0"}
    service = start_service("text_encoder", "services.text_encoder", [], env=env,
                            log_dir=tmp_path_factory.mktemp("env-text-encoder"))
    try:
        statuses = []
        with grpc.insecure_channel(service.address) as channel:
            for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=120):
                statuses.append(response.status)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    break
        yield service.address, statuses
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(60) == 0


def test_flags_fall_back_to_environment(env_text_encoder):
    from latentwire.common.v1 import status_pb2, status_pb2_grpc

    address, _ = env_text_encoder
    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    assert [m.name for m in status.loaded_models] == ["envmodel"]
    assert status.loaded_models[0].dtype == "float32" and status.loaded_models[0].device == "cpu"


@pytest.fixture(scope="module")
def pickle_model(tiny_model, tmp_path_factory):
    """The tiny model with its UNet weights saved as a pickle (.bin) instead of safetensors."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("pickle-model") / "pickled"
    shutil.copytree(tiny_model, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for file in (folder / "unet").glob("*.safetensors"):
        file.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))
    return folder


@pytest.fixture(scope="module")
def pickle_denoiser(pickle_model, tmp_path_factory):
    """A denoiser on the pickled model with --allow-pickle (and a long --grace-period-s): the pickle test checks
    that it starts, then the graceful-shutdown test (after it in file order) stops it. One process for both."""
    service = start_service("denoiser", "services.denoiser",
                            ["--port", "0", "--model", str(pickle_model), "--allow-pickle", "--grace-period-s", "300"],
                            log_dir=tmp_path_factory.mktemp("pickle-denoiser"))
    try:
        yield service
    finally:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            assert service.process.wait(60) == 0


def test_pickle_weights_refused_unless_allowed(pickle_model, pickle_denoiser):
    completed = _run_module("services.denoiser", "--port", "0", "--model", str(pickle_model))
    assert completed.returncode != 0
    assert "pickle" in completed.stderr and "--allow-pickle" in completed.stderr
    wait_serving(pickle_denoiser.address, 120, "denoiser", pickle_denoiser.process)  # with --allow-pickle it serves


@pytest.mark.slow
def test_graceful_shutdown_finishes_in_flight_work(pickle_denoiser):
    """SIGTERM: health turns NOT_SERVING, new calls get UNAVAILABLE, the running call completes, exit 0 (on the
    pickle test's denoiser: its weights' file format plays no part here)."""
    from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc

    service = pickle_denoiser
    try:
        wait_serving(service.address, 120)
        embeds = tensors.to_proto(torch.zeros(1, 77, 8))
        request = denoiser_pb2.DenoiseRequest(prompt_embeds=embeds, height=128, width=128, num_inference_steps=150,
                                              guidance_scale=1.0, seed=1)
        with grpc.insecure_channel(service.address) as channel:
            call = denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=120)
            first = next(call)
            assert first.step.step == 1
            service.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            for response in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            with pytest.raises(grpc.RpcError) as refused:
                list(denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            events = list(call)
            assert events[-1].HasField("result"), "the in-flight call should finish within the grace period"
            assert events[-2].step.step == 150
        assert service.process.wait(60) == 0
    finally:
        if service.process.poll() is None:
            service.process.kill()


def test_health_not_serving_while_loading(env_text_encoder):
    """Health answers NOT_SERVING from the moment the port opens until the model is loaded (env_text_encoder
    watched it from then)."""
    address, statuses = env_text_encoder
    with grpc.insecure_channel(address) as channel:
        # Calls before SERVING would have been refused; after it they work.
        stub = text_encoder_pb2_grpc.TextEncoderServiceStub(channel)
        response = stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["hi"], num_images_per_prompt=1), timeout=30)
        assert list(response.prompt_embeds.shape) == [1, 77, 8]
    assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
    assert set(statuses[:-1]) <= {health_pb2.HealthCheckResponse.NOT_SERVING}
