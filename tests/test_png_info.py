"""png-info and `generate --from FILE.png` (latentwire.client.infotext, the CLI).

The parser reads the "parameters" text as AUTOMATIC1111's parse_generation_parameters does, on the forms the
orchestrator writes (services.orchestrator.request.infotext) and on real A1111 / Forge texts (quoted values,
multi-line prompts, LoRA tags, Hires and unknown keys kept). Through the running suite (tiny SD 1.5): 20 seeded
random requests (samplers with schedule types, diffusers scheduler names, CFG 1.0 and above, negative prompts,
sizes, batches of two, batch counts, A1111 prompt syntax, clip skip, variation seeds, seed resize, hires fix,
tiling) made again from their PNGs give identical pixels, once through `latentwire generate
--from` as a subprocess; an image-to-image PNG is refused without --init-image and remade with it.
"""
from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentwire.cli.main import _settings_from_png, build_parser, run
from latentwire.client import infotext, samplers
from latentwire.client.hires import hires_fix
from latentwire.common.v1 import model_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from services.orchestrator.request import GenerateParams
from services.orchestrator.request import infotext as write_infotext

CLI = [sys.executable, "-m", "latentwire.cli.main"]


# ----------------------------------------------------------------------------------------------
# The parser


def _params(**changes) -> GenerateParams:
    fields = dict(model="", prompt="a castle, on a hill", negative_prompt="", seed=3, num_inference_steps=20,
                  guidance_scale=7.5, guidance_rescale=0.0, eta=0.0, width=64, height=48, num_images=1,
                  scheduler="", include_pixels=False)
    fields.update(changes)
    return GenerateParams(**fields)


def _ours(params: GenerateParams, *, scheduler: str = "PNDMScheduler", index: int = 0, **kwargs) -> str:
    return write_infotext(params, model=params.model, scheduler=scheduler, width=params.width, height=params.height,
                          index=index, **kwargs)


OURS = [
    # (what the orchestrator wrote for these params, the request_kwargs expected, batch position)
    ("plain", _ours(_params()), dict(
        prompt="a castle, on a hill", negative_prompt="", steps=20, guidance_scale=7.5, seed=3, width=64, height=48,
        model="", scheduler="PNDMScheduler"), 0),
    ("sampler, negative, multi-line prompt, batch pos 1",
     _ours(_params(prompt="line one: (red:1.2)\nline two, <lora:x:0.5>", negative_prompt="blurry, low quality",
                   sampler="DPM++ 2M", schedule_type="Karras", num_images=2, model="tiny-sd", guidance_scale=1.0),
           index=1),
     dict(prompt="line one: (red:1.2)\nline two, <lora:x:0.5>", negative_prompt="blurry, low quality", steps=20,
          guidance_scale=1.0, seed=3, width=64, height=48, model="tiny-sd", sampler="DPM++ 2M",
          schedule_type="Karras", num_images=2), 1),
    ("flux distilled guidance", _ours(_params(guidance_scale=None), scheduler="FlowMatchEulerDiscreteScheduler",
                                      guidance_scale=3.5, guidance_distilled=True),
     dict(prompt="a castle, on a hill", negative_prompt="", steps=20, guidance_scale=3.5, seed=3, width=64,
          height=48, model="", scheduler="FlowMatchEulerDiscreteScheduler"), 0),
    ("image-to-image with refiner", _ours(_params(init_image=b"x", strength=0.6, refiner="refiner",
                                                  refiner_switch_at=0.75, model="sdxl")),
     dict(prompt="a castle, on a hill", negative_prompt="", steps=20, guidance_scale=7.5, seed=3, width=64,
          height=48, model="sdxl", scheduler="PNDMScheduler", strength=0.6, refiner="refiner",
          refiner_switch_at=0.75), 0),
]


@pytest.mark.parametrize("name, text, expected, position", OURS, ids=[case[0] for case in OURS])
def test_our_infotext_parses_back(name, text, expected, position):
    params = infotext.parse_parameters(text)
    assert infotext.request_kwargs(params) == expected
    assert infotext.batch_position(params) == position
    assert infotext.unused_fields(params) == []


