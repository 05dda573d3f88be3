"""ESRGAN-type upscaler models (services/vae/upscaler.py): the network against spandrel's (ComfyUI's and chaiNNer's
loader) on the same files, both key layouts, tiles against the whole image, the registry's recognition of the files
(pickles refused unless allowed), the VAE stage's Upscale against the module in-process, and hires fix with a
registry upscaler model through the suite against diffusers composed by hand: StableDiffusionPipeline at the base
size -> the network (until the target is covered) -> LANCZOS to the target -> StableDiffusionImg2ImgPipeline, each
pipeline call with its own torch.Generator("cpu").manual_seed(seed), as tests/test_seeds_hires.py composes the
built-in upscalers.

The tiny upscalers (services/tiny_models/esrgan.py): num_feat 8, num_grow_ch 32 (spandrel builds 32 only), one
RRDB; x4 in BasicSR's and ESRGAN's old layout, x2 (pixel-unshuffled input) in BasicSR's.
"""
from __future__ import annotations

import io
import sys
import time
import types

import diffusers
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from latentwire.client import Client, LatentwireError
from latentwire.client.hires import hires_fix
from latentwire.client.registry import ModelFilesError, RegistryClient, scan_folder
from latentwire.registry.v1 import registry_pb2
from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc
from reference import _pipeline
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.tiny_models import create_tiny_upscaler
from services.vae import upscaler as esrgan

TOLERANCE = 1e-5
CPU = torch.device("cpu")
PROMPT = "a lighthouse on a cliff at dusk"
SIZE, STEPS, GUIDANCE = 32, 2, 6.0
#: Registry names of the tiny upscalers in the family suite.
X4, X2 = "tiny-esrgan-x4", "tiny-esrgan-x2"


def _spandrel():
    """spandrel, imported with a stand-in for the torchvision names two of its other architectures import at package
    import (LaMa, RestoreFormer); ESRGAN never calls them. The stand-in is removed at once, so nothing else sees
    torchvision (services/runtime/image_processors.py asks whether it is installed)."""
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    assert not any(n in sys.modules for n in names), "a real torchvision is installed: import spandrel plainly"
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    functional = sys.modules["torchvision.transforms.functional"]
    functional.InterpolationMode, functional.rotate, functional.normalize = object, None, None
    try:
        import spandrel
    finally:
        for name in names:
            del sys.modules[name]
    return spandrel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    return {
        "x4": create_tiny_upscaler(root / "x4" / "tiny-esrgan-x4.safetensors", 4),
        "x4-old": create_tiny_upscaler(root / "x4-old" / "tiny-esrgan-x4-old.safetensors", 4, layout="old"),
        "x2": create_tiny_upscaler(root / "x2" / "tiny-esrgan-x2.safetensors", 2),
        "x4-pth": create_tiny_upscaler(root / "pth" / "tiny-esrgan-x4.pth", 4),
    }


