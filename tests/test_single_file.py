"""Single-file checkpoints: the tiny SD model written in the original (CompVis) key layout converts back offline.

The round trip goes through diffusers' own single-file loader (services/registry/single_file.py) and
must give back every tensor bit for bit, the same image for a fixed seed, and a folder the registry
imports; pickles, unknown layouts and missing configs are refused with a reason.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentwire.client.registry import Kind, ModelFilesError, RegistryClient, scan_folder
from services.registry.single_file import convert_single_file
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.suite.launcher import start_service, wait_serving
from services.tiny_models.single_file import write_original_single_file

CLI = [sys.executable, "-m", "latentwire.cli.main", "models"]
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> Path:
    return write_original_single_file(tiny_model, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def converted(single_file, tiny_model, tmp_path_factory) -> Path:
    return convert_single_file(single_file, tmp_path_factory.mktemp("converted") / "tiny-sd", config=tiny_model)


def image(folder: Path) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, use_safetensors=True)
    return pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def assert_same_tensors(a: Path, b: Path) -> None:
    for component, name in WEIGHTS.items():
        left, right = load_file(a / component / name), load_file(b / component / name)
        assert left.keys() == right.keys(), component
        for key in left:
            assert left[key].dtype == right[key].dtype and left[key].shape == right[key].shape, key
            assert torch.equal(left[key], right[key]), key  # max abs difference 0


def test_original_layout_keys(single_file):
    keys = load_file(single_file).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys  # the tiny UNet's only upsampler
    assert "first_stage_model.decoder.up.1.block.1.conv1.weight" in keys  # 1 + 1 resnets
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) or "down_blocks" in k for k in keys)


def test_round_trip_same_tensors_configs_and_image(converted, tiny_model):
    assert_same_tensors(converted, tiny_model)
    for config in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert json.loads((converted / config).read_text()) == json.loads((tiny_model / config).read_text())
    assert np.array_equal(image(converted), image(tiny_model))


def test_cli_converts_and_registry_imports(single_file, tiny_model, tmp_path):
    # The light client names the command that converts; it never converts itself (no torch there).
    with pytest.raises(ModelFilesError, match="convert-single-file"):
        scan_folder(single_file)
    out = tmp_path / "cli-converted"
    completed = subprocess.run([*CLI, "convert-single-file", str(single_file), str(out), "--config", str(tiny_model)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(out)
    data = tmp_path / "registry-data"
    service = start_service("registry", "services.registry", ["--port", "0", "--data-dir", str(data)],
                            log_dir=tmp_path / "logs", timeout=60)
    try:
        wait_serving(service.address, 60, "registry")
        completed = subprocess.run([*CLI, "import", str(out), "--name", "from-single-file",
                                    "--registry", service.address], capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        with RegistryClient(service.address, timeout=30) as client:
            client.download_files(client.resolve("from-single-file@1"), tmp_path / "downloaded")
        assert_same_tensors(tmp_path / "downloaded", tiny_model)
        assert np.array_equal(image(tmp_path / "downloaded"), image(tiny_model))
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(30) == 0


def test_pickle_refused_unless_allowed(single_file, tiny_model, tmp_path):
    ckpt = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": load_file(single_file)}, ckpt)
    with pytest.raises(FailedPrecondition) as refused:
        convert_single_file(ckpt, tmp_path / "out", config=tiny_model)
    assert refused.value.reason == "PICKLE_REFUSED" and "--allow-pickle" in refused.value.message
    assert not (tmp_path / "out").exists()
    out = convert_single_file(ckpt, tmp_path / "out", config=tiny_model, allow_pickle=True)
    assert_same_tensors(out, tiny_model)


def test_unknown_layouts_refused(tiny_model, tmp_path):
    # A diffusers component file is safetensors, but not a single-file checkpoint.
    diffusers_unet = tmp_path / "unet.safetensors"
    diffusers_unet.write_bytes((tiny_model / "unet" / WEIGHTS["unet"]).read_bytes())
    with pytest.raises(InvalidArgument) as unknown:
        convert_single_file(diffusers_unet, tmp_path / "out", config=tiny_model)
    assert unknown.value.reason == "UNKNOWN_CHECKPOINT_LAYOUT"
    assert "model.diffusion_model" in unknown.value.message and str(tmp_path) not in unknown.value.message
    renamed_pickle = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.zeros(1)}, renamed_pickle)
    with pytest.raises(InvalidArgument) as invalid:
        convert_single_file(renamed_pickle, tmp_path / "out", config=tiny_model)
    assert invalid.value.reason == "INVALID_SAFETENSORS"
    assert not (tmp_path / "out").exists()


def test_shipped_configs_need_a_matching_architecture(single_file, tiny_model, tmp_path):
    # Without --config the shipped full-size SD 1.5 configs (and CLIP's shipped vocabulary) are used: the tiny
    # weights do not fit SD 1.5's full-size architecture, a clear error, nothing written.
    for tokenizer in (None, tiny_model / "tokenizer"):
        with pytest.raises(InvalidArgument) as mismatch:
            convert_single_file(single_file, tmp_path / "out", tokenizer=tokenizer)
        assert mismatch.value.reason == "CHECKPOINT_CONFIG_MISMATCH" and "--config" in mismatch.value.message
        assert not (tmp_path / "out").exists()


def test_shipped_clip_vocabulary_tokenizes_as_clip():
    """The tokenizer built from the shipped BPE vocabulary is CLIP's: 49408 ids, and the ids SD 1.5's tokenizer
    gives these prompts (as published with the model: "a photo of a cat" -> 320 1125 539 320 2368)."""
    from services.registry.single_file import shipped_clip_tokenizer

    clip = shipped_clip_tokenizer()
    assert len(clip) == 49408 and clip.model_max_length == 77
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip("A photograph of an astronaut riding a horse").input_ids == \
        [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    padded = clip("a cat", padding="max_length").input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74
    # SDXL's tokenizer_2 (OpenCLIP bigG) pads with "!", id 0.
    assert shipped_clip_tokenizer(pad_token="!")("a cat", padding="max_length").input_ids[4:] == [0] * 73


def test_layouts_recognised_and_configs_needed(tmp_path):
    # Only the identifying keys: enough to recognise the family. SDXL's configs ship (so these zeros are checked
    # against them)...
    keys = ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.input_blocks.0.0.weight"]
    path = tmp_path / "sdxl.safetensors"
    save_file({k: torch.zeros(1, 4) for k in keys}, path)
    with pytest.raises(InvalidArgument) as mismatch:
        convert_single_file(path, tmp_path / "out")
    assert mismatch.value.reason == "CHECKPOINT_CONFIG_MISMATCH" and "sdxl" in mismatch.value.message
    with pytest.raises(InvalidArgument) as mismatch:
        convert_single_file(path, tmp_path / "out", family="sd15")
    assert mismatch.value.reason == "CHECKPOINT_FAMILY_MISMATCH"
    # ... SD 2.x's do not.
    sd2 = tmp_path / "sd2.safetensors"
    save_file({k: torch.zeros(1, 4) for k in ["cond_stage_model.model.token_embedding.weight",
                                              "model.diffusion_model.input_blocks.0.0.weight"]}, sd2)
    with pytest.raises(FailedPrecondition) as missing:
        convert_single_file(sd2, tmp_path / "out")
    assert missing.value.reason == "SINGLE_FILE_CONFIG_MISSING" and "sd2" in missing.value.message
    assert not (tmp_path / "out").exists()


def test_shipped_sd15_configs_fit_the_sd15_layout():
    """The shipped configs describe SD 1.5: its well-known original keys map onto them (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from services.registry.single_file import CONFIG_ROOT
    from services.tiny_models.single_file import convert_unet_state_dict, convert_vae_state_dict

    root = CONFIG_ROOT / "sd15"
    unet_config = UNet2DConditionModel.load_config(root / "unet")
    vae_config = AutoencoderKL.load_config(root / "vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).state_dict()
        vae = AutoencoderKL.from_config(vae_config).state_dict()
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    original = {**{"model.diffusion_model." + k: v for k, v in convert_unet_state_dict(unet, unet_config).items()},
                **{"first_stage_model." + k: v for k, v in convert_vae_state_dict(vae, vae_config).items()}}
    # Keys and shapes of the released v1-5-pruned-emaonly.safetensors.
    for key, shape in {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                       "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                       "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
                       "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                       "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3)}.items():
        assert tuple(original[key].shape) == shape, key
    assert text_encoder.get_input_embeddings().weight.shape == (49408, 768)
    # diffusers' own loader maps every one of them back onto the shipped architecture.
    back = convert_ldm_unet_checkpoint(original, unet_config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    back = convert_ldm_vae_checkpoint(original, vae_config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}


def test_float16_checkpoint_stays_float16(single_file, tiny_model, tmp_path):
    # Most checkpoints are shared in float16; the converted folder keeps that precision, bit for bit.
    half = tmp_path / "tiny-sd-fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(single_file).items()}, half)
    out = convert_single_file(half, tmp_path / "out", config=tiny_model)
    for component, name in WEIGHTS.items():
        converted, reference = load_file(out / component / name), load_file(tiny_model / component / name)
        assert converted.keys() == reference.keys()
        assert all(converted[k].dtype == torch.float16 and torch.equal(converted[k], reference[k].half())
                   for k in reference), component


# ----------------------------------------------------------------------------------------------
# SDXL (base and refiner): the original SGM layout, two text towers


SDXL_WEIGHTS = {**WEIGHTS, "text_encoder_2": "model.safetensors"}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> dict[str, Path]:
    from services.tiny_models import create_tiny_model

    root = tmp_path_factory.mktemp("sdxl")
    return {family: create_tiny_model(root / family, family, seed=0) for family in ("sdxl", "sdxl-refiner")}


def assert_same_components(a: Path, b: Path) -> None:
    """Every weight file of ``b`` is in ``a`` with the same keys and bit-identical tensors (and no more folders)."""
    components = [c for c in SDXL_WEIGHTS if (b / c).is_dir()]
    assert [c for c in SDXL_WEIGHTS if (a / c).is_dir()] == components
    for component in components:
        name = SDXL_WEIGHTS[component]
        left, right = load_file(a / component / name), load_file(b / component / name)
        assert left.keys() == right.keys(), component
        for key in right:
            assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), (component, key)


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdxl_round_trip_same_tensors_and_configs(tiny_sdxl, family, tmp_path):
    folder = tiny_sdxl[family]
    single = write_original_single_file(folder, tmp_path / f"{family}.safetensors")
    keys = load_file(single).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's added (text, time) conditioning
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) or "down_blocks" in k for k in keys)
    if family == "sdxl":
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys  # CLIP-L
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # bigG, fused qkv
        assert "conditioner.embedders.1.model.text_projection" in keys
    else:
        assert "conditioner.embedders.0.model.text_projection" in keys  # the refiner: bigG only, first
        assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    out = convert_single_file(single, tmp_path / "converted", config=folder)
    assert_same_components(out, folder)
    kind = "MODEL_KIND_STABLE_DIFFUSION_XL" + ("" if family == "sdxl" else "_REFINER")
    assert Kind.Name(scan_folder(out).kind) == kind  # imports as its family's kind
    for config in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json",
                   "text_encoder_2/config.json"):
        assert json.loads((out / config).read_text()) == json.loads((folder / config).read_text()), config


