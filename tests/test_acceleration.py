"""The denoiser's accelerator options (services/denoiser/acceleration.py): --channels-last and --compile.

channels_last runs here (CPU: float rounding only). torch.compile on CPU compiles C++ with inductor, about 90 s
for the tiny UNet on this 2-core machine, so its end-to-end test is opt-in (LATENTWIRE_TEST_COMPILE=1); the
parts it relies on (the hooks coming off, the loop choosing the compiled network) are tested here without it.
"""
from __future__ import annotations

import os
import uuid

import pytest
import torch

from services.denoiser.acceleration import Acceleration, apply
from services.denoiser.conditioning import TextConditioning
from services.denoiser.model import DenoiseParams, load_denoiser
from services.runtime import interrupt
from services.runtime.config import ModelSpec
from services.runtime.jobs import Job

PARAMS = DenoiseParams(height=64, width=64, num_inference_steps=4, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
                       seed=3, scheduler="")


def _run(model, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    width = model.unet.config.cross_attention_dim
    text = TextConditioning(torch.randn(1, 77, width, generator=generator),
                            torch.randn(1, 77, width, generator=generator))
    return model.denoise(Job(uuid.uuid4().hex, PARAMS.num_inference_steps), text, PARAMS, lambda event: None,
                         **kwargs).latents


def _load(tiny_model, options=None):
    spec = ModelSpec(name="tiny-sd", path=tiny_model, is_default=True)
    return load_denoiser(spec, torch.device("cpu"), torch.float32, False, options)


def test_channels_last_keeps_the_image(tiny_model):
    plain = _load(tiny_model)
    nhwc = _load(tiny_model, Acceleration(channels_last=True))
    conv = nhwc.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.unet.conv_in.weight.is_contiguous()
    difference = float((_run(plain) - _run(nhwc)).abs().max())
    assert difference <= 1e-4, difference  # other convolution kernels: float rounding (2.6e-5 after 4 steps)
    assert nhwc.compiled_network is None


def test_uninstall_removes_the_hooks_and_the_sliced_processors(tiny_model):
    model = _load(tiny_model)
    before = _run(model)
    hooked = interrupt.checked(model.unet)
    assert hooked > 0
    assert interrupt.uninstall(model.unet) == hooked
    assert interrupt.checked(model.unet) == 0
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    assert torch.equal(_run(model), before)  # at this size the sliced processor was the same single call
    assert interrupt.install(model.unet) == hooked  # and back


def test_the_loop_calls_the_compiled_network_only_when_asked(tiny_model):
    """What --compile hands the loop, with a stand-in for torch.compile's result that counts its calls."""
    model = _load(tiny_model)
    calls = []

    def compiled(*args, **kwargs):
        calls.append(1)
        return model.unet(*args, **kwargs)

    model.compiled_network = compiled
    reference = _run(model)
    assert calls == []  # compiled=False (the default, and LoRA / tiling jobs): the plain network
    assert torch.equal(_run(model, compiled=True), reference)
    assert len(calls) == PARAMS.num_inference_steps


@pytest.mark.skipif(os.environ.get("LATENTWIRE_TEST_COMPILE") != "1",
                    reason="torch.compile on CPU takes ~90 s for the tiny UNet; set LATENTWIRE_TEST_COMPILE=1")
def test_compile_keeps_the_image(tiny_model):
    plain = _load(tiny_model)
    compiled = _load(tiny_model, Acceleration(compile_mode="default"))
    assert compiled.compiled_network is not None
    assert interrupt.checked(compiled.unet) == 0
    difference = float((_run(plain) - _run(compiled, compiled=True)).abs().max())
    assert difference <= 1e-4, difference


def test_apply_leaves_a_model_as_it_was_by_default(tiny_model):
    model = _load(tiny_model)
    hooks = interrupt.checked(model.unet)
    apply(model, Acceleration())
    assert model.compiled_network is None and model.unet.conv_in.weight.is_contiguous()
    assert interrupt.checked(model.unet) == hooks