def _image(width: int = 40, height: int = 28, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (a few random colours resized bicubically)."""
    colours = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(colours).resize((width, height), Image.Resampling.BICUBIC)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("key", ["x4", "x4-old", "x2"])
def test_network_equals_spandrel(files, key):
    spandrel = _spandrel()
    reference = spandrel.ModelLoader().load_from_file(str(files[key]))
    ours = esrgan.Upscaler.load(files[key], key, CPU, torch.float32)
    assert ours.scale == reference.scale == (2 if key == "x2" else 4)
    x = torch.rand(1, 3, 18, 23, generator=torch.Generator().manual_seed(1))  # odd width: x2's reflect padding
    with torch.inference_mode():
        expected, got = reference.model(x), ours.network(x)
    assert got.shape == expected.shape == (1, 3, 18 * ours.scale, 23 * ours.scale)
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert float(got.std()) > 0.05  # the random network's output has structure, so equality means something


def test_old_and_new_layouts_load_the_same_network(files):
    new = esrgan.Upscaler.load(files["x4"], "new", CPU, torch.float32)
    old = esrgan.Upscaler.load(files["x4-old"], "old", CPU, torch.float32)
    assert new.network.arch == old.network.arch == esrgan.Architecture(3, 3, 8, 32, 1, 2, 1)
    assert esrgan.Upscaler.load(files["x2"], "x2", CPU, torch.float32).network.arch.shuffle_factor == 2
    image = _image()
    assert np.array_equal(np.asarray(new.run(image)), np.asarray(old.run(image)))
    assert new.run(image).size == (160, 112)


def test_tiles_match_the_whole_image(files):
    """Tiles (A1111's split_grid / combine_grid) against one pass over the whole image. Measured on this 100x80
    image: tile 48 overlap 8, max 8 and mean 0.07 gray levels apart; tile 32, max 13, mean 0.27 (the tiny
    network sees 19 input pixels around each pixel, more than the overlap). Where no seam is within reach (the
    first tile's corner, before the next tiles are pasted) they agree to 1 gray level (float summation order)."""
    upscaler = esrgan.Upscaler.load(files["x4"], "x4", CPU, torch.float32)
    image = _image(100, 80, seed=2)
    whole = np.asarray(upscaler.upscale(image, tile_size=0)).astype(np.int16)
    assert np.array_equal(whole, np.asarray(upscaler.upscale(image, tile_size=128)))  # fits one tile: whole
    tiled = np.asarray(upscaler.upscale(image, tile_size=48, tile_overlap=8)).astype(np.int16)
    assert tiled.shape == whole.shape == (320, 400, 3)
    difference = np.abs(tiled - whole)
    assert difference[:100, :100].max() <= 1
    assert difference.max() <= 16 and difference.mean() <= 0.2
    assert difference.max() > 1  # the seams are there: tiles really ran


def test_files_that_are_no_rrdbnet_are_refused(files):
    from safetensors.torch import load_file

    state = load_file(str(files["x4"]))
    with pytest.raises(InvalidArgument) as error:
        esrgan.build({k: v for k, v in state.items() if not k.startswith("conv_up2")} | {"extra.weight": state[
            "conv_hr.weight"]}, "broken")
    assert error.value.reason == "UPSCALER_INVALID"
    with pytest.raises(InvalidArgument, match="neither ESRGAN's"):
        esrgan.build({"weight": torch.zeros(1)}, "other")


# ----------------------------------------------------------------------------------------------
# Registry recognition and pickles


def test_registry_recognises_upscaler_files(files, tmp_path):
    from safetensors.torch import save_file

    for key in ("x4", "x4-old", "x2"):
        manifest = scan_folder(files[key])
        assert manifest.kind == registry_pb2.MODEL_KIND_UPSCALER
        assert [f.path for f in manifest.files] == ["upscaler.safetensors"]
        assert manifest.default_name == files[key].stem
    save_file({"conv_first.weight": torch.zeros(1)}, tmp_path / "other.safetensors")  # not an upscaler: a checkpoint
    with pytest.raises(ModelFilesError, match="convert"):
        scan_folder(tmp_path / "other.safetensors")


def test_pickle_upscalers_need_allow_pickle(files):
    with pytest.raises(ModelFilesError, match="pickle-based upscaler.*--allow-pickle"):
        scan_folder(files["x4-pth"])
    manifest = scan_folder(files["x4-pth"], allow_pickle=True)
    assert manifest.kind == registry_pb2.MODEL_KIND_UPSCALER and [f.path for f in manifest.files] == ["upscaler.pth"]
    # The stage refuses it too without --allow-pickle, and with it loads the same network as the safetensors file.
    with pytest.raises(FailedPrecondition) as error:
        esrgan.Upscaler.load(files["x4-pth"], "p", CPU, torch.float32)
    assert error.value.reason == "MODEL_FILES_REFUSED"
    pickled = esrgan.Upscaler.load(files["x4-pth"], "p", CPU, torch.float32, allow_pickle=True)
    plain = esrgan.Upscaler.load(files["x4"], "s", CPU, torch.float32)
    image = _image(20, 20)
    assert np.array_equal(np.asarray(pickled.run(image)), np.asarray(plain.run(image)))


# ----------------------------------------------------------------------------------------------
# Through the family suite (it has a registry): Upscale on the VAE stage, hires fix on the orchestrator


@pytest.fixture(scope="module")
def registry(family_suite, files):
    with RegistryClient(family_suite.services["registry"].address, timeout=120) as client:
        for name, key in ((X4, "x4"), (X2, "x2")):
            version = client.import_folder(files[key], name, aliases=["default"]).model_version
            assert version.kind == registry_pb2.MODEL_KIND_UPSCALER
        yield client


@pytest.fixture(scope="module")
def vae_channel(family_suite, registry):
    with grpc.insecure_channel(family_suite.services["vae"].address) as channel:
        yield channel


@pytest.fixture(scope="module")
def vae(vae_channel):
    return vae_pb2_grpc.VaeServiceStub(vae_channel)


def _upscale(vae, name: str, images: list[bytes], **fields) -> vae_pb2.UpscaleResponse:
    request = vae_pb2.UpscaleRequest(images=images, **fields)
    request.upscaler.name = name
    return vae.Upscale(request, timeout=120)


def test_registry_refuses_pickles_without_its_flag(registry, files):
    with pytest.raises(LatentwireError) as error:
        registry.import_folder(files["x4-pth"], "tiny-esrgan-pth", allow_pickle=True)
    assert error.value.reason == "PICKLE_REFUSED"


def test_upscale_rpc_equals_the_module(vae, files):
    image, large = _image(40, 28, seed=4), _image(72, 40, seed=5)
    response = _upscale(vae, X4, [_png(image), _png(large)], tile_size=32)
    assert response.scale == 4 and response.upscaler == f"{X4}@1"
    module = esrgan.Upscaler.load(files["x4"], "x4", CPU, torch.float32)
    assert np.array_equal(_pixels(response.png_images[0]), np.asarray(module.upscale(image, 32)))
    assert np.array_equal(_pixels(response.png_images[1]), np.asarray(module.upscale(large, 32)))  # 6 tiles
    x2 = _upscale(vae, f"{X2}@default", [_png(image)])
    module = esrgan.Upscaler.load(files["x2"], "x2", CPU, torch.float32)
    assert x2.scale == 2 and np.array_equal(_pixels(x2.png_images[0]), np.asarray(module.upscale(image)))


@pytest.mark.parametrize("name, fields, code, reason", [
    ("no-such-upscaler", {}, grpc.StatusCode.NOT_FOUND, "UPSCALER_NOT_FOUND"),
    ("tiny-sd15", {}, grpc.StatusCode.INVALID_ARGUMENT, "NOT_AN_UPSCALER"),
    ("", {}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPSCALER_REFERENCE"),
    (X4, {"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_EMPTY"),
    (X4, {"images": [b"not an image"]}, grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_IMAGE"),
    (X4, {"tile_size": 8}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TILING"),
    (X4, {"tile_size": 64, "tile_overlap": 40}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TILING"),
    (X4, {"images": [None] * 40}, grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE"),
    (X4, {"job_id": "bad id!"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_JOB_ID"),
])
def test_upscale_refuses_bad_input(vae, name, fields, code, reason):
    from services.runtime.errors import error_info_of

    png = _png(_image(16, 16))
    if "images" in fields:
        fields = dict(fields, images=[png if i is None else i for i in fields["images"]])
    else:
        fields = dict(fields, images=[png])
    with pytest.raises(grpc.RpcError) as error:
        _upscale(vae, name, **fields)
    assert error.value.code() == code, error.value.details()
    assert error_info_of(error.value).reason == reason
    assert "/" not in error.value.details().replace("latentwire.", "")  # no server paths


def test_upscale_refuses_outputs_beyond_the_limit(vae):
    wide = _png(Image.new("RGB", (2100, 8)))  # x4: 8400 pixels wide, above 4 x --max-image-size (2048)
    with pytest.raises(grpc.RpcError) as error:
        _upscale(vae, X4, [wide])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "8400x32" in error.value.details()


def test_upscale_past_its_deadline_stops(vae, vae_channel):
    """A long upscale (a 1000x1000 image in 32-pixel tiles: about 1700 tiles) ends DEADLINE_EXCEEDED at the
    caller's deadline, and the VAE frees the job soon after (interrupt.py's hooks on the network's layers)."""
    from latentwire.common.v1 import status_pb2, status_pb2_grpc

    gradient = np.tile(np.linspace(0, 255, 1000, dtype=np.uint8), (1000, 1))
    with pytest.raises(grpc.RpcError) as error:
        vae.Upscale(vae_pb2.UpscaleRequest(upscaler={"name": X4}, images=[_png(Image.fromarray(gradient).convert(
            "RGB"))], tile_size=32, job_id="upscale-deadline"), timeout=1.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status = status_pb2_grpc.StatusServiceStub(vae_channel)
    for _ in range(300):  # 15 s
        answer = status.GetStatus(status_pb2.GetStatusRequest(), timeout=10)
        if not any(job.job_id == "upscale-deadline" for job in answer.active_jobs):
            break
        time.sleep(0.05)
    job = next(job for job in answer.recent_jobs if job.job_id == "upscale-deadline")
    assert job.state == status_pb2.JobState.JOB_STATE_CANCELLED and job.completed_steps == 0


@pytest.fixture(scope="module")
def sd15(tiny_family_models):
    pipeline = _pipeline(str(tiny_family_models["sd15"]))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def client(family_suite, registry):
    with Client(family_suite.services["orchestrator"].address, timeout=300) as running:
        yield running


def test_hires_with_a_registry_upscaler_equals_diffusers_composed(client, sd15, files):
    """x2 model, hires 2.5x: 32 -> 64 -> 128 (two passes to cover 80) -> LANCZOS 80 -> img2img at 80x80."""
    result = client.generate(PROMPT, model="tiny-sd15", steps=STEPS, guidance_scale=GUIDANCE, width=SIZE,
                             height=SIZE, seed=5, include_pixels=True,
                             hires=hires_fix(X2, scale=2.5, denoising_strength=0.6))
    first = sd15(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                 generator=torch.Generator("cpu").manual_seed(5), output_type="pil").images[0]
    network = esrgan.Upscaler.load(files["x2"], "x2", CPU, torch.float32)
    upscaled = network.upscale(network.upscale(first)).resize((80, 80), Image.Resampling.LANCZOS)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**sd15.components)
    img2img.set_progress_bar_config(disable=True)
    expected = img2img(PROMPT, image=upscaled, strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    assert result.pixels.shape == (1, 80, 80, 3)
    assert float(np.abs(result.pixels - expected).max()) <= TOLERANCE
    lanczos = img2img(PROMPT, image=first.resize((80, 80), Image.Resampling.LANCZOS), strength=0.6,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    assert float(np.abs(lanczos - expected).max()) > 0.01  # the model's pixels made a difference
    text = Image.open(io.BytesIO(result.images[0])).text["parameters"]
    assert f"Hires upscale: 2.5, Hires upscaler: {X2}@1" in text  # the version pinned at acceptance


@pytest.mark.parametrize("name, why", [("no-such-upscaler", "not one latentwire runs"),
                                       ("tiny-sd15", "MODEL_KIND_STABLE_DIFFUSION"),
                                       ("not a/name", "not one latentwire runs")])
def test_hires_refuses_names_that_are_no_upscaler(client, name, why):
    with pytest.raises(LatentwireError) as error:
        client.generate(PROMPT, model="tiny-sd15", steps=STEPS, width=SIZE, height=SIZE, hires=hires_fix(name))
    assert error.value.reason == "UNKNOWN_UPSCALER" and why in str(error.value)


def test_cli_lists_upscalers(family_suite, registry, capsys):
    from latentwire.cli.main import main

    with pytest.raises(SystemExit) as ended:
        main(["upscalers", "--registry", family_suite.services["registry"].address])
    assert ended.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Latent (bicubic): latent" in out and "Lanczos: pixel, PIL LANCZOS" in out
    assert f"{X4}@1: ESRGAN-type model" in out and f"{X2}@1" in out and "tiny-sd15" not in out