def test_sdxl_generates_the_same_image(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_sdxl["sdxl"]
    out = convert_single_file(write_original_single_file(folder, tmp_path / "sdxl.safetensors"), tmp_path / "out",
                              config=folder)

    def generate(path: Path) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True)
        return pipe("a red cube", negative_prompt="blurry", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    assert np.array_equal(generate(out), generate(folder))


def test_sdxl_tokenizers_come_from_one_folder(tiny_sdxl, tmp_path):
    """Configs without tokenizers (as the shipped ones): --tokenizer serves both; tokenizer_2 pads with "!".
    Without --tokenizer both are CLIP's, built from the shipped vocabulary."""
    import shutil

    from transformers import CLIPTokenizer

    folder = tiny_sdxl["sdxl"]
    config = tmp_path / "configs"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    single = write_original_single_file(folder, tmp_path / "sdxl.safetensors")
    shipped = convert_single_file(single, tmp_path / "shipped", config=config)
    for name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        assert CLIPTokenizer.from_pretrained(shipped / name)("a cat", padding="max_length").input_ids[:5] == \
            [49406, 320, 2368, 49407, pad], name
    out = convert_single_file(single, tmp_path / "out", config=config, tokenizer=folder / "tokenizer")
    assert_same_components(out, folder)
    for name in ("tokenizer", "tokenizer_2"):
        converted, original = CLIPTokenizer.from_pretrained(out / name), CLIPTokenizer.from_pretrained(folder / name)
        assert converted.pad_token == original.pad_token, name
        assert converted("a red cube", padding="max_length").input_ids == \
            original("a red cube", padding="max_length").input_ids, name
    assert CLIPTokenizer.from_pretrained(out / "tokenizer_2").pad_token == "!"


def test_sdxl_tiny_file_does_not_fit_the_shipped_configs(tiny_sdxl, tmp_path):
    folder = tiny_sdxl["sdxl"]
    single = write_original_single_file(folder, tmp_path / "sdxl.safetensors")
    with pytest.raises(InvalidArgument) as mismatch:
        convert_single_file(single, tmp_path / "out", tokenizer=folder / "tokenizer")
    assert mismatch.value.reason == "CHECKPOINT_CONFIG_MISMATCH" and "--config" in mismatch.value.message
    assert str(tmp_path) not in mismatch.value.message and not (tmp_path / "out").exists()


def test_sdxl_float16_checkpoint_stays_float16(tiny_sdxl, tmp_path):
    folder = tiny_sdxl["sdxl"]
    half = tmp_path / "sdxl-fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(write_original_single_file(folder, tmp_path / "x.safetensors")).items()},
              half)
    out = convert_single_file(half, tmp_path / "out", config=folder)
    for component, name in SDXL_WEIGHTS.items():
        converted, reference = load_file(out / component / name), load_file(folder / component / name)
        assert converted.keys() == reference.keys(), component
        assert all(converted[k].dtype == torch.float16 and torch.equal(converted[k], reference[k].half())
                   for k in reference), component


