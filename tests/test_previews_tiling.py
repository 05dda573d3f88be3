"""Live previews, seamless tiling and VAE tiling (issue 13).

- Previews (services/denoiser/preview.py): through the denoiser service (tiny SD 1.5) a preview arrives every N
  steps, decodes as an image of the latents' size and is A1111's "Approx cheap" map of that step's checkpoint
  latents; through the orchestrator they are relayed in the step events, and `generate --preview-dir` writes
  them; Flux's packed latents preview unpacked (in process). Bad options are refused with their reasons.
- Seamless tiling (services/runtime/circular.py): a tiled job through the suite equals StableDiffusionPipeline
  whose every Conv2d (UNet and VAE) was set to padding_mode="circular" by hand, 1e-5, while a plain job running at
  the same time on the same services equals the plain pipeline; its infotext says "Tiling: True" and png-info gives
  the option back. The convolution wrapper itself: two threads, one circular, one not, each equal their reference.
- VAE tiling (services/vae/tiled.py): Decode with vae_tiling ON equals diffusers' AutoencoderKL after
  enable_tiling() (and enable_slicing() for a batch), 1e-5, and differs from a whole decode; automatic does not
  tile a normal size; Encode with tiling equals enable_tiling()'s encode.
"""
from __future__ import annotations

import copy
import io
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from latentwire.client import LatentwireError
from latentwire.client import infotext as infotext_lib
from latentwire.common.v1 import preview_pb2
from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from reference import _pipeline
from services.denoiser import preview
from services.denoiser.conditioning import TextConditioning
from services.denoiser.flow import FlowDenoiser
from services.denoiser.model import DenoiseParams
from services.runtime import circular, previews as preview_options, tensors
from services.runtime.config import ModelSpec
from services.runtime.jobs import Job
from services.tiny_models import create_tiny_model

TOLERANCE = 1e-5
PROMPT = "a mossy stone wall"
CLI = [sys.executable, "-m", "latentwire.cli.main"]
CPU = torch.device("cpu")
#: A1111's "Approx cheap" SD 1.x coefficients (modules/sd_vae_approx.py), written out again here so the test
#: checks preview.py against the source rather than against itself.
A1111_SD = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]


def _a1111_cheap(latents: torch.Tensor) -> np.ndarray:
    """A1111's single_sample_to_image with approximation "Approx cheap", one [h, w, 3] uint8 image per sample."""
    x = torch.einsum("...lxy,lr -> ...rxy", latents.float(), torch.tensor(A1111_SD)) * 0.5 + 0.5
    x = 255.0 * np.moveaxis(torch.clamp(x, 0.0, 1.0).numpy(), 1, 3)
    return x.astype(np.uint8)


def _stage(suite, name: str) -> grpc.Channel:
    return grpc.insecure_channel(suite.services[name].address)


# ----------------------------------------------------------------------------------------------
# Previews


def _denoise(suite, *, steps: int, previews: preview_pb2.PreviewOptions | None, seed: int = 3, batch: int = 1):
    """A direct Denoise on the suite's denoiser (tiny SD 1.5, no guidance, fixed random embeddings) with
    checkpoints; returns the step messages."""
    embeds = torch.randn(batch, 77, 8, generator=torch.Generator().manual_seed(0))
    request = denoiser_pb2.DenoiseRequest(job_id=f"preview-{seed}", num_inference_steps=steps, guidance_scale=1.0,
                                          seed=seed, include_checkpoints=True,
                                          prompt_embeds=tensors.to_proto(embeds, "prompt_embeds"))
    if previews is not None:
        request.previews.CopyFrom(previews)
    with _stage(suite, "denoiser") as channel:
        stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)
        return [event.step for event in stub.Denoise(request, timeout=120) if event.HasField("step")]


