"""The VAE service on every model family, against the families' own diffusers pipelines (float32, CPU).

Decode: each pipeline runs twice with the same seed, once with ``output_type="latent"`` and once with
``output_type="np"``; the VAE service (its own process) decodes the first and must give the second: the
pipeline's own unscaling (SDXL ``/ scaling_factor``; SD3 and Flux ``/ scaling_factor + shift_factor``),
16-channel latents included. Encode: the distribution the service returns, sampled and scaled as the
denoiser does (``(mean + std * noise - shift_factor) * scaling_factor``, noise drawn from a generator seeded
like the pipeline's), must equal what the image-to-image and inpainting pipelines' own methods make of the
same image from the same generator (SDXL's prepare_latents / _encode_vae_image / prepare_mask_latents,
Flux's _encode_vae_image / prepare_mask_latents with its packing), so the pipelines' image processors
(Flux: vae_scale_factor * 2) are checked too. SDXL's float32 upcast and its latents_mean/latents_std are
checked in-process on float16, bfloat16 and edited copies of the tiny SDXL.
"""
from __future__ import annotations

import io
import json
import shutil
import signal

import grpc
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from latentwire.common.v1 import model_pb2
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from services.runtime import families, tensors
from services.runtime.config import ModelSpec
from services.suite.launcher import start_service, wait_serving
from services.vae.model import VaeModel, upcasting

TOLERANCE = 1e-5  # the conformance bound (float32)
STEPS = 2
SEED = 7
CPU = torch.device("cpu")

#: Per family: the text-to-image pipeline and a non-square size (multiples of each family's size multiple).
TEXT_TO_IMAGE = {
    "sdxl": (StableDiffusionXLPipeline, 64, 48),
    "sd3": (StableDiffusion3Pipeline, 32, 24),
    "flux": (FluxPipeline, 32, 48),
}


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tiny_family_models):
    return {name: tiny_family_models[name] for name in ("sdxl", "sdxl-refiner", "sd3", "flux")}


@pytest.fixture(scope="module")
def stub(folders, tmp_path_factory):
    """The VAE service in its own process on a free port, serving the tiny SDXL, SD3 and Flux models."""
    log_dir = tmp_path_factory.mktemp("vae-logs")
    args = ["--port", "0"]
    for name, folder in folders.items():
        args += ["--model", f"tiny-{name}={folder}"]
    running = start_service("vae", "services.vae", args, log_dir=log_dir, timeout=120)
    try:
        wait_serving(running.address, 120, "vae", running.process)
        with grpc.insecure_channel(running.address) as channel:
            yield vae_pb2_grpc.VaeServiceStub(channel)
    finally:
        running.process.send_signal(signal.SIGTERM)
        code = running.process.wait(30)
    assert code == 0, f"the VAE service exited with {code}; log in {log_dir}"


def _pipeline(cls, folder, **kwargs):
    extra = {"add_watermarker": False} if cls is StableDiffusionXLPipeline else {}
    return cls.from_pretrained(folder, use_safetensors=True, **extra, **kwargs)


def _generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _model(name: str) -> model_pb2.ModelReference:
    return model_pb2.ModelReference(name=name)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(width: int = 71, height: int = 53) -> Image.Image:
    """A smooth RGB picture of an odd size, so the image processors' rounding shows."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(array)


def _mask(width: int = 71, height: int = 53) -> Image.Image:
    array = np.zeros((height, width), dtype=np.uint8)
    array[height // 4: 3 * height // 4, width // 3:] = 255
    return Image.fromarray(array)


def _sample(distribution, seed: int = SEED, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A latent distribution sampled and scaled as the denoiser does: DiagonalGaussianDistribution.sample from a
    generator seeded like the pipeline's, then (sample - shift_factor) * scaling_factor."""
    mean = tensors.from_proto(distribution.mean, field="mean")
    std = tensors.from_proto(distribution.std, field="std")
    noise = randn_tensor(mean.shape, generator=_generator(seed), device=mean.device, dtype=mean.dtype)
    return ((mean + std * noise).to(dtype) - distribution.shift_factor) * distribution.scaling_factor


def _max_diff(a, b) -> float:
    a, b = (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in (a, b))
    assert a.shape == b.shape, f"shapes differ: {list(a.shape)} vs {list(b.shape)}"
    return float((a.double() - b.double()).abs().max())