# Keys and shapes of the released sd_xl_base_1.0.safetensors and sd_xl_refiner_1.0.safetensors.
_SDXL_KEYS = {
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
    "sdxl-refiner": {
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": (768, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1536, 1536, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1536, 1536, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
}


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_shipped_sdxl_configs_fit_the_sdxl_layout(family):
    """The shipped configs describe SDXL 1.0: its well-known original keys map onto them (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from services.registry.single_file import CONFIG_ROOT
    from services.tiny_models.single_file import (
        _openclip_state_dict,
        _text_encoder_state_dict,
        convert_unet_state_dict,
        convert_vae_state_dict,
    )

    root = CONFIG_ROOT / family
    index = json.loads((root / "model_index.json").read_text())
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionXLImg2ImgPipeline"
    assert index["_class_name"] == pipeline
    unet_config = UNet2DConditionModel.load_config(root / "unet")
    vae_config = AutoencoderKL.load_config(root / "vae")
    bigg_prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).state_dict()
        vae = AutoencoderKL.from_config(vae_config).state_dict()
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
        original = {**{"model.diffusion_model." + k: v for k, v in convert_unet_state_dict(unet, unet_config).items()},
                    **{"first_stage_model." + k: v for k, v in convert_vae_state_dict(vae, vae_config).items()},
                    **_openclip_state_dict(bigg.state_dict(), bigg_prefix)}
        if family == "sdxl":
            clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")).state_dict()
            original.update(_text_encoder_state_dict(clip_l, "conditioner.embedders.0.transformer."))
    for key, shape in _SDXL_KEYS[family].items():
        assert tuple(original[key].shape) == shape, key
    # diffusers' own loader maps every one of them back onto the shipped architecture.
    back = convert_ldm_unet_checkpoint(original, unet_config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    back = convert_ldm_vae_checkpoint(original, vae_config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}
    back = convert_open_clip_checkpoint(bigg, original, prefix=bigg_prefix)
    assert {k: tuple(v.shape) for k, v in back.items()} == \
        {k: tuple(v.shape) for k, v in bigg.state_dict().items()}