def test_controlnet_units_are_reported_with_their_control_flags():
    unit = controlnet_pb2.ControlNetUnit(preprocessor="canny", model=model_pb2.ModelReference(name="cn-b"),
                                         conditioning_scale=0.8, guidance_start=0.1, guidance_end=0.9)
    params = infotext.parse_parameters(_ours(_params(controlnets=(unit,))))
    assert params["ControlNet 0"] == ("Module: canny, Model: cn-b, Weight: 0.8, Guidance Start: 0.1, "
                                      "Guidance End: 0.9")
    assert infotext.controlnet_units(params) == [{"Module": "canny", "Model": "cn-b", "Weight": "0.8",
                                                  "Guidance Start": "0.1", "Guidance End": "0.9"}]
    assert infotext.missing_inputs(params) == [
        "--control canny@cn-b:IMAGE:0.8:0.1:0.9: ControlNet 0 needs its control image"]
    assert infotext.missing_inputs(infotext.parse_parameters(_ours(_params()))) == []


A1111 = [
    # (text, fields parsed, request_kwargs, fields not applied)
    ("girl with an artist's beret, ((eyeshadow)), (coquettish), detailed\n"
     "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
     "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b",
     {"Prompt": "girl with an artist's beret, ((eyeshadow)), (coquettish), detailed",
      "Negative prompt": "ugly, fat, (((deformed))), [blurry]", "Steps": "20", "Sampler": "Euler a",
      "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512", "Model hash": "45dee52b"},
     dict(prompt="girl with an artist's beret, ((eyeshadow)), (coquettish), detailed",
          negative_prompt="ugly, fat, (((deformed))), [blurry]", steps=20, sampler="Euler a", schedule_type="",
          guidance_scale=7.0, seed=965400086, width=512, height=512),
     []),
    # A pre-1.9 combined sampler name, a LoRA tag, quoted values holding commas and colons, a version.
    ("masterpiece, 1girl, <lora:lycorisRecoil_chisatoV10:1>, blonde hair,  \n"
     "  second line of the prompt\n"
     "Negative prompt: (worst quality:1.4), watermark\n"
     "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 2179987202, Size: 768x512, Model hash: 93b79e09ed, "
     'Model: anything-v4.5, Clip skip: 2, Lora hashes: "lycorisRecoil_chisatoV10: 4f5e1c4a2b3d", '
     'TI hashes: "bad_prompt: 0a1b2c3d", Version: v1.6.0',
     {"Prompt": "masterpiece, 1girl, <lora:lycorisRecoil_chisatoV10:1>, blonde hair,\nsecond line of the prompt",
      "Negative prompt": "(worst quality:1.4), watermark", "Steps": "28", "Sampler": "DPM++ 2M Karras",
      "CFG scale": "7.5", "Seed": "2179987202", "Size-1": "768", "Size-2": "512", "Model hash": "93b79e09ed",
      "Model": "anything-v4.5", "Clip skip": "2", "Lora hashes": "lycorisRecoil_chisatoV10: 4f5e1c4a2b3d",
      "TI hashes": "bad_prompt: 0a1b2c3d", "Version": "v1.6.0"},
     dict(prompt="masterpiece, 1girl, <lora:lycorisRecoil_chisatoV10:1>, blonde hair,\nsecond line of the prompt",
          negative_prompt="(worst quality:1.4), watermark", steps=28, sampler="DPM++ 2M", schedule_type="Karras",
          guidance_scale=7.5, seed=2179987202, width=768, height=512, model="anything-v4.5", clip_skip=2),
     []),
    # Hires fix: its Denoising strength is the second pass's, not an init image's; Hires keys and unknown kept.
    ("a cat\n"
     "Steps: 30, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 512x768, "
     "Model: sd15, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
     "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
     'Some extension: "a \\"quoted\\" value, with a comma", Version: f0.0.17v1.8.0rc',
     {"Prompt": "a cat", "Negative prompt": "", "Steps": "30", "Sampler": "DPM++ SDE", "Schedule type": "Karras",
      "CFG scale": "5", "Seed": "1", "Size-1": "512", "Size-2": "768", "Model": "sd15",
      "Denoising strength": "0.45", "Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent",
      "Refiner": "sd_xl_refiner_1.0 [7440042bbd]", "Refiner switch at": "0.8",
      "Some extension": 'a "quoted" value, with a comma', "Version": "f0.0.17v1.8.0rc"},
     dict(prompt="a cat", negative_prompt="", steps=30, sampler="DPM++ SDE", schedule_type="Karras",
          guidance_scale=5.0, seed=1, width=512, height=768, model="sd15", refiner="sd_xl_refiner_1.0",
          refiner_switch_at=0.8, hires=hires_fix("Latent", scale=2.0, steps=10, denoising_strength=0.45)),
     ["Some extension"]),
    # Forge's Flux: distilled guidance; an inpainting (Mask blur) image-to-image; a sampler latentwire lacks.
    ("a fox\nSteps: 4, Sampler: Restart, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, Size: 64x64, "
     "Denoising strength: 0.75, Mask blur: 4, Model: flux1-dev",
     {"Prompt": "a fox", "Negative prompt": "", "Steps": "4", "Sampler": "Restart", "CFG scale": "1",
      "Distilled CFG Scale": "3.5", "Seed": "7", "Size-1": "64", "Size-2": "64", "Denoising strength": "0.75",
      "Mask blur": "4", "Model": "flux1-dev"},
     dict(prompt="a fox", negative_prompt="", steps=4, sampler="Restart", schedule_type="", guidance_scale=3.5,
          seed=7, width=64, height=64, model="flux1-dev", strength=0.75),
     []),
    # No settings line (fewer than three pairs): it is all prompt.
    ("just a prompt: with a colon\nand a second line, key: value",
     {"Prompt": "just a prompt: with a colon\nand a second line, key: value", "Negative prompt": ""},
     dict(prompt="just a prompt: with a colon\nand a second line, key: value", negative_prompt=""), []),
]


