"""An SDXL ControlNet on the ControlNet service, against diffusers' StableDiffusionXLControlNetPipeline.

As tests/test_controlnet_service.py does for SD 1.x: the pipeline runs in this process on the tiny SDXL
with a tiny SDXL ControlNet (addition_embed_type "text_time"), forward hooks record what its UNet and
ControlNet got and what the ControlNet returned at every step; the run is replayed over a ComputeResiduals
stream (setup with the UNet's prompt embeddings and added conditioning, then the recorded sample and
timestep per step) and the service's residuals must equal the recorded ones. Guess mode is covered: there
the pipeline gives the ControlNet only the conditional half of the prompt embeddings and of the added
conditioning.
"""
from __future__ import annotations

import io
import signal

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from latentwire.controlnet.v1 import controlnet_pb2, controlnet_pb2_grpc
from services.runtime import tensors
from services.suite.launcher import start_service, wait_serving
from services.tiny_models.controlnet import create_tiny_controlnet

WIDTH, HEIGHT = 64, 48  # not square; the tiny SDXL VAE and ControlNet downsample by 2
STEPS = 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folders(tiny_family_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-controlnets")
    return {"model": tiny_family_models["sdxl"], "controlnet": create_tiny_controlnet(root / "cn-sdxl", family="sdxl"),
            "sd-controlnet": create_tiny_controlnet(root / "cn-sd")}


@pytest.fixture(scope="module")
def stub(folders, tmp_path_factory):
    """The ControlNet service on a free port: the SDXL ControlNet (default) and an SD 1.x one ("cn-sd")."""
    log_dir = tmp_path_factory.mktemp("controlnet-sdxl-logs")
    running = start_service("controlnet", "services.controlnet",
                            ["--port", "0", "--model", f"cn-sdxl={folders['controlnet']}",
                             "--model", f"cn-sd={folders['sd-controlnet']}"], log_dir=log_dir, timeout=120)
    try:
        wait_serving(running.address, 120, "controlnet", running.process)
        with grpc.insecure_channel(running.address) as channel:
            yield controlnet_pb2_grpc.ControlNetServiceStub(channel)
    finally:
        running.process.send_signal(signal.SIGTERM)
        code = running.process.wait(30)
    assert code == 0, f"the ControlNet service exited with {code}; log in {log_dir}"


@pytest.fixture(scope="module")
def pipe(folders):
    from diffusers import ControlNetModel

    base = StableDiffusionXLPipeline.from_pretrained(folders["model"], use_safetensors=True, add_watermarker=False)
    controlnet = ControlNetModel.from_pretrained(folders["controlnet"], use_safetensors=True)
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control_png(width: int = 80, height: int = 60) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, ((x // 10 + y // 10) % 2) * 255], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


CONTROL = _control_png()


def _run_pipeline(pipe, guess_mode: bool):
    """Run the pipeline (guidance, 2 images); return the UNet's step-0 conditioning and the ControlNet's calls."""
    unet_calls, controlnet_calls = [], []

    def record_unet(module, args, kwargs):
        unet_calls.append((kwargs["encoder_hidden_states"].clone(),
                           {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}))

    def record_controlnet(module, args, kwargs, output):
        down, mid = output
        controlnet_calls.append((args[0].clone(), float(args[1]), [d.clone() for d in down], mid.clone()))

    handles = [pipe.unet.register_forward_pre_hook(record_unet, with_kwargs=True),
               pipe.controlnet.register_forward_hook(record_controlnet, with_kwargs=True)]
    try:
        pipe(prompt="a house by a lake", negative_prompt="blurry", image=Image.open(io.BytesIO(CONTROL)),
             num_images_per_prompt=2, guess_mode=guess_mode, guidance_scale=5.0, num_inference_steps=STEPS,
             width=WIDTH, height=HEIGHT, controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    return unet_calls[0], controlnet_calls


def _setup(prompt_embeds, added, guess_mode: bool, model: str = "",
           **overrides) -> controlnet_pb2.ComputeResidualsRequest:
    fields = dict(
        units=[controlnet_pb2.ControlNetUnit(image=CONTROL, conditioning_scale=0.8,
                                             **({"model": {"name": model}} if model else {}))],
        width=WIDTH, height=HEIGHT, batch_size=2, classifier_free_guidance=True, guess_mode=guess_mode,
        prompt_embeds=tensors.to_proto(prompt_embeds), total_steps=STEPS)
    if added is not None:
        fields.update(add_text_embeds=tensors.to_proto(added["text_embeds"]),
                      add_time_ids=tensors.to_proto(added["time_ids"]))
    fields.update(overrides)
    return controlnet_pb2.ComputeResidualsRequest(setup=controlnet_pb2.ControlNetSetup(**fields))


@pytest.mark.parametrize("guess_mode", [False, True], ids=["guidance", "guess-mode"])
def test_sdxl_residuals_equal_the_pipeline(guess_mode, pipe, stub):
    (prompt_embeds, added), calls = _run_pipeline(pipe, guess_mode)
    assert len(calls) == STEPS
    assert prompt_embeds.shape[0] == 4 and added["time_ids"].shape == (4, 6)  # 2 images, unconditional first
    requests = [_setup(prompt_embeds, added, guess_mode)]
    requests += [controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
        step_index=i, timestep=t, sample=tensors.to_proto(sample))) for i, (sample, t, _, _) in enumerate(calls)]
    responses = list(stub.ComputeResiduals(iter(requests), timeout=120))

    assert responses[0].ready.guess_mode == guess_mode
    assert len(responses) == 1 + STEPS
    for i, (response, (_, _, down, mid)) in enumerate(zip(responses[1:], calls)):
        result = response.residuals
        assert result.active
        got = [tensors.from_proto(t, field="down") for t in result.down_block_residuals]
        got.append(tensors.from_proto(result.mid_block_residual, field="mid"))
        assert [t.shape for t in got] == [t.shape for t in [*down, mid]]
        assert max(float(t.abs().max()) for t in down) > 1e-2  # non-zero, so the comparison could fail
        difference = max(float((g - e).abs().max()) for g, e in zip(got, [*down, mid]))
        assert difference <= TOLERANCE, f"step {i}: max abs difference {difference}"


def test_added_conditioning_changes_the_residuals(pipe, stub):
    """The added conditioning reaches the ControlNet: other add_time_ids give other residuals."""
    (prompt_embeds, added), calls = _run_pipeline(pipe, False)
    sample, t = calls[0][0], calls[0][1]
    results = []
    for time_ids in (added["time_ids"], added["time_ids"] * 2):
        step = controlnet_pb2.ComputeResidualsRequest(step=controlnet_pb2.ControlNetStepInput(
            step_index=0, timestep=t, sample=tensors.to_proto(sample)))
        requests = [_setup(prompt_embeds, {"text_embeds": added["text_embeds"], "time_ids": time_ids}, False), step]
        responses = list(stub.ComputeResiduals(iter(requests), timeout=120))
        results.append(tensors.from_proto(responses[1].residuals.mid_block_residual, field="mid"))
    assert float((results[0] - results[1]).abs().max()) > 1e-4


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


EMBEDS = torch.zeros(4, 7, 64)
ADDED = {"text_embeds": torch.zeros(4, 32), "time_ids": torch.zeros(4, 6)}


@pytest.mark.parametrize("name, request_, reason, words", [
    ("sdxl-without-added", _setup(EMBEDS, None, False), "ADDED_CONDITIONING_REQUIRED",
     "add_text_embeds and add_time_ids"),
    ("sdxl-without-time-ids", _setup(EMBEDS, None, False, add_text_embeds=tensors.to_proto(ADDED["text_embeds"])),
     "ADDED_CONDITIONING_REQUIRED", "set add_time_ids"),
    ("wrong-rows", _setup(EMBEDS, {"text_embeds": torch.zeros(2, 32), "time_ids": ADDED["time_ids"]}, False),
     "INVALID_TENSOR", "[4, size]"),
    ("wrong-width", _setup(EMBEDS, {"text_embeds": ADDED["text_embeds"], "time_ids": torch.zeros(4, 5)}, False),
     "INVALID_TENSOR", "take 80"),
    ("sd-with-added", _setup(torch.zeros(4, 7, 8), ADDED, False, model="cn-sd"), "INVALID_TENSOR",
     "no added conditioning"),
])
def test_bad_added_conditioning_is_refused(name, request_, reason, words, stub):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ComputeResiduals(iter([request_]), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(caught.value) == reason
    assert words in caught.value.details()