# --- decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TEXT_TO_IMAGE))
def test_decode_matches_pipeline(family, folders, stub):
    """Two images, a non-square size: the service decodes the pipeline's latents into the pipeline's image."""
    cls, width, height = TEXT_TO_IMAGE[family]
    pipe = _pipeline(cls, folders[family])
    call = dict(prompt="a red fox in the snow", num_inference_steps=STEPS, num_images_per_prompt=2,
                width=width, height=height)
    latents = pipe(**call, generator=_generator(), output_type="latent").images
    expected = pipe(**call, generator=_generator(), output_type="np").images
    if family == "flux":
        # FluxPipeline returns packed latents with output_type="latent"; the denoiser returns them unpacked.
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    channels = pipe.vae.config.latent_channels
    assert latents.shape == (2, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    request = vae_pb2.DecodeRequest(model=_model(f"tiny-{family}"), latents=tensors.to_proto(latents, "latents"),
                                    include_pixels=True)
    response = stub.Decode(request, timeout=120)
    pixels = tensors.from_proto(response.pixels, field="pixels").numpy()
    assert pixels.shape == expected.shape == (2, height, width, 3)
    assert _max_diff(pixels, expected) <= TOLERANCE
    # The PNGs are the same pixels, quantised as diffusers' numpy_to_pil does.
    png = np.asarray(Image.open(io.BytesIO(response.png_images[1])).convert("RGB"))
    assert np.array_equal(png, (expected[1] * 255).round().astype(np.uint8))


def test_decode_refuses_wrong_channels(stub):
    """16-channel latents are refused by a 4-channel VAE (and the other way round), naming the shape needed."""
    for model, channels, needed in (("tiny-sdxl", 16, 4), ("tiny-flux", 4, 16)):
        latents = torch.zeros(1, channels, 8, 8)
        with pytest.raises(grpc.RpcError) as caught:
            request = vae_pb2.DecodeRequest(model=_model(model), latents=tensors.to_proto(latents, "latents"))
            stub.Decode(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"[batch >= 1, {needed}, height >= 1, width >= 1]" in caught.value.details()


# --- encode -------------------------------------------------------------------------------


def _encode(stub, model: str, image: Image.Image, mask: Image.Image | None = None, width: int = 0, height: int = 0):
    request = vae_pb2.EncodeRequest(model=_model(model), image=_png(image), width=width, height=height)
    if mask is not None:
        request.mask_image = _png(mask)
    return stub.Encode(request, timeout=120)


def test_encode_sdxl_img2img(folders, stub):
    """StableDiffusionXLImg2ImgPipeline.prepare_latents (no noise) from the image at its own size, rounded."""
    pipe = StableDiffusionXLImg2ImgPipeline(**_pipeline(StableDiffusionXLPipeline, folders["sdxl"]).components)
    image = _picture()
    init_image = pipe.image_processor.preprocess(image)  # as the pipeline's __call__: the image's own size
    expected = pipe.prepare_latents(init_image, None, 1, 1, torch.float32, CPU, _generator(), add_noise=False)

    response = _encode(stub, "tiny-sdxl", image)
    assert (response.width, response.height) == (70, 52) == (init_image.shape[3], init_image.shape[2])
    distribution = response.image_latents
    assert distribution.scaling_factor == pytest.approx(0.13025) and distribution.shift_factor == 0
    assert _max_diff(_sample(distribution), expected) <= TOLERANCE


def test_encode_sdxl_inpaint(folders, stub):
    """StableDiffusionXLInpaintPipeline: _encode_vae_image of the image, prepare_mask_latents of the mask and the
    masked image."""
    pipe = StableDiffusionXLInpaintPipeline(**_pipeline(StableDiffusionXLPipeline, folders["sdxl"]).components)
    image, mask, width, height = _picture(), _mask(), 64, 48
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    mask_condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
    masked_image = init_image * (mask_condition < 0.5)
    image_latents = pipe._encode_vae_image(init_image, _generator())
    latent_mask, masked_latents = pipe.prepare_mask_latents(mask_condition, masked_image, 1, height, width,
                                                            torch.float32, CPU, _generator(SEED + 1), False)

    response = _encode(stub, "tiny-sdxl", image, mask, width, height)
    assert _max_diff(_sample(response.image_latents), image_latents) <= TOLERANCE
    assert _max_diff(_sample(response.masked_image_latents, SEED + 1), masked_latents) <= TOLERANCE
    assert torch.equal(tensors.from_proto(response.mask, field="mask"), latent_mask)
    assert 0 < float(latent_mask.mean()) < 1  # the mask covers part of the image


def test_encode_flux_img2img(folders, stub):
    """FluxImg2ImgPipeline: its image processor rounds to vae_scale_factor * 2, _encode_vae_image shifts and scales."""
    pipe = FluxImg2ImgPipeline(**_pipeline(FluxPipeline, folders["flux"]).components)
    image = _picture()
    init_image = pipe.image_processor.preprocess(image).to(dtype=torch.float32)
    expected = pipe._encode_vae_image(init_image, _generator())

    response = _encode(stub, "tiny-flux", image)
    assert (response.width, response.height) == (70, 52) == (init_image.shape[3], init_image.shape[2])
    distribution = response.image_latents
    assert distribution.mean.shape[1] == 16
    assert (distribution.scaling_factor, distribution.shift_factor) == pytest.approx((0.3611, 0.1159))
    assert _max_diff(_sample(distribution), expected) <= TOLERANCE


def test_encode_flux_inpaint(folders, stub):
    """FluxInpaintPipeline.prepare_mask_latents packs the mask (repeated over the 16 channels) and the masked
    image's latents; packing the service's unpacked mask and sampled latents gives the same tensors."""
    pipe = FluxInpaintPipeline(**_pipeline(FluxPipeline, folders["flux"]).components)
    image, mask, width, height = _picture(), _mask(), 32, 48
    channels = pipe.transformer.config.in_channels // 4
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    mask_condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
    masked_image = init_image * (mask_condition < 0.5)
    image_latents = pipe._encode_vae_image(init_image, _generator())
    packed_mask, packed_masked = pipe.prepare_mask_latents(mask_condition, masked_image, 1, channels, 1, height,
                                                           width, torch.float32, CPU, _generator(SEED + 1))

    response = _encode(stub, "tiny-flux", image, mask, width, height)
    latent_height, latent_width = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    latent_mask = tensors.from_proto(response.mask, field="mask")
    assert latent_mask.shape == (1, 1, latent_height, latent_width)
    assert _max_diff(_sample(response.image_latents), image_latents) <= TOLERANCE
    ours_mask = pipe._pack_latents(latent_mask.repeat(1, channels, 1, 1), 1, channels, latent_height, latent_width)
    assert torch.equal(ours_mask, packed_mask)
    ours_masked = pipe._pack_latents(_sample(response.masked_image_latents, SEED + 1), 1, channels, latent_height,
                                     latent_width)
    assert _max_diff(ours_masked, packed_masked) <= TOLERANCE


def test_encode_sd3(folders, stub):
    """SD3 encodes at vae_scale_factor (no doubling), shifted and scaled as StableDiffusion3InpaintPipeline's
    _encode_vae_image."""
    pipe = StableDiffusion3InpaintPipeline(**_pipeline(StableDiffusion3Pipeline, folders["sd3"]).components)
    image = _picture()
    init_image = pipe.image_processor.preprocess(image).to(dtype=torch.float32)
    expected = pipe._encode_vae_image(init_image, _generator())

    response = _encode(stub, "tiny-sd3", image)
    assert (response.width, response.height) == (71, 53)
    assert (response.image_latents.scaling_factor, response.image_latents.shift_factor) == \
        pytest.approx((1.5035, 0.0609))
    assert _max_diff(_sample(response.image_latents), expected) <= TOLERANCE


def _settings(processor) -> dict:
    return {k: v for k, v in processor.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("family, pipeline_class", [
    ("sdxl", StableDiffusionXLInpaintPipeline), ("sd3", StableDiffusion3InpaintPipeline),
    ("flux", FluxInpaintPipeline)])
def test_image_processors_match_pipelines(family, pipeline_class, folders):
    """The service's image and mask processors are configured as the family's inpainting pipeline's (Flux:
    vae_scale_factor * 2, for its 2x2 packing)."""
    base = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    pipe = pipeline_class(**_pipeline(base, folders[family]).components)
    model = VaeModel(ModelSpec(f"tiny-{family}", folders[family]), CPU, torch.float32, False)
    assert _settings(model.image_processor) == _settings(pipe.image_processor)
    assert _settings(model.mask_processor) == _settings(pipe.mask_processor)
    assert model.size_multiple == (2 * pipe.vae_scale_factor if family == "flux" else pipe.vae_scale_factor)


# --- SDXL's float32 upcast and latent statistics (in-process) -----------------------------


def test_upcasting_decisions():
    """As diffusers: SDXL decodes in float32 only from float16, encodes in float32 from any half precision;
    other families never upcast; force_upcast False never upcasts."""
    sdxl, refiner, sd, flux = (families.FAMILIES[n] for n in ("sdxl", "sdxl-refiner", "sd", "flux"))
    assert upcasting(sdxl, torch.float16, True) == (True, True)
    assert upcasting(refiner, torch.float16, True) == (True, True)
    assert upcasting(sdxl, torch.bfloat16, True) == (False, True)
    assert upcasting(sdxl, torch.float32, True) == (False, False)
    assert upcasting(sdxl, torch.float16, False) == (False, False)
    assert upcasting(sd, torch.float16, True) == (False, False)
    assert upcasting(flux, torch.float16, True) == (False, False)


def test_float16_sdxl_decodes_upcast_like_the_pipeline(folders):
    """A float16 SDXL VAE: StableDiffusionXLPipeline (float32 UNet, float16 VAE) upcasts it for the decode; the
    service's float16 model decodes the same latents into the same image, in float32."""
    pipe = _pipeline(StableDiffusionXLPipeline, folders["sdxl"])
    pipe.vae.to(torch.float16)
    call = dict(prompt="a lighthouse", num_inference_steps=STEPS, width=32, height=32)
    latents = pipe(**call, generator=_generator(), output_type="latent").images
    expected = pipe(**call, generator=_generator(), output_type="np").images
    assert pipe.vae.dtype == torch.float16  # the pipeline cast it back

    model = VaeModel(ModelSpec("tiny-sdxl", folders["sdxl"]), CPU, torch.float16, False)
    assert model.decoder.dtype == model.encoder.dtype == torch.float32
    assert _max_diff(model.decode(latents), expected) == 0


def test_bfloat16_sdxl_encodes_upcast_decodes_in_bfloat16(folders):
    """bfloat16: the pipelines' encode upcasts (force_upcast), the decode does not (float16 only)."""
    model = VaeModel(ModelSpec("tiny-sdxl", folders["sdxl"]), CPU, torch.bfloat16, False)
    assert model.decoder.dtype == torch.bfloat16 and model.encoder.dtype == torch.float32

    vae = AutoencoderKL.from_pretrained(folders["sdxl"], subfolder="vae", torch_dtype=torch.bfloat16)
    pipe = StableDiffusionXLInpaintPipeline(**_pipeline(StableDiffusionXLPipeline, folders["sdxl"]).components)
    init_image = pipe.image_processor.preprocess(_picture(), height=32, width=32)
    with torch.no_grad():
        expected = vae.to(torch.float32).encode(init_image.float()).latent_dist
    encoded = model.encode(_picture(), None, 32, 32)
    assert encoded.image_mean.dtype == torch.float32
    assert torch.equal(encoded.image_mean, expected.mean) and torch.equal(encoded.image_std, expected.std)


@pytest.fixture(scope="module")
def sdxl_with_statistics(folders, tmp_path_factory):
    """The tiny SDXL with latents_mean and latents_std in its VAE config (as Playground v2.5 has)."""
    folder = shutil.copytree(folders["sdxl"], tmp_path_factory.mktemp("sdxl-stats") / "tiny-sdxl-stats")
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["latents_mean"] = [0.5, -0.25, 0.125, 0.0]
    config["latents_std"] = [2.0, 0.5, 1.5, 0.75]
    config_path.write_text(json.dumps(config))
    return folder


def test_sdxl_latent_statistics(sdxl_with_statistics):
    """latents_mean / latents_std: the decode denormalises as StableDiffusionXLPipeline, the image-to-image encode
    normalises as StableDiffusionXLImg2ImgPipeline.prepare_latents (folded into the distribution)."""
    pipe = _pipeline(StableDiffusionXLPipeline, sdxl_with_statistics)
    call = dict(prompt="a lighthouse", num_inference_steps=STEPS, width=32, height=32)
    latents = pipe(**call, generator=_generator(), output_type="latent").images
    expected = pipe(**call, generator=_generator(), output_type="np").images
    model = VaeModel(ModelSpec("tiny-sdxl-stats", sdxl_with_statistics), CPU, torch.float32, False)
    assert model.latents_mean is not None
    assert _max_diff(model.decode(latents), expected) <= TOLERANCE
    plain = (model.decoder.decode(latents / model.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert _max_diff(plain.permute(0, 2, 3, 1).detach(), expected) > 1e-3  # the statistics matter

    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    init_image = img2img.image_processor.preprocess(_picture(), height=32, width=32)
    reference = img2img.prepare_latents(init_image, None, 1, 1, torch.float32, CPU, _generator(), add_noise=False)
    encoded = model.encode(_picture(), None, 32, 32)
    noise = randn_tensor(encoded.image_mean.shape, generator=_generator(), device=CPU, dtype=torch.float32)
    ours = (encoded.image_mean + encoded.image_std * noise) * model.scaling_factor
    assert _max_diff(ours, reference) <= TOLERANCE