@pytest.mark.parametrize("text, fields, kwargs, unused", A1111, ids=[f"a1111-{i}" for i in range(len(A1111))])
def test_a1111_texts(text, fields, kwargs, unused):
    params = infotext.parse_parameters(text)
    assert params == fields
    assert infotext.request_kwargs(params) == kwargs
    assert infotext.unused_fields(params) == unused


def test_inputs_the_png_lacks_are_named():
    inpainted = infotext.parse_parameters(A1111[3][0])
    assert infotext.made_from_init_image(inpainted)
    assert [hint.split(":")[0] for hint in infotext.missing_inputs(inpainted)] == ["--init-image IMAGE", "--mask MASK"]
    assert not infotext.made_from_init_image(infotext.parse_parameters(A1111[2][0]))  # hires fix
    with pytest.raises(ValueError, match="Steps"):
        infotext.request_kwargs(infotext.parse_parameters("p\nSteps: many, CFG scale: 7, Seed: 1"))


def _png(text: str | None, size=(8, 8), zip: bool = False) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "elsewhere")
    if text is not None:
        info.add_text("parameters", text, zip=zip)
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("text, zip", [("a cat, Steps: 2", False), ("a café", True), ("ünïcode ✓\nline", False),
                                       ("zipped ✓", True)], ids=["tEXt", "zTXt", "iTXt", "iTXt-zipped"])
def test_png_parameters_reads_every_text_chunk_kind_pillow_writes(text, zip):
    png = _png(text, zip=zip)
    assert infotext.png_parameters(png) == text == Image.open(io.BytesIO(png)).info["parameters"]


def test_png_parameters_without_text_or_png():
    assert infotext.png_parameters(_png(None)) == ""
    with pytest.raises(ValueError, match="not a PNG"):
        infotext.png_parameters(b"GIF89a")


def test_png_info_command(tmp_path, capsys):
    path = tmp_path / "a1111.png"
    path.write_bytes(_png(A1111[1][0]))
    assert infotext.png_parameters(path.read_bytes()) == A1111[1][0]
    assert run(build_parser().parse_args(["png-info", str(path)])) == 0
    out = capsys.readouterr().out
    assert out.startswith(A1111[1][0] + "\n\n")
    assert re.search(r"^Sampler: +DPM\+\+ 2M Karras$", out, re.M) and "generate --from does not apply" not in out
    assert run(build_parser().parse_args(["png-info", str(path), "--json"])) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fields"] == A1111[1][1] and shown["request"] == A1111[1][2] and shown["batch_position"] is None
    bare = tmp_path / "bare.png"
    bare.write_bytes(_png(None))
    assert run(build_parser().parse_args(["png-info", str(bare)])) == 1
    assert "no generation parameters" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not a png")
    assert run(build_parser().parse_args(["png-info", str(tmp_path / "text.png")])) == 2