def test_previews_every_n_steps_are_the_approx_map_of_the_latents(suite):
    steps = _denoise(suite, steps=4, previews=preview_pb2.PreviewOptions(interval=2))
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert [bool(s.preview_image) for s in steps] == [False, True, False, True]
    for step in steps[1::2]:
        assert step.preview_format == "jpeg"
        latents = tensors.from_proto(step.checkpoint.latents, field="latents")
        image = Image.open(io.BytesIO(step.preview_image))
        assert image.format == "JPEG" and image.size == (latents.shape[3], latents.shape[2])  # the latents' size
        # The bytes are these latents' pixels, encoded; the pixels are A1111's map, exactly.
        assert step.preview_image == preview.encode(preview.to_pixels(latents, "sd"), "jpeg")
        assert np.array_equal(preview.to_pixels(latents, "sd"), _a1111_cheap(latents)[0])
    # A batch previews side by side; WebP on request; interval 0 means every 5 steps.
    steps = _denoise(suite, steps=5, previews=preview_pb2.PreviewOptions(format="webp"), batch=2)
    assert [bool(s.preview_image) for s in steps] == [False] * 4 + [True]
    last = steps[-1]
    latents = tensors.from_proto(last.checkpoint.latents, field="latents")
    image = Image.open(io.BytesIO(last.preview_image))
    assert last.preview_format == "webp" and image.format == "WEBP"
    assert image.size == (2 * latents.shape[3], latents.shape[2])
    assert last.preview_image == preview.encode(preview.to_pixels(latents, "sd"), "webp")
    assert np.array_equal(preview.to_pixels(latents, "sd"), np.concatenate(list(_a1111_cheap(latents)), axis=1))


def test_no_previews_without_options(suite):
    assert not any(s.preview_image or s.preview_format for s in _denoise(suite, steps=2, previews=None))


