"""Tiny random-weight models of every family (SD 1.5, SDXL base and refiner, SD3, Flux): each folder
loads with its own diffusers pipeline and makes a finite image, builds are byte-for-byte
deterministic, and `latentwire models create-tiny --family` writes them (CPU, seconds)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from latentwire.cli.main import main as latentwire_main
from services.tiny_models import FAMILIES, build_t5_tokenizer, create_tiny_model
from services.tiny_models.t5_tokenizer import T5_VOCAB_SIZE

PROMPT = "a photo of an astronaut riding a horse"
PIPELINES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-refiner": StableDiffusionXLImg2ImgPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: create_tiny_model(root / family, family) for family in FAMILIES}


def test_every_family_is_offered() -> None:
    assert set(FAMILIES) == set(PIPELINES)


def test_t5_tokenizer_layout() -> None:
    tokenizer = build_t5_tokenizer()
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) <= T5_VOCAB_SIZE
    # T5's layout: <pad> 0, </s> 1, <unk> 2; "</s>" ends every text, padding uses <pad>.
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)
    ids = tokenizer(PROMPT, padding="max_length", max_length=24).input_ids
    assert ids[-1] == 0 and ids[ids.index(1) + 1:] == [0] * (len(ids) - ids.index(1) - 1)
    assert 2 not in ids  # every character of the prompt is in the vocabulary
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert 6 <= ids.index(1) <= 10  # prompt words are whole pieces, not characters


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_family_loads_with_its_pipeline_and_makes_a_finite_image(folders: dict[str, Path], family: str) -> None:
    folder = folders[family]
    assert sum(len(data) for data in _files(folder).values()) < 5_000_000
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    kwargs = {"safety_checker": None} if family == "sd15" else {}
    pipe = PIPELINES[family].from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    assert all(p.dtype == torch.float32 for p in pipe.components["vae"].parameters())

    call = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}
    if family == "sdxl-refiner":
        init = torch.Generator().manual_seed(1)
        call = {**call, "image": torch.rand(1, 3, 32, 32, generator=init), "strength": 0.8}
        del call["height"], call["width"]
    image = pipe(PROMPT, **call).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 1e-3


def test_family_configs_are_the_families_own(folders: dict[str, Path]) -> None:
    sdxl = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.config.force_zeros_for_empty_prompt is True
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer.pad_token == "<|endoftext|>"
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert sdxl.vae.config.force_upcast and sdxl.vae.config.scaling_factor == 0.13025

    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["sdxl-refiner"])
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    # 5 time ids (size, crop, aesthetic score) x 8 + bigG's pooled 32; attends to bigG alone.
    assert refiner.unet.config.projection_class_embeddings_input_dim == 5 * 8 + 32
    assert refiner.unet.config.cross_attention_dim == refiner.text_encoder_2.config.hidden_size
    # Base and refiner share the VAE (base latents can be handed over) and bigG; CLIP-L differs from bigG.
    for shared in ("vae", "text_encoder_2"):
        assert _files(folders["sdxl"] / shared) == _files(folders["sdxl-refiner"] / shared)
    clip_l, big_g = sdxl.text_encoder.get_input_embeddings(), sdxl.text_encoder_2.get_input_embeddings()
    assert not torch.equal(clip_l.weight, big_g.weight)

    sd3 = StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    assert sd3.vae.config.latent_channels == 16 == sd3.transformer.config.in_channels
    assert type(sd3.text_encoder_3).__name__ == "T5EncoderModel"
    assert not torch.equal(sd3.text_encoder.text_projection.weight, sd3.text_encoder_2.text_projection.weight)

    flux = FluxPipeline.from_pretrained(folders["flux"])
    assert flux.vae.config.latent_channels == 16 and flux.transformer.config.in_channels == 64
    assert flux.transformer.config.guidance_embeds is True
    assert flux.scheduler.config.use_dynamic_shifting is True
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"


def test_flux_guidance_is_distilled_guidance(folders: dict[str, Path]) -> None:
    # Flux's guidance_scale feeds the guidance embedding (one pass, no negative prompt).
    pipe = FluxPipeline.from_pretrained(folders["flux"])
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=guidance, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images for guidance in (1.0, 4.0)]
    assert np.abs(images[0] - images[1]).max() > 1e-4


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_same_seed_same_bytes_other_seed_other_weights(folders: dict[str, Path], tmp_path: Path, family: str) -> None:
    again = create_tiny_model(tmp_path / "again", family, seed=0)
    assert _files(again) == _files(folders[family])
    other = _files(create_tiny_model(tmp_path / "other", family, seed=1))
    weights = [name for name in other if name.endswith(".safetensors")]
    assert weights and all(other[name] != _files(again)[name] for name in weights)


def test_existing_folder_is_never_overwritten(folders: dict[str, Path]) -> None:
    before = _files(folders["sd3"])
    with pytest.raises(FileExistsError):
        create_tiny_model(folders["sd3"], "sd3", seed=1)
    assert _files(folders["sd3"]) == before


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_cli_writes_each_family(folders: dict[str, Path], tmp_path: Path, family: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    # In process (one interpreter start for all five); the entry point itself is run below.
    with pytest.raises(SystemExit) as exit_info:
        latentwire_main(["models", "create-tiny", str(tmp_path / family), "--family", family])
    assert exit_info.value.code == 0
    assert _files(tmp_path / family) == _files(folders[family])


def test_cli_entry_point_and_bad_flag_combinations(folders: dict[str, Path], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "latentwire.cli.main", "models", "create-tiny",
                           str(tmp_path / "flux"), "--family", "flux"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "flux") == _files(folders["flux"])

    with pytest.raises(SystemExit) as exit_info:
        latentwire_main(["models", "create-tiny", str(tmp_path / "x"), "--family", "sdxl", "--full-size"])
    assert exit_info.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a family
        latentwire_main(["models", "create-tiny", str(tmp_path / "y"), "--family", "sd4"])
    assert exit_info.value.code == 2 and not (tmp_path / "y").exists()