def test_flags_given_override_the_file(tmp_path):
    path = tmp_path / "batch.png"
    path.write_bytes(_png(_ours(_params(sampler="DPM++ 2M", schedule_type="Karras", num_images=2,
                                        negative_prompt="dull"), index=1)))

    def settings(*flags):
        args = build_parser().parse_args(["generate", "--from", str(path), *flags])
        base = dict(negative_prompt=args.negative, seed=args.seed, steps=args.steps, num_images=args.images,
                    scheduler=args.scheduler, sampler=args.sampler, schedule_type=args.schedule_type)
        return _settings_from_png(path, args, base)

    prompt, merged, pick = settings()
    assert (prompt, pick) == ("a castle, on a hill", 1)
    assert merged == dict(negative_prompt="dull", seed=3, steps=20, num_images=2, scheduler="",
                               sampler="DPM++ 2M", schedule_type="Karras", guidance_scale=7.5, width=64, height=48,
                               model="")
    # A flag typed equal to its default still overrides (--images 1: no batch, so no pick), --negative "" too.
    prompt, merged, pick = settings("another prompt", "--steps", "5", "--scheduler", "DDIMScheduler", "--images",
                                    "1", "--negative", "", "--seed", "9")
    assert (prompt, pick) == ("another prompt", None)
    assert (merged["steps"], merged["num_images"], merged["negative_prompt"], merged["seed"]) == (5, 1, "", 9)
    assert (merged["scheduler"], merged["sampler"], merged["schedule_type"]) == ("DDIMScheduler", "", "")


def test_generate_without_prompt_or_from_is_refused(capsys):
    assert run(build_parser().parse_args(["generate"])) == 2
    assert "--from FILE.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Through the running suite

WORDS = ["a lighthouse", "a red fox", "(snowy:1.2) hills", "[blurry] city", "an old map, sepia", "portrait: a cat"]
NEGATIVES = ["", "", "blurry", "low quality, (jpeg artifacts:1.3)"]


def _random_requests(offered: list[str], count: int = 20) -> list[dict]:
    """Seeded random request settings covering samplers + schedule types, scheduler names, CFG, sizes, batches."""
    rng = random.Random(13)
    usable = [s for s in samplers.SAMPLERS if "sd" in s.families and s.scheduler in offered]
    # DPMSolverSDEScheduler by class name draws its Brownian-tree noise from an unseeded generator (diffusers seeds
    # it from torch's global one), so two equal requests differ; by its sampler name ("DPM++ SDE") it is seeded.
    offered = [name for name in offered if name != "DPMSolverSDEScheduler"]
    requests = []
    for i in range(count):
        settings = dict(
            seed=rng.randrange(2**32), steps=rng.randint(2, 4),
            guidance_scale=rng.choice([1.0, 7.5, round(rng.uniform(1.5, 9.0), 2)]),
            width=rng.choice([32, 40, 48, 56, 64]), height=rng.choice([32, 40, 48, 56, 64]),
            num_images=1 if i % 3 else 2, negative_prompt=rng.choice(NEGATIVES))
        prompt = ", ".join(rng.sample(WORDS, rng.randint(1, 3)))
        settings["prompt"] = prompt + ("\nsecond line" if i % 5 == 4 else "")
        if i % 6 == 2:
            settings["tiling"] = True  # seamless tiling: "Tiling: True"
        if i % 7 == 5:  # A1111 prompt syntax: emphasis, prompt editing, alternation (a conditioning schedule)
            settings["prompt"] = f"({rng.choice(WORDS)}:1.3), [{rng.choice(WORDS)}:{rng.choice(WORDS)}:1], [a|b]"
        if i % 5 == 1:
            settings["clip_skip"] = 2
        if i % 4 == 0:  # variation seed
            settings.update(subseed=rng.randrange(2**32), subseed_strength=round(rng.uniform(0.05, 0.95), 2))
        if i == 12:
            settings["seed_resize_from"] = (48, 40)
        if i in (6, 17):  # hires fix: a latent upscale, then a second pass
            settings["hires"] = hires_fix(rng.choice(["Latent", "Latent (nearest-exact)"]), scale=2, steps=2,
                                          denoising_strength=0.55)
        if i in (8, 13):  # batch count: seeds counted up, each image its own seed in its PNG
            settings["batch_count"] = 2
        if i % 4 == 3:
            settings["scheduler"] = rng.choice(offered)
        elif i % 4 != 1:  # every fourth request leaves the scheduler to the model
            sampler = rng.choice(usable)
            settings["sampler"] = sampler.name
            settings["schedule_type"] = rng.choice(sampler.schedule_types)
        requests.append(settings)
    return requests


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def originals(suite):
    """The 20 random requests' results: (settings, PNGs)."""
    from latentwire.client import Client

    with Client(suite.address, timeout=120) as client:
        offered = list(client.list_schedulers().schedulers)
        made = []
        for settings in _random_requests(offered):
            settings = dict(settings)
            made.append((settings, client.generate(settings.pop("prompt"), **settings).images))
    return made