def test_previews_relayed_by_the_orchestrator_and_written_by_the_cli(client, suite, tmp_path):
    result = client.generate(PROMPT, seed=4, steps=4, preview_every=2)
    previews = [(s.step, s.preview_format) for s in result.steps if s.preview_image]
    assert previews == [(2, "jpeg"), (4, "jpeg")]
    assert Image.open(io.BytesIO(result.steps[1].preview_image)).size == (32, 32)  # 64x64 pixels, VAE scale 2
    out = tmp_path / "out.png"
    done = subprocess.run([*CLI, "generate", PROMPT, "--seed", "4", "--steps", "3", "--preview-dir",
                           str(tmp_path / "previews"), "--preview-every", "1", "--preview-format", "webp",
                           "-o", str(out), "-q", "--server", suite.address], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert written == ["step-0001.webp", "step-0002.webp", "step-0003.webp"]
    assert Image.open(tmp_path / "previews" / "step-0003.webp").format == "WEBP"


@pytest.mark.parametrize("settings,reason,says", [
    (dict(preview_every=-1), "INVALID_PREVIEW_OPTIONS", ["positive number of steps"]),
    (dict(preview_every=2, preview_format="gif"), "INVALID_PREVIEW_OPTIONS", ["jpeg, webp"]),
])
def test_preview_refusals(client, settings, reason, says):
    with pytest.raises(LatentwireError) as refused:
        client.generate(PROMPT, steps=2, **settings)
    assert refused.value.reason == reason
    assert all(s in str(refused.value) for s in says)


def test_preview_option_checks():
    assert preview_options.from_proto(preview_pb2.PreviewOptions()) == preview_options.Previews(5, "jpeg", "approx")
    assert preview_options.from_proto(preview_pb2.PreviewOptions(interval=3, format="WebP")).format == "webp"
    with pytest.raises(Exception) as refused:  # method "tiny-vae": tests/test_preview_vae.py
        preview_options.from_proto(preview_pb2.PreviewOptions(method="taesd"))
    assert refused.value.reason == "INVALID_PREVIEW_OPTIONS"
    with pytest.raises(Exception) as refused:
        preview_options.check_vae_tiling(7)
    assert refused.value.reason == "INVALID_VAE_TILING"


def test_flux_previews_unpack_the_latents(tmp_path_factory):
    """Flux's loop holds packed latents; its previews are the approx map of the unpacked ones (in process)."""
    folder = create_tiny_model(tmp_path_factory.mktemp("flux") / "tiny-flux", "flux", seed=0)
    model = FlowDenoiser(ModelSpec(folder.name, folder), CPU, torch.float32, allow_pickle=False)
    pipe = FluxPipeline.from_pretrained(folder).to(torch.float32)
    prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox", prompt_2=None, device=CPU)
    params = DenoiseParams(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, guidance_rescale=0.0,
                           eta=0.0, seed=1, scheduler="")
    events = []
    emit = preview.emitter(events.append, preview_options.Previews(interval=1), model, params)
    model.denoise(Job("flux-preview", 2), TextConditioning(prompt_embeds, pooled_prompt_embeds=pooled), params, emit,
                  include_checkpoints=True)
    assert len(events) == 2
    for event in events:
        latents = event.checkpoint.latents  # unpacked: [1, 16, 32, 48] (the tiny Flux VAE does not downsample)
        assert latents.shape == (1, 16, 32, 48)
        assert event.preview == preview.encode(preview.to_pixels(latents, "flux"), "jpeg")
        assert Image.open(io.BytesIO(event.preview)).size == (48, 32)
        expected = torch.einsum("...lxy,lr -> ...rxy", latents, torch.tensor(preview.COEFFICIENTS["flux"]))
        expected = (255.0 * torch.clamp(expected * 0.5 + 0.5, 0, 1)).numpy()[0].transpose(1, 2, 0).astype(np.uint8)
        assert np.array_equal(preview.to_pixels(latents, "flux"), expected)
    # Packed latents previewed as they are would not be an image of the latents' size: the unpacking matters.
    assert events[0].latents.shape == (1, 16 * 24, 64)


# ----------------------------------------------------------------------------------------------
# Seamless tiling


def _circular_pipeline(tiny_model):
    """StableDiffusionPipeline on the same folder whose every Conv2d (UNet and VAE) pads circularly, set by hand as
    AUTOMATIC1111 does."""
    pipe = copy.deepcopy(_pipeline(str(tiny_model)))
    for module in (pipe.unet, pipe.vae):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.padding_mode = "circular"
    return pipe


def test_tiled_job_equals_circular_pipeline_while_a_plain_job_runs(client, tiny_model):
    seed, steps, guidance = 11, 3, 6.0
    results = {}

    def run(tiling: bool) -> None:
        results[tiling] = client.generate(PROMPT, seed=seed, steps=steps, guidance_scale=guidance,
                                          include_pixels=True, tiling=tiling)

    threads = [threading.Thread(target=run, args=(tiling,)) for tiling in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    circular_expected = _circular_pipeline(tiny_model)(
        PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    plain_expected = _pipeline(str(tiny_model))(
        PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    assert float(np.abs(results[True].pixels - circular_expected).max()) <= TOLERANCE
    assert float(np.abs(results[False].pixels - plain_expected).max()) <= TOLERANCE
    assert float(np.abs(circular_expected - plain_expected).max()) > 1e-3  # tiling changes the image
    text = Image.open(io.BytesIO(results[True].images[0])).text["parameters"]
    assert "Tiling: True" in text
    assert "Tiling" not in Image.open(io.BytesIO(results[False].images[0])).text["parameters"]
    kwargs = infotext_lib.request_kwargs(infotext_lib.parse_parameters(text))
    assert kwargs["tiling"] is True and "Tiling" not in infotext_lib.unused_fields(infotext_lib.parse_parameters(text))


def test_circular_switch_is_per_thread():
    """Two threads on one wrapped convolution: the circular one equals padding_mode="circular", the other zeros."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    reference = copy.deepcopy(conv)
    reference.padding_mode = "circular"
    x = torch.randn(1, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    plain = conv(x)
    circular.install(conv)
    outputs, barrier = {}, threading.Barrier(2)

    def run(enabled: bool) -> None:
        with circular.circular(enabled):
            barrier.wait()
            outputs[enabled] = [conv(x) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(enabled,)) for enabled in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wrapped = reference(x)
    assert all(torch.equal(o, wrapped) for o in outputs[True])
    assert all(torch.equal(o, plain) for o in outputs[False])
    assert not torch.allclose(wrapped, plain)
    assert torch.equal(conv(x), plain)  # outside any job: as it was


# ----------------------------------------------------------------------------------------------
# VAE tiling


def _decode(suite, latents: torch.Tensor, mode: int, tiling: bool = False) -> np.ndarray:
    request = vae_pb2.DecodeRequest(latents=tensors.to_proto(latents, "latents"), include_pixels=True,
                                    vae_tiling=mode, tiling=tiling, job_id="vae-tiling")
    with _stage(suite, "vae") as channel:
        response = vae_pb2_grpc.VaeServiceStub(channel).Decode(request, timeout=120)
    return tensors.from_proto(response.pixels, field="pixels").numpy()


def _reference_decode(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """StableDiffusionPipeline's decode of ``latents`` with ``vae`` (the tiny VAE downsamples 2x)."""
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return VaeImageProcessor(vae_scale_factor=2).postprocess(image, output_type="np")


def test_vae_tiling_equals_diffusers_enable_tiling(suite, tiny_model):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    # Latents of a 96x64 image (tiles of 16x16 latents: the tiny VAE's sample_size 32, downsampling 2x), a batch
    # of two (diffusers slices it with enable_slicing).
    latents = torch.randn(2, 4, 32, 48, generator=torch.Generator().manual_seed(1))
    whole = _reference_decode(vae, latents)
    vae.enable_tiling()
    vae.enable_slicing()
    tiled_expected = _reference_decode(vae, latents)
    assert float(np.abs(tiled_expected - whole).max()) > 1e-4  # the tiles show
    tiled = _decode(suite, latents, preview_pb2.VAE_TILING_ON)
    assert float(np.abs(tiled - tiled_expected).max()) <= TOLERANCE
    # Automatic: a normal size decodes whole (and so does OFF).
    for mode in (preview_pb2.VAE_TILING_UNSPECIFIED, preview_pb2.VAE_TILING_OFF):
        assert float(np.abs(_decode(suite, latents, mode) - whole).max()) <= TOLERANCE


def test_vae_tiled_encode_equals_diffusers_enable_tiling(suite, tiny_model):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    vae.enable_tiling()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    request = vae_pb2.EncodeRequest(image=buffer.getvalue(), vae_tiling=preview_pb2.VAE_TILING_ON, job_id="enc")
    with _stage(suite, "vae") as channel:
        response = vae_pb2_grpc.VaeServiceStub(channel).Encode(request, timeout=120)
    mean = tensors.from_proto(response.image_latents.mean, field="mean")
    pixels = VaeImageProcessor(vae_scale_factor=2).preprocess(image, height=64, width=96)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean
        vae.disable_tiling()
        untiled = vae.encode(pixels).latent_dist.mean
    assert float((mean - expected).abs().max()) <= TOLERANCE
    assert float((expected - untiled).abs().max()) > 1e-4


def test_vae_tile_size_applies_to_the_call_only(tiny_model):
    """--vae-tile-size: tiles of that side on a shallow copy; equal to diffusers with the tile attributes set by hand
    (as diffusers' own tiling tests set them), and the shared VAE keeps its own."""
    from services.vae import tiled

    shared = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    reference = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = 16, 8
    latents = torch.randn(1, 4, 20, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.decode(latents, return_dict=False)[0]
        decoded = tiled.decode(shared, latents, tile_size=16)
        default_tiles = tiled.decode(shared, latents)
    assert float((decoded - expected).abs().max()) <= TOLERANCE
    assert float((decoded - default_tiles).abs().max()) > 1e-4
    assert (shared.tile_sample_min_size, shared.tile_latent_min_size, shared.use_tiling) == (32, 16, False)