@pytest.mark.slow  # starts the suite
def test_generate_from_regenerates_identical_pixels(originals, client):
    remade = {}
    images = 0
    for settings, pngs in originals:
        assert len(pngs) == settings["num_images"] * settings.get("batch_count", 1)
        if len(pngs) == 2:  # each image of a batch (or batch count) differs: picking the right one matters
            assert not np.array_equal(_pixels(pngs[0]), _pixels(pngs[1]))
        for index, png in enumerate(pngs):
            params = infotext.parse_parameters(infotext.png_parameters(png))
            kwargs = infotext.request_kwargs(params)
            position = index % settings["num_images"]  # a batch count's images are each their own run's
            assert infotext.batch_position(params) == position and infotext.missing_inputs(params) == []
            assert "batch_count" not in kwargs  # the PNG's own seed makes it again, alone
            key = json.dumps(kwargs, sort_keys=True, default=lambda message: message.SerializeToString().hex())
            if key not in remade:  # a batch is made again once, for all of its positions
                request = dict(kwargs)
                remade[key] = client.generate(request.pop("prompt"), **request).images
            again = remade[key][position]
            assert np.array_equal(_pixels(again), _pixels(png)), (settings, position)
            assert infotext.png_parameters(again) == infotext.png_parameters(png)
            images += 1
    assert images > 20 and len(remade) == 22  # two batch counts of two: their second images are other runs


@pytest.mark.slow  # starts the suite
def test_cli_generate_from_a_batch_position(originals, suite, tmp_path):
    settings, pngs = next((s, p) for s, p in originals if len(p) == 2 and s.get("sampler"))
    source = tmp_path / "source.png"
    source.write_bytes(pngs[1])
    output = tmp_path / "again.png"
    completed = subprocess.run([*CLI, "generate", "--from", str(source), "-o", str(output), "-q",
                                "--server", suite.address], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {output}" in completed.stdout and not (tmp_path / "again-1.png").exists()
    assert np.array_equal(_pixels(output.read_bytes()), _pixels(pngs[1]))


@pytest.mark.slow  # starts the suite
def test_image_to_image_png_needs_its_init_image(originals, client, tmp_path, capsys):
    init = originals[0][1][0]
    made = client.generate("a harbour at night", seed=11, steps=3, init_image=init, strength=0.6,
                           sampler="Euler a").images[0]
    source = tmp_path / "img2img.png"
    source.write_bytes(made)
    assert run(build_parser().parse_args(["generate", "--from", str(source), "--server", client.address])) == 2
    error = capsys.readouterr().err
    assert "needs inputs its PNG does not hold" in error and "--init-image IMAGE" in error
    assert "Denoising strength: 0.6" in error and str(tmp_path) not in error
    # Given the init image, the file's strength and the rest make it again.
    (tmp_path / "init.png").write_bytes(init)
    output = tmp_path / "again.png"
    assert run(build_parser().parse_args(["generate", "--from", str(source), "--init-image", str(tmp_path / "init.png"),
                                          "-o", str(output), "-q", "--server", client.address])) == 0
    assert np.array_equal(_pixels(output.read_bytes()), _pixels(made))
